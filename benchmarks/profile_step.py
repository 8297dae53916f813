"""Where the time of our train step goes: per source line, forward vs backward.

    python benchmarks/profile_step.py --config xsmall --batch-size 8 --seq-len 128 --dtype float32

Traces a few steps of the real train step with jax.profiler, maps every executed XLA op back to
the Python line that created it (the compiled HLO's stack frames), and prints one JSON line per
group (debertina_jax file.function:line, "[bwd]" for the backward pass, "optax update"), largest
first, then the total. Takes the same flags as benchmarks/train_step.py, which also uses
`traced_op_seconds` to measure the attention's share of the real step.
"""

from __future__ import annotations

import collections
import glob
import gzip
import json
import re
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path

INSTRUCTION = re.compile(r"^\s*(?:ROOT )?%?([\w.\-]+) = .*? ([\w\-]+)\(.*stack_frame_id=(\d+)")
# Ops that only run other ops: their durations contain their bodies' and are not counted.
CONTAINERS = {"while", "call", "conditional", "async-start", "async-done"}

Frame = tuple[str, str, int]  # (file path, function, line)


class OpInfo:
    """What the compiled module says about one instruction."""

    def __init__(self, opcode: str, chain: list[Frame], backward: bool):
        self.opcode = opcode
        self.chain = chain  # innermost frame first
        self.backward = backward

    def inside(self, function: str) -> bool:
        """True when the op was created (directly or not) by a debertina_jax `function`."""
        return any("/debertina_jax/" in path and func == function for path, func, _ in self.chain)

    @property
    def label(self) -> str:
        if any("/optax/" in path for path, _, _ in self.chain):
            return "optax update"
        for path, func, line in self.chain:
            if "/debertina_jax/" in path:
                return f"{Path(path).stem}.{func}:{line}" + (" [bwd]" if self.backward else "")
        return "other"


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


def op_infos(hlo_text: str) -> dict[str, OpInfo]:
    """Every instruction of a compiled module's text (`compiled.as_text()`) with its call chain."""
    lines = hlo_text.splitlines()
    files = {k: v.strip('"') for k, v in _table(lines, "FileNames").items()}
    funcs = {k: v.strip('"') for k, v in _table(lines, "FunctionNames").items()}
    locs, frames = {}, {}
    for k, v in _table(lines, "FileLocations").items():
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        locs[k] = (files[int(f["file_name_id"])], funcs[int(f["function_name_id"])], int(f["line"]))
    for k, v in _table(lines, "StackFrames").items():
        f = dict(re.findall(r"(\w+)=(\d+)", v))
        # Printed parent ids are one above the frame ids; 0 means "no parent".
        frames[k] = (int(f["file_location_id"]), int(f["parent_frame_id"]) - 1)

    def chain(frame: int) -> list[Frame]:
        out: list[Frame] = []
        while frame > 0 and len(out) < 64:
            loc, frame = frames[frame]
            out.append(locs[loc])
        return out

    infos = {}
    for line in lines:
        m = INSTRUCTION.match(line)
        if m:
            infos[m.group(1)] = OpInfo(m.group(2), chain(int(m.group(3))), "transpose(" in line)
    return infos


def traced_op_seconds(run_step: Callable[[], None], steps: int) -> dict[str, float]:
    """Seconds per step of every executed XLA op, by instruction name, over `steps` traced calls
    of `run_step` (which must wait for its results)."""
    import jax

    with tempfile.TemporaryDirectory() as tmp:
        with jax.profiler.trace(tmp, create_perfetto_trace=True):
            for _ in range(steps):
                run_step()
        path = glob.glob(f"{tmp}/**/*perfetto_trace.json.gz", recursive=True)[0]
        with gzip.open(path) as f:
            trace = json.load(f)
    events = trace["traceEvents"] if isinstance(trace, dict) else trace
    seconds: collections.Counter[str] = collections.Counter()
    for e in events:
        if e.get("ph") == "X":
            seconds[e.get("name", "")] += e.get("dur", 0) / 1e6 / steps
    return dict(seconds)


def seconds_by_op(infos: dict[str, OpInfo], seconds: dict[str, float]) -> dict[str, float]:
    """The traced seconds of the module's own leaf ops (containers and host events dropped)."""
    return {
        name: s
        for name, s in seconds.items()
        if name in infos and infos[name].opcode not in CONTAINERS
    }


def main() -> None:
    import jax
    from train_step import build_parser, load_benchmark_config, random_lines

    from debertina_jax.pretraining.state import create_train_state, shardings_of
    from debertina_jax.pretraining.step import make_train_step, step_rng
    from debertina_jax.runtime.sharding import batch_sharding, make_mesh

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
    infos = op_infos(compiled.as_text())
    holder = {"state": state, "step": 0}

    def run_step() -> None:
        holder["step"] += 1
        holder["state"], _ = compiled(holder["state"], batch, step_rng(0, holder["step"]))
        jax.block_until_ready(holder["state"])

    for _ in range(args.warmup):
        run_step()
    per_op = seconds_by_op(infos, traced_op_seconds(run_step, args.steps))
    by_group: collections.Counter[str] = collections.Counter()
    for name, s in per_op.items():
        by_group[infos[name].label] += s
    total = sum(by_group.values())
    for group, s in by_group.most_common(args.top):
        print(
            json.dumps(
                {"group": group, "seconds_per_step": round(s, 4), "share": round(s / total, 4)}
            )
        )
    print(json.dumps({"group": "TOTAL", "seconds_per_step": round(total, 4)}))


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    main()
