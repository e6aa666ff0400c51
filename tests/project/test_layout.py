"""The layout rules of issue #21's "Done when", checked mechanically (fast tier: files and `ast` only).

Each rule is a checker function over a repository root that returns its problems (one line each), tested
twice: on small fixture trees in tmp_path (it finds a planted problem, and finds none in a good tree), and on
this repository. The rules:

- layering (docs/architecture.md, "Who may import what"): data_prep imports no finetune and no entry point;
  finetune imports no entry point (train, predict, experiments, bench); a bottom package `common/`, where
  there is one, imports neither data_prep nor finetune; train.py and predict.py import neither each other nor
  experiments; experiments and bench import no entry point module (they run train.py as a process).
  Every import counts, also one inside a function.
- no import cycle among the project's modules (imports run at import time: module level, not inside a
  function, not under `if TYPE_CHECKING:`).
- size: no module of finetune/ (recursively) over MAX_MODULE_LINES lines; no function in train.py or finetune/
  over MAX_FUNCTION_LINES lines or MAX_PARAMS parameters (self/cls not counted; *args, **kwargs counted).
- no test hook in production code (train.py, finetune/, data_prep/): no `FINETUNE_TEST_`, no `simulated_delay`.
- docs/architecture.md names every module of finetune/ and data_prep/ (__init__/__main__ aside) and no module
  that does not exist. A module is named by its path (`finetune/loop.py`, `finetune/data/` for a package) or
  its dotted name (`finetune.loop`, `data_prep.extras.require`: the part after the last module must be a
  name that module defines), anywhere in the text, backticked or not.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]

MAX_MODULE_LINES = 350
MAX_FUNCTION_LINES = 45
MAX_PARAMS = 7
ENTRY_POINTS = ("train", "predict", "experiments", "bench")
TEST_HOOKS = ("FINETUNE_TEST_", "simulated_delay")
PACKAGES = ("finetune", "data_prep", "experiments", "bench", "common")

# (importer prefix, forbidden prefixes): a module named P or P.* must not import any forbidden F or F.*.
FORBIDDEN = [
    ("data_prep", ("finetune",) + ENTRY_POINTS),
    ("finetune", ENTRY_POINTS),
    ("common", ("data_prep", "finetune") + ENTRY_POINTS),
    ("train", ("predict", "experiments", "bench")),
    ("predict", ("train", "experiments", "bench")),
    ("experiments", ("train", "predict", "bench")),
    ("bench", ("train", "predict", "experiments")),
]


# --- the project's modules and their imports ---------------------------------------------------------------

def project_modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for train.py, predict.py and every .py of the project's packages
    (a package's __init__.py is the package itself)."""
    mods = {}
    for top in ("train.py", "predict.py"):
        if (root / top).is_file():
            mods[top[:-3]] = root / top
    for pkg in PACKAGES:
        for path in sorted((root / pkg).rglob("*.py")) if (root / pkg).is_dir() else ():
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            mods[".".join(parts)] = path
    return mods


def _is_package(path: Path) -> bool:
    return path.name == "__init__.py"


