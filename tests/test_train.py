"""The training loop: determinism, metric bookkeeping, faults, the intervention hook."""

import csv
import math
from fractions import Fraction

import numpy as np
import pytest
from helpers import U, abs_dot, frac, gamma
from hypothesis import example, given, settings
from hypothesis import strategies as st

from numstab import exact
from numstab import metrics as M
from numstab.data import MODULAR_OPS
from numstab.run import CSV_HEADER, MetricLog, NonFiniteError, Run, TrainConfig, summarize, train
from numstab.run.loop import zero_sum_part

SMALL = TrainConfig(p=23, hidden=(32, 32), steps=30, log_every=10, lr=0.01)


def test_same_seed_same_machine_identical_metrics_and_params():
    a = train(SMALL)
    b = train(SMALL)
    assert a.log.rows == b.log.rows
    for k in a.params:
        np.testing.assert_array_equal(a.params[k], b.params[k])
    c = train(SMALL.replace(seed=1))
    assert c.log.rows != a.log.rows


def test_logged_steps_and_metric_names():
    run = train(SMALL.replace(steps=25))
    steps = sorted({r[0] for r in run.log.rows})
    assert steps == [0, 10, 20, 25]  # every log_every steps and the last
    names = {(r[2], r[3]) for r in run.log.rows}
    for split in ("train", "test"):
        for m in (
            "loss",
            "accuracy",
            "sc_fraction",
            "zero_loss_fraction",
            "zero_target_grad_fraction",
            "zero_sum_violation",
            "radial_grad",
            "radial_grad_violation",
            "logit_norm",
            "logit_gap_median",
            "logit_gap_max",
        ):
            assert (split, m) in names
    layers = {r[4] for r in run.log.rows if r[3] == "weight_norm"}
    assert layers == {"W1", "W2", "W3", "global"}
    for m in ("grad_norm", "nlm_cos_grad", "nlm_cos_update", "update_norm",
              "absorbed_update_fraction"):  # fmt: skip
        assert ("train", m) in names
    # The update metrics describe the update after a logged step: none at the final step.
    assert not [r for r in run.log.rows if r[3] == "nlm_cos_update" and r[0] == 25]


def _collapsed_step_and_replay(steps=60):
    """A run driven into collapse (lr 0.05, float16 loss) logged at ``steps``, and a replay of
    it (bit for bit the same parameters) standing at that step."""
    cfg = SMALL.replace(lr=0.05, loss_dtype="float16", steps=80)
    run, replay = Run(cfg), Run(cfg)
    for _ in range(steps):
        run.advance(log=False)
        replay.advance(log=False)
    run.advance(log=True)
    return run, replay


def test_zero_sum_violation_is_the_mean_absolute_row_sum_of_the_logit_gradient():
    # Absorbed target gradients make the row sums non-zero; the replay gives the logit
    # gradient of the logged step.
    run, replay = _collapsed_step_and_replay()
    g = replay.evaluate("train").dz.astype(np.float64)
    rows = [sum(frac(v) for v in r) for r in g]  # exact row sums (Fractions)
    want = float(sum(abs(r) for r in rows) / len(rows))
    assert want > 0  # collapse broke the zero sum
    # float64 row sums of C terms: within γ_C·Σ|g_k| each; the mean and |.| add a few u
    bound = gamma(g.shape[1]) * float(np.mean(np.abs(g).sum(axis=1))) + 4 * U * want
    assert abs(run.log.latest("zero_sum_violation", split="train") - want) <= bound


