"""The transformer in the run machinery: options, token data, training, resume, run ids."""

from __future__ import annotations

import signal
import subprocess
import sys

import numpy as np
import pytest

from numstab.data import dense_inputs, modular_arithmetic
from numstab.run import MetricLog, TrainConfig, train
from numstab.run.config import ID_NEUTRAL
from numstab.run.driver import StopFlag, Stopped
from numstab.sweep.spec import canonical_json, run_id

TINY = TrainConfig(
    model="transformer", p=11, d_model=16, heads=2, d_ff=32, steps=12, log_every=3, lr=0.01
)


# --- run schema -------------------------------------------------------------------------------


def test_mlp_run_ids_are_unchanged():
    """Ids computed by the revision before the transformer (cffbd49): the id leaves out the
    options added since at their neutral values, so every recorded MLP run keeps its id; the
    record itself holds every option."""
    assert run_id(TrainConfig()) == "bbb45a88c62a"
    assert run_id(TrainConfig(seed=3, dtype="float16")) == "2d350191a2a3"
    assert not {'"model"', '"d_model"', '"residue_start"'} & set(
        canonical_json(TrainConfig()).replace(":", ",").split(",")
    )
    assert {"model", "d_model", "residue_start"} <= set(TrainConfig().to_dict())


def test_transformer_record_round_trips_and_canonicalises_the_encoding():
    assert TINY.encoding == "tokens"  # onehot, the default, is read as the token form
    d = TINY.to_dict()
    assert d["model"] == "transformer" and d["dropout"] == 0.1
    assert TrainConfig.from_dict(d) == TINY
    # an MLP record from before: the fields it lacks take their default
    old = {k: v for k, v in TrainConfig().to_dict().items() if k not in ID_NEUTRAL}
    assert TrainConfig.from_dict(old).model == "mlp"
    assert run_id(TINY) != run_id(TINY.replace(attention="stablemax"))
    assert run_id(TrainConfig(residue_start=1)) != run_id(TrainConfig())


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"model": "transformer", "hidden": (8,)}, "hidden = .* applies to model 'mlp' only"),
        ({"d_model": 64}, "d_model = 64 applies to model 'transformer' only"),
        ({"model": "transformer", "heads": 3}, "heads must divide d_model"),
        ({"model": "transformer", "encoding": "binary"}, "encoding 'binary' is the MLP's"),
        ({"encoding": "tokens"}, "encoding 'tokens' is the transformer's input"),
        ({"model": "transformer", "task": "parity"}, "parity task has none"),
        ({"task": "parity", "residue_start": 1}, "residue_start = 1 applies to the modular tasks"),
        ({"residue_start": 2}, "residue_start must be"),
        ({"model": "transformer", "dropout": 1.0}, "dropout must be"),
        ({"model": "transformer", "attention": "sparsemax"}, "attention must be"),
    ],
)
def test_bad_combinations_name_the_option(kwargs, match):
    with pytest.raises(ValueError, match=match):
        TrainConfig(**kwargs)


