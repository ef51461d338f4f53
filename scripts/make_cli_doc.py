"""Regenerate docs/cli.md from real runs of the commands (never retyped).

    python scripts/make_cli_doc.py            # runs the default compare (a minute or two)

It runs ``python -m numstab.compare --dtype float32`` with its built-in defaults, times it,
captures ``--help`` of compare and train, copies the run's compare.png to
docs/figures/cli-compare.png, and writes docs/cli.md.
"""

from __future__ import annotations

import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(args: list[str]) -> tuple[str, float, int]:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", *args], cwd=ROOT, capture_output=True,
                          text=True, env={**os.environ, "COLUMNS": "100"})
    return proc.stdout + proc.stderr, time.perf_counter() - t0, proc.returncode


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def _written_after_train_help(path: Path) -> str:
    """The sections of ``path`` after the train help block (written by hand: the metrics, the
    other losses, ...), kept as they are."""
    if not path.exists():
        return ""
    old = path.read_text()
    start = old.find("```\nusage: python -m numstab.train")
    if start < 0:
        return ""
    end = old.find("```", start + 4)
    return old[end + 3 :] if end >= 0 else ""


def main() -> int:
    out_dir = ROOT / "runs" / "cli-doc"
    default, wall, code = run(["numstab.compare", "--dtype", "float32", "--quiet",
                               "--out", str(out_dir)])
    if code != 0:
        print(default, file=sys.stderr)
        return code
    compare_help, _, _ = run(["numstab.compare", "--help"])
    train_help, _, _ = run(["numstab.train", "--help"])
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    text = f"""# Command line

## `python -m numstab.compare`: a run beside its reference, audited

The main job. From the same initialisation and data it trains the *test run* in `--dtype` and
the *reference run* in `--reference` (float64; x87 longdouble when the test run is float64),
audits the test run's logits against exact arithmetic every `--audit-every` steps, and reports
where and why the two part.

The built-in default is the paper's own modular-addition setup (p = 113, f = 0.4, bias-free
200-200 ReLU MLP, AdamW lr 0.01 with betas (0.9, 0.99), eps 1e-25, no weight decay, softmax
cross-entropy) for 2000 steps, long enough for the float32 run to pass 50 % Softmax Collapse
(seed 0: from step 1940, peak 0.507, then an Adam instability resets it, driven by the
zero-sum violation the collapse leaves (docs/reproduction.md, *The work that followed*);
PyTorch CPU from the same weights peaks near 0.55). That holds because `exp` and `log` are
correctly rounded in the declared format (`--elementary correct`, the default): with NumPy's
own float32 `exp` (`--elementary libm`), which is biased by one ulp just below 0, the same run
peaks at 0.21 and never reaches 50 % (docs/elementary.md). The margin over 50 % is small:
another seed, or another BLAS's last bits, can peak just below it.

### A real run of the default

Produced by `python scripts/make_cli_doc.py`, which ran
`python -m numstab.compare --dtype float32 --quiet --out runs/cli-doc` on this machine
({cpu_model()}, {os.cpu_count()} cores, load average {load:.2f} at the end, niceness
{os.nice(0)}) in
**{wall:.1f} s** wall time:

```
{default.rstrip()}
```

Columns: `acc tr/te` train/test accuracy of the test run, `ref tr/te` of the reference run;
`SC meas` the fraction of training samples whose softmax normaliser is exactly 1 in the test
format and order; `SC exact` the fraction the exact audit says must collapse (the exact tail
`Σ_{{k≠max}} exp(z_k - max)` is at most the unit roundoff, so even the correctly rounded sum
is 1); `agree` the fraction of samples on which the two verdicts agree (they part inside the
gap window, where the summation order decides); `zero-loss` the fraction with a computed loss
of exactly 0; `tgt-grad err` the median relative error of the computed correct-class logit
gradient (1.00 = it is exactly 0 where the exact one is not); `NLM meas` / `NLM exact` the
cosine between the weights and the negative gradient, measured and recomputed from the exact
logit gradient (float64 backward through the run's own activations); `|θ|` the global weight
norm.

Each row of the table is printed (and flushed) as soon as both runs have passed its step, so
a long run shows its audits as they finish; the summary and findings follow at the end. On a
terminal a progress bar runs on stderr; where stderr is a file or a pipe (CI logs, `nohup`,
`> log 2>&1`) a plain line is printed every 10 s or 5 % of the steps, whichever comes first
(`float32 vs float64: step 300/1200 (25 %), 41.2 steps/s, ETA 22 s`). `--quiet` silences the
progress, `--json` prints the summary JSON instead of the report.

With `--out DIR`:

- `metrics.csv`, long format `step,run,split,metric,layer,value`, written as the runs go:
  every training metric of both runs and, as run `test` split `train` at the audited steps,
  every audited quantity: `sc_fraction_measured`, `sc_fraction_exact`, `sc_agreement`,
  `audit_zero_loss_fraction`, `audit_zero_target_grad_fraction`,
  `target_grad_100pct_wrong_fraction`, `loss_max_ulp_error`, `target_grad_rel_error_median`,
  `nlm_cosine_measured` (layer `global`), `nlm_cosine_exact` (layer `global` and one row per
  parameter tensor), `audited_samples`, `mpmath_rows`;
- `summary.json`: every option resolved, versions, per-run SC onset / SC-50 % / final metrics,
  every audit, `steps_run`, and `wall_seconds` (all legs of a resumed run) with
  `wall_seconds_legs` (one entry per leg);
- `compare.png` (with the `plot` extra): accuracy, SC fraction, NLM alignment and weight norm
  over steps, one colour per run on every panel (the reference wide and pale beneath, the test
  run thin on top, so both show where they coincide), the exact-audit SC fraction and NLM
  cosine as markers beside the measured curves, labelled vertical lines at each run's SC onset
  and SC-50 step, and the configuration in the title;
- a checkpoint (`checkpoint.json` + `checkpoint-NNNNNN.npz`). `--resume DIR` alone continues
  an interrupted run bit for bit with the options stored in the checkpoint; an option given
  explicitly must equal the stored one (otherwise the command exits 2 naming it, and nothing
  is written). The findings of an interrupted run speak of the steps it actually ran.

The default run's figure (`docs/figures/cli-compare.png`):

![compare.png of the default run](figures/cli-compare.png)

Exit codes: 0 success; 2 bad input before any training (an option, an unavailable backend, an
unwritable output directory or one another numstab process is writing to, an unusable
checkpoint); 3 a run produced NaN/inf (what was logged is kept and the summary names the run
and step); 4 an output could not be written (disk full: the rows logged and the last
checkpoint are kept); 130 SIGINT, 143 SIGTERM (a checkpoint, partial outputs and the summary
are written first).

### Options

```
{compare_help.rstrip()}
```

## `python -m numstab.train`: one run

It prints the run's SC onset, SC-50 %, train-100 % and grokking steps (`never` when not
reached) and the final accuracies and SC fraction with three digits. Progress, `--quiet`,
`--json`, `--out` and exit codes are as for compare; `--resume DIR` alone continues the run in
DIR with its configuration from the checkpoint (explicit options must equal it, except
`--steps`: a finished run resumed with a larger `--steps` continues to the new length, bit for
bit as one longer run).

```
{train_help.rstrip()}
```
"""
    figure = out_dir / "compare.png"
    if figure.exists():
        shutil.copyfile(figure, ROOT / "docs" / "figures" / "cli-compare.png")
    path = ROOT / "docs" / "cli.md"
    path.write_text(text + _written_after_train_help(path))
    print(f"wrote docs/cli.md (default compare: {wall:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
