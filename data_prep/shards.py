"""Writing WebDataset shards reproducibly, and checking them against `manifest.json` (`verify`).

The format is the contract in docs/manifest.md. Reproducibility: `webdataset.TarWriter` stamps
every tar member with the current time unless given `mtime`; with a fixed mtime, fixed owner and
mode, and a fixed sample order, the same samples give byte-identical shards.
"""

from __future__ import annotations

import hashlib
import io
from pathlib import Path
from typing import Callable

import braceexpand
from PIL import Image

from common.errors import UsageError

from .manifest import MANIFEST, file_sha256, read_manifest, shard_path
# The default shard size aims for at least this many train shards: more shards than
# ranks x dataloader workers keeps every consumer busy (see docs/data.md, "How many shards").
MIN_TRAIN_SHARDS = 16
# Evaluation reads whole shards per rank when a split has at least as many shards as ranks (one pass over
# the test set in all), so the test split aims for at least this many shards by default (--min-test-shards).
MIN_TEST_SHARDS = 16
# ...but never more than this many samples per shard (about 100 MB of typical JPEGs), for big sets.
MAX_SAMPLES_PER_SHARD = 1000
TAR_MTIME = 0  # fixed tar header time, for byte-identical re-runs

# (__key__, class index, jpg bytes or a callable returning them: read only when the sample is written)
Sample = tuple[str, int, "bytes | Callable[[], bytes]"]


