"""A small mutation tester: how much of the library's behaviour does the fast tier (make test-fast) check?

    python bench/mutants.py [-n 40] [--seed 0] [--timeout 600] [--list] [--files finetune/loop.py ...]

It finds mutation sites with `ast` in finetune/**/*.py, data_prep/*.py and train.py -- a comparison negated
(< to >=, == to !=, in to not in, is to is not), + to -, * to /, `and` to `or`, `not x` to x, True to False,
an integer constant n to n + 1, a `return VALUE` to `return None` -- and samples N of them with a fixed seed.
The repository (the files git lists, tracked and untracked-not-ignored) is copied once to a temporary folder;
each mutant is written there in turn (never in the working tree) and the fast tier runs on it with
`-x -q` and a timeout. A mutant is killed when the run fails (or times out); the report gives the kill rate and
lists the survivors as file:line: mutation. The unmutated copy must pass first (otherwise nothing is measured).
Only the standard library; the mutated text is the original with one expression or statement re-written
(ast.unparse), so line numbers stay put. Exit status: 0 (a report), 2 (the baseline failed).
"""

from __future__ import annotations

import argparse
import ast
import random
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TARGETS = ("finetune/**/*.py", "data_prep/*.py", "train.py")
FAST = ["-m", "not slow", "-x", "-q", "-p", "no:cacheprovider", "--no-header", "-o", "addopts="]

NEGATE = {ast.Lt: ast.GtE, ast.GtE: ast.Lt, ast.Gt: ast.LtE, ast.LtE: ast.Gt, ast.Eq: ast.NotEq,
          ast.NotEq: ast.Eq, ast.In: ast.NotIn, ast.NotIn: ast.In, ast.Is: ast.IsNot, ast.IsNot: ast.Is}
ARITH = {ast.Add: ast.Sub, ast.Sub: ast.Add, ast.Mult: ast.Div, ast.Div: ast.Mult}


@dataclass(frozen=True)
class Mutant:
    file: str    # relative to the repository
    line: int
    index: int   # the position of the node in ast.walk order (finds it again in a fresh parse)
    what: str

    def __str__(self):
        return f"{self.file}:{self.line}: {self.what}"


def _docstring_ids(tree: ast.AST) -> set[int]:
    ids = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)) and node.body:
            first = node.body[0]
            if isinstance(first, ast.Expr) and isinstance(first.value, ast.Constant):
                ids.add(id(first.value))
    return ids


def mutate(node: ast.AST) -> tuple[ast.AST, str] | None:
    """A mutated copy of `node` and a description, or None where `node` is no mutation site."""
    if isinstance(node, ast.Compare) and type(node.ops[0]) in NEGATE:
        new = NEGATE[type(node.ops[0])]()
        return ast.Compare(node.left, [new, *node.ops[1:]], node.comparators), \
            f"{ast.unparse(node)[:60]!r}: {type(node.ops[0]).__name__} -> {type(new).__name__}"
    if isinstance(node, ast.BinOp) and type(node.op) in ARITH:
        new = ARITH[type(node.op)]()
        return ast.BinOp(node.left, new, node.right), \
            f"{ast.unparse(node)!r}: {type(node.op).__name__} -> {type(new).__name__}"
    if isinstance(node, ast.BoolOp):
        new = ast.Or() if isinstance(node.op, ast.And) else ast.And()
        return ast.BoolOp(new, node.values), f"{ast.unparse(node)[:60]!r}: {type(node.op).__name__} -> {type(new).__name__}"
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, ast.Not):
        return node.operand, f"{ast.unparse(node)[:60]!r}: drop not"
    if isinstance(node, ast.Constant) and isinstance(node.value, bool):
        return ast.Constant(not node.value), f"{node.value} -> {not node.value}"
    if isinstance(node, ast.Constant) and type(node.value) is int:
        return ast.Constant(node.value + 1), f"{node.value} -> {node.value + 1}"
    if isinstance(node, ast.Return) and node.value is not None and \
            not (isinstance(node.value, ast.Constant) and node.value.value is None):
        return ast.Return(ast.Constant(None)), f"{ast.unparse(node)[:60]!r} -> return None"
    return None


