"""`python -m experiments compare` for real on the tiny shards: table, plot, one TensorBoard directory per run,
the no-weights statement, a failing variant (non-zero exit, the others still run), and the checks made
before anything runs."""

from __future__ import annotations

import os
import re
import stat
import subprocess

import pytest

from conftest import PYTHON, REPO, TINY, read_json
from experiments.cli import main as experiments_main

FAST = ["--epochs", "1", "--max-steps-per-epoch", "1", *TINY]
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def compare(args: list, env: dict | None = None, timeout: int = 400) -> subprocess.CompletedProcess:
    full_env = {**os.environ, "OMP_NUM_THREADS": "2", "PYTHONUNBUFFERED": "1", **(env or {})}
    return subprocess.run([PYTHON, "-m", "experiments", "compare", *map(str, args)], cwd=REPO, env=full_env,
                          capture_output=True, text=True, timeout=timeout)


def table_rows(md: str) -> dict[str, dict[str, str]]:
    """results.md's table as {variant: {column header: cell}}."""
    def split(line):
        return [c.strip() for c in re.split(r"(?<!\\)\|", line.strip()[1:-1])]

    lines = [line for line in md.splitlines() if line.startswith("| ")]
    header = split(lines[0])
    assert header[0] == "variant"
    rows = {}
    for line in lines[1:]:
        cells = split(line)
        assert len(cells) == len(header), line
        rows[cells[0]] = dict(zip(header, cells))
    return rows


def assert_valid_png(path):
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC
    from PIL import Image
    with Image.open(path) as im:
        im.verify()
        assert im.size[0] > 300 and im.size[1] > 200


@pytest.fixture(scope="module")
def with_weights(shards, imagenet_like, tmp_path_factory):
    """finetune + scratch with a local 'ImageNet-like' state dict: both run, exit 0."""
    out = tmp_path_factory.mktemp("cmp") / "with-weights"
    proc = compare(["--data", shards, "--out", out, "--pretrained", imagenet_like, "--variants", "finetune,scratch",
                    "--seed", "3", "--", *FAST])
    return out, proc


@pytest.fixture(scope="module")
def no_weights_one_failing(shards, tmp_path_factory):
    """Default --pretrained auto with an empty torchvision cache, and a launcher that crashes the scratch run:
    finetune runs from random init (said plainly), scratch fails, head934 is skipped with its reason."""
    tmp = tmp_path_factory.mktemp("cmp-fail")
    launcher = tmp / "flaky-launcher"
    launcher.write_text('#!/bin/sh\ncase "$*" in *--scratch*) echo "simulated crash of $1" >&2; exit 3;; esac\n'
                        f'exec {PYTHON} "$@"\n')
    launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
    out = tmp / "no-weights"
    proc = compare(["--data", shards, "--out", out, "--variants", "head934,scratch,finetune", "--launcher", launcher,
                    "--", *FAST], env={"TORCH_HOME": str(tmp / "empty-torch-home")})
    return out, proc


@pytest.mark.slow
@pytest.mark.floor
def test_compare_writes_table_plot_json_and_one_tb_dir_per_run(with_weights, imagenet_like):
    out, proc = with_weights
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "no ImageNet weights" not in proc.stdout
    md = (out / "results.md").read_text()
    rows = table_rows(md)
    assert set(rows) == {"finetune", "scratch", "d2l book: fine-tune", "d2l book: scratch"}
    assert rows["finetune"]["status"] == "ok" and rows["scratch"]["status"] == "ok"
    assert f"pretrained weights from {imagenet_like}" in rows["finetune"]["weights"]
    assert "random init" in rows["scratch"]["weights"] and "--scratch" in rows["scratch"]["flags"]
    assert "0.939" in rows["d2l book: fine-tune"]["final test acc"] and "0.843" in rows["d2l book: scratch"]["final test acc"]
    assert_valid_png(out / "test_acc.png")
    results = read_json(out / "results.json")
    for name in ("finetune", "scratch"):
        run = out / name
        assert list((run / "tb").glob("events.out.tfevents.*")), f"no TensorBoard events in {run}"
        assert (run / "model.pt").is_file() and (out / "logs" / f"{name}.log").is_file()
        row = next(r for r in results["variants"] if r["name"] == name)
        metrics = read_json(run / "metrics.json")
        assert row["final_test_acc"] == metrics["final"]["test_acc"] and 0 <= row["final_test_acc"] <= 1
        assert float(rows[name]["final test acc"]) == pytest.approx(row["final_test_acc"], abs=5e-4)
        assert float(rows[name]["lr"]) == (5e-4 if name == "scratch" else 5e-5)     # train.py's defaults
        config = (run / "config.yaml").read_text()
        assert "seed: 3" in config
    assert results["seed"] == 3 and results["train_args"] == [str(a) for a in FAST]


