"""The best run's mistakes: its model.pt re-scores the test split, and every misclassified photo goes on a
contact sheet (errors.png: the eval crop, true and predicted label, the predicted class's probability).
`python -m experiments report` writes it beside results.md."""

from __future__ import annotations

import os
from pathlib import Path

from common.fsutil import new_temp_file

TILE = 160              # pixels per photo on the sheet
CAPTION = 30            # pixels of text under each photo
COLUMNS = 6


def best_run(results: dict) -> dict | None:
    """The completed run with the highest final test accuracy that has a model.pt, or None."""
    done = [r for r in results.get("variants", []) if r.get("status") == "ok" and r.get("run_dir")
            and (Path(r["run_dir"]) / "model.pt").is_file() and r.get("final_test_acc") is not None]
    return max(done, key=lambda r: r["final_test_acc"], default=None)


def predict_test(model_pt: Path, data: str) -> tuple[list, list[str]]:
    """[(uint8 crop [3, H, W], true index, predicted index, its probability)] over the whole test split of
    `data`, and the class names, with the run's own eval preprocessing."""
    import torch

    from finetune.data.manifest import load_manifest
    from finetune.data.streams import EvalStream
    from finetune.data.transforms import DeviceNormalizer
    from finetune.model import load_trained
    model, saved = load_trained(str(model_pt))
    spec = saved["preprocess"]
    normalize = DeviceNormalizer(torch.device("cpu"), False, mean=spec["mean"], std=spec["std"])
    split = load_manifest(data).test
    out = []
    with torch.no_grad():
        for images, labels in EvalStream(split, rank=0, world_size=1, batch=32, preprocess=spec, limit=0):
            probs = model(normalize(images)[0]).softmax(dim=1)
            conf, pred = probs.max(dim=1)
            out += [(img, int(y), int(p), float(c)) for img, y, p, c in zip(images, labels, pred, conf)]
    return out, list(saved["classes"])


def contact_sheet(errors: list, classes: list[str], title: str, path: Path) -> None:
    """A PNG grid of the misclassified crops, each captioned 'true X' / 'pred Y (p)'; a one-line sheet saying
    so when there are none. Written atomically (an exclusive temporary name, then a rename)."""
    from PIL import Image, ImageDraw
    rows = max(1, -(-len(errors) // COLUMNS))
    width = COLUMNS * TILE
    sheet = Image.new("RGB", (width, 24 + rows * (TILE + CAPTION)), "white")
    draw = ImageDraw.Draw(sheet)
    draw.text((6, 6), title if errors else f"{title}: no errors", fill="black")
    for k, (img, true, pred, conf) in enumerate(errors):
        x, y = (k % COLUMNS) * TILE, 24 + (k // COLUMNS) * (TILE + CAPTION)
        tile = Image.fromarray(img.permute(1, 2, 0).numpy()).resize((TILE - 4, TILE - 4))
        sheet.paste(tile, (x + 2, y + 2))
        draw.text((x + 4, y + TILE), f"true {classes[true]}", fill="darkgreen")
        draw.text((x + 4, y + TILE + 13), f"pred {classes[pred]} ({conf:.2f})", fill="firebrick")
    tmp = new_temp_file(path)
    try:
        with open(tmp, "wb") as fh:
            sheet.save(fh, format="PNG")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_errors(results: dict, out: Path) -> Path | None:
    """errors.png for the best run of `results` (None when no run finished with a model.pt)."""
    best = best_run(results)
    if best is None:
        return None
    scored, classes = predict_test(Path(best["run_dir"]) / "model.pt", results["data"])
    errors = [s for s in scored if s[1] != s[2]]
    title = (f"{best['name']}: {len(errors)} of {len(scored)} test photos misclassified "
             f"(test acc {1 - len(errors) / max(len(scored), 1):.3f})")
    contact_sheet(errors, classes, title, out / "errors.png")
    return out / "errors.png"
