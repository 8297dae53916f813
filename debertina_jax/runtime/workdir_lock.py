"""One run per workdir: WORKDIR/run.lock, held while a run writes there.

Two runs writing the same checkpoints corrupt each other's saves, so a run takes the lock
before it writes anything and a second run is refused with a message naming the holder. The
lock is a small JSON record: the holder's host, pid and process start time, when it started,
and a heartbeat the holder refreshes every HEARTBEAT_SECONDS.

A run killed with SIGKILL cannot release its lock. The next run takes it over when it is
stale, that is when
- the holder ran on this machine (same boot, same pid namespace) and its process is gone: the
  pid is not running, is a zombie, or belongs to a process started at another time; or
- its heartbeat is older than `stale_after` (STALE_SECONDS): the holder ran elsewhere (another
  host of a shared filesystem) and stopped refreshing it.

The record lives behind `LockStore`, four operations that are atomic on a local filesystem
(LocalLockStore) and on a GCS object (GcsLockStore, for gs:// workdirs):

    create(data)            write only if absent     GCS: if_generation_match=0
    read()                  data and its version     GCS: the object's generation
    replace(data, version)  write only if unchanged  GCS: if_generation_match=version
    delete(version)         delete only if unchanged GCS: if_generation_match=version

create and replace return the version they wrote (None when refused): on GCS the generation
is known only once the write is done.

Taking over a stale lock is a `replace` against the version that was judged stale, so of two
runs taking over at once only one succeeds.
"""

from __future__ import annotations

import abc
import contextlib
import fcntl
import json
import logging
import os
import socket
import sys
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from debertina_jax import storage
from debertina_jax.storage import objects

logger = logging.getLogger(__name__)

LOCK_FILE = "run.lock"
HEARTBEAT_SECONDS = 30.0
STALE_SECONDS = 300.0


class WorkdirLockedError(RuntimeError):
    """Another run holds the workdir's lock."""


class LockStore(abc.ABC):
    """Where the lock record lives; every method is atomic (see the module docstring)."""

    workdir: str  # for messages: the directory (or bucket prefix) the lock guards
    description: str  # for messages: the lock's file or object name

    @abc.abstractmethod
    def create(self, data: bytes) -> Any:
        """Writes `data` if there is no record: its version; None if there is one."""

    @abc.abstractmethod
    def read(self) -> tuple[bytes, Any] | None:
        """The record and an opaque version of it, or None when there is none."""

    @abc.abstractmethod
    def replace(self, data: bytes, version: Any) -> Any:
        """Writes `data` if the record is still at `version`: the new version; else None."""

    @abc.abstractmethod
    def delete(self, version: Any) -> bool:
        """Deletes the record if it is still at `version`; False otherwise."""


class LocalLockStore(LockStore):
    """A file in a local (or NFS) directory.

    create links a fully written temporary file into place (link fails if the name exists, so
    nobody ever reads a half-written record); replace and delete compare and write while
    holding flock on the directory, which the kernel releases even when the process is killed.
    The version is the record's bytes: each write changes the heartbeat or the owner.
    """

    def __init__(self, directory: str | os.PathLike):
        self.directory = Path(directory)
        self.path = self.directory / LOCK_FILE
        self.workdir = str(self.directory)
        self.description = str(self.path)

    def _write_temp(self, data: bytes) -> Path:
        tmp = self.directory / f".{LOCK_FILE}.{uuid.uuid4().hex}.tmp"
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        return tmp

    @contextlib.contextmanager
    def _guard(self) -> Iterator[None]:
        fd = os.open(self.directory, os.O_RDONLY)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def create(self, data: bytes) -> Any:
        tmp = self._write_temp(data)
        try:
            os.link(tmp, self.path)
            return data
        except FileExistsError:
            return None
        finally:
            tmp.unlink()

    def read(self) -> tuple[bytes, Any] | None:
        try:
            data = self.path.read_bytes()
        except FileNotFoundError:
            return None
        return data, data

    def replace(self, data: bytes, version: Any) -> Any:
        with self._guard():
            current = self.read()
            if current is None or current[1] != version:
                return None
            os.replace(self._write_temp(data), self.path)
            return data

    def delete(self, version: Any) -> bool:
        with self._guard():
            current = self.read()
            if current is None or current[1] != version:
                return False
            self.path.unlink()
            return True


class GcsLockStore(LockStore):
    """The object WORKDIR/run.lock in a bucket; the version is the object's generation, and
    every operation is one request with a generation precondition (storage/objects.py)."""

    def __init__(self, workdir: str):
        self.url = storage.join(workdir, LOCK_FILE)
        self.workdir = workdir
        self.description = self.url

    def create(self, data: bytes) -> Any:
        return objects.write_if(self.url, data, 0)

    def read(self) -> tuple[bytes, Any] | None:
        return objects.read(self.url)

    def replace(self, data: bytes, version: Any) -> Any:
        return objects.write_if(self.url, data, version)

    def delete(self, version: Any) -> bool:
        return objects.delete_if(self.url, version)


def lock_store_for(workdir: str | os.PathLike) -> LockStore:
    """The store for a workdir: an object for a gs:// URL, a file otherwise."""
    text = storage.check_path(workdir, "workdir")
    if storage.is_remote(text):
        return GcsLockStore(text.rstrip("/"))
    return LocalLockStore(text)


