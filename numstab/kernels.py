"""Fused elementwise kernels of the training step, compiled by numba when it is installed.

:func:`relu_grad` (``numstab.mlp``'s ReLU backward), :func:`adam_update` (Adam/AdamW with
float32 or float64 parameters and state, ``numstab.optim``), :func:`exp64_fast` (the fast
pass of the correctly rounded float64 ``exp``), :func:`narrow_round` (the rounding test of
the float32 ``exp``/``log``/``log1p``/``expm1``, ``numstab.elementary``),
:func:`magic_round` / :func:`bfloat16_round` (rounding a float32 carrier to float16 or
bfloat16, ``numstab.fastround``), :func:`narrow_round16` (the float16 / bfloat16 rounding
and near-midpoint test of the correctly rounded ``exp``/``log``, ``numstab.elementary``) and
:func:`softmax_rows32` (the float32 softmax's rows, for the collapse verdicts of
``numstab.losses.row_verdicts`` and the monitor), :func:`dot_lanes8` (the ``lanes8``
dot products of ``numstab.metrics``' norms and cosines) and :func:`absorbed_count` (the
monitor's absorbed updates).

Each kernel does in one pass what the NumPy path does in several, with the same IEEE
operations in the same order on the same dtypes, so its results are the NumPy path's bit for
bit (:func:`softmax_rows32` evaluates ``exp`` otherwise and decides the same correctly
rounded terms; its docstring says how): numba's default ``fastmath=False`` (no
reassociation, no contraction of ``a * b + c`` into an FMA), float32 arithmetic on float32
operands (every scalar is passed in the arrays' dtype, never as a Python float, which numba
would widen to float64). ``tests/test_kernels.py`` compares each kernel with the NumPy path
on random and special inputs (NaN, ±inf, subnormals, ±0) and checks the machine code for FMA
instructions.

One thing IEEE 754 leaves open: which NaN an operation returns when both operands are
(different) NaNs. NumPy's own loops differ there (``np.add(a, b)`` returns ``a``'s NaN,
``np.add(a, b, out=a)`` ``b``'s on this machine), and so may a compiled kernel. Such a result
is a NaN on both paths, its payload possibly another; every other result, NaN payloads from a
single NaN source included, is the same bits. (A run stops at its first NaN loss or parameter,
before two NaNs can meet in one update.)

Which path runs: ``NUMSTAB_KERNELS`` = ``auto`` (default: numba when importable, that is
where the ``fast`` extra is installed), ``numba`` (required: ValueError without it) or
``numpy`` (the NumPy path, numba installed or not). In the measurements of
docs/benchmarks.md the kernels make the float16 step about 1.8 times and the bfloat16 step
1.4 times faster, the float64 step 12-19 %, and leave the float32 step as it was, while numba
and LLVM add about 100 MB to a run's peak memory and every process pays numba's import on
its first step (``numpy`` avoids both). :func:`info` says which, for
run outputs (``numstab.run.runtime.runtime_info``). Compiled code is cached on disk
(``cache=True``): the first call in a fresh environment compiles (seconds, :func:`warm`
measures it), later processes load the cache.

Kernels take C-contiguous 1-D NumPy arrays (callers pass ``a.reshape(-1)``) of one dtype,
float32 or float64; :func:`applies` says whether arrays qualify.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import math
import os
import threading
import time

import numpy as np
import threadpoolctl

__all__ = [
    "BACKENDS",
    "DEFAULT",
    "ENV",
    "OVERHEAD_BYTES",
    "absorbed_count",
    "adam_update",
    "applies",
    "backend",
    "bfloat16_round",
    "dot_lanes8",
    "exp64_fast",
    "info",
    "magic_round",
    "narrow_round",
    "narrow_round16",
    "overhead_bytes",
    "relu_grad",
    "softmax_rows32",
    "softmax_rows32_on",
    "warm",
]

#: Values of :data:`ENV`.
BACKENDS = ("auto", "numba", "numpy")
#: The path when :data:`ENV` is unset.
DEFAULT = "auto"
#: The environment variable that selects the path.
ENV = "NUMSTAB_KERNELS"
_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))
#: What the fused kernels add to a process's peak resident memory: numba, its CPU target and
#: LLVM's pages (measured: +105 MiB for a p = 150 float32 run, ``tests/test_sweep.py``'s
#: measurement with NUMSTAB_KERNELS=numba against numpy), with a margin.
OVERHEAD_BYTES = 128 * 2**20


_NUMBA: dict = {}  # "module": numba or None, looked up on first use (its import takes 0.3 s)
# The first use may come from several of numstab.parallel's threads at once: numba's CPU
# target must be loaded by one of them before any compiles (loaded concurrently, a kernel's
# compilation failed with "Unknown attribute 'view'", tests/test_kernels.py). The same lock
# gives each kernel one dispatcher (never held twice: _numba() returns before it is taken).
_NUMBA_LOCK = threading.Lock()


def _numba():
    """The numba module, imported (and its CPU target loaded) on first use, once per process
    whichever thread asks first; None where it is not installed."""
    if "module" not in _NUMBA:
        with _NUMBA_LOCK:
            if "module" not in _NUMBA:
                _NUMBA["module"] = _import_numba()
    return _NUMBA["module"]


def _import_numba():
    try:  # optional: the ``fast`` extra
        import numba
        from numba.core import registry
    except ImportError:
        return None
    _load_target(registry.cpu_target.target_context)
    return numba


def _load_target(context) -> None:
    """Load numba's CPU target now, and give a BLAS library it loads the thread count of the
    BLAS already loaded: the target loads SciPy's OpenBLAS (``numba.np.arraymath`` checks for
    it), which the kernels never call, but a process that pinned its BLAS threads (a sweep
    worker, the bench) keeps every BLAS pinned, and records so in ``runtime_info``."""
    before = {c.filepath: c.num_threads for c in _blas_controllers()}
    context.refresh()
    if before:
        n = min(before.values())
        for c in _blas_controllers():
            if c.filepath not in before:
                c.set_num_threads(n)


def _blas_controllers() -> list:
    return [c for c in threadpoolctl.ThreadpoolController().lib_controllers if c.user_api == "blas"]


def backend() -> str:
    """``"numba"`` or ``"numpy"``: the path the step takes now (reads :data:`ENV`)."""
    want = os.environ.get(ENV, DEFAULT)
    if want == "numpy":
        return "numpy"
    if want not in BACKENDS:
        raise ValueError(f"{ENV}={want!r} is not one of {', '.join(BACKENDS)}")
    if _numba() is None:
        if want == "numba":
            raise ValueError(f"{ENV}=numba but numba is not installed (pip install numba)")
        return "numpy"
    return "numba"


def overhead_bytes() -> int:
    """:data:`OVERHEAD_BYTES` if the fused kernels will run in a process with this
    environment (numba installed, :data:`ENV` allowing it), else 0; numba is not imported."""
    want = os.environ.get(ENV, DEFAULT)
    if want == "numpy":
        return 0
    if "module" in _NUMBA:
        installed = _NUMBA["module"] is not None
    else:
        installed = importlib.util.find_spec("numba") is not None
    return OVERHEAD_BYTES if installed else 0


def info() -> dict:
    """``{"kernels": "numba" | "numpy", "numba": installed version or None}`` for run
    outputs (on the NumPy path numba is not imported)."""
    try:
        version = importlib.metadata.version("numba")
    except importlib.metadata.PackageNotFoundError:
        version = None
    return {"kernels": backend(), "numba": version}


def applies(*arrays) -> bool:
    """True when the fused kernels run (:func:`backend` is numba) and every array is a
    C-contiguous NumPy array of one dtype, float32 or float64."""
    a0 = arrays[0]
    if not isinstance(a0, np.ndarray) or a0.dtype not in _DTYPES or backend() != "numba":
        return False
    return all(
        isinstance(a, np.ndarray) and a.dtype == a0.dtype and a.flags.c_contiguous for a in arrays
    )


class _Kernel:
    """A function compiled by numba on its first call (lazily, so that importing numstab
    does not import numba), with the options every kernel uses: IEEE semantics
    (``fastmath=False``), the disk cache, the GIL released."""

    def __init__(self, fn):
        self.py_func = fn
        self.dispatcher = None

    def compiled(self):
        if self.dispatcher is None:
            njit = _numba().njit(cache=True, nogil=True, fastmath=False, error_model="numpy")
            with _NUMBA_LOCK:  # one dispatcher (one compilation) whichever thread asks
                if self.dispatcher is None:
                    self.dispatcher = njit(self.py_func)
        return self.dispatcher

    def __call__(self, *args):
        return (self.dispatcher or self.compiled())(*args)


# --- ReLU backward --------------------------------------------------------------------------
# (The forward, np.maximum(x, 0), is one pass already: a kernel for it measured no faster.)


@_Kernel
def _relu_grad(dy, y, out, one, zero):
    for i in range(dy.size):
        out[i] = dy[i] * (one if y[i] > zero else zero)  # dy · [y > 0], a product as NumPy's


def relu_grad(dy: np.ndarray, y: np.ndarray, out: np.ndarray) -> np.ndarray:
    """``out <- dy · (y > 0)`` as a product with the 0/1 mask in ``dy``'s dtype (so
    ``inf · 0 = NaN`` and ``-x · 0 = -0``, as NumPy's); flat arrays."""
    t = dy.dtype.type
    _relu_grad(dy, y, out, t(1), t(0))
    return out