@pytest.mark.slow
def test_table_shows_each_runs_balanced_accuracy(with_weights, tmp_path):
    """The 'balanced acc' column holds the last epoch's test_balanced_acc from the run's own metrics.json --
    not the accuracy column again, and re-read by `report` (a changed metrics.json changes the cell)."""
    import json
    import shutil
    out, proc = with_weights
    assert proc.returncode == 0
    rows = table_rows((out / "results.md").read_text())
    for name in ("finetune", "scratch"):
        last = read_json(out / name / "metrics.json")["epochs"][-1]
        assert rows[name]["balanced acc"] == f"{last['test_balanced_acc']:.3f}"
    assert rows["d2l book: fine-tune"]["balanced acc"] == ""
    # A copy of the comparison whose finetune run reports another balanced accuracy; accuracy unchanged.
    copy = tmp_path / "copy"
    shutil.copytree(out, copy)
    results = read_json(copy / "results.json")
    for row in results["variants"]:
        row["run_dir"] = str(copy / row["name"])
    (copy / "results.json").write_text(json.dumps(results))
    metrics = read_json(copy / "finetune" / "metrics.json")
    metrics["epochs"][-1]["test_balanced_acc"] = 0.4321
    (copy / "finetune" / "metrics.json").write_text(json.dumps(metrics))
    assert experiments_main(["report", "--out", str(copy)]) == 0
    again = table_rows((copy / "results.md").read_text())
    assert again["finetune"]["balanced acc"] == "0.432"
    assert again["finetune"]["final test acc"] == rows["finetune"]["final test acc"]
    assert again["scratch"]["balanced acc"] == rows["scratch"]["balanced acc"]
    finetune = next(r for r in read_json(copy / "results.json")["variants"] if r["name"] == "finetune")
    assert finetune["final_test_balanced_acc"] == 0.4321


@pytest.mark.slow
def test_same_data_and_seed_for_every_variant(with_weights, shards):
    import yaml
    out, _ = with_weights
    configs = [yaml.safe_load((out / n / "config.yaml").read_text()) for n in ("finetune", "scratch")]
    for c in configs:
        assert c["data"] == str(shards) and c["seed"] == 3 and c["epochs"] == 1 and c["image_size"] == 32
    assert configs[1]["scratch"] and not configs[0]["scratch"]


@pytest.mark.slow
def test_failing_variant_is_reported_and_the_others_still_run(no_weights_one_failing):
    out, proc = no_weights_one_failing
    assert proc.returncode == 1, proc.stdout[-3000:] + proc.stderr[-3000:]
    rows = table_rows((out / "results.md").read_text())
    # Canonical order whatever order --variants gave: finetune, scratch, head934.
    assert [r for r in rows if not r.startswith("d2l")] == ["finetune", "scratch", "head934"]
    assert rows["finetune"]["status"] == "ok" and float(rows["finetune"]["final test acc"]) >= 0
    assert rows["scratch"]["status"].startswith("failed: exit code 3") and "simulated crash" in rows["scratch"]["status"]
    assert rows["head934"]["status"].startswith("skipped: needs pretrained weights")
    assert "1 variant(s) failed: scratch" in proc.stderr
    assert (out / "finetune" / "model.pt").is_file()
    assert_valid_png(out / "test_acc.png")


@pytest.mark.slow
def test_no_weights_is_stated_plainly(no_weights_one_failing):
    out, proc = no_weights_one_failing
    statement = "no ImageNet weights: 'pretrained' variants start from random init"
    assert statement in proc.stdout
    md = (out / "results.md").read_text()
    assert statement in md.split("| variant")[0]                  # in the header, above the table
    assert "random init" in table_rows(md)["finetune"]["weights"]
    assert read_json(out / "results.json")["weights_note"].startswith(statement)
    finetune = read_json(out / "results.json")["variants"][0]
    assert finetune["name"] == "finetune" and finetune["flags"] == ["--pretrained", "none", "--seed", "0"]


