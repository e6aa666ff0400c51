"""Remote data sets for train.py: `--data http(s)://...` or `s3://...`, a folder written by data_prep.

Each node's local main process stages the data set once into a local cache folder (`--cache-dir`, default
$TMPDIR/hotdog-shards, at most `--cache-size-gb`): the manifest, then every shard, each streamed with retries
and back-off (data_prep.remote), hashed while it streams, and renamed into place only when its size and sha256
match the manifest. A shard with the wrong sha256 is refused; one that stays unreachable stops the job. Either
way every rank raises the same one-line UsageError (distributed.agree), so no rank hangs. Training then reads
the local copy, so an outage after staging cannot stall an epoch.

Cache layout: CACHE/<sha256(url)[:16]>/{manifest.json, NAME.tar, NAME.tar.sha256}. A shard whose sidecar holds
the manifest's sha256 and whose size matches is reused without downloading; manifest.json is written last
(its mtime orders the data sets for eviction when the cache would exceed its cap).
"""

from __future__ import annotations

import hashlib
import os
import shutil
import tempfile
from pathlib import Path

from data_prep.errors import UsageError
from data_prep.manifest import MANIFEST, read_manifest, shard_path
from data_prep.remote import Backoff, filesystem, is_remote, join, retrying

from . import distributed

_CHUNK = 1 << 20


def default_cache_dir() -> Path:
    return Path(os.environ.get("TMPDIR") or tempfile.gettempdir()) / "hotdog-shards"


def stage_data(cfg, accelerator) -> str:
    """train.py's hook: `cfg.data` unchanged when local; else stage it (local main of each node) and return
    the local folder. A failure on any rank becomes the same UsageError on every rank."""
    if not is_remote(cfg.data):
        return cfg.data
    cache = Path(cfg.cache_dir) if cfg.cache_dir else default_cache_dir()
    folder, problem = cache_folder(cache, cfg.data), None
    if accelerator.is_local_main_process:
        try:
            stage(cfg.data, cache, int(cfg.cache_size_gb * 1e9))
        except UsageError as exc:
            problem = str(exc)
    distributed.agree(accelerator, problem)
    return str(folder)


def cache_folder(cache: Path, url: str) -> Path:
    return Path(cache) / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:16]


def stage(url: str, cache: Path, cap_bytes: int, backoff: Backoff = Backoff()) -> Path:
    """Download the data set at `url` into its cache folder (what is already there and verified is kept)."""
    folder = cache_folder(cache, url)
    incoming = folder / ".incoming"
    incoming.mkdir(parents=True, exist_ok=True)
    fs, root = filesystem(url)
    raw = retrying(f"--data {join(url, MANIFEST)}", lambda: _read_bytes(fs, join(root, MANIFEST)), backoff)
    (incoming / MANIFEST).write_bytes(raw)
    manifest = read_manifest(incoming)               # the one reader: format, counts, plain shard names
    shards = [s for split in manifest["splits"].values() for s in split["shards"]]
    missing = [s for s in shards if not _cached(folder, s)]
    make_room(Path(cache), folder, sum(int(s["size"]) for s in missing), cap_bytes, url)
    for shard in missing:
        what = f"--data {url}: shard {shard['name']}"
        retrying(what, lambda shard=shard: _download(fs, join(root, shard["name"]), folder, shard, what), backoff)
    os.replace(incoming / MANIFEST, folder / MANIFEST)
    return folder


def _read_bytes(fs, path: str) -> bytes:
    try:
        return fs.cat_file(path)
    except FileNotFoundError:
        raise UsageError(f"no {MANIFEST} at {path}; --data must be the folder data_prep wrote "
                         f"(python -m data_prep --out ...)") from None


def _cached(folder: Path, shard: dict) -> bool:
    path, sidecar = shard_path(folder, shard["name"]), folder / (shard["name"] + ".sha256")
    return (path.is_file() and path.stat().st_size == int(shard["size"]) and sidecar.is_file()
            and sidecar.read_text().strip() == shard["sha256"])


def _download(fs, src: str, folder: Path, shard: dict, what: str) -> None:
    """Stream one shard into folder/NAME.tar.part-PID, hashing as it goes; renamed into place only when size
    and sha256 match. A short read is retried (OSError); a wrong sha256 is final (UsageError)."""
    dest = shard_path(folder, shard["name"])
    part = dest.with_name(f"{dest.name}.part-{os.getpid()}")
    digest, size = hashlib.sha256(), 0
    try:
        with _open(fs, src) as f, open(part, "wb") as out:
            while chunk := f.read(_CHUNK):
                digest.update(chunk)
                out.write(chunk)
                size += len(chunk)
        if size != int(shard["size"]):
            raise OSError(f"got {size} bytes, manifest says {shard['size']}")
        if digest.hexdigest() != shard["sha256"]:
            raise UsageError(f"{what} fails its sha256 check (got {digest.hexdigest()[:12]}..., manifest says "
                             f"{shard['sha256'][:12]}...): the copy at the server is damaged or replaced; "
                             f"re-run data_prep")
        os.replace(part, dest)
        (folder / (shard["name"] + ".sha256")).write_text(shard["sha256"] + "\n")
    finally:
        part.unlink(missing_ok=True)


def _open(fs, path: str):
    """A streaming reader: plain HTTP servers need not support range requests."""
    return fs.open(path, "rb", block_size=0) if fs.protocol[0].startswith("http") else fs.open(path, "rb")


def make_room(cache: Path, keep: Path, need: int, cap: int, url: str) -> None:
    """Evict other data sets (least recently staged first) until `need` more bytes fit under `cap`."""
    def usage(folder: Path) -> int:
        return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())
    others = sorted((f for f in cache.iterdir() if f.is_dir() and f != keep),
                    key=lambda f: (f / MANIFEST).stat().st_mtime if (f / MANIFEST).exists() else 0)
    total = usage(keep) + sum(usage(f) for f in others)
    while total + need > cap and others:
        victim = others.pop(0)
        total -= usage(victim)
        shutil.rmtree(victim, ignore_errors=True)
    if total + need > cap:
        raise UsageError(f"--data {url}: {need / 1e9:.2f} GB more shards do not fit --cache-size-gb "
                         f"{cap / 1e9:g} (cache {cache}); raise it or point --cache-dir at a bigger disk")

