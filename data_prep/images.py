"""Decode every input image completely and turn it into the JPEG bytes a shard stores.

Runs in worker processes, so it only takes and returns plain picklable values.

* A JPEG in RGB that needs no resizing keeps its original bytes (no generation loss).
* Anything else (PNG, greyscale, CMYK, alpha, or a resize) is converted to RGB and re-encoded at
  `quality`. Transparent pixels are composited onto white rather than whatever colour the
  transparent pixels happen to store.
* High-bit-depth images (16-bit PNG, 32-bit integer or float TIFF) are scaled to 8 bits by their
  nominal range, not clipped (`to_rgb`).
* Zero-byte, non-image, truncated, undecodable or too large (`MAX_PIXELS`) files, and anything that
  is not a regular file, come back with a reason instead.

`open_image` and `to_rgb` are also what predict.py uses, so both read an image the same way.
"""

from __future__ import annotations

import hashlib
import io
import os
import stat
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageFile

# Pillow can pad a truncated image with grey and call it a success; we want it to fail.
ImageFile.LOAD_TRUNCATED_IMAGES = False


# Leading bytes of common image formats, to tell a damaged image from a file that is no image at all.
_SIGNATURES = ((b"\xff\xd8", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "WEBP"))


# The largest image (width x height) either tool decodes: Pillow's own DecompressionBombError threshold
# (2 x Image.MAX_IMAGE_PIXELS), which data_prep has always applied; predict.py applies the same one.
# About 180 megapixels: 20000 x 10000 is refused, any camera photo passes.
MAX_PIXELS = 178_956_970


class ImageRejected(ValueError):
    """An image that cannot be used; the message is the reason (one short line)."""


@dataclass(frozen=True)
class EncodeOptions:
    max_side: int | None = None  # scale down so that the longer side is at most this
    shorter_side: int | None = None  # scale down so that the shorter side is at most this
    quality: int = 95  # JPEG quality of re-encoded images


@dataclass(frozen=True)
class Encoded:
    sha256: str | None  # of the source file's bytes (exact-duplicate detection)
    jpg: bytes | None = None
    reason: str | None = None  # why the file was skipped; None when jpg is set
    reencoded: bool = False


def encode_file(path: Path, options: EncodeOptions) -> Encoded:
    """Read, fully decode and (if needed) re-encode one file."""
    try:
        data = read_regular_file(path)
    except ImageRejected as exc:
        return Encoded(None, reason=str(exc))
    except OSError as exc:
        return Encoded(None, reason=f"unreadable file ({exc.strerror or exc})")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return Encoded(digest, reason="zero-byte file")
    try:
        image = open_image(data)
    except ImageRejected as exc:
        return Encoded(digest, reason=str(exc))
    fmt = image.format or "image"
    new_size = target_size(image.size, options)
    if fmt == "JPEG" and image.mode == "RGB" and new_size == image.size:
        return Encoded(digest, jpg=data)
    try:
        rgb = to_rgb(image)
    except ImageRejected as exc:
        return Encoded(digest, reason=str(exc))
    if new_size != rgb.size:
        rgb = rgb.resize(new_size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=options.quality)
    return Encoded(digest, jpg=buf.getvalue(), reencoded=True)


def read_regular_file(path: Path) -> bytes:
    """The bytes of `path`, refusing anything but a regular file *before* reading.

    A FIFO would block a plain `read_bytes` forever and /dev/zero would never end: the file is
    opened non-blocking and checked with fstat on the very descriptor that is read.
    """
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    try:
        mode = os.fstat(fd).st_mode
        if not stat.S_ISREG(mode):
            raise ImageRejected(f"not a regular file ({_file_kind(mode)}); only regular files are read")
        with os.fdopen(fd, "rb", closefd=False) as f:
            return f.read()
    finally:
        os.close(fd)