@pytest.mark.slow
def test_report_rerenders_from_the_runs(with_weights, capsys):
    out, _ = with_weights
    (out / "results.md").unlink()
    (out / "test_acc.png").unlink()
    assert experiments_main(["report", "--out", str(out)]) == 0
    assert "| finetune |" in (out / "results.md").read_text()
    assert_valid_png(out / "test_acc.png")


def test_dry_run_with_weights_plans_head934_and_the_lr_sweep(shards, imagenet_like, tmp_path, capsys):
    code = experiments_main(["compare", "--data", str(shards), "--out", str(tmp_path / "x"), "--pretrained",
                             str(imagenet_like), "--variants", "all", "--lrs", "1e-4,0.0015",
                             "--scratch-lrs", "1e-3", "--dry-run", "--", "--epochs", "2"])
    out = capsys.readouterr().out
    assert code == 0 and not (tmp_path / "x").exists()
    lines = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    from experiments.plan import ABLATIONS
    assert list(lines) == ["finetune", "scratch", "frozen", "head934", "lr-1e-4", "lr-1.5e-3", "scratch-lr-1e-3",
                           "modern", "lpft", *ABLATIONS]          # 'all': every group, the recipes' too
    assert "--head-init imagenet-class:934" in lines["head934"] and "SKIPPED" not in lines["head934"]
    assert "--freeze-backbone" in lines["frozen"] and "--lr 1.5e-3" in lines["lr-1.5e-3"]
    assert f"--pretrained {imagenet_like}" in lines["finetune"] and "--pretrained none" in lines["scratch"]
    assert all("--epochs 2" in line and "--seed 0" in line for line in lines.values())
    assert "no ImageNet weights" not in out


@pytest.mark.parametrize("args, needle", [
    (["--", "--output-dir", "x"], "set by the runner"),
    (["--", "--seed", "1"], "use compare's --seed"),
    (["--", "--no-such-flag"], "not a train.py flag: --no-such-flag"),
    (["--", "--epochs", "0"], "must be a positive integer"),
    (["--variants", "finetune,bogus"], "unknown bogus"),
    (["--lrs", "1e-4,abc"], "--lrs 1e-4,abc"),
    (["--lrs", "1e-4,1e-4"], "the same run twice"),
    (["--variants", "scratch", "--", "--freeze-backbone"], "variant scratch: train.py: error: --scratch and"),
    (["--pretrained", "/no/such/weights.pth"], "no such file"),
    (["--launcher", "no-such-launcher --flag"], "no-such-launcher not found"),
])
def test_usage_errors_exit_2_before_anything_runs(shards, tmp_path, capsys, args, needle):
    out = tmp_path / "out"
    assert experiments_main(["compare", "--data", str(shards), "--out", str(out), *args]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("experiments: error: ") and needle in err[-1], err
    assert not out.exists()


def test_offline_imagenet_and_missing_data_are_one_line(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))
    monkeypatch.setattr("torch.hub.load_state_dict_from_url",
                        lambda *a, **k: (_ for _ in ()).throw(OSError("offline (simulated)")))
    assert experiments_main(["compare", "--data", str(shards), "--pretrained", "imagenet", "--dry-run"]) == 2
    assert "resnet18-f37072fd.pth" in capsys.readouterr().err
    assert experiments_main(["compare", "--data", str(tmp_path / "nothing"), "--dry-run"]) == 2
    assert "no manifest.json" in capsys.readouterr().err


def test_existing_runs_are_not_overwritten_without_asking(shards, tmp_path, capsys):
    out = tmp_path / "out"
    (out / "finetune").mkdir(parents=True)
    (out / "finetune" / "config.yaml").write_text("old: run\n")
    args = ["compare", "--data", str(shards), "--out", str(out), "--variants", "finetune", "--pretrained", "none"]
    assert experiments_main(args) == 2
    assert "pass --overwrite" in capsys.readouterr().err
    assert (out / "finetune" / "config.yaml").read_text() == "old: run\n"
    (out / "scratch").mkdir()
    (out / "scratch" / "precious.txt").write_text("mine")
    assert experiments_main(args[:-3] + ["finetune,scratch", "--pretrained", "none", "--overwrite"]) == 2
    assert "not a train.py run directory" in capsys.readouterr().err
    assert (out / "scratch" / "precious.txt").exists() and (out / "finetune" / "config.yaml").exists()


