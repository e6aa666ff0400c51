"""`prepare`: source -> decoded, checked images -> shuffled WebDataset shards + manifest.json.

Order of work, and why:

1. Resolve the source and fingerprint it together with every option that changes the output.
   If OUT already holds a manifest with that fingerprint and its shards, stop ("up to date").
2. Inside a temporary sibling of OUT (renamed into place only at the very end): extract a zip,
   list the files in sorted order, and decode every one in a worker pool. Results are taken in
   input order, so the output does not depend on `--workers`. Each encoded image is appended to a
   spool file at once and only its offset is kept, so memory stays bounded whatever the set size.
   A worker that dies (OOM killer, a crash in a decoder) ends the run with one line.
3. Set aside unreadable files, find exact duplicates (and train/test leakage), check that no
   class is left empty, shuffle each split with the seed, write shards (reading the images back
   from the spool one at a time), then the manifest.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import multiprocessing
import os
import random
import shutil
import signal
import sys
import tempfile
from collections import defaultdict, deque
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from functools import partial
from pathlib import Path
from typing import Callable, Iterator

from tqdm import tqdm

from common.errors import UsageError
from common.fsutil import atomic_output_dir, output_target

from . import remote_io, shards, sources
from .images import EncodeOptions, Encoded, encode_file
from .manifest import FORMAT, MANIFEST, read_manifest
from .options import PrepareOptions, default_workers

VERSION = "0.1"      # data_prep's version, recorded in every manifest (created_by); data_prep.__version__



@dataclass
class _Record:
    """A source file together with what decoding it produced."""

    file: sources.SourceFile
    result: Encoded  # its jpg is None: the bytes are in the spool file, at `span`
    span: tuple[int, int] | None = None  # (offset, length) in the spool; None for a skipped file

    @property
    def usable(self) -> bool:
        return self.span is not None


def prepare(source: str | Path, out: str | Path, *, log: Callable[[str], None] = print, **options) -> dict:
    """Build ``out/`` from `source` and return the manifest. `options`: the fields of `PrepareOptions`
    (test_fraction, seed, samples_per_shard, ..., progress; see docs/data.md for each).

    Raises `UsageError` for anything the user has to fix; `out` is then left untouched.
    """
    out = out if remote_io.is_remote(out) else Path(out)      # Path() would fold s3:// into s3:/
    return prepare_with(PrepareOptions(source=str(source), out=out, **options), log)


def prepare_with(opts: PrepareOptions, log: Callable[[str], None] = print) -> dict:
    if remote_io.is_remote(str(opts.out)):
        return _prepare_remote(opts, log)
    _check_options(opts)
    source, out = opts.source, Path(opts.out)
    real_out = output_target(out)
    kind, path = sources.resolve(source, opts.cache_dir, opts.progress)
    if kind == "dir" and real_out.is_relative_to(path.resolve()):
        raise UsageError(f"--out {out} is inside --source {source}; write the shards somewhere else")
    if path.resolve().is_relative_to(real_out):
        raise UsageError(f"--source {source} is inside --out {out}, which is replaced as a whole; "
                         "move the source out of it or choose another --out")
    options = opts.fingerprint_options()
    fingerprint = _fingerprint(sources.fingerprint(kind, path), options)
    if not opts.force and _up_to_date(out, fingerprint):
        log(f"data_prep: {out} is up to date (same input and options); pass --force to rebuild")
        return read_manifest(out)

    encode = EncodeOptions(max_side=opts.max_side, shorter_side=opts.shorter_side, quality=opts.quality)
    with atomic_output_dir(out) as tmp:
        limits = sources.ZipLimits(opts.zip_max_bytes, opts.zip_max_members)
        root = sources.safe_extract(path, tmp / "_extract", limits) if kind == "zip" else path
        layout = sources.scan(sources.find_layout_root(root), test_fraction=opts.test_fraction, seed=opts.seed)
        spool = tmp / "_spool"
        records = _decode_all(layout.files, encode, opts.workers or default_workers(), opts.progress, spool)
        records, skipped = _usable(records, layout.skipped, opts.strict)
        duplicates, dropped = _find_duplicates(records, opts.drop_duplicates)
        records = [r for r in records if r.file.rel not in dropped]
        by_split = _by_split(_carve_val(records, opts.val_fraction, opts.seed, layout.classes), opts.val_fraction)
        _check_not_empty(by_split, layout.classes, len(skipped))
        _shard_sizes(options, opts, by_split)
        with open(spool, "rb") as images:
            splits = {
                split: shards.write_split(tmp, split, _stratified_shuffle(recs, opts.seed, split, images),
                                          _shard_size(options, split), len(layout.classes))
                for split, recs in by_split.items()
            }
        spool.unlink()
        manifest = {
            "format": FORMAT,
            "classes": layout.classes,
            "splits": splits,
            "options": options,
            "skipped": skipped,
            "duplicates": duplicates,
            "fingerprint": fingerprint,
            "created_by": f"data_prep {VERSION}",
        }
        (tmp / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
        if kind == "zip":
            # The extracted copy is scratch space only; it must not be renamed into OUT.
            shutil.rmtree(tmp / "_extract")
    _report(out, manifest, log)
    return manifest


def _shard_sizes(options: dict, opts: PrepareOptions, by_split: dict) -> None:
    """Record the shard size of each split in `options` (docs/data.md, "How many shards")."""
    options["samples_per_shard"] = opts.samples_per_shard or shards.default_samples_per_shard(len(by_split["train"]))
    options["test_samples_per_shard"] = shards.eval_samples_per_shard(
        len(by_split["test"]), options["samples_per_shard"], opts.min_test_shards, opts.samples_per_shard is not None)


def _prepare_remote(opts: PrepareOptions, log: Callable[[str], None]) -> dict:
    """--out s3://...: the usual atomic build in a local folder (kept under TMPDIR, so a re-run with the same
    input is up to date), then every shard and, last, the manifest uploaded with retries."""
    url = str(opts.out).rstrip("/")
    if not url.startswith("s3://"):
        raise UsageError(f"--out {url}: only s3:// locations can be written; use a local folder and serve it")
    local = Path(tempfile.gettempdir()) / "data_prep-out" / hashlib.sha256(url.encode()).hexdigest()[:16]
    local.parent.mkdir(parents=True, exist_ok=True)
    manifest = prepare_with(dataclasses.replace(opts, out=local), log)
    names = [s["name"] for split in manifest["splits"].values() for s in split["shards"]] + [MANIFEST]
    remote_io.upload_folder(local, url, names)
    log(f"data_prep: uploaded {len(names) - 1} shards and {MANIFEST} to {url}")
    return manifest


def _shard_size(options: dict, split: str) -> int:
    """Train uses samples_per_shard; evaluation splits (test, and any other) test_samples_per_shard."""
    return options["samples_per_shard"] if split == "train" else options["test_samples_per_shard"]


def _usable(records: list[_Record], skipped: list[dict], strict: bool) -> tuple[list[_Record], list[dict]]:
    """The decoded records, and every skipped file with its reason (--strict: an error instead)."""
    skipped = skipped + [{"path": r.file.rel, "reason": r.result.reason} for r in records if not r.usable]
    if strict and skipped:
        first = skipped[0]
        raise UsageError(
            f"--strict: {len(skipped)} unusable file(s), first {first['path']}: {first['reason']}; "
            "fix or remove them, or drop --strict to skip them"
        )
    return [r for r in records if r.usable], skipped


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


def _decode_all(files: list[sources.SourceFile], encode: EncodeOptions, workers: int, progress: bool,
                spool: Path) -> list[_Record]:
    """Decode every file; append each usable image's bytes to `spool` at once (bounded memory)."""
    records = []
    with open(spool, "wb") as sink:
        for file, result in zip(files, _encode_in_order([f.path for f in files], encode, workers, progress)):
            span = None
            if result.jpg is not None:
                span = (sink.tell(), len(result.jpg))
                sink.write(result.jpg)
                result = replace(result, jpg=None)
            records.append(_Record(file, result, span))
    return records