@pytest.mark.parametrize(
    ("args", "words"),
    [
        (["--model", "cnn"], ["--model", "mlp, transformer", "'cnn'"]),
        (["--model", "transformer", "--dropout", "1"], ["--dropout", "[0, 1)"]),
        (["--model", "transformer", "--norm-placement", "mid"], ["--norm-placement", "post, pre"]),
        (["--model", "transformer", "--hidden", "8"], ["hidden", "mlp"]),
    ],
)
def test_command_line_refuses_bad_values_with_exit_2(args, words, tmp_path):
    r = subprocess.run(
        [
            sys.executable,
            "-m",
            "numstab.train",
            *args,
            "--steps",
            "1",
            "--out",
            str(tmp_path / "o"),
        ],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 2
    line = r.stderr.strip().splitlines()[-1]
    assert all(w in line for w in words), line
    assert not (tmp_path / "o").exists()


# --- token data -------------------------------------------------------------------------------


def test_token_form_and_residue_ranges():
    full = modular_arithmetic(7, "add", train_fraction=0.5, seed=1)
    tok = modular_arithmetic(7, "add", train_fraction=0.5, seed=1, encoding="tokens")
    # The same pairs and split: tokens are the one-hot indices without the offset p of b.
    np.testing.assert_array_equal(tok.x_train, full.x_train - [0, 7])
    np.testing.assert_array_equal(tok.y_train, full.y_train)
    assert tok.n_inputs == 7 and tok.encoding == "tokens"
    from1 = modular_arithmetic(
        7, "add", train_fraction=0.5, seed=1, encoding="tokens", residue_start=1
    )
    x = np.concatenate([from1.x_train, from1.x_test])
    y = np.concatenate([from1.y_train, from1.y_test])
    assert len(x) == 36 and x.min() == 1 and x.max() == 6
    np.testing.assert_array_equal(y, (x[:, 0] + x[:, 1]) % 7)
    assert y.min() == 0  # labels keep the residue 0
    div = modular_arithmetic(7, "div", train_fraction=0.5, encoding="tokens", residue_start=1)
    assert div.n_train + div.n_test == 36
    with pytest.raises(ValueError, match="no dense form"):
        dense_inputs(tok.x_train, tok)


# --- training ---------------------------------------------------------------------------------


def test_transformer_trains_and_logs_attention_collapse():
    run = train(TINY.replace(steps=30, dropout=0.0))
    loss = run.log.series("loss", split="train")[1]
    assert loss[-1] < 0.8 * loss[0]
    steps, frac = run.log.series("attention_sc_fraction", split="train")
    assert steps.size == loss.size and np.all((frac >= 0) & (frac <= 1))
    heads = [
        run.log.series("attention_sc_fraction", split="test", layer=f"head{h}")[1] for h in range(2)
    ]
    np.testing.assert_allclose(
        np.mean(heads, axis=0), run.log.series("attention_sc_fraction", split="test")[1]
    )
    assert run.log.series("nlm_cos_grad", layer="attn_in_w")[1].size == loss.size


def _bits(rows):
    """Rows with the value's bits (a zero tensor's NLM cosine is NaN, and NaN != NaN)."""
    return [(*r[:5], np.float64(r[5]).tobytes()) for r in rows]


def _interrupted_then_resumed(cfg, stop_at, ckpt):
    flag = StopFlag()

    def progress(t):
        if t == stop_at:
            flag.signum = signal.SIGTERM

    with pytest.raises(Stopped):
        train(cfg, log=MetricLog(), checkpoint_dir=ckpt, progress=progress, stop=flag)
    return train(cfg, log=MetricLog(), checkpoint_dir=ckpt, resume=True)


@pytest.mark.parametrize(
    "cfg",
    [
        TINY,
        TINY.replace(dtype="bfloat16", attention="stablemax", norm_placement="pre"),
        TINY.replace(batch_size=40, residue_start=1),
    ],
    ids=["float32-dropout", "bfloat16-stablemax-pre", "minibatch-from1"],
)
def test_interrupt_and_resume_is_bit_identical(cfg, tmp_path):
    """Dropout masks are a function of (seed, step, site): a resumed run draws the same ones."""
    ref = train(cfg)
    run = _interrupted_then_resumed(cfg, 5, tmp_path)
    assert _bits(run.log.rows) == _bits(ref.log.rows)
    for k in ref.params:
        np.testing.assert_array_equal(run.params[k].view(np.uint8), ref.params[k].view(np.uint8))


def test_dropout_changes_training_but_not_the_logged_evaluation():
    """The update uses the dropped-out pass; the metrics at step 0 describe θ_0 itself."""
    a, b = train(TINY.replace(steps=3)), train(TINY.replace(steps=3, dropout=0.0))
    assert a.log.series("loss", split="train")[1][0] == b.log.series("loss", split="train")[1][0]
    assert not all(np.array_equal(a.params[k], b.params[k]) for k in a.params)
