"""--config YAML values are checked against their field's type (issue 20, item 9): before, `freeze_backbone:
"false"` was stored as the string "false" and acted as True (the run froze its backbone)."""

from __future__ import annotations

import subprocess

import pytest

from conftest import PYTHON, REPO
from finetune.config import parse_config


def error_of(tmp_path, text: str) -> str:
    (tmp_path / "run.yaml").write_text(text)
    with pytest.raises(SystemExit) as exc:
        parse_config(["--config", str(tmp_path / "run.yaml"), "--data", "x"])
    assert exc.value.code == 2
    return str(exc.value)


@pytest.mark.parametrize("text, expected", [
    ('freeze_backbone: "false"\n', "freeze_backbone: expected true or false, got 'false' (str)"),
    ("channels_last: \"off\"\n", "channels_last: expected true or false, got 'off' (str)"),
    ("freeze_backbone: 1.5\n", "freeze_backbone: expected true or false, got 1.5 (float)"),
    ("compile: 1\n", "compile: expected true or false, got 1 (int)"),
    ("epochs: true\n", "epochs: expected an integer, got True (bool)"),
    ("epochs: 2.5\n", "epochs: expected an integer, got 2.5 (float)"),
    ("lr: [0.1]\n", "lr: expected a number, got a list (write one comma-separated string)"),
    ("lr: off\n", "lr: expected a number, got False (bool)"),
    ("precision: no\n", "precision: expected a string, got False (bool); YAML reads unquoted "
                        "yes/no/on/off/true/false as a bool: quote the value"),
    ("resume: {path: x}\n", "resume: expected a string, got {'path': 'x'} (dict)"),
    ("name: 2024\n", "name: expected a string, got 2024 (int)"),
    ("log_with: [tensorboard, mlflow]\n", "log_with: expected a string, got a list (write one comma-separated string)"),
    ("schedule: linear\n", "schedule: choose from constant, cosine, step"),
    ("epochs: 0\n", "epochs: must be a positive integer, got 0"),
])
def test_a_yaml_value_of_the_wrong_type_is_refused_naming_the_key(tmp_path, capsys, text, expected):
    error_of(tmp_path, text)
    lines = [x for x in capsys.readouterr().err.splitlines() if "error" in x]
    assert lines == [f"train.py: error: --config {tmp_path / 'run.yaml'}: {expected}"]


def test_well_typed_yaml_values_are_taken(tmp_path):
    (tmp_path / "run.yaml").write_text("freeze_backbone: true\nchannels_last: false\nlr: 5e-5\nepochs: 3\n"
                                       "precision: 'no'\nmomentum: 0\nresume:\nname: '2024'\n")
    cfg = parse_config(["--config", str(tmp_path / "run.yaml"), "--data", "x"])
    assert cfg.freeze_backbone is True and cfg.channels_last is False
    assert (cfg.lr, cfg.epochs, cfg.precision, cfg.momentum, cfg.resume, cfg.name) == \
        (5e-5, 3, "no", 0.0, "", "2024")       # `resume:` with no value is the default


@pytest.mark.slow
def test_the_train_script_exits_2_before_any_work(tmp_path):
    (tmp_path / "run.yaml").write_text('freeze_backbone: "false"\n')
    proc = subprocess.run([PYTHON, "train.py", "--config", str(tmp_path / "run.yaml"), "--data", "x",
                           "--output-dir", str(tmp_path / "run")], cwd=REPO, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("freeze_backbone: expected true or false, got 'false' (str)")
    assert not (tmp_path / "run").exists()
