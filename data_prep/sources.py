"""Where the images come from: the d2l download, a zip, or a folder; and which file is which sample.

Three kinds of `--source`:

* ``d2l``: download d2l's hotdog.zip into a cache directory (checked against its published sha1),
  then handle it as a zip.
* ``FILE.zip``: extracted (refusing zip-slip members) into a scratch folder; a single top-level
  folder inside the zip (d2l's ``hotdog/``) is looked through.
* ``DIR``: either the d2l layout ``train/`` + ``test/``, each with one folder per class, or a
  folder of class folders that `--test-fraction` splits deterministically.

`scan` turns a layout root into a sorted list of `SourceFile`s with their split, label and
WebDataset key, so everything downstream is independent of filesystem listing order.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import stat
import sys
import urllib.request
import zipfile
import zlib
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath, PureWindowsPath

from tqdm import tqdm

from common.errors import UsageError
from common.fsutil import new_temp_file

from .manifest import file_digests

D2L_URL = "http://d2l-data.s3-accelerate.amazonaws.com/hotdog.zip"
D2L_SHA1 = "fba480ffa8aa7e0febbb511d181409f899b9baa5"
# Tests point the download at an unreachable or local URL; not a user-facing option.
URL_ENV = "HOTDOG_URL"
CACHE_ENV = "HOTDOG_CACHE"
DOWNLOAD_TIMEOUT_S = 30
SPLITS = ("train", "test")


@dataclass(frozen=True)
class SourceFile:
    """One input file destined for one sample."""

    split: str  # "train" or "test"
    label: int  # index into the sorted class names
    rel: str  # POSIX path relative to the layout root, as reported in the manifest
    key: str  # WebDataset __key__ (see docs/manifest.md)
    path: Path


@dataclass
class Layout:
    classes: list[str]
    files: list[SourceFile]
    # Files found where no sample can come from (e.g. loose files next to the class folders).
    skipped: list[dict] = field(default_factory=list)


# --------------------------------------------------------------------------- resolving --source


def default_cache_dir() -> Path:
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "hotdog-finetune")


def resolve(source: str, cache_dir: str | Path | None = None, progress: bool = False) -> tuple[str, Path]:
    """Return ``("zip", path)`` or ``("dir", path)`` for a `--source` value, downloading d2l if asked."""
    if source == "d2l":
        return "zip", fetch_d2l(Path(cache_dir) if cache_dir else default_cache_dir(), progress=progress)
    path = Path(source).expanduser()
    if not path.exists():
        raise UsageError(f"--source {source}: no such file or directory; pass d2l, a .zip or a folder")
    if path.is_dir():
        return "dir", path
    if zipfile.is_zipfile(path):
        return "zip", path
    raise UsageError(f"--source {source}: not a folder and not a valid zip file")


def fetch_d2l(cache_dir: Path, *, progress: bool = False) -> Path:
    """Return the path of a verified hotdog.zip in `cache_dir`, downloading it if needed.

    The download streams to a fresh ``.hotdog.zip.tmp-XXXXXXXX`` next to it and is renamed only after the sha1 matches, so an
    interrupted or corrupt download never passes for the real file.
    """
    url = os.environ.get(URL_ENV) or D2L_URL
    target = cache_dir / "hotdog.zip"
    if target.exists():
        if file_digests(target, "sha1")["sha1"] == D2L_SHA1:
            return target
        target.unlink()  # a stale or damaged copy: fetch it again
    cache_dir.mkdir(parents=True, exist_ok=True)
    part = new_temp_file(target)    # exclusive, unpredictable: never a planted link
    by_hand = f"fetch {D2L_URL} by hand and pass --source /path/to/hotdog.zip"
    try:
        with urllib.request.urlopen(url, timeout=DOWNLOAD_TIMEOUT_S) as response, open(part, "wb") as f:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc="hotdog.zip", file=sys.stderr,
                      disable=not progress) as bar:
                while chunk := response.read(1 << 20):
                    f.write(chunk)
                    bar.update(len(chunk))
    except (OSError, ValueError) as exc:  # URLError, timeouts and refused connections are OSErrors
        part.unlink(missing_ok=True)
        reason = getattr(exc, "reason", None) or exc
        raise UsageError(f"could not download hotdog.zip ({reason}); {by_hand}") from None
    sha1 = file_digests(part, "sha1")["sha1"]
    if sha1 != D2L_SHA1:
        part.unlink()
        raise UsageError(f"downloaded hotdog.zip has sha1 {sha1}, expected {D2L_SHA1}; {by_hand}")
    part.rename(target)
    return target


def fingerprint(kind: str, path: Path) -> str:
    """A cheap identity of the input, for skipping a re-run whose output is already there.

    A zip is hashed whole (it is one file, and the hash survives copies); a folder is identified
    by every file's relative path, size and mtime, which changes whenever a file is edited,
    added, removed or renamed, without reading the images.
    """
    if kind == "zip":
        return "zip-sha256:" + file_digests(path, "sha256")["sha256"]
    listing = sorted(
        (p.relative_to(path).as_posix(), p.stat().st_size, p.stat().st_mtime_ns)
        for p in path.rglob("*")
        if p.is_file()
    )
    return "dir-sha256:" + hashlib.sha256(json.dumps(listing).encode()).hexdigest()


# --------------------------------------------------------------------------- zip extraction


@dataclass(frozen=True)
class ZipLimits:
    """Caps checked against a zip's central directory before anything is extracted (zip bombs).

    The defaults are far above any image set this project handles (d2l's hotdog.zip: about 2,500
    members, 0.26 GB) and far below what fills a disk; raise them with --zip-max-bytes/--zip-max-members.
    """

    max_bytes: int = 64 << 30  # total uncompressed size: 64 GiB
    max_members: int = 1_000_000


def parse_size(text: str) -> int:
    """``"64G"`` -> 68719476736: a byte count with an optional binary K, M, G or T suffix (argparse type)."""
    import argparse
    units = {"": 1, "K": 1 << 10, "M": 1 << 20, "G": 1 << 30, "T": 1 << 40}
    number, unit = text.strip().upper().rstrip("B").rstrip("I"), ""
    if number and number[-1] in units:
        number, unit = number[:-1], number[-1]
    try:
        value = int(float(number) * units[unit])
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a size such as 500M or 64G") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text} must be at least 1 byte")
    return value


def safe_extract(zip_path: Path, dest: Path, limits: ZipLimits | None = None) -> Path:
    """Extract `zip_path` into `dest`, refusing the whole archive if any member is unsafe.

    Unsafe: an absolute path, a symbolic link, or a path that resolves outside `dest` ("zip-slip",
    e.g. ``../../etc/cron.d/x``); an encrypted member; a name that is both a file and a folder (or
    twice a file); more members or more uncompressed bytes than `limits` (zip bombs). Everything is
    checked before the first byte is written. zipfile stops reading a member at its declared size,
    so the size check cannot be dodged by a member that lies about it (its CRC check then fails).
    """
    limits = limits or ZipLimits()
    dest.mkdir(parents=True, exist_ok=True)
    root = dest.resolve()
    try:
        with zipfile.ZipFile(zip_path) as zf:
            members = zf.infolist()
            _check_zip(zip_path, members, root, limits)
            for info in members:
                target = root / info.filename
                if info.is_dir():
                    target.mkdir(parents=True, exist_ok=True)
                    continue
                target.parent.mkdir(parents=True, exist_ok=True)
                with zf.open(info) as src, open(target, "wb") as dst:
                    shutil.copyfileobj(src, dst)
    except (zipfile.BadZipFile, zipfile.LargeZipFile, EOFError, zlib.error, NotImplementedError, RuntimeError) as exc:
        raise UsageError(f"{zip_path}: corrupt or unsupported zip file ({exc}); get a clean copy") from None
    except OSError as exc:
        raise UsageError(f"{zip_path}: cannot extract ({exc.strerror or exc}: {exc.filename}); "
                            "check the free space and the archive") from None
    return dest


def _check_zip(zip_path: Path, members: list[zipfile.ZipInfo], root: Path, limits: ZipLimits) -> None:
    """Refuse the archive (one UsageError) for any of the reasons listed in `safe_extract`."""
    def refuse(what: str) -> UsageError:
        return UsageError(f"{zip_path}: {what}")

    if len(members) > limits.max_members:
        raise refuse(f"{len(members)} members, over the limit of {limits.max_members} (a zip bomb?); "
                     "pass --zip-max-members N to allow more")
    total = sum(info.file_size for info in members)
    if total > limits.max_bytes:
        raise refuse(f"{total} bytes uncompressed, over the limit of {limits.max_bytes} (a zip bomb?); "
                     "pass --zip-max-bytes SIZE (e.g. 200G) to allow more")
    files: set[str] = set()
    folders: set[str] = set()
    for info in members:
        why = _unsafe_member(info, root)
        if why:
            raise refuse(f"refusing to extract member {info.filename!r}: {why} (zip-slip); "
                         "the archive is unsafe, get a clean copy")
        if info.flag_bits & 0x1:
            raise refuse(f"member {info.filename!r} is encrypted; decrypt the archive (or unzip it) "
                         "and pass the folder as --source")
        name = (root / info.filename).relative_to(root).as_posix()
        parents = [p.as_posix() for p in PurePosixPath(name).parents if p.as_posix() != "."]
        clash = (name in files or (not info.is_dir() and name in folders)
                 or any(p in files for p in parents))
        if clash:
            raise refuse(f"member {info.filename!r} clashes with another member of the same name "
                         "(a file and a folder, or two files); the archive is malformed, get a clean copy")
        (folders if info.is_dir() else files).add(name)
        folders.update(parents)


def _unsafe_member(info: zipfile.ZipInfo, root: Path) -> str | None:
    name = info.filename
    if stat.S_ISLNK(info.external_attr >> 16):
        return "it is a symbolic link"
    if name.startswith(("/", "\\")) or PureWindowsPath(name).drive:
        return "absolute path"
    if not (root / name).resolve().is_relative_to(root):
        return "it would land outside the target directory"
    return None


def find_layout_root(root: Path) -> Path:
    """Look through single wrapper folders, as in d2l's zip (``hotdog/train/...``)."""
    for _ in range(3):
        if all((root / s).is_dir() for s in SPLITS):
            return root
        entries = _visible(root.iterdir())
        if len(entries) == 1 and entries[0].is_dir():
            root = entries[0]
        else:
            break
    return root


