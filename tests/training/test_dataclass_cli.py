"""The one dataclass -> argparse helper (data_prep/dataclass_cli.py) behind train.py's Config and prepare's
PrepareOptions (issue 21, item 4): flags from fields, values back, validators, YAML values typed per field."""

from __future__ import annotations

import argparse
import math
import subprocess
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import PYTHON, REPO
from data_prep.dataclass_cli import (add_fields, choice, existing_path, given_values, nonneg_float, nonneg_int, option,
                                     parse_with_config, positive_float, positive_int, probability, read_yaml,
                                     typed_values)
from common.errors import UsageError, cli_main


@dataclass
class Opts:
    epochs: int = option("number of epochs", 5, type=positive_int)
    lr: float = option("learning rate", 0.1, type=positive_float)
    schedule: str = option("lr schedule", "constant", choices=("constant", "cosine"))
    fast: bool = option("go fast", True)
    out: str | Path | None = option("output folder", metavar="DIR")
    long_side: int | None = option("longer side", type=positive_int, exclusive="size")
    short_side: int | None = option("shorter side", type=positive_int, exclusive="size")
    quiet: bool = option("say less", False, flag="--hush", action="store_true")


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        raise UsageError(message)


def parser_for(**kw) -> argparse.ArgumentParser:
    parser = _Parser(prog="tool")
    add_fields(parser, Opts, **kw)
    return parser


def test_round_trip_flags_to_the_dataclass():
    parser = parser_for()
    assert Opts(**given_values(Opts, parser.parse_args([]))) == Opts()
    args = parser.parse_args(["--epochs", "3", "--lr", "5e-5", "--schedule", "cosine", "--no-fast", "--out", "o",
                              "--short-side", "64", "--hush"])
    assert Opts(**given_values(Opts, args)) == Opts(epochs=3, lr=5e-5, schedule="cosine", fast=False, out="o",
                                                    short_side=64, quiet=True)
    help_text = parser.format_help()
    assert "--fast, --no-fast" in help_text and "--out DIR" in help_text and "--epochs EPOCHS" in help_text
    assert "{constant,cosine}" in help_text and "--hush" in help_text


def test_suppress_keeps_only_the_flags_given():
    assert given_values(Opts, parser_for(suppress=True).parse_args(["--epochs", "2"])) == {"epochs": 2}


def test_help_groups_in_order_and_an_ungrouped_field_still_a_flag():
    groups = (("training", "the loop", ("epochs", "lr", "schedule")), ("output", None, ("out",)))
    parser = _Parser(prog="tool")
    made = add_fields(parser, Opts, groups)
    assert list(made) == ["training", "output", "more options"]
    text = parser.format_help()
    assert text.index("training:") < text.index("output:") < text.index("more options:") < text.index("\n  --hush")
    assert parser.parse_args(["--fast"]).fast is True


def test_mutually_exclusive_fields():
    with pytest.raises(UsageError, match="--short-side: not allowed with argument --long-side"):
        parser_for().parse_args(["--long-side", "1", "--short-side", "2"])


@pytest.mark.parametrize("argv, message", [
    (["--epochs", "0"], "argument --epochs: must be a positive integer, got 0"),
    (["--epochs", "x"], "argument --epochs: expected an integer, got 'x'"),
    (["--lr", "-1"], "argument --lr: must be > 0, got -1"),
    (["--lr", "nan"], "argument --lr: must be > 0, got nan"),
])
def test_a_refused_value_is_one_line_naming_the_flag(capsys, argv, message):
    def body():
        try:
            parser_for().parse_args(argv)
        except UsageError as e:       # argparse's message, as data_prep's one-line parser raises it
            raise UsageError(str(e)) from None
        return 0
    assert cli_main("tool", body) == 2
    assert capsys.readouterr().err.splitlines() == [f"tool: error: {message}"]


def test_validators():
    assert (positive_int("3"), nonneg_int("0"), nonneg_float("0"), positive_float("1e-3")) == (3, 0, 0.0, 1e-3)
    assert probability("0") == 0.0 and probability("1") == 1.0 and choice("a", "b")("b") == "b"
    for check, text in ((positive_int, "0"), (positive_int, "1.5"), (nonneg_int, "-1"), (nonneg_float, "nan"),
                        (positive_float, "0"), (probability, "1.01"), (probability, "nan"), (choice("a"), "c")):
        with pytest.raises(argparse.ArgumentTypeError):
            check(text)
    assert math.isinf(positive_float("inf"))     # as before the helper: only nan and values <= 0 are refused
    assert existing_path(str(REPO)) == str(REPO)
    with pytest.raises(argparse.ArgumentTypeError, match="no such file or directory"):
        existing_path(str(REPO / "no-such-file"))


@pytest.mark.parametrize("data, message", [
    ({"epochs": True}, "epochs: expected an integer, got True (bool)"),
    ({"epochs": 2.5}, "epochs: expected an integer, got 2.5 (float)"),
    ({"epochs": 0}, "epochs: must be a positive integer, got 0"),
    ({"lr": "fast"}, "lr: expected a number, got 'fast'"),
    ({"lr": [0.1]}, "lr: expected a number, got a list (write one comma-separated string)"),
    ({"fast": "false"}, "fast: expected true or false, got 'false' (str)"),
    ({"schedule": "linear"}, "schedule: choose from constant, cosine"),
    ({"schedule": False}, "schedule: expected a string, got False (bool); YAML reads unquoted "
                          "yes/no/on/off/true/false as a bool: quote the value"),
    ({"out": 3}, "out: expected a path or a string, got 3 (int)"),
    ({"nope": 1}, "unknown option 'nope'"),
])
def test_dict_values_are_typed_per_field(data, message):
    with pytest.raises(UsageError) as exc:
        typed_values(Opts, data, "where")
    assert str(exc.value) == f"where: {message}"


def test_well_typed_values_and_none_as_the_default():
    values = typed_values(Opts, {"epochs": 3, "lr": "5e-5", "long-side": 64, "fast": False, "out": None}, "w")
    assert values == {"epochs": 3, "lr": 5e-5, "long_side": 64, "fast": False}


def test_yaml_file_then_command_line(tmp_path):
    (tmp_path / "run.yaml").write_text("epochs: 3\nlr: 5e-5\nfast: false\n")
    parser = _Parser(prog="tool")
    add_fields(parser, Opts, suppress=True)
    parser.add_argument("--config")
    values = parse_with_config(parser, Opts, ["--config", str(tmp_path / "run.yaml"), "--epochs", "4"])
    assert values == {"epochs": 4, "lr": 5e-5, "fast": False}
    (tmp_path / "bad.yaml").write_text("epochs: [1\n")
    with pytest.raises(UsageError, match=r"--config .*bad.yaml: not valid YAML"):
        read_yaml(str(tmp_path / "bad.yaml"), Opts)
    (tmp_path / "list.yaml").write_text("- 1\n")
    with pytest.raises(UsageError, match="expected a mapping of option: value"):
        read_yaml(str(tmp_path / "list.yaml"), Opts)


@pytest.mark.slow
def test_the_helper_imports_neither_torch_nor_yaml():
    code = ("import sys, data_prep.dataclass_cli; "
            "print(sorted(m for m in ('torch', 'torchvision', 'yaml', 'finetune') if m in sys.modules))")
    proc = subprocess.run([PYTHON, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.strip() == "[]", (proc.stdout, proc.stderr)
