#!/usr/bin/env python
"""A small GPT-2 (Hugging Face ``transformers``, random initialisation) trained on modular
addition in bfloat16 autocast, watched by ``numstab.monitor.Monitor``.

Usage::

    python scripts/monitor_transformer.py --loss softmax --out runs/gpt2-softmax
    python scripts/monitor_transformer.py --loss stablemax --out runs/gpt2-stablemax
    python scripts/plot_runs.py runs/gpt2-softmax runs/gpt2-stablemax \\
        --out docs/figures/monitor-transformer.png --plots accuracy sc_fraction nlm_cosine

The task: the sequence ``a b =`` predicts ``(a + b) mod p`` at the ``=`` position (vocabulary
``p + 1``), a ``--train-fraction`` of the ``p²`` pairs for training, full batch, AdamW. The
model runs under ``torch.autocast("cpu", dtype=torch.bfloat16)``: its logits are bfloat16.
The loss is computed in ``--loss-dtype``: ``bfloat16`` (``log_softmax`` / StableMax on the
bfloat16 logits, which CPU autocast leaves in bfloat16) or ``float32`` (the logits widened
first, as ``F.cross_entropy`` does under autocast); the monitor measures collapse in that same
format and ``--order``. Besides the monitor's metrics the run logs ``torch_zero_loss_fraction``
(PyTorch's own per-sample loss exactly 0) and ``test`` accuracy.

Exit codes: 0 done; 2 bad input (one line naming the value) or ``transformers`` missing.
"""

from __future__ import annotations

import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from numstab.cli import HelpFormatter, Parser  # noqa: E402
from numstab.precision import REDUCTION_ORDERS  # noqa: E402

PROG = "scripts/monitor_transformer.py"


def build_parser():
    p = Parser(prog=PROG, description=__doc__.splitlines()[0], formatter_class=HelpFormatter)
    a = p.add_argument
    a("--loss", choices=("softmax", "stablemax"), default="softmax", help="cross-entropy kind")
    a("--loss-dtype", choices=("bfloat16", "float32"), default="bfloat16", help="loss format")
    a("--order", choices=REDUCTION_ORDERS, default="pairwise", help="the monitor's sum order")
    a("--p", type=int, default=23, help="modulus (vocabulary p + 1)")
    a("--train-fraction", type=float, default=0.5, help="fraction of the pairs trained on")
    a("--layers", type=int, default=2, help="transformer blocks")
    a("--width", type=int, default=64, help="embedding width (4 heads)")
    a("--steps", type=int, default=300, help="training steps (each one observed before its update)")
    a("--lr", type=float, default=3e-3, help="AdamW learning rate")
    a("--weight-decay", type=float, default=0.0, help="AdamW weight decay")
    a("--every", type=int, default=1, help="observe every N steps")
    a("--audit-every", type=int, default=50, help="exact audit every N steps")
    a("--seed", type=int, default=0, help="seed of the split and the initialisation")
    a("--threads", type=int, default=1, help="torch threads")
    a("--out", required=True, help="output folder (metrics.csv, summary.json)")
    return p


def _check(args) -> str | None:
    """The first bad value, as the one-line message of exit code 2 (None if all are fine)."""
    positive = ("p", "layers", "width", "steps", "every", "audit_every", "threads")
    for name in positive:
        if getattr(args, name) < 1:
            return f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}"
    if args.p < 3:
        return f"--p must be >= 3, got {args.p}"
    if args.width % 4:
        return f"--width must be a multiple of 4 (4 heads), got {args.width}"
    if not 0 < args.train_fraction < 1:
        return f"--train-fraction must lie in (0, 1), got {args.train_fraction}"
    if not args.lr > 0 or args.weight_decay < 0:
        return f"--lr must be > 0 and --weight-decay >= 0, got {args.lr}, {args.weight_decay}"
    return None