def _file_kind(mode: int) -> str:
    for test, name in ((stat.S_ISFIFO, "a FIFO"), (stat.S_ISCHR, "a character device"),
                       (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"), (stat.S_ISDIR, "a folder")):
        if test(mode):
            return name
    return "a special file"


def check_pixels(size: tuple[int, int]) -> None:
    """Raise `ImageRejected` for an image over `MAX_PIXELS` (checked from the header, before decoding)."""
    width, height = size
    if width * height > MAX_PIXELS:
        raise ImageRejected(f"image too large ({width} x {height} = {width * height} pixels, "
                            f"the limit is {MAX_PIXELS}); downsize it first")


def open_image(data: bytes) -> Image.Image:
    """Open and fully decode image bytes, with the pixel limit checked before any pixel is decoded.

    Raises `ImageRejected` with a short reason for a non-image, a damaged image or one too large.
    """
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError:
        raise ImageRejected(f"image too large (over {MAX_PIXELS} pixels, the limit); downsize it first") from None
    except Exception:  # Pillow raises several types for "cannot identify"; all mean the same here
        # A recognisable signature means an image whose header is cut short or damaged.
        fmt = next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)
        raise ImageRejected(f"truncated or corrupt {fmt} (unreadable header)" if fmt else "not an image") from None
    check_pixels(image.size)
    try:
        image.load()  # decodes every pixel: the only reliable truncation/corruption check
    except Exception as exc:
        raise ImageRejected(f"truncated or corrupt {image.format or 'image'} ({exc})") from None
    return image


def target_size(size: tuple[int, int], options: EncodeOptions) -> tuple[int, int]:
    """The size after downsizing; never upscales."""
    width, height = size
    limit, side = (options.max_side, max(size)) if options.max_side else (options.shorter_side, min(size))
    if not limit or side <= limit:
        return size
    scale = limit / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_rgb(image: Image.Image) -> Image.Image:
    """Any decoded image -> 8-bit RGB, the one rule data_prep and predict.py share.

    * Transparency is composited onto white (what a browser shows on a white page).
    * 16-bit, 32-bit integer and float greyscale (modes I;16*, I, F) are scaled to 0..255 by their
      nominal range (as ImageMagick and GIMP do), not clipped at 255: see `_high_bit_depth_to_l`.
    """
    if image.mode.startswith("I") or image.mode == "F":
        return _high_bit_depth_to_l(image).convert("RGB")
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def _high_bit_depth_to_l(image: Image.Image) -> Image.Image:
    """Scale a one-channel high-bit-depth image to 8-bit greyscale.

    Integers: 0 .. 2**bits - 1 -> 0 .. 255, with `bits` from the TIFF header (BitsPerSample), 16 for
    the I;16 modes (16-bit PNG/TIFF), and for a bare mode I 16 when every value fits, else 32;
    32-bit samples are signed in Pillow (0 .. 2**31 - 1), negative values become 0. Floats: 0.0 .. 1.0 -> 0 .. 255 (the usual convention); values outside
    [0, 1] or NaN have no agreed meaning, so such an image is rejected with a reason. So is an image
    that would come out as one flat grey although its pixels differ (all its values in the bottom
    1/255 of its range): scaling would silently erase it.
    """
    arr = np.asarray(image)
    if image.mode == "F":
        if not np.isfinite(arr).all() or arr.min() < 0 or arr.max() > 1:
            raise ImageRejected(f"32-bit float image with values outside 0..1 (min {np.nanmin(arr):g}, "
                                f"max {np.nanmax(arr):g}); convert it to 8 or 16 bit")
        scaled = arr.astype(np.float64) * 255
        what = "float"
    else:
        bits = 16 if image.mode.startswith("I;16") else None
        tags = getattr(image, "tag_v2", None)
        if bits is None and tags is not None and isinstance(tags.get(258), (int, tuple)):
            bits = tags.get(258)[0] if isinstance(tags.get(258), tuple) else tags.get(258)
        if bits is None:
            bits = 16 if arr.min() >= 0 and arr.max() <= 65535 else 32
        # Pillow holds 32-bit samples as signed int32 (mode I), so their range is 0 .. 2**31 - 1.
        top = 2 ** 31 - 1 if bits >= 32 else 2 ** bits - 1
        scaled = np.clip(arr.astype(np.float64), 0, None) * (255 / top)
        what = f"{bits}-bit"
    out = np.clip(np.rint(scaled), 0, 255).astype(np.uint8)
    if out.min() == out.max() and arr.min() != arr.max():
        raise ImageRejected(f"{what} image whose values ({arr.min():g}..{arr.max():g}) use too little of its "
                            "range to show in 8 bits; convert it to 8 bit yourself")
    return Image.fromarray(out)  # uint8, one channel: mode L