_CHUNK = 8  # files per task sent to a worker
_IN_FLIGHT = 4  # tasks queued per worker: results held in memory are at most workers x 4 x 8 images


def _encode_chunk(paths: list[Path], options: EncodeOptions) -> list[Encoded]:
    return [encode_file(p, options) for p in paths]


def _encode_in_order(paths: list[Path], encode: EncodeOptions, workers: int, progress: bool) -> Iterator[Encoded]:
    """`encode_file` over `paths`, results in input order, in `workers` processes.

    A ProcessPoolExecutor rather than multiprocessing.Pool: when a worker dies (SIGKILL from the OOM
    killer, a segfault), Pool.imap waits forever, while the executor fails every pending task with
    BrokenProcessPool, which becomes a one-line UsageError (and the temporary output is removed).
    """
    bar = dict(total=len(paths), desc="decode", unit="img", file=sys.stderr, disable=not progress)
    if workers == 1 or len(paths) < 2:
        yield from (encode_file(p, encode) for p in tqdm(paths, **bar))
        return
    chunks = iter([paths[i:i + _CHUNK] for i in range(0, len(paths), _CHUNK)])
    pool = ProcessPoolExecutor(min(workers, len(paths)), mp_context=multiprocessing.get_context("fork"),
                               initializer=_worker_start, initargs=(os.getpid(),))
    pending: deque = deque()

    def submit() -> None:
        chunk = next(chunks, None)
        if chunk is not None:
            pending.append((chunk, pool.submit(_encode_chunk, chunk, encode)))

    try:
        # The first submissions fork every worker, before tqdm starts its monitor thread
        # (forking after threads is fragile), with SIGTERM held: cli's handler would otherwise run in fork's
        # at-fork hooks, where its exception is ignored (the run went on). The executor's threads, started
        # here, inherit the held mask, so a later SIGTERM reaches the main thread.
        held = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
        try:
            for _ in range(_IN_FLIGHT * workers):
                submit()
        finally:
            signal.pthread_sigmask(signal.SIG_SETMASK, held)
        with tqdm(**bar) as progress_bar:
            while pending:
                chunk, future = pending.popleft()
                try:
                    results = future.result()
                except BrokenProcessPool:
                    raise UsageError(
                        f"a decode worker died (killed by the system, e.g. out of memory, or crashed) while "
                        f"decoding {chunk[0]} or one of the {len(chunk) - 1} files after it; nothing was "
                        "written; free memory or pass --workers 1 (or a smaller --max-side), then retry"
                    ) from None
                submit()
                progress_bar.update(len(chunk))
                yield from results
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


