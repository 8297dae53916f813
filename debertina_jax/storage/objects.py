"""Single GCS objects under generation preconditions: the compare-and-swap the workdir lock
needs (runtime/workdir_lock.py). Every write of an object gives it a new generation number;
a request made "if the generation is still G" fails, atomically, when someone else wrote
in between (generation 0: the object must not exist)."""

from __future__ import annotations

from debertina_jax.storage import gcs
from debertina_jax.storage.paths import split_bucket


def _blob(url: str):
    bucket, key = split_bucket(url)
    return gcs.client().bucket(bucket).blob(key)


def read(url: str) -> tuple[bytes, int] | None:
    """(content, generation), or None when the object does not exist."""
    from google.api_core import exceptions

    bucket, key = split_bucket(url)
    for _ in range(5):  # the object may change between the two requests: read it again
        try:
            blob = gcs.client().bucket(bucket).get_blob(key)
            if blob is None:
                return None
            generation = int(blob.generation)
            return blob.download_as_bytes(if_generation_match=generation), generation
        except exceptions.NotFound:
            return None
        except exceptions.PreconditionFailed:
            continue
        except exceptions.GoogleAPICallError as e:
            raise gcs.translate(e, url) from None
    raise gcs.translate(OSError(f"{url} kept changing while it was read"), url)


def write_if(url: str, data: bytes, generation: int) -> int | None:
    """Writes `data` if the object is at `generation` (0: absent) and returns the new
    generation; None when the object is not at `generation`."""
    from google.api_core import exceptions

    blob = _blob(url)
    try:
        blob.upload_from_string(data, if_generation_match=generation)
    except exceptions.PreconditionFailed:
        return None
    except exceptions.GoogleAPICallError as e:
        raise gcs.translate(e, url) from None
    return int(blob.generation)


def delete_if(url: str, generation: int) -> bool:
    """Deletes the object if it is at `generation`; False when it is not (or is gone)."""
    from google.api_core import exceptions

    try:
        _blob(url).delete(if_generation_match=generation)
    except (exceptions.PreconditionFailed, exceptions.NotFound):
        return False
    except exceptions.GoogleAPICallError as e:
        raise gcs.translate(e, url) from None
    return True
