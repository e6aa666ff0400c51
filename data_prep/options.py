"""The options of `prepare`, listed once. `PrepareOptions` is the Python API's argument set; its fields
generate the `prepare` command-line flags (help included) and the manifest's `options` / fingerprint
(the fields marked `fingerprint`: those that change the output). Same idea as finetune/config.py."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, field, fields
from pathlib import Path

from . import shards
from .sources import CACHE_ENV, ZipLimits, parse_size

DEFAULT_QUALITY = 95


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def _opt(help: str, default=None, *, fingerprint: bool = False, **argparse_kw):
    """A field with its flag's help and argparse settings; `fingerprint`: it changes the output."""
    return field(default=default, metadata=dict(help=help, fingerprint=fingerprint, argparse=argparse_kw))


@dataclass(frozen=True)
class PrepareOptions:
    source: str = _opt("'d2l' (download d2l's hotdog.zip into the cache), a .zip, or a folder: either train/ and "
                       "test/ with one subfolder per class, or class folders plus --test-fraction",
                       fingerprint=True, required=True)
    out: str | Path = _opt("output folder (created atomically; replaced on rebuild), or an s3:// location (built "
                            "locally under TMPDIR, then uploaded, manifest last)", required=True)
    test_fraction: float | None = _opt("for a folder of class folders: put this fraction of each class in test "
                                       "(deterministic: a seeded hash of each file's path)",
                                       fingerprint=True, type=float, metavar="F")
    val_fraction: float | None = _opt("carve this fraction of each class of train out as a validation split "
                                      "(stratified; a seeded hash of each image's content, so adding photos "
                                      "moves few others; train.py chooses best.pt and stops early on it)",
                                      fingerprint=True, type=float, metavar="F")
    seed: int = _opt("shuffle/split seed (default: 0)", 0, fingerprint=True, type=int)
    # None until resolved: "auto" is part of the fingerprint
    samples_per_shard: int | None = _opt(
        f"samples per shard (default: train count // {shards.MIN_TRAIN_SHARDS}, so at least "
        f"{shards.MIN_TRAIN_SHARDS} train shards, capped at {shards.MAX_SAMPLES_PER_SHARD})",
        fingerprint=True, type=positive_int, metavar="N")
    min_test_shards: int | None = _opt(
        f"make test shards small enough for at least N test shards (default: {shards.MIN_TEST_SHARDS}, or the "
        f"--samples-per-shard size when that is given); evaluation reads whole shards per rank when there are "
        f"at least as many as ranks", fingerprint=True, type=positive_int, metavar="N")
    max_side: int | None = _opt("downsize so the longer side is at most PX (re-encodes; never upscales)",
                                fingerprint=True, type=positive_int, metavar="PX", group="size")
    shorter_side: int | None = _opt("downsize so the shorter side is at most PX (re-encodes; never upscales)",
                                    fingerprint=True, type=positive_int, metavar="PX", group="size")
    quality: int = _opt(f"JPEG quality for re-encoded images: non-JPEG, non-RGB or resized "
                        f"(default: {DEFAULT_QUALITY})", DEFAULT_QUALITY, fingerprint=True, type=int)
    workers: int | None = _opt("decoding processes; the output does not depend on it (default: %(default)s)",
                               type=positive_int, cli_default=default_workers)
    strict: bool = _opt("fail on any corrupt, truncated, zero-byte or non-image file instead of skipping it",
                        False, fingerprint=True, action="store_true")
    drop_duplicates: bool = _opt("keep one copy of byte-identical images (the test copy for train/test leaks)",
                                 False, fingerprint=True, action="store_true")
    force: bool = _opt("rebuild even if OUT is up to date", False, action="store_true")
    cache_dir: str | Path | None = _opt(f"where --source d2l keeps hotdog.zip (default: ${CACHE_ENV} or "
                                        f"~/.cache/hotdog-finetune)")
    progress: bool = _opt("no progress bar (default: shown on a terminal)", False, flag="--no-progress",
                          action="store_false")
    zip_max_bytes: int = _opt("refuse a zip whose members add up to more, uncompressed (default: 64G)",
                              ZipLimits.max_bytes, type=parse_size, metavar="SIZE")
    zip_max_members: int = _opt("refuse a zip with more members (default: %(default)s)", ZipLimits.max_members,
                                type=positive_int, metavar="N")

    def fingerprint_options(self) -> dict:
        """The options that change the output, as recorded in the manifest (and hashed, minus `source`)."""
        # val_fraction is left out when unset, so outputs made before the option existed stay up to date.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata["fingerprint"]
                and not (f.name == "val_fraction" and self.val_fraction is None)}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        groups = {}
        for f in fields(cls):
            kw = dict(f.metadata["argparse"])
            flag = kw.pop("flag", "--" + f.name.replace("_", "-"))
            if "cli_default" in kw:
                kw["default"] = kw.pop("cli_default")()
            elif "action" not in kw:
                kw["default"] = f.default       # store_true / store_false: argparse's own default
            group = kw.pop("group", None)
            if group and group not in groups:
                groups[group] = parser.add_mutually_exclusive_group()
            target = groups[group] if group else parser
            target.add_argument(flag, dest=f.name, help=f.metadata["help"], **kw)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> PrepareOptions:
        return dataclasses.replace(cls(**{f.name: getattr(args, f.name) for f in fields(cls)}), **overrides)