# --- Adam / AdamW ----------------------------------------------------------------------------


@_Kernel
def _adam(p, g, m, v, upd, c, decay, l2, lerp_small):
    # c: the scalars in the arrays' dtype (see adam_update); the NumPy path's operations in
    # its order, each rounded to the dtype
    decay_f, wd, w, w1, beta2, one_m_beta2, bc2, eps, neg_step = (
        c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8],
    )  # fmt: skip
    for i in range(p.size):
        pi = p[i]
        gi = g[i]
        if decay:
            pi = pi * decay_f  # param.mul_(1 - lr * weight_decay)
        elif l2:
            gi = gi + pi * wd  # grad.add(param, alpha=weight_decay)
        t = gi - m[i]
        if lerp_small:
            mi = m[i] + t * w  # m + w (g - m)
        else:
            mi = gi - t * w1  # g - (g - m)(1 - w)
        m[i] = mi
        vi = v[i] * beta2 + (gi * one_m_beta2) * gi  # beta2 v + ((1 - beta2) g) g
        v[i] = vi
        d = np.sqrt(vi) / bc2 + eps
        u = (mi * neg_step) / d  # (-step_size m) / denom
        upd[i] = u
        p[i] = pi + u


def adam_update(p, g, m, v, upd, *, decay, wd, w, beta2, bias2_sqrt, eps, step_size):
    """One Adam/AdamW update of a flat parameter in place, in the arrays' dtype (float32 or
    float64, all one): the operations of :meth:`numstab.optim._AdamMixin._update` with every
    scalar as that method forms it.

    ``decay``: AdamW's factor ``1 - lr·wd`` (None: no decoupled decay); ``wd``: Adam's L2
    coefficient (0: none); ``w = 1 - beta1``. Writes ``p``, ``m``, ``v`` and ``upd`` (the
    intended update ``(-step_size·m) / denom``).
    """
    t = p.dtype.type
    w_t = t(w)
    c = np.array(
        [
            0 if decay is None else decay,
            wd,
            w_t,
            t(1) - w_t,
            beta2,
            1 - beta2,
            bias2_sqrt,
            eps,
            -step_size,
        ],
        dtype=p.dtype,
    )
    _adam(p, g, m, v, upd, c, decay is not None, decay is None and wd != 0, abs(w_t) < 0.5)