def default_samples_per_shard(num_train: int) -> int:
    """The largest shard size that still yields `MIN_TRAIN_SHARDS` train shards (2000 -> 125, 341 -> 21)."""
    return min(max(num_train // MIN_TRAIN_SHARDS, 1), MAX_SAMPLES_PER_SHARD)


def eval_samples_per_shard(num_test: int, samples_per_shard: int, min_test_shards: int | None,
                            explicit: bool) -> int:
    """The test split's shard size: the train one, made smaller where needed for `min_test_shards` test
    shards (default MIN_TEST_SHARDS). An explicit --samples-per-shard without --min-test-shards is kept as is."""
    if explicit and min_test_shards is None:
        return samples_per_shard
    return min(samples_per_shard, max(num_test // (min_test_shards or MIN_TEST_SHARDS), 1))


def shard_name(split: str, index: int) -> str:
    return f"{split}-{index:06d}.tar"


def shard_pattern(split: str, num_shards: int) -> str:
    """Brace pattern that `webdataset`/`braceexpand` expands to the shard names, in order."""
    return f"{split}-{{{0:06d}..{num_shards - 1:06d}}}.tar"


def write_split(out: Path, split: str, samples: list[Sample], samples_per_shard: int, num_classes: int) -> dict:
    """Write `samples` (already in their final order) as shards; return the split's manifest entry.

    Only one image is in memory at a time when `samples` holds callables (see `Sample`).
    """
    import webdataset as wds  # imports torch (~2 s): paid only when shards are written or read

    # ShardWriter formats its pattern with %, so a literal % in the folder name must be doubled.
    pattern = str(out).replace("%", "%%") + f"/{split}-%06d.tar"
    with wds.ShardWriter(pattern, maxcount=samples_per_shard, maxsize=float("inf"), verbose=0,
                         encoder=False, mtime=TAR_MTIME, user="bigdata", group="bigdata", mode=0o444) as sink:
        for key, label, jpg in samples:
            sink.write({"__key__": key, "jpg": jpg() if callable(jpg) else jpg, "cls": str(label).encode("ascii")})
    # ShardWriter starts a new shard exactly every `samples_per_shard` samples.
    chunks = [samples[i:i + samples_per_shard] for i in range(0, len(samples), samples_per_shard)]
    shards = []
    for index, chunk in enumerate(chunks):
        path = out / shard_name(split, index)
        data = path.read_bytes()
        shards.append({
            "name": path.name,
            "num_samples": len(chunk),
            "size": len(data),
            "sha256": hashlib.sha256(data).hexdigest(),
            "class_counts": _class_counts((label for _, label, _ in chunk), num_classes),
        })
    return {
        "num_samples": len(samples),
        "pattern": shard_pattern(split, len(shards)),
        "class_counts": _class_counts((label for _, label, _ in samples), num_classes),
        "shards": shards,
    }


def _class_counts(labels, num_classes: int) -> list[int]:
    counts = [0] * num_classes
    for label in labels:
        counts[label] += 1
    return counts


def shards_present(out: Path, manifest: dict) -> bool:
    """Cheap check (names and sizes, no hashing) that the shards a manifest lists are on disk."""
    for split in manifest.get("splits", {}).values():
        for shard in split.get("shards", []):
            path = shard_path(out, shard["name"])
            if not path.is_file() or path.stat().st_size != shard["size"]:
                return False
    return True


def verify(out: str | Path) -> list[str]:
    """Re-read every shard listed in ``out/manifest.json``; return the problems found (empty = OK).

    Checks shard size and sha256, the brace pattern, per-shard and per-split sample and class
    counts, that every sample has exactly a decodable `jpg` and a valid `cls`, that keys are unique
    within a split, and that no stray `.tar` files sit next to the manifest.
    """
    out = Path(out)
    try:
        manifest = read_manifest(out)
        classes = manifest["classes"]
        splits = manifest["splits"]
        problems, train_keys = [], set()
        for split_name, split in splits.items():
            # val is carved out of train: one key space, so a key in both is an image in both
            seen = train_keys if split_name in ("train", "val") else set()
            problems += _verify_split(out, split_name, split, len(classes), seen)
        listed = {s["name"] for split in splits.values() for s in split["shards"]}
        problems += [f"{p.name}: not listed in {MANIFEST}" for p in sorted(out.glob("*.tar")) if p.name not in listed]
        return problems
    except UsageError as exc:
        return [str(exc)]
    except (KeyError, TypeError) as exc:
        return [f"{out / MANIFEST}: malformed, missing or wrong field {exc}"]


def _verify_split(out: Path, split_name: str, split: dict, num_classes: int, seen_keys: set[str]) -> list[str]:
    """`seen_keys`: keys of the splits that share this one's key space (train and val); a repeat is reported."""
    from webdataset.tariterators import tarfile_samples  # see write_split

    problems = []
    names = [s["name"] for s in split["shards"]]
    if list(braceexpand.braceexpand(split["pattern"])) != names:
        problems.append(f"{split_name}: pattern {split['pattern']!r} does not expand to the listed shards")
    totals = [0] * num_classes
    for shard in split["shards"]:
        path = shard_path(out, shard["name"])
        if not path.is_file():
            problems.append(f"{shard['name']}: missing")
            continue
        size = path.stat().st_size
        if size != shard["size"]:
            problems.append(f"{shard['name']}: size {size} != {shard['size']} in {MANIFEST}")
        if file_sha256(path) != shard["sha256"]:
            problems.append(f"{shard['name']}: sha256 does not match {MANIFEST} (modified or corrupt)")
        counts = [0] * num_classes
        try:
            # Read the way a WebDataset pipeline does, so key splitting matches what train.py sees.
            for sample in tarfile_samples([{"url": str(path)}]):
                problems += _check_sample(shard["name"], sample, num_classes, seen_keys, counts)
        except Exception as exc:  # a damaged tar can fail in many ways; report, don't crash
            problems.append(f"{shard['name']}: unreadable tar ({exc})")
            continue
        if sum(counts) != shard["num_samples"]:
            problems.append(f"{shard['name']}: {sum(counts)} samples, {MANIFEST} says {shard['num_samples']}")
        if "class_counts" in shard and counts != shard["class_counts"]:
            problems.append(f"{shard['name']}: class counts {counts}, {MANIFEST} says {shard['class_counts']}")
        totals = [a + b for a, b in zip(totals, counts)]
    if sum(totals) != split["num_samples"]:
        problems.append(f"{split_name}: {sum(totals)} samples in shards, {MANIFEST} says {split['num_samples']}")
    if totals != split["class_counts"]:
        problems.append(f"{split_name}: class counts {totals}, {MANIFEST} says {split['class_counts']}")
    return problems


def _check_sample(shard: str, sample: dict, num_classes: int, seen_keys: set[str], counts: list[int]) -> list[str]:
    key = sample["__key__"]
    fields = sorted(k for k in sample if not k.startswith("__"))
    if fields != ["cls", "jpg"]:
        return [f"{shard}: sample {key!r} has entries {fields}, expected ['cls', 'jpg']"]
    problems = []
    if key in seen_keys:
        problems.append(f"{shard}: duplicate key {key!r}")
    seen_keys.add(key)
    cls = sample["cls"]
    if cls.isdigit() and int(cls) < num_classes:
        counts[int(cls)] += 1
    else:
        problems.append(f"{shard}: sample {key!r} has invalid cls {cls!r}")
    try:
        with Image.open(io.BytesIO(sample["jpg"])) as image:
            image.load()
            fmt = image.format
    except Exception:  # any decoder failure means the same thing here
        fmt = None
    if fmt != "JPEG":
        problems.append(f"{shard}: sample {key!r} is not a fully decodable JPEG")
    return problems
