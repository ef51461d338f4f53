"""``python -m numstab.compare``: a training run in one format beside its reference, audited
against exact arithmetic.

From the same initialisation and data it trains the *test run* (``--dtype``) and the
*reference run* (``--reference``, float64 by default; longdouble when the test run is float64),
and every ``--audit-every`` steps audits the test run's logits with
:func:`numstab.audit.audit_cross_entropy` and recomputes its gradient from the exact logit
gradient (float64 backward through the run's own activations) to give the exact NLM alignment
``cos(θ, -∇L)`` for the same weights. It prints a table over the audited steps and a summary
with one plain sentence per finding; the table's rows are printed as their audits finish.

Outputs with ``--out DIR``: ``metrics.csv`` (the runs' metrics and, as run ``test`` split
``train``, every audited quantity: :data:`AUDIT_METRICS`), ``summary.json``, ``compare.png``
(:func:`build_figure`) and a checkpoint. ``--resume DIR`` alone continues an interrupted run
with its own options (given options must equal them).

Exit codes: 0 success; 2 bad option, unavailable backend, unwritable output directory, an
output directory another numstab process is writing to, or unusable checkpoint (before any
training); 3 a run produced NaN/inf (outputs up to that step are kept); 4 an output could not
be written (disk full: the rows logged and the last checkpoint are kept); 130 SIGINT, 143
SIGTERM (a checkpoint, partial outputs and the summary are written; ``--resume DIR`` continues
bit for bit).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from dataclasses import dataclass, field

import numpy as np
from threadpoolctl import threadpool_limits

from numstab import audit as A
from numstab import cli
from numstab.backend import namespace, to_numpy
from numstab.cli import UsageError, task_label
from numstab.metrics import param_cosines
from numstab.precision import PrecisionPolicy, available_formats, get_format
from numstab.rounding_modes import stochastic_scope
from numstab.run import MetricLog, NonFiniteError, Run, TrainConfig, summarize
from numstab.run.atomic import atomic_open
from numstab.run.checkpoint import CheckpointError, load_checkpoint
from numstab.run.driver import OutputError, Stopped, drive, graceful_stop, restore_runs
from numstab.run.runtime import runtime_info, tune_allocator

__all__ = ["AUDIT_METRICS", "DEFAULTS", "build_figure", "build_parser", "main"]

#: The built-in default: the paper's own modular-addition setup (AdamW lr 0.01, betas
#: (0.9, 0.99), eps 1e-25, f = 0.4), for enough steps that float32 passes 50 % Softmax
#: Collapse (seed 0: at step 1940, peak 0.507; see docs/cli.md).
DEFAULTS = {
    "steps": 2000,
    "lr": 0.01,
    "log_every": 20,
    "audit_every": 100,
}


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m numstab.compare",
        description="Train the paper's setup in one floating-point format beside a reference "
        "format, audit it against exact arithmetic, and report where and why they part.",
        formatter_class=cli.HelpFormatter,
    )
    cli.add_run_options(
        p,
        steps=DEFAULTS["steps"],
        lr=DEFAULTS["lr"],
        log_every=DEFAULTS["log_every"],
        test_run=True,
    )
    p.add_argument(
        "--reference",
        default=None,
        choices=[*available_formats(extended=True)],
        help="format of the reference run; default float64, or longdouble when --dtype is float64",
    )
    p.add_argument(
        "--audit-every",
        type=int,
        default=DEFAULTS["audit_every"],
        metavar="N",
        help="exact-audit interval (steps)",
    )
    p.add_argument(
        "--audit-samples",
        type=int,
        default=None,
        metavar="N",
        help="audit a seeded subset of this many training samples (default: all)",
    )
    cli.add_output_options(p, what="metrics.csv, summary.json, compare.png and checkpoints")
    return p


def _resolve(args) -> tuple[TrainConfig, TrainConfig | None, str | None]:
    """Validate options and build the two run configurations (``UsageError`` if invalid)."""
    if args.audit_every < 1:
        raise UsageError(f"--audit-every must be >= 1, got {args.audit_every}")
    if args.audit_samples is not None and args.audit_samples < 1:
        raise UsageError(f"--audit-samples must be >= 1, got {args.audit_samples}")
    test = cli.config_from_args(args)
    unaudited = [
        flag
        for flag, on in (
            (f"--loss {test.loss}", test.loss not in AUDITED_LOSSES),
            (f"--temperature {test.temperature:g}", test.temperature != 1),
            (f"--label-smoothing {test.label_smoothing:g}", test.label_smoothing != 0),
        )
        if on
    ]
    if unaudited:
        raise UsageError(
            f"{', '.join(unaudited)}: compare's exact audit covers the softmax, StableMax and "
            "absorption-free cross-entropies without temperature or label smoothing; "
            "train these with python -m numstab.train"
        )
    ref_name, why = args.reference, None
    if ref_name is None:
        ref_name = "float64"
        if get_format(args.dtype).name == "float64":
            if "longdouble" in available_formats():
                ref_name = "longdouble"
            else:
                ref_name, why = (
                    None,
                    (
                        "no reference run: the reference of a float64 run is x87 longdouble, and "
                        "this platform's long double is float64"
                    ),
                )
    if ref_name is None:
        return test, None, why
    if args.order == "wide" and get_format(ref_name).name == "longdouble":
        raise UsageError("--order wide is undefined for a longdouble run (nothing is wider)")
    ref = cli.config_from_args(
        args, dtype=ref_name, loss_dtype=None, state_dtype=None, rounding="nearest",
        subnormals="gradual", loss_rounding=None, loss_subnormals=None,
    )
    return test, ref, why


# --- the audits ---------------------------------------------------------------------------

#: Losses whose runs the exact audit covers (softmax_stable is audited as the softmax loss).
AUDITED_LOSSES = ("softmax", "stablemax", "softmax_stable")

#: The audited quantities written to metrics.csv (run ``test``, split ``train``): audit record
#: key -> (metric, layer). A key that already names a training metric gets an ``audit_``
#: prefix; ``nlm_cosine_exact`` also has one row per parameter tensor (layer = its name).
#: Not written: ``weight_norm`` (the run logs it) and ``audit_seconds`` (a timing: the CSV of a
#: resumed run must equal an uninterrupted run's byte for byte).
AUDIT_METRICS = {
    "sc_fraction_measured": ("sc_fraction_measured", ""),
    "sc_fraction_exact": ("sc_fraction_exact", ""),
    "agreement": ("sc_agreement", ""),
    "zero_loss_fraction": ("audit_zero_loss_fraction", ""),
    "zero_target_grad_fraction": ("audit_zero_target_grad_fraction", ""),
    "target_grad_100pct_wrong_fraction": ("target_grad_100pct_wrong_fraction", ""),
    "loss_max_ulp_error": ("loss_max_ulp_error", ""),
    "target_grad_rel_error_median": ("target_grad_rel_error_median", ""),
    "nlm_cosine_measured": ("nlm_cosine_measured", "global"),
    "nlm_cosine_exact": ("nlm_cosine_exact", "global"),
    "audited_samples": ("audited_samples", ""),
    "mpmath_rows": ("mpmath_rows", ""),
}
#: Written too when the loss rounds stochastically (numstab.audit_stochastic): the mean over
#: rows of P(normaliser = 1), and the loss's and target gradient's bias with its standard error.
SR_AUDIT_METRICS = (
    "sr_collapse_probability_mean", "sr_collapse_exact_rows", "sr_loss_bias_mean",
    "sr_loss_bias_se", "sr_target_grad_bias_mean", "sr_target_grad_bias_se",
)


def _log_audit(log: MetricLog, record: dict) -> None:
    """Append an audit record's quantities to the metric log (see :data:`AUDIT_METRICS`)."""
    t = record["step"]
    for key, (metric, layer) in AUDIT_METRICS.items():
        v = record[key]
        log.add(t, "test", "train", metric, math.nan if v is None else v, layer)
    for key in SR_AUDIT_METRICS:
        if key in record:
            v = record[key]
            log.add(t, "test", "train", key, math.nan if v is None else v, "")
    for layer, v in record["nlm_cosine_exact_layers"].items():
        log.add(t, "test", "train", "nlm_cosine_exact", v, layer)