def test_radial_grad_and_the_violations_part_of_it_are_the_sums_they_name():
    run, replay = _collapsed_step_and_replay()
    ev = replay.evaluate("train")
    z, g = ev.logits.astype(np.float64), ev.dz.astype(np.float64)
    n, c = z.shape
    radial = sum(frac(a) * frac(b) for a, b in zip(z.ravel(), g.ravel(), strict=True))
    # Σ_i mean_k(z_ik) · Σ_k g_ik, exactly (Fractions)
    violation = sum(
        sum(map(frac, zr)) / c * sum(map(frac, gr)) for zr, gr in zip(z, g, strict=True)
    )
    # float64: each product rounded once, then an N·C-term sum: within γ_{NC+1}·Σ|z g|
    bound = gamma(n * c + 1) * abs_dot(z, g)
    assert abs(run.log.latest("radial_grad", split="train") - float(radial)) <= bound
    # a row mean (C terms and a division), a row sum (C terms), their product, an N-term sum:
    # within γ_{2C+N+2} of Σ_i mean_k|z_ik| · Σ_k|g_ik|
    bound = gamma(2 * c + n + 2) * float(np.sum(np.abs(z).mean(axis=1) * np.abs(g).sum(axis=1)))
    assert 100 * bound < abs(float(violation))  # collapse broke the zero sum, far above rounding
    got = run.log.latest("radial_grad_violation", split="train")
    assert abs(got - float(violation)) <= bound


def test_radial_grad_times_depth_is_the_parameters_radial_gradient():
    # Euler's identity: the bias-free ReLU MLP is homogeneous of degree L in θ, so for the
    # parameter gradient that backpropagation makes of any logit gradient G,
    # ⟨θ, ∇_θ⟩ = L · ⟨Z, G⟩. Checked in float64 against the run's own parameter gradients.
    cfg = SMALL.replace(dtype="float64", lr=0.05, steps=80)
    run, replay = Run(cfg), Run(cfg)
    for _ in range(40):
        run.advance(log=False)
        replay.advance(log=False)
    run.advance(log=True)
    ev = replay.evaluate("train", with_grads=True)
    grads = replay.gradients(ev)
    depth = len(cfg.hidden) + 1
    radial = float(sum(frac(a) * frac(b) for k, w in replay.params.items()
                       for a, b in zip(w.ravel(), grads[k].ravel(), strict=True)))  # fmt: skip
    # Every product of the forward and backward passes is within γ_K of its counterpart with
    # |W| and |G| (K: the longest sum, here the N·C terms of ⟨Z, G⟩), and each of the
    # L² + 2L + 2 products and pairings on the two sides is bounded by T = ⟨|G|, Z_abs⟩, with
    # Z_abs the logits of the network with |W| (its activations are non-negative, so its
    # ReLUs pass everything: an upper bound of every |activation| of the real one).
    g = ev.dz.astype(np.float64)
    z_abs, _ = replay.net.forward(
        {k: np.abs(w) for k, w in replay.params.items()}, replay.x_train, replay.model,
        replay.policy,
    )  # fmt: skip
    big_k = max(g.size, *(w.size for w in replay.params.values()), replay.y_train.size)
    bound = (depth**2 + 2 * depth + 2) * gamma(big_k) * abs_dot(g, z_abs)
    assert 1e6 * bound < abs(radial)  # a wrong depth or a missing 1/N would show
    assert abs(depth * run.log.latest("radial_grad", split="train") - radial) <= bound


@given(
    rows=st.integers(1, 6),
    classes=st.integers(1, 9),
    dtype=st.sampled_from([np.float16, np.float32, np.float64, np.longdouble]),
    seed=st.integers(0, 2**32 - 1),
)
@example(rows=1, classes=1, dtype=np.float32, seed=0)
@settings(max_examples=40, deadline=None)
def test_zero_sum_part_is_each_row_minus_its_mean(rows, classes, dtype, seed):
    rng = np.random.default_rng(seed)
    dz = rng.standard_normal((rows, classes)) * 10.0 ** rng.integers(-8, 3, (rows, 1))
    dz = dz.astype(dtype)
    got = zero_sum_part(dz)
    assert got.dtype == (np.longdouble if dtype == np.longdouble else np.float64)
    u = float(np.finfo(got.dtype).eps) / 2
    for g_row, d_row in zip(got, dz, strict=True):
        exact = [frac(v) for v in d_row]
        mean = sum(exact) / classes
        # the row mean: C terms summed and a division (γ_{C+1} of the mean |dz|), then one
        # subtraction rounded (u of its result; 2u of the exact value covers the mean's error)
        mean_abs = float(sum(abs(v) for v in exact) / classes)
        for g, d in zip(g_row, exact, strict=True):
            want = d - mean
            bound = gamma(classes + 1, u) * mean_abs + u * abs(float(want)) * 2
            assert abs(frac(g) - want) <= Fraction(bound)


