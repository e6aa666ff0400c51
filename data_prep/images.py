"""Decode every input image completely and turn it into the JPEG bytes a shard stores.

Runs in worker processes, so it only takes and returns plain picklable values.

* A JPEG in RGB that needs no resizing keeps its original bytes (no generation loss).
* Anything else (PNG, greyscale, CMYK, alpha, or a resize) is converted to RGB and re-encoded at
  `quality`. Transparent pixels are composited onto white rather than whatever colour the
  transparent pixels happen to store.
* Zero-byte, non-image, truncated or otherwise undecodable files come back with a reason instead.
"""

from __future__ import annotations

import hashlib
import io
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageFile

# Pillow can pad a truncated image with grey and call it a success; we want it to fail.
ImageFile.LOAD_TRUNCATED_IMAGES = False


# Leading bytes of common image formats, to tell a damaged image from a file that is no image at all.
_SIGNATURES = ((b"\xff\xd8", "JPEG"), (b"\x89PNG", "PNG"), (b"GIF8", "GIF"), (b"BM", "BMP"), (b"RIFF", "WEBP"))


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
        data = Path(path).read_bytes()
    except OSError as exc:
        return Encoded(None, reason=f"unreadable file ({exc.strerror or exc})")
    digest = hashlib.sha256(data).hexdigest()
    if not data:
        return Encoded(digest, reason="zero-byte file")
    try:
        image = Image.open(io.BytesIO(data))
    except Image.DecompressionBombError as exc:
        return Encoded(digest, reason=f"image too large ({exc})")
    except Exception:  # Pillow raises several types for "cannot identify"; all mean the same here
        # A recognisable signature means an image whose header is cut short or damaged.
        fmt = next((name for magic, name in _SIGNATURES if data.startswith(magic)), None)
        return Encoded(digest, reason=f"truncated or corrupt {fmt} (unreadable header)" if fmt else "not an image")
    fmt = image.format or "image"
    try:
        image.load()  # decodes every pixel: the only reliable truncation/corruption check
    except Exception as exc:
        return Encoded(digest, reason=f"truncated or corrupt {fmt} ({exc})")

    new_size = target_size(image.size, options)
    if fmt == "JPEG" and image.mode == "RGB" and new_size == image.size:
        return Encoded(digest, jpg=data)
    rgb = _to_rgb(image)
    if new_size != rgb.size:
        rgb = rgb.resize(new_size, Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    rgb.save(buf, format="JPEG", quality=options.quality)
    return Encoded(digest, jpg=buf.getvalue(), reencoded=True)


def target_size(size: tuple[int, int], options: EncodeOptions) -> tuple[int, int]:
    """The size after downsizing; never upscales."""
    width, height = size
    limit, side = (options.max_side, max(size)) if options.max_side else (options.shorter_side, min(size))
    if not limit or side <= limit:
        return size
    scale = limit / side
    return max(1, round(width * scale)), max(1, round(height * scale))


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info):
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, (255, 255, 255))
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")
