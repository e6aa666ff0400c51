"""Command line: ``python -m data_prep [prepare|verify|synthetic] ...``.

Without a subcommand, the arguments are those of ``prepare``. User errors print exactly one line,
``data_prep: error: ...``, on stderr and exit with status 2 (like argparse, minus the usage dump).
"""

from __future__ import annotations

import argparse
import contextlib
import signal
import sys
import threading

from common.errors import UsageError, cli_main

from . import shards, synthetic
from .manifest import read_manifest
from .dataclass_cli import positive_int
from .options import PrepareOptions
from .prepare import prepare_with

COMMANDS = ("prepare", "verify", "synthetic")


class _Parser(argparse.ArgumentParser):
    """argparse, but an error is one line (the usage block is available with --help)."""

    def error(self, message: str):
        raise UsageError(f"{message} (see python -m data_prep {self._command()}--help)")

    def _command(self) -> str:
        words = self.prog.split()[1:]
        return " ".join(words) + " " if words else ""


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="data_prep",
        description="Prepare the hotdog dataset as WebDataset shards (docs/data.md). "
        "Without a subcommand, the arguments are those of `prepare`.",
    )
    sub = parser.add_subparsers(dest="command", metavar="{prepare,verify,synthetic}", parser_class=_Parser)

    p = sub.add_parser("prepare", help="source images -> OUT/{train,test}-NNNNNN.tar + OUT/manifest.json",
                       description="Decode, check, shuffle and shard a hotdog-style image set.")
    PrepareOptions.add_arguments(p)

    v = sub.add_parser("verify", help="re-read every shard and check it against OUT/manifest.json",
                       description="Check shard sizes, sha256, sample and class counts and decodability.")
    v.add_argument("out", metavar="OUT", help="a folder written by prepare")

    s = sub.add_parser("synthetic", help="generate a learnable synthetic hotdog set in the d2l layout",
                       description="Seeded, photo-like two-class JPEGs: DIR/{train,test}/{hotdog,not-hotdog}/.")
    s.add_argument("--out", required=True, metavar="DIR", help="output folder")
    s.add_argument("--train-per-class", type=positive_int, default=synthetic.DEFAULT_TRAIN_PER_CLASS,
                   help="train images per class (default: %(default)s)")
    s.add_argument("--test-per-class", type=positive_int, default=synthetic.DEFAULT_TEST_PER_CLASS,
                   help="test images per class (default: %(default)s)")
    s.add_argument("--min-side", type=positive_int, default=synthetic.DEFAULT_MIN_SIDE,
                   help="smallest image side in pixels (default: %(default)s)")
    s.add_argument("--max-side", type=positive_int, default=synthetic.DEFAULT_MAX_SIDE,
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
        with _sigterm_unwinds():
            return cli_main("data_prep", lambda: _run(argv))
    except KeyboardInterrupt:
        print("data_prep: interrupted; no output was left behind", file=sys.stderr)
        return 130
    except Terminated:
        print("data_prep: stopped by SIGTERM; the decode workers were stopped and no output was left behind",
              file=sys.stderr)
        return 143


class Terminated(BaseException):
    """SIGTERM (Slurm's, `timeout`'s, `kill`'s), raised in the main thread so that the decode pool is shut
    down and the temporary output removed on the way out; by default SIGTERM ends the process at once."""


@contextlib.contextmanager
def _sigterm_unwinds():
    def terminated(signum, frame):
        raise Terminated()
    if threading.current_thread() is not threading.main_thread():
        yield                    # signal handlers can only be set from the main thread
        return
    previous = signal.signal(signal.SIGTERM, terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _run(argv: list[str]) -> int:
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as exc:  # --help: return its status instead of exiting the caller
        return int(exc.code or 0)
    return _COMMANDS[args.command](args)


def _prepare(args) -> int:
    prepare_with(PrepareOptions.from_args(args, progress=args.progress and sys.stderr.isatty()))
    return 0


def _verify(args) -> int:
    manifest = read_manifest(args.out)  # a missing/invalid manifest is a user error (exit 2)
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
