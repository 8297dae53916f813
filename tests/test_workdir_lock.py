"""The workdir lock: one run per workdir, and a killed run's lock does not block forever."""

from __future__ import annotations

import dataclasses
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from process_testing import REPO

from debertina_jax.runtime.workdir_lock import (
    LOCK_FILE,
    STALE_SECONDS,
    GcsLockStore,
    LocalLockStore,
    LockRecord,
    WorkdirLock,
    WorkdirLockedError,
    lock_store_for,
)

HOLD = """
import sys, time
from debertina_jax.runtime.workdir_lock import LocalLockStore, WorkdirLock
lock = WorkdirLock(LocalLockStore(sys.argv[1]))
lock.acquire()
print("locked", flush=True)
time.sleep(600)
"""


def hold_lock(workdir: Path) -> subprocess.Popen:
    """Another process that takes the workdir's lock and keeps it until killed."""
    process = subprocess.Popen(
        [sys.executable, "-c", HOLD, str(workdir)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=REPO,
    )
    assert process.stdout.readline().strip() == "locked"
    return process


def test_a_second_run_is_refused_until_the_first_releases(tmp_path):
    first = WorkdirLock(LocalLockStore(tmp_path))
    first.acquire()
    record = json.loads((tmp_path / LOCK_FILE).read_text())
    assert record["pid"] == os.getpid()
    with pytest.raises(WorkdirLockedError) as refused:
        WorkdirLock(LocalLockStore(tmp_path)).acquire()
    message = str(refused.value)
    assert message.startswith(f"workdir {tmp_path} is in use by another run: pid {os.getpid()} ")
    assert f"pid {os.getpid()} on host {record['host']}" in message
    assert str(tmp_path / LOCK_FILE) in message and "taken over automatically" in message
    first.release()
    first.release()  # twice is fine
    assert not (tmp_path / LOCK_FILE).exists()
    with WorkdirLock(LocalLockStore(tmp_path)):
        assert (tmp_path / LOCK_FILE).exists()
    assert not (tmp_path / LOCK_FILE).exists()


def test_a_live_process_holds_the_lock_and_a_killed_one_does_not(tmp_path):
    holder = hold_lock(tmp_path)
    try:
        with pytest.raises(WorkdirLockedError, match=f"pid {holder.pid} "):
            WorkdirLock(LocalLockStore(tmp_path)).acquire()
        holder.send_signal(signal.SIGKILL)
        time.sleep(0.2)  # not reaped yet: a zombie, which counts as gone
        with WorkdirLock(LocalLockStore(tmp_path)) as lock:
            assert lock.held
            assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        holder.kill()
        holder.wait()


class Clock:
    def __init__(self, now: float = 1_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


def _foreign_record(heartbeat: float) -> LockRecord:
    """A lock taken on another machine: only its heartbeat tells whether it is alive."""
    return LockRecord(
        owner="x",
        host="other-host",
        pid=1,
        process_start="1",
        namespace="another-boot:pid:[1]",
        started=heartbeat - 100,
        heartbeat=heartbeat,
        command="run_pretrain.py",
    )


def test_another_hosts_lock_is_stale_only_after_its_heartbeat_stops(tmp_path):
    clock = Clock()
    store = LocalLockStore(tmp_path)
    assert store.create(_foreign_record(clock.now - 100).to_bytes())
    lock = WorkdirLock(store, stale_after=300, heartbeat_every=30, clock=clock)
    with pytest.raises(WorkdirLockedError, match="pid 1 on host other-host .*heartbeat 100 s ago"):
        lock.acquire()
    clock.now += 250  # 350 s without a heartbeat
    lock.acquire()
    try:
        assert json.loads((tmp_path / LOCK_FILE).read_text())["pid"] == os.getpid()
    finally:
        lock.release()


def test_an_unreadable_lock_file_is_taken_over(tmp_path):
    (tmp_path / LOCK_FILE).write_text("not json")
    with WorkdirLock(LocalLockStore(tmp_path)) as lock:
        assert lock.held


def test_the_heartbeat_refreshes_the_record_and_notices_a_takeover(tmp_path):
    clock = Clock()
    store = LocalLockStore(tmp_path)
    lock = WorkdirLock(store, stale_after=300, heartbeat_every=30, clock=clock)
    lock.acquire()
    try:
        clock.now += 30
        lock.heartbeat()
        assert json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] == clock.now
        # This process was stopped for too long and another run took the lock over.
        data, version = store.read()
        taken = dataclasses.replace(_foreign_record(clock.now), owner="y")
        assert store.replace(taken.to_bytes(), version)
        lock.heartbeat()
        assert lock.lost and not lock.held
    finally:
        lock.release()
    assert (tmp_path / LOCK_FILE).exists()  # the other run's lock is left alone


def test_the_heartbeat_thread_runs(tmp_path):
    lock = WorkdirLock(LocalLockStore(tmp_path), stale_after=1.0, heartbeat_every=0.05)
    with lock:
        first = json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"]
        deadline = time.monotonic() + 10
        while json.loads((tmp_path / LOCK_FILE).read_text())["heartbeat"] == first:
            assert time.monotonic() < deadline, "no heartbeat"
            time.sleep(0.05)


def test_of_two_runs_taking_over_a_stale_lock_one_wins(tmp_path):
    clock = Clock()
    store = LocalLockStore(tmp_path)
    store.create(_foreign_record(clock.now - 1000).to_bytes())
    results: list[str] = []
    locks = [WorkdirLock(LocalLockStore(tmp_path), clock=clock) for _ in range(8)]
    start = threading.Barrier(8)

    def take(lock: WorkdirLock) -> None:
        start.wait()
        try:
            lock.acquire()
            results.append("won")
        except WorkdirLockedError:
            results.append("refused")

    threads = [threading.Thread(target=take, args=(lock,)) for lock in locks]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for lock in locks:
        lock.release()
    assert sorted(results) == ["refused"] * 7 + ["won"]


def test_bucket_workdirs_lock_an_object_with_generation_preconditions(gcs_bucket):
    workdir = f"{gcs_bucket}/run"
    assert isinstance(lock_store_for(workdir), GcsLockStore)
    assert isinstance(lock_store_for("runs/tiny"), LocalLockStore)
    clock = Clock()
    with WorkdirLock(lock_store_for(workdir), clock=clock) as lock:
        with pytest.raises(WorkdirLockedError, match=f"workdir {workdir} is in use"):
            WorkdirLock(lock_store_for(workdir), clock=clock).acquire()
        lock.heartbeat()  # a replace against the generation it wrote last
        assert lock.held
        # Another host takes over the lock (its heartbeat looked stale from there).
        data, generation = GcsLockStore(workdir).read()
        taken = dataclasses.replace(_foreign_record(clock.now), owner="other")
        assert GcsLockStore(workdir).replace(taken.to_bytes(), generation)
        lock.heartbeat()
        assert lock.lost
    assert GcsLockStore(workdir).read()[0] == taken.to_bytes()  # not ours: left alone

    clock.now += 10 * STALE_SECONDS  # the other host stopped beating: taken over
    with WorkdirLock(lock_store_for(workdir), clock=clock):
        pass
    assert GcsLockStore(workdir).read() is None  # released