# --- exp: float64 fast pass, float32 rounding test ----------------------------------------


@_Kernel
def _exp64(x, out_bits, flag, th, tl, c):
    inv_l, c1, neg_c2, c3, c4, low, high, eps = c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7]
    magic = 6755399441055744.0  # 1.5 * 2**52: (v + magic) - magic is rint(v) for |v| < 2**51
    block = 512  # three loops per block: the two without table lookups are vectorised
    kb = np.empty(block, np.int64)
    pb = np.empty(block)
    thb = np.empty(block)
    tlb = np.empty(block)
    n_flag = 0
    for s0 in range(0, x.size, block):
        n = min(block, x.size - s0)
        for k in range(n):
            xi = x[s0 + k]
            inside = (xi >= low) & (xi <= high)  # False for NaN: left to the double-double
            xc = xi if inside else 0.0
            # rint as the NumPy path's np.rint, except that a kf of -0 reads +0 here: then
            # |x| < 2**-13 and a, rh, hence everything below, are the same bits
            kf = (xc * inv_l + magic) - magic
            a = xc - kf * c1
            rh = a + kf * neg_c2
            q = rh * c4 + c3
            q = q * rh + 0.5
            q = q * (rh * rh)
            pb[k] = rh + q
            kb[k] = np.int64(kf)
        for k in range(n):
            j = kb[k] & 4095
            thb[k] = th[j]
            tlb[k] = tl[j]
        for k in range(n):
            xi = x[s0 + k]
            t_h = thb[k]
            f1 = t_h * pb[k] + tlb[k]
            s = t_h + f1
            lo = f1 - (s - t_h)
            amb = (s + (lo - eps)) != (s + (lo + eps))
            f = amb | (not ((xi >= low) & (xi <= high)))
            flag[s0 + k] = f
            n_flag += f
            # s in [0.999, 2.002) and the result normal: scaling adds m to the exponent
            out_bits[s0 + k] = np.float64(s).view(np.int64) + ((kb[k] >> 12) << 52)
    return n_flag


def exp64_fast(x, out, flag, th, tl, consts) -> int:
    """The fast pass of the float64 exp (``numstab.elementary._Exp64Kernel``) element by
    element: ``out`` where decided, ``flag`` True where the element is left to the
    double-double path (outside the fast range, NaN, or in the rounding window). Returns the
    number flagged. ``consts``: float64 array (inv_l, c1, -c2, c3, c4, low, high, eps)."""
    return int(_exp64(x, out.view(np.int64), flag, th, tl, consts))


