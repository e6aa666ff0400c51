"""Declared versions are tested versions (issue 19, item 1) and optional features are extras (issue 22, item 8).

- pyproject.toml's dependencies = requirements.txt (the default set), its [test] extra with the extras it names =
  requirements-test.txt: the Makefile installs the files, `pip install -e .[...]` the pyproject; they must agree.
- Every lower bound is a pin of requirements-floor.txt, the set `make test-floor` installs and tests; the torch,
  torchvision and accelerate floors are the reference GPU image's releases.
- The installed versions satisfy the requirements, and in the floor env (FLOOR_ENV=1) are exactly the floors.
- A missing optional package is one line naming its extra, through the real entry points.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tomllib
import zipfile
from email.parser import Parser
from importlib.metadata import version
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from packaging.version import Version

from conftest import REPO, TINY
from common import extras

PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
GPU_IMAGE = {"torch": "2.11.0", "torchvision": "0.26.0", "accelerate": "1.15.0"}
GPU_ONLY = {"nvidia-dali-cuda130"}    # [dali]: ~600 MB; make test runs its CPU-only mode, the floor smoke subset does not
SELF = PYPROJECT["name"]


def read(name: str) -> dict[str, Requirement]:
    """A requirements file's own lines (not those it includes with -r), by canonical name."""
    lines = (re.sub(r"#.*", "", line).strip() for line in (REPO / name).read_text().splitlines())
    reqs = [Requirement(line) for line in lines if line and not line.startswith("-")]
    return {canonicalize_name(r.name): r for r in reqs}


def by_name(specs: list[str]) -> dict[str, Requirement]:
    return {canonicalize_name(r.name): r for r in map(Requirement, specs)}


def extra(name: str) -> dict[str, Requirement]:
    """An extra of pyproject.toml, with the extras it names (hotdog-finetune[trackers,...]) expanded."""
    out = {}
    for req in by_name(PYPROJECT["optional-dependencies"][name]).values():
        if req.name == SELF:
            for inner in sorted(req.extras):
                out.update(extra(inner))
        else:
            out[canonicalize_name(req.name)] = req
    return out


def all_declared() -> dict[str, Requirement]:
    out = by_name(PYPROJECT["dependencies"])
    for name in PYPROJECT["optional-dependencies"]:
        out.update(extra(name))
    return out


def floor(req: Requirement) -> Version:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==")]
    assert len(lows) == 1, f"{req}: needs exactly one lower bound (>= or ==)"
    return lows[0]


def test_pyproject_and_the_requirement_files_declare_the_same():
    assert read("requirements.txt") == by_name(PYPROJECT["dependencies"])
    assert "-r requirements.txt" in (REPO / "requirements-test.txt").read_text()
    assert read("requirements-test.txt") == extra("test")
    assert set(PYPROJECT["optional-dependencies"]) >= {"trackers", "remote", "export", "fast-aug", "dali", "test"}
    # The default set holds no optional feature and no test tool.
    optional = {n for e in PYPROJECT["optional-dependencies"] for n in extra(e)}
    assert not optional & set(read("requirements.txt")), optional & set(read("requirements.txt"))


def test_every_lower_bound_is_a_pin_of_the_floor_file():
    pins = read("requirements-floor.txt")
    assert all(len(r.specifier) == 1 and next(iter(r.specifier)).operator == "==" for r in pins.values()), pins
    declared = {n: r for n, r in all_declared().items() if n not in GPU_ONLY}
    assert set(pins) == set(declared), set(pins) ^ set(declared)
    for name, req in declared.items():
        assert Version(next(iter(pins[name].specifier)).version) == floor(req), (name, str(req), str(pins[name]))
        assert pins[name].extras == req.extras, name         # moto[server] at its floor, with its extra


def test_floors_are_the_gpu_images_releases_and_the_caps_what_make_test_runs():
    reqs = by_name(PYPROJECT["dependencies"])
    for name, release in GPU_IMAGE.items():
        assert floor(reqs[name]) == Version(release), name
    assert floor(reqs["torch"]) >= Version("2.6"), "weights_only=True is bypassable before 2.6 (CVE-2025-32434)"
    assert floor(reqs["torch"]) >= Version("2.9"), "torchrun --signals-to-handle (launch/torchrun.sh) needs 2.9"
    assert "--signals-to-handle" in (REPO / "launch/torchrun.sh").read_text()
    assert reqs["torch"].specifier.contains("2.14.1") and not reqs["torch"].specifier.contains("2.14.2")
    assert reqs["torchvision"].specifier.contains("0.29.1") and not reqs["torchvision"].specifier.contains("0.29.2")


