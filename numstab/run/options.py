"""Declarative run options: one entry per option, from which validation and CLI flags derive.

Each field of a configuration dataclass (:class:`numstab.run.TrainConfig`) is declared with
:func:`option`, which records its type, allowed values or range, aliases and help text in the
field's metadata. Everything that accepts a run option reads that one declaration:

- :func:`coerce` validates and canonicalises a value (``TrainConfig.__post_init__``, sweep
  SPECs, figure specs): aliases become canonical names (``fp16`` -> ``float16``), integral
  floats of a float option become ``float`` (``1`` and ``1.0`` are one configuration);
- :func:`add_arguments` builds the ``argparse`` options of the command-line tools;
- :func:`describe` says what is allowed, for error messages and docs.

Adding an option is one ``option(...)`` entry in the dataclass.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
from collections.abc import Callable
from dataclasses import dataclass

__all__ = ["Option", "add_arguments", "coerce", "describe", "option", "options_of"]

KINDS = ("int", "float", "str", "bool", "ints")


@dataclass(frozen=True)
class Option:
    """What one run option accepts.

    Attributes
    ----------
    kind : {"int", "float", "str", "bool", "ints"}
        ``ints`` is a non-empty tuple of integers (e.g. hidden widths).
    help : str
        One line for ``--help``.
    choices : tuple of str, optional
        Canonical values of a ``str`` option.
    aliases : callable or dict, optional
        Maps an accepted spelling to its canonical value (a dict, or a function that raises
        ``ValueError`` for unknown names), applied before ``choices`` is checked.
    low, high : float, optional
        Range of a number (or of each entry of ``ints``); ``low_open``/``high_open`` exclude
        the end point.
    nonzero : bool
        0 is not allowed (a number option).
    nullable : bool
        ``None`` is allowed (means "off" or "the default rule"; the help says which).
    allowed : str, optional
        What a ``str`` option accepts, in words, where ``choices`` cannot list everything:
        ``choices`` then names the usual values and the ``aliases`` function alone decides
        (format names: ``eXmY`` for any X and Y); used by :func:`describe` and ``--help``.
    flag : str or None
        The command-line flag; ``""`` derives it from the field name; ``None`` hides the
        option from the command line.
    """

    kind: str
    help: str
    choices: tuple[str | None, ...] | None = None
    aliases: Callable[[str], str] | dict | None = None
    low: float | None = None
    high: float | None = None
    low_open: bool = False
    high_open: bool = False
    nullable: bool = False
    nonzero: bool = False
    flag: str | None = ""
    metavar: str | None = None
    allowed: str | None = None

    def __post_init__(self):
        if self.kind not in KINDS:
            raise ValueError(f"Option kind must be one of {KINDS}, got {self.kind!r}")


def option(default, kind: str, help: str, **rules):
    """A dataclass field carrying an :class:`Option` (``rules``: its other attributes)."""
    spec = Option(kind=kind, help=help, **rules)
    if isinstance(default, list):
        default = tuple(default)  # a dataclass default must be immutable
    return dataclasses.field(default=default, metadata={"option": spec})


def options_of(cls) -> dict[str, Option]:
    """Field name -> :class:`Option` of a dataclass declared with :func:`option`."""
    return {f.name: f.metadata["option"] for f in dataclasses.fields(cls) if "option" in f.metadata}


def describe(spec: Option) -> str:
    """What ``spec`` allows, as a phrase ("a finite number in (0, 1)", "one of: a, b")."""
    if spec.kind == "bool":
        text = "true or false"
    elif spec.kind == "str" and spec.allowed:
        text = spec.allowed
    elif spec.kind == "str":
        text = "one of: " + ", ".join("none" if c is None else c for c in spec.choices or ())
    else:
        what = {"int": "an integer", "float": "a finite number", "ints": "integers"}[spec.kind]
        if spec.nonzero:
            what = what.replace("a finite", "a non-zero finite")
            what = what.replace("an integer", "a non-zero integer")
        text = what + _range_text(spec)
        if spec.kind == "ints":
            text = "a list of " + text
    if spec.nullable and spec.kind != "str":
        text += ", or none"
    return text


def _range_text(spec: Option) -> str:
    lo, hi = spec.low, spec.high
    if lo is None and hi is None:
        return ""
    if lo is not None and hi is not None:
        a = "(" if spec.low_open else "["
        b = ")" if spec.high_open else "]"
        return f" in {a}{_num(lo)}, {_num(hi)}{b}"
    if lo is not None:
        return f" {'>' if spec.low_open else '>='} {_num(lo)}"
    return f" {'<' if spec.high_open else '<='} {_num(hi)}"


def _num(v: float) -> str:
    return str(int(v)) if float(v).is_integer() and abs(v) < 1e15 else repr(v)


def _in_range(spec: Option, v) -> bool:
    if spec.nonzero and v == 0:
        return False
    if spec.low is not None and (v <= spec.low if spec.low_open else v < spec.low):
        return False
    return not (spec.high is not None and (v >= spec.high if spec.high_open else v > spec.high))


def coerce(name: str, spec: Option, value):
    """The canonical value of ``value`` for option ``name``, or ``ValueError`` saying why not.

    Integers are accepted for float options (and become floats); integral floats are not
    accepted for int options (``2.5`` steps is an error, and so is ``2.0``: a config file that
    writes ``2.0`` for an integer is probably wrong elsewhere too). Booleans are never numbers.
    """

    def bad():
        return ValueError(f"{name} must be {describe(spec)}, got {value!r}")

    if value is None:
        if _allows_none(spec):
            return None
        raise bad()
    kind = spec.kind
    if kind == "bool":
        if isinstance(value, bool) or type(value).__name__ == "bool_":
            return bool(value)
        raise bad()
    if kind == "str":
        if not isinstance(value, str):
            raise bad()
        canon = value
        if callable(spec.aliases):
            try:
                canon = spec.aliases(value)
            except ValueError:
                raise bad() from None
        elif isinstance(spec.aliases, dict):
            canon = spec.aliases.get(value, value)
        if spec.choices is not None and canon not in spec.choices and not spec.allowed:
            raise bad()
        return canon
    if kind == "ints":
        if isinstance(value, (str, bytes)):
            raise bad()
        try:
            items = tuple(value)
        except TypeError:
            raise bad() from None
        if not items or not all(_is_int(v) and _in_range(spec, v) for v in items):
            raise bad()
        return tuple(int(v) for v in items)
    if kind == "int":
        if not _is_int(value) or not _in_range(spec, value):
            raise bad()
        return int(value)
    # float
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise bad()
    value_f = float(value)
    if not math.isfinite(value_f) or not _in_range(spec, value_f):
        raise bad()
    return value_f


def _allows_none(spec: Option) -> bool:
    return spec.nullable or (spec.choices is not None and None in spec.choices)


def _is_int(v) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and (
        type(v).__name__ != "bool_"
    )


# --- command line ---------------------------------------------------------------------------


def flag_of(name: str, spec: Option) -> str | None:
    """The command-line flag of option ``name`` (None if it has none)."""
    if spec.flag is None:
        return None
    return spec.flag or "--" + name.replace("_", "-")


def _parse_none(text: str):
    return None if text.strip().lower() in ("none", "off") else text


def _arg_type(name: str, spec: Option):
    """An argparse ``type=`` that parses one token and validates it with :func:`coerce`
    (argparse prefixes the flag to the message: "argument --lr: must be ..., got '0'")."""
    one = dataclasses.replace(spec, kind="int") if spec.kind == "ints" else spec
    parse_token = {"int": int, "float": float}.get(one.kind, str)

    def parse(text: str):
        if _allows_none(spec) and _parse_none(text) is None:
            return None
        try:
            return coerce(name, one, parse_token(text))
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {describe(one)}, got {text!r}") from None

    parse.__name__ = spec.kind  # argparse names the type in some messages
    return parse


def add_arguments(
    parser: argparse.ArgumentParser,
    cls,
    *,
    defaults: dict | None = None,
    help_overrides: dict | None = None,
) -> None:
    """Add one ``argparse`` option per command-line option of dataclass ``cls``.

    Parsed values are already validated and canonical (``--dtype fp16`` gives ``float16``);
    ``defaults`` overrides the dataclass defaults for this command; the help text shows the
    default and what is allowed.
    """
    defaults = defaults or {}
    help_overrides = help_overrides or {}
    fields = {f.name: f for f in dataclasses.fields(cls)}
    for name, spec in options_of(cls).items():
        flag = flag_of(name, spec)
        if flag is None:
            continue
        default = defaults.get(name, fields[name].default)
        text = help_overrides.get(name, spec.help)
        if spec.kind == "bool":
            parser.add_argument(
                flag, dest=name, action=argparse.BooleanOptionalAction, default=default,
                help=f"{text} (default: {'on' if default else 'off'})",
            )
            continue
        shown = "none" if default is None else (
            " ".join(map(str, default)) if isinstance(default, tuple) else default
        )
        allowed = ""
        if spec.kind == "str" and spec.allowed:
            allowed = "; " + spec.allowed
        elif spec.kind == "str":
            allowed = "; one of " + ", ".join("none" if c is None else c for c in spec.choices)
        elif spec.low is not None or spec.high is not None:
            allowed = ";" + _range_text(spec)
        kw = {
            "dest": name,
            "default": list(default) if isinstance(default, tuple) else default,
            "type": _arg_type(name, spec),
            "metavar": spec.metavar or ("N" if spec.kind in ("int", "ints") else (
                "X" if spec.kind == "float" else "NAME")),
            "help": f"{text} (default: {shown}{allowed})",
        }
        if spec.kind == "ints":
            kw["nargs"] = "+"
        parser.add_argument(flag, **kw)
