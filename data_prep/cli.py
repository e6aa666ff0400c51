"""Command line: ``python -m data_prep [prepare|verify|synthetic] ...``.

Without a subcommand, the arguments are those of ``prepare``. User errors print exactly one line,
``data_prep: error: ...``, on stderr and exit with status 2 (like argparse, minus the usage dump).
"""

from __future__ import annotations

import argparse
import sys

from . import shards, synthetic
from .errors import DataPrepError
from .prepare import DEFAULT_QUALITY, default_workers, prepare
from .sources import CACHE_ENV, ZipLimits, parse_size

COMMANDS = ("prepare", "verify", "synthetic")


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (the usage block is available with --help)."""

    def error(self, message: str):
        raise DataPrepError(f"{message} (see python -m data_prep {self._command()}--help)")

    def _command(self) -> str:
        words = self.prog.split()[1:]
        return " ".join(words) + " " if words else ""


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an integer") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="data_prep",
        description="Prepare the hotdog dataset as WebDataset shards (docs/data.md). "
        "Without a subcommand, the arguments are those of `prepare`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{prepare,verify,synthetic}", parser_class=_Parser)

    p = sub.add_parser("prepare", help="source images -> OUT/{train,test}-NNNNNN.tar + OUT/manifest.json",
                       description="Decode, check, shuffle and shard a hotdog-style image set.")
    p.add_argument("--source", required=True,
                   help="'d2l' (download d2l's hotdog.zip into the cache), a .zip, or a folder: either "
                        "train/ and test/ with one subfolder per class, or class folders plus --test-fraction")
    p.add_argument("--out", required=True, help="output folder (created atomically; replaced on rebuild)")
    p.add_argument("--test-fraction", type=float, metavar="F",
                   help="for a folder of class folders: put this fraction of each class in test "
                        "(deterministic: a seeded hash of each file's path)")
    p.add_argument("--seed", type=int, default=0, help="shuffle/split seed (default: 0)")
    p.add_argument("--samples-per-shard", type=_positive_int, metavar="N",
                   help=f"samples per shard (default: train count // {shards.MIN_TRAIN_SHARDS}, so at least "
                        f"{shards.MIN_TRAIN_SHARDS} train shards, capped at {shards.MAX_SAMPLES_PER_SHARD})")
    size = p.add_mutually_exclusive_group()
    size.add_argument("--max-side", type=_positive_int, metavar="PX",
                      help="downsize so the longer side is at most PX (re-encodes; never upscales)")
    size.add_argument("--shorter-side", type=_positive_int, metavar="PX",
                      help="downsize so the shorter side is at most PX (re-encodes; never upscales)")
    p.add_argument("--quality", type=int, default=DEFAULT_QUALITY,
                   help=f"JPEG quality for re-encoded images: non-JPEG, non-RGB or resized (default: {DEFAULT_QUALITY})")
    p.add_argument("--workers", type=_positive_int, default=default_workers(),
                   help="decoding processes; the output does not depend on it (default: %(default)s)")
    p.add_argument("--strict", action="store_true",
                   help="fail on any corrupt, truncated, zero-byte or non-image file instead of skipping it")
    p.add_argument("--drop-duplicates", action="store_true",
                   help="keep one copy of byte-identical images (the test copy for train/test leaks)")
    p.add_argument("--force", action="store_true", help="rebuild even if OUT is up to date")
    p.add_argument("--cache-dir", help="where --source d2l keeps hotdog.zip "
                                       f"(default: ${CACHE_ENV} or ~/.cache/hotdog-finetune)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar (default: shown on a terminal)")
    p.add_argument("--zip-max-bytes", type=parse_size, default=ZipLimits.max_bytes, metavar="SIZE",
                   help="refuse a zip whose members add up to more, uncompressed (default: 64G)")
    p.add_argument("--zip-max-members", type=_positive_int, default=ZipLimits.max_members, metavar="N",
                   help="refuse a zip with more members (default: %(default)s)")

    v = sub.add_parser("verify", help="re-read every shard and check it against OUT/manifest.json",
                       description="Check shard sizes, sha256, sample and class counts and decodability.")
    v.add_argument("out", metavar="OUT", help="a folder written by prepare")

    s = sub.add_parser("synthetic", help="generate a learnable synthetic hotdog set in the d2l layout",
                       description="Seeded, photo-like two-class JPEGs: DIR/{train,test}/{hotdog,not-hotdog}/.")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--train-per-class", type=_positive_int, default=synthetic.DEFAULT_TRAIN_PER_CLASS,
                   help="train images per class (default: %(default)s)")
    s.add_argument("--test-per-class", type=_positive_int, default=synthetic.DEFAULT_TEST_PER_CLASS,
                   help="test images per class (default: %(default)s)")
    s.add_argument("--min-side", type=_positive_int, default=synthetic.DEFAULT_MIN_SIDE,
                   help="smallest image side in pixels (default: %(default)s)")
    s.add_argument("--max-side", type=_positive_int, default=synthetic.DEFAULT_MAX_SIDE,
                   help="largest image side in pixels (default: %(default)s)")
    s.add_argument("--seed", type=int, default=0, help="generator seed (default: 0)")
    s.add_argument("--force", action="store_true", help="replace DIR if it holds something else")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; return the exit status (0 ok, 1 verification failed, 2 user error)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] not in COMMANDS + ("-h", "--help"):
        argv.insert(0, "prepare")
    try:
        try:
            args = build_parser().parse_args(argv)
        except SystemExit as exc:  # --help: return its status instead of exiting the caller
            return int(exc.code or 0)
        return _COMMANDS[args.command](args)
    except DataPrepError as exc:
        print(f"data_prep: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("data_prep: interrupted; no output was left behind", file=sys.stderr)
        return 130


def _prepare(args) -> int:
    prepare(
        args.source, args.out, test_fraction=args.test_fraction, seed=args.seed,
        samples_per_shard=args.samples_per_shard, max_side=args.max_side, shorter_side=args.shorter_side,
        quality=args.quality, workers=args.workers, strict=args.strict, drop_duplicates=args.drop_duplicates,
        force=args.force, cache_dir=args.cache_dir, progress=not args.no_progress and sys.stderr.isatty(),
        zip_limits=ZipLimits(args.zip_max_bytes, args.zip_max_members),
    )
    return 0


def _verify(args) -> int:
    manifest = shards.load_manifest(args.out)  # a missing/invalid manifest is a user error (exit 2)
    problems = shards.verify(args.out)
    for problem in problems:
        print(f"data_prep: verify: {problem}", file=sys.stderr)
    if problems:
        print(f"data_prep: {args.out}: {len(problems)} problem(s); rebuild with prepare --force", file=sys.stderr)
        return 1
    counts = ", ".join(f"{s['num_samples']} {name} samples in {len(s['shards'])} shards"
                       for name, s in manifest["splits"].items())
    print(f"data_prep: {args.out}: OK ({counts})")
    return 0


def _synthetic(args) -> int:
    out = synthetic.make_synthetic(
        args.out, train_per_class=args.train_per_class, test_per_class=args.test_per_class,
        min_side=args.min_side, max_side=args.max_side, seed=args.seed, force=args.force,
    )
    n_train, n_test = 2 * args.train_per_class, 2 * args.test_per_class
    print(f"data_prep: {out}: synthetic set with {n_train} train and {n_test} test images")
    return 0


_COMMANDS = {"prepare": _prepare, "verify": _verify, "synthetic": _synthetic}
