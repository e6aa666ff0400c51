"""Fetch, on a machine with internet (a login node), everything an offline compute node needs: the ImageNet
weights of an --arch and d2l's hotdog.zip, into one cache directory that the compute nodes share.

    python -m finetune.fetch --arch resnet18 --cache /shared/hotdog-cache            # + hotdog.zip
    python -m finetune.fetch --arch timm:convnext_nano --cache /shared/hotdog-cache --no-hotdog

Layout (each library's own cache layout, so train.py finds the files with no flag of its own):
    CACHE/torch/hub/checkpoints/NAME-HASH.pth      torchvision weights (TORCH_HOME=CACHE/torch)
    CACHE/huggingface/hub/models--timm--NAME/...   timm weights (HF_HOME=CACHE/huggingface)
    CACHE/data/hotdog.zip                          d2l's data set (HOTDOG_CACHE=CACHE/data)
    CACHE/SHA256SUMS                               what is there (`cd CACHE && sha256sum -c SHA256SUMS`)
Every download is checked: torchvision's against the hash in its file name, hotdog.zip against d2l's sha1,
timm's by the Hugging Face hub. --mirror DIR_OR_URL takes the torchvision files and hotdog.zip from a mirror
(same file names) instead of their home servers; the checks stay the same, and a mirror's file is never read
past a size cap (torchvision's published file size, hotdog.zip: HOTDOG_ZIP_CAP): a larger Content-Length is
refused before anything is written, a longer body is cut one byte past the cap, and the .part file is removed.
Exit codes: 0 all fetched, 2 usage error or a download that failed or did not verify.
"""

from __future__ import annotations

import argparse
import os
import sys
import urllib.request
from pathlib import Path

HOTDOG_ZIP_CAP = 512 << 20          # no published size to check against here: a cap, not the exact size
WEIGHTS_CAP = 4 << 30               # torchvision weights without a published size: the largest are ~2.5 GB


def _env(cache: Path) -> dict:
    return dict(TORCH_HOME=str(cache / "torch"), HF_HOME=str(cache / "huggingface"), HOTDOG_CACHE=str(cache / "data"))


def _mirrored(url: str, mirror: str | None) -> str:
    if not mirror:
        return url
    base = mirror if "://" in mirror else Path(mirror).absolute().as_uri()
    return base.rstrip("/") + "/" + url.rsplit("/", 1)[-1]


def fetch_weights(arch: str, mirror: str | None) -> str:
    """Put the arch's ImageNet weights into the cache named by TORCH_HOME / HF_HOME; returns a sentence."""
    import torch

    from . import UsageError, weights
    if arch == weights.LITE0_ARCH and weights.lite0_package_file() is not None:
        weights.lite0_state_dict()                 # verifies its sha256
        return f"{arch}: {weights.LITE0_SOURCE} -- installed with pip, nothing to fetch"
    if arch.startswith("timm:"):
        if mirror:
            raise UsageError("--mirror serves torchvision files and hotdog.zip; for timm set HF_ENDPOINT to a "
                             "Hugging Face mirror instead")
        _, source = weights.imagenet(arch)
        return f"{arch}: {source}"
    w = weights.torchvision_weights(arch)
    target = weights.torchvision_cache_file(arch)
    if mirror and not target.exists():
        size_mib = (getattr(w, "meta", None) or {}).get("_file_size")      # MiB, rounded to 3 decimals
        cap = int((size_mib + 0.001) * 2**20) if size_mib else WEIGHTS_CAP
        _mirror_download(_mirrored(w.url, mirror), target, cap, lambda part: _hash_prefix_problem(part, target.name))
    try:
        torch.hub.load_state_dict_from_url(_mirrored(w.url, mirror), map_location="cpu", check_hash=True,
                                           weights_only=True, file_name=target.name, progress=False)
    except Exception as e:  # noqa: BLE001 -- offline, HTTP errors, a hash that does not match
        target.unlink(missing_ok=True)
        raise UsageError(f"{arch}: could not fetch {_mirrored(w.url, mirror)} ({type(e).__name__}: "
                         f"{(str(e).splitlines() or [''])[0][:120]})") from None
    return f"{arch}: {target} (sha256 prefix {target.stem.rsplit('-', 1)[-1]} verified)"


