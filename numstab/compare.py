"""``python -m numstab.compare``: a training run in one format beside its reference, audited
against exact arithmetic.

From the same initialisation and data it trains the *test run* (``--dtype``) and the
*reference run* (``--reference``, float64 by default; longdouble when the test run is float64),
and every ``--audit-every`` steps audits the test run's logits with
:func:`numstab.audit.audit_cross_entropy` and recomputes its gradient from the exact logit
gradient (float64 backward through the run's own activations) to give the exact NLM alignment
``cos(θ, -∇L)`` for the same weights. It prints a table over the audited steps and a summary
with one plain sentence per finding.

Exit codes: 0 success; 2 bad option, unavailable backend, unwritable output directory or
unusable checkpoint (before any training); 3 a run produced NaN/inf (outputs up to that step
are kept); 130 SIGINT, 143 SIGTERM (a checkpoint, partial outputs and the summary are written;
``--resume DIR`` continues bit for bit).
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

from numstab import audit as A
from numstab import cli
from numstab.backend import namespace, to_numpy
from numstab.checkpoint import CheckpointError
from numstab.cli import UsageError
from numstab.driver import Stopped, drive, graceful_stop, resume_runs
from numstab.metrics import param_cosines
from numstab.mlp import backward
from numstab.precision import PrecisionPolicy, available_formats, get_format
from numstab.runtime import runtime_info, tune_allocator
from numstab.train import MetricLog, NonFiniteError, Run, TrainConfig, summarize

__all__ = ["DEFAULTS", "build_parser", "main"]

#: The built-in default: the paper's modular-addition setup with a learning rate high enough
#: that float32 collapses (>= 50 % SC) within the step budget on a laptop.
DEFAULTS = {
    "steps": 1200,
    "lr": 0.07,
    "log_every": 20,
    "audit_every": 100,
}


def build_parser() -> argparse.ArgumentParser:
    p = cli.Parser(
        prog="python -m numstab.compare",
        description="Train the paper's setup in one floating-point format beside a reference "
        "format, audit it against exact arithmetic, and report where and why they part.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
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
        choices=[*available_formats()],
        help="format of the reference run; default float64, or longdouble when --dtype is float64",
    )
    p.add_argument(
        "--audit-every",
        type=int,
        default=DEFAULTS["audit_every"],
        help="exact-audit interval (steps)",
    )
    p.add_argument(
        "--audit-samples",
        type=int,
        default=None,
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
    ref = cli.config_from_args(args, dtype=ref_name, loss_dtype=None, state_dtype=None)
    return test, ref, why


# --- the audits ---------------------------------------------------------------------------


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
        rep = A.audit_cross_entropy(
            z, ya, dtype=fmt, kind=kind, order=run.policy.order, eps=c.stablemax_eps
        )
        s = rep.summary()
        s["sc_fraction_measured"] = float(np.mean(meas)) if meas.size else float("nan")
        s["agreement"] = float(np.mean(meas == rep.collapsed_exact)) if meas.size else 1.0
        # Exact NLM: the exact logit gradient of all training logits, backpropagated in
        # float64 through the run's own activations (relative error of each entry of the
        # exact logit gradient < 2**-39; the float64 backward adds < (depth·width)·2**-53).
        dz = A.exact_logit_gradient(logits, y, dtype=fmt, kind=kind, eps=c.stablemax_eps)
        dz /= n
        xp = namespace(*run.params.values())
        g64 = backward(
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
            }
        )
        self.seconds += time.perf_counter() - t0


# --- report -------------------------------------------------------------------------------


def _fmt(v, spec=".3f"):
    if v is None or (isinstance(v, float) and math.isnan(v)):
        return "-"
    return format(v, spec)


def _table(records, log: MetricLog, ref_name: str | None) -> str:
    head = [
        "step",
        "acc tr/te",
        "ref tr/te",
        "SC meas",
        "SC exact",
        "agree",
        "zero-loss",
        "tgt-grad err",
        "NLM meas",
        "NLM exact",
        "|θ|",
    ]
    lines = []
    for r in records:
        t = r["step"]

        def acc(run, split, t=t):
            s, v = log.series("accuracy", run=run, split=split)
            hit = np.flatnonzero(s == t)
            return float(v[hit[0]]) if hit.size else None

        lines.append(
            [
                str(t),
                f"{_fmt(acc('test', 'train'), '.2f')}/{_fmt(acc('test', 'test'), '.2f')}",
                (
                    f"{_fmt(acc('reference', 'train'), '.2f')}/"
                    f"{_fmt(acc('reference', 'test'), '.2f')}"
                    if ref_name
                    else "-"
                ),
                _fmt(r["sc_fraction_measured"]),
                _fmt(r["sc_fraction_exact"]),
                _fmt(r["agreement"]),
                _fmt(r["zero_loss_fraction"]),
                _fmt(r["target_grad_rel_error_median"], ".2e"),
                _fmt(r["nlm_cosine_measured"]),
                _fmt(r["nlm_cosine_exact"]),
                _fmt(r["weight_norm"], ".1f"),
            ]
        )
    widths = [
        max(len(h), *(len(row[i]) for row in lines)) if lines else len(h)
        for i, h in enumerate(head)
    ]
    out = ["  ".join(h.rjust(w) for h, w in zip(head, widths, strict=True))]
    out += ["  ".join(c.rjust(w) for c, w in zip(row, widths, strict=True)) for row in lines]
    return "\n".join(out)


def _findings(summary: dict) -> list[str]:
    runs, audits = summary["runs"], summary["audit"]
    test = runs["test"]
    ref = runs.get("reference")
    tname = test["dtype"]
    out = []
    steps = summary["config"]["steps"]
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
            out.append(f"{rname} reaches 50 % Softmax Collapse at step {r50}; {tname} does not.")
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


def _summary(args, test_cfg, ref_cfg, why, log, auditor, error, wall) -> dict:
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
        "wall_seconds": wall,
        "status": "ok" if error is None else error,
    }
    summary["findings"] = _findings(summary)
    return summary


def _plot(path, log, summary) -> str | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "compare.png skipped: matplotlib is not installed (pip install -e '.[plot]')"
    fig, axes = plt.subplots(2, 2, figsize=(11, 7), constrained_layout=True)
    panels = [
        ("accuracy", "accuracy", ""),
        ("sc_fraction", "SC fraction (train)", ""),
        ("nlm_cos_grad", "NLM cos(θ, -∇L)", "global"),
        ("weight_norm", "weight norm", "global"),
    ]
    for ax, (metric, title, layer) in zip(axes.ravel(), panels, strict=True):
        for name, info in summary["runs"].items():
            splits = ["train", "test"] if metric == "accuracy" else ["train"]
            for split in splits:
                s, v = log.series(metric, run=name, split=split, layer=layer)
                ls = "-" if split == "train" else ":"
                ax.plot(
                    s, v, ls, label=f"{info['dtype']} {split}" if len(splits) > 1 else info["dtype"]
                )
            if info["sc_onset_step"] is not None:
                ax.axvline(info["sc_onset_step"], color="grey", lw=0.6, ls="--")
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.legend(fontsize=8)
    fig.savefig(path + ".tmp.png", dpi=110)
    plt.close(fig)
    os.replace(path + ".tmp.png", path)
    return None


def main(argv=None) -> int:
    """Run the comparison; returns the exit code (see :mod:`numstab.cli`)."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        test_cfg, ref_cfg, why = _resolve(args)
        cli.check_backend(args.backend)
        cli.resolve_out(args)
    except UsageError as exc:
        print(f"{parser.prog}: error: {exc}", file=sys.stderr)
        return 2

    from threadpoolctl import threadpool_limits

    tune_allocator()
    log = MetricLog(os.path.join(args.out, "metrics.csv") if args.out else None)
    auditor = Auditor(samples=args.audit_samples, seed=args.seed)
    error, code = None, 0
    t0 = time.perf_counter()
    with threadpool_limits(limits=args.threads):
        runs = {"test": Run(test_cfg, name="test", log=log)}
        if ref_cfg is not None:
            runs["reference"] = Run(ref_cfg, name="reference", log=log, data=runs["test"].data)
        finished = False
        if args.resume:
            try:
                state = resume_runs(args.resume, runs, log)
                _check_resumable(state, args)
            except (CheckpointError, UsageError) as exc:
                print(f"{parser.prog}: error: cannot resume: {exc}", file=sys.stderr)
                log.close()
                return 2
            auditor.records = list(state.get("audit", []))
            finished = bool(state.get("finished"))
        bar = cli.progress_bar(
            args.steps,
            f"{args.dtype} vs {ref_cfg.dtype if ref_cfg else '-'}",
            args.quiet,
            initial=runs["test"].step,
        )

        def due(t):
            return t % args.audit_every == 0 or t == args.steps

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
                        progress=(lambda t: bar.update(1)) if bar is not None else None,
                        extra=lambda: {"audit": auditor.records, "options": _resume_options(args)},
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
        finally:
            if bar is not None:
                bar.close()
            log.close()
    wall = time.perf_counter() - t0
    summary = _summary(args, test_cfg, ref_cfg, why, log, auditor, error, wall)
    note = None
    if args.out:
        cli.write_atomic(os.path.join(args.out, "summary.json"), cli.dump_json(summary))
        note = _plot(os.path.join(args.out, "compare.png"), log, summary)
    if args.json:
        print(cli.dump_json(summary), end="")
    else:
        _print_report(summary, log, ref_cfg, why, args)
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


