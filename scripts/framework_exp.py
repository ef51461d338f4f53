"""Which libraries' ``exp`` and ``log`` are correctly rounded on the inputs that matter for
Softmax Collapse? Prints one markdown row per (library, function, format, input set).

    python scripts/framework_exp.py            # NumPy, numstab, and PyTorch CPU / CuPy if installed

Input sets (seeded): ``near 0`` = ``-k·2**-24`` for k = 1..2000 (``exp`` of the softmax
exponents of rows about to collapse); ``[-20, 0]`` and ``[-80, 0]`` uniform (the float32 and
float64 ranges of the exponents that survive); for ``log``, ``1 + k·2**-23`` (normalisers near
1) and uniform in ``[1, 113]``. Every result is judged by
:func:`numstab.fidelity.rounding_fidelity` against mpmath.
"""

from __future__ import annotations

import argparse
import sys

import numpy as np

from numstab import elementary as el
from numstab.fidelity import rounding_fidelity


def _inputs(fmt: str, seed: int, n: int) -> dict:
    rng = np.random.default_rng(seed)
    dt = np.dtype(fmt)
    eps = np.finfo(dt).eps / 2
    k = np.arange(1, n + 1, dtype=np.float64)
    wide = 20.0 if fmt == "float32" else 80.0
    return {
        "exp": {
            "near 0": (-k * eps).astype(dt),
            f"[-{wide:g}, 0]": rng.uniform(-wide, 0, n).astype(dt),
        },
        "log": {
            "near 1": (1 + 2 * k * eps).astype(dt),
            "[1, 113]": rng.uniform(1, 113, n).astype(dt),
        },
    }


def _libraries() -> dict:
    libs = {
        "NumPy " + np.__version__: lambda name: getattr(np, name),
        "numstab.elementary": lambda name: getattr(el, name),
    }
    try:
        import torch

        def torch_fn(name):
            return lambda x: getattr(torch, name)(torch.from_numpy(np.ascontiguousarray(x))).numpy()

        libs[f"PyTorch {torch.__version__} CPU"] = torch_fn
    except ImportError:
        pass
    try:
        import cupy

        def cupy_fn(name):
            return lambda x: cupy.asnumpy(getattr(cupy, name)(cupy.asarray(x)))

        cupy.zeros(1)  # fails without a device
        libs[f"CuPy {cupy.__version__} (CUDA)"] = cupy_fn
    except Exception:
        pass
    return libs


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--n", type=int, default=2000, help="inputs per set (default 2000)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    print("| library | function | format | inputs | correctly rounded | worst error (ulp) |")
    print("|---|---|---|---|---|---|")
    for lib, get in _libraries().items():
        for fmt in ("float32", "float64"):
            for name, sets in _inputs(fmt, args.seed, args.n).items():
                for label, x in sets.items():
                    r = rounding_fidelity(get(name), x, name)
                    print(f"| {lib} | `{name}` | {fmt} | {label} | "
                          f"{100 * r.fraction_correct:.1f} % | {r.max_ulp_error:.3f} |")
                    sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