def fetch_hotdog(cache: Path, mirror: str | None) -> str:
    from data_prep import sources
    from data_prep.manifest import file_digests
    target = cache / "data" / "hotdog.zip"
    if mirror and not (target.exists() and file_digests(target, "sha1")["sha1"] == sources.D2L_SHA1):
        def sha1_problem(part: Path) -> str | None:
            sha1 = file_digests(part, "sha1")["sha1"]
            return None if sha1 == sources.D2L_SHA1 else f"sha1 {sha1}, expected {sources.D2L_SHA1}"
        _mirror_download(_mirrored(sources.D2L_URL, mirror), target, HOTDOG_ZIP_CAP, sha1_problem)
    path = sources.fetch_d2l(cache / "data")        # verifies the copy again; its errors are the one UsageError
    return f"hotdog.zip: {path} (sha1 {sources.D2L_SHA1} verified)"


def _mirror_download(url: str, target: Path, cap: int, problem_of) -> None:
    """Copy the mirror's `url` to `target` through TARGET.part-PID, at most `cap` bytes; `problem_of(part)` says
    what is wrong with a complete copy (a hash), or None. The .part file is removed whatever happens."""
    from . import UsageError
    target.parent.mkdir(parents=True, exist_ok=True)
    part = target.with_name(f"{target.name}.part-{os.getpid()}")
    part.unlink(missing_ok=True)
    try:
        with urllib.request.urlopen(url, timeout=60) as response:
            length = int(response.headers.get("Content-Length") or 0)
            if length > cap:
                raise UsageError(f"could not fetch {url}: {length} bytes, more than the {cap} a real "
                                 f"{target.name} can have; nothing written")
            with os.fdopen(os.open(part, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as out:
                size = 0
                while chunk := response.read(1 << 20):
                    size += len(chunk)
                    if size > cap:
                        raise UsageError(f"could not fetch {url}: more than the {cap} bytes a real {target.name} "
                                         f"can have; stopped there")
                    out.write(chunk)
        problem = problem_of(part)
        if problem:
            raise UsageError(f"could not fetch {url}: {problem}; not a copy of {target.name}")
        os.replace(part, target)
    except (OSError, ValueError) as e:     # URLError, timeouts, a full disk
        reason = (str(e).splitlines() or [""])[0][:120]
        raise UsageError(f"could not fetch {url} ({type(e).__name__}: {reason})") from None
    finally:
        part.unlink(missing_ok=True)


def _hash_prefix_problem(part: Path, name: str) -> str | None:
    """torchvision's file names end in -HASH.pth, HASH a prefix of the file's sha256 (torch.hub's check)."""
    prefix = name.rsplit("-", 1)[-1].split(".")[0]
    from data_prep.manifest import file_digests
    digest = file_digests(part, "sha256")["sha256"]
    return None if digest.startswith(prefix) else f"sha256 {digest[:12]}... does not start with {prefix} (its name)"


def write_sums(cache: Path) -> Path:
    from data_prep.manifest import file_sha256

    from . import atomic_write_text
    files = sorted(p for p in cache.rglob("*") if p.is_file() and not p.is_symlink() and p.name != "SHA256SUMS"
                   and ".lock" not in p.name and ".incomplete" not in p.name)
    lines = [f"{file_sha256(p)}  {p.relative_to(cache)}\n" for p in files]
    atomic_write_text(cache / "SHA256SUMS", "".join(lines))
    return cache / "SHA256SUMS"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m finetune.fetch", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Then, on the compute nodes: export TORCH_HOME=CACHE/torch "
                                       "HF_HOME=CACHE/huggingface HF_HUB_OFFLINE=1 HOTDOG_CACHE=CACHE/data")
    p.add_argument("--arch", action="append", default=None,
                   help="train.py --arch whose ImageNet weights to fetch (repeatable; default: resnet18)")
    p.add_argument("--cache", required=True, help="directory shared by the compute nodes")
    p.add_argument("--no-hotdog", dest="hotdog", action="store_false", help="do not fetch d2l's hotdog.zip")
    p.add_argument("--mirror", help="directory or URL serving the same file names (torchvision weights, "
                                    "hotdog.zip)")
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    cache = Path(args.cache).absolute()
    os.environ.update(_env(cache))      # before torch.hub / huggingface_hub read them
    from . import UsageError
    from .arch import check_name
    try:
        cache.mkdir(parents=True, exist_ok=True)
        for arch in args.arch or ["resnet18"]:
            check_name(arch)
            print("fetch: " + fetch_weights(arch, args.mirror), flush=True)
        if args.hotdog:
            print("fetch: " + fetch_hotdog(cache, args.mirror), flush=True)
        sums = write_sums(cache)
    except (UsageError, OSError) as e:
        print(f"python -m finetune.fetch: error: {e}", file=sys.stderr)
        return 2
    env = " ".join(f"{k}={v}" for k, v in _env(cache).items())
    print(f"fetch: checksums in {sums}\nfetch: on the compute nodes: export {env} HF_HUB_OFFLINE=1")
    return 0


if __name__ == "__main__":
    sys.exit(main())
