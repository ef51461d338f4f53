"""One source of truth for run options: TrainConfig, the command line and SPECs agree.

The reference for "is this value allowed" is the option's declaration read by hand here
(its documented range), and the property tests check that the CLI parser and TrainConfig give
the same verdict on the same value, so neither can drift from the other.
"""

from __future__ import annotations

import math
import subprocess
import sys

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from numstab import cli
from numstab.run import TrainConfig
from numstab.run.footprint import check_fits
from numstab.run.options import coerce, describe, flag_of, options_of

OPTIONS = options_of(TrainConfig)
TINY = ["--hidden", "4", "--modulus", "5", "--steps", "1", "--quiet"]


def _cli(*args, timeout=120):
    return subprocess.run(
        [sys.executable, "-m", "numstab.train", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
    )


# Each of these gave a traceback with rc 1 (the optimizer's own check fired inside the run)
# or, for --lr 0, was accepted by TrainConfig and SPECs while the CLI refused it.
BAD = [
    (["--eps", "-1"], "--eps"),
    (["--beta1", "1.5"], "--beta1"),
    (["--beta2", "1"], "--beta2"),
    (["--momentum", "-1", "--optimizer", "sgd"], "--momentum"),
    (["--dtype", "float16", "--state-dtype", "float16"], "underflows"),
    (["--optimizer", "adam", "--momentum", "0.9"], "momentum"),
    (["--lr", "0"], "--lr"),
    (["--lr", "nan"], "--lr"),
    (["--weight-decay", "-0.1"], "--weight-decay"),
    (["--stablemax-eps", "-1e-30"], "--stablemax-eps"),
    (["--dtype", "fp17"], "--dtype"),
    (["--modulus", "1"], "--modulus"),
    (["--hidden", "8", "0"], "--hidden"),
    (["--task", "parity", "--parity-k", "50"], "parity_k"),
    (["--encoding", "bits"], "encoding"),
    (["--alpha", "0"], "alpha"),
    # A run that cannot fit in memory: refused at once (it was a MemoryError traceback).
    (["--modulus", "1000000"], "memory"),
]


@pytest.mark.parametrize(("args", "named"), BAD, ids=[" ".join(a) for a, _ in BAD])
def test_bad_option_is_one_line_and_exit_2(args, named, tmp_path):
    r = _cli(*TINY, *args, "--out", str(tmp_path / "out"))
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in r.stderr, r.stderr
    assert named in lines[0]
    assert not (tmp_path / "out").exists()  # refused before anything is written


def test_aliases_are_accepted_and_canonical(tmp_path):
    r = _cli(*TINY, "--dtype", "fp16", "--loss", "softmax-stable", "--json")
    assert r.returncode == 0, r.stderr
    import json

    resolved = json.loads(r.stdout)["config"]["resolved"]
    assert resolved["dtype"] == "float16" and resolved["loss"] == "softmax_stable"
    assert TrainConfig(dtype="half") == TrainConfig(dtype="float16")


def test_train_config_refuses_what_the_cli_refuses():
    # lr = 0 trains nothing; it was refused by the CLI but accepted by TrainConfig and SPECs.
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=0)
    with pytest.raises(ValueError, match="momentum"):
        TrainConfig(optimizer="sgd", momentum=-1)
    with pytest.raises(ValueError, match="underflows"):
        TrainConfig(dtype="float16", state_dtype="float16")


PARSER_DEFAULTS = {"steps": 1, "lr": 0.01, "log_every": 1}


def _parse(flag_args):
    p = cli.Parser(prog="t")
    cli.add_run_options(p, **PARSER_DEFAULTS)
    return p.parse_args(flag_args)


