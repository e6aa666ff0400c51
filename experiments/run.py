"""Running the variants: one ordinary train.py process (or launcher job) per variant, one after the other;
each one's console output goes to the screen and to OUT/logs/<variant>.log. A failed variant is recorded
and the next one starts."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from finetune import UsageError

from .plan import Variant

REPO = Path(__file__).resolve().parents[1]
TRAIN_PY = REPO / "train.py"


def launcher_argv(launcher: str) -> list[str]:
    """'python' (default): this interpreter; otherwise the words of the launcher, e.g. 'accelerate launch
    --num_processes 2' or 'torchrun --nproc_per_node 8'. train.py and its flags follow."""
    if launcher.strip() in ("", "python"):
        return [sys.executable, str(TRAIN_PY)]
    return shlex.split(launcher) + [str(TRAIN_PY)]


def looks_like_run_dir(path: Path) -> bool:
    return any((path / x).exists() for x in ("config.yaml", "metrics.json", "tb", "checkpoints", "model.pt"))


def _effective_lr(run_dir: Path) -> float | None:
    """The backbone lr the run really used (config.yaml: after train.py's defaults and every flag)."""
    try:
        import yaml
        return float(yaml.safe_load((run_dir / "config.yaml").read_text())["lr"])
    except (OSError, ValueError, TypeError, KeyError, ImportError):
        return None


def summarize_metrics(run_dir: Path) -> dict:
    """The table's numbers from one run's metrics.json and config.yaml ({} if it has neither)."""
    lr = _effective_lr(run_dir)
    try:
        m = json.loads((run_dir / "metrics.json").read_text())
    except (OSError, ValueError):
        return {"lr": lr} if lr is not None else {}
    epochs = m.get("epochs") or []
    if not epochs:
        return {"weights": m.get("weights"), "lr": lr}
    accs = [e["test_acc"] for e in epochs]
    # "best" is chosen on val where the data has a val split (the test set must not pick the model)
    chooser = [e["val_acc"] for e in epochs] if all("val_acc" in e for e in epochs) else accs
    best = max(range(len(accs)), key=chooser.__getitem__)
    rates = [e.get("examples_per_sec") for e in epochs if e.get("examples_per_sec")]
    last = epochs[-1]
    return dict(weights=m.get("weights"), lr=lr, complete="final" in m, world_size=m.get("world_size"),
                epochs=[dict(epoch=e["epoch"], test_acc=e["test_acc"], train_loss=e["train_loss"],
                             train_acc=e["train_acc"], examples_per_sec=e.get("examples_per_sec")) for e in epochs],
                final_test_acc=last["test_acc"], best_test_acc=accs[best], best_epoch=epochs[best]["epoch"],
                final_train_loss=last["train_loss"], final_train_acc=last["train_acc"],
                test_samples=last.get("test_samples"), final_test_balanced_acc=last.get("test_balanced_acc"),
                final_ema_test_acc=last.get("ema_test_acc"),
                best_chosen_on="val" if chooser is not accs else "test",
                examples_per_sec=sum(rates) / len(rates) if rates else None)


def _last_line(log: Path) -> str:
    try:
        lines = [x.strip() for x in log.read_text(errors="replace").splitlines() if x.strip()]
    except OSError:
        return ""
    errors = [x for x in lines if "error" in x.lower() or x.startswith(("Traceback", "RuntimeError"))]
    return (errors or lines or [""])[-1][:300]


def run_variant(v: Variant, argv: list[str], out: Path, *, quiet: bool, env: dict | None = None) -> dict:
    """Run one variant to completion; return its results row."""
    run_dir = out / v.name
    log = out / "logs" / f"{v.name}.log"
    row = dict(name=v.name, group=v.group, what=v.what, flags=v.flags, argv=argv, run_dir=str(run_dir),
               log=str(log), **v.extra)
    if v.skip:
        return dict(row, status="skipped", reason=v.skip)
    log.parent.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
    start = time.time()
    with open(log, "w") as fh:
        fh.write("$ " + shlex.join(argv) + "\n")
        fh.flush()
        proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=full_env,
                                start_new_session=True, errors="replace")
        try:
            for line in proc.stdout:
                fh.write(line)
                fh.flush()                      # `tail -f OUT/logs/<variant>.log` while it runs
                if not quiet:
                    print(f"[{v.name}] {line}", end="", flush=True)
            rc = proc.wait()
        except KeyboardInterrupt:
            # The whole child job (a launcher starts several processes): ask (train.py saves a checkpoint
            # on TERM and exits 75), then insist.
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
            raise
    row.update(returncode=rc, duration_s=round(time.time() - start, 1), **summarize_metrics(run_dir))
    if rc == 0 and row.get("complete"):
        row["status"] = "ok"
    else:
        row["status"] = "failed"
        row["reason"] = (f"exit code {rc}: " if rc else "no final metrics: ") + (_last_line(log) or "no output")
    return row


def prepare_out(out: Path, variants: list[Variant], overwrite: bool) -> None:
    """Refuse to mix a new comparison into old run directories unless --overwrite; then clear them."""
    existing = [out / v.name for v in variants if (out / v.name).exists()]
    if existing and not overwrite:
        raise UsageError(f"{existing[0]} already exists (and {len(existing) - 1} more): pass --overwrite to "
                        f"replace these runs, or choose another --out")
    for path in existing:
        if not path.is_dir() or (not looks_like_run_dir(path) and any(path.iterdir())):
            raise UsageError(f"{path} is not a train.py run directory; not removing it")
    for path in existing:
        shutil.rmtree(path)
    out.mkdir(parents=True, exist_ok=True)
