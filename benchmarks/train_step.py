"""Training-step throughput of debertina-jax against the same RTD step written with HF PyTorch.

    python benchmarks/train_step.py --config xsmall --batch-size 8 --seq-len 128 --dtype float32
    python benchmarks/train_step.py --config xsmall ... --impl debertina-jax --attention all
    python benchmarks/train_step.py --config large --seq-len 128 --compile-only --no-scan --layers 4

Prints one JSON line per case. Every case runs in its own subprocess, so each gets a fresh
compile cache, its own peak RSS and its own thread settings; the device's matmul peak (the MFU
denominator on a CPU) is measured once at the start of the run. Our case runs the real train step
(`create_train_state` + `make_train_step` on the config's mesh, sharding and donation included);
the HF case is benchmarks/hf_rtd_step.py. The method and the keys are described in
docs/performance.md.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))  # run as a script from anywhere: `python benchmarks/train_step.py`
sys.path.insert(1, str(ROOT / "benchmarks"))

# Published dense bfloat16 peaks (FLOP/s) of accelerators, by jax `device_kind` prefix.
PUBLISHED_BF16_PEAK = {
    "TPU v4": 275e12,
    "TPU v5 lite": 197e12,  # v5e
    "TPU v5p": 459e12,
    "TPU v5": 459e12,
    "TPU v6 lite": 918e12,  # v6e (Trillium)
    "NVIDIA H200": 989e12,
    "NVIDIA H100": 989e12,  # SXM; the PCIe card is 756e12
    "NVIDIA A100": 312e12,
}


# ---- shared helpers ----------------------------------------------------------------------------
def load_benchmark_config(args: argparse.Namespace):
    """The config named by --config (a name in configs/ or a path) with the case's overrides."""
    from debertina_jax.config import load_config

    path = Path(args.config)
    if not path.suffix:
        path = ROOT / "configs" / f"{args.config}.yaml"
    overrides = [
        f"train.batch_size={args.batch_size}",
        f"data.max_seq_length={args.seq_len}",
        f"train.dtype={args.dtype}",
    ]
    if args.scan is not None:
        overrides.append(f"train.scan_layers={str(args.scan).lower()}")
    if args.remat is not None:
        overrides.append(f"train.remat={args.remat}")
    if args.layers is not None:
        overrides.append(f"model.num_hidden_layers={args.layers}")
    if getattr(args, "attention_impl", None):
        overrides.append(f"train.attention_impl={args.attention_impl}")
    return load_config(path, overrides + list(args.override))


def random_lines(batch: int, seq_len: int, vocab: int, seed: int = 0):
    """Full lines as pretraining sees them: [CLS] + random regular pieces + [SEP] (int32 numpy)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    ids = rng.integers(5, vocab, size=(batch, seq_len), dtype=np.int32)
    ids[:, 0], ids[:, -1] = 1, 2
    return ids


def peak_rss_bytes() -> int:
    """The process's peak resident set size (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def measure_matmul_peak(size: int = 2048, repeats: int = 8) -> float:
    """Best-of-`repeats` float32 FLOP/s of a jitted [size, size] @ [size, size] matmul."""
    import jax
    import jax.numpy as jnp

    a = jax.random.normal(jax.random.key(0), (size, size), jnp.float32)
    b = jax.random.normal(jax.random.key(1), (size, size), jnp.float32)
    matmul = jax.jit(jnp.matmul)
    matmul(a, b).block_until_ready()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        matmul(a, b).block_until_ready()
        best = min(best, time.perf_counter() - start)
    return 2 * size**3 / best


def device_peak() -> tuple[float | None, str]:
    """(peak FLOP/s, where it comes from) for accelerators; (None, ...) means "measure it"."""
    import jax

    kind = jax.devices()[0].device_kind
    for prefix, peak in PUBLISHED_BF16_PEAK.items():
        if kind.startswith(prefix):
            return peak, f"published bf16 peak of {prefix}"
    return None, "measured f32 matmul"


class StepTimes(list):
    """Wall-clock seconds of each timed step, plus the process CPU seconds they used in all.

    CPU seconds hardly change when other processes compete for the cores, wall seconds do:
    on a shared machine, compare `cpu_seconds_per_step` between runs.
    """

    cpu_seconds: float = 0.0


def timed_steps(run_step, warmup: int, steps: int) -> StepTimes:
    for _ in range(warmup):
        run_step()
    times = StepTimes()
    cpu_start = sum(os.times()[:2])
    for _ in range(steps):
        start = time.perf_counter()
        run_step()
        times.append(time.perf_counter() - start)
    times.cpu_seconds = sum(os.times()[:2]) - cpu_start
    return times


