"""`prepare`: source -> decoded, checked images -> shuffled WebDataset shards + manifest.json.

Order of work, and why:

1. Resolve the source and fingerprint it together with every option that changes the output.
   If OUT already holds a manifest with that fingerprint and its shards, stop ("up to date").
2. Inside a temporary sibling of OUT (renamed into place only at the very end): extract a zip,
   list the files in sorted order, and decode every one in a worker pool. `Pool.imap` returns
   results in input order, so the output does not depend on `--workers`.
3. Set aside unreadable files, find exact duplicates (and train/test leakage), check that no
   class is left empty, shuffle each split with the seed, write shards, then the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import multiprocessing
import random
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Callable

from tqdm import tqdm

from . import __version__, shards, sources
from .errors import UsageError
from .fsutil import atomic_output_dir
from .images import EncodeOptions, Encoded, encode_file
from .manifest import FORMAT, MANIFEST, read_manifest
from .options import PrepareOptions, default_workers



@dataclass
class _Record:
    """A source file together with what decoding it produced."""

    file: sources.SourceFile
    result: Encoded


def prepare(source: str | Path, out: str | Path, *, log: Callable[[str], None] = print, **options) -> dict:
    """Build ``out/`` from `source` and return the manifest. `options`: the fields of `PrepareOptions`
    (test_fraction, seed, samples_per_shard, ..., progress; see docs/data.md for each).

    Raises `UsageError` for anything the user has to fix; `out` is then left untouched.
    """
    return prepare_with(PrepareOptions(source=str(source), out=Path(out), **options), log)


def prepare_with(opts: PrepareOptions, log: Callable[[str], None] = print) -> dict:
    _check_options(opts)
    source, out = opts.source, Path(opts.out)
    kind, path = sources.resolve(source, opts.cache_dir, opts.progress)
    if kind == "dir" and out.resolve().is_relative_to(path.resolve()):
        raise UsageError(f"--out {out} is inside --source {source}; write the shards somewhere else")
    options = opts.fingerprint_options()
    fingerprint = _fingerprint(sources.fingerprint(kind, path), options)
    if not opts.force and _up_to_date(out, fingerprint):
        log(f"data_prep: {out} is up to date (same input and options); pass --force to rebuild")
        return read_manifest(out)

    encode = EncodeOptions(max_side=opts.max_side, shorter_side=opts.shorter_side, quality=opts.quality)
    with atomic_output_dir(out) as tmp:
        root = sources.safe_extract(path, tmp / "_extract") if kind == "zip" else path
        layout = sources.scan(sources.find_layout_root(root), test_fraction=opts.test_fraction, seed=opts.seed)
        records = _decode_all(layout.files, encode, opts.workers or default_workers(), opts.progress)
        records, skipped = _usable(records, layout.skipped, opts.strict)
        duplicates, dropped = _find_duplicates(records, opts.drop_duplicates)
        records = [r for r in records if r.file.rel not in dropped]
        by_split = _by_split(_carve_val(records, opts.val_fraction, opts.seed), opts.val_fraction)
        _check_not_empty(by_split, layout.classes, len(skipped))
        options["samples_per_shard"] = opts.samples_per_shard or shards.default_samples_per_shard(len(by_split["train"]))
        manifest = {
            "format": FORMAT,
            "classes": layout.classes,
            "splits": {
                split: shards.write_split(tmp, split, _stratified_shuffle(recs, opts.seed, split),
                                          options["samples_per_shard"], len(layout.classes))
                for split, recs in by_split.items()
            },
            "options": options,
            "skipped": skipped,
            "duplicates": duplicates,
            "fingerprint": fingerprint,
            "created_by": f"data_prep {__version__}",
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if kind == "zip":
            # The extracted copy is scratch space only; it must not be renamed into OUT.
            shutil.rmtree(tmp / "_extract")
    _report(out, manifest, log)
    return manifest


def _usable(records: list[_Record], skipped: list[dict], strict: bool) -> tuple[list[_Record], list[dict]]:
    """The decoded records, and every skipped file with its reason (--strict: an error instead)."""
    skipped = skipped + [{"path": r.file.rel, "reason": r.result.reason} for r in records if r.result.jpg is None]
    if strict and skipped:
        first = skipped[0]
        raise UsageError(
            f"--strict: {len(skipped)} unusable file(s), first {first['path']}: {first['reason']}; "
            "fix or remove them, or drop --strict to skip them"
        )
    return [r for r in records if r.result.jpg is not None], skipped


def _check_options(o: PrepareOptions) -> None:
    if o.test_fraction is not None and not 0 < o.test_fraction < 1:
        raise UsageError(f"--test-fraction {o.test_fraction}: must be between 0 and 1 (exclusive), e.g. 0.2")
    if o.val_fraction is not None and not 0 < o.val_fraction < 1:
        raise UsageError(f"--val-fraction {o.val_fraction}: must be between 0 and 1 (exclusive), e.g. 0.1")
    if o.samples_per_shard is not None and o.samples_per_shard < 1:
        raise UsageError(f"--samples-per-shard {o.samples_per_shard}: must be at least 1")
    if o.max_side is not None and o.shorter_side is not None:
        raise UsageError("--max-side and --shorter-side: give at most one of them")
    for flag, value in (("--max-side", o.max_side), ("--shorter-side", o.shorter_side)):
        if value is not None and value < 8:
            raise UsageError(f"{flag} {value}: must be at least 8 pixels")
    if not 1 <= o.quality <= 100:
        raise UsageError(f"--quality {o.quality}: must be between 1 and 100 (95 keeps nearly all detail)")
    if o.workers is not None and o.workers < 1:
        raise UsageError(f"--workers {o.workers}: must be at least 1")


def _fingerprint(input_id: str, options: dict) -> str:
    # The source's spelling is left out: the same folder reached by another path is the same input.
    relevant = {k: v for k, v in options.items() if k != "source"}
    blob = json.dumps({"input": input_id, "options": relevant, "format": FORMAT}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def _up_to_date(out: Path, fingerprint: str) -> bool:
    """True if `out` holds this exact output; raise if `out` is something we must not overwrite."""
    if not out.exists():
        return False
    if not out.is_dir():
        raise UsageError(f"--out {out}: exists and is not a folder; choose another --out")
    if not (out / MANIFEST).exists():
        if any(out.iterdir()):
            raise UsageError(
                f"--out {out}: folder exists, is not empty and has no {MANIFEST}; "
                "choose another --out or empty it"
            )
        return False
    try:
        manifest = read_manifest(out)
    except UsageError:
        return False  # our own damaged output: rebuild it
    return manifest.get("fingerprint") == fingerprint and shards.shards_present(out, manifest)


def _decode_all(files: list[sources.SourceFile], encode: EncodeOptions, workers: int, progress: bool) -> list[_Record]:
    work = partial(encode_file, options=encode)
    paths = [f.path for f in files]
    bar = dict(total=len(files), desc="decode", unit="img", file=sys.stderr, disable=not progress)
    if workers == 1 or len(files) < 2:
        results = [work(p) for p in tqdm(paths, **bar)]
    else:
        # The pool is created before tqdm starts its monitor thread (forking after threads is fragile).
        with multiprocessing.Pool(min(workers, len(files))) as pool:
            results = list(tqdm(pool.imap(work, paths, chunksize=8), **bar))
    return [_Record(f, r) for f, r in zip(files, results)]


def _find_duplicates(records: list[_Record], drop: bool) -> tuple[list[dict], set[str]]:
    """Group byte-identical files; with `drop`, keep one per group (a test copy first, so leaks leave train).

    Returns the manifest's `duplicates` list and the relative paths to drop.
    """
    groups: dict[str, list[_Record]] = defaultdict(list)
    for r in records:
        groups[r.result.sha256].append(r)
    report, dropped = [], set()
    for digest, group in sorted(groups.items(), key=lambda item: item[1][0].file.rel):
        if len(group) < 2:
            continue
        group.sort(key=lambda r: (r.file.split != "test", r.file.rel))
        entry = {
            "sha256": digest,
            "paths": [r.file.rel for r in group],
            "splits": sorted({r.file.split for r in group}),
            "leak": len({r.file.split for r in group}) > 1,
            "label_conflict": len({r.file.label for r in group}) > 1,
        }
        if drop:
            entry["dropped"] = [r.file.rel for r in group[1:]]
            dropped.update(entry["dropped"])
        report.append(entry)
    return report, dropped


def _carve_val(records: list[_Record], fraction: float | None, seed: int) -> list[_Record]:
    """--val-fraction: move round(n * F) of each class's n train records (at least 1, at most n - 1) to val.

    Which ones: the lowest seeded hashes of the image content (the sha256 of its bytes, then its path), the
    rule --test-fraction uses on paths. A record's split depends only on itself and the seed, so adding
    photos moves few existing ones, and byte-identical copies land in the same split (no train/val leak).
    """
    if not fraction:
        return records
    def rank(r: _Record) -> bytes:
        return hashlib.sha256(f"{seed}:val:{r.result.sha256}:{r.file.rel}".encode()).digest()
    chosen: set[str] = set()
    for label in sorted({r.file.label for r in records}):
        members = sorted((r for r in records if r.file.split == "train" and r.file.label == label), key=rank)
        n = len(members)
        n_val = min(max(round(n * fraction), 1), n - 1) if n >= 2 else 0
        chosen.update(r.file.rel for r in members[:n_val])
    return [_Record(dataclasses.replace(r.file, split="val"), r.result) if r.file.rel in chosen else r
            for r in records]


def _by_split(records: list[_Record], val_fraction: float | None) -> dict[str, list[_Record]]:
    names = sources.SPLITS + (("val",) if val_fraction else ())
    return {s: [r for r in records if r.file.split == s] for s in names}


def _check_not_empty(by_split: dict[str, list[_Record]], classes: list[str], num_skipped: int) -> None:
    present = {(r.file.split, r.file.label) for recs in by_split.values() for r in recs}
    for split in by_split:
        for label, name in enumerate(classes):
            if (split, label) not in present:
                raise UsageError(
                    f"{split}/{name}: no readable image ({num_skipped} file(s) skipped in total); "
                    "add images to that class folder"
                )


def _stratified_shuffle(records: list[_Record], seed: int, split: str) -> list[shards.Sample]:
    """Shuffle so that every class is spread evenly along the sequence, hence over every shard.

    Each class is shuffled, its i-th of n members placed at (i + U(0,1)) / n, and the classes are
    merged by that position: random order, but no long single-class runs, even in small shards.
    """
    rng = random.Random(f"{seed}:{split}")
    by_label: dict[int, list[_Record]] = defaultdict(list)
    for r in records:  # already in sorted path order, so the shuffle input is deterministic
        by_label[r.file.label].append(r)
    placed = []
    for label in sorted(by_label):
        members = by_label[label]
        rng.shuffle(members)
        placed += [((i + rng.random()) / len(members), r.file.key, r) for i, r in enumerate(members)]
    placed.sort(key=lambda t: t[:2])
    return [(r.file.key, r.file.label, r.result.jpg) for _, _, r in placed]


def _report(out: Path, manifest: dict, log: Callable[[str], None]) -> None:
    """One summary line on stdout, plus a warning line per kind of problem on stderr."""
    train, test = manifest["splits"]["train"], manifest["splits"]["test"]
    skipped, duplicates = manifest["skipped"], manifest["duplicates"]
    leaks = sum(1 for d in duplicates if d["leak"])
    val = manifest["splits"].get("val")
    val_text = f" + {val['num_samples']} val" if val else ""
    val_shards = f" + {len(val['shards'])}" if val else ""
    log(
        f"data_prep: wrote {out}: {train['num_samples']} train{val_text} + {test['num_samples']} test samples "
        f"in {len(train['shards'])}{val_shards} + {len(test['shards'])} shards "
        f"({manifest['options']['samples_per_shard']} per shard), {len(manifest['classes'])} classes; "
        f"{len(skipped)} skipped, {len(duplicates)} duplicate group(s), {leaks} train/test leak(s)"
    )
    if skipped:
        first = skipped[0]
        print(f"data_prep: warning: skipped {len(skipped)} unusable file(s), first {first['path']}: "
              f"{first['reason']}; all listed under 'skipped' in {MANIFEST}", file=sys.stderr)
    if leaks:
        print(f"data_prep: warning: {leaks} image(s) appear in both train and test (leakage); "
              f"see 'duplicates' in {MANIFEST}, or pass --drop-duplicates", file=sys.stderr)