def _print_report(summary, log, ref_cfg, why, args) -> None:
    runs = summary["runs"]
    test = runs["test"]
    ref = runs.get("reference")
    print(
        f"numstab.compare: {args.task} mod {args.p}, f = {args.train_fraction}, "
        f"hidden {'-'.join(map(str, args.hidden))}, {args.optimizer} lr {args.lr}, "
        f"loss {args.loss}, order {args.order}, {args.steps} steps, seed {args.seed}"
    )
    print(
        f"test run: {test['dtype']} (loss {test['loss_dtype']}); reference: "
        f"{ref['dtype'] if ref else why}"
    )
    print()
    print(_table(summary["audit"], log, ref_cfg.dtype if ref_cfg else None))
    print()
    print("summary")
    for name, r in runs.items():
        print(
            f"  {name:9s} {r['dtype']:>10s}: SC onset {_fmt(r['sc_onset_step'], 'd')}, "
            f"SC-50 % {_fmt(r['sc50_step'], 'd')}, train 100 % {_fmt(r['train100_step'], 'd')}"
            f", final train/test acc {_fmt(r['final']['train_acc'])}/"
            f"{_fmt(r['final']['test_acc'])}"
        )
    print(
        f"  exact-predicted SC onset (test run): {_fmt(summary['exact_sc_onset_step'], 'd')}; "
        f"exact NLM cos at onset: {_fmt(summary['nlm_cosine_exact_at_onset'])}"
    )
    print(f"  wall time {summary['wall_seconds']:.1f} s (audits {summary['audit_seconds']:.2f} s)")
    print()
    print("findings")
    for f in summary["findings"]:
        print(f"  - {f}")


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