# --------------------------------------------------------------------------- scanning a layout


def _visible(paths) -> list[Path]:
    """Drop hidden entries and macOS zip debris (``.DS_Store``, ``__MACOSX``), sorted by name."""
    return sorted((p for p in paths if not p.name.startswith(".") and p.name != "__MACOSX"), key=lambda p: p.name)


def _class_dirs(folder: Path) -> list[Path]:
    return [p for p in _visible(folder.iterdir()) if p.is_dir()]


def _files_under(folder: Path, root: Path) -> tuple[list[Path], list[dict]]:
    """Regular files below the class folder `folder` (any depth), hidden ones left out, in sorted order;
    and the entries skipped, each with its reason (for the manifest's `skipped`).

    Symbolic links to files and folders are followed only while they stay inside `folder` (so a link
    cannot give images another class's label) and do not point back at a folder above them (a loop).
    Links that leave the source (`root`) are never followed either: like rsync --safe-links, and
    unlike a plain os.walk(followlinks=True), which multiplied and mislabelled data. Only regular
    files are read; FIFOs, devices and sockets are reported, never opened (a FIFO blocks forever).
    """
    real_root, top = Path(os.path.realpath(root)), Path(os.path.realpath(folder))
    found: list[Path] = []
    skipped: list[dict] = []

    def skip(path: Path, reason: str) -> None:
        skipped.append({"path": path.relative_to(root).as_posix(), "reason": reason})

    def link_problem(path: Path) -> str | None:
        target = Path(os.path.realpath(path))
        if Path(os.path.realpath(path.parent)).is_relative_to(target):
            return "symbolic link loop (it points to a folder above it); not followed"
        if not target.is_relative_to(real_root):
            return f"symbolic link to {target}, outside the source; not followed"
        if not target.is_relative_to(top):
            return (f"symbolic link to {target.relative_to(real_root).as_posix()}, outside its class folder "
                    f"{folder.relative_to(root).as_posix()}; not followed (it would relabel those images)")
        return None

    def walk(directory: Path) -> None:
        with os.scandir(directory) as it:
            names = sorted(e.name for e in it if not e.name.startswith(".") and e.name != "__MACOSX")
        for name in names:
            path = directory / name
            why = link_problem(path) if path.is_symlink() else None
            if why:
                skip(path, why)
                continue
            try:
                mode = os.stat(path).st_mode
            except OSError as exc:
                skip(path, f"unreadable ({exc.strerror or exc})")
                continue
            if stat.S_ISDIR(mode):
                walk(path)
            elif stat.S_ISREG(mode):
                found.append(path)
            else:
                skip(path, "not a regular file (a FIFO, device or socket); only regular files are read")

    if folder.is_symlink() and Path(os.path.realpath(folder.parent)).is_relative_to(top):
        skip(folder, "symbolic link loop (it points to a folder above it); not followed")
    elif folder.is_symlink() and not top.is_relative_to(real_root):
        skip(folder, f"symbolic link to {top}, outside the source; not followed")
    else:
        walk(folder)
    return sorted(found, key=lambda p: p.relative_to(folder).as_posix()), skipped


