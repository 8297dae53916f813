"""A GCS server on 127.0.0.1 for the tests: gcp-storage-emulator, with three additions.

    python tests/gcs_emulator.py          # prints "READY <port>", serves until killed

The emulator (PyPI `gcp-storage-emulator`) speaks the GCS JSON API that google-cloud-storage,
gcsfs and TensorStore use. What it lacks, and real GCS has, is added here in front of it:
- generation preconditions: a write or delete with `ifGenerationMatch=G` fails with 412 unless
  the object is at generation G (0: unless it does not exist). The workdir lock relies on them,
  TensorStore uses them too; the emulator ignores them.
- concurrent connections: requests are accepted by a thread each (TensorStore opens many at
  once), then handled one at a time (the emulator's store is not thread-safe).
- deleted objects are gone at once (the emulator keeps them 7 days, in memory);
- a download says the object's generation (x-goog-generation), as GCS does: TensorStore reads
  it to tell which version of an OCDBT manifest it read, and fails without it.

And two ways for a test to make the server fail as a real bucket can:
- every request on a bucket whose name starts with `denied-` gets 403, as GCS answers a caller
  without permission;
- POST /_faults {"prefix": P, "status": S, "count": N} makes the next N writes of objects whose
  name starts with P (in any bucket) fail with status S (N = -1: every one, until cleared with
  count 0).
"""

from __future__ import annotations

import json
import logging
import re
import sys
import threading
from functools import partial
from http import HTTPStatus, server
from urllib.parse import parse_qs, urlparse

from gcp_storage_emulator import server as emulator
from gcp_storage_emulator.storage import Storage

DENIED_PREFIX = "denied-"


class _Refused(Exception):
    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status
        self.message = message


_lock = threading.Lock()
_local = threading.local()
_faults: dict[str, list] = {"rules": []}


def _precondition(storage: Storage, bucket: str, name: str) -> None:
    """412 unless the object is at the generation the request's ifGenerationMatch names."""
    query = getattr(_local, "query", {})
    wanted = query.get("ifGenerationMatch")
    if not wanted:
        return
    current = storage.objects.get(bucket, {}).get(name)
    generation = int(current["generation"]) if current else 0
    if int(wanted[0]) != generation:
        raise _Refused(HTTPStatus.PRECONDITION_FAILED, "conditionNotMet: At least one of the "
                       "pre-conditions you specified did not hold.")  # fmt: skip


def _injected_fault(name: str) -> None:
    for rule in _faults["rules"]:
        if name.startswith(rule["prefix"]) and rule["count"] != 0:
            rule["count"] -= 1 if rule["count"] > 0 else 0
            raise _Refused(rule["status"], f"injected fault for {name}")


_create_file = Storage.create_file
_delete_file = Storage.delete_file


def _checked_create(self, bucket_name, file_name, content, file_obj, file_id=None):
    _injected_fault(file_name)
    _precondition(self, bucket_name, file_name)
    return _create_file(self, bucket_name, file_name, content, file_obj, file_id)


def _checked_delete(self, bucket_name, file_name):
    _precondition(self, bucket_name, file_name)
    return _delete_file(self, bucket_name, file_name)


def _no_soft_delete(self, bucket_name):
    return 0


def _send(handler: server.BaseHTTPRequestHandler, status: int, message: str) -> None:
    body = json.dumps({"error": {"code": int(status), "message": message}}).encode()
    handler.send_response(int(status))
    handler.send_header("Content-Type", "application/json")
    handler.send_header("Content-Length", str(len(body)))
    handler.end_headers()
    handler.wfile.write(body)


_download = emulator.objects.download


def _download_with_generation(request, response, storage, *args, **kwargs):
    _download(request, response, storage, *args, **kwargs)
    obj = storage.objects.get(request.params["bucket_name"], {}).get(request.params["object_id"])
    if obj is not None:
        response["x-goog-generation"] = obj["generation"]
        response["x-goog-metageneration"] = obj.get("metageneration", "1")


_handle = emulator.Router.handle


def _guarded_handle(self, method):
    handler = self._request_handler
    path = handler.path.split("?")[0]
    if path == "/_faults":
        length = int(handler.headers.get("Content-Length") or 0)
        rule = json.loads(handler.rfile.read(length) or b"{}")
        with _lock:
            _faults["rules"] = [r for r in _faults["rules"] if r["prefix"] != rule["prefix"]]
            if rule.get("count", 0):
                _faults["rules"].append(rule)
        return _send(handler, HTTPStatus.OK, "ok")
    bucket = re.search(r"/b/([^/?]+)", path)
    if bucket and bucket[1].startswith(DENIED_PREFIX):
        message = f"caller does not have storage.objects.list access to bucket {bucket[1]}."
        return _send(handler, HTTPStatus.FORBIDDEN, message)

    with _lock:
        _local.query = parse_qs(urlparse(handler.path).query)
        try:
            _handle(self, method)
        except _Refused as refused:
            _send(handler, refused.status, refused.message)
        finally:
            _local.query = {}


def main() -> None:
    logging.basicConfig(level=logging.CRITICAL)  # the emulator logs every refused request
    Storage.create_file = _checked_create
    Storage.delete_file = _checked_delete
    Storage._bucket_soft_delete_retention_seconds = _no_soft_delete
    Storage._write_config_to_file = lambda self: None  # its on-disk state file: unused here
    emulator.Router.handle = _guarded_handle
    emulator.objects.download = _download_with_generation  # what objects.get calls
    for _, handlers in emulator.HANDLERS:  # the download route holds the function itself
        for method, handler in handlers.items():
            if handler is _download:
                handlers[method] = _download_with_generation
    storage = Storage(use_memory_fs=True)

    class Server(server.ThreadingHTTPServer):
        daemon_threads = True
        request_queue_size = 256

    httpd = Server(("127.0.0.1", 0), partial(emulator.RequestHandler, storage))
    print(f"READY {httpd.server_address[1]}", flush=True)
    try:
        httpd.serve_forever()
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    sys.exit(main())
