"""An export killed with SIGKILL leaves its hidden staging directory behind; the next export to
the same OUT removes it, while a live export's directory is left alone."""

import signal
import subprocess
import sys
import textwrap
from pathlib import Path

from debertina_jax.export.publish import publish, remove_stale, staging_dir

# A process that opens a staging directory for `out` the way the export does, says where, and
# waits to be killed.
_HOLD = textwrap.dedent(
    """
    import sys, time
    from pathlib import Path
    from debertina_jax.export.publish import staging_dir
    with staging_dir(Path(sys.argv[1])) as staging:
        (staging / "model.safetensors").write_bytes(b"partial")
        print(staging, flush=True)
        time.sleep(600)
    """
)


def _holder(out: Path) -> tuple[subprocess.Popen, Path]:
    proc = subprocess.Popen(
        [sys.executable, "-c", _HOLD, str(out)], stdout=subprocess.PIPE, text=True
    )
    return proc, Path(proc.stdout.readline().strip())


def test_a_killed_exports_staging_directory_is_removed_by_the_next(tmp_path):
    out = tmp_path / "hf"
    live, busy = _holder(out)
    killed, left = _holder(out)
    killed.send_signal(signal.SIGKILL)
    killed.wait()
    try:
        assert left.is_dir() and busy.is_dir()
        with staging_dir(out) as staging:
            (staging / "config.json").write_text("{}")
            publish(staging, out)
        assert not left.exists(), "the dead export's staging directory is still there"
        assert busy.is_dir(), "a live export's staging directory was removed"
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["hf", busy.name])
    finally:
        live.kill()
        live.wait()
    assert remove_stale(out) == [busy]  # its process is gone now
    assert [p.name for p in tmp_path.iterdir()] == ["hf"]
