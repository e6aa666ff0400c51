"""Dataclass -> argparse, once for the whole project: train.py's `Config` (finetune/config.py) and
`prepare`'s `PrepareOptions` (data_prep/options.py) declare their options as dataclass fields made by
`option()`, and this module turns them into flags (help groups, mutually exclusive groups, --x/--no-x
switches), collects the parsed values, and type-checks values from YAML or a dict against each field's
annotation and its flag's validator, so that a value is checked the same way wherever it comes from.

The validators (`positive_int`, `nonneg_float`, `probability`, `choice(...)`, `existing_path`...) take the
flag's text and return the value or raise argparse.ArgumentTypeError; argparse then names the flag in its
one-line message ("argument --epochs: must be a positive integer, got 0").

It sits in data_prep, the bottom of the import graph (finetune imports data_prep, never the reverse), and
imports neither torch nor yaml at import time: train.py answers --help before torch loads.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import Field, field, fields
from typing import Any, Callable, Iterable

from common.errors import UsageError

# ---- validators: flag text (or a YAML value) -> value, or argparse.ArgumentTypeError ------------------
_KIND_OF = {int: "an integer", float: "a number"}


def _number(convert: Callable, test: Callable[[Any], bool], need: str, name: str) -> Callable:
    def check(text):
        try:
            value = convert(text)
        except (TypeError, ValueError):
            raise argparse.ArgumentTypeError(f"expected {_KIND_OF[convert]}, got {text!r}") from None
        if not test(value):          # nan fails every comparison: refused by each bound
            raise argparse.ArgumentTypeError(f"must be {need}, got {text}")
        return value
    check.__name__ = check.__qualname__ = name
    return check


positive_int = _number(int, lambda v: v > 0, "a positive integer", "positive_int")
nonneg_int = _number(int, lambda v: v >= 0, ">= 0", "nonneg_int")
positive_float = _number(float, lambda v: v > 0, "> 0", "positive_float")
nonneg_float = _number(float, lambda v: v >= 0, ">= 0", "nonneg_float")
probability = _number(float, lambda v: 0 <= v <= 1, "a probability in [0, 1]", "probability")


def choice(*options: str) -> Callable[[str], str]:
    """A validator for one of `options` (where argparse's choices= does not apply, e.g. a --config value)."""
    def check(text):
        if text not in options:
            raise argparse.ArgumentTypeError(f"choose from {', '.join(options)}, got {text!r}")
        return text
    check.__name__ = check.__qualname__ = "choice"
    return check


def existing_path(text: str) -> str:
    if not os.path.exists(text):
        raise argparse.ArgumentTypeError(f"{text}: no such file or directory")
    return text


# ---- fields -------------------------------------------------------------------------------------------
def option(help: str, default=None, **meta) -> Field:
    """A dataclass field carrying its flag's metadata. Known keys: flag ('--x-y' from the name x_y if not
    given), type (a validator such as positive_int; str if not given), choices, metavar (NAME if not given),
    exclusive (fields naming the same group are mutually exclusive flags), action (e.g. 'store_true'; a bool
    field without one is a --x/--no-x switch), required, cli_default (a callable: the flag's default where it
    differs from the Python API's). Any other key (e.g. fingerprint) is the owner's and kept as given."""
    return field(default=default, metadata=dict(help=help, **meta))


def flag_of(f: Field) -> str:
    return f.metadata.get("flag") or "--" + f.name.replace("_", "-")


def add_fields(parser: argparse.ArgumentParser, cls, groups: Iterable | None = None, *, suppress: bool = False,
               help: Callable[[Field], str] | None = None) -> dict:
    """One flag per field of the dataclass `cls`. `groups`: ((title, description, field names), ...) in help
    order, one argument group each; fields in none of them go to a last group, 'more options' (so a new field
    is a flag before anybody groups it). Without `groups`: on the parser itself, in field order. `suppress`:
    flags not given are absent from the namespace (so a caller can tell given from default). `help(field)`:
    the help text shown (default: the field's own). Returns {title: argument group}."""
    known = {f.name: f for f in fields(cls)}
    if groups is None:
        groups = ((None, None, tuple(known)),)
    else:
        grouped = {name for _, _, names in groups for name in names}
        extra = tuple(name for name in known if name not in grouped)
        groups = tuple(groups) + ((("more options", None, extra),) if extra else ())
    made, exclusive = {}, {}
    for title, description, names in groups:
        target = parser if title is None else parser.add_argument_group(title, description)
        made[title] = target
        for name in names:
            f = known[name]
            key = f.metadata.get("exclusive")
            if key and key not in exclusive:
                exclusive[key] = target.add_mutually_exclusive_group()
            add_field(exclusive[key] if key else target, f, suppress=suppress, help=help(f) if help else None)
    return made


def add_field(target, f: Field, *, suppress: bool = False, help: str | None = None) -> None:
    """One field's flag on `target` (a parser or a group); see add_fields."""
    md = f.metadata
    kw = dict(dest=f.name, help=md["help"] if help is None else help)
    if md.get("required"):
        kw["required"] = True
    if suppress:
        kw["default"] = argparse.SUPPRESS
    elif md.get("cli_default"):
        kw["default"] = md["cli_default"]()
    elif "action" not in md:
        kw["default"] = f.default                    # store_true / store_false: argparse's own default
    if "action" in md:
        kw["action"] = md["action"]
    elif _kinds(f) == {"bool"}:
        kw["action"] = argparse.BooleanOptionalAction  # --x / --no-x: a YAML 'true' can be switched off
    else:
        kw.update(type=md.get("type") or str, choices=md.get("choices"),
                  metavar=md.get("metavar") or (None if md.get("choices") else f.name.upper()))
    target.add_argument(flag_of(f), **kw)


def shown(value) -> str:
    """A default as --help says it: on/off for a switch, 5e-05 for a float."""
    if isinstance(value, bool):
        return "on" if value else "off"
    return f"{value:g}" if isinstance(value, float) else str(value)


def parse_with_config(parser: argparse.ArgumentParser, cls, argv: list[str] | None, dest: str = "config") -> dict:
    """The options given, {field: value}: those of the YAML file named by the `dest` flag (checked by
    read_yaml), with the command line's over them. Build `parser` with add_fields(suppress=True), so that
    options not given are absent. A YAML problem is parser.error (exit 2)."""
    args = vars(parser.parse_args(argv))
    path = args.pop(dest, None)
    try:
        values = read_yaml(path, cls) if path else {}
    except UsageError as e:
        parser.error(str(e))
    return {**values, **args}


def given_values(cls, args: argparse.Namespace) -> dict:
    """{field: value} for the fields present in `args` (all of them, unless parsed with suppress=True)."""
    return {f.name: getattr(args, f.name) for f in fields(cls) if hasattr(args, f.name)}


# ---- YAML / dict values -------------------------------------------------------------------------------
_KINDS = {"bool": "true or false", "int": "an integer", "float": "a number", "str": "a string",
          "Path": "a path"}


def _kinds(f: Field) -> set:
    """The annotation's type names: 'int | None' -> {'int', 'None'}."""
    text = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    return {part.strip() for part in text.replace("Optional[", "").strip("]").split("|")}


def _is(kind: str, value) -> bool:
    if isinstance(value, bool):
        return kind == "bool"
    # PyYAML reads 5e-5 (no dot) as a string: a float field takes any string float() accepts
    return {"int": isinstance(value, int), "float": isinstance(value, (int, float, str)),
            "str": isinstance(value, str), "Path": isinstance(value, (str, os.PathLike))}.get(kind, False)


def typed_value(f: Field, value):
    """A YAML / dict value checked against its field's annotation, then by the flag's own validator and
    choices, so it is checked exactly like a command-line one. A ValueError says what was expected: YAML
    reads `no`, `off` and `1.5` as a bool or a float, and a string "false" is not false."""
    kinds = _kinds(f) - {"None"}
    if not any(_is(kind, value) for kind in kinds):
        hint = ("; YAML reads unquoted yes/no/on/off/true/false as a bool: quote the value"
                if isinstance(value, bool) and "str" in kinds else "")
        shown = "a list (write one comma-separated string)" if isinstance(value, list) else \
            f"{value!r} ({type(value).__name__})"
        expected = " or ".join(_KINDS.get(kind, kind) for kind in sorted(kinds))
        raise ValueError(f"expected {expected}, got {shown}{hint}")
    if kinds == {"bool"} or "action" in f.metadata:
        return value
    try:
        value = (f.metadata.get("type") or str)(str(value))
    except argparse.ArgumentTypeError as e:
        raise ValueError(str(e)) from None
    choices = f.metadata.get("choices")
    if choices and value not in choices:
        raise ValueError(f"choose from {', '.join(choices)}")
    return value


def typed_values(cls, data: dict, where: str) -> dict:
    """{field: value} from a mapping of option: value (names with - or _), each checked by typed_value; a
    `key:` with no value (None) is left out: the default, as if absent. A UsageError names `where` and the
    key: '--config run.yaml: epochs: must be a positive integer, got 0'."""
    if not isinstance(data, dict):
        raise UsageError(f"{where}: expected a mapping of option: value")
    known = {f.name: f for f in fields(cls)}
    values = {}
    for key, value in data.items():
        name = str(key).replace("-", "_")
        if name not in known:
            raise UsageError(f"{where}: unknown option '{key}'")
        if value is None:
            continue
        try:
            values[name] = typed_value(known[name], value)
        except ValueError as e:
            raise UsageError(f"{where}: {key}: {e}") from None
    return values


def read_yaml(path: str, cls) -> dict:
    """typed_values of a YAML file: '--config PATH: ...' UsageErrors for an unreadable file, invalid YAML, a
    non-mapping, an unknown key or a value of the wrong type."""
    import yaml        # here, not at import time: data_prep's own commands do not read YAML
    where = f"--config {path}"
    try:
        with open(path) as fh:
            data = yaml.safe_load(fh) or {}
    except OSError as e:
        raise UsageError(f"{where}: {e.strerror}") from None
    except yaml.YAMLError as e:
        raise UsageError(f"{where}: not valid YAML ({str(e).splitlines()[0]})") from None
    return typed_values(cls, data, where)