def test_zero_sum_grad_from_trains_on_the_gradient_without_its_violation():
    # float64 parameters, float16 loss: collapse leaves a violation, the backward adds little
    plain_cfg = SMALL.replace(dtype="float64", lr=0.05, loss_dtype="float16", steps=80)
    plain, centred = Run(plain_cfg), Run(plain_cfg.replace(zero_sum_grad_from=40))
    for _ in range(40):  # bit for bit the same run before the step it starts at
        plain.advance(log=False)
        centred.advance(log=False)
    for k in plain.params:
        np.testing.assert_array_equal(plain.params[k], centred.params[k])
    ev = centred.evaluate("train", with_grads=True)
    z, g = ev.logits.astype(np.float64), ev.dz.astype(np.float64)
    c = z.shape[1]
    # Euler (test above): ⟨θ, ∇_θ⟩ = L · ⟨Z, G'⟩ for G' the gradient trained on. Without
    # the violation, G'_i = G_i − mean(G_i), so ⟨Z, G'⟩ = Σ_i ⟨z_i − mean(z_i), G_i⟩ (exact).
    centred_radial = sum(
        sum(frac(a) * frac(b) for a, b in zip(zr, gr, strict=True))
        - sum(map(frac, zr)) * sum(map(frac, gr)) / c
        for zr, gr in zip(z, g, strict=True)
    )
    violation = sum(
        sum(map(frac, zr)) * sum(map(frac, gr)) / c for zr, gr in zip(z, g, strict=True)
    )
    depth = len(plain_cfg.hidden) + 1
    for run, want in ((centred, centred_radial), (plain, centred_radial + violation)):
        grads = run.gradients(ev)
        got = sum(frac(a) * frac(b) for k, w in run.params.items()
                  for a, b in zip(w.ravel(), grads[k].ravel(), strict=True))  # fmt: skip
        z_abs, _ = run.net.forward(
            {k: np.abs(w) for k, w in run.params.items()}, run.x_train, run.model, run.policy
        )
        # as in the test above, with the centring's rounding (γ_{C+2}) added to each G entry
        # and |G'_ik| <= |G_ik| + mean_j |G_ij| in place of |G|
        big_k = max(g.size, *(w.size for w in run.params.values())) + c + 2
        g_abs = np.abs(g) + np.abs(g).mean(axis=1, keepdims=True)
        bound = (depth**2 + 2 * depth + 4) * gamma(big_k) * abs_dot(g_abs, z_abs)
        assert abs(float(got - depth * want)) <= bound
    assert abs(float(violation)) * depth > 1e3 * bound  # the two runs' targets differ


def test_update_norm_is_the_norm_of_the_applied_update():
    run = Run(SMALL)
    before = {k: v.copy() for k, v in run.params.items()}
    run.advance()  # logged step 0, then the update
    log = run.log
    # The exact norm of after - before (Fractions). The logged float64 value: each difference
    # of two float32 values is one rounding at most (u relative), then a dot product of n terms
    # (γ_n), a square root and the combination of the tensors: within γ_{n + 8} relative.
    n_all = sum(np.size(v) for v in before.values())
    sq = sum(
        (frac(a) - frac(b)) ** 2
        for k in before
        for a, b in zip(
            np.ravel(run.params[k]).astype(np.float64),
            np.ravel(before[k]).astype(np.float64),
            strict=True,
        )
    )
    want = math.sqrt(float(sq))
    got = log.latest("update_norm", split="train", layer="global")
    assert want > 0 and abs(got - want) <= gamma(n_all + 8) * want


