"""results.json -> results.md (the table) and test_acc.png (test accuracy per epoch per variant)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from finetune import atomic_write_text

from . import D2L_REFERENCE
from .plan import fmt_lr


def _f(x, digits=3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _flags(flags: list[str]) -> str:
    return "`" + " ".join(flags).replace("|", "\\|") + "`" if flags else ""


def markdown(results: dict) -> str:
    lines = ["# Fine-tune vs from scratch, and the d2l exercises", ""]
    if results.get("weights_note"):
        lines += [f"**{results['weights_note']}.**", ""]
    lines += [f"- data: `{results['data']}` ({results.get('classes', '')})",
              f"- weights: {results['weights_source']}",
              f"- every run: seed {results['seed']}, shared train.py flags `{' '.join(results['train_args']) or '(none)'}`"
              f", launcher `{results['launcher']}`",
              f"- machine: {results.get('machine', '?')}",
              f"- command: `{results.get('command', '')}`", ""]
    lines += ["| variant | what | flags | lr | weights | final test acc | best test acc (epoch) | final train loss | "
              "examples/sec | status |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["variants"]:
        best = f"{_f(r.get('best_test_acc'))} ({r['best_epoch']})" if r.get("best_epoch") else ""
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}".replace("|", "\\|")
        lr = fmt_lr(r["lr"]) if r.get("lr") is not None else ""
        lines.append(f"| {r['name']} | {r['what']} | {_flags(r['flags'])} | {lr} | {r.get('weights') or ''} | "
                     f"{_f(r.get('final_test_acc'))} | {best} | {_f(r.get('final_train_loss'))} | "
                     f"{_f(r.get('examples_per_sec'), 1)} | {status} |")
    lines += [f"| d2l book: fine-tune | the book's own result, not this run | ImageNet weights, 224 px, 5 epochs | 5e-5 | "
              f"IMAGENET1K_V1 | {D2L_REFERENCE['finetune']:.3f} | | | | reference |",
              f"| d2l book: scratch | the book's own result, not this run | random init, 224 px, 5 epochs | 5e-4 | random init | "
              f"{D2L_REFERENCE['scratch']:.3f} | | | | reference |", ""]
    lines += ["lr: the backbone learning rate the run used (from its config.yaml; the new head learns at 10x "
              "except with --scratch). Final/best test acc: accuracy on the whole test split after the last / the best epoch. "
              "Train loss: d2l's per-example training loss of the last epoch. examples/sec: training "
              "throughput averaged over epochs (warm-up steps left out). The d2l rows are the numbers printed in "
              "Dive into Deep Learning, section \"Fine-Tuning\" (d2l's hotdog set, its GPUs: 999 examples/sec on 2), for comparison "
              "only.", "",
              "Per run: `<variant>/` (config.yaml, metrics.json, model.pt, tb/), console log in "
              "`logs/<variant>.log`. All curves: `tensorboard --logdir .` here; the plot: `test_acc.png`.", ""]
    return "\n".join(lines)


def plot(results: dict, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5))
    plotted = 0
    for r in results["variants"]:
        epochs = r.get("epochs") or []
        if epochs:
            style = "--" if r["status"] != "ok" else "-"
            ax.plot([e["epoch"] for e in epochs], [e["test_acc"] for e in epochs], style, marker="o",
                    label=r["name"] + ("" if r["status"] == "ok" else f" ({r['status']})"))
            plotted += 1
    for key, label in (("finetune", "d2l book: fine-tune"), ("scratch", "d2l book: scratch")):
        ax.axhline(D2L_REFERENCE[key], color="grey", linestyle=":", linewidth=1)
        ax.annotate(f"{label} {D2L_REFERENCE[key]:.3f}", (0.01, D2L_REFERENCE[key]), xycoords=("axes fraction", "data"),
                    fontsize=8, color="grey", va="bottom")
    ax.set_xlabel("epoch")
    ax.set_ylabel("test accuracy")
    ax.set_ylim(0, 1.02)
    ax.xaxis.get_major_locator().set_params(integer=True)
    title = f"Test accuracy per epoch: {Path(results['data']).name}"
    if results.get("weights_note"):
        title += "\nno ImageNet weights: 'pretrained' variants start from random init"
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    if plotted:
        ax.legend(fontsize=8, loc="lower right")
    else:
        ax.text(0.5, 0.5, "no completed epochs", ha="center", transform=ax.transAxes)
    fig.tight_layout()
    tmp = path.with_name(path.name + ".tmp.png")
    fig.savefig(tmp, dpi=120)
    plt.close(fig)
    os.replace(tmp, path)


def write_all(results: dict, out: Path) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", markdown(results))
    plot(results, out / "test_acc.png")