@dataclass
class Auditor:
    """Exact audits of a run's training batch at chosen steps."""

    samples: int | None
    seed: int
    records: list = field(default_factory=list)
    seconds: float = 0.0

    def __call__(self, run: Run, ev, grads) -> None:
        t0 = time.perf_counter()
        c = run.config
        y = to_numpy(ev.cache.labels)
        logits = to_numpy(ev.logits)
        # Measured collapse is what the run itself computed, in the order its backend used
        # (NumPy's pairwise sum, or CUB's tree on a GPU); the audit supplies the exact verdict.
        measured = to_numpy(run.collapse(ev)).astype(bool)
        n = y.shape[0]
        rows = None
        if self.samples is not None and self.samples < n:
            rows = np.sort(
                np.random.default_rng([self.seed, 2, run.step]).choice(
                    n, self.samples, replace=False
                )
            )
        z = logits if rows is None else logits[rows]
        ya = y if rows is None else y[rows]
        meas = measured if rows is None else measured[rows]
        kind = "stablemax" if c.loss == "stablemax" else "softmax"
        fmt = run.policy.loss.name
        with stochastic_scope(c.seed, run.step, "audit"):  # one draw of stochastic rounding
            rep = A.audit_cross_entropy(
                z, ya, dtype=fmt, kind=kind, order=run.policy.order, eps=c.stablemax_eps
            )
            dz = A.exact_logit_gradient(logits, y, dtype=fmt, kind=kind, eps=c.stablemax_eps)
        s = rep.summary()
        s["sc_fraction_measured"] = float(np.mean(meas)) if meas.size else float("nan")
        s["agreement"] = float(np.mean(meas == rep.collapsed_exact)) if meas.size else 1.0
        # Exact NLM: the exact logit gradient of all training logits, backpropagated in
        # float64 through the run's own activations (relative error of each entry of the
        # exact logit gradient < 2**-39; the float64 backward adds < (depth·width)·2**-53).
        dz /= n
        xp = namespace(*run.params.values())
        g64 = run.net.backward(
            xp.asarray(dz), ev.model_cache, run.model, PrecisionPolicy.uniform("float64"), run.plan
        )
        cos_exact = param_cosines(run.params, g64, sign=-1.0)
        cos_meas = param_cosines(run.params, grads, sign=-1.0)
        self.records.append(
            {
                "step": run.step,
                "sc_fraction_measured": s["sc_fraction_measured"],
                "sc_fraction_exact": s["sc_fraction_exact"],
                "agreement": s["agreement"],
                "zero_loss_fraction": s["zero_loss_fraction"],
                "zero_target_grad_fraction": s["zero_target_grad_fraction"],
                "target_grad_100pct_wrong_fraction": s["target_grad_100pct_wrong_fraction"],
                "loss_max_ulp_error": s["loss_max_ulp_error"],
                "target_grad_rel_error_median": s["target_grad_rel_error_median"],
                "nlm_cosine_measured": cos_meas["global"],
                "nlm_cosine_exact": cos_exact["global"],
                "nlm_cosine_exact_layers": {k: v for k, v in cos_exact.items() if k != "global"},
                "weight_norm": float(
                    np.sqrt(
                        sum(float((v.astype(np.float64) ** 2).sum()) for v in run.params.values())
                    )
                ),
                "audited_samples": len(rep),
                "mpmath_rows": s["mpmath_rows"],
                "audit_seconds": s["seconds"],
                **{k: s[k] for k in SR_AUDIT_METRICS if k in s},
            }
        )
        _log_audit(run.log, self.records[-1])
        self.seconds += time.perf_counter() - t0