def sites(root: Path, patterns=TARGETS) -> list[Mutant]:
    found = []
    files = sorted({p for pattern in patterns for p in root.glob(pattern)})
    for path in files:
        tree = ast.parse(path.read_text())
        skip = _docstring_ids(tree)
        for index, node in enumerate(ast.walk(tree)):
            if id(node) in skip or not hasattr(node, "lineno"):
                continue
            result = mutate(node)
            if result:
                found.append(Mutant(str(path.relative_to(root)), node.lineno, index, result[1]))
    return found


def mutated_source(text: str, mutant: Mutant) -> str | None:
    """`text` with the mutant's node re-written in place (None if the result does not compile)."""
    tree = ast.parse(text)
    node = next(n for i, n in enumerate(ast.walk(tree)) if i == mutant.index)
    new, _ = mutate(node)
    lines = text.splitlines(keepends=True)

    def offset(lineno, col):    # col offsets count UTF-8 bytes
        return sum(len(x) for x in lines[:lineno - 1]) + len(lines[lineno - 1].encode()[:col].decode())

    start, end = offset(node.lineno, node.col_offset), offset(node.end_lineno, node.end_col_offset)
    code = ast.unparse(new)
    if isinstance(node, ast.expr):
        code = f"({code})"
    out = text[:start] + code + text[end:]
    try:
        compile(out, mutant.file, "exec")
    except SyntaxError:
        return None
    return out


def copy_repo(dest: Path) -> Path:
    listed = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=REPO,
                            capture_output=True, check=True).stdout.decode().split("\0")
    for rel in filter(None, listed):
        src = REPO / rel
        if src.is_file():
            (dest / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dest / rel)
    return dest


def run_fast(copy: Path, timeout: float, extra: list[str]) -> tuple[str, float]:
    """'passed', 'failed' or 'timeout', and the seconds it took."""
    start = time.monotonic()
    try:
        proc = subprocess.run([sys.executable, "-m", "pytest", *FAST, *extra], cwd=copy, capture_output=True,
                              text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return "timeout", time.monotonic() - start
    return ("passed" if proc.returncode == 0 else "failed"), time.monotonic() - start


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("-n", type=int, default=40, help="how many mutants (default: %(default)s)")
    ap.add_argument("--seed", type=int, default=0, help="the sample's seed (default: %(default)s)")
    ap.add_argument("--timeout", type=float, default=600, help="seconds per fast-tier run (default: %(default)s)")
    ap.add_argument("--files", nargs="*", help="only these files (globs relative to the repository)")
    ap.add_argument("--list", action="store_true", help="print the sample and stop")
    ap.add_argument("pytest_args", nargs="*", help="after --: more pytest arguments (e.g. a test file)")
    args = ap.parse_args(argv)

    population = sites(REPO, args.files or TARGETS)
    sample = random.Random(args.seed).sample(population, min(args.n, len(population)))
    print(f"{len(population)} mutation sites; {len(sample)} sampled (seed {args.seed})", flush=True)
    if args.list:
        print("\n".join(map(str, sample)))
        return 0
    with tempfile.TemporaryDirectory(prefix="mutants-") as tmp:
        copy = copy_repo(Path(tmp) / "repo")
        status, took = run_fast(copy, args.timeout, args.pytest_args)
        print(f"baseline: {status} in {took:.0f}s", flush=True)
        if status != "passed":
            print("mutants: the fast tier fails without a mutant; fix that first", file=sys.stderr)
            return 2
        killed, survivors, invalid = 0, [], 0
        for i, mutant in enumerate(sample, 1):
            target = copy / mutant.file
            original = target.read_text()
            text = mutated_source(original, mutant)
            if text is None:
                invalid += 1
                print(f"[{i}/{len(sample)}] {mutant}  (does not compile: not counted)", flush=True)
                continue
            target.write_text(text)
            try:
                status, took = run_fast(copy, args.timeout, args.pytest_args)
            finally:
                target.write_text(original)
            if status == "passed":
                survivors.append(mutant)
            else:
                killed += 1
            print(f"[{i}/{len(sample)}] {'SURVIVED' if status == 'passed' else 'killed (' + status + ')'} "
                  f"{took:.0f}s  {mutant}", flush=True)
    total = killed + len(survivors)
    print(f"\nkill rate: {killed}/{total} = {killed / max(total, 1):.0%} (seed {args.seed}, {invalid} not compiling)")
    for mutant in survivors:
        print(f"  survived: {mutant}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