@_Kernel
def _narrow32(w, of, amb, half_k, mask, two_k, rel, tiny):
    n_amb = 0
    wb = w.view(np.uint64)
    for i in range(w.size):
        wi = w[i]
        of[i] = np.float32(wi)  # one rounding, float64 -> float32 (RN)
        if abs(wi) < tiny:  # a subnormal result: the bracket (an absolute quantum)
            d = wi * rel
            a = np.float32(wi - d) != np.float32(wi + d)
        else:
            a = ((wb[i] - half_k) & mask) <= two_k
        amb[i] = a
        n_amb += a
    return n_amb


def narrow_round(w, of, amb, half_k, mask, two_k, rel, tiny) -> int:
    """``of <- float32(w)`` and ``amb`` the float32 rounding test of
    ``numstab.elementary._narrow_block``: ``((bits(w) - half_k) & mask) <= two_k`` (uint64
    constants) where ``|w| >= tiny`` (2**-126, the float32 quantum relative there), and the
    bracket ``float32(w - w·rel) != float32(w + w·rel)`` below (subnormal results, whose
    quantum is absolute). Returns the number of ambiguous elements."""
    return int(_narrow32(w, of, amb, half_k, mask, two_k, rel, tiny))


# --- the softmax's rows in float32 (numstab.losses.softmax) ---------------------------------