# --- report -------------------------------------------------------------------------------


_fmt = cli.fmt_value

#: Columns of the report table and the width of their values (a wider value widens its row).
_COLUMNS = (
    ("acc tr/te", 9),
    ("ref tr/te", 9),
    ("SC meas", 7),
    ("SC exact", 8),
    ("agree", 5),
    ("zero-loss", 9),
    ("tgt-grad err", 12),
    ("NLM meas", 8),
    ("NLM exact", 9),
    ("|θ|", 7),
)


class _Table:
    """The report table, printed a row at a time as the audits finish.

    Widths are fixed up front (no later row can re-align earlier ones). Row ``t`` needs both
    runs' metrics at step ``t``, so it is printed once both have done step ``t``.
    """

    def __init__(self, records: list, log: MetricLog, ref_name: str | None, steps: int, emit):
        self.records, self.log, self.ref_name, self.emit = records, log, ref_name, emit
        self.widths = [max(4, len(str(steps)))] + [max(len(h), w) for h, w in _COLUMNS]
        self.printed = 0

    def _line(self, cells) -> str:
        return "  ".join(c.rjust(w) for c, w in zip(cells, self.widths, strict=True))

    def header(self) -> None:
        self.emit(self._line(["step", *(h for h, _ in _COLUMNS)]))

    def print_ready(self, upto: int | None = None) -> None:
        """Print the rows not yet printed of steps <= ``upto`` (all with None)."""
        while self.printed < len(self.records):
            r = self.records[self.printed]
            if upto is not None and r["step"] > upto:
                return
            self.emit(self._line(self._cells(r)))
            self.printed += 1

    def _acc(self, run: str, split: str, t: int):
        s, v = self.log.series("accuracy", run=run, split=split)
        hit = np.flatnonzero(s == t)
        return float(v[hit[0]]) if hit.size else None

    def _cells(self, r: dict) -> list[str]:
        t = r["step"]

        def acc(run):
            tr, te = self._acc(run, "train", t), self._acc(run, "test", t)
            return f"{_fmt(tr, '.2f')}/{_fmt(te, '.2f')}"

        return [
            str(t),
            acc("test"),
            acc("reference") if self.ref_name else "-",
            _fmt(r["sc_fraction_measured"]),
            _fmt(r["sc_fraction_exact"]),
            _fmt(r["agreement"]),
            _fmt(r["zero_loss_fraction"]),
            _fmt(r["target_grad_rel_error_median"], ".2e"),
            _fmt(r["nlm_cosine_measured"]),
            _fmt(r["nlm_cosine_exact"]),
            _fmt(r["weight_norm"], ".1f"),
        ]