def case_record(args: argparse.Namespace, config, impl: str, times: StepTimes) -> dict[str, Any]:
    """The keys every case reports: shapes, step time, throughput, model FLOPs and MFU."""
    from debertina_jax.pretraining.flops import mfu, train_step_flops

    flops = train_step_flops(config, args.batch_size, args.seq_len)
    step_time = statistics.median(times)
    tokens = args.batch_size * args.seq_len
    return {
        "impl": impl,
        "config": args.config,
        "batch": args.batch_size,
        "seq_len": args.seq_len,
        "dtype": args.dtype,
        "vocab_size": config.model.vocab_size,
        "discriminator_layers": config.model.num_hidden_layers,
        "step_time_s": step_time,
        "step_times_s": [round(t, 4) for t in times],
        "cpu_seconds_per_step": times.cpu_seconds / len(times),
        "tokens_per_second": tokens / step_time,
        "model_flops_per_token": flops.per_token,
        "model_flops_per_step": flops.total,
        "achieved_flops_per_second": flops.total / step_time,
        "peak_flops": args.peak_flops,
        "peak_flops_source": args.peak_source,
        "mfu": mfu(flops.total, step_time, args.peak_flops),
        "attention_share_of_flops": flops.attention_share,
        "load_average_1m": os.getloadavg()[0],  # other processes on the machine (noise)
        "host": platform.node(),
        "cpu_count": os.cpu_count(),
        "date": datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
    }


# ---- our train step ----------------------------------------------------------------------------
def attention_seconds(config, batch: int, seq_len: int, impl: str, repeats: int) -> float:
    """Median seconds of one layer's `disentangled_attention` (fwd + bwd, dropout on) at the
    step's shapes, from q/k/v/relative keys to the context; the projections are not included."""
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from debertina_jax.model.attention import attention_scale, disentangled_attention
    from debertina_jax.model.blocks import apply_dropout
    from debertina_jax.model.relative_position import build_relative_positions
    from debertina_jax.pretraining.pair import compute_settings

    c = config.model
    dtype = compute_settings(config).dtype
    heads, head_dim, span = c.num_attention_heads, c.head_dim, c.relative_span
    terms = c.pos_att_type if c.relative_attention else ()
    keys = jax.random.split(jax.random.key(0), 6)
    q, k, v = (jax.random.normal(key, (batch, heads, seq_len, head_dim), dtype) for key in keys[:3])
    pos = [jax.random.normal(key, (heads, 2 * span, head_dim), dtype) for key in keys[3:5]]
    rel_pos = (
        build_relative_positions(seq_len, seq_len, c.position_buckets, c.relative_max_position)
        if terms
        else None
    )
    mask = jnp.ones((batch, 1, seq_len, seq_len), bool)
    dropout = nnx.Dropout(c.attention_probs_dropout_prob)

    def loss(q, k, v, pos_key, pos_query, key):
        out = disentangled_attention(
            q,
            k,
            v,
            pos_key,
            pos_query,
            rel_pos,
            mask,
            pos_att_type=terms,
            span=span,
            scale=attention_scale(head_dim, c.pos_att_type),
            impl=impl,
            dropout_fn=lambda p: apply_dropout(dropout, p, nnx.Rngs(dropout=key)),
        )
        return jnp.sum(out.astype(jnp.float32))

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3, 4)))
    run = lambda: jax.block_until_ready(grad(q, k, v, pos[0], pos[1], keys[5]))
    return statistics.median(timed_steps(run, 1, repeats))


def attention_shares(
    compiled, run_step, config, args, impl: str, step_time: float
) -> dict[str, float]:
    """The attention's share of the real step, two ways.

    attention_share_of_time: trace two steps, and add up the ops that `disentangled_attention`
    created (scores, softmax, dropout on the probabilities, probs @ v, forward and backward; not
    the q/k/v projections), over all the step's ops.
    attention_share_isolated: `attention_seconds` x layers / step time. It misses how XLA fuses
    the attention with its neighbours inside the step; kept for comparison.
    """
    from profile_step import op_infos, seconds_by_op, traced_op_seconds

    from debertina_jax.config import generator_model_config

    infos = op_infos(compiled.as_text())
    per_op = seconds_by_op(infos, traced_op_seconds(run_step, 2))
    inside = sum(s for name, s in per_op.items() if infos[name].inside("disentangled_attention"))
    layers = config.model.num_hidden_layers + generator_model_config(config).num_hidden_layers
    isolated = attention_seconds(config, args.batch_size, args.seq_len, impl, args.steps) * layers
    return {
        "attention_time_s": inside,
        "op_time_s": sum(per_op.values()),
        "attention_share_of_time": inside / sum(per_op.values()),
        "attention_share_isolated": isolated / step_time,
    }