def _process_namespace() -> str | None:
    """This machine's boot and pid namespace: where a pid means the same process."""
    try:
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        return f"{boot}:{os.readlink('/proc/self/ns/pid')}"
    except OSError:
        return None


def _process_start(pid: int) -> str | None:
    """The process's start time (clock ticks since boot), which tells a reused pid apart."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name (field 2) may hold spaces; the fields after it are plain.
    fields = stat[stat.rindex(")") + 2 :].split()
    if fields[0] in ("Z", "X"):  # a zombie is a dead process its parent has not reaped
        return None
    return fields[19]


@dataclass(frozen=True)
class LockRecord:
    owner: str  # a fresh id per acquisition: the version check compares whole records
    host: str
    pid: int
    process_start: str | None
    namespace: str | None
    started: float
    heartbeat: float
    command: str

    @classmethod
    def mine(cls, now: float) -> LockRecord:
        return cls(
            owner=uuid.uuid4().hex,
            host=socket.gethostname(),
            pid=os.getpid(),
            process_start=_process_start(os.getpid()),
            namespace=_process_namespace(),
            started=now,
            heartbeat=now,
            command=" ".join(sys.argv)[:300],
        )

    def to_bytes(self) -> bytes:
        return json.dumps(asdict(self), indent=1).encode()

    @classmethod
    def from_bytes(cls, data: bytes) -> LockRecord | None:
        """None for an unreadable record (e.g. written by hand): treated as stale."""
        try:
            return cls(**json.loads(data))
        except (ValueError, TypeError):
            return None

    def describe(self, now: float) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return (
            f"pid {self.pid} on host {self.host} (started {started}, last heartbeat "
            f"{max(0.0, now - self.heartbeat):.0f} s ago; command: {self.command})"
        )


def stale_reason(record: LockRecord | None, now: float, stale_after: float) -> str | None:
    """Why a lock may be taken over, or None while its holder may still be running."""
    if record is None:
        return "the lock file is not a lock record"
    if record.namespace is not None and record.namespace == _process_namespace():
        if _process_start(record.pid) != record.process_start:
            return f"its process (pid {record.pid} on {record.host}) is gone"
    age = now - record.heartbeat
    if age > stale_after:
        return f"its last heartbeat was {age:.0f} s ago (more than {stale_after:.0f} s)"
    return None


class WorkdirLock:
    """The lock of one workdir. `acquire` or refuse; a daemon thread keeps the heartbeat.

    `lost` turns True when the heartbeat finds the lock taken over (this process was stopped
    for longer than `stale_after`, e.g. a suspended machine): the run must then stop.
    """

    def __init__(
        self,
        store: LockStore,
        *,
        stale_after: float = STALE_SECONDS,
        heartbeat_every: float = HEARTBEAT_SECONDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if heartbeat_every >= stale_after:
            raise ValueError("the heartbeat must come more often than the stale limit")
        self.store = store
        self.stale_after = stale_after
        self.heartbeat_every = heartbeat_every
        self.clock = clock
        self.lost = False
        self._record: LockRecord | None = None
        self._version: Any = None
        self._mutex = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def held(self) -> bool:
        return self._record is not None and not self.lost

    def acquire(self) -> None:
        """Takes the lock (taking over a stale one) or raises WorkdirLockedError."""
        now = self.clock()
        mine = LockRecord.mine(now)
        data = mine.to_bytes()
        # A few rounds: the holder may release between our read and our write.
        for _ in range(5):
            version = self.store.create(data)
            if version is not None:
                break
            current = self.store.read()
            if current is None:
                continue
            holder = LockRecord.from_bytes(current[0])
            reason = stale_reason(holder, now, self.stale_after)
            if reason is None:
                raise WorkdirLockedError(
                    f"workdir {self.store.workdir} is in use by another run: "
                    f"{holder.describe(now)}. Wait for it to finish or stop it; a lock whose "
                    "process is gone, or whose heartbeat is older than "
                    f"{self.stale_after:.0f} s, is taken over automatically "
                    f"(lock: {self.store.description})"
                )
            version = self.store.replace(data, current[1])
            if version is not None:
                logger.warning("took over the stale lock %s: %s", self.store.description, reason)
                break
        else:
            raise WorkdirLockedError(f"could not take the lock {self.store.description}")
        self._record, self._version = mine, version
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="workdir-lock", daemon=True)
        self._thread.start()

    def heartbeat(self) -> None:
        """Refreshes the heartbeat now (the thread does it every `heartbeat_every` s)."""
        with self._mutex:
            if not self.held:
                return
            record = LockRecord(**{**asdict(self._record), "heartbeat": self.clock()})
            data = record.to_bytes()
            try:
                replaced = self.store.replace(data, self._version)
            except OSError as e:  # a full disk must not kill the thread: try again later
                logger.warning("could not refresh %s: %s", self.store.description, e)
                return
            if replaced is not None:
                self._record, self._version = record, replaced
            else:
                self.lost = True
                logger.error("another run took over the lock %s", self.store.description)

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            self.heartbeat()

    def release(self) -> None:
        """Deletes the lock if it is still ours; safe to call twice."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
            self._thread = None
        with self._mutex:
            if self.held:
                self.store.delete(self._version)
            self._record = self._version = None

    def __enter__(self) -> WorkdirLock:
        self.acquire()
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()
