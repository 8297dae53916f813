"""A TensorBoard event file written synchronously: `flush` returns with every scalar on disk.

tensorboardX's SummaryWriter queues events for a background thread, and its `flush` does not
wait for that queue; a bucket workdir copies the file right after flushing, so it needs the
events written by then. Same file format and name (events.out.tfevents.<time>.<host>), same
purge marker on resume (a START event at `purge_step`: TensorBoard then drops the older
files' events from that step on).
"""

from __future__ import annotations

import os
import time

from tensorboardX.event_file_writer import EventsWriter
from tensorboardX.proto.event_pb2 import Event, SessionLog
from tensorboardX.summary import scalar


class EventFile:
    def __init__(self, directory: str, purge_step: int | None = None) -> None:
        os.makedirs(directory, exist_ok=True)
        # A nanosecond suffix: two runs started in the same second on one host (a quick resume)
        # would otherwise share a name (a bucket copy would overwrite the first's events), and
        # readers order files by name, so the later run's file must sort last.
        suffix = f".{time.time_ns()}"
        self._writer = EventsWriter(os.path.join(directory, "events"), filename_suffix=suffix)
        if purge_step is not None:
            start = SessionLog(status=SessionLog.START)
            self._writer.write_event(
                Event(wall_time=time.time(), step=purge_step, session_log=start)
            )

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._writer.write_event(
            Event(wall_time=time.time(), step=int(step), summary=scalar(tag, float(value)))
        )

    def flush(self) -> None:
        self._writer.flush()

    def close(self) -> None:
        self._writer.close()
