"""Remote data sets for train.py: `--data http(s)://...` or `s3://...`, a folder written by data_prep.

Each node's local main process stages the data set once into a local cache folder (`--cache-dir`, default
$TMPDIR/hotdog-shards, at most `--cache-size-gb`): the manifest, then every shard, each streamed with retries
and back-off (data_prep.remote_io.fetch: size-capped, with a read timeout and a minimum rate), hashed while it
streams, and renamed into place only when its size and sha256 match the manifest. A shard with the wrong sha256
is refused; one that stays unreachable stops the job. Any failure -- not only a UsageError -- reaches every rank
as the same one line (all ranks gather the outcome right after staging), so no rank waits for a timeout.
Training then reads the local copy, so an outage after staging cannot stall an epoch.

Cache layout: CACHE/<sha256(redacted url)[:16]>/{.hotdog-staged.json, manifest.json, NAME.tar}, and
CACHE/.locks/<same>.{use,stage}. Only folders holding the marker .hotdog-staged.json were made by staging and
may be evicted; a run holds a shared flock on `.use` for its lifetime (eviction needs it exclusively, without
waiting, so a data set in use is never evicted), and staging holds `.stage` exclusively (a second run staging
the same URL waits, then reuses the first one's verified shards). Every cached shard is re-hashed before use.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import json
import os
import shutil
import signal
import sys
import time
from pathlib import Path

from common.errors import UsageError
from common.fsutil import pid_alive
from data_prep.manifest import MANIFEST, file_sha256, read_manifest, shard_path
from data_prep.remote_io import (Backoff, default_cache_dir, fetch, filesystem, is_remote, join, redact_url,
                              retrying, staged_folder)

from . import EXIT_PREEMPTED, distributed
from .config import Config

MARKER = ".hotdog-staged.json"       # written by staging into every folder it makes: the only evictable ones
LOCKS = ".locks"
MANIFEST_CAP = 64 << 20              # ~200 bytes per shard: room for some 300,000 shards, and a bounded read
_IN_USE: list = []                   # the `.use` locks of this process's data sets, held until it exits

__all__ = ["cache_folder", "default_cache_dir", "make_room", "stage", "stage_data"]


class StagingStopped(BaseException):
    """A signal arrived during staging. A BaseException, like KeyboardInterrupt, so that no `except Exception`
    in fsspec or aiohttp swallows it on its way out of the transfer."""

    def __init__(self, name: str, preempt: bool):
        super().__init__(name)
        self.name, self.preempt = name, preempt


def say(line: str) -> None:
    print(f"train.py: {line}", file=sys.stderr, flush=True)


def cache_folder(cache: Path, url: str) -> Path:
    return staged_folder(url, cache)


def stage_data(cfg: Config, accelerator) -> str:
    """train.py's hook: `cfg.data` unchanged when local; else stage it (local main of each node) and return
    the local folder. Every rank learns every node's outcome: an error -> the same UsageError everywhere; a
    preemption signal -> exit 75 everywhere; Ctrl-C -> one line, exit 130."""
    if not is_remote(cfg.data):
        return cfg.data
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    outcome = None
    try:
        if accelerator.is_local_main_process:
            outcome = _stage_here(cfg, cache)
        outcomes = distributed.gather(outcome, accelerator.num_processes)
    except KeyboardInterrupt:
        say(f"interrupted (Ctrl-C) while staging --data {redact_url(cfg.data)}; partial files removed")
        raise SystemExit(130) from None
    _settle([o for o in outcomes if o], cfg.data)
    return str(cache_folder(cache, cfg.data))


def _stage_here(cfg: Config, cache: Path):
    """None when staged, else ("error", one line) or ("stop", signal name, preempt?)."""
    try:
        with _signals_stop_staging(cfg.preempt_signals):
            stage(cfg.data, cache, int(cfg.cache_size_gb * 1e9), held=_IN_USE)
    except StagingStopped as stop:
        return ("stop", stop.name, stop.preempt)
    except UsageError as exc:
        return ("error", str(exc))
    except OSError as exc:          # mkdir, the manifest's write, a rename: this node's disk, not the server
        return ("error", f"--data {redact_url(cfg.data)}: cannot stage into {cache} ({exc.strerror or exc}): a "
                         f"local disk problem; free space there or point --cache-dir at another disk")
    except Exception as exc:        # noqa: BLE001 - any failure must reach the other ranks, not leave them waiting
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        return ("error", f"--data {redact_url(cfg.data)}: staging failed ({type(exc).__name__}: {redact_url(first)})")
    return None


def _settle(outcomes: list, url: str) -> None:
    stops = [o for o in outcomes if o[0] == "stop"]
    if stops:
        preempt = stops[0][2]
        if not preempt:              # a SIGTERM that is no preemption signal: die of it, as training would
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            os.kill(os.getpid(), signal.SIGTERM)
        import torch.distributed as dist
        if dist.is_initialized():
            dist.destroy_process_group()
        raise SystemExit(EXIT_PREEMPTED)
    if outcomes:
        raise UsageError(outcomes[0][1])


@contextlib.contextmanager
def _signals_stop_staging(preempt_signals: str):
    """While staging, a preemption signal (and SIGTERM, whatever --preempt-signals says) stops the transfer
    at once: the handler records it as before (PreemptionFlag) and raises StagingStopped in the main thread,
    where the transfer waits. A trickling server can no longer hold a signal off."""
    from .config_checks import parse_signals
    preempt = set(parse_signals(preempt_signals))
    saved = {}

    def handler(signum, frame):
        if callable(saved[signum]):
            saved[signum](signum, frame)
        name = signal.Signals(signum).name
        say(f"{name} received while staging: stopping; partial files removed, verified shards kept for the next run"
            + (f"; exiting {EXIT_PREEMPTED}" if signum in preempt else ""))
        raise StagingStopped(name, signum in preempt)
    for sig in preempt | {signal.SIGTERM}:
        saved[sig] = signal.signal(sig, handler)
    try:
        yield
    finally:
        for sig, previous in saved.items():
            signal.signal(sig, previous)


def stage(url: str, cache: Path, cap_bytes: int, backoff: Backoff = Backoff(), held: list | None = None) -> Path:
    """Download the data set at `url` into its cache folder (what is already there and verified is kept).
    The folder is locked as in use until the process exits when `held` is a list (the lock goes into it),
    else until this returns."""
    cache, folder = Path(cache), cache_folder(cache, url)
    in_use = _lock(cache, folder, "use", fcntl.LOCK_SH)         # waits while an eviction removes it
    try:
        with _staging_lock(cache, folder, url):
            _stage_locked(url, cache, folder, cap_bytes, backoff)
    except BaseException:
        in_use.close()
        raise
    if held is not None:
        held.append(in_use)
    else:
        in_use.close()
    return folder


def _stage_locked(url: str, cache: Path, folder: Path, cap_bytes: int, backoff: Backoff) -> None:
    shown = redact_url(url)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / MARKER).write_text(json.dumps(dict(url=shown, staged_at=time.time())) + "\n")   # mtime: LRU order
    _remove_leftovers(folder)
    fs, root = filesystem(url)
    raw = retrying(f"--data {join(shown, MANIFEST)}", lambda: _read_manifest(fs, join(root, MANIFEST), shown), backoff)
    incoming = folder / ".incoming"
    incoming.mkdir(exist_ok=True)
    (incoming / MANIFEST).write_bytes(raw)
    manifest = read_manifest(incoming)               # the one reader: format, counts, plain shard names
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    missing = [s for s in shards if not _verified(folder, s)]
    make_room(cache, folder, sum(int(s["size"]) for s in missing), cap_bytes, url)
    for shard in missing:
        what = f"--data {shown}: shard {shard['name']}"
        retrying(what, lambda shard=shard: _download(fs, join(root, shard["name"]), folder, shard, what), backoff)
    os.replace(incoming / MANIFEST, folder / MANIFEST)


def _read_manifest(fs, path: str, shown: str) -> bytes:
    buffer = io.BytesIO()
    try:
        fetch(fs, path, buffer, MANIFEST_CAP, f"--data {join(shown, MANIFEST)}")
    except FileNotFoundError as exc:
        if _connection_failed(exc):  # fsspec < 2024.3 reports a refused connection so: retried, then "unreachable"
            raise
        raise UsageError(f"no {MANIFEST} at {redact_url(path)}; --data must be the folder data_prep wrote "
                         f"(python -m data_prep --out ...)") from None
    return buffer.getvalue()


def _connection_failed(exc: BaseException) -> bool:
    """Does a FileNotFoundError stand for a connection that failed (its cause), not a missing file?"""
    seen = exc.__cause__ or exc.__context__
    while seen is not None:
        if isinstance(seen, ConnectionError) or type(seen).__name__ in ("ClientConnectorError", "ClientConnectionError",
                                                                         "ServerDisconnectedError"):
            return True
        seen = seen.__cause__ or seen.__context__
    return False


def _verified(folder: Path, shard: dict) -> bool:
    """A cached shard is used only if its bytes hash to the manifest's sha256 (not a note of an earlier check:
    a copy damaged in place, or a new manifest with same-size shards, must be fetched again)."""
    path = shard_path(folder, shard["name"])
    if not path.is_file() or path.stat().st_size != int(shard["size"]):
        return False
    if file_sha256(path) == shard["sha256"]:
        return True
    say(f"cached {path} does not match the manifest's sha256 (damaged, or the data set changed): fetching it again")
    return False


def _download(fs, src: str, folder: Path, shard: dict, what: str) -> None:
    """Stream one shard into folder/NAME.tar.part-PID (created exclusively, no symlink followed); renamed into
    place only when size and sha256 match. A short read is retried (OSError); a wrong sha256 is final."""
    dest = shard_path(folder, shard["name"])
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    part.unlink(missing_ok=True)
    try:
        with os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as out:
            size, sha256 = fetch(fs, src, out, int(shard["size"]), what)
        if size != int(shard["size"]):
            raise OSError(f"got {size} bytes, manifest says {shard['size']}")
        if sha256 != shard["sha256"]:
            raise UsageError(f"{what} fails its sha256 check (got {sha256[:12]}..., manifest says "
                             f"{shard['sha256'][:12]}...): the copy at the server is damaged or replaced; "
                             f"re-run data_prep")
        os.replace(part, dest)
    finally:
        part.unlink(missing_ok=True)


def _remove_leftovers(folder: Path) -> None:
    """`NAME.part-PID` files of a staging killed outright (SIGKILL, node loss). Called under the staging lock, so
    no live stager of this folder writes one; a file of a live PID (another host's, on a shared disk) is kept."""
    for part in folder.glob("*.part-*"):
        pid = part.name.rsplit("-", 1)[-1]
        if pid.isdigit() and (int(pid) == os.getpid() or not pid_alive(int(pid))):
            part.unlink(missing_ok=True)



def _lock(cache: Path, folder: Path, kind: str, mode: int):
    """An open lock file CACHE/.locks/<folder>.<kind>, flocked with `mode`. Outside the data set's folder, so
    that removing the folder never removes a lock someone waits on."""
    locks = cache / LOCKS
    locks.mkdir(parents=True, exist_ok=True)
    handle = open(locks / f"{folder.name}.{kind}", "a+")
    try:
        fcntl.flock(handle, mode)
    except BaseException:
        handle.close()
        raise
    return handle


@contextlib.contextmanager
def _staging_lock(cache: Path, folder: Path, url: str):
    """One stager per data set and node: a second run staging the same URL waits here (saying so), then finds
    the first one's shards verified and downloads nothing."""
    try:
        handle = _lock(cache, folder, "stage", fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = (cache / LOCKS / f"{folder.name}.stage").read_text().strip() or "another process"
        say(f"waiting for {holder}, which is staging --data {redact_url(url)} into {folder}")
        handle = _lock(cache, folder, "stage", fcntl.LOCK_EX)
    with handle:
        handle.seek(0)
        handle.truncate()
        handle.write(f"pid {os.getpid()}\n")
        handle.flush()
        yield


def make_room(cache: Path, keep: Path, need: int, cap: int, url: str) -> None:
    """Evict other staged data sets (least recently staged first, never one in use) until `need` more bytes
    fit under `cap`. Only folders with staging's marker count and can go: the cache may be a folder of the
    user's (--cache-dir /scratch/$USER) holding other things."""
    staged = sorted((f for f in Path(cache).iterdir() if f != keep and not f.is_symlink() and (f / MARKER).is_file()),
                    key=lambda f: (f / MARKER).stat().st_mtime)
    total = _usage(keep) + sum(_usage(f) for f in staged)
    busy = 0
    while total + need > cap and staged:
        victim = staged.pop(0)
        size = _usage(victim)
        if _evict(Path(cache), victim, size, cap):
            total -= size
        else:
            busy += 1
    if total + need > cap:
        kept = f"; {busy} staged data set(s) in use by running jobs were kept" if busy else ""
        raise UsageError(f"--data {redact_url(url)}: {need / 1e9:.2f} GB more shards do not fit --cache-size-gb "
                         f"{cap / 1e9:g} (cache {cache}{kept}); raise it or point --cache-dir at a bigger disk")


def _usage(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file() and not p.is_symlink())


def _evict(cache: Path, victim: Path, size: int, cap: int) -> bool:
    """Remove a staged data set unless a run holds it (its `.use` lock, taken without waiting)."""
    try:
        handle = _lock(cache, victim, "use", fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    with handle:
        try:
            source = json.loads((victim / MARKER).read_text()).get("url", "?")
        except (OSError, ValueError, AttributeError):
            source = "?"
        say(f"cache: evicting {victim} (--data {redact_url(str(source))}, {size / 1e9:.3f} GB) to stay under "
            f"--cache-size-gb {cap / 1e9:g}")
        shutil.rmtree(victim, ignore_errors=True)
    return True


def staged_or_local(data: str, cache_dir=None) -> str:
    """A run's recorded --data as a local folder (finetune.export): a URL becomes the folder train.py staged
    it into, while that is still there."""
    if not is_remote(data):
        return data
    folder = staged_folder(data, cache_dir)
    if (folder / MANIFEST).is_file():
        return str(folder)
    raise UsageError(f"--data {redact_url(data)} was staged into {folder}, which is gone (evicted, or on another "
                     f"node's disk): pass --data with a local copy of the data set, or run train.py once to stage it")