def scan(root: Path, *, test_fraction: float | None, seed: int) -> Layout:
    """List the samples under a layout root (see module docstring for the accepted layouts)."""
    has = {s: (root / s).is_dir() for s in SPLITS}
    if any(has.values()):
        if not all(has.values()):
            missing = [s for s in SPLITS if not has[s]][0]
            raise UsageError(
                f"{root / missing}: missing folder; a d2l-layout source needs both train/ and test/"
            )
        if test_fraction is not None:
            raise UsageError(
                f"--test-fraction: {root} already has train/ and test/; drop the flag or pass a folder of class folders"
            )
        return _scan_split_layout(root)
    if test_fraction is None:
        raise UsageError(
            f"--source {root}: no train/ and test/ folders; pass --test-fraction F to split its class folders"
        )
    return _scan_class_folders(root, test_fraction, seed)


def _class_names(folder: Path, what: str) -> list[str]:
    names = [p.name for p in _class_dirs(folder)]
    if len(names) < 2:
        raise UsageError(f"{folder}: found {len(names)} class folder(s) ({what}); need at least two, one per class")
    return names


def _loose_files(folder: Path, root: Path) -> list[dict]:
    return [
        {"path": p.relative_to(root).as_posix(), "reason": "not inside a class folder"}
        for p in _visible(folder.iterdir())
        if p.is_file()
    ]


