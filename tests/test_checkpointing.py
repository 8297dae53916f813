"""Checkpointer: sharded round trips, keep/interval policy, atomicity and clear errors."""

import shutil
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from process_testing import REPO, process_env

from debertina_jax.runtime.checkpointing import (
    Checkpointer,
    CheckpointNotFoundError,
    CheckpointRestoreError,
    restore_checkpoint,
)


@pytest.fixture(scope="module")
def mesh():
    return jax.make_mesh((4, 2), ("data", "model"), axis_types=(jax.sharding.AxisType.Auto,) * 2)


def make_state(mesh, scale=1.0):
    w = jnp.arange(64, dtype=jnp.float32).reshape(8, 8) * scale
    return {
        "params": {"w": jax.device_put(w, NamedSharding(mesh, P("data", "model")))},
        "opt": {"count": jnp.int32(3), "mu": jnp.full((8,), scale, jnp.bfloat16)},
        "rng": jax.random.key(7),
    }


def abstract(tree):
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding), tree)


def _plain(tree):
    """Typed PRNG keys as their uint32 data, so that trees compare with numpy."""
    is_key = lambda a: jnp.issubdtype(a.dtype, jax.dtypes.prng_key)
    return jax.tree.map(lambda a: np.asarray(jax.random.key_data(a) if is_key(a) else a), tree)


def assert_same(a, b):
    jax.tree.map(np.testing.assert_array_equal, _plain(a), _plain(b))


def test_round_trip_async_reshard_and_cpu(tmp_path, mesh):
    state = make_state(mesh)
    expected = jax.tree.map(lambda a: a.copy(), state)
    with Checkpointer(tmp_path, every_steps=10, keep=2) as ckpt:
        assert ckpt.save(10, state, b"\x00grain-state", {"config": {"a": 1}, "tokens": 123})
        # The arrays are off the devices when save returns: donating them is safe.
        jax.tree.map(lambda a: a.delete(), state)
        ckpt.wait()
        assert ckpt.all_steps() == [10] and ckpt.latest_step() == 10

        # Restore onto other shardings than the saved ones.
        target = abstract(expected)
        target["params"]["w"] = jax.ShapeDtypeStruct(
            (8, 8), jnp.float32, sharding=NamedSharding(mesh, P("model", None))
        )
        restored = ckpt.restore(abstract_state=target)
        assert restored.state["params"]["w"].sharding == target["params"]["w"].sharding
        assert restored.state["opt"]["mu"].dtype == jnp.bfloat16
        assert_same(restored.state, expected)
        assert restored.data_state == b"\x00grain-state"
        assert restored.meta == {"config": {"a": 1}, "tokens": 123, "step": 10}

    # Read-only, no target: everything on one CPU device; typed keys come back as key data.
    cpu = restore_checkpoint(tmp_path)
    w = cpu.state["params"]["w"]
    assert w.sharding == jax.sharding.SingleDeviceSharding(jax.devices("cpu")[0])
    np.testing.assert_array_equal(np.asarray(w), np.asarray(expected["params"]["w"]))
    assert cpu.data_state is None and cpu.meta["step"] == 10


def test_interval_keep_force_and_resume(tmp_path, mesh):
    state = make_state(mesh)
    with Checkpointer(tmp_path, every_steps=2, keep=2, async_save=False) as ckpt:
        saved = [s for s in range(1, 9) if ckpt.save(s, state, {"pos": s}, {})]
        assert saved == [2, 4, 6, 8]
        assert ckpt.all_steps() == [6, 8]
        assert not ckpt.should_save(8) and not ckpt.should_save(9) and ckpt.should_save(10)
        assert ckpt.save(9, state, {"pos": 9}, {}, force=True)  # e.g. preemption
        assert not ckpt.save(9, state, {"pos": 9}, {}, force=True)  # never written twice
        assert ckpt.all_steps() == [8, 9]
        with pytest.raises(ValueError, match="meta\\['step'\\] is 3"):
            ckpt.save(12, state, None, {"step": 3})

    # A restarted run sees the same checkpoints and resumes from the latest.
    with Checkpointer(tmp_path, every_steps=2, keep=2) as ckpt:
        assert ckpt.latest_step() == 9
        restored = ckpt.restore(abstract_state=abstract(state))
        assert restored.data_state == {"pos": 9} and restored.meta == {"step": 9}
        assert ckpt.restore(8, abstract(state)).data_state == {"pos": 8}