@pytest.mark.floor
def test_installed_versions_satisfy_the_requirements_and_in_the_floor_env_are_the_floors():
    """Every package this environment has of the declared ones satisfies its requirement; in the floor env
    (make test-floor sets FLOOR_ENV=1) every floor pin is installed, at exactly that version."""
    pins = read("requirements-floor.txt")
    checked = 0
    for name, req in all_declared().items():
        try:
            installed = Version(Version(version(name)).public)      # drop a local tag such as +cu130
        except Exception:  # noqa: BLE001 -- PackageNotFoundError: an extra this env does not have
            assert not (os.environ.get("FLOOR_ENV") and name in pins), f"{name} missing from the floor env"
            continue
        assert req.specifier.contains(installed), (name, str(installed), str(req))
        if os.environ.get("FLOOR_ENV") and name in pins:
            assert installed == floor(pins[name]), (name, str(installed), str(pins[name]))
        checked += 1
    assert checked >= len(PYPROJECT["dependencies"])


@pytest.mark.floor
def test_installed_torchrun_has_signals_to_handle():
    from torch.distributed import run
    assert "--signals-to-handle" in Path(run.__file__).read_text()


@pytest.mark.slow
def test_pyproject_builds_a_wheel_with_the_packages_and_the_extras(tmp_path):
    """What `pip install -e .` / `pip install .` build: the four packages (not the root scripts or tests), and
    metadata whose Requires-Dist carry the extras."""
    import shutil
    src = tmp_path / "src"                  # a copy: an in-tree build would leave build/ and *.egg-info in the clone
    skip_anywhere = shutil.ignore_patterns(".*", "__pycache__")
    shutil.copytree(REPO, src, ignore=lambda folder, names: set(skip_anywhere(folder, names)) | (
        {"runs", "data", "shards"} & set(names) if folder == str(REPO) else set()))     # finetune/data is code
    import importlib.util
    import setuptools
    # This env's setuptools builds wheels itself from 70.1 on (older ones need the `wheel` package); otherwise pip
    # builds in an isolated env, as `pip install -e .` does for users, with setuptools from the index.
    own = Version(setuptools.__version__) >= Version("70.1") or importlib.util.find_spec("wheel") is not None
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", *["--no-build-isolation"] * own,
                           "-w", str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    (wheel,) = (tmp_path / "dist").glob("hotdog_finetune-*.whl")
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        tops = {n.split("/")[0] for n in names if not n.split("/")[0].endswith(".dist-info")}
        meta = Parser().parsestr(z.read(next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))).decode())
    assert tops == {"common", "finetune", "data_prep", "experiments"}, tops
    assert "finetune/data/streams.py" in names, "the finetune.data subpackage is missing from the wheel"
    assert set(meta.get_all("Provides-Extra")) >= {"trackers", "remote", "export", "fast-aug", "dali", "test"}
    requires = meta.get_all("Requires-Dist")
    assert any(r.startswith("mlflow") and 'extra == "trackers"' in r for r in requires), requires
    assert any(r.startswith("torch") and "extra" not in r for r in requires), requires


def test_every_optional_import_names_an_extra_that_holds_its_package():
    for module, (dist, name) in extras.OPTIONAL.items():
        assert canonicalize_name(dist) in extra(name), (module, dist, name)


# --- a missing optional package: one line naming the extra, through the real entry points ---------------------

def one_line(capsys, prog: str, needle: str) -> str:
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"{prog}: error: ") and needle in err[0], err
    return err[0]


def test_train_py_log_with_mlflow_without_mlflow_is_one_line(shards, tmp_path, monkeypatch, capsys):
    import train
    monkeypatch.setitem(sys.modules, "mlflow", None)           # as if not installed
    run_dir = tmp_path / "run"
    assert train.main(["--data", str(shards), "--output-dir", str(run_dir), *TINY, "--log-with", "mlflow"]) == 2
    line = one_line(capsys, "train.py", "--log-with mlflow needs the optional package 'mlflow' (the 'trackers' extra)")
    assert "pip install -e '.[trackers]'" in line and "pip install mlflow" in line
    assert not run_dir.exists()


def test_train_py_opencv_augmentation_without_opencv_is_one_line(shards, tmp_path, monkeypatch, capsys):
    import train
    monkeypatch.setitem(sys.modules, "cv2", None)
    assert train.main(["--data", str(shards), "--output-dir", str(tmp_path / "run"), *TINY,
                       "--augment-with", "opencv"]) == 2
    one_line(capsys, "train.py", "--augment-with opencv needs the optional package 'opencv-python-headless' "
                                 "(the 'fast-aug' extra)")