@_Kernel
def _softmax32(z, y, below, out_hit, out_s, out_dy, out_rs, flag, win, th, tl, tf, c, half_k,
               mask, two_k, rel, tiny):  # fmt: skip
    inv_l, c1, neg_c2, c3, c4, settle, d_open = c[0], c[1], c[2], c[3], c[4], c[5], c[6]
    inv_f, c1_f, neg_c2_f = c[7], c[8], c[9]
    magic = 6755399441055744.0  # 1.5 * 2**52: (v + magic) - magic is rint(v) for |v| < 2**51
    n_rows, n_cls = z.shape
    flip = np.int32(0x7FFFFFFF)
    e32 = np.empty(n_cls, np.float32)  # the row's terms
    e64 = np.empty(n_cls, np.float64)  # the row's gradient if it collapsed (g_y at y)
    pb = np.empty(n_cls, np.float64)
    kb = np.empty(n_cls, np.int64)
    thb = np.empty(n_cls, np.float64)
    ab = np.empty(n_cls, np.bool_)
    # the pairwise tree without recursion: a stack of (start, length, stage, left sums)
    st_lo = np.empty(64, np.int64)
    st_n = np.empty(64, np.int64)
    st_stage = np.empty(64, np.int64)
    st_l32 = np.empty(64, np.float32)
    st_l64 = np.empty(64, np.float64)
    n_flag = 0
    for i in range(n_rows):
        # the row maximum as the largest integer key (a reduction that vectorises, where a
        # float max with NaN does not): the bits of v as an int32, a negative value's
        # magnitude bits flipped, so the keys order as the floats (-0 below +0: either is
        # the maximum, as every use compares with ==, <= or subtracts, where they agree)
        top = np.int32(-(2**31))
        nan = 0
        for k in range(n_cls):
            v = z[i, k]
            b = np.float32(v).view(np.int32)
            top = max(top, b ^ ((b >> 31) & flip))
            nan += v != v
        mi = np.int32(top ^ ((top >> 31) & flip)).view(np.float32)  # the key's float
        mi = mi if nan == 0 else np.float32(np.nan)
        lim = np.float64(mi) + below  # the cut: m + below, rounded up to float32
        ci = np.float32(lim)
        if np.float64(ci) < lim:
            ci = np.float32(np.nextafter(ci, np.float32(np.inf)))
        yi = y[i]
        # counts in int32 selects, not bools: the loop then vectorises
        one, zero = np.int32(1), np.int32(0)
        above = zero
        wide = zero
        bad = zero
        for k in range(n_cls):
            v = z[i, k]
            above += one if v > ci else zero
            d = v - mi  # float32, one rounding
            wide += one if d >= d_open else zero  # RN(e**d) > 2**-24 (the maximum included)
            bad += zero if d <= 0 else one  # NaN: in the row, or an infinite maximum's inf - inf
        bad += nan
        tied = zero  # maxima before the label's column
        for k in range(yi):
            tied += one if z[i, k] == mi else zero
        out_hit[i] = (nan == 0) & (z[i, yi] == mi) & (tied == 0)  # numpy.argmax(row) == y
        win[i] = above <= 1
        if above > 1:  # outside the caller's window: not evaluated
            flag[i] = False
            continue
        if wide > 1 and bad == 0:  # a second term RN(1 + e) > 1: the sum exceeds 1
            out_s[i] = np.nan
            flag[i] = False
            continue
        # the fast float64 exp in three loops per row (the two without the table lookup
        # vectorise): exp(d) = 2**(k/256) e**r, |r| <= ln2/512, e**r - 1 ~ r + r**2 q(r),
        # 2**(k/256) from the 256-entry table (2 KiB, in the L1 cache). Relative error below
        # 2**-51.3 (elementary.softmax32_consts), against the 2**-45 the rounding test needs
        for k in range(n_cls):
            d = z[i, k] - mi  # float32, one rounding
            dc = d if d >= -104.0 else 0.0
            kf = (dc * inv_f + magic) - magic
            a = dc - kf * c1_f  # exact
            rh = a + kf * neg_c2_f
            q = rh * c4 + c3
            q = q * rh + 0.5
            q = q * (rh * rh)
            pb[k] = rh + q
            kb[k] = np.int64(kf)
        for k in range(n_cls):
            thb[k] = tf[kb[k] & 255]
        amb = False
        for k in range(n_cls):
            t_h = thb[k]
            s = t_h + t_h * pb[k]  # in [0.998, 2.004): exp(d) = s 2**m, m <= 0
            w = np.int64(np.float64(s).view(np.int64) + ((kb[k] >> 8) << 52)).view(np.float64)
            dd = w * rel  # the bracket, for a subnormal float32 result; else the low bits
            sub = np.float32(w - dd) != np.float32(w + dd)
            low = ((np.float64(w).view(np.uint64) - half_k) & mask) <= two_k
            a_k = sub if abs(w) < tiny else low  # a select, not a branch: the loop vectorises
            inside = z[i, k] - mi >= -104.0  # below, exp(d) < 2**-150: +0 exactly
            e = np.float32(w) if inside else np.float32(0.0)
            ab[k] = a_k & inside
            amb |= a_k & inside
            e32[k] = e
            e64[k] = np.float64(e)
        if amb:  # rare (about one term in 2**19): settle those with the double-double exp
            amb = False
            for k in range(n_cls):
                if not ab[k]:
                    continue
                # numstab.elementary._Exp64Kernel's pass: the 4096-entry table th + tl, and
                # its last correction lo
                d = np.float64(z[i, k] - mi)
                kf = (d * inv_l + magic) - magic
                rh = (d - kf * c1) + kf * neg_c2
                q = rh * c4 + c3
                q = q * rh + 0.5
                q = q * (rh * rh)
                ki = np.int64(kf)
                t_h = th[ki & 4095]
                f1 = t_h * (rh + q) + tl[ki & 4095]
                s = t_h + f1
                lo = f1 - (s - t_h)  # Fast2Sum (|t_h| > |f1|): s + lo = t_h + f1 exactly
                scale = np.int64((1023 + (ki >> 12)) << 52).view(np.float64)  # 2**m
                w = s * scale  # exact: normal float64 values (exp(d) > 2**-151)
                wl = lo * scale
                a = np.float32(w)
                af = np.float64(a)
                # the float32 midpoint nearest w, between a and its neighbour on w's side
                # (a >= 0: one step of the bits); exact in float64
                step = np.int32(1) if af <= w else np.int32(-1)
                b = np.float64(np.int32(np.float32(a).view(np.int32) + step).view(np.float32))
                diff = (w - (af + b) * 0.5) + wl  # w - mid exact (Sterbenz); sign reliable
                # |e**d - (w + wl)| < 2**-63.4 w (numstab.elementary._Exp64Kernel's budget)
                if abs(diff) <= settle * w:
                    amb = True  # a hard case: left to the caller
                    continue
                e = np.float32(max(af, b) if diff > 0 else min(af, b))
                e32[k] = e
                e64[k] = np.float64(e)
        out_dy[i] = z[i, yi] - mi
        e64[yi] = np.float64(e32[yi] - np.float32(1.0))  # g_y = RN(p_y - 1), p_y = e_y
        f = amb | (bad > 0)
        flag[i] = f
        n_flag += f
        # NumPy's pairwise sum of e32 (float32) and e64 (float64): one tree, both arrays
        st_lo[0], st_n[0], st_stage[0] = 0, n_cls, 0
        sp = 1
        r32 = np.float32(0.0)
        r64 = 0.0
        while sp > 0:
            n = st_n[sp - 1]
            lo = st_lo[sp - 1]
            if n > 128:  # two halves, n // 2 rounded down to a multiple of 8 first
                st_stage[sp - 1] = 1
                n2 = n // 2
                st_lo[sp], st_n[sp], st_stage[sp] = lo, n2 - n2 % 8, 0
                sp += 1
                continue
            if n < 8:
                v32 = np.float32(-0.0)
                v64 = -0.0
                for k in range(n):
                    v32 += e32[lo + k]
                    v64 += e64[lo + k]
            else:
                # eight accumulators in locals (not an array: they then stay in registers)
                a0, a1, a2, a3 = e32[lo], e32[lo + 1], e32[lo + 2], e32[lo + 3]
                a4, a5, a6, a7 = e32[lo + 4], e32[lo + 5], e32[lo + 6], e32[lo + 7]
                b0, b1, b2, b3 = e64[lo], e64[lo + 1], e64[lo + 2], e64[lo + 3]
                b4, b5, b6, b7 = e64[lo + 4], e64[lo + 5], e64[lo + 6], e64[lo + 7]
                for j in range(lo + 8, lo + n - n % 8, 8):
                    a0, a1, a2, a3 = a0 + e32[j], a1 + e32[j + 1], a2 + e32[j + 2], a3 + e32[j + 3]
                    h = j + 4
                    a4, a5, a6, a7 = a4 + e32[h], a5 + e32[h + 1], a6 + e32[h + 2], a7 + e32[h + 3]
                    b0, b1, b2, b3 = b0 + e64[j], b1 + e64[j + 1], b2 + e64[j + 2], b3 + e64[j + 3]
                    b4, b5, b6, b7 = b4 + e64[h], b5 + e64[h + 1], b6 + e64[h + 2], b7 + e64[h + 3]
                v32 = ((a0 + a1) + (a2 + a3)) + ((a4 + a5) + (a6 + a7))
                v64 = ((b0 + b1) + (b2 + b3)) + ((b4 + b5) + (b6 + b7))
                for k in range(n - n % 8, n):
                    v32 += e32[lo + k]
                    v64 += e64[lo + k]
            sp -= 1
            while sp > 0:  # hand the sum to the parent: its left half, or its total
                p = sp - 1
                if st_stage[p] == 1:
                    st_l32[p], st_l64[p], st_stage[p] = v32, v64, 2
                    n2 = st_n[p] // 2
                    n2 -= n2 % 8
                    st_lo[sp], st_n[sp], st_stage[sp] = st_lo[p] + n2, st_n[p] - n2, 0
                    sp += 1
                    break
                v32 = st_l32[p] + v32
                v64 = st_l64[p] + v64
                sp -= 1
            if sp == 0:
                r32, r64 = v32, v64
        out_s[i] = np.float32(0.0) + r32  # the reduction's identity, as numpy.sum
        out_rs[i] = 0.0 + r64
    return n_flag