@pytest.mark.slow
def test_terminated_runner_stops_its_run_and_writes_what_it_has(shards, tmp_path):
    """TERM to the runner (e.g. a Slurm time limit): the running train.py job gets TERM, the results so far are
    written, exit 130. A launcher that just sleeps stands in for a long training run."""
    import signal
    import time
    launcher = tmp_path / "slow-launcher"
    pidfile = tmp_path / "launcher.pid"
    launcher.write_text(f"#!/bin/sh\necho $$ > {pidfile}\nexec sleep 120\n")
    launcher.chmod(launcher.stat().st_mode | stat.S_IEXEC)
    out = tmp_path / "out"
    proc = subprocess.Popen([PYTHON, "-m", "experiments", "compare", "--data", str(shards), "--out", str(out),
                             "--pretrained", "none", "--variants", "finetune,scratch", "--launcher", str(launcher)],
                            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not pidfile.exists() and time.time() < deadline:
        time.sleep(0.2)
    time.sleep(0.5)
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=60)
    assert proc.returncode == 130, err
    rows = table_rows((out / "results.md").read_text())
    assert rows["finetune"]["status"] == "failed: interrupted" and rows["scratch"]["status"] == "not run: interrupted"
    with pytest.raises(ProcessLookupError):                          # the running job was stopped, not orphaned
        os.kill(int(pidfile.read_text()), 0)


@pytest.mark.slow
def test_launcher_runs_each_variant_as_a_multi_process_job(shards, tmp_path):
    """--launcher "accelerate launch ..." (2 CPU processes over gloo): the variant runs as a DDP job."""
    from conftest import ACCELERATE
    out = tmp_path / "ddp"
    launcher = (f"{ACCELERATE} launch --multi_gpu --num_processes 2 --num_machines 1 --mixed_precision no "
                f"--dynamo_backend no --main_process_port 0")
    proc = compare(["--data", shards, "--out", out, "--variants", "scratch", "--launcher", launcher, "--quiet",
                    "--", *FAST], env={"ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"})
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "world_size=2 " in (out / "logs" / "scratch.log").read_text()
    assert read_json(out / "scratch" / "metrics.json")["world_size"] == 2
    assert table_rows((out / "results.md").read_text())["scratch"]["status"] == "ok"


def test_mean_and_95_percent_interval():
    from experiments.report import mean_ci
    mean, half = mean_ci([0.8, 0.9, 1.0])
    assert mean == pytest.approx(0.9) and half == pytest.approx(4.303 * 0.1 / 3 ** 0.5)
    assert mean_ci([0.7]) == (0.7, 0.0)


@pytest.mark.slow
def test_several_seeds_give_one_run_each_and_a_mean_table(shards, imagenet_like, tmp_path):
    import yaml
    out = tmp_path / "seeds"
    proc = compare(["--data", shards, "--out", out, "--pretrained", imagenet_like, "--variants", "finetune,scratch",
                    "--seeds", "4,7", "--", *FAST])
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    finals = {}
    for name in ("finetune", "scratch"):
        for seed in (4, 7):
            run = out / f"{name}-s{seed}"
            assert yaml.safe_load((run / "config.yaml").read_text())["seed"] == seed
            finals.setdefault(name, []).append(read_json(run / "metrics.json")["final"]["test_acc"])
    md = (out / "results.md").read_text()
    assert "## Mean over seeds 4, 7" in md
    mean_table = md.split("## Mean over seeds")[1].split("## Every run")[0]
    rows = table_rows("\n".join(line for line in mean_table.splitlines() if line.startswith("| ")))
    for name, values in finals.items():
        mean = sum(values) / 2
        half = 12.706 * abs(values[0] - values[1]) / 2 ** 0.5 / 2 ** 0.5       # t(0.975, 1) * sd / sqrt(2)
        assert rows[name]["runs"] == "2"
        assert rows[name]["final test acc: mean ± 95 % CI"] == f"{mean:.3f} ± {half:.3f}"
    every = table_rows("\n".join(line for line in md.split("## Every run")[1].splitlines() if line.startswith("| ")))
    assert {"finetune-s4", "finetune-s7", "scratch-s4", "scratch-s7"} <= set(every)
    assert read_json(out / "results.json")["seeds"] == [4, 7]
    assert_valid_png(out / "test_acc.png")