def test_export_and_predict_without_the_onnx_runtimes_are_one_line(tmp_path, monkeypatch, capsys):
    import predict
    from finetune import export
    monkeypatch.setitem(sys.modules, "onnxscript", None)
    assert export.main([str(tmp_path), "--format", "onnx"]) == 2        # refused before reading the run
    one_line(capsys, "finetune.export", "--format onnx needs the optional package 'onnxscript' (the 'export' extra)")
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    model = tmp_path / "model.onnx"
    model.write_bytes(b"not read: the runtime is missing")
    image = tmp_path / "a.jpg"
    image.write_bytes(b"")
    assert predict.main(["--model", str(model), str(image)]) == 2
    one_line(capsys, "predict.py", "needs the optional package 'onnxruntime' (the 'export' extra)")


@pytest.mark.slow
def test_data_prep_to_s3_without_s3fs_is_one_line(tmp_path, monkeypatch, capsys):
    import data_prep
    from data_prep.synthetic import make_synthetic
    src = make_synthetic(tmp_path / "src", train_per_class=2, test_per_class=1, min_side=32, max_side=40, seed=0)
    monkeypatch.setitem(sys.modules, "s3fs", None)
    assert data_prep.main(["--source", str(src), "--out", "s3://bucket/shards", "--no-progress"]) == 2
    one_line(capsys, "data_prep", "s3://bucket/shards needs the optional package 's3fs' (the 'remote' extra)")


def test_an_import_error_inside_an_installed_package_keeps_its_own_message(tmp_path, monkeypatch):
    (tmp_path / "halfbroken").mkdir()
    (tmp_path / "halfbroken" / "__init__.py").write_text("import a_dependency_that_is_not_there\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setitem(extras.OPTIONAL, "halfbroken", ("halfbroken", "export"))
    with pytest.raises(ModuleNotFoundError, match="a_dependency_that_is_not_there"):
        extras.require("halfbroken", "--feature")
    monkeypatch.setitem(extras.OPTIONAL, "absent_pkg", ("absent-pkg", "remote"))
    with pytest.raises(extras.UsageError, match=r"--feature needs the optional package 'absent-pkg' \(the 'remote'"):
        extras.require("absent_pkg", "--feature")
    with pytest.raises(extras.UsageError, match="absent-pkg"):
        extras.check("absent_pkg", "--feature")


# --- the Makefile installs what changed, and CI runs both tiers ------------------------------------------------

def make_n(root: Path, target: str) -> str:
    proc = subprocess.run(["make", "-n", target], cwd=root, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.mark.slow
def test_makefile_reinstalls_when_a_requirement_file_changes(tmp_path):
    files = ["Makefile", "pyproject.toml", "requirements.txt", "requirements-test.txt", "requirements-floor.txt"]
    for name in files:
        (tmp_path / name).write_text((REPO / name).read_text())
    stamps = [".venv/.installed", ".venv/.installed-test", ".venv-floor/.installed"]
    for stamp in stamps:
        (tmp_path / stamp).parent.mkdir(exist_ok=True)
        (tmp_path / stamp).touch()

    def age(newer: str | None = None):
        for i, name in enumerate(files + stamps):          # each file older than the next: stamps are newest
            os.utime(tmp_path / name, (1_000_000 + i, 1_000_000 + i))
        if newer:
            os.utime(tmp_path / newer, (2_000_000, 2_000_000))

    installs = lambda out: re.findall(r"pip install -q -r (\S+)", out)    # noqa: E731
    age()
    assert installs(make_n(tmp_path, "test")) == [] and installs(make_n(tmp_path, "test-floor")) == []
    age("pyproject.toml")
    assert installs(make_n(tmp_path, "test")) == ["requirements.txt", "requirements-test.txt"]
    assert installs(make_n(tmp_path, "demo")) == ["requirements.txt"]            # the default set only
    age("requirements-test.txt")
    assert installs(make_n(tmp_path, "test")) == ["requirements-test.txt"]
    assert installs(make_n(tmp_path, "demo")) == []
    age("requirements-floor.txt")
    assert installs(make_n(tmp_path, "test-floor")) == ["requirements-floor.txt"]
    assert "FLOOR_ENV=1 .venv-floor/bin/python -m pytest -q -m floor" in make_n(tmp_path, "test-floor")


def test_ci_runs_the_suite_then_the_floor_tier():
    lines = [line.strip() for line in (REPO / ".ci/run").read_text().splitlines()]
    assert lines.index("make test") < lines.index("make test-floor")