def softmax_rows32(z, y, below, out_hit, out_s, out_dy, out_rs, flag, win, consts) -> int:
    """The float32 softmax's rows in one pass (``numstab.losses.softmax``'s fused verdicts):
    per row ``i`` of ``z`` (N, C) float32 with labels ``y`` (N,) int64 in ``[0, C)``, the
    maximum ``m`` (NaN in a row with NaN), ``out_hit <-`` ``numpy.argmax(z_i) == y_i`` and no
    NaN in the row (the accuracy's hit), ``win <-`` at most one entry above the cut
    ``m + below`` (computed in float64, rounded up to float32; ``below = +inf``: every
    row), the rows evaluated; for those the terms ``e = RN(exp RN(z - m))`` (correctly
    rounded), and

    ``out_s <-`` their pairwise sum (NumPy's tree, float32), ``out_dy <- RN(z_y - m)``,
    ``out_rs <-`` the float64 pairwise sum of ``e`` with ``e_y`` replaced by ``RN(e_y - 1)``
    (the row's logit gradient if it collapsed), ``flag <-`` rows left to the caller: a term
    that neither rounding test could decide, NaN in the row or an infinite maximum. The other
    rows' ``out_s``, ``out_dy`` and ``out_rs`` are not written. A row with two entries at
    ``d >= open`` (``open`` of ``consts``: ``RN(e**d) > 2**-24``; the maximum and one more)
    does not collapse, as ``RN(1 + e) > 1`` and the tree's sum is monotone in each term: its
    terms are not evaluated, ``out_s <- NaN`` (its other outputs not written). Returns the
    number flagged.

    Unlike the other kernels this one does not repeat the NumPy path's operations: ``exp``'s
    float64 value comes from a fast pass of its own (a 256-entry table of ``2**(j/256)``
    and a degree-4 polynomial, relative error below ``2**-51.3``; the NumPy path takes
    NumPy's float64 ``exp``), and the same float32 rounding test (window ``2**-44``, valid
    for any error below ``2**-45``) decides it, so every decided term is the correctly
    rounded one: the NumPy path's bits. A term in that window (about one in ``2**19``) is
    settled with ``numstab.elementary``'s double-double pass (the 4096-entry table, ``s +
    lo`` within ``2**-63.4`` of ``e**d``), compared with the float32 midpoint next to it;
    only a distance below ``settle · w`` (``settle`` of ``consts``, ``2**-62``) leaves it
    undecided (not met in the scans of the tests). ``d < -104`` gives ``+0`` without ``exp``
    (``exp(d) < 2**-150``, half the smallest subnormal). ``consts``:
    :func:`numstab.elementary.softmax32_consts`."""
    return int(_softmax32(z, y, float(below), out_hit, out_s, out_dy, out_rs, flag, win, *consts))