def test_metrics_match_direct_recomputation_at_step_zero():
    run = Run(SMALL)
    run.advance()
    log = run.log
    # Recompute at the initial parameters from scratch.
    fresh = Run(SMALL)
    ev = fresh.evaluate("train", with_grads=True)
    grads = fresh.gradients(ev)
    y = fresh.y_train
    assert log.latest("accuracy", split="train") == M.accuracy(ev.logits, y)
    acc_count = int(np.count_nonzero(np.argmax(ev.logits, 1) == y))
    assert log.latest("accuracy", split="train") == acc_count / y.size
    assert log.latest("loss", split="train") == float(np.mean(ev.loss.astype(np.float64)))
    # Norms and cosines against exact values (Fractions; one mpmath square root). Each
    # float64 sum of n products is within γ_n·Σ|terms|; a square root, division or the
    # combination of the per-tensor values adds a few u more, hence γ_{n + 8}.
    ctx = exact.context(256)
    n_all = sum(np.size(v) for v in fresh.params.values())
    sq = sum(frac(t) ** 2 for v in fresh.params.values() for t in np.ravel(v).astype(np.float64))
    norm_exact = ctx.sqrt(ctx.mpf(sq.numerator) / sq.denominator)
    logged = log.series("weight_norm", split="train", layer="global")[1][0]
    assert abs(ctx.mpf(logged) - norm_exact) <= gamma(n_all + 8) * norm_exact
    a = [frac(t) for t in np.ravel(fresh.params["W2"]).astype(np.float64)]
    b = [-frac(t) for t in np.ravel(grads["W2"]).astype(np.float64)]
    pairs = ((a, b), (a, a), (b, b))
    dot, aa, bb = (sum(p * q for p, q in zip(s, t, strict=True)) for s, t in pairs)
    absdot = sum(abs(p * q) for p, q in zip(a, b, strict=True))
    den = ctx.sqrt(ctx.mpf(aa.numerator) / aa.denominator * bb.numerator / bb.denominator)
    cos_exact = (ctx.mpf(dot.numerator) / dot.denominator) / den
    cond = (ctx.mpf(absdot.numerator) / absdot.denominator) / den  # >= |cos|
    logged = log.series("nlm_cos_grad", split="train", layer="W2")[1][0]
    assert abs(ctx.mpf(logged) - cos_exact) <= 2 * gamma(len(a) + 8) * cond
    # Softmax Collapse in float32, pairwise order: z - max rounded in float32, exp correctly
    # rounded (mpmath), NumPy's own pairwise float32 sum compared with 1.
    z = np.asarray(ev.logits, dtype=np.float32)
    d = z - z.max(axis=1, keepdims=True)
    e = exact.round_exact(np.vectorize(ctx.exp, otypes=[object])(exact.to_exact(d)), "float32")
    sc = np.count_nonzero(np.sum(e, axis=1, dtype=np.float32) == 1) / y.size
    assert log.series("sc_fraction", split="train")[1][0] == sc


def test_csv_is_written_incrementally_and_matches_memory(tmp_path):
    path = tmp_path / "metrics.csv"
    log = MetricLog(path)
    run = Run(SMALL, name="x", log=log)
    run.advance()  # step 0 logged and flushed
    with open(path) as f:
        rows = list(csv.reader(f))
    assert tuple(rows[0]) == CSV_HEADER
    assert len(rows) - 1 == len(log.rows) > 0
    for line, row in zip(rows[1:], log.rows, strict=True):
        assert int(line[0]) == row[0] and line[1:5] == list(row[1:5])
        v = float(line[5])
        assert v == row[5] or (math.isnan(v) and math.isnan(row[5]))
    log.close()


def test_divergence_stops_with_the_step_and_keeps_the_log():
    cfg = SMALL.replace(optimizer="sgd", lr=1e30, steps=50, log_every=1)
    log = MetricLog()
    with pytest.raises(NonFiniteError) as info:
        train(cfg, log=log)
    err = info.value
    assert err.run == "run" and 0 < err.step <= 50
    assert max(r[0] for r in log.rows) >= err.step - 1
    assert "not finite" in str(err)


def test_zero_target_gradient_intervention():
    """From the given step on, the correct-class logit gradient is zeroed before backprop."""
    cfg = SMALL.replace(zero_target_grad_from=0)
    run = Run(cfg)
    ev = run.evaluate("train", with_grads=True)
    grads = run.gradients(ev)
    dz = ev.dz.copy()
    dz[np.arange(dz.shape[0]), run.y_train] = 0
    from numstab.mlp import backward

    ref = backward(dz, ev.model_cache, run.model, run.policy, run.plan)
    for k in grads:
        np.testing.assert_array_equal(grads[k], ref[k])
    plain = Run(SMALL)
    ev2 = plain.evaluate("train", with_grads=True)
    assert not np.array_equal(plain.gradients(ev2)["W3"], grads["W3"])


