"""results.json -> results.md (the table) and test_acc.png (test accuracy per epoch per variant)."""

from __future__ import annotations

import json
import os
from pathlib import Path

from common.fsutil import new_temp_file
from finetune import atomic_write_text

from . import D2L_REFERENCE
from .plan import fmt_lr


def _f(x, digits=3) -> str:
    return "" if x is None else f"{x:.{digits}f}"


def _flags(flags: list[str]) -> str:
    return "`" + " ".join(flags).replace("|", "\\|") + "`" if flags else ""


# Two-sided 95 % quantiles of Student's t for n - 1 degrees of freedom (n = 2..10 runs); 1.96 beyond.
_T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262}


def mean_ci(values: list[float]) -> tuple[float, float]:
    """Mean and the half-width of its 95 % confidence interval (Student's t; 0 for a single value)."""
    n = len(values)
    mean = sum(values) / n
    if n < 2:
        return mean, 0.0
    sd = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    return mean, _T95.get(n - 1, 1.96) * sd / n ** 0.5


def by_variant(results: dict) -> dict[str, list[dict]]:
    """Completed runs grouped by variant (several seeds of one variant form one group), in table order."""
    groups: dict[str, list[dict]] = {}
    for r in results["variants"]:
        if r["status"] == "ok":
            groups.setdefault(r.get("variant", r["name"]), []).append(r)
    return groups


def seed_table(results: dict) -> list[str]:
    groups = by_variant(results)
    if not any(len(runs) > 1 for runs in groups.values()):
        return []
    lines = [f"## Mean over seeds {', '.join(map(str, results.get('seeds', [])))}", "",
             "| variant | what | lr | runs | final test acc: mean ± 95 % CI | min – max | best test acc: mean | "
             "final train loss: mean | examples/sec |", "|---|---|---|---|---|---|---|---|---|"]
    for name, runs in groups.items():
        final = [r["final_test_acc"] for r in runs]
        mean, half = mean_ci(final)
        lr = fmt_lr(runs[0]["lr"]) if runs[0].get("lr") is not None else ""
        lines.append(f"| {name} | {runs[0]['what']} | {lr} | {len(runs)} | {mean:.3f} ± {half:.3f} | "
                     f"{min(final):.3f} – {max(final):.3f} | {mean_ci([r['best_test_acc'] for r in runs])[0]:.3f} | "
                     f"{mean_ci([r['final_train_loss'] for r in runs])[0]:.3f} | "
                     f"{mean_ci([r['examples_per_sec'] or 0.0 for r in runs])[0]:.1f} |")
    return lines + ["", "95 % CI: mean ± t(0.975, runs - 1) × standard deviation / √runs over the seeds.", "",
                    "## Every run", ""]


def markdown(results: dict) -> str:
    lines = ["# Fine-tune vs from scratch, and the d2l exercises", ""]
    if results.get("weights_note"):
        lines += [f"**{results['weights_note']}.**", ""]
    lines += [f"- data: `{results['data']}` ({results.get('classes', '')})",
              f"- weights: {results['weights_source']}",
              f"- every run: seed {', '.join(map(str, results.get('seeds') or [results['seed']]))}, shared train.py flags `{' '.join(results['train_args']) or '(none)'}`"
              f", launcher `{results['launcher']}`",
              f"- machine: {results.get('machine', '?')}",
              f"- command: `{results.get('command', '')}`", ""]
    lines += seed_table(results)
    lines += ["| variant | what | flags | lr | weights | final test acc | balanced acc | best test acc (epoch) | "
              "final train loss | examples/sec | status |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in results["variants"]:
        best = (f"{_f(r.get('best_test_acc'))} ({r['best_epoch']}{', on val' if r.get('best_chosen_on') == 'val' else ''})"
                if r.get("best_epoch") else "")
        status = r["status"] if r["status"] == "ok" else f"{r['status']}: {r.get('reason', '')}".replace("|", "\\|")
        lr = fmt_lr(r["lr"]) if r.get("lr") is not None else ""
        lines.append(f"| {r['name']} | {r['what']} | {_flags(r['flags'])} | {lr} | {r.get('weights') or ''} | "
                     f"{_f(r.get('final_test_acc'))} | {_f(r.get('final_test_balanced_acc'))} | {best} | {_f(r.get('final_train_loss'))} | "
                     f"{_f(r.get('examples_per_sec'), 1)} | {status} |")
    lines += [f"| d2l book: fine-tune | the book's own result, not this run | ImageNet weights, 224 px, 5 epochs | 5e-5 | "
              f"IMAGENET1K_V1 | {D2L_REFERENCE['finetune']:.3f} | | | | | reference |",
              f"| d2l book: scratch | the book's own result, not this run | random init, 224 px, 5 epochs | 5e-4 | random init | "
              f"{D2L_REFERENCE['scratch']:.3f} | | | | | reference |", ""]
    lines += ["lr: the backbone learning rate the run used (from its config.yaml; the new head learns at 10x "
              "except with --scratch). Final/best test acc: accuracy on the whole test split after the last / the best epoch "
              "(best: chosen on val accuracy when the data has a val split, marked 'on val'; else on test). Balanced acc: "
              "the mean per-class recall on test after the last epoch. "
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
    groups = by_variant(results)
    if any(len(runs) > 1 for runs in groups.values()):         # several seeds: mean curve and its 95 % band
        for name, runs in groups.items():
            n_epochs = min(len(r["epochs"]) for r in runs)
            stats = [mean_ci([r["epochs"][i]["test_acc"] for r in runs]) for i in range(n_epochs)]
            xs = list(range(1, n_epochs + 1))
            line, = ax.plot(xs, [m for m, _ in stats], marker="o", label=f"{name} (mean of {len(runs)})")
            ax.fill_between(xs, [m - h for m, h in stats], [m + h for m, h in stats], color=line.get_color(),
                            alpha=0.15)
            plotted += 1
    else:
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
    tmp = new_temp_file(path)       # exclusive: never a planted link
    try:
        fig.savefig(tmp, dpi=120, format="png")
        os.replace(tmp, path)
    finally:
        plt.close(fig)
        tmp.unlink(missing_ok=True)


def write_all(results: dict, out: Path) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=2))
    atomic_write_text(out / "results.md", markdown(results))
    plot(results, out / "test_acc.png")