def _type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or \
           (isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _import_nodes(tree: ast.Module, module_level_only: bool):
    if not module_level_only:
        yield from (n for n in ast.walk(tree) if isinstance(n, (ast.Import, ast.ImportFrom)))
        return
    stack = list(tree.body)
    while stack:
        node = stack.pop()
        if isinstance(node, (ast.Import, ast.ImportFrom)):
            yield node
        elif isinstance(node, ast.If) and not _type_checking(node):
            stack += node.body + node.orelse
        elif isinstance(node, ast.Try):
            stack += node.body + node.orelse + node.finalbody + [s for h in node.handlers for s in h.body]
        elif isinstance(node, (ast.With,)):
            stack += node.body


def imports_of(name: str, path: Path, mods: dict[str, Path], module_level_only: bool = False) -> set[str]:
    """The project modules `name` (at `path`) imports: `import a.b` -> a.b; `from a import b` -> a.b when a.b
    is a module, else a; relative imports resolved against the module's package."""
    found = set()
    package = name if _is_package(path) else name.rpartition(".")[0]
    for node in _import_nodes(ast.parse(path.read_text()), module_level_only):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        else:
            base = node.module or ""
            if node.level:
                parts = package.split(".") if package else []
                parts = parts[:len(parts) - (node.level - 1)] if node.level > 1 else parts
                base = ".".join(parts + ([node.module] if node.module else []))
            targets = [f"{base}.{alias.name}".lstrip(".") if f"{base}.{alias.name}".lstrip(".") in mods else base
                       for alias in node.names]
        for target in targets:
            while target and target not in mods:    # `import finetune.data.stream` where only finetune.data is
                target = target.rpartition(".")[0]
            if target and target != name:
                found.add(target)
    return found


def _under(name: str, prefix: str) -> bool:
    return name == prefix or name.startswith(prefix + ".")


def layering_problems(root: Path) -> list[str]:
    mods = project_modules(root)
    problems = []
    for name, path in sorted(mods.items()):
        for importer, forbidden in FORBIDDEN:
            if not _under(name, importer):
                continue
            for target in sorted(imports_of(name, path, mods)):
                if any(_under(target, f) for f in forbidden):
                    problems.append(f"{path.relative_to(root)}: {name} imports {target}")
    return problems


def import_cycles(root: Path) -> list[str]:
    """Each cycle of module-level imports once, as 'a -> b -> a' (the strongly connected components of more
    than one module, or a module importing itself)."""
    mods = project_modules(root)
    graph = {name: imports_of(name, path, mods, module_level_only=True) for name, path in mods.items()}
    index, low, on_stack, stack, sccs = {}, {}, set(), [], []

    def visit(v):    # Tarjan; the graph is small, recursion is fine
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            scc = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                scc.append(w)
                if w == v:
                    break
            if len(scc) > 1:
                sccs.append(sorted(scc))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return [" <-> ".join(scc) for scc in sccs]


# --- sizes and test hooks ----------------------------------------------------------------------------------

def _library_files(root: Path) -> list[Path]:
    return [p for p in [root / "train.py"] if p.is_file()] + sorted((root / "finetune").rglob("*.py"))


def long_modules(root: Path, limit: int = MAX_MODULE_LINES) -> list[str]:
    return [f"{p.relative_to(root)}: {n} lines (> {limit})"
            for p in sorted((root / "finetune").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > limit]


def param_count(fn: ast.FunctionDef | ast.AsyncFunctionDef) -> int:
    a = fn.args
    positional = a.posonlyargs + a.args
    n = len(positional) + len(a.kwonlyargs) + (a.vararg is not None) + (a.kwarg is not None)
    if positional and positional[0].arg in ("self", "cls"):
        n -= 1
    return n


def big_functions(root: Path, max_lines: int = MAX_FUNCTION_LINES, max_params: int = MAX_PARAMS) -> list[str]:
    problems = []
    for path in _library_files(root):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines, params = node.end_lineno - node.lineno + 1, param_count(node)
                if lines > max_lines or params > max_params:
                    problems.append(f"{path.relative_to(root)}:{node.lineno} {node.name}: {lines} lines, "
                                    f"{params} parameters (limits {max_lines}, {max_params})")
    return problems


def test_hooks_in_production(root: Path) -> list[str]:
    files = [p for p in [root / "train.py"] if p.is_file()]
    files += sorted((root / "finetune").rglob("*.py")) + sorted((root / "data_prep").rglob("*.py"))
    return [f"{p.relative_to(root)}:{i}: {hook}" for p in files
            for i, line in enumerate(p.read_text().splitlines(), 1) for hook in TEST_HOOKS if hook in line]


test_hooks_in_production.__test__ = False    # a checker, not a test


# --- docs/architecture.md names the modules ---------------------------------------------------------------

NAME = re.compile(r"(?<![\w./-])((?:finetune|data_prep)(?:[./][A-Za-z_]\w*)+/?)")


def _top_level_names(path: Path) -> set[str]:
    names = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names |= {(a.asname or a.name).split(".")[0] for a in node.names}
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                names |= {n.id for n in ast.walk(target) if isinstance(n, ast.Name)}
    return names


def resolve_doc_name(root: Path, token: str, mods: dict[str, Path]) -> str | None:
    """The module a doc token names (None: it names nothing that exists)."""
    if "/" in token:
        rel = token.rstrip("/")
        if rel.endswith(".py"):
            name = rel[:-3].replace("/", ".")
            return name if name in mods and not _is_package(mods[name]) else None
        name = rel.replace("/", ".")
        return name if name in mods else None    # a package (`finetune/data/`) or a module without .py
    parts = token.split(".")
    name = parts[0]
    for i, part in enumerate(parts[1:], 1):
        if f"{name}.{part}" in mods:
            name = f"{name}.{part}"
            continue
        # the first part that is not a module must be a name the module defines (a function, a class...)
        return name if part in _top_level_names(mods[name]) else None
    return name


def doc_problems(root: Path, doc: str = "docs/architecture.md") -> list[str]:
    mods = project_modules(root)
    text = (root / doc).read_text()
    named, problems = set(), []
    for token in sorted(set(NAME.findall(text))):
        module = resolve_doc_name(root, token, mods)
        if module is None:
            problems.append(f"{doc} names `{token}`, which does not exist")
        else:
            named.add(module)
    for name, path in sorted(mods.items()):
        if (name.startswith(("finetune.", "data_prep.")) and path.name != "__main__.py"
                and not _is_package(path) and name not in named):
            problems.append(f"{doc} does not name {path.relative_to(root)}")
    return problems


# --- the checkers on fixture trees -------------------------------------------------------------------------

def make_tree(root: Path, files: dict[str, str]) -> Path:
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


GOOD = {
    "train.py": "from finetune import loop\nfrom finetune.data.stream import Stream\n",
    "predict.py": "import finetune.model\n",
    "finetune/__init__.py": "from data_prep.errors import UsageError\n",
    "finetune/loop.py": "from . import model\nfrom .data import stream\n\ndef step(a, b, c, d, e, f, g):\n    return a\n",
    "finetune/model.py": "import torch\n\nclass Net:\n    def f(self, a, b, c, d, e, f, g):\n        return a\n",
    "finetune/data/__init__.py": "from .stream import Stream\n",
    "finetune/data/stream.py": "from data_prep.manifest import load\n\nclass Stream:\n    pass\n",
    "data_prep/__init__.py": "",
    "data_prep/errors.py": "class UsageError(Exception):\n    pass\n",
    "data_prep/manifest.py": "from .errors import UsageError\n\ndef load():\n    return 1\n",
    "common/__init__.py": "",
    "common/util.py": "import os\n",
    "experiments/plan.py": "from finetune.config import x\n",
    "bench/x.py": "from _common import table\nfrom finetune import loop\n",
    "docs/architecture.md": ("`finetune/loop.py` and finetune.model.Net, the `finetune/data/` package "
                             "(finetune.data.stream.Stream); data_prep.errors.UsageError, `data_prep/manifest.py` "
                             "(data_prep.manifest.load).\n"),
}


def test_checkers_find_nothing_in_a_good_tree(tmp_path):
    root = make_tree(tmp_path, GOOD)
    assert layering_problems(root) == []
    assert import_cycles(root) == []
    assert long_modules(root) == []
    assert big_functions(root) == []
    assert test_hooks_in_production(root) == []
    assert doc_problems(root) == []


@pytest.mark.parametrize("rel, text, needle", [
    ("data_prep/shards.py", "def f():\n    from finetune.loop import step\n", "data_prep.shards imports finetune.loop"),
    ("data_prep/shards.py", "import train\n", "data_prep.shards imports train"),
    ("finetune/loop.py", "from experiments import plan\n", "finetune.loop imports experiments"),
    ("finetune/data/stream.py", "import bench.x\n", "finetune.data.stream imports bench.x"),
    ("finetune/data/stream.py", "from ... import predict\n", "finetune.data.stream imports predict"),
    ("common/util.py", "from data_prep import errors\n", "common.util imports data_prep.errors"),
    ("common/util.py", "from finetune import UsageError\n", "common.util imports finetune"),
    ("train.py", "import predict\n", "train imports predict"),
    ("experiments/plan.py", "from train import main\n", "experiments.plan imports train"),
])
def test_layering_finds_a_forbidden_import(tmp_path, rel, text, needle):
    root = make_tree(tmp_path, {**GOOD, rel: text})
    assert any(needle in p for p in layering_problems(root)), layering_problems(root)


def test_import_cycles_found_at_module_level_only(tmp_path):
    cyclic = {**GOOD, "finetune/model.py": "from .loop import step\n"}
    assert import_cycles(make_tree(tmp_path / "a", cyclic)) == ["finetune.loop <-> finetune.model"]
    three = {**GOOD, "finetune/data/stream.py": "try:\n    import finetune.loop\nexcept ImportError:\n    pass\n"}
    assert import_cycles(make_tree(tmp_path / "b", three)) == \
        ["finetune.data.stream <-> finetune.loop"]
    lazy = {**GOOD, "finetune/model.py": "def f():\n    from .loop import step\n",
            "finetune/data/stream.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import finetune.loop\n"}
    assert import_cycles(make_tree(tmp_path / "c", lazy)) == []


def test_size_limits(tmp_path):
    body = "".join(f"    x{i} = {i}\n" for i in range(44))
    files = {**GOOD, "finetune/data/big.py": "x = 1\n" * 351,
             "finetune/data/stream.py": f"def ok():\n{body}\ndef long():\n{body}    return 1\n"
                                        "def wide(a, b, c, d, e, f, g, h):\n    pass\n"
                                        "def star(a, b, c, d, e, f, *args, **kw):\n    pass\n",
             "train.py": "class A:\n    def m(self, a, b, c, d, e, f, g, *, h):\n        pass\n"}
    root = make_tree(tmp_path, files)
    assert long_modules(root) == ["finetune/data/big.py: 351 lines (> 350)"]
    found = {p.split(" ")[1].rstrip(":") for p in big_functions(root)}
    assert found == {"long", "wide", "star", "m"}, big_functions(root)
    assert long_modules(make_tree(tmp_path / "ok", {**GOOD, "finetune/x.py": "x = 1\n" * 350})) == []


def test_test_hooks_found(tmp_path):
    root = make_tree(tmp_path, {**GOOD, "data_prep/x.py": "import os\nos.environ.get('FINETUNE_TEST_SLOW')\n",
                                "finetune/data/stream.py": "from finetune import simulated_delay\n"})
    assert test_hooks_in_production(root) == ["finetune/data/stream.py:1: simulated_delay",
                                              "data_prep/x.py:2: FINETUNE_TEST_"]


@pytest.mark.parametrize("doc, expected", [
    (GOOD["docs/architecture.md"] + "Also `finetune/data.py`.\n", "names `finetune/data.py`, which does not exist"),
    (GOOD["docs/architecture.md"] + "Also finetune.dali.\n", "names `finetune.dali`, which does not exist"),
    (GOOD["docs/architecture.md"] + "And data_prep/gone.py.\n", "names `data_prep/gone.py`, which does not exist"),
    (GOOD["docs/architecture.md"] + "And finetune.model.Gone.\n", "names `finetune.model.Gone`, which does not"),
    (GOOD["docs/architecture.md"].replace("finetune.model.Net", "the model"), "does not name finetune/model.py"),
    (GOOD["docs/architecture.md"].replace("(finetune.data.stream.Stream)", "finetune.data.Stream"),
     "does not name finetune/data/stream.py"),
])
def test_doc_problems_found(tmp_path, doc, expected):
    root = make_tree(tmp_path, {**GOOD, "docs/architecture.md": doc})
    problems = doc_problems(root)
    assert len(problems) == 1 and expected in problems[0], problems


# --- this repository ---------------------------------------------------------------------------------------

def test_layering_holds():
    assert layering_problems(REPO) == []


def test_no_import_cycle():
    assert import_cycles(REPO) == []


def test_no_module_over_the_line_limit():
    assert long_modules(REPO) == []


def test_no_function_over_the_limits():
    assert big_functions(REPO) == []


def test_no_test_hooks_in_production_code():
    assert test_hooks_in_production(REPO) == []


def test_architecture_doc_names_every_module():
    assert doc_problems(REPO) == []
