"""The options of `prepare`, listed once. `PrepareOptions` is the Python API's argument set; its fields
generate the `prepare` command-line flags (help included) and the manifest's `options` / fingerprint
(the fields marked `fingerprint`: those that change the output), through data_prep/dataclass_cli.py like
finetune/config.py's Config."""

from __future__ import annotations

import argparse
import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path

from . import shards
from .dataclass_cli import add_fields, given_values, option, positive_int
from .sources import CACHE_ENV, ZipLimits, parse_size

DEFAULT_QUALITY = 95


def default_workers() -> int:
    return max(1, min(os.cpu_count() or 1, 8))


@dataclass(frozen=True)
class PrepareOptions:
    source: str = option("'d2l' (download d2l's hotdog.zip into the cache), a .zip, or a folder: either train/ and "
                         "test/ with one subfolder per class, or class folders plus --test-fraction",
                         fingerprint=True, required=True)
    out: str | Path = option("output folder (created atomically; replaced on rebuild), or an s3:// location (built "
                             "locally under TMPDIR, then uploaded, manifest last)", required=True)
    test_fraction: float | None = option("for a folder of class folders: put this fraction of each class in test "
                                         "(deterministic: a seeded hash of each file's path)",
                                         fingerprint=True, type=float, metavar="F")
    val_fraction: float | None = option("carve this fraction of each class of train out as a validation split "
                                        "(stratified; a seeded hash of each image's content, so adding photos "
                                        "moves few others; train.py chooses best.pt and stops early on it)",
                                        fingerprint=True, type=float, metavar="F")
    seed: int = option("shuffle/split seed (default: 0)", 0, fingerprint=True, type=int)
    # None until resolved: "auto" is part of the fingerprint
    samples_per_shard: int | None = option(
        f"samples per shard (default: train count // {shards.MIN_TRAIN_SHARDS}, so at least "
        f"{shards.MIN_TRAIN_SHARDS} train shards, capped at {shards.MAX_SAMPLES_PER_SHARD})",
        fingerprint=True, type=positive_int, metavar="N")
    min_test_shards: int | None = option(
        f"make test shards small enough for at least N test shards (default: {shards.MIN_TEST_SHARDS}, or the "
        f"--samples-per-shard size when that is given); evaluation reads whole shards per rank when there are "
        f"at least as many as ranks", fingerprint=True, type=positive_int, metavar="N")
    max_side: int | None = option("downsize so the longer side is at most PX (re-encodes; never upscales)",
                                  fingerprint=True, type=positive_int, metavar="PX", exclusive="size")
    shorter_side: int | None = option("downsize so the shorter side is at most PX (re-encodes; never upscales)",
                                      fingerprint=True, type=positive_int, metavar="PX", exclusive="size")
    quality: int = option(f"JPEG quality for re-encoded images: non-JPEG, non-RGB or resized "
                          f"(default: {DEFAULT_QUALITY})", DEFAULT_QUALITY, fingerprint=True, type=int)
    workers: int | None = option("decoding processes; the output does not depend on it (default: %(default)s)",
                                 type=positive_int, cli_default=default_workers)
    strict: bool = option("fail on any corrupt, truncated, zero-byte or non-image file instead of skipping it",
                          False, fingerprint=True, action="store_true")
    drop_duplicates: bool = option("keep one copy of byte-identical images (the test copy for train/test leaks)",
                                   False, fingerprint=True, action="store_true")
    force: bool = option("rebuild even if OUT is up to date", False, action="store_true")
    cache_dir: str | Path | None = option(f"where --source d2l keeps hotdog.zip (default: ${CACHE_ENV} or "
                                          f"~/.cache/hotdog-finetune)")
    progress: bool = option("no progress bar (default: shown on a terminal)", False, flag="--no-progress",
                            action="store_false")
    zip_max_bytes: int = option("refuse a zip whose members add up to more, uncompressed (default: 64G)",
                                ZipLimits.max_bytes, type=parse_size, metavar="SIZE")
    zip_max_members: int = option("refuse a zip with more members (default: %(default)s)", ZipLimits.max_members,
                                  type=positive_int, metavar="N")

    def fingerprint_options(self) -> dict:
        """The options that change the output, as recorded in the manifest (and hashed, minus `source`)."""
        # val_fraction is left out when unset, so outputs made before the option existed stay up to date.
        return {f.name: getattr(self, f.name) for f in fields(self) if f.metadata.get("fingerprint")
                and not (f.name == "val_fraction" and self.val_fraction is None)}

    @classmethod
    def add_arguments(cls, parser: argparse.ArgumentParser) -> None:
        add_fields(parser, cls)

    @classmethod
    def from_args(cls, args: argparse.Namespace, **overrides) -> PrepareOptions:
        return dataclasses.replace(cls(**given_values(cls, args)), **overrides)
