"""The shard set as training sees it: the manifest (the contract with data_prep, docs/manifest.md), read into
Manifest / Split, and the checks that the shards hold what the streams need.

- load_manifest: data_prep's own reader, into Split (per split: shards, absolute urls, class counts) and
  Manifest (root, classes, train/test/val).
- check_shards (train.py, before training): sizes, sha256 for a small set, then shard_contents -- each shard's
  tar headers (a plain-ustar parser, several times faster than tarfile's) and a few bytes per sample, so a
  crafted or foreign set fails at start-up rather than mid-epoch.
- sample_fields / BadShard: the same checks on every streamed sample, since shards can change during a run.
"""

from __future__ import annotations

import itertools
import os
import re
import tarfile
from dataclasses import dataclass
from pathlib import Path

from common.errors import UsageError
from data_prep.manifest import file_sha256, read_manifest, shard_path, split_names


@dataclass
class Split:
    name: str
    num_samples: int
    shards: list[dict]          # [{"name", "num_samples", "size", "sha256"}] in manifest order
    urls: list[str]             # absolute paths of the shards
    class_counts: list[int] | None = None   # samples per class (the manifest's; --class-balance)
    num_classes: int = 0        # the manifest's; the streams refuse a label outside it (0: unchecked)

    @property
    def offsets(self) -> list[int]:
        """Global index of each shard's first sample (manifest order)."""
        return [0] + list(itertools.accumulate(s["num_samples"] for s in self.shards))[:-1]


@dataclass
class Manifest:
    root: Path
    classes: list[str]
    train: Split
    test: Split
    val: Split | None = None    # data_prep --val-fraction; None for a set without one


def load_manifest(data_dir: str | os.PathLike) -> Manifest:
    """The shard folder's manifest, read and checked by data_prep's own reader (format, classes, counts,
    shard names: never a path outside `data_dir` or a URL webdataset would open, such as pipe:)."""
    root = Path(data_dir)
    raw = read_manifest(root)
    splits = {}
    for name in split_names(raw):
        s = raw["splits"][name]
        shards = [dict(name=x["name"], num_samples=int(x["num_samples"]), size=int(x["size"]),
                       sha256=x["sha256"]) for x in s["shards"]]
        splits[name] = Split(name, int(s["num_samples"]), shards, [str(shard_path(root, x["name"])) for x in shards],
                             s.get("class_counts"), len(raw["classes"]))
    return Manifest(root, list(raw["classes"]), splits["train"], splits["test"], splits.get("val"))


def check_shards(manifest: Manifest, hash_limit_bytes: int = 1 << 30) -> str | None:
    """Compare shards with the manifest: sizes always, sha256 too when the set is small enough to hash in
    seconds. Returns a one-line problem description, or None."""
    shards = [(s, u) for split in (manifest.train, manifest.test, manifest.val) if split
              for s, u in zip(split.shards, split.urls)]
    for shard, url in shards:
        if not os.path.isfile(url):
            return f"shard {url} is missing; re-run data_prep or fix --data"
        if os.path.getsize(url) != shard["size"]:
            return (f"shard {url} has {os.path.getsize(url)} bytes, manifest says {shard['size']}: damaged or "
                    f"replaced; re-run data_prep (python -m data_prep verify {manifest.root} shows all problems)")
    if sum(s["size"] for s, _ in shards) <= hash_limit_bytes:
        for shard, url in shards:
            if file_sha256(url) != shard["sha256"]:
                return f"shard {url} fails its sha256 check: damaged; re-run data_prep"
    # A matching sha256 only says the shard is the one the manifest names, not that it holds what training
    # needs: a crafted or foreign set fails here, before training, instead of mid-epoch.
    for shard, url in shards:
        problem = shard_contents(url, shard["num_samples"], len(manifest.classes))
        if problem:
            return f"{problem}; re-run data_prep (python -m data_prep verify {manifest.root} lists all problems)"
    return None


_META = re.compile(r"__[^/]*__($|/)")       # what webdataset's tar reader skips


def shard_contents(url: str, expected: int, num_classes: int) -> str | None:
    """What the streams will find in one shard, from its tar headers and a few bytes per sample (not the
    images): the sample count the manifest says, a `jpg` and a `cls` in every sample, a label below
    `num_classes`, JPEG bytes (not a PNG named .jpg). Samples are grouped by key as webdataset does.
    Returns the first problem as one line naming the shard and the sample, or None."""
    count = 0
    try:
        with open(url, "rb") as f:
            for key, members in itertools.groupby(_tar_entries(f), key=lambda e: e[0]):
                count += 1
                problem = _sample_problem(f, {suffix: where for _, suffix, where in members}, num_classes)
                if problem:
                    return f"shard {url}: sample {key!r} {problem}"
    except (tarfile.TarError, OSError, UnicodeDecodeError) as e:
        return f"shard {url}: unreadable tar ({e})"
    if count != expected:
        return f"shard {url} holds {count} samples, its manifest says {expected}"
    return None


