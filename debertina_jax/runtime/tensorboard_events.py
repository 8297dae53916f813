"""TensorBoard event files of scalars, written synchronously: `flush` returns with every scalar
on disk (a bucket workdir copies the file right after flushing).

Written here, not with tensorboardX: importing tensorboardX imports torch when it is installed
(2.5 s and ~300 MB in every training process, measured 2026-12-01), for three protobuf messages.
The format: a TFRecord file (each record: its length as uint64, the masked CRC-32C of those 8
bytes, the bytes, their masked CRC-32C; little-endian) of serialized `tensorflow.Event` protos:
first a file_version event, then one event per scalar. The name is TensorBoard's,
events.out.tfevents.<seconds>.<host>, plus a nanosecond suffix. A resumed run starts its file
with a SessionLog START at `purge_step`: TensorBoard then drops the older files' events from
that step on.
"""

from __future__ import annotations

import os
import socket
import struct
import time

import google_crc32c

# Field numbers of tensorflow/core/util/event.proto and core/framework/summary.proto.
_EVENT_WALL_TIME, _EVENT_STEP, _EVENT_FILE_VERSION = 1, 2, 3
_EVENT_SUMMARY, _EVENT_SESSION_LOG = 5, 7
_SUMMARY_VALUE, _VALUE_TAG, _VALUE_SIMPLE_VALUE = 1, 1, 2
_SESSION_LOG_STATUS, _SESSION_LOG_START = 1, 1
# Protobuf wire types.
_VARINT, _FIXED64, _BYTES, _FIXED32 = 0, 1, 2, 5


def _varint(value: int) -> bytes:
    value &= (1 << 64) - 1  # negative int64s are sent as their two's complement
    out = bytearray()
    while True:
        low, value = value & 0x7F, value >> 7
        out.append(low | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, wire_type: int, payload: bytes) -> bytes:
    key = _varint(number << 3 | wire_type)
    if wire_type == _BYTES:
        return key + _varint(len(payload)) + payload
    return key + payload


def event(wall_time: float, step: int = 0, **content: bytes | str) -> bytes:
    """A serialized Event: `file_version` (str), `summary` or `session_log` (serialized)."""
    out = _field(_EVENT_WALL_TIME, _FIXED64, struct.pack("<d", wall_time))
    if step:
        out += _field(_EVENT_STEP, _VARINT, _varint(step))
    numbers = {
        "file_version": _EVENT_FILE_VERSION,
        "summary": _EVENT_SUMMARY,
        "session_log": _EVENT_SESSION_LOG,
    }
    for name, value in content.items():
        payload = value.encode() if isinstance(value, str) else value
        out += _field(numbers[name], _BYTES, payload)
    return out


def scalar_summary(tag: str, value: float) -> bytes:
    """A serialized Summary with one simple_value (a float32, as TensorBoard stores it)."""
    entry = _field(_VALUE_TAG, _BYTES, tag.encode()) + _field(
        _VALUE_SIMPLE_VALUE, _FIXED32, struct.pack("<f", value)
    )
    return _field(_SUMMARY_VALUE, _BYTES, entry)


def _masked_crc(data: bytes) -> bytes:
    crc = google_crc32c.value(data)
    masked = (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    return struct.pack("<I", masked)


def record(data: bytes) -> bytes:
    """`data` framed as one TFRecord."""
    length = struct.pack("<Q", len(data))
    return length + _masked_crc(length) + data + _masked_crc(data)


class EventFile:
    def __init__(self, directory: str, purge_step: int | None = None) -> None:
        os.makedirs(directory, exist_ok=True)
        now = time.time()
        # A nanosecond suffix: two runs started in the same second on one host (a quick resume)
        # would otherwise share a name (a bucket copy would overwrite the first's events), and
        # readers order files by name, so the later run's file must sort last.
        name = f"events.out.tfevents.{int(now):010d}.{socket.gethostname()}.{time.time_ns()}"
        self._file = open(os.path.join(directory, name), "ab")  # noqa: SIM115 (open for the writer's life)
        self._write(event(now, file_version="brain.Event:2"))
        if purge_step is not None:
            start = _field(_SESSION_LOG_STATUS, _VARINT, _varint(_SESSION_LOG_START))
            self._write(event(time.time(), purge_step, session_log=start))

    def _write(self, serialized_event: bytes) -> None:
        self._file.write(record(serialized_event))

    def add_scalar(self, tag: str, value: float, step: int) -> None:
        self._write(event(time.time(), int(step), summary=scalar_summary(tag, float(value))))

    def flush(self) -> None:
        self._file.flush()

    def close(self) -> None:
        self._file.close()
