"""Where the time of our train step goes: per source function, forward vs backward.

    python benchmarks/profile_step.py --config xsmall --batch-size 8 --seq-len 128 --dtype float32

Traces a few steps of the real train step with jax.profiler, maps every executed XLA op back to
the Python line that created it (the compiled HLO's stack frames), and prints one JSON line per
group (debertina_jax file:function, "bwd" for the backward pass, "optax" for the update), largest
first, then a total. Takes the same config flags as benchmarks/train_step.py.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from train_step import build_parser, load_benchmark_config, random_lines  # noqa: E402

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(.*stack_frame_id=(\d+)")
CONTAINERS = {"while", "call", "conditional", "async-start", "async-done"}


def _table(lines: list[str], header: str) -> dict[int, str]:
    rows, inside = {}, False
    for line in lines:
        if line == header:
            inside = True
        elif inside and (not line or not line[0].isdigit()):
            break
        elif inside:
            key, _, rest = line.partition(" ")
            rows[int(key)] = rest
    return rows


def frame_labels(hlo_text: str) -> tuple[dict[str, str], dict[str, str]]:
    """({instruction: group label}, {instruction: opcode}) from a compiled module's text."""
    lines = hlo_text.splitlines()
    files = {k: v.strip('"') for k, v in _table(lines, "FileNames").items()}
    funcs = {k: v.strip('"') for k, v in _table(lines, "FunctionNames").items()}
    locs, frames = {}, {}
    for k, v in _table(lines, "FileLocations").items():
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        locs[k] = (files[int(f["file_name_id"])], funcs[int(f["function_name_id"])], int(f["line"]))
    for k, v in _table(lines, "StackFrames").items():
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        frames[k] = (int(f["file_location_id"]), int(f["parent_frame_id"]) - 1)

    def label(frame: int, backward: bool) -> str:
        chain = []
        while frame > 0 and len(chain) < 64:
            loc, frame = frames[frame]
            chain.append(locs[loc])
        if any("/optax/" in path for path, _, _ in chain):
            return "optax update"
        for path, func, line in chain:
            if "/debertina_jax/" in path:
                return f"{Path(path).stem}.{func}:{line}" + (" [bwd]" if backward else "")
        return "other"

    labels, opcodes = {}, {}
    for line in lines:
        m = INSTRUCTION.match(line)
        if m:
            name, opcode, frame = m.group(1), m.group(2), int(m.group(3))
            labels[name] = label(frame, "transpose(" in line)
            opcodes[name] = opcode
    return labels, opcodes


def main() -> None:
    import jax

    from debertina_jax.sharding import batch_sharding, make_mesh
    from debertina_jax.train_step import (
        create_train_state,
        make_train_step,
        shardings_of,
        step_rng,
    )

    parser = build_parser(__doc__)
    parser.add_argument("--top", type=int, default=40, help="groups to print")
    args = parser.parse_args()
    args.attention_impl = None if args.attention == "auto" else args.attention
    config = load_benchmark_config(args)
    mesh = make_mesh(config.mesh)
    graphdef, state = create_train_state(config, mesh, config.train.seed)
    step = make_train_step(config, mesh, graphdef, shardings_of(state))
    ids = random_lines(args.batch_size, args.seq_len, config.data.vocab_size)
    batch = {"input_ids": jax.device_put(ids, batch_sharding(mesh))}
    compiled = step.lower(state, batch, step_rng(0, 0)).compile()
    labels, opcodes = frame_labels(compiled.as_text())
    for i in range(args.warmup):
        state, metrics = compiled(state, batch, step_rng(0, i))
    jax.block_until_ready(state)

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for i in range(args.steps):
                state, metrics = compiled(state, batch, step_rng(0, 100 + i))
                jax.block_until_ready(state)
        path = glob.glob(f"{tmp}/**/*perfetto_trace.json.gz", recursive=True)[0]
        trace = json.load(gzip.open(path))
    events = trace["traceEvents"] if isinstance(trace, dict) else trace

    by_group: collections.Counter[str] = collections.Counter()
    for e in events:
        name = e.get("name", "")
        if e.get("ph") == "X" and name in labels and opcodes[name] not in CONTAINERS:
            by_group[labels[name]] += e.get("dur", 0) / 1e6 / args.steps
    total = sum(by_group.values())
    for group, seconds in by_group.most_common(args.top):
        print(
            json.dumps(
                {
                    "group": group,
                    "seconds_per_step": round(seconds, 4),
                    "share": round(seconds / total, 4),
                }
            )
        )
    print(json.dumps({"group": "TOTAL (ops, both threads summed)", "seconds_per_step": total}))


if __name__ == "__main__":
    main()
