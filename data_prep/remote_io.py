"""Remote data-set locations: `http(s)://` and `s3://` URLs of a folder written by data_prep (manifest.json next
to the shards), through fsspec, with retries and exponential back-off on transient errors.

Owned by data_prep, like the manifest reader, because both sides use it: `data_prep --out s3://...` uploads,
`finetune.staging` stages shards for train.py. Shard NAMES stay plain file names (data_prep.manifest.shard_path);
only the folder (the data root) may be a URL.

S3 endpoints other than AWS (MinIO, Ceph, moto): set AWS_ENDPOINT_URL_S3 or AWS_ENDPOINT_URL; credentials come
from the usual AWS variables or files.

Hostile or broken servers (`fetch`): a transfer never reads more than the size it expects + 1 byte; a server that
accepts a connection and never answers fails after one read timeout (HOTDOG_REMOTE_TIMEOUT_S, default 60 s); one
that sends less than 1 KiB/s over a timeout window is a stalled transfer (retried). A URL's credentials
(`http://user:token@host/...`) are never printed or recorded: `redact_url`.
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import re
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Callable, TypeVar

from common.errors import UsageError
from common.extras import require

SCHEMES = ("http://", "https://", "s3://")
T = TypeVar("T")
TIMEOUT_ENV = "HOTDOG_REMOTE_TIMEOUT_S"   # tests shrink it; a cluster behind a slow proxy may raise it
MIN_RATE = 1024                           # bytes/s over a timeout window: slower is a stalled transfer
_CHUNK = 1 << 20
_USERINFO = re.compile(r"(?P<scheme>[A-Za-z][A-Za-z0-9+.-]*://)(?P<user>[^/@:\s]*)(?P<password>:[^/@\s]*)?@")


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


class LocalWriteError(UsageError):
    """Writing the local copy failed (a full disk, a quota): final, retrying the server cannot help."""


def is_remote(location) -> bool:
    return isinstance(location, str) and location.startswith(SCHEMES)


def redact_url(text):
    """`http://user:token@host/x` -> `http://user:***@host/x` (and `token@host` -> `***@host`) in a URL or a
    whole line of text; anything that is not a str (a number, a path) is returned as it is."""
    if not isinstance(text, str):
        return text
    return _USERINFO.sub(lambda m: m["scheme"] + (m["user"] + ":***" if m["password"] else "***") + "@", text)


def default_cache_dir() -> Path:
    """train.py's --cache-dir when none is given."""
    return Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / "hotdog-shards"


def staged_folder(url: str, cache_dir=None) -> Path:
    """Where train.py stages the data set at `url`: CACHE/<sha256 of the redacted URL>[:16]. Redacted, so
    that the URL recorded in config.yaml (credentials hidden) still names the same folder."""
    cache = Path(cache_dir) if cache_dir else default_cache_dir()
    return cache / hashlib.sha256(redact_url(url).rstrip("/").encode()).hexdigest()[:16]


def local_only(url: str, cache_dir=None) -> str:
    """The one-line refusal of a tool that reads a local folder when given a URL (Path() would fold the URL's
    `//` into `/` and name a folder that cannot exist)."""
    folder = staged_folder(url, cache_dir)
    return (f"{redact_url(url)} is a URL; this reads a local folder. train.py stages that URL into {folder} "
            f"(its --cache-dir): pass that folder instead")


def timeout_s() -> float:
    return float(os.environ.get(TIMEOUT_ENV) or 60)


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
        limit = timeout_s()
        options = dict(client_kwargs=dict(timeout=aiohttp.ClientTimeout(total=None, sock_connect=min(15.0, limit),
                                                                         sock_read=limit)))
    return fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)


def fetch(fs, path: str, out: IO[bytes], limit: int, what: str) -> tuple[int, str]:
    """Stream the remote file `path` into `out`, hashing it; returns (bytes, sha256 hex). Never reads more than
    `limit` + 1 bytes (one more than expected: UsageError, final). A server that sends nothing within the
    read timeout after accepting the connection: Unreachable (final). A stall (< MIN_RATE bytes/s over a
    timeout window) or a read timeout mid-transfer: OSError (retried). A local write error: LocalWriteError."""
    window = timeout_s()
    digest, size = hashlib.sha256(), 0
    try:
        f = _open(fs, path, limit)
    except asyncio.TimeoutError as exc:       # fsspec's FSTimeoutError is one too
        if _is_connect_timeout(exc):
            raise OSError(f"could not connect within {min(15.0, window):g} s") from None
        raise Unreachable(f"{what}: the server accepted the connection but sent no answer within {window:g} s "
                          f"({TIMEOUT_ENV}); check the server") from None
    with f:
        mark, at_mark = time.monotonic(), 0
        while chunk := _read(f, window):
            size += len(chunk)
            if size > limit:
                raise UsageError(f"{what}: the server sends more than the {limit} bytes expected; stopped there "
                                 f"(the copy at the server is damaged or replaced)")
            digest.update(chunk)
            _write(out, chunk, what)
            now = time.monotonic()
            if now - mark >= window:
                if size - at_mark < MIN_RATE * window:
                    raise OSError(f"stalled: {size - at_mark} bytes in {now - mark:.0f} s, below {MIN_RATE} B/s")
                mark, at_mark = now, size
    return size, digest.hexdigest()


def _open(fs, path: str, limit: int):
    """A streaming reader: plain HTTP servers need not support range requests. `size` is given so that fsspec
    does not first probe the file with HEAD and GET (two more read timeouts, and any failure reported as
    FileNotFoundError); a streaming HTTP file does not use it otherwise."""
    if fs.protocol[0].startswith("http"):
        return fs.open(path, "rb", block_size=0, size=max(limit, 1))
    return fs.open(path, "rb")


def _read(f, window: float) -> bytes:
    try:
        return f.read(_CHUNK)
    except asyncio.TimeoutError:
        raise OSError(f"no data for {window:g} s mid-transfer (read timeout)") from None


def _write(out: IO[bytes], chunk: bytes, what: str) -> None:
    try:
        out.write(chunk)
    except OSError as exc:
        raise LocalWriteError(f"{what}: cannot write the local copy ({exc.strerror or exc}): a local disk "
                              f"problem, not the server's; free space there or choose another folder") from None


def _is_connect_timeout(exc: BaseException) -> bool:
    import aiohttp
    kind = getattr(aiohttp, "ConnectionTimeoutError", None)      # aiohttp >= 3.10
    cause = exc.__cause__ or exc.__context__ or exc
    return kind is not None and isinstance(cause, kind)


def retrying(what: str, fn: Callable[[], T], backoff: Backoff = Backoff()) -> T:
    """fn(), retried with back-off on any error but a UsageError (final: e.g. a wrong sha256); after the last
    try, Unreachable naming `what`, in one line. A missing file is retried too: fsspec's HTTP open reports a
    refused connection as FileNotFoundError."""
    start = time.monotonic()
    for wait in backoff.waits() + [None]:
        try:
            return fn()
        except UsageError:
            raise
        except Exception as exc:                      # noqa: BLE001 - aiohttp, botocore, OSError, timeouts
            if wait is None:
                reason = redact_url((str(exc).strip().splitlines() or [type(exc).__name__])[0][:200])
                raise Unreachable(f"{redact_url(what)} unreachable after {backoff.tries} tries over "
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
        retrying(f"{redact_url(join(url, name))} (upload)", lambda src=src, dest=dest: fs.put_file(src, dest), backoff)