def softmax_rows32_on(team, threads, quantum, z, y, below, outs, consts) -> None:
    """:func:`softmax_rows32` of ``z`` (N, C), ``y`` (N,) into ``outs`` (its six outputs), in
    blocks of ``quantum`` rows on ``threads`` threads of an OpenMP ``team``
    (:mod:`numstab.ompteam`, :mod:`numstab.teamkernels`): the same bits."""
    from numstab import teamkernels  # compiles its region's body on first use

    teamkernels.softmax_rows32(team, threads, quantum, z, y, float(below), outs, consts)


# --- rounding to float16 / bfloat16 (numstab.fastround) -----------------------------------


@_Kernel
def _magic(x, u, out, m_buf, absmask, signmask, expmask, floor, shift, top):
    m_val = m_buf.view(x.dtype)
    out_bits = out.view(u.dtype)
    n_special = 0
    for i in range(x.size):
        a = u[i] & absmask
        m_buf[0] = max(a & expmask, floor) + shift  # the magic number's bits
        mf = m_val[0]
        out[i] = (abs(x[i]) + mf) - mf  # two roundings in x's dtype, as NumPy's two passes
        out_bits[i] |= u[i] & signmask  # the result is >= +0: the sign set, as copysign does
        n_special += a > top
    return n_special


def magic_round(x, u, out, consts) -> int:
    """``out <- copysign((|x| + M) - M, x)`` with ``M`` built from the exponent bits
    (``numstab.fastround._magic``'s passes in one); returns the number of elements above the
    target's largest finite value (``|x| > top``: overflow, inf, NaN), which the caller redoes.
    ``u``: ``x``'s bits (the unsigned view); ``consts``: ``(absmask, signmask, expmask, floor,
    shift, top)`` in ``u``'s dtype."""
    return int(_magic(x, u, out, np.zeros(1, u.dtype), *consts))


@_Kernel
def _narrow16(w, u, of, amb, counts, m_buf, absmask, expmask, floor, shift, top, half_k, low,
              two_k, tiny, q_half, rel, slack):  # fmt: skip
    m_val = m_buf.view(w.dtype)
    n_amb = n_special = 0
    for i in range(w.size):
        b = u[i]
        a = b & absmask
        m_buf[0] = max(a & expmask, floor) + shift  # the magic number's bits
        mf = m_val[0]
        aw = abs(w[i])
        r = (aw + mf) - mf  # float64, as numstab.fastround._magic
        of[i] = np.float32(math.copysign(r, w[i]))  # exact: a value of the 16-bit format
        n_special += a > top
        if aw < tiny:  # the subnormal grid, an absolute quantum: |w - r| exact, <= q_half
            t = q_half - abs(aw - r) <= aw * rel + slack
        else:
            t = ((b - half_k) & low) <= two_k  # near a midpoint of the target
        amb[i] = t
        n_amb += t
    counts[0], counts[1] = n_amb, n_special


def narrow_round16(w, of, amb, counts, consts) -> None:
    """The float16 / bfloat16 pass of ``numstab.elementary._narrow_block`` in one:
    ``of <- `` float64 ``w`` rounded to the format (``numstab.fastround``'s magic number; the
    elements above its largest finite value left for the caller), ``amb <-`` the
    near-midpoint test of ``numstab.elementary._near_midpoint`` where ``|w| >= tiny`` (the
    smallest normal) and below it, on the subnormal grid (quantum ``2 q_half``), whether a
    midpoint lies within ``|w| rel + slack`` of ``|w|``; ``counts <-`` (ambiguous, above the
    largest finite value). ``consts``: uint64 ``(absmask, expmask, floor, shift, top, half_k,
    low, two_k)`` and the floats ``(tiny, q_half, rel, slack)``."""
    _narrow16(w, w.view(np.uint64), of, amb, counts, np.zeros(1, np.uint64), *consts)


@_Kernel
def _bf16(u, out_bits, one, half, keep, absmask, signmask, inf_bits, nan_bits):
    for i in range(u.size):  # a select, not a branch, so that the loop vectorises
        b = u[i]
        rounded = (((b >> 16) & one) + b + half) & keep  # nearest even, carry into the exponent
        nan = nan_bits | (b & signmask)  # NaN: the canonical quiet NaN with x's sign
        out_bits[i] = nan if (b & absmask) > inf_bits else rounded


