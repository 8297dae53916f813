"""Train-step time of the tiny config under each train.prng_impl (threefry, rbg, unsafe_rbg).

    python benchmarks/prng_step.py [--steps 30] [--devices 1]

Each PRNG runs in its own subprocess (jax's default PRNG is global and part of the compiled
step), with the real `create_train_state` + `make_train_step` of configs/tiny.yaml and keys from
`step_rng`, as the loop makes them. Prints one JSON line per PRNG: median and mean seconds per
step after 5 warm-up steps, and the machine's load average (a shared machine skews the numbers).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
IMPLS = ("threefry", "rbg", "unsafe_rbg")


def measure(impl: str, steps: int) -> dict:
    sys.path.insert(0, str(ROOT))
    import jax
    import numpy as np

    from debertina_jax.config import load_config
    from debertina_jax.pretraining.loop import PRNG_IMPLS
    from debertina_jax.pretraining.state import create_train_state, shardings_of
    from debertina_jax.pretraining.step import make_train_step, step_rng
    from debertina_jax.runtime.sharding import batch_sharding, make_mesh

    jax.config.update("jax_default_prng_impl", PRNG_IMPLS[impl])
    config = load_config(ROOT / "configs" / "tiny.yaml", [f"train.prng_impl={impl}"])
    mesh = make_mesh(config.mesh)
    graphdef, state = create_train_state(config, mesh, 0)
    step_fn = make_train_step(config, mesh, graphdef, shardings_of(state))
    rng = np.random.default_rng(0)
    shape = (config.train.batch_size, config.data.max_seq_length)
    ids = rng.integers(4, config.data.vocab_size, size=shape, dtype=np.int32)
    batch = {"input_ids": jax.device_put(ids, batch_sharding(mesh))}
    times = []
    for step in range(1, steps + 6):
        start = time.perf_counter()
        state, metrics = step_fn(state, batch, step_rng(0, step))
        jax.block_until_ready(metrics)
        if step > 5:
            times.append(time.perf_counter() - start)
    return {
        "prng_impl": impl,
        "devices": jax.device_count(),
        "median_step_s": statistics.median(times),
        "mean_step_s": statistics.mean(times),
        "steps": steps,
        "loadavg": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--devices", type=int, default=1)
    parser.add_argument("--impl", choices=IMPLS, help=argparse.SUPPRESS)  # the child's case
    args = parser.parse_args()
    if args.impl:
        print(json.dumps(measure(args.impl, args.steps)), flush=True)
        return
    env = dict(os.environ, JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={args.devices}"
    for impl in IMPLS:
        done = subprocess.run(
            [sys.executable, __file__, "--impl", impl, "--steps", str(args.steps)],
            env=env, capture_output=True, text=True, check=True,
        )  # fmt: skip
        print(done.stdout.strip().splitlines()[-1], flush=True)


if __name__ == "__main__":
    main()
