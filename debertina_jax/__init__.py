"""debertina-jax: DeBERTa-v3 pretraining (RTD + GDES) in JAX/Flax NNX, exported to Hugging Face."""
