"""What a user of train and compare sees: progress, help, printed numbers, resuming a folder."""

import argparse
import contextlib
import io
import json
import os
import re
import subprocess
import sys

import pytest
from helpers import StopAfter

from numstab.cli import compare, progress
from numstab.cli import train as train_cli
from numstab.run import loop as train_mod
from numstab.run.checkpoint import load_checkpoint

# Tiny and fast: p = 11, one 8-wide layer.
TINY = ["--modulus", "11", "--hidden", "8", "--steps", "40", "--log-every", "5", "--lr", "0.05"]
COMPARE = ["--modulus", "23", "--hidden", "32", "32", "--steps", "60", "--log-every", "10",
           "--audit-every", "20", "--lr", "0.05"]
LINE = re.compile(
    r"step (\d+)/(\d+) \((\d+) %\), ([\d.]+|-) steps/s, (ETA \S+( min \S+)? s|done in .+)$"
)


def progress_lines(text):
    return [m for m in (LINE.search(line) for line in text.splitlines()) if m]


def stop_after(n):
    @contextlib.contextmanager
    def fake():
        yield StopAfter(n)

    return fake


# --- progress without a terminal -------------------------------------------------------------


class Clock:
    def __init__(self, dt):
        self.t, self.dt = 0.0, dt

    def __call__(self):
        return self.t

    def tick(self):
        self.t += self.dt


def drive_lines(total, dt, **kw):
    out, clock = io.StringIO(), Clock(dt)
    p = progress.LineProgress(total, "run", stream=out, clock=clock, **kw)
    for _ in range(total):
        clock.tick()
        p.update(1)
    p.close()
    return out.getvalue()


def test_line_progress_every_fraction_of_the_steps():
    # 0.1 s a step, 10 s interval: the 5 % rule (every 5 of 100 steps) comes first.
    lines = progress_lines(drive_lines(100, 0.1, interval_s=10, fraction=0.05))
    assert [int(m[1]) for m in lines] == list(range(5, 101, 5))
    first = lines[0].group(0)
    # 5 steps in 0.5 s: 10.0 steps/s; 95 steps left: 9.5 s, printed rounded to whole seconds.
    assert first == "step 5/100 (5 %), 10.0 steps/s, ETA 10 s"
    assert lines[-1].group(0).startswith("step 100/100 (100 %), 10.0 steps/s, done in 10 s")


def test_line_progress_every_interval_when_steps_are_slow():
    # 3 s a step, 10 s interval: a line at the first step >= 10 s after the last line (every
    # 4 steps = 12 s), besides the lines of the 50 % rule (every 10 of the 20 steps).
    lines = progress_lines(drive_lines(20, 3.0, interval_s=10, fraction=0.5))
    assert [int(m[1]) for m in lines] == [4, 8, 10, 14, 18, 20]  # 10: the 50 % rule
    assert lines[0].group(0) == "step 4/20 (20 %), 0.3 steps/s, ETA 48 s"


def test_line_progress_of_a_resumed_run_counts_its_own_steps():
    out, clock = io.StringIO(), Clock(1.0)
    p = progress.LineProgress(100, "", initial=60, stream=out, clock=clock, fraction=0.1)
    for _ in range(10):
        clock.tick()
        p.update(1)
    # 10 steps in 10 s (not 70): 1.0 steps/s; the line falls on the 10 % grid (step 70).
    assert out.getvalue() == "step 70/100 (70 %), 1.0 steps/s, ETA 30 s\n"


def test_format_duration():
    assert [progress.format_duration(s) for s in (0, 22.4, 59.6, 725, 7380, None)] == [
        "0 s", "22 s", "1 min 00 s", "12 min 05 s", "2 h 03 min", "?"]


def test_compare_prints_progress_lines_without_a_terminal_and_quiet_silences_them(capsys):
    assert compare.main([*COMPARE]) == 0
    err = capsys.readouterr().err
    lines = progress_lines(err)
    # 5 % of 60 steps: a line every 3 steps (the run takes far less than the 10 s interval).
    assert [int(m[1]) for m in lines] == list(range(3, 61, 3))
    assert all(m[2] == "60" for m in lines)
    assert lines[-1][5].startswith("done in")
    assert compare.main([*COMPARE, "--quiet"]) == 0
    assert progress_lines(capsys.readouterr().err) == []


def test_train_prints_progress_lines_without_a_terminal(capsys):
    assert train_cli.main([*TINY]) == 0
    lines = progress_lines(capsys.readouterr().err)
    assert [int(m[1]) for m in lines] == list(range(2, 41, 2))


# --- the bar on a terminal -------------------------------------------------------------------


@pytest.mark.parametrize("columns", [None, 0, 5, 29])
def test_bar_keeps_its_statistics_on_unknown_or_narrow_terminals(columns):
    assert progress.bar_columns(columns) == 0  # tqdm: statistics without a bar, not trimmed
    assert progress.bar_columns(80) == 79