def _findings(summary: dict) -> list[str]:
    runs, audits = summary["runs"], summary["audit"]
    test = runs["test"]
    ref = runs.get("reference")
    tname = test["dtype"]
    out = []
    steps = summary["steps_run"]  # fewer than requested when the run stopped early
    status = summary["status"]
    if isinstance(status, dict):
        out.append(
            f"The run stopped at step {steps} of {summary['config']['steps']} "
            f"({status['kind']}): what follows covers the steps run."
        )
    t50 = test["sc50_step"]
    if ref is not None:
        r50 = ref["sc50_step"]
        rname = ref["dtype"]
        if t50 is not None and r50 is not None:
            if t50 < r50:
                out.append(
                    f"{tname} reaches 50 % Softmax Collapse {r50 - t50} steps before "
                    f"{rname} (step {t50} vs {r50})."
                )
            elif t50 > r50:
                out.append(
                    f"{tname} reaches 50 % Softmax Collapse {t50 - r50} steps after "
                    f"{rname} (step {t50} vs {r50})."
                )
            else:
                out.append(f"{tname} and {rname} both reach 50 % Softmax Collapse at step {t50}.")
        elif t50 is not None:
            out.append(
                f"{tname} reaches 50 % Softmax Collapse at step {t50}; {rname} does not "
                f"within {steps} steps (its SC fraction ends at "
                f"{_fmt(ref['final']['sc_fraction'])})."
            )
        elif r50 is not None:
            out.append(
                f"{rname} reaches 50 % Softmax Collapse at step {r50}; {tname} does not within "
                f"{steps} steps."
            )
        else:
            out.append(f"Neither run reaches 50 % Softmax Collapse within {steps} steps.")
    if audits:
        last = audits[-1]
        if last["target_grad_100pct_wrong_fraction"]:
            out.append(
                f"At step {last['step']} the {tname} target-class gradient is 100 % wrong "
                f"(exactly 0 where the exact one is not) on "
                f"{last['target_grad_100pct_wrong_fraction'] * 100:.0f} % of the audited "
                f"samples."
            )
        bad = [a for a in audits if a["agreement"] < 1]
        if not bad:
            out.append(
                f"Measured and exact collapse agree on every audited sample at all "
                f"{len(audits)} audited steps."
            )
        else:
            worst = min(bad, key=lambda a: a["agreement"])
            out.append(
                f"Measured and exact collapse disagree on {(1 - worst['agreement']) * 100:.1f} % "
                f"of samples at step {worst['step']}: rows inside the gap window, where the "
                f"summation order ({summary['config']['order']}) decides."
            )
        t100 = test["train100_step"]
        if t100 is not None:
            after = [a for a in audits if a["step"] >= t100]
            if after:
                a0, a1 = after[0], after[-1]
                out.append(
                    f"After {tname} fits the training set (step {t100}), the exact NLM alignment "
                    f"cos(θ, -∇L) goes from {a0['nlm_cosine_exact']:.3f} (step {a0['step']}) to "
                    f"{a1['nlm_cosine_exact']:.3f} (step {a1['step']}); measured: "
                    f"{a1['nlm_cosine_measured']:.3f}."
                )
    fin = test["final"]
    if fin["test_acc"] is not None:
        out.append(
            f"Final accuracy of {tname}: train {fin['train_acc']:.3f}, test "
            f"{fin['test_acc']:.3f}"
            + (
                f"; {ref['dtype']}: train {ref['final']['train_acc']:.3f}, test "
                f"{ref['final']['test_acc']:.3f}."
                if ref and ref["final"]["test_acc"] is not None
                else "."
            )
        )
    return out