def run_ours(args: argparse.Namespace) -> dict[str, Any]:
    import jax

    from debertina_jax.model.attention import resolve_attention_impl
    from debertina_jax.pretraining.state import (
        abstract_train_state,
        create_train_state,
        shardings_of,
    )
    from debertina_jax.pretraining.step import make_train_step, step_rng
    from debertina_jax.runtime.sharding import batch_sharding, make_mesh

    config = load_benchmark_config(args)
    impl = resolve_attention_impl(config.train.attention_impl)
    mesh = make_mesh(config.mesh)
    start = time.perf_counter()
    if args.compile_only:  # shapes only: nothing is allocated, so large models fit
        graphdef, state, _ = abstract_train_state(config, mesh, config.train.seed)
    else:
        graphdef, state = create_train_state(config, mesh, config.train.seed)
        jax.block_until_ready(state)
    init_time = time.perf_counter() - start

    step = make_train_step(config, mesh, graphdef, shardings_of(state))
    ids = random_lines(args.batch_size, args.seq_len, config.data.vocab_size)
    batch = {"input_ids": jax.device_put(ids, batch_sharding(mesh))}
    start = time.perf_counter()
    compiled = step.lower(state, batch, step_rng(0, 0)).compile()
    compile_time = time.perf_counter() - start
    memory = compiled.memory_analysis()

    record: dict[str, Any] = {}
    if not args.compile_only:
        counter = iter(range(1_000_000))
        holder = {"state": state}

        def run_step() -> None:
            holder["state"], metrics = compiled(holder["state"], batch, step_rng(0, next(counter)))
            jax.block_until_ready((holder["state"], metrics))
            if not bool(metrics["loss"] < float("inf")):
                raise RuntimeError(f"non-finite loss in the benchmark step: {metrics['loss']}")

        times = timed_steps(run_step, args.warmup, args.steps)
        record = case_record(args, config, "debertina-jax", times)
        if args.attention_timing:
            record.update(
                attention_shares(compiled, run_step, config, args, impl, record["step_time_s"])
            )
            record["attention_time_over_flop_share"] = (
                record["attention_share_of_time"] / record["attention_share_of_flops"]
            )
    device = jax.devices()[0]
    stats = device.memory_stats() or {}
    record.update(
        impl="debertina-jax",
        config=args.config,
        batch=args.batch_size,
        seq_len=args.seq_len,
        dtype=args.dtype,
        attention_impl=impl,
        scan_layers=config.train.scan_layers,
        remat=config.train.remat,
        discriminator_layers=config.model.num_hidden_layers,
        device_kind=device.device_kind,
        num_devices=jax.device_count(),
        init_time_s=init_time,
        compile_time_s=compile_time,
        peak_memory_bytes=stats.get("peak_bytes_in_use", peak_rss_bytes()),
        peak_memory_source="device memory_stats" if stats else "host peak RSS (getrusage)",
        xla_temp_bytes=getattr(memory, "temp_size_in_bytes", None),
        xla_argument_bytes=getattr(memory, "argument_size_in_bytes", None),
    )
    return record


# ---- the HF PyTorch step -----------------------------------------------------------------------
def run_hf(args: argparse.Namespace, masked_only: bool) -> dict[str, Any]:
    import torch
    from hf_rtd_step import make_hf_step

    torch.set_num_threads(args.threads)
    config = load_benchmark_config(args)
    start = time.perf_counter()
    step = make_hf_step(config, dtype=args.dtype, masked_only=masked_only)
    init_time = time.perf_counter() - start
    ids = torch.from_numpy(
        random_lines(args.batch_size, args.seq_len, config.data.vocab_size)
    ).long()
    times = timed_steps(lambda: step(ids), args.warmup, args.steps)
    record = case_record(args, config, "hf-pytorch", times)
    record.update(
        hf_variant="masked-only" if masked_only else "plain",
        device_kind="cpu",
        torch_threads=torch.get_num_threads(),
        init_time_s=init_time,
        compile_time_s=0.0,
        peak_memory_bytes=peak_rss_bytes(),
        peak_memory_source="host peak RSS (getrusage)",
        torch_version=torch.__version__,
    )
    return record


