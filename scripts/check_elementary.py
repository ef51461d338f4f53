"""Check numstab.elementary's float32 exp/log/log1p/expm1 on every float32 input.

All 2**32 bit patterns are visited in chunks. The reference is independent of the module's
float64 path: glibc's x87 ``long double`` functions (64-bit significand) with a window of
``2**-58`` relative around each value (at least 32 long-double ulps; the script measures the
long-double error against mpmath on a sample first and refuses to run if it exceeds a quarter
of the window), the two ends of the window rounded to float32 (one hardware rounding each);
where they differ, mpmath at 200 bits decides. Inputs whose result is known in closed form
skip the long-double evaluation:

* exp: ``x < -104`` gives +0 (``e**-104 < 2**-150``), ``x > 88.8`` gives inf
  (``e**88.8 > max + ulp/2``); expm1: ``x < -18`` gives -1 (``e**-18 < 2**-25``),
  ``x > 88.8`` inf;
* log: ``x < 0`` NaN, ``±0`` -inf; log1p: ``x < -1`` NaN, ``-1`` -inf;
* NaN gives NaN, ``+inf`` gives ``+inf`` (exp, log, log1p, expm1), ``-inf`` gives +0 / -1.

Usage::

    python scripts/check_elementary.py exp            # every float32 input (minutes)
    python scripts/check_elementary.py all --start 0x3f800000 --stop 0x3f810000

Prints, per function, the inputs checked, how many the long-double window left to mpmath,
the mismatches (with up to 10 examples) and the wall time; exits 1 on any mismatch, 2 on bad
arguments.
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

from numstab import elementary as el
from numstab import exact as ex

FUNCS = ("exp", "log", "log1p", "expm1")
REL = 2.0**-58
_LD = np.longdouble


def _closed_form(name: str, x: np.ndarray):
    """``(mask, values)``: inputs whose float32 result is known without evaluation."""
    nan = np.isnan(x)
    val = np.full(x.shape, np.nan, dtype=np.float32)
    if name == "exp":
        lo, hi = x < -104, x > 88.8
        val[lo], val[hi] = 0.0, np.inf
        mask = nan | lo | hi
    elif name == "expm1":
        lo, hi = x < -18, x > 88.8
        val[lo], val[hi] = -1.0, np.inf
        mask = nan | lo | hi
    elif name == "log":
        neg, zero, inf = x < 0, x == 0, np.isposinf(x)
        val[zero], val[inf] = -np.inf, np.inf
        mask = nan | neg | zero | inf
    else:
        below, pole, inf = x < -1, x == -1, np.isposinf(x)
        val[pole], val[inf] = -np.inf, np.inf
        mask = nan | below | pole | inf
    return mask, val


def _mpmath_round(name: str, xs: np.ndarray) -> np.ndarray:
    """float32 results by mpmath at 200 bits, the ends ``v (1 ± 2**-190)`` required to agree."""
    ctx = ex.context(200)
    fn = getattr(ctx, name)
    tol = ctx.mpf(2) ** -190
    out = np.empty(xs.size, dtype=np.float32)
    for i, v in enumerate(ex.to_exact(xs.astype(np.float64)).reshape(-1)):
        y = fn(ctx.mpf(v))
        ends = ex.round_exact(np.array([y * (1 - tol), y * (1 + tol)], dtype=object), "float32")
        if ends[0] != ends[1]:
            raise RuntimeError(f"mpmath at 200 bits cannot decide {name}({xs[i]!r})")
        out[i] = ends[0]
    return out


def reference(name: str, x: np.ndarray) -> tuple[np.ndarray, int]:
    """Correctly rounded float32 results for float32 ``x`` and the number decided by mpmath."""
    mask, out = _closed_form(name, x)
    idx = np.flatnonzero(~mask)
    if idx.size == 0:
        return out, 0
    with np.errstate(all="ignore"):
        w = getattr(np, name)(x[idx].astype(_LD))
        lo = (w * _LD(1 - _LD(REL))).astype(np.float32)  # 1 -+ 2**-58: exact in long double
        hi = (w * _LD(1 + _LD(REL))).astype(np.float32)
    out[idx] = lo
    undecided = idx[lo != hi]
    if undecided.size:
        out[undecided] = _mpmath_round(name, x[undecided])
    return out, int(undecided.size)


def measure_longdouble_error(name: str, n: int = 2000) -> float:
    """Largest relative error of the long-double function against mpmath on a sample."""
    rng = np.random.default_rng(0)
    if name in ("exp", "expm1"):
        x = rng.uniform(-104, 88.7, n)
    elif name == "log":
        x = np.exp(rng.uniform(-103, 88, n))
    else:
        x = np.expm1(rng.uniform(-16, 88, n))
    x = x.astype(np.float32)
    w = getattr(np, name)(x.astype(_LD))
    ctx = ex.context(200)
    worst = 0.0
    exact_w = ex.to_exact(w)
    for xv, wv in zip(ex.to_exact(x.astype(np.float64)), exact_w, strict=True):
        y = getattr(ctx, name)(ctx.mpf(xv))
        if y != 0:
            worst = max(worst, float(abs((ctx.mpf(wv) - y) / y)))
    return worst


def check(name: str, start: int, stop: int, chunk: int) -> dict:
    t0 = time.perf_counter()
    err = measure_longdouble_error(name)
    if err > REL / 4:
        raise SystemExit(f"long-double {name} error {err:.3g} exceeds REL/4; reference unsafe")
    checked = undecided = 0
    bad = []
    n_bad = 0
    for s in range(start, stop, chunk):
        bits = np.arange(s, min(s + chunk, stop), dtype=np.uint64).astype(np.uint32)
        x = bits.view(np.float32)
        got = el.evaluate(name, x, "float32")
        want, k = reference(name, x)
        undecided += k
        same = (got.view(np.uint32) == want.view(np.uint32)) | (np.isnan(got) & np.isnan(want))
        if not same.all():
            n_bad += int(np.count_nonzero(~same))
            bad.extend(zip(x[~same][:10].tolist(), got[~same][:10].tolist(), strict=True))
        checked += x.size
        if (s - start) // chunk % 64 == 63:  # progress, to stderr
            print(f"{name}: {checked} of {stop - start} checked, {n_bad} mismatches",
                  file=sys.stderr, flush=True)  # fmt: skip
    return {
        "function": name,
        "inputs": checked,
        "longdouble_max_rel_error": err,
        "decided_by_mpmath": undecided,
        "mismatches": n_bad,
        "examples": bad[:10],
        "seconds": round(time.perf_counter() - t0, 1),
    }


def _bits(text: str) -> int:
    try:
        v = int(text, 0)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected an integer bit pattern, got {text!r}") from None
    if not 0 <= v <= 2**32:
        raise argparse.ArgumentTypeError(f"bit pattern must lie in [0, 2**32], got {text}")
    return v


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("function", choices=(*FUNCS, "all"))
    ap.add_argument("--start", type=_bits, default=0, help="first bit pattern (default 0)")
    ap.add_argument("--stop", type=_bits, default=2**32, help="end bit pattern (exclusive)")
    ap.add_argument("--chunk", type=int, default=1 << 22, help="patterns per block")
    args = ap.parse_args(argv)
    if args.chunk < 1 or args.stop <= args.start:
        ap.error("need --chunk >= 1 and --stop > --start")
    names = FUNCS if args.function == "all" else (args.function,)
    failed = False
    for name in names:
        r = check(name, args.start, args.stop, args.chunk)
        failed |= r["mismatches"] > 0
        print(
            f"{name}: {r['inputs']} inputs, long-double max rel error "
            f"{r['longdouble_max_rel_error']:.3g}, {r['decided_by_mpmath']} decided by mpmath, "
            f"{r['mismatches']} mismatches, {r['seconds']} s",
            flush=True,
        )
        for x, g in r["examples"]:
            print(f"  x={x!r} got={g!r}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