def _summary(args, test_cfg, ref_cfg, why, log, auditor, error, legs, steps_run) -> dict:
    """The summary.json document; ``legs``: wall seconds of each leg (resumed runs have
    several), ``steps_run``: the steps the test run actually did."""
    runs = {}
    for name, cfg in (("test", test_cfg), ("reference", ref_cfg)):
        if cfg is None:
            continue
        s = summarize(log, name)
        runs[name] = {
            "dtype": cfg.dtype,
            "loss_dtype": cfg.loss_dtype or cfg.dtype,
            "sc_onset_step": s["sc_onset_step"],
            "sc50_step": s["sc50_step"],
            "train100_step": s["train100_step"],
            "grok_step": s["grok_step"],
            "final": {
                k: s["final"][k]
                for k in (
                    "step",
                    "train_acc",
                    "test_acc",
                    "sc_fraction",
                    "zero_loss_fraction",
                    "nlm_cosine",
                    "weight_norm",
                )
            },
        }
    audits = [{k: v for k, v in r.items()} for r in auditor.records]
    onset_exact = next((a["step"] for a in audits if a["sc_fraction_exact"] > 0), None)
    onset = runs["test"]["sc_onset_step"]
    nlm_at_onset = next(
        (a["nlm_cosine_exact"] for a in audits if onset is not None and a["step"] >= onset), None
    )
    config = dict(vars(args))
    config["resolved"] = {
        "test": test_cfg.to_dict(),
        "reference": ref_cfg.to_dict() if ref_cfg else None,
    }
    config["reference_note"] = why
    summary = {
        "config": config,
        "versions": cli.versions(),
        "runtime": runtime_info(),
        "runs": runs,
        "exact_sc_onset_step": onset_exact,
        "nlm_cosine_exact_at_onset": nlm_at_onset,
        "audit": audits,
        "audit_seconds": auditor.seconds,
        "wall_seconds": sum(legs),
        "wall_seconds_legs": legs,
        "steps_run": steps_run,
        "status": "ok" if error is None else error,
    }
    summary["findings"] = _findings(summary)
    return summary


def _config_line(cfg: dict) -> str:
    """The configuration in one line (report header, figure title)."""
    net = f"hidden {'-'.join(map(str, cfg['hidden']))}"
    if cfg.get("model") == "transformer":
        net = (f"transformer d {cfg['d_model']}, {cfg['heads']} heads, ff {cfg['d_ff']}, "
               f"dropout {cfg['dropout']}, {cfg['norm_placement']}-LN, {cfg['attention']}")
    return (
        f"{task_label(cfg)}, f = {cfg['train_fraction']}, {net}"
        f", {cfg['optimizer']} lr {cfg['lr']}, loss "
        f"{cfg['loss']}, order {cfg['order']}, {cfg['steps']} steps, seed {cfg['seed']}"
    )


#: One colour per run on every panel. The reference is drawn first, wide and pale, and the test
#: run over it, thin and opaque: where the two coincide the test curve stays visible inside
#: the reference's band.
_RUN_STYLE = {
    "reference": {"color": "tab:orange", "lw": 4.0, "alpha": 0.45, "zorder": 2},
    "test": {"color": "tab:blue", "lw": 1.4, "alpha": 1.0, "zorder": 3},
}