def _worker_start(parent: int) -> None:
    """Decode workers exit with the main process, however it ends: SIGTERM kills a worker outright (not the
    main process's handler, inherited by fork, which would make the worker report it as a task's error and
    go on), and on Linux the kernel kills a worker whose parent died (PR_SET_PDEATHSIG), e.g. by SIGKILL;
    before, such workers stayed blocked on their task queue forever, holding the terminal's stdout."""
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGTERM})      # held while the pool forked
    if sys.platform.startswith("linux"):
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL)     # 1 = PR_SET_PDEATHSIG
    if os.getppid() != parent:       # the parent died before the line above took effect
        os._exit(1)


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


def _carve_val(records: list[_Record], fraction: float | None, seed: int, classes: list[str]) -> list[_Record]:
    """--val-fraction: move about round(n * F) of each class's n train records (at least one image, never all)
    to val.

    Which ones: the lowest seeded hashes of the image content (the sha256 of its bytes; the path breaks
    ties), like the rule --test-fraction uses on paths. A record's split depends only on itself and the seed,
    so adding photos moves few existing ones. Byte-identical copies go to val together (no train/val leak):
    whole groups are taken until round(n * F) records are reached, skipping a group that would leave the class
    no train image. A class with fewer than two distinct images cannot be split: one line says so.
    """
    if not fraction:
        return records
    def rank(r: _Record) -> tuple[bytes, str]:
        return hashlib.sha256(f"{seed}:val:{r.result.sha256}".encode()).digest(), r.file.rel
    train = [r for r in records if r.file.split == "train"]
    chosen: set[str] = set()
    for label in sorted({r.file.label for r in train}):
        members = sorted((r for r in train if r.file.label == label), key=rank)
        groups = [list(g) for _, g in itertools.groupby(members, key=lambda r: r.result.sha256)]
        if len(groups) < 2:
            raise UsageError(f"--val-fraction {fraction:g}: train/{classes[label]} has {len(groups)} distinct "
                             f"image(s) ({len(members)} file(s)); a val split needs at least 2 per class, one "
                             f"staying in train: add images or drop --val-fraction")
        want, taken, left = max(round(len(members) * fraction), 1), 0, len(members)
        for group in groups:
            if taken >= want:
                break
            if left - len(group) >= 1:
                chosen.add(group[0].result.sha256)
                taken, left = taken + len(group), left - len(group)
    return [replace(r, file=replace(r.file, split="val")) if r.file.split == "train" and r.result.sha256 in chosen
            else r for r in records]


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


def _stratified_shuffle(records: list[_Record], seed: int, split: str, images) -> list[shards.Sample]:
    """Shuffle so that every class is spread evenly along the sequence, hence over every shard.

    Each class is shuffled, its i-th of n members placed at (i + U(0,1)) / n, and the classes are
    merged by that position: random order, but no long single-class runs, even in small shards.
    Each sample's image is a callable that reads it from the spool file `images` when it is written.
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
    return [(r.file.key, r.file.label, partial(_read_span, images, *r.span)) for _, _, r in placed]


def _read_span(f, offset: int, length: int) -> bytes:
    f.seek(offset)
    return f.read(length)


def _per_shard(options: dict) -> str:
    train, test = options["samples_per_shard"], options.get("test_samples_per_shard", options["samples_per_shard"])
    return str(train) if train == test else f"{train} + {test}"


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
        f"({_per_shard(manifest['options'])} per shard), {len(manifest['classes'])} classes; "
        f"{len(skipped)} skipped, {len(duplicates)} duplicate group(s), {leaks} train/test leak(s)"
    )
    if skipped:
        first = skipped[0]
        print(f"data_prep: warning: skipped {len(skipped)} unusable file(s), first {first['path']}: "
              f"{first['reason']}; all listed under 'skipped' in {MANIFEST}", file=sys.stderr)
    if leaks:
        print(f"data_prep: warning: {leaks} image(s) appear in both train and test (leakage); "
              f"see 'duplicates' in {MANIFEST}, or pass --drop-duplicates", file=sys.stderr)
