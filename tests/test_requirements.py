"""The dependency floors in requirements.txt are the releases the code needs and that are safe (issue 11, item 4),
and the installed torch/torchvision satisfy them (the floor CI installs is the one tested)."""

from __future__ import annotations

import re
from importlib.metadata import version
from pathlib import Path

from packaging.requirements import Requirement
from packaging.version import Version

REQUIREMENTS = Path(__file__).resolve().parents[1] / "requirements.txt"


def requirements() -> dict[str, Requirement]:
    lines = (re.sub(r"#.*", "", line).strip() for line in REQUIREMENTS.read_text().splitlines())
    return {(r := Requirement(line)).name: r for line in lines if line}


def floor(req: Requirement) -> Version:
    lows = [Version(s.version) for s in req.specifier if s.operator in (">=", "==", "~=")]
    assert lows, f"{req} has no lower bound"
    return max(lows)


def test_torch_floor_is_safe_and_has_what_the_launcher_needs():
    reqs = requirements()
    assert floor(reqs["torch"]) >= Version("2.6"), "weights_only=True is bypassable before 2.6 (CVE-2025-32434)"
    assert floor(reqs["torch"]) >= Version("2.9"), "torchrun --signals-to-handle (launch/torchrun.sh) needs 2.9"
    assert floor(reqs["torchvision"]) >= Version("0.24"), "torchvision 0.24 is the release that matches torch 2.9"
    assert "--signals-to-handle" in Path(REQUIREMENTS.parent / "launch/torchrun.sh").read_text()
    assert reqs["torch"].specifier.contains("2.14.1") and not reqs["torch"].specifier.contains("2.14.2")
    assert reqs["torchvision"].specifier.contains("0.29.1") and not reqs["torchvision"].specifier.contains("0.29.2")


def test_installed_versions_satisfy_the_requirements():
    for name in ("torch", "torchvision"):
        installed = Version(version(name)).public      # drop a local tag such as +cu130
        assert requirements()[name].specifier.contains(installed), (name, installed)


def test_installed_torchrun_has_signals_to_handle():
    from torch.distributed import run
    assert "--signals-to-handle" in Path(run.__file__).read_text()