def build_figure(log: MetricLog, summary: dict):
    """The compare figure: accuracy, SC fraction, NLM alignment and weight norm over steps.

    Each run has one colour on every panel; the test run's exact audits are markers beside
    its measured SC fraction and NLM cosine; dashed and dotted vertical lines mark each run's
    SC onset and SC-50 step (labelled in the SC panel's legend); the title states the
    configuration. Returns a :class:`matplotlib.figure.Figure` (not attached to pyplot).
    """
    from matplotlib.figure import Figure

    runs = summary["runs"]
    cfg = summary["config"]
    names = [n for n in ("reference", "test") if n in runs]
    audits = summary["audit"]
    a_steps = [a["step"] for a in audits]
    fig = Figure(figsize=(12, 8), layout="constrained")
    ax_acc, ax_sc, ax_nlm, ax_norm = fig.subplots(2, 2).ravel()

    def curve(ax, name, metric, split="train", layer="", label=None, ls="-"):
        s, v = log.series(metric, run=name, split=split, layer=layer)
        ax.plot(s, v, ls, label=label, **_RUN_STYLE[name])

    for name in names:
        d = runs[name]["dtype"]
        curve(ax_acc, name, "accuracy", "train", label=f"{d} train")
        curve(ax_acc, name, "accuracy", "test", label=f"{d} test", ls="--")
        curve(ax_sc, name, "sc_fraction", label=f"{d} measured")
        curve(ax_nlm, name, "nlm_cos_grad", layer="global", label=f"{d} measured")
        curve(ax_norm, name, "weight_norm", layer="global", label=d)
    tdtype = runs["test"]["dtype"]
    exact = {
        "color": _RUN_STYLE["test"]["color"],
        "ls": "none",
        "marker": "o",
        "mfc": "none",
        "ms": 7,
        "mew": 1.5,
        "zorder": 4,
    }
    ax_sc.plot(
        a_steps, [a["sc_fraction_exact"] for a in audits], label=f"{tdtype} exact audit", **exact
    )
    ax_nlm.plot(
        a_steps, [a["nlm_cosine_exact"] for a in audits], label=f"{tdtype} exact audit", **exact
    )
    for name in names:
        r, color = runs[name], _RUN_STYLE[name]["color"]
        for key, what, ls in (("sc_onset_step", "SC onset", "--"), ("sc50_step", "SC-50", ":")):
            if r[key] is None:
                continue
            for ax in (ax_acc, ax_sc, ax_nlm, ax_norm):
                # Styled like the run's curves, so a reference marker at the same step stays
                # visible as a pale band around the test run's.
                ax.axvline(
                    r[key],
                    color=color,
                    ls=ls,
                    lw=3.0 if name == "reference" else 1.2,
                    alpha=_RUN_STYLE[name]["alpha"],
                    zorder=_RUN_STYLE[name]["zorder"] - 1.5,
                    label=f"{r['dtype']} {what} (step {r[key]})" if ax is ax_sc else None,
                )
    panels = (
        (ax_acc, "accuracy", "accuracy (fraction correct)"),
        (ax_sc, "Softmax Collapse (training samples)", "SC fraction"),
        (ax_nlm, "NLM alignment", "cos(θ, −∇L), all parameters"),
        (ax_norm, "weight norm", "‖θ‖₂, all parameters"),
    )
    for ax, title, ylabel in panels:
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    ref = f" vs {runs['reference']['dtype']}" if "reference" in runs else " (no reference run)"
    status = summary["status"]
    stopped = (
        f" — stopped at step {summary['steps_run']} ({status['kind']})"
        if isinstance(status, dict)
        else ""
    )
    fig.suptitle(f"numstab.compare: {tdtype}{ref}{stopped}\n{_config_line(cfg)}")
    return fig