def bfloat16_round(u, out_bits) -> None:
    """``out_bits <- `` the float32 bit patterns ``u`` rounded to bfloat16 (nearest even, the
    carry into the exponent; NaN: the quiet NaN with its sign, as
    ``numstab.fastround._same_range``); uint32 arrays."""
    t = np.uint32
    _bf16(u, out_bits, t(1), t(0x7FFF), t(0xFFFF0000), t(0x7FFFFFFF), t(0x80000000),
          t(0x7F800000), t(0x7FC00000))  # fmt: skip


# --- dot products in eight float64 lanes (numstab.metrics, order "lanes8") ------------------


@_Kernel
def _lanes8(a, b, lanes):
    for i in range(a.size):
        x = np.float64(a[i])  # exact: float32 -> float64
        y = np.float64(b[i])
        j = i & 7
        lanes[0, j] += x * x
        lanes[1, j] += y * y
        lanes[2, j] += x * y


def dot_lanes8(a, b, lanes) -> None:
    """``lanes[0, j] +=`` the float64 products ``a_i · a_i`` with ``i ≡ j (mod 8)``, in order of
    ``i``; ``lanes[1]`` likewise ``b_i · b_i``, ``lanes[2]`` ``a_i · b_i``: the lanes of
    ``numstab.metrics``' order ``"lanes8"`` (one pass, no float64 copy of a float32 input).
    ``a``, ``b``: 1-D, C-contiguous, one dtype (float32 or float64), the same size;
    ``lanes``: float64 (3, 8), zeroed by the caller."""
    _lanes8(a, b, lanes)


@_Kernel
def _absorbed(want, before, after, counts):
    due = absorbed = 0
    for i in range(want.size):
        w = want[i] != 0
        due += w
        absorbed += w & (after[i] == before[i])
    counts[0], counts[1] = due, absorbed


def absorbed_count(want, before, after) -> tuple[int, int]:
    """``(count(w), count(w & (after == before)))``, ``w = want != 0``, in one pass
    (``numstab.monitor``'s absorbed updates: ``==`` as IEEE compares, ``-0 == +0``, NaN
    unequal). ``want``: bool or numbers (a NaN counts as non-zero); ``before``, ``after``:
    one float dtype; all 1-D, C-contiguous, the same size."""
    counts = np.zeros(2, np.int64)
    _absorbed(want, before, after, counts)
    return int(counts[0]), int(counts[1])


# --- warm-up ----------------------------------------------------------------------------------


def warm() -> float:
    """Compile (or load from the cache) every kernel for float32 and float64; the seconds it
    took (0 on the NumPy path)."""
    if backend() != "numba":
        return 0.0
    t0 = time.perf_counter()
    for dt in _DTYPES:
        a = np.ones(4, dtype=dt)
        relu_grad(a, a, np.empty_like(a))
        p, m, v, u = (np.ones(4, dtype=dt) for _ in range(4))
        adam_update(p, a, m, v, u, decay=None, wd=0, w=0.1, beta2=0.99, bias2_sqrt=1,
                    eps=1e-8, step_size=0.1)  # fmt: skip
    x = np.zeros(4)
    consts = np.zeros(8)
    exp64_fast(x, np.empty(4), np.empty(4, dtype=bool), np.ones(4096), np.zeros(4096), consts)
    u64 = np.uint64(0)
    narrow_round(x, np.empty(4, np.float32), np.empty(4, dtype=bool), u64, u64, u64, 1.0, 1.0)
    for dt, ut in ((np.float32, np.uint32), (np.float64, np.uint64)):
        x = np.ones(4, dtype=dt)
        consts = tuple(ut(0) for _ in range(6))
        magic_round(x, x.view(ut), np.empty_like(x), consts)
    u32 = np.ones(4, dtype=np.uint32)
    bfloat16_round(u32, np.empty_like(u32))
    counts = np.zeros(2, np.int64)
    consts16 = (*(u64 for _ in range(8)), 0.0, 0.0, 0.0, 0.0)
    narrow_round16(x, np.empty(4, np.float32), np.empty(4, dtype=bool), counts, consts16)
    z = np.zeros((2, 3), np.float32)
    out = (np.empty(2, bool), np.empty(2, np.float32), np.empty(2, np.float32), np.empty(2),
           np.empty(2, bool), np.empty(2, bool))  # fmt: skip
    tables = (np.ones(4096), np.zeros(4096), np.ones(256), np.zeros(10), u64, u64, u64, 1.0, 1.0)
    softmax_rows32(z, np.zeros(2, np.int64), np.inf, *out, tables)
    for dt in _DTYPES:
        a = np.ones(9, dtype=dt)
        dot_lanes8(a, a, np.zeros((3, 8)))
        absorbed_count(np.ones(9, dtype=bool), a, a)
        absorbed_count(a, a, a)  # an optimizer's moment as the due entries
    return time.perf_counter() - t0