def _tar_entries(f):
    """(key, suffix, (data offset, size)) of the regular files of a tar, keyed like webdataset's base_plus_ext."""
    for name, where in _tar_index(f):
        match = None if _META.match(name) else re.match(r"^((?:.*/|)[^.]+)[.]([^/]*)$", name)
        if match:
            yield match.group(1), match.group(2).lower(), where


def _tar_index(f) -> list[tuple[str, tuple[int, int]]]:
    """(name, (data offset, size)) of every regular file of a tar, in order. Plain ustar headers (what
    data_prep writes) are parsed here, several times cheaper than tarfile's reader (which was ~130 us per
    member, minutes for a million-sample set); any other header (pax, GNU long names, base-256 sizes)
    sends the whole file through tarfile."""
    index, pos = [], 0
    while True:
        f.seek(pos)
        header = f.read(512)
        if len(header) < 512 or not header.strip(b"\0"):        # the end-of-archive block
            return index
        parsed = _ustar(header)
        if parsed is None:
            f.seek(0)
            with tarfile.open(fileobj=f, mode="r:") as tar:
                return [(m.name, (m.offset_data, m.size)) for m in tar if m.isreg()]
        name, size, regular = parsed
        if regular:
            index.append((name, (pos + 512, size)))
        pos += 512 + -(-size // 512) * 512


def _ustar(header: bytes) -> tuple[str, int, bool] | None:
    """(name, size, is a regular file) of a plain tar header; None for anything _tar_index leaves to tarfile;
    a TarError for a damaged header (its checksum is wrong)."""
    if header[156:157] not in (b"0", b"\0", b"5") or header[124] & 0x80:
        return None
    try:
        checksum, size = int(header[148:156].strip(b"\0 "), 8), int(header[124:136].strip(b"\0 ") or b"0", 8)
    except ValueError:
        return None
    if checksum != sum(header) - sum(header[148:156]) + 8 * 32:
        raise tarfile.ReadError("a tar header's checksum is wrong")
    name = header[:100].split(b"\0", 1)[0]
    prefix = header[345:500].split(b"\0", 1)[0] if header[257:262] == b"ustar" else b""
    return (prefix + b"/" + name if prefix else name).decode(), size, header[156:157] != b"5"


_NOT_JPEG = {b"\x89PNG": "a PNG", b"GIF8": "a GIF", b"RIFF": "a RIFF (WebP?)", b"BM": "a BMP"}


def _read(f, where: tuple[int, int], n: int) -> bytes:
    f.seek(where[0])
    return f.read(min(n, where[1]))


def _sample_problem(f, entries: dict, num_classes: int) -> str | None:
    if "jpg" not in entries or "cls" not in entries:
        return f"has {sorted(entries)}, not both 'jpg' and 'cls'"
    label = _read(f, entries["cls"], 32)
    if not label.strip().isdigit() or int(label) >= num_classes:
        return f"has label {label[:16]!r}, but the manifest has {num_classes} classes (0..{num_classes - 1})"
    head = _read(f, entries["jpg"], 4)
    if head[:2] != b"\xff\xd8":
        kind = next((what for magic, what in _NOT_JPEG.items() if head.startswith(magic)), "not JPEG data")
        return f"has an image that is {kind}, not a JPEG (starts with {head!r})"
    return None


class BadShard(UsageError):
    """A sample the streams cannot use (see sample_fields). Raised in a loader worker, it is re-raised in
    the main process as BadShard(the worker's whole traceback): only the message is kept, one line."""

    def __init__(self, message: str):
        super().__init__(message.rstrip().rsplit("BadShard: ", 1)[-1] if "Traceback" in message else message)


def sample_fields(sample: dict, num_classes: int) -> tuple[bytes, int]:
    """(jpg bytes, label) of a streamed sample, or BadShard naming its shard and key: the start-up check
    (shard_contents) has seen every sample, but shards can change during a run, and a label out of range
    would be an IndexError on the CPU and a device-side assert on a GPU."""
    label = sample.get("cls", b"")
    if "jpg" not in sample or not label.strip().isdigit() or (num_classes and int(label) >= num_classes):
        raise BadShard(f"shard {sample.get('__url__')}: sample {sample.get('__key__')!r} has no image or a bad "
                       f"label ({label[:16]!r}; {num_classes} classes); re-run data_prep")
    return sample["jpg"], int(label)
