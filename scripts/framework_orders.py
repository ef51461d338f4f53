#!/usr/bin/env python
"""Which numstab summation order reproduces a framework's own Softmax Collapse?

    python scripts/framework_orders.py                 # PyTorch CPU (and JAX if installed)
    python scripts/framework_orders.py --rows 500      # quicker

For each format and class count, adversarial logits (the top logit 0 at a random class, the
others ``-(g + Exp(1))`` with the gap ``g`` uniform over the format's collapse window
:func:`numstab.audit.sc_gap_window`, widened by 2 below, so that the summation order
decides many rows) are given to the framework's own cross-entropy with
the top class as label; a row collapsed for the framework when its loss is exactly 0. The
same logits (the framework's rounding of them) go to :func:`numstab.audit.sc_fraction`'s
mask in every numstab order. Printed: one markdown row per (framework, format, classes) with
the framework's fraction and, per order, numstab's fraction and the rate of rows whose
verdicts disagree. The versions and PyTorch's CPU capability come first.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing
    sys.path.insert(0, str(ROOT))

from numstab.audit import sc_gap_window  # noqa: E402
from numstab.cli import Parser  # noqa: E402
from numstab.functional import collapse_mask  # noqa: E402
from numstab.precision import REDUCTION_ORDERS, get_format  # noqa: E402

FORMATS = ("float16", "bfloat16", "float32", "float64")
CLASSES = (5, 16, 113, 1000, 4099, 32000)


def adversarial_logits(n: int, c: int, fmt: str, seed: int = 0):
    """float64 logits ``(n, c)`` and the top class per row (see the module docstring)."""
    rng = np.random.default_rng([seed, c, FORMATS.index(fmt)])
    lo, hi = sc_gap_window(fmt, max(c, 2))
    z = -(rng.uniform(lo - 2, hi, (n, 1)) + rng.exponential(1.0, (n, c)))
    top = rng.integers(0, c, n)
    z[np.arange(n), top] = 0.0
    return z, top


def torch_zero_loss(z, top, fmt: str):
    """PyTorch CPU's ``cross_entropy == 0`` per row, and its rounding of the logits."""
    import torch

    zt = torch.from_numpy(z).to(getattr(torch, fmt))
    loss = torch.nn.functional.cross_entropy(zt, torch.from_numpy(top), reduction="none")
    return (loss == 0).numpy(), zt.double().numpy()


def jax_zero_loss(z, top, fmt: str):
    """JAX's ``-log_softmax(z)[y] == 0`` per row, and its rounding of the logits."""
    import jax
    import jax.numpy as jnp

    zj = jnp.asarray(z, dtype=getattr(jnp, fmt)) if fmt != "float64" else None
    if zj is None:  # float64 needs jax_enable_x64
        jax.config.update("jax_enable_x64", True)
        zj = jnp.asarray(z, dtype=jnp.float64)
    lsm = jax.nn.log_softmax(zj, axis=-1)
    picked = np.asarray(jnp.take_along_axis(lsm, jnp.asarray(top)[:, None], axis=-1))[:, 0]
    return picked == 0, np.asarray(zj, dtype=np.float64)


def numstab_masks(zq, fmt: str) -> dict:
    """numstab's collapse mask of the (already rounded) logits per order."""
    carrier = get_format(fmt).carrier
    return {o: collapse_mask(zq.astype(carrier), fmt, order=o) for o in REDUCTION_ORDERS}


def compare(framework: str, rows: int, classes=CLASSES, formats=FORMATS, seed: int = 0):
    """Rows of ``(fmt, c, framework fraction, {order: (fraction, disagreement)})``."""
    own = {"torch": torch_zero_loss, "jax": jax_zero_loss}[framework]
    out = []
    for fmt in formats:
        for c in classes:
            n = rows if c < 32000 else max(1, rows // 10)
            z, top = adversarial_logits(n, c, fmt, seed)
            theirs, zq = own(z, top, fmt)
            per = {
                o: (float(m.mean()), float((m != theirs).mean()))
                for o, m in numstab_masks(zq, fmt).items()
            }
            out.append((fmt, c, float(theirs.mean()), per))
    return out


def versions(framework: str) -> str:
    if framework == "torch":
        import torch

        return (
            f"torch {torch.__version__}, CPU capability {torch.backends.cpu.get_cpu_capability()}"
        )
    import jax

    return f"jax {jax.__version__} (XLA CPU; flushes subnormals to zero)"


def main(argv=None) -> int:
    p = Parser(prog="python scripts/framework_orders.py", description=__doc__.splitlines()[0])
    p.add_argument(
        "--rows", type=int, default=3000, help="rows per (format, classes); /10 for 32000"
    )
    p.add_argument("--frameworks", nargs="+", default=["torch", "jax"], choices=["torch", "jax"])
    args = p.parse_args(argv)
    if args.rows < 1:
        p.error(f"--rows: {args.rows} is not a positive integer")
    for fw in args.frameworks:
        try:
            head = versions(fw)
        except ImportError:
            print(f"{fw}: not installed, skipped")
            continue
        print(f"\n{head}\n")
        orders = " | ".join(REDUCTION_ORDERS)
        print(f"| format | C | rows | {fw} SC | {orders} |")
        print("|---|---:|---:|---:|" + "---|" * len(REDUCTION_ORDERS))
        for fmt, c, frac, per in compare(fw, args.rows):
            n = args.rows if c < 32000 else max(1, args.rows // 10)
            cells = " | ".join(f"{a:.4f} ({d:.2%})" for a, d in per.values())
            print(f"| {fmt} | {c} | {n} | {frac:.4f} | {cells} |")
            sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