def _verdicts(name, text):
    """(parser accepts, CLI accepts, TrainConfig accepts) for option ``name`` given as
    ``text``; the CLI is the parser then :func:`cli.config_from_args` (checks across options)."""
    spec = OPTIONS[name]
    try:
        args = _parse([flag_of(name, spec), *text.split()])
        parse_ok = True
    except SystemExit:
        parse_ok = False
    cli_ok = parse_ok
    if parse_ok:
        try:
            cli.config_from_args(args)
        except cli.UsageError:
            cli_ok = False
    parsed = {"int": int, "float": float}.get(spec.kind)
    try:
        if spec.kind == "ints":
            value = [int(t) for t in text.split()]
        elif parsed is not None:
            value = parsed(text)
        else:
            value = None if text == "none" and None in (spec.choices or ()) else text
        # The same configuration the parser's defaults give (steps 1, log_every 1).
        config = TrainConfig(**{**PARSER_DEFAULTS, name: value})
        cfg_ok = True
    except ValueError:
        cfg_ok = False
    if cfg_ok:
        # The commands also refuse a run too large for this machine's memory (a limit of the
        # machine, not of the option): TrainConfig accepts it.
        try:
            check_fits(config)
        except ValueError:
            return parse_ok, cli_ok, "too large"
    if parse_ok:
        # Whatever the parser accepts gives the same canonical value TrainConfig would store.
        assert getattr(args, name) == (
            list(coerce(name, spec, value)) if spec.kind == "ints" else coerce(name, spec, value)
        )
    return parse_ok, cli_ok, cfg_ok


# Single-option values only: checks across options (eps vs state format) need two options.
NUMERIC = [n for n, s in OPTIONS.items() if s.kind in ("int", "float") and flag_of(n, s)]


@settings(max_examples=200, deadline=None)
@given(
    name=st.sampled_from(NUMERIC),
    value=st.one_of(
        st.floats(allow_nan=True, allow_infinity=True),
        st.integers(-(2**40), 2**40),
        st.sampled_from([0, 1, -1, 0.5, 1.0, 2, 1e-300]),
    ),
)
@example(name="lr", value=0)
@example(name="beta2", value=1.0)
@example(name="train_fraction", value=1)
@example(name="p", value=745)  # valid, but too large for the commands on a 24 GiB machine
def test_cli_and_config_agree_on_every_number(name, value):
    spec = OPTIONS[name]
    text = repr(value) if isinstance(value, float) else str(value)
    if spec.kind == "int" and isinstance(value, float):
        return  # "2.0" is not an integer on the command line; TrainConfig refuses floats too
    if name == "momentum" and value not in (0, 0.0):
        return  # needs --optimizer sgd (a combination; covered by BAD)
    if name == "zero_target_grad_from" or name == "batch_size":
        text = str(value)
    parse_ok, cli_ok, cfg_ok = _verdicts(name, text)
    if cfg_ok == "too large":
        assert not cli_ok, (name, text)
        return
    assert cli_ok == cfg_ok, (name, text)
    # And a single value is judged by its declared range (eps also by the state format).
    v = float(value)
    lo_ok = spec.low is None or (v > spec.low if spec.low_open else v >= spec.low)
    hi_ok = spec.high is None or (v < spec.high if spec.high_open else v <= spec.high)
    declared = math.isfinite(v) and lo_ok and hi_ok and not (spec.nonzero and v == 0)
    assert parse_ok == declared, (name, value, describe(spec))


@pytest.mark.parametrize("name", [n for n, s in OPTIONS.items() if s.kind == "str"])
def test_cli_and_config_agree_on_every_choice(name):
    spec = OPTIONS[name]
    for choice in spec.choices:
        text = "none" if choice is None else choice
        if name == "encoding" and choice == "bits":
            continue  # parity only: a combination
        parse_ok, cli_ok, cfg_ok = _verdicts(name, text)
        # (a 16-bit state_dtype is refused with the default eps: a combination, same verdict)
        assert parse_ok and cli_ok == cfg_ok, (name, text)
    assert _verdicts(name, "no-such-choice") == (False, False, False)


def test_every_field_is_declared_once():
    import dataclasses

    assert set(OPTIONS) == {f.name for f in dataclasses.fields(TrainConfig)}
    flags = [flag_of(n, s) for n, s in OPTIONS.items() if flag_of(n, s)]
    assert len(flags) == len(set(flags))


def test_bool_and_float_are_not_confused():
    with pytest.raises(ValueError, match="bias"):
        TrainConfig(bias=1)
    with pytest.raises(ValueError, match="lr"):
        TrainConfig(lr=True)
    with pytest.raises(ValueError, match="steps"):
        TrainConfig(steps=2.0)
    assert TrainConfig(lr=1) == TrainConfig(lr=1.0)  # one config, one run id