def test_summarize_reads_the_log():
    log = MetricLog()
    for t, sc, acc in [(0, 0.0, 0.1), (10, 0.2, 1.0), (20, 0.6, 1.0)]:
        log.add(t, "r", "train", "sc_fraction", sc)
        log.add(t, "r", "train", "accuracy", acc)
        log.add(t, "r", "test", "accuracy", 0.95 if t == 20 else 0.0)
    s = summarize(log, "r")
    assert (s["sc_onset_step"], s["sc50_step"], s["train100_step"], s["grok_step"]) == (
        10,
        20,
        10,
        20,
    )
    assert s["final"]["train_acc"] == 1.0 and s["final"]["step"] == 20


@pytest.mark.parametrize(
    "change,match",
    [
        ({"order": "reverse"}, "reverse"),
        ({"loss": "hinge"}, "hinge"),
        ({"optimizer": "lion"}, "lion"),
        ({"steps": -1}, "steps"),
        ({"dtype": "fp8"}, "fp8"),
        ({"perp_grad": "layer"}, "layer"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_config_validation(change, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**change)


def test_minibatch_runs_are_seeded():
    cfg = SMALL.replace(batch_size=64, steps=12)
    a, b = train(cfg), train(cfg)
    assert a.log.rows == b.log.rows
    assert train(cfg.replace(seed=3)).log.rows != a.log.rows


@pytest.mark.parametrize("dtype", ["float16", "bfloat16"])
def test_low_precision_params_stay_representable(dtype):
    from numstab.precision import quantize

    run = train(SMALL.replace(dtype=dtype, steps=5, log_every=5))
    for v in run.params.values():
        np.testing.assert_array_equal(quantize(v, dtype), v)


# --- options that one task, optimizer or loss alone reads ----------------------------------

#: A reader of each option of ``ONLY_FOR`` and a config that does not read it, with a changed
#: value: (option, changed value, config kwargs that do not read it).
UNREAD = [
    ("parity_bits", 30, {}),
    ("parity_k", 2, {}),
    ("parity_samples", 500, {}),
    ("p", 50, {"task": "parity", "parity_bits": 12, "parity_samples": 200}),
    ("p", 50, {"task": "digits"}),
    ("residue_start", 1, {"task": "digits"}),
    ("beta1", 0.5, {"optimizer": "sgd"}),
    ("beta2", 0.5, {"optimizer": "sgd"}),
    ("eps", 0.5, {"optimizer": "sgd"}),
    ("stablemax_eps", 0.5, {}),
    ("stablemax_eps", 0.5, {"loss": "mse"}),
]


def _small(kwargs) -> TrainConfig:
    """A 3-step config of ``kwargs`` (a modular task on p = 23)."""
    small_p = {"p": 23} if kwargs.get("task", "add") in MODULAR_OPS else {}
    return TrainConfig(hidden=(16, 16), steps=3, log_every=1, **small_p, **kwargs)


@pytest.mark.parametrize(("name", "value", "kwargs"), UNREAD)
def test_options_the_run_does_not_read_are_refused_and_are_unread(name, value, kwargs):
    """An option the task, optimizer or loss does not read is refused with one message that
    names it, its value and what reads it; and the refusal is right: forced past the check
    (``object.__setattr__`` on the frozen config), the changed value leaves 3 training steps
    bit for bit as they were."""
    from numstab.run.config import unread_fields

    base = _small(kwargs)
    assert name in unread_fields(base.to_dict())
    with pytest.raises(ValueError, match=rf"^{name} = {value!r} applies to .* only \(the "):
        base.replace(**{name: value})
    forced = base.replace()
    object.__setattr__(forced, name, value)
    runs = [Run(base), Run(forced)]
    for r in runs:
        for _ in range(3):
            r.advance()
    for k, v in runs[0].params.items():
        assert np.array_equal(v, runs[1].params[k]), (name, k)


@pytest.mark.parametrize(("name", "value", "kwargs"), UNREAD)
def test_the_same_options_are_read_where_they_apply(name, value, kwargs):
    """The converse, so that the test above can fail: where the option applies (the task,
    optimizer or loss that reads it) it is accepted and changes the run."""
    reader = {
        "parity_bits": {"task": "parity"},
        "parity_k": {"task": "parity"},
        "parity_samples": {"task": "parity"},
        "p": {},
        "residue_start": {},
        "beta1": {},
        "beta2": {},
        "eps": {},
        "stablemax_eps": {"loss": "stablemax"},
    }[name]
    base = _small(reader)
    changed = base.replace(**{name: value})
    runs = [Run(base), Run(changed)]
    for r in runs:
        for _ in range(3):
            r.advance()
    assert any(
        v.shape != runs[1].params[k].shape or not np.array_equal(v, runs[1].params[k])
        for k, v in runs[0].params.items()
    ), name


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"task": "parity", "encoding": "binary"}, "encoding 'binary' does not apply to task"),
        ({"task": "digits", "encoding": "bits"}, r"its inputs are 'pixels' \(give 'pixels'"),
        ({"optimizer": "adamw", "momentum": 0.9}, "momentum = 0.9 applies to optimizer 'sgd'"),
    ],
)
def test_encodings_and_momentum_of_other_tasks_are_refused(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)
    for ok in ({"task": "parity", "encoding": "bits"}, {"task": "digits", "encoding": "pixels"}):
        TrainConfig(**ok)  # a task's own encoding, named, is accepted


