"""Remote data-set locations: `http(s)://` and `s3://` URLs of a folder written by data_prep (manifest.json next
to the shards), through fsspec, with retries and exponential back-off on transient errors.

Owned by data_prep, like the manifest reader, because both sides use it: `data_prep --out s3://...` uploads,
`finetune.remote` stages shards for train.py. Shard NAMES stay plain file names (data_prep.manifest.shard_path);
only the folder (the data root) may be a URL.

S3 endpoints other than AWS (MinIO, Ceph, moto): set AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; credentials come
from the usual AWS variables or files.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from typing import Callable, TypeVar

from .errors import UsageError
from .extras import require

SCHEMES = ("http://", "https://", "s3://")
T = TypeVar("T")


@dataclass(frozen=True)
class Backoff:
    """`tries` attempts, waiting first, 2 x first, ... (at most `most` seconds) in between."""
    tries: int = 6
    first: float = 0.5
    most: float = 8.0

    def waits(self) -> list[float]:
        return [min(self.first * 2 ** i, self.most) for i in range(self.tries - 1)]


class Unreachable(UsageError):
    """A remote file that stayed unreachable through every retry."""


def is_remote(location) -> bool:
    return isinstance(location, str) and location.startswith(SCHEMES)


def join(root: str, name: str) -> str:
    return root.rstrip("/") + "/" + name


def filesystem(url: str):
    """(fsspec filesystem, path) for `url`, with read timeouts (a hung server must not hang a job)."""
    fsspec = require("fsspec", url)
    if url.startswith("s3://"):
        require("s3fs", url)                           # fsspec's s3:// back end (it imports it by name)
        endpoint = os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        options = dict(endpoint_url=endpoint) if endpoint else {}
    else:
        aiohttp = require("aiohttp", url)
        options = dict(client_kwargs=dict(timeout=aiohttp.ClientTimeout(total=None, sock_connect=15, sock_read=60)))
    return fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)


def retrying(what: str, fn: Callable[[], T], backoff: Backoff = Backoff()) -> T:
    """fn(), retried with back-off on any error but a UsageError (final: e.g. a wrong sha256); after the last
    try, Unreachable naming `what`, in one line. A missing file is retried too: fsspec's HTTP open reports a
    refused connection as FileNotFoundError."""
    start = time.monotonic()
    for wait in backoff.waits() + [None]:
        try:
            return fn()
        except (UsageError, KeyboardInterrupt):
            raise
        except Exception as exc:                      # noqa: BLE001 - aiohttp, botocore, OSError, timeouts
            if wait is None:
                reason = (str(exc).strip().splitlines() or [type(exc).__name__])[0][:200]
                raise Unreachable(f"{what} unreachable after {backoff.tries} tries over "
                                  f"{time.monotonic() - start:.0f} s ({type(exc).__name__}: {reason}); "
                                  f"check the server and the URL") from None
            time.sleep(wait)
    raise AssertionError("unreachable")


def upload_folder(local, url: str, names: list[str], backoff: Backoff = Backoff()) -> None:
    """Copy `names` (files in the local folder) to the folder `url`, one by one, each retried. Put
    manifest.json last in `names`: a reader never sees a manifest whose shards are not all there."""
    fs, root = filesystem(url)
    for name in names:
        src, dest = os.path.join(local, name), join(root, name)
        retrying(f"{join(url, name)} (upload)", lambda src=src, dest=dest: fs.put_file(src, dest), backoff)