def test_clear_errors(tmp_path, mesh):
    with pytest.raises(CheckpointNotFoundError, match="no checkpoints in"):
        restore_checkpoint(tmp_path / "nowhere")
    with Checkpointer(tmp_path, every_steps=1, keep=3, async_save=False) as ckpt:
        with pytest.raises(CheckpointNotFoundError, match="no checkpoint in"):
            ckpt.restore()
        state = make_state(mesh)
        ckpt.save(1, state, {}, {})
        ckpt.save(2, state, {}, {})
        with pytest.raises(CheckpointNotFoundError, match=r"step 5 .*available steps: \[1, 2\]"):
            ckpt.restore(5)
        # A different structure than the saved one (e.g. another model config).
        wrong = {"params": {"w": jax.ShapeDtypeStruct((8, 8), jnp.float32)}}
        with pytest.raises(CheckpointRestoreError, match="checkpoints/2"):
            ckpt.restore(2, wrong)

    # Damaged array files: the error names the step directory.
    for path in (tmp_path / "checkpoints" / "2" / "state").rglob("*"):
        if path.is_file() and path.parent.name == "d":
            path.write_bytes(b"garbage")
    with pytest.raises(CheckpointRestoreError, match="cannot restore checkpoint .*checkpoints/2"):
        restore_checkpoint(tmp_path, 2, abstract(make_state(mesh)))
    with pytest.raises(ValueError, match="every_steps"):
        Checkpointer(tmp_path, every_steps=0, keep=1)


def test_unfinished_save_is_never_the_latest(tmp_path, mesh):
    with Checkpointer(tmp_path, every_steps=1, keep=3, async_save=False) as ckpt:
        ckpt.save(1, make_state(mesh), {}, {})
    # What a save killed before its commit leaves behind: a temporary directory.
    ckpt_dir = tmp_path / "checkpoints"
    shutil.copytree(ckpt_dir / "1", ckpt_dir / "7.orbax-checkpoint-tmp-1700000000")
    with Checkpointer(tmp_path, every_steps=1, keep=3) as ckpt:
        assert ckpt.all_steps() == [1] and ckpt.latest_step() == 1
        ckpt.save(2, make_state(mesh), {}, {})  # orbax removes leftovers before a save
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["1", "2"]


def test_process_killed_during_save_keeps_previous_checkpoint(tmp_path):
    env = process_env(1)
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "mp_worker.py"), "kill-mid-save", str(tmp_path)],
        env=env,
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == -9, proc.stderr[-3000:]
    names = sorted(p.name for p in (tmp_path / "checkpoints").iterdir())
    assert "1" in names and "2" not in names
    assert any(n.startswith("2.orbax-checkpoint-tmp") for n in names), names
    restored = restore_checkpoint(tmp_path, restore_data=True)
    assert restored.meta["step"] == 1 and restored.data_state == {"position": 1}
    np.testing.assert_array_equal(np.asarray(restored.state["w"]), np.ones((64, 64)))


def test_relative_workdir(tmp_path, mesh, monkeypatch):
    # `run_pretrain.py --workdir runs/tiny`: orbax itself only takes absolute paths.
    monkeypatch.chdir(tmp_path)
    state = make_state(mesh)
    with Checkpointer("runs/tiny", every_steps=1, keep=1, async_save=False) as ckpt:
        assert ckpt.save(1, state, {"pos": 1}, {})
    with Checkpointer("runs/tiny", every_steps=1, keep=1) as ckpt:
        assert ckpt.restore(abstract_state=abstract(state)).data_state == {"pos": 1}
    assert (tmp_path / "runs" / "tiny" / "checkpoints" / "1").is_dir()