def _plot(path, log, summary) -> str | None:
    """Write compare.png atomically; a note instead when matplotlib is missing."""
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return "compare.png skipped: matplotlib is not installed (pip install -e '.[plot]')"
    fig = build_figure(log, summary)
    with atomic_open(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    return None


def _adopt_checkpoint_options(parser, argv, args) -> dict:
    """``--resume DIR``: the options of the run in DIR, in place on ``args``.

    Options not given take the checkpoint's values; options given must equal them
    (``UsageError`` naming those that differ). Returns the checkpoint's ``extra``.
    """
    try:
        extra = load_checkpoint(args.resume).extra
    except CheckpointError as exc:
        raise UsageError(f"cannot resume: {exc}") from None
    saved = extra.get("options") if isinstance(extra, dict) else None
    if not isinstance(saved, dict):
        raise UsageError(
            f"cannot resume: the checkpoint in {args.resume!r} was not written by "
            "numstab.compare (its extra has no 'options')"
        )
    free = extra.get("free_options", {})
    cli.adopt_saved_options(
        parser,
        args,
        cli.given_options(parser, argv, args),
        saved,
        free if isinstance(free, dict) else {},
    )
    cli.wall_legs(extra)  # checked before anything is written
    return extra


@cli.holds_out_dir
def main(argv=None) -> int:
    """Run the comparison; returns the exit code (see :mod:`numstab.cli`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    before: dict = {}
    try:
        if args.resume is not None:
            before = _adopt_checkpoint_options(parser, argv, args)
        test_cfg, ref_cfg, why = _resolve(args)
        cli.check_backend(args.backend)
        cli.resolve_out(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2

    tune_allocator()
    log = MetricLog(os.path.join(args.out, "metrics.csv") if args.out else None)
    auditor = Auditor(samples=args.audit_samples, seed=args.seed)
    legs = cli.wall_legs(before)
    error, code = None, 0
    t0 = time.perf_counter()
    ref_name = ref_cfg.dtype if ref_cfg else None
    with threadpool_limits(limits=args.threads):
        runs = {"test": Run(test_cfg, name="test", log=log)}
        if ref_cfg is not None:
            runs["reference"] = Run(ref_cfg, name="reference", log=log, data=runs["test"].data)
        finished = False
        if args.resume:
            try:
                resumed = restore_runs(args.resume, runs)
                state = resumed.extra
                _check_saved_state(state)
                _check_resumable(state, args)
            except (CheckpointError, UsageError) as exc:
                print(f"{parser.prog}: error: cannot resume: {exc}", file=sys.stderr)
                return 2
            try:  # the CSV is rebuilt only now, once every check has passed
                log.reset(resumed.rows)
            except OSError as exc:
                print(f"{parser.prog}: {OutputError(exc, runs['test'].step)}", file=sys.stderr)
                return OutputError.exit_code
            auditor.records = list(state.get("audit", []))
            auditor.seconds = float(state.get("audit_seconds", 0.0))
            finished = bool(state.get("finished"))
        bar = None

        def emit(line: str) -> None:
            if bar is not None:
                bar.write(line)  # keeps a terminal bar intact
            else:
                print(line, flush=True)

        table = None
        if not args.json:  # the header first: a terminal bar then stays below it
            _print_header(args, test_cfg, ref_name, why)
            table = _Table(auditor.records, log, ref_name, args.steps, emit)
            table.header()
            table.print_ready(runs["test"].step - 1)  # the rows of earlier legs
        bar = cli.progress_bar(
            args.steps,
            f"{args.dtype} vs {ref_name or '-'}",
            args.quiet,
            initial=runs["test"].step,
        )

        def on_step(t):
            if bar is not None:
                bar.update(1)
            if table is not None:
                table.print_ready(t - 1)  # both runs have now done step t - 1

        def due(t):
            return t % args.audit_every == 0 or t == args.steps

        def extra():
            return {
                "audit": auditor.records,
                "audit_seconds": auditor.seconds,
                "options": _resume_options(args),
                "free_options": {"checkpoint_every": args.checkpoint_every},
                "wall_seconds_legs": [*legs, time.perf_counter() - t0],
            }

        try:
            if not finished:
                with graceful_stop() as stop:
                    drive(
                        runs,
                        log,
                        steps=args.steps,
                        checkpoint_dir=args.out if args.out else None,
                        checkpoint_every=args.checkpoint_every,
                        inspect=lambda name, run, t: auditor if name == "test" and due(t) else None,
                        log_policy=lambda t: True if due(t) else None,
                        progress=on_step,
                        extra=extra,
                        stop=stop,
                    )
        except NonFiniteError as exc:
            error = {"kind": "non-finite", "run": exc.run, "step": exc.step, "message": str(exc)}
            code = 3
        except Stopped as exc:
            error = {
                "kind": "interrupted",
                "signal": exc.signum,
                "step": exc.step,
                "message": f"{exc}; resume with --resume {args.out}" if args.out else str(exc),
            }
            code = exc.exit_code
        except KeyboardInterrupt:
            error = {
                "kind": "interrupted",
                "step": runs["test"].step,
                "message": "interrupted by user",
            }
            code = 130
        except OutputError as exc:
            error, code = exc.status(args.out), exc.exit_code
        finally:
            if table is not None:
                table.print_ready()
            if bar is not None:
                bar.close()
            log.close()
    summary = _summary(
        args,
        test_cfg,
        ref_cfg,
        why,
        log,
        auditor,
        error,
        extra()["wall_seconds_legs"],
        runs["test"].step,
    )
    note = None
    if args.out:
        try:
            cli.write_atomic(os.path.join(args.out, "summary.json"), cli.dump_json(summary))
            note = _plot(os.path.join(args.out, "compare.png"), log, summary)
        except OSError as exc:
            note = f"{parser.prog}: {OutputError(exc, runs['test'].step)}"
            code = code or OutputError.exit_code
    if args.json:
        print(cli.dump_json(summary), end="")
    else:
        _print_report(summary)
    if note:
        print(note, file=sys.stderr)
    if error is not None:
        print(f"{parser.prog}: {error['message']}", file=sys.stderr)
    return code


#: Options that may differ between an interrupted run and its resumption (they do not change
#: what is computed).
_RESUME_FREE = ("out", "resume", "quiet", "json", "checkpoint_every")


def _resume_options(args) -> dict:
    return {k: v for k, v in sorted(vars(args).items()) if k not in _RESUME_FREE}


def _check_saved_state(state: dict) -> None:
    """``CheckpointError`` unless the compare command's own ``extra`` fields are well formed."""
    if not isinstance(state.get("options", {}), dict):
        raise CheckpointError("extra.options: must be a JSON object")
    audit = state.get("audit", [])
    if not isinstance(audit, list) or not all(
        isinstance(r, dict) and isinstance(r.get("step"), int) for r in audit
    ):
        raise CheckpointError("extra.audit: must be a list of audit records with a step each")
    seconds = state.get("audit_seconds", 0.0)
    if isinstance(seconds, bool) or not isinstance(seconds, (int, float)) or not seconds >= 0:
        raise CheckpointError(f"extra.audit_seconds: must be a number >= 0, got {seconds!r}")


def _check_resumable(state: dict, args) -> None:
    saved = state.get("options", {})
    now = json.loads(json.dumps(_resume_options(args), default=cli.json_default))
    diff = [
        f"--{k.replace('_', '-')}: checkpoint {saved.get(k)!r}, now {now.get(k)!r}"
        for k in sorted(set(saved) | set(now))
        if saved.get(k) != now.get(k)
    ]
    if diff:
        raise UsageError("the options differ from the checkpointed run's: " + "; ".join(diff))


def _print_header(args, test_cfg, ref_name, why) -> None:
    print(f"numstab.compare: {_config_line(vars(args))}")
    loss = test_cfg.loss_dtype or test_cfg.dtype
    print(f"test run: {test_cfg.dtype} (loss {loss}); reference: {ref_name or why}")
    print(flush=True)


def _print_report(summary) -> None:
    """The summary and findings (the table was printed row by row)."""
    runs = summary["runs"]
    print()
    print("summary")
    for name, r in runs.items():
        print(
            f"  {name:9s} {r['dtype']:>10s}: SC onset {cli.fmt_step(r['sc_onset_step'])}, "
            f"SC-50 % {cli.fmt_step(r['sc50_step'])}, train 100 % "
            f"{cli.fmt_step(r['train100_step'])}, final train/test acc "
            f"{_fmt(r['final']['train_acc'])}/{_fmt(r['final']['test_acc'])}"
        )
    print(
        f"  exact-predicted SC onset (test run): {cli.fmt_step(summary['exact_sc_onset_step'])}"
        f"; exact NLM cos at onset: {_fmt(summary['nlm_cosine_exact_at_onset'])}"
    )
    legs = summary["wall_seconds_legs"]
    print(
        f"  wall time {summary['wall_seconds']:.1f} s"
        + (f" over {len(legs)} legs" if len(legs) > 1 else "")
        + f" (audits {summary['audit_seconds']:.2f} s)"
    )
    print()
    print("findings")
    for f in summary["findings"]:
        print(f"  - {f}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