# ---- driver ------------------------------------------------------------------------------------
def build_parser(description: str = __doc__) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--config", default="xsmall", help="name in configs/ or a YAML path")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
    p.add_argument("--impl", choices=("all", "debertina-jax", "hf-pytorch"), default="all")
    p.add_argument(
        "--attention",
        default="auto",
        help="relative-score impl(s) for our step: auto, a name, a comma list, or all",
    )
    p.add_argument(
        "--hf-variant",
        choices=("plain", "masked-only", "both"),
        default="plain",
        help="plain: HF MaskedLM on every position (as HF users run it); masked-only: "
        "the MLM head on the masked positions only",
    )
    p.add_argument(
        "--scan",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="train.scan_layers (default: the config's)",
    )
    p.add_argument(
        "--remat",
        choices=("none", "full", "dots"),
        default=None,
        help="train.remat (default: the config's)",
    )
    p.add_argument(
        "--layers",
        type=int,
        default=None,
        help="discriminator depth (the generator stays half of it)",
    )
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="any other config override, repeatable",
    )
    p.add_argument("--steps", type=int, default=5, help="timed steps (the median is reported)")
    p.add_argument("--warmup", type=int, default=1, help="untimed steps after compilation")
    p.add_argument(
        "--compile-only",
        action="store_true",
        help="only lower + compile our step (compile time, XLA memory analysis)",
    )
    p.add_argument(
        "--attention-timing",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="also time the attention function alone to get its share of the step",
    )
    p.add_argument("--threads", type=int, default=os.cpu_count(), help="torch threads")
    p.add_argument(
        "--peak-flops",
        type=float,
        default=None,
        help="the MFU denominator; default: measured (CPU) or published (TPU/GPU)",
    )
    p.add_argument("--timeout", type=float, default=1800, help="seconds per case")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    return p


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def attention_impls(choice: str) -> list[str]:
    from debertina_jax.model.attention import RELATIVE_SCORE_IMPLS

    if choice == "all":
        return sorted(RELATIVE_SCORE_IMPLS)
    names = [n.strip() for n in choice.split(",") if n.strip()]
    unknown = sorted(set(names) - set(RELATIVE_SCORE_IMPLS) - {"auto"})
    if unknown:
        raise SystemExit(
            f"--attention: unknown impl {unknown[0]!r}; choose from auto, all, "
            f"{', '.join(sorted(RELATIVE_SCORE_IMPLS))}"
        )
    return names


def run_child(spec: dict[str, Any], args: argparse.Namespace) -> dict[str, Any] | None:
    """Runs one case in a fresh interpreter; its last stdout line is the JSON record."""
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)]
    cmd += sys.argv[1:]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=args.timeout)
    except subprocess.TimeoutExpired:
        print(json.dumps({**spec, "error": f"timed out after {args.timeout:.0f} s"}), flush=True)
        return None
    lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    if proc.returncode != 0 or not lines:
        tail = proc.stderr.strip().splitlines()[-5:]
        print(json.dumps({**spec, "error": f"exit {proc.returncode}", "stderr": tail}), flush=True)
        return None
    return json.loads(lines[-1])


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    if args.child is not None:
        spec = json.loads(args.child)
        args.peak_flops, args.peak_source = spec["peak_flops"], spec["peak_source"]
        if spec["impl"] == "hf-pytorch":
            record = run_hf(args, spec["hf_variant"] == "masked-only")
        else:
            args.attention_impl = spec["attention"]
            record = run_ours(args)
        print(json.dumps(record), flush=True)
        return

    load_benchmark_config(args)  # a bad config or override fails here, before any case runs
    peak, source = device_peak()
    if args.peak_flops is not None:
        peak, source = args.peak_flops, "given on the command line"
    elif peak is None:
        peak = measure_matmul_peak()
    cases: list[dict[str, Any]] = []
    if args.impl in ("all", "hf-pytorch") and not args.compile_only:
        variants = ("plain", "masked-only") if args.hf_variant == "both" else (args.hf_variant,)
        cases += [{"impl": "hf-pytorch", "hf_variant": v} for v in variants]
    if args.impl in ("all", "debertina-jax"):
        cases += [
            {"impl": "debertina-jax", "attention": a} for a in attention_impls(args.attention)
        ]

    hf_tokens: dict[str, float] = {}
    for spec in cases:
        record = run_child({**spec, "peak_flops": peak, "peak_source": source}, args)
        if record is None:
            continue
        if record["impl"] == "hf-pytorch":
            hf_tokens[record["hf_variant"]] = record["tokens_per_second"]
        elif hf_tokens and "tokens_per_second" in record:
            for variant, tokens in hf_tokens.items():
                key = "vs_hf_pytorch" if variant == "plain" else f"vs_hf_pytorch_{variant}"
                record[key] = record["tokens_per_second"] / tokens
        print(json.dumps(record), flush=True)


if __name__ == "__main__":
    main()
