"""Child processes for the multi-process tests (run as a script, never imported by pytest).

    python tests/mp_worker.py distributed WORKDIR   # one of 2 processes, env gives the rest
    python tests/mp_worker.py kill-mid-save WORKDIR # dies by SIGKILL inside a checkpoint save
    python tests/mp_worker.py pause-at STEP MARKER [run_pretrain.py arguments]

The last stdout line of a successful run is "RESULT <json>".
"""

import json
import os
import signal
import sys
import time
from pathlib import Path

import jax
import numpy as np


def distributed(workdir: str) -> dict:
    from debertina_jax.runtime import distributed as dist

    # mode "auto": JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID come from
    # the parent, as a launcher would set them.
    assert dist.maybe_initialize("auto") is True
    assert dist.maybe_initialize("auto") is True  # a second call is a no-op

    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    from debertina_jax.runtime.checkpointing import Checkpointer

    pid = jax.process_index()
    assert jax.process_count() == 2 and jax.device_count() == 8 and jax.local_device_count() == 4
    assert dist.is_main_process() == (pid == 0)

    # Each process feeds its own half of a (16, 3) global batch.
    full = np.arange(48, dtype=np.float32).reshape(16, 3)
    mesh = jax.make_mesh((8,), ("data",))
    batch_sharding = NamedSharding(mesh, P("data"))
    local = full[pid * 8 : (pid + 1) * 8]
    batch = jax.make_array_from_process_local_data(batch_sharding, local, full.shape)
    total, mean = jax.jit(lambda x: (x.sum(), x.mean(axis=0)), out_shardings=None)(batch)
    np.testing.assert_allclose(np.asarray(total), full.sum())
    np.testing.assert_allclose(np.asarray(mean), full.mean(axis=0))

    replicated = jax.device_put(np.float32(3.5), NamedSharding(mesh, P()))
    state = {"batch": batch, "scale": replicated}
    abstract = jax.tree.map(
        lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), state
    )
    with Checkpointer(workdir, every_steps=2, keep=2) as ckpt:
        assert ckpt.save(2, state, {"position": 100 + pid}, {"note": "two hosts"})
        ckpt.wait()
        restored = ckpt.restore(2, abstract)
        for shard in restored.state["batch"].addressable_shards:
            np.testing.assert_array_equal(np.asarray(shard.data), full[shard.index])
        assert restored.data_state == {"position": 100 + pid}, restored.data_state
        assert restored.meta == {"note": "two hosts", "step": 2}, restored.meta

        # Preemption: process 1 alone gets SIGTERM at step 5; flags are exchanged every 4
        # steps, so both processes must stop at step 8 and save it.
        stop_step = None
        with dist.PreemptionWatcher(sync_every=4) as watcher:
            for step in range(3, 20):
                if pid == 1 and step == 5:
                    os.kill(os.getpid(), signal.SIGTERM)
                if watcher.should_stop(step):
                    stop_step = step
                    ckpt.save(step, state, {"position": 200 + pid}, {}, force=True)
                    break
        ckpt.wait()
        steps = ckpt.all_steps()
    return {"process": pid, "stop_step": stop_step, "steps": steps}


def kill_mid_save(workdir: str) -> None:
    from orbax.checkpoint._src.path import atomicity

    from debertina_jax.runtime.checkpointing import Checkpointer

    ckpt = Checkpointer(workdir, every_steps=1, keep=3)
    state = {"w": jax.numpy.full((64, 64), 1.0)}
    ckpt.save(1, state, {"position": 1}, {})
    ckpt.wait()

    # Everything of step 2 gets written, then the process dies just before the commit
    # (the rename of the temporary directory), as a SIGKILL at the worst moment would.
    async def die(self):
        os.kill(os.getpid(), signal.SIGKILL)

    atomicity.AtomicRenameTemporaryPath.finalize = die
    ckpt.save(2, {"w": state["w"] * 2}, {"position": 2}, {})
    ckpt.wait()
    raise AssertionError("the process should have been killed during the save")


def pretrain_paused_at(step: int, marker: str, argv: list[str]) -> int:
    """run_pretrain.py with `argv`, paused just before train step `step` (every earlier step
    trained, logged and its checkpoints saved or in flight): each process writes its pid to
    MARKER.<process index>, then waits for MARKER.go. The test sends its signal (SIGTERM,
    SIGINT, SIGKILL) in the pause, so the signal lands at a known step however fast the run."""
    from debertina_jax.cli import pretrain as cli
    from debertina_jax.pretraining import loop

    step_rng = loop.step_rng  # the loop calls it once per step, right before the step

    def pausing(seed: int, at: int):
        if at == step:
            Path(f"{marker}.{jax.process_index()}").write_text(str(os.getpid()))
            deadline = time.monotonic() + 300
            while not Path(f"{marker}.go").exists():  # a signal's handler runs meanwhile
                if time.monotonic() > deadline:
                    raise RuntimeError(f"nobody created {marker}.go")
                time.sleep(0.02)
        return step_rng(seed, at)

    loop.step_rng = pausing
    return cli.main(argv)


if __name__ == "__main__":
    command, workdir = sys.argv[1], sys.argv[2]
    if command == "distributed":
        print("RESULT " + json.dumps(distributed(workdir)), flush=True)
    elif command == "kill-mid-save":
        kill_mid_save(workdir)
    elif command == "pause-at":
        sys.exit(pretrain_paused_at(int(sys.argv[2]), sys.argv[3], sys.argv[4:]))
    else:
        raise SystemExit(f"unknown command {command!r}")