def stablemax_cross_entropy(logits, labels):
    """StableMax cross-entropy per sample, in the logits' dtype: ``s(x) = x + 1`` (x >= 0),
    ``1 / (1 - x)`` (x < 0); ``-log(s_y / Σ s)``."""
    import torch

    s = torch.where(logits >= 0, logits + 1, 1 / (1 - torch.clamp(logits, max=0)))
    p = s / s.sum(dim=-1, keepdim=True)
    return -torch.log(p.gather(1, labels[:, None])[:, 0])


def softmax_cross_entropy(logits, labels):
    """Softmax cross-entropy per sample, in the logits' dtype (``log_softmax`` + gather)."""
    import torch

    lsm = torch.log_softmax(logits, dim=-1)
    return -lsm.gather(1, labels[:, None])[:, 0]


def make_task(torch, p, fraction, seed):
    a = torch.arange(p).repeat_interleave(p)
    b = torch.arange(p).repeat(p)
    x = torch.stack([a, b, torch.full_like(a, p)], dim=1)
    y = (a + b) % p
    perm = torch.randperm(p * p, generator=torch.Generator().manual_seed(seed))
    n = round(fraction * p * p)
    tr, te = perm[:n], perm[n:]
    return x[tr], y[tr], x[te], y[te]


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    bad = _check(args)
    if bad is not None:
        print(f"{PROG}: error: {bad}", file=sys.stderr)
        return 2
    try:
        import torch
        from transformers import GPT2Config, GPT2LMHeadModel
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        print(f"{PROG}: error: needs torch and transformers ({exc})", file=sys.stderr)
        return 2
    import transformers

    from numstab.monitor import Monitor

    hf_logging.set_verbosity_error()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    p = args.p
    config = GPT2Config(
        vocab_size=p + 1,
        n_positions=3,
        n_embd=args.width,
        n_layer=args.layers,
        n_head=4,
        resid_pdrop=0.0,
        embd_pdrop=0.0,
        attn_pdrop=0.0,
        bos_token_id=p,
        eos_token_id=p,
    )
    model = GPT2LMHeadModel(config)  # random initialisation: nothing is downloaded
    x, y, x_test, y_test = make_task(torch, p, args.train_fraction, args.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    per_sample = stablemax_cross_entropy if args.loss == "stablemax" else softmax_cross_entropy
    wide = args.loss_dtype == "float32"
    record = {
        "model": f"transformers GPT2LMHeadModel {args.layers}x{args.width}",
        "transformers": transformers.__version__,
        "autocast": "bfloat16",
        "p": p,
        "train_fraction": args.train_fraction,
        "lr": args.lr,
        "weight_decay": args.weight_decay,
        "seed": args.seed,
        "steps": args.steps,
    }
    t0 = time.perf_counter()
    watch = {k: getattr(args, k) for k in ("out", "loss", "order", "every", "audit_every")}
    with Monitor(model, opt, loss_format=args.loss_dtype, config=record, **watch) as mon:
        for step in range(args.steps):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                logits = model(input_ids=x).logits[:, -1]
            z = logits.float() if wide else logits
            losses = per_sample(z, y)
            loss = losses.mean()
            opt.zero_grad()
            loss.backward()
            if step % args.every == 0:
                zero = float((losses.detach() == 0).double().mean())
                mon.log.add(step, mon.name, "train", "torch_zero_loss_fraction", zero)
                with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
                    pred = model(input_ids=x_test).logits[:, -1].argmax(-1)
                test_acc = float((pred == y_test).double().mean())
                mon.log.add(step, mon.name, "test", "accuracy", test_acc)
            with mon.observe(step, z, y, loss=loss):
                opt.step()
    s = mon.log
    train_acc, test_acc = (s.latest("accuracy", split=k) for k in ("train", "test"))
    print(
        f"{args.loss} ({args.loss_dtype} loss, {args.order}): {args.steps} steps in "
        f"{time.perf_counter() - t0:.1f} s; final train acc {train_acc:.3f}, test "
        f"{test_acc:.3f}, SC fraction {s.latest('sc_fraction'):.3f} "
        f"(PyTorch's own zero loss {s.latest('torch_zero_loss_fraction'):.3f}), "
        f"cos(θ, -∇L) {s.latest('nlm_cos_grad', layer='global'):.3f}; wrote {args.out}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