@pytest.mark.parametrize("cols", [0, 12])
def test_bar_on_a_zero_or_narrow_column_pty_shows_the_whole_count(tmp_path, cols):
    """A real pty of 0 (a fresh pty, some CI runners) or 12 columns, with COLUMNS=0."""
    pty = pytest.importorskip("pty")  # POSIX only
    import fcntl
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, cols, 0, 0))
    env = {**os.environ, "COLUMNS": "0"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "numstab.train", *TINY], stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL, stderr=slave, env=env,
    )
    os.close(slave)
    chunks = []
    while True:
        try:
            data = os.read(master, 4096)
        except OSError:  # EIO once the child has closed the pty
            break
        if not data:
            break
        chunks.append(data)
    os.close(master)
    assert proc.wait(timeout=120) == 0
    frames = [f for f in re.split(r"[\r\n]+", b"".join(chunks).decode()) if f.strip()]
    last = frames[-1]
    # The last frame holds the whole count and the closing bracket of tqdm's statistics
    # (tqdm's own width rule trims the last character at 0 columns and cuts the line to the
    # first 11 characters at 12).
    assert "40/40" in last and last.rstrip().endswith("step/s]"), frames


# --- the compare table streams -----------------------------------------------------------------


def table_steps(text):
    return [int(m[1]) for m in re.finditer(r"^\s*(\d+)\s+\d\.\d\d/\d\.\d\d\s", text, re.M)]


def test_compare_rows_are_printed_as_their_audits_finish(monkeypatch):
    out = io.StringIO()
    seen = {}
    real = train_mod.Run.advance

    def spy(self, *a, **k):
        if self.name == "test" and self.step == 50:
            seen.setdefault(50, out.getvalue())
        return real(self, *a, **k)

    monkeypatch.setattr(train_mod.Run, "advance", spy)
    with contextlib.redirect_stdout(out):
        assert compare.main([*COMPARE, "--quiet"]) == 0
    # Before step 50 is computed, the rows of the audits at 0, 20 and 40 are out already.
    assert table_steps(seen[50]) == [0, 20, 40]
    # The final report does not print them again.
    assert table_steps(out.getvalue()) == [0, 20, 40, 60]


# --- help ------------------------------------------------------------------------------------

PARSERS = {"train": train_cli.build_train_parser, "compare": compare.build_parser}


@pytest.mark.parametrize("name", sorted(PARSERS))
def test_help_states_each_default_once(name, monkeypatch):
    monkeypatch.setenv("COLUMNS", "300")
    parser = PARSERS[name]()
    text = parser.format_help()
    assert "(default: None)" not in text and "(default: False)" not in text
    blocks = re.split(r"\n(?=  -)", text.split("options:", 1)[1])
    for action in parser._actions:
        if not action.option_strings or action.default is argparse.SUPPRESS:
            continue
        block = next(b for b in blocks if b.strip().startswith(action.option_strings[0]))
        n = block.lower().count("default")
        assert n <= 1, block
        if action.default not in (None, False):
            assert n == 1, block  # a real default is stated


# --- train's report ---------------------------------------------------------------------------


def test_train_prints_formatted_numbers(capsys):
    assert train_cli.main([*TINY, "--quiet"]) == 0
    out = capsys.readouterr().out
    assert re.search(r"final train/test accuracy \d\.\d{3}/\d\.\d{3} \(step 40\)", out), out
    assert re.search(r"SC fraction \d\.\d{3},", out), out
    assert "None" not in out and "SC onset never" in out  # no collapse in 40 tiny steps


# --- resuming a folder alone -------------------------------------------------------------------


def test_train_resume_dir_alone_continues_the_run(tmp_path, monkeypatch, capsys):
    full, part = tmp_path / "full", tmp_path / "part"
    assert train_cli.main([*TINY, "--quiet", "--out", str(full)]) == 0
    with monkeypatch.context() as m:
        m.setattr(train_cli, "graceful_stop", stop_after(17))
        code = train_cli.main([*TINY, "--quiet", "--out", str(part), "--checkpoint-every", "5"])
    assert code == 143
    first = json.loads((part / "summary.json").read_text())
    capsys.readouterr()
    # An explicit option that differs from the checkpoint's is refused, naming it; nothing
    # is written.
    before = {p.name: p.read_bytes() for p in part.iterdir()}
    assert train_cli.main(["--resume", str(part), "--lr", "0.02"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "--lr 0.02 (checkpoint: 0.05)" in err, err
    assert {p.name: p.read_bytes() for p in part.iterdir()} == before
    # Alone (or with an option equal to the checkpoint's), it continues bit for bit.
    assert train_cli.main(["--resume", str(part), "--quiet", "--lr", "0.05"]) == 0
    assert (part / "metrics.csv").read_bytes() == (full / "metrics.csv").read_bytes()
    s = json.loads((part / "summary.json").read_text())
    assert s["config"]["hidden"] == [8] and s["config"]["steps"] == 40
    legs = s["wall_seconds_legs"]
    assert len(legs) == 2 and s["wall_seconds"] == sum(legs)
    assert 0 < legs[0] <= first["wall_seconds"]  # the first leg as checkpointed at its stop
    # The checkpoint interval of the first leg is kept.
    assert load_checkpoint(part).extra["free_options"] == {"checkpoint_every": 5}


def test_train_resume_of_a_finished_run_with_more_steps_continues(tmp_path):
    longer, part = tmp_path / "longer", tmp_path / "part"
    tiny60 = [*TINY, "--steps", "60", "--quiet"]
    assert train_cli.main([*tiny60, "--out", str(longer)]) == 0
    assert train_cli.main([*TINY, "--quiet", "--out", str(part)]) == 0
    assert train_cli.main(["--resume", str(part), "--steps", "60", "--quiet"]) == 0
    assert (part / "metrics.csv").read_bytes() == (longer / "metrics.csv").read_bytes()
