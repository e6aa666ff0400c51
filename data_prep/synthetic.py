"""A seeded generator of a small, learnable, photo-like two-class JPEG set in the d2l layout.

It stands in for d2l's hotdog.zip wherever the network is not available (the demo, the tests, CI):

* ``hotdog``: a tan, elongated bun with a narrower reddish-brown sausage along it (sometimes a
  mustard squiggle), at a random angle.
* ``not-hotdog``: one to three compact shapes (discs, triangles, squares, polygons) in colours
  kept away from the bun and sausage hues.

Both classes share the same kind of background (a colour gradient with blotchy texture), blur,
sensor-like noise and JPEG artefacts, so a model has to look at the object: the class signal is
colour *and* shape, strong enough that a small CNN separates the classes within a few steps.
Sides are drawn independently between ``min_side`` and ``max_side``, so sizes and aspect ratios vary.

Every image has its own random stream derived from ``(seed, split, class, index)``: the same
arguments give byte-identical files, and asking for more images does not change the existing ones.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from common.errors import UsageError
from common.fsutil import atomic_output_dir

CLASSES = ("hotdog", "not-hotdog")
SPLITS = ("train", "test")
MARKER = "synthetic.json"  # records the arguments; lets a re-run with the same ones be a no-op

# Defaults of `python -m data_prep synthetic`: a demo set that fine-tunes in a minute or two on CPU.
DEFAULT_TRAIN_PER_CLASS = 64
DEFAULT_TEST_PER_CLASS = 32
DEFAULT_MIN_SIDE = 64
DEFAULT_MAX_SIDE = 160


def make_synthetic(
    out: str | Path,
    *,
    train_per_class: int = DEFAULT_TRAIN_PER_CLASS,
    test_per_class: int = DEFAULT_TEST_PER_CLASS,
    min_side: int = DEFAULT_MIN_SIDE,
    max_side: int = DEFAULT_MAX_SIDE,
    seed: int = 0,
    force: bool = False,
) -> Path:
    """Write ``out/{train,test}/{hotdog,not-hotdog}/NNNN.jpg`` and return ``out``.

    Idempotent: if ``out`` already holds a set made with the same arguments, nothing is written.
    An existing non-empty ``out`` made otherwise is an error unless ``force`` (then it is replaced).
    The set appears atomically (built in a temporary sibling directory, then renamed).
    """
    out = Path(out)
    if train_per_class < 1 or test_per_class < 1:
        raise UsageError("--train-per-class and --test-per-class must be at least 1")
    if not 16 <= min_side <= max_side:
        raise UsageError(
            f"--min-side {min_side} / --max-side {max_side}: need 16 <= min-side <= max-side"
        )
    params = {
        "generator": "data_prep.synthetic/1",
        "train_per_class": train_per_class,
        "test_per_class": test_per_class,
        "min_side": min_side,
        "max_side": max_side,
        "seed": seed,
    }
    if out.exists() and not force:
        if _read_marker(out) == params:
            return out
        if not out.is_dir() or any(out.iterdir()):
            raise UsageError(
                f"{out} already exists and was not made by `synthetic` with these arguments; "
                "choose another --out or pass --force to replace it"
            )

    counts = {"train": train_per_class, "test": test_per_class}
    with atomic_output_dir(out) as tmp:
        for split_index, split in enumerate(SPLITS):
            for class_index, name in enumerate(CLASSES):
                folder = tmp / split / name
                folder.mkdir(parents=True)
                for i in range(counts[split]):
                    rng = np.random.default_rng([seed, split_index, class_index, i])
                    (folder / f"{i:04d}.jpg").write_bytes(
                        render_jpeg(rng, hotdog=(class_index == 0), min_side=min_side, max_side=max_side)
                    )
        (tmp / MARKER).write_text(json.dumps(params, indent=2) + "\n")
    return out


def _read_marker(out: Path) -> dict | None:
    try:
        return json.loads((out / MARKER).read_text())
    except (OSError, ValueError):
        return None


def render_jpeg(rng: np.random.Generator, *, hotdog: bool, min_side: int, max_side: int) -> bytes:
    """One image of the given class as JPEG bytes."""
    width, height = (int(v) for v in rng.integers(min_side, max_side + 1, size=2))
    image = _background(rng, width, height)
    draw = ImageDraw.Draw(image)
    if hotdog:
        _draw_hotdog(draw, rng, width, height)
    else:
        _draw_other_things(draw, rng, width, height)
    image = image.filter(ImageFilter.GaussianBlur(radius=float(rng.uniform(0.3, 1.0))))
    pixels = np.asarray(image, dtype=np.float32)
    pixels = pixels + rng.normal(0.0, rng.uniform(3.0, 9.0), size=pixels.shape)  # sensor noise
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=int(rng.integers(75, 96)))
    return buf.getvalue()


def _background(rng: np.random.Generator, width: int, height: int) -> Image.Image:
    """A muted two-colour gradient in a random direction, with blotchy low-frequency texture."""
    start, end = (_muted_colour(rng) for _ in range(2))
    angle = rng.uniform(0, 2 * math.pi)
    ys, xs = np.mgrid[0:height, 0:width].astype(np.float32)
    t = (xs / width - 0.5) * math.cos(angle) + (ys / height - 0.5) * math.sin(angle) + 0.5
    t = np.clip(t, 0, 1)[..., None]
    pixels = start * (1 - t) + end * t
    # Texture: a tiny random grid upsampled with bicubic interpolation (cheap "cloud" noise).
    grid = rng.normal(0, 1, size=(int(rng.integers(3, 8)), int(rng.integers(3, 8)))).astype(np.float32)
    blotches = np.asarray(Image.fromarray(grid, mode="F").resize((width, height), Image.BICUBIC))
    pixels = pixels + blotches[..., None] * rng.uniform(6, 18)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))


def _muted_colour(rng: np.random.Generator) -> np.ndarray:
    grey = rng.uniform(60, 200)
    return np.clip(grey + rng.normal(0, 18, size=3), 0, 255).astype(np.float32)


def _jitter(rng: np.random.Generator, base: tuple[int, int, int], spread: float) -> tuple[int, ...]:
    return tuple(int(v) for v in np.clip(np.array(base) + rng.normal(0, spread, size=3), 0, 255))


def _capsule(cx: float, cy: float, length: float, width: float, angle: float, steps: int = 10):
    """Polygon of a stadium (rectangle with round ends) centred on (cx, cy), rotated by `angle`."""
    half, radius = max(length - width, 0) / 2, width / 2
    local = []
    for end, sign in ((half, 1), (-half, -1)):  # right cap, then left cap
        for k in range(steps + 1):
            a = -math.pi / 2 + math.pi * k / steps
            local.append((end + sign * radius * math.cos(a), sign * radius * math.sin(a)))
    c, s = math.cos(angle), math.sin(angle)
    return [(cx + x * c - y * s, cy + x * s + y * c) for x, y in local]


def _draw_hotdog(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    side = min(width, height)
    length = side * rng.uniform(0.55, 0.8)
    angle = rng.uniform(0, math.pi)
    # The length is relative to the shorter side, so the object stays in frame at any angle.
    cx = width / 2 + rng.uniform(-0.1, 0.1) * width
    cy = height / 2 + rng.uniform(-0.1, 0.1) * height
    bun, sausage = _jitter(rng, (222, 172, 100), 12), _jitter(rng, (158, 62, 38), 12)
    bun_width = length * rng.uniform(0.32, 0.42)
    draw.polygon(_capsule(cx, cy, length, bun_width, angle), fill=bun)
    # A lighter band on the bun reads as a rounded, lit surface.
    lighter = tuple(min(255, v + 25) for v in bun)
    draw.polygon(_capsule(cx, cy, length * 0.9, bun_width * 0.55, angle), fill=lighter)
    sausage_length = length * rng.uniform(1.0, 1.15)
    sausage_width = length * rng.uniform(0.14, 0.19)
    draw.polygon(_capsule(cx, cy, sausage_length, sausage_width, angle), fill=sausage)
    if rng.random() < 0.6:  # mustard squiggle along the sausage
        c, s = math.cos(angle), math.sin(angle)
        amplitude = sausage_width * 0.3
        points = []
        for k in range(9):
            x = (k / 8 - 0.5) * length * 0.8
            y = amplitude if k % 2 else -amplitude
            points.append((cx + x * c - y * s, cy + x * s + y * c))
        draw.line(points, fill=_jitter(rng, (235, 200, 40), 10), width=max(1, int(sausage_width * 0.2)))


def _draw_other_things(draw: ImageDraw.ImageDraw, rng: np.random.Generator, width: int, height: int) -> None:
    side = min(width, height)
    for _ in range(int(rng.integers(1, 4))):
        colour = _non_hotdog_colour(rng)
        size = side * rng.uniform(0.2, 0.45)
        cx, cy = rng.uniform(0.25, 0.75) * width, rng.uniform(0.25, 0.75) * height
        kind = rng.integers(0, 4)
        if kind == 0:  # disc or mildly oval
            rx, ry = size / 2, size / 2 * rng.uniform(0.7, 1.0)
            draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=colour)
        else:  # regular polygon: triangle, square, or 5-7 sides
            sides = {1: 3, 2: 4}.get(int(kind), int(rng.integers(5, 8)))
            draw.regular_polygon((cx, cy, size / 2), sides, rotation=float(rng.uniform(0, 360)), fill=colour)


def _non_hotdog_colour(rng: np.random.Generator) -> tuple[int, int, int]:
    """A saturated colour with a hue between yellow-green and magenta: far from tan and red-brown."""
    hue = int(rng.uniform(70, 320) / 360 * 255)
    saturation, value = int(rng.uniform(120, 255)), int(rng.uniform(110, 255))
    return Image.new("HSV", (1, 1), (hue, saturation, value)).convert("RGB").getpixel((0, 0))
