"""The manifest contract (docs/manifest.md), owned by data_prep because data_prep writes it.

Both sides read it through this module: `data_prep verify` and `finetune.data.manifest.load_manifest` (train.py,
experiments). It is deliberately small and imports nothing heavy: json, hashlib and the error type.

- `read_manifest(root)`: the one reader. Checks `format`, the classes, both splits, every shard entry's
  fields, that shard counts add up to the split's `num_samples`, and every shard name (`shard_path`).
- `shard_path(root, name)`: the one shard-name rule. A name is what data_prep writes, a plain file name
  such as `train-000000.tar`; anything else (a `/`, `..`, a URL scheme such as `pipe:`, which webdataset
  would run through a shell) is refused, so a manifest can only ever point at files inside its folder.
- `split_names(manifest)`: train, test and, when present, the optional val split.
- `file_digests(path, ...)` / `file_sha256(path)`: the one streamed file hasher.
"""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from common.errors import UsageError

from . import remote_io

FORMAT = "hotdog-wds/1"
MANIFEST = "manifest.json"
SPLITS = ("train", "test")
OPTIONAL_SPLITS = ("val",)      # --val-fraction; manifests without it are valid (older data_prep, or no val)
_CHUNK = 1 << 20
# What shards.shard_name writes, and a little more (other tools may use other digits or split names):
# letters, digits, '-', '_' and '.', ending in .tar, not starting with '.'. No '/', ':' or '..'.
# fullmatch, not `$`: `$` also matches before a trailing newline ("train-000000.tar\n").
_SHARD_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]*\.tar")


def file_digests(path: Path, *algorithms: str) -> dict[str, str]:
    """Hex digests of a file for several algorithms in one streamed pass (shards and zips can be large)."""
    hashers = {name: hashlib.new(name) for name in algorithms}
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            for h in hashers.values():
                h.update(chunk)
    return {name: h.hexdigest() for name, h in hashers.items()}


def file_sha256(path: Path) -> str:
    return file_digests(path, "sha256")["sha256"]


def shard_path(root: Path, name: str) -> Path:
    """`root / name` for a shard name data_prep could have written; ValueError for any other name."""
    if not isinstance(name, str) or not _SHARD_NAME.fullmatch(name) or ".." in name:
        raise ValueError(f"shard name {name!r} is not a plain NAME.tar file name in the manifest's folder")
    return Path(root) / name


def read_manifest(root: str | Path) -> dict:
    """`root/manifest.json`, checked; UsageError (naming the file and the fix) when it is missing or invalid.
    Returns the parsed dict; shard names are checked, so `shard_path(root, name)` cannot fail on them."""
    if remote_io.is_remote(root):        # Path() would fold http:// into http:/ and advise a command that cannot work
        raise UsageError(remote_io.local_only(root))
    root = Path(root)
    path = root / MANIFEST
    try:
        manifest = json.loads(path.read_text())
    except FileNotFoundError:
        raise UsageError(f"no {MANIFEST} in {root} ({path} not found); create shards with "
                         f"`python -m data_prep --source DIR --out {root}`") from None
    except (OSError, ValueError) as exc:
        raise UsageError(f"{path}: unreadable ({exc}); re-run data_prep prepare with --force") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise UsageError(f"{path}: not a {FORMAT} manifest; re-run data_prep prepare with --force")
    try:
        _check(root, manifest)
    except (ValueError, KeyError, TypeError) as exc:
        raise UsageError(f"{path}: not a valid shard manifest ({type(exc).__name__}: {exc}); "
                         f"re-run data_prep prepare with --force") from None
    return manifest


def _check(root: Path, manifest: dict) -> None:
    classes = manifest["classes"]
    if not isinstance(classes, list) or len(classes) < 2 or not all(isinstance(c, str) for c in classes):
        raise ValueError(f"needs a list of at least two class names, found {classes!r}")
    for name in split_names(manifest):
        split = manifest["splits"][name]
        shards = split["shards"]
        for shard in shards:
            shard_path(root, shard["name"])
            int(shard["num_samples"]), int(shard["size"]), str(shard["sha256"])
        if sum(int(s["num_samples"]) for s in shards) != int(split["num_samples"]):
            raise ValueError(f"{name}: shard counts do not add up to num_samples")


def split_names(manifest: dict) -> tuple[str, ...]:
    """The splits a manifest holds: train and test always, val when data_prep was given --val-fraction."""
    return SPLITS + tuple(name for name in OPTIONAL_SPLITS if name in manifest["splits"])