def _scan_split_layout(root: Path) -> Layout:
    classes = _class_names(root / "train", "train/")
    test_classes = [p.name for p in _class_dirs(root / "test")]
    if test_classes != classes:
        raise UsageError(
            f"{root}: train/test class mismatch: train/ has {classes}, test/ has {test_classes}; "
            "give both splits the same class folders"
        )
    files, skipped = [], []
    for split in SPLITS:
        split_root = root / split
        skipped += _loose_files(split_root, root)
        paths = []
        for label, name in enumerate(classes):
            found, bad = _files_under(split_root / name, root)
            paths += [(label, p) for p in found]
            skipped += bad
        files += _with_keys(split, paths, root, split_root)
    return Layout(classes, files, skipped)


def _scan_class_folders(root: Path, test_fraction: float, seed: int) -> Layout:
    """Split each class separately (stratified) by a seeded hash of the relative path.

    Hash order rather than a shuffled list: a file's split depends only on its own name and the
    seed, so adding images to a class moves few existing ones between splits.
    """
    classes = _class_names(root, "no train/ and test/ found, so its subfolders are the classes")
    chosen: dict[str, list[tuple[int, Path]]] = {s: [] for s in SPLITS}
    skipped = _loose_files(root, root)
    for label, name in enumerate(classes):
        paths, bad = _files_under(root / name, root)
        skipped += bad
        paths.sort(key=lambda p: hashlib.sha256(f"{seed}:{p.relative_to(root).as_posix()}".encode()).digest())
        n = len(paths)
        if n < 2:       # else one split gets none of the class, reported later as "no readable image"
            raise UsageError(f"--test-fraction {test_fraction:g}: class {name} has {n} image file(s) in "
                             f"{root / name}; splitting needs at least 2 per class (one for test): add images")
        n_test = min(max(round(n * test_fraction), 1), n - 1)
        chosen["test"] += [(label, p) for p in paths[:n_test]]
        chosen["train"] += [(label, p) for p in paths[n_test:]]
    files = []
    for split in SPLITS:
        chosen[split].sort(key=lambda lp: lp[1].relative_to(root).as_posix())
        files += _with_keys(split, chosen[split], root, root)
    return Layout(classes, files, skipped)


def _with_keys(split: str, paths: list[tuple[int, Path]], root: Path, split_root: Path) -> list[SourceFile]:
    """Attach unique WebDataset keys: relative path, extension dropped, dots in the stem -> "_".

    WebDataset splits a tar member name at the first dot of its last component, so a stem such as
    ``img.v2`` must not keep its dot. Collisions (``a.jpg`` and ``a.png``) get the extension
    appended, then a counter; `paths` is sorted, so the outcome is deterministic.
    """
    used: set[str] = set()
    out = []
    for label, path in paths:
        rel = PurePosixPath(path.relative_to(split_root).as_posix())
        base = (rel.parent / rel.stem.replace(".", "_")).as_posix()
        key = base
        if key in used:
            key = f"{base}_{rel.suffix.lstrip('.')}" if rel.suffix else base
        n = 2
        while key in used:
            key, n = f"{base}_{n}", n + 1
        used.add(key)
        out.append(SourceFile(split, label, path.relative_to(root).as_posix(), key, path))
    return out
