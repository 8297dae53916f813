"""The Cloud Storage clients, set up once: gcsfs (files, through fsspec, which is also what
orbax's etils.epath uses for gs://) and google-cloud-storage (generation preconditions and the
access check), plus the translation of their errors into StorageError with a clear message.

With STORAGE_EMULATOR_HOST set (a GCS emulator, e.g. in the tests), `configure` points every
client at it the standard way and uses anonymous credentials, so nothing looks for Google
credentials or a metadata server:
- gcsfs and google-cloud-storage read STORAGE_EMULATOR_HOST themselves; gcsfs gets token "anon"
  and GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false (its bucket-type probe is a gRPC call an emulator
  does not answer: 60 s of timeouts per bucket otherwise);
- TensorStore (orbax's arrays) gets TENSORSTORE_GCS_HTTP_URL and a fixed test token
  (GOOGLE_AUTH_TOKEN_FOR_TESTING).
Variables the user set already are left alone.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from debertina_jax.storage.errors import (
    BucketNotFoundError,
    StorageError,
    StoragePermissionError,
)
from debertina_jax.storage.paths import split_bucket

EMULATOR_VARIABLE = "STORAGE_EMULATOR_HOST"


def emulator_url() -> str | None:
    """http://host:port of the GCS emulator in use, or None for real Cloud Storage."""
    host = os.environ.get(EMULATOR_VARIABLE, "").strip()
    if not host or host == "default":
        return None
    return host if "://" in host else f"http://{host}"


def configure() -> None:
    """Sets up the clients for the emulator when STORAGE_EMULATOR_HOST is set (see above).
    Cheap and idempotent; must run before gcsfs is first imported."""
    url = emulator_url()
    if url is None:
        return
    os.environ.setdefault("TENSORSTORE_GCS_HTTP_URL", url)
    os.environ.setdefault("GOOGLE_AUTH_TOKEN_FOR_TESTING", "emulator")
    os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    import fsspec

    fsspec.config.conf.setdefault("gs", {})["token"] = "anon"


def filesystem() -> Any:
    """The gcsfs filesystem: the very instance orbax's etils.epath uses (fsspec caches one per
    set of arguments, and these are epath's), so that both see one cache of listings."""
    configure()
    import fsspec

    return fsspec.filesystem("gcs", finalize_on_close=True)


@functools.cache
def _client(emulator: str | None) -> Any:
    from google.cloud import storage

    if emulator is not None:
        from google.auth.credentials import AnonymousCredentials

        return storage.Client(credentials=AnonymousCredentials(), project="emulator")
    import google.auth
    from google.auth.exceptions import DefaultCredentialsError

    try:
        credentials, project = google.auth.default()
    except DefaultCredentialsError as e:
        raise StoragePermissionError(
            f"no Google Cloud credentials found ({e}). On a TPU VM the VM's service account "
            "is used; elsewhere run `gcloud auth application-default login` or set "
            "GOOGLE_APPLICATION_CREDENTIALS to a service-account key file"
        ) from None
    return storage.Client(credentials=credentials, project=project)


def client() -> Any:
    """A google-cloud-storage client (anonymous on the emulator)."""
    configure()
    return _client(emulator_url())


def translate(error: BaseException, url: str) -> BaseException:
    """The StorageError that says what went wrong with `url`, or `error` itself."""
    if isinstance(error, StorageError):
        return error
    bucket, _ = split_bucket(url)
    code = getattr(error, "code", None)
    text = str(error)
    if (
        code in (401, 403)
        or "Forbidden" in text
        or "Unauthorized" in text
        or (isinstance(error, PermissionError))
    ):
        return StoragePermissionError(
            f"permission denied for {url}: {text.splitlines()[0] if text else error!r}. The "
            f"account in use needs read and write access to gs://{bucket} (e.g. the role "
            "roles/storage.objectAdmin on the bucket)"
        )
    if code == 404 and "bucket" in text.lower():
        return BucketNotFoundError(f"bucket gs://{bucket} does not exist (for {url})")
    return error


def check_access(url: str) -> None:
    """Lists at most one object under `url`: a clear error when the bucket does not exist or
    the credentials may not read it, before anything expensive starts."""
    from google.api_core import exceptions

    bucket, key = split_bucket(url)
    try:
        list(client().list_blobs(bucket, prefix=key, max_results=1))
    except exceptions.NotFound:
        raise BucketNotFoundError(
            f"bucket gs://{bucket} does not exist (for {url}): create it "
            f"(gcloud storage buckets create gs://{bucket} --location=...) or fix the name"
        ) from None
    except (exceptions.Forbidden, exceptions.Unauthorized) as e:
        raise translate(e, url) from None