def test_cli_refuses_an_unread_option_with_one_line(tmp_path, capsys):
    from numstab.cli.train import main

    out = tmp_path / "out"
    assert main(["--task", "parity", "--modulus", "7", "--steps", "1", "--out", str(out)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "p = 7 applies to the modular tasks only" in err[0], err
    assert not out.exists()  # a refused command writes nothing


@pytest.mark.parametrize("keep", [None, ("accuracy",), ("accuracy", "loss", "absent")])
def test_a_log_that_keeps_some_metrics(tmp_path, keep):
    """``MetricLog(keep=...)``: only the named metrics' rows stay in memory (``series`` of
    another is refused), every row reaches the CSV, and ``latest`` of any metric is the
    value of its last row added, as read off the full list of rows (the reference)."""
    rng = np.random.default_rng(3)
    path = tmp_path / "metrics.csv"
    log = MetricLog(path, keep=keep)
    added = []
    for step in range(40):
        for metric in ("accuracy", "loss", "weight_norm"):
            for run, split, layer in (("a", "train", ""), ("b", "test", ""), ("a", "train", "w1")):
                v = float(rng.standard_normal()) if rng.random() > 0.1 else math.nan
                if rng.random() < 0.7:  # some keys skip some steps
                    log.add(step, run, split, metric, v, layer)
                    added.append((step, run, split, metric, layer, v))
        log.flush()
    log.close()
    with open(path, newline="") as f:
        lines = list(csv.reader(f))
    assert len(lines) - 1 == len(added)  # the file holds every row
    kept = [r for r in added if keep is None or r[3] in keep]
    assert len(log.rows) == len(kept)
    for r, want in zip(log.rows, kept, strict=True):
        assert r[:5] == want[:5] and (r[5] == want[5] or (math.isnan(r[5]) and math.isnan(want[5])))
    for metric in ("accuracy", "loss", "weight_norm", "absent"):
        for run in (None, "a", "b"):
            for split in (None, "train", "test"):
                for layer in ("", "w1"):
                    match = [
                        r[5]
                        for r in added
                        if r[3] == metric
                        and r[4] == layer
                        and run in (None, r[1])
                        and split in (None, r[2])
                    ]
                    got = log.latest(metric, run=run, split=split, layer=layer)
                    want = match[-1] if match else math.nan
                    assert got == want or (math.isnan(got) and math.isnan(want))
    log.reset(added)  # a checkpoint's rows: the file gets every one back, memory the kept
    with open(path, newline="") as f:
        assert len(list(csv.reader(f))) - 1 == len(added)
    assert len(log.rows) == len(kept)
    if keep is not None:
        with pytest.raises(ValueError, match="weight_norm.*not kept"):
            log.series("weight_norm")
        with pytest.raises(ValueError, match="keep"):
            log.csv_text()
