"""Floating-point formats, correctly rounded conversion, and precision policies.

Five IEEE formats are fully supported everywhere: ``float16``, ``bfloat16`` (from ml_dtypes),
``float32``, ``float64`` and ``longdouble`` (x87 80-bit extended; only where NumPy's
``longdouble`` really is wider than float64). The narrow formats of ml_dtypes (fp8, fp6, fp4),
``tf32`` and custom IEEE-style formats ``eXmY`` are emulated the same way
(:func:`available_formats` with ``extended=True``; docs/formats.md states each one's rules).

Arithmetic in float16 and bfloat16 is *emulated*: values are held in a float32 **carrier** array
and every operation is one float32 operation followed by one rounding to the format. For
``+ - * / sqrt`` this equals the correctly rounded float16/bfloat16 result (float32 has more than
``2p + 2`` significand bits for both formats, so double rounding is innocuous). ``exp``,
``log``, ``log1p`` and ``expm1`` are correctly rounded in every format by
:mod:`numstab.elementary` (a policy's ``elementary="libm"`` keeps NumPy's own, which are not).

Rounding here is done with integer operations on the bit pattern: NumPy's own float32 -> float16
cast is about 25x slower than an add for values in the float16 subnormal range, which is exactly
where a softmax tail lives.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from dataclasses import dataclass

import numpy as np

from numstab.backend import (
    array_module,
    errstate,
    is_ml_dtype,
    ml_dtype,
    namespace,
    uint_view,
    xp_dtype,
)
from numstab.rounding_modes import SUBNORMAL_RULES, canonical_rounding, next_key, round_to_grid

__all__ = [
    "ELEMENTARY_MODES",
    "FORMAT_NAMES",
    "NAN_ENCODINGS",
    "NARROW_FORMAT_NAMES",
    "OVERFLOW_RULES",
    "REDUCTION_ORDERS",
    "SATURATING_SUFFIX",
    "Format",
    "PrecisionPolicy",
    "available_formats",
    "carrier_dtype",
    "get_format",
    "quantize",
    "round_to",
    "with_arithmetic",
]

#: Summation orders a :class:`PrecisionPolicy` may declare (see :mod:`numstab.summation`).
REDUCTION_ORDERS = ("pairwise", "sequential", "wide", "sorted", "torch")

#: Evaluation modes of exp/log/log1p/expm1 a :class:`PrecisionPolicy` may declare (see
#: :mod:`numstab.elementary`, which re-exports this tuple).
ELEMENTARY_MODES = ("correct", "libm")

#: Where a format keeps its NaN: ``ieee`` (exponent field all ones, significand non-zero),
#: ``top`` (only the all-ones pattern, E4M3FN: the top binade is otherwise finite),
#: ``negzero`` (the pattern of -0, the "fnuz" formats, which have no -0), ``none``.
NAN_ENCODINGS = ("ieee", "top", "negzero", "none")
#: What a value beyond the largest finite one becomes: ``inf``, ``nan`` or ``saturate``
#: (the largest finite number of its sign).
OVERFLOW_RULES = ("inf", "nan", "saturate")

@dataclass(frozen=True)
class Format:
    """A binary floating-point format.

    Attributes
    ----------
    name : str
        Canonical name (one of :data:`FORMAT_NAMES`).
    dtype_name : str
        Name of the dtype of arrays in this format: NumPy's (``float16``, ``float32``,
        ``float64``, ``longdouble``) or ml_dtypes' (``bfloat16``, ``float8_e4m3fn``, ...).
    dtype : numpy.dtype
        That dtype (ml_dtypes is imported the first time a format of its own is asked for it).
    precision : int
        ``p``, significand bits including the hidden bit (11, 8, 24, 53, 64).
    emin, emax : int
        Exponents of the smallest normal (``2**emin``) and of the largest binade.
    unit_roundoff : float
        ``u = 2**-p``: ``fl(1 + x) == 1`` exactly when ``0 <= x <= u`` (round to nearest even).
    eps : float
        Machine epsilon ``2**(1 - p)``, the gap between 1 and the next number.
    tiny : numpy scalar
        Smallest positive normal number, ``2**emin`` (as a scalar of ``dtype``).
    smallest_subnormal : numpy scalar
        ``2**(emin - p + 1)``.
    max : numpy scalar
        Largest finite number, ``(2 - 2**(1 - p)) * 2**emax`` (``(2 - 2**(2 - p)) * 2**emax``
        where the top significand pattern is NaN, ``nan="top"``).
    has_subnormals : bool
        Gradual underflow below ``tiny`` (every format here has it; flush-to-zero is the
        ``subnormals`` rule below).
    infinities : bool
        The format has ``±inf``.
    nan : str
        NaN encoding, one of :data:`NAN_ENCODINGS`; ``none``: no NaN (a NaN stays NaN in the
        carrier, and its storage cast is ml_dtypes' own).
    overflow : str
        One of :data:`OVERFLOW_RULES`: what round-to-nearest gives from ``max + ulp(max)/2``
        on (and for ``±inf`` input where the format has no infinity).
    has_dtype : bool
        False for formats without a NumPy dtype of their own (``tf32``, ``eXmY``): their
        values are stored in the carrier.
    rounding : str
        How values are rounded into the format (:data:`numstab.rounding_modes.ROUNDING_MODES`;
        ``nearest``: ties to even). Other modes exist for the emulated formats only: their name
        says so, ``float16@stochastic`` (:func:`get_format` parses it).
    subnormals : str
        :data:`numstab.rounding_modes.SUBNORMAL_RULES`; not ``gradual``: the name says so,
        ``float32@ftz``, ``float16@stochastic@ftz_daz``.
    """

    name: str
    dtype_name: str
    precision: int
    emin: int
    emax: int
    has_subnormals: bool = True
    infinities: bool = True
    nan: str = "ieee"
    overflow: str = "inf"
    has_dtype: bool = True
    rounding: str = "nearest"
    subnormals: str = "gradual"

    def __post_init__(self):
        if self.nan not in NAN_ENCODINGS:
            raise ValueError(f"nan must be one of {NAN_ENCODINGS}, got {self.nan!r}")
        if self.overflow not in OVERFLOW_RULES:
            raise ValueError(f"overflow must be one of {OVERFLOW_RULES}, got {self.overflow!r}")
        if (self.overflow == "inf") != self.infinities and self.overflow != "saturate":
            raise ValueError(f"{self.name}: overflow {self.overflow!r} needs infinities")
        if self.overflow == "nan" and self.nan == "none":
            raise ValueError(f"{self.name}: overflow 'nan' needs a NaN encoding")

    @functools.cached_property
    def dtype(self) -> np.dtype:
        if self.dtype_name in _NUMPY_DTYPE_NAMES:
            return np.dtype(self.dtype_name)
        return ml_dtype(self.dtype_name)

    def stores(self, dt: np.dtype) -> bool:
        """``dt`` is this format's dtype (False for the formats without one: tf32, eXmY).
        Asking about a NumPy dtype never imports ml_dtypes."""
        if not self.has_dtype:
            return False
        if self.dtype_name in _NUMPY_DTYPE_NAMES:
            return self.dtype == dt
        return is_ml_dtype(dt, self.dtype_name)

    @property
    def unit_roundoff(self) -> float:
        return math.ldexp(1.0, -self.precision)

    @property
    def eps(self) -> float:
        return math.ldexp(1.0, 1 - self.precision)

    @property
    def tiny(self):
        return _ldexp_scalar(1, self.emin, self.dtype)

    @property
    def smallest_subnormal(self):
        return _ldexp_scalar(1, self.emin - self.precision + 1, self.dtype)

    @property
    def max_significand(self) -> int:
        """Integral significand ``M`` of :attr:`max` (``max = M * 2**(emax - p + 1)``)."""
        return (1 << self.precision) - (2 if self.nan == "top" else 1)

    @property
    def max(self):
        return _ldexp_scalar(self.max_significand, self.emax - self.precision + 1, self.dtype)

    @property
    def plain(self) -> Format:
        """This format rounded to nearest even with gradual underflow (itself if it is)."""
        if self.rounding == "nearest" and self.subnormals == "gradual":
            return self
        return dataclasses.replace(
            self, name=self.name.split("@")[0], rounding="nearest", subnormals="gradual"
        )

    @property
    def signed_zero(self) -> bool:
        """False for the "fnuz" formats: the pattern of -0 is their NaN, and -0 becomes +0."""
        return self.nan != "negzero"

    @property
    def carrier(self) -> np.dtype:
        """Dtype in which this format's arithmetic is carried out (float32 for 16-bit formats)."""
        return carrier_dtype(self)

    @property
    def is_emulated(self) -> bool:
        """True when values live in a wider carrier and each operation is rounded explicitly."""
        return self.carrier != self.dtype or not self.has_dtype

    def __str__(self) -> str:
        return self.name


def _ldexp_scalar(mantissa: int, exponent: int, dtype: np.dtype):
    """``mantissa * 2**exponent`` as an exact scalar of ``dtype`` (mantissa < 2**64)."""
    if dtype == np.longdouble:
        hi, lo = divmod(mantissa, 1 << 32)
        m = np.longdouble(hi) * np.longdouble(2**32) + np.longdouble(lo)
        return np.ldexp(m, exponent)
    return np.asarray(math.ldexp(float(mantissa), exponent)).astype(dtype)[()]


def _longdouble_is_extended() -> bool:
    return np.finfo(np.longdouble).nmant >= 63


# Rules of the formats without infinities (ml_dtypes' casts: overflow gives NaN where there
# is one, else saturates).
_FN = {"infinities": False, "nan": "top", "overflow": "nan"}
_FNUZ = {"infinities": False, "nan": "negzero", "overflow": "nan"}
_FINITE = {"infinities": False, "nan": "none", "overflow": "saturate"}
#: The formats' dtypes that are NumPy's own (the others are ml_dtypes').
_NUMPY_DTYPE_NAMES = frozenset({"float16", "float32", "float64", "longdouble"})

#: Every format numstab knows: name, its dtype's name, precision p, emin, emax, then the rules
#: of the non-IEEE ones. Adding a format is one entry here (docs/architecture.md).
_ALL_FORMATS = (
    Format("float16", "float16", 11, -14, 15),
    Format("bfloat16", "bfloat16", 8, -126, 127),
    Format("float32", "float32", 24, -126, 127),
    Format("float64", "float64", 53, -1022, 1023),
    # x87 extended where long double is it (not on aarch64 / MSVC, where it is float64)
    Format("longdouble", "longdouble", 64, -16382, 16383),
    # The narrow formats, all emulated in float32 (docs/formats.md: the rules of each).
    Format("tf32", "float32", 11, -126, 127, has_dtype=False),
    Format("float8_e5m2", "float8_e5m2", 3, -14, 15),
    Format("float8_e4m3", "float8_e4m3", 4, -6, 7),
    Format("float8_e3m4", "float8_e3m4", 5, -2, 3),
    Format("float8_e4m3fn", "float8_e4m3fn", 4, -6, 8, **_FN),
    Format("float8_e4m3fnuz", "float8_e4m3fnuz", 4, -7, 7, **_FNUZ),
    Format("float8_e5m2fnuz", "float8_e5m2fnuz", 3, -15, 15, **_FNUZ),
    Format("float8_e4m3b11fnuz", "float8_e4m3b11fnuz", 4, -10, 4, **_FNUZ),
    Format("float6_e2m3fn", "float6_e2m3fn", 4, 0, 2, **_FINITE),
    Format("float6_e3m2fn", "float6_e3m2fn", 3, -2, 4, **_FINITE),
    Format("float4_e2m1fn", "float4_e2m1fn", 2, 0, 2, **_FINITE),
)

#: The five IEEE formats every part of numstab supports, narrowest first.
FORMAT_NAMES = tuple(f.name for f in _ALL_FORMATS[:5])
#: The narrow formats (ml_dtypes' fp8/fp6/fp4 and tf32): emulated like float16.
NARROW_FORMAT_NAMES = tuple(f.name for f in _ALL_FORMATS[5:])

_FORMATS: dict[str, Format] = {
    f.name: f for f in _ALL_FORMATS if f.name != "longdouble" or _longdouble_is_extended()
}

#: Other names of the formats (each format's own name is accepted too).
_ALIASES = {
    "fp16": "float16",
    "half": "float16",
    "f16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "single": "float32",
    "f32": "float32",
    "fp64": "float64",
    "double": "float64",
    "f64": "float64",
    "extended": "longdouble",
    "float80": "longdouble",
    "x87": "longdouble",
    "tensorfloat32": "tf32",
    "fp8_e4m3fn": "float8_e4m3fn",
    "e4m3fn": "float8_e4m3fn",
    "fp8_e5m2": "float8_e5m2",
}
_ALIASES.update({name: name for name in FORMAT_NAMES + NARROW_FORMAT_NAMES})

#: Suffix of a saturating variant (``float8_e4m3fn_sat``: overflow gives ±max, not NaN/inf).
SATURATING_SUFFIX = "_sat"
_CUSTOM = re.compile(r"e(\d+)m(\d+)")


def available_formats(*, extended: bool = False) -> tuple[str, ...]:
    """Names of the formats usable on this platform (``longdouble`` only where it is x87).

    ``extended=True`` adds the narrow formats (:data:`NARROW_FORMAT_NAMES`); any ``eXmY``
    and any ``<narrow format>_sat`` name is accepted by :func:`get_format` as well.
    """
    names = FORMAT_NAMES + (NARROW_FORMAT_NAMES if extended else ())
    return tuple(n for n in names if n in _FORMATS)


def _custom_format(key: str) -> Format | None:
    """The IEEE-style format ``eXmY`` (X exponent bits, Y stored significand bits), or None.

    Bias ``2**(X-1) - 1``, subnormals, the all-ones exponent for ``±inf``/NaN. A layout of a
    named IEEE format returns that format (``e5m10`` is float16, ``e8m7`` bfloat16).
    """
    m = _CUSTOM.fullmatch(key)
    if m is None:
        return None
    x, y = int(m.group(1)), int(m.group(2))
    emax = (1 << (x - 1)) - 1
    layout = (y + 1, 1 - emax, emax)
    for f in _FORMATS.values():
        if f.nan == "ieee" and (f.precision, f.emin, f.emax) == layout:
            return f
    if not (2 <= x <= 8 and 1 <= y <= 10):
        raise ValueError(
            f"custom format {key!r} is not supported: numstab emulates custom formats in a "
            "float32 carrier, which needs 2 <= exponent bits <= 8 and 1 <= significand bits "
            "<= 10 (float32 then holds every value and rounds + - * / once correctly)"
        )
    return Format(key, "float32", y + 1, 1 - emax, emax, has_dtype=False)


def _saturating(fmt: Format) -> Format:
    if not fmt.is_emulated:
        raise ValueError(
            f"no saturating variant of {fmt.name}: only emulated formats (float16, bfloat16, "
            "the narrow formats, eXmY) have one"
        )
    if fmt.overflow == "saturate":
        return fmt
    return dataclasses.replace(fmt, name=fmt.name + SATURATING_SUFFIX, overflow="saturate")


def _with_arithmetic(fmt: Format, parts: list[str], name: str) -> Format:
    """``fmt`` with the rounding mode and subnormal rule named after its ``@``s."""
    rounding, subnormals = "nearest", "gradual"
    for part in parts:
        if part.replace("-", "_") in SUBNORMAL_RULES:
            subnormals = part.replace("-", "_")
        else:
            try:
                rounding = canonical_rounding(part)
            except ValueError as exc:
                raise ValueError(
                    f"{name!r}: {exc}; or a subnormal rule: {', '.join(SUBNORMAL_RULES)}"
                ) from None
    if rounding != "nearest" and not fmt.is_emulated:
        raise ValueError(
            f"{name!r}: rounding mode {rounding!r} exists for the emulated formats (narrower "
            f"than float32) only; {fmt.name} arithmetic is the hardware's, to nearest even"
        )
    suffix = "".join(
        f"@{v}" for v, d in ((rounding, "nearest"), (subnormals, "gradual")) if v != d
    )
    if not suffix:
        return fmt
    return dataclasses.replace(
        fmt, name=fmt.name + suffix, rounding=rounding, subnormals=subnormals
    )


def with_arithmetic(fmt, rounding: str = "nearest", subnormals: str = "gradual") -> Format:
    """The format ``fmt`` rounded in ``rounding`` with subnormal rule ``subnormals``.

    Its name records both (``float16@stochastic``, ``float32@ftz``; unchanged for the
    defaults), so that every record of a format name is a complete description.

    Examples
    --------
    >>> with_arithmetic("fp16", "sr").name
    'float16@stochastic'
    """
    base = get_format(fmt).plain
    return _with_arithmetic(base, [rounding, subnormals], f"{base.name}@{rounding}")


def _lookup_name(name: str) -> Format:
    text, *modes = name.strip().lower().split("@")
    if modes:
        return _with_arithmetic(_lookup_name(text), modes, name)
    sat = text.endswith(SATURATING_SUFFIX)
    base = text[: -len(SATURATING_SUFFIX)] if sat else text
    key = _ALIASES.get(base)
    fmt = _custom_format(base) if key is None else None
    if key is None and fmt is None:
        valid = ", ".join(available_formats(extended=True))
        aliases = ", ".join(
            sorted(a for a in _ALIASES if a not in FORMAT_NAMES + NARROW_FORMAT_NAMES)
        )
        raise ValueError(
            f"unknown format {name!r}; valid formats: {valid}, eXmY (custom), a narrow "
            f"format + '{SATURATING_SUFFIX}' (aliases: {aliases})"
        )
    if fmt is None:
        fmt = _named(key)
    return _saturating(fmt) if sat else fmt


def _named(key: str) -> Format:
    if key == "longdouble" and key not in _FORMATS:
        raise ValueError(
            "format 'longdouble' is unavailable: this platform's long double has "
            f"{np.finfo(np.longdouble).nmant + 1} significand bits, the same as float64 "
            "(x87 80-bit extended precision exists only on x86)"
        )
    return _FORMATS[key]


def get_format(name) -> Format:
    """Look up a format by name, alias, dtype or :class:`Format`.

    Parameters
    ----------
    name : str or numpy.dtype or Format
        ``float16``/``fp16``/``half``, ``bfloat16``/``bf16``, ``float32``/``fp32``/``single``,
        ``float64``/``fp64``/``double``, ``longdouble``/``extended``/``float80``/``x87``,
        a narrow format (:data:`NARROW_FORMAT_NAMES`: ``float8_e4m3fn``, ``tf32``, ...), a
        custom ``eXmY``, any emulated one + ``_sat`` (saturating overflow), all
        case-insensitive; a NumPy dtype of one of these, or a ``Format`` (returned as is).

    Raises
    ------
    ValueError
        Unknown name (the message lists the valid names), or ``longdouble`` on a platform whose
        ``long double`` is just float64.
    """
    if isinstance(name, Format):
        return name
    if isinstance(name, str):
        return _lookup_name(name)
    try:
        dt = np.dtype(name)
    except TypeError:
        raise ValueError(
            f"unknown format {name!r}; pass a format name ({', '.join(available_formats())}), "
            "a floating dtype, or a Format"
        ) from None
    key = next((k for k, f in _FORMATS.items() if f.stores(dt)), None)
    if key is None and dt == np.longdouble:
        key = "longdouble"
    if key is None:
        raise ValueError(
            f"dtype {dt} is not a supported format; "
            f"valid formats: {', '.join(available_formats(extended=True))}"
        )
    return _named(key)


def carrier_dtype(fmt) -> np.dtype:
    """Dtype holding a format's values during arithmetic: float32 for the formats narrower than
    32 bits (float16, bfloat16, and any narrower format: float32 holds their values exactly and
    one float32 operation then one rounding is their correctly rounded ``+ - × ÷ √``), else
    the format's own dtype."""
    fmt = get_format(fmt)
    if fmt.dtype.itemsize < 4:
        return np.dtype(np.float32)
    return fmt.dtype


# --- rounding -----------------------------------------------------------------------------
#
# ``quantize`` and ``round_to`` take their namespace from their input (numstab.backend):
# formats that need no emulation (float32, float64, longdouble) are a standard ``astype`` on
# every backend; float16/bfloat16 emulation rounds on the bit pattern (``uint_view``), which
# exists on NumPy and CuPy only. ``_round_bits`` is one function for both: it uses the
# methods those two array types share (``view``, ufuncs with ``out=``, boolean masks) and
# the module that owns its input, and never asks which one it is.

_UINT = {np.dtype(np.float32): (np.uint32, 23), np.dtype(np.float64): (np.uint64, 52)}


def _float_source(x, xp):
    """``x`` as a float32/float64/longdouble array, widening 16-bit formats exactly."""
    x = xp.asarray(x)
    dt = x.dtype
    if not isinstance(dt, np.dtype):  # another array-API library: its own dtype objects
        if xp.isdtype(dt, "real floating"):
            return x
        raise TypeError(
            f"cannot round an array of dtype {dt}: expected a real floating dtype "
            "(float32 or float64 on this backend)"
        )
    if dt.itemsize < 4 and dt.kind in "fV":  # float16, bfloat16, ml_dtypes' narrower floats
        return x.astype(np.float32)  # exact: float32 holds every value of these formats
    if dt in (np.float32, np.float64, np.longdouble):
        return x
    if dt.kind in "iub":
        raise TypeError(
            f"cannot round an array of dtype {dt}: rounding needs floating input "
            "(float16, bfloat16, float32, float64 or longdouble); convert integers explicitly"
        )
    raise TypeError(
        f"cannot round an array of dtype {dt}: expected float16, bfloat16, float32, float64 "
        "or longdouble"
    )


def _round_bits(x, fmt: Format):
    """Round float32/float64 ``x`` (1-D) to ``fmt`` (RNE), keeping ``x``'s dtype.

    NumPy and CuPy arrays (the bit view comes from :func:`numstab.backend.uint_view`, which
    raises TypeError for other backends); the same code runs on both.

    One branch-free formula covers normal and subnormal targets: with
    ``q = 2**(max(e, emin) - p + 1)`` the target's quantum at ``|x|``'s binade ``e``, the
    "magic number" ``M = q * 2**m`` (``m`` the source's stored significand bits) has
    ``ulp(M) = q``, so ``(|x| + M) - M`` is ``|x|`` rounded to a multiple of ``q`` by the
    source format's own round-to-nearest-even, and the subtraction is exact. ``M`` is built
    directly from the exponent bits of ``x``. Elements beyond the target's largest finite
    value (rare: overflow, inf, NaN) are fixed afterwards on a sparse mask, because NumPy's
    masked and ``where`` operations are slow on dense unpredictable masks.
    """
    bits = namespace(x).finfo(x.dtype).bits
    u = uint_view(x, bits)  # TypeError on backends without views, before anything else
    xp = array_module(x)
    uint, src_mant = _UINT[x.dtype]
    sign_mask = uint(1 << (bits - 1))
    exp_mask = uint(((1 << (bits - 1 - src_mant)) - 1) << src_mant)
    bias = (1 << (bits - 2 - src_mant)) - 1
    shift = uint((src_mant - (fmt.precision - 1)) << src_mant)
    floor_exp = uint((bias + fmt.emin) << src_mant)

    a_bits = u & ~sign_mask
    finfo = np.finfo(x.dtype)
    if fmt.emin == finfo.minexp and fmt.emax == finfo.maxexp - 1:
        return _round_bits_same_range(x, fmt, u, a_bits, xp)
    magic = a_bits & exp_mask
    xp.maximum(magic, floor_exp, out=magic)
    magic += shift
    magic_f = magic.view(x.dtype)
    with errstate(xp, over="ignore", invalid="ignore"):
        r = a_bits.view(x.dtype) + magic_f
        r -= magic_f
    r_bits = r.view(uint)
    r_bits |= u & sign_mask

    top = x.dtype.type(float(fmt.max))
    special = a_bits > top.view(uint)
    if special.any():
        # Above the largest finite value: round down to it below the midpoint to the next
        # grid value, overflow from the midpoint on (the tie goes up when max is odd, as in
        # IEEE formats, and down to max when it is even, as in E4M3FN), NaN stays NaN.
        xs = x[special]
        mid = top + x.dtype.type(math.ldexp(1.0, fmt.emax - fmt.precision))
        big = {"inf": np.inf, "nan": np.nan, "saturate": top}[fmt.overflow]
        with errstate(xp, invalid="ignore"):
            a = xp.abs(xs)
            below = a < mid if fmt.max_significand % 2 else a <= mid
            fixed = xp.where(below, top, x.dtype.type(big))
        fixed = xp.where(xp.isnan(xs), x.dtype.type(np.nan), fixed)
        r[special] = xp.copysign(fixed, xs)
    if not fmt.signed_zero:
        r += x.dtype.type(0)  # -0 + 0 = +0: the "fnuz" formats have no -0
    return r


def _round_bits_same_range(x, fmt: Format, u, a_bits, xp):
    """Round to a format with the source's exponent range (bfloat16 from float32).

    Here the magic number would overflow for large ``|x|``, but no clamping is needed either:
    add ``half - 1`` plus the lowest kept bit to the bit pattern and clear the dropped bits.
    A carry into the exponent field is the correct rounding up to the next binade, and at the
    top to infinity; source subnormals have the fixed quantum the target's subnormals need.
    """
    uint = u.dtype.type
    drop = np.finfo(x.dtype).nmant - (fmt.precision - 1)
    r = u >> drop
    r &= uint(1)
    r += u
    r += uint((1 << (drop - 1)) - 1)
    r &= ~uint((1 << drop) - 1)
    out = r.view(x.dtype)
    nan = a_bits > np.asarray(np.inf, dtype=x.dtype).view(uint)
    if nan.any():
        out[nan] = xp.copysign(x.dtype.type(np.nan), x[nan])
    if fmt.overflow != "inf":  # a saturating variant (bfloat16_sat, tf32_sat)
        over = xp.isinf(out)
        if over.any():
            out[over] = xp.copysign(x.dtype.type(float(fmt.max)), out[over])
    return out


def quantize(x, fmt, *, rounding: str | None = None, subnormals: str | None = None, key=None,
             offset: int = 0):
    """Round values to a format, returned in the format's carrier dtype.

    Parameters
    ----------
    x : array_like of float16, bfloat16, float32, float64 or longdouble, any shape
        A NumPy or CuPy array (or anything NumPy converts), or an array of another array-API
        library (float32/float64 there); the result belongs to the same backend.
    fmt : str or Format
    rounding : str, optional
        One of :data:`numstab.rounding_modes.ROUNDING_MODES` (or an alias): ``nearest``
        (ties to even), ``nearest_away``, ``toward_zero``, ``up``, ``down``, ``odd``,
        ``stochastic``. Default: the format's own (``fmt.rounding``, ``nearest`` unless its
        name says otherwise). The other modes work on NumPy and CuPy arrays.
    subnormals : str, optional
        ``gradual`` or ``ftz``/``ftz_daz`` (results below ``tiny`` become a zero of their
        sign); default ``fmt.subnormals``. ``daz`` concerns operands and does nothing here
        (:func:`numstab.rounding_modes.flush_subnormals`).
    key : (seed, step, tensor) ints, optional
        For ``stochastic``: element ``i`` of the flattened ``x`` (C order) uses random number
        ``offset + i`` of :func:`numstab.rounding_modes.stochastic_uniform`. Default: the next
        key of the enclosing :func:`numstab.rounding_modes.stochastic_scope` (ValueError
        outside one).
    offset : int
        See ``key``.

    Returns
    -------
    array, shape of ``x``, dtype ``carrier_dtype(fmt)``
        Every element is exactly representable in ``fmt`` and is the input element rounded in
        ``rounding`` (by default, to nearest even). Overflow gives ``fmt.overflow``'s value
        (``±inf``; NaN or ``±max`` for formats without infinities) in the modes that round
        away from zero there, ``±max`` in the others; values below half the smallest subnormal
        become ``±0`` (+0 in the "fnuz" formats, which have no -0); NaN stays NaN (quiet).

    Raises
    ------
    TypeError
        Non-floating input; float16/bfloat16 on a backend without bit views (the array-API
        standard has none: such backends support float32 and float64 only); longdouble
        outside NumPy.

    Notes
    -----
    Rounding a longdouble input to float16 or bfloat16 is not supported (there is no exact
    integer view of x87 values); round it to float64 first if double rounding is acceptable.

    Examples
    --------
    >>> import numpy as np
    >>> quantize(np.array([1.0 + 2**-11, 1.0 + 3 * 2**-11]), "float16")
    array([1.    , 1.0019531], dtype=float32)
    """
    fmt = get_format(fmt)
    xp = namespace(x)
    x = _float_source(x, xp)
    carrier = carrier_dtype(fmt)
    rounding = fmt.rounding if rounding is None else rounding
    subnormals = fmt.subnormals if subnormals is None else subnormals
    if rounding != "nearest" or subnormals != "gradual":
        return _quantize_mode(x, fmt, rounding, subnormals, key, offset, xp)
    if not fmt.is_emulated:
        return _cast(x, xp_dtype(xp, carrier), xp)
    if isinstance(x.dtype, np.dtype) and x.dtype == np.longdouble:
        raise TypeError(
            f"rounding longdouble input to {fmt.name} is not supported; "
            "convert it to float64 first (which is itself a rounding)"
        )
    shape = x.shape
    out = _round_bits(xp.reshape(x, (-1,)), fmt)  # 1-D: ufunc results stay arrays
    # ``out`` holds values representable in fmt, hence exactly in float32.
    return xp.reshape(out.astype(np.float32, copy=False), shape)


def _cast(x, dtype, xp):
    """``x`` cast to a native ``dtype`` (one rounding, nearest even). Overflow gives ±inf, the
    result, as in the emulated formats, without NumPy's cast warning; ``x`` itself where it is
    of that dtype already (the common case: no cast, and no error-state change)."""
    if x.dtype == dtype:
        return x
    with errstate(xp, over="ignore"):
        return xp.astype(x, dtype, copy=False)


def _quantize_mode(x, fmt: Format, rounding, subnormals, key, offset, xp):
    """:func:`quantize` in a mode other than nearest-even with gradual underflow."""
    rounding = canonical_rounding(rounding)
    if subnormals not in SUBNORMAL_RULES:
        raise ValueError(
            f"unknown subnormal rule {subnormals!r}; valid: {', '.join(SUBNORMAL_RULES)}"
        )
    if rounding == "stochastic":
        key = next_key() if key is None else key
        if len(key) != 3:
            raise ValueError("stochastic rounding needs key=(seed, step, tensor), three integers")
    ftz = subnormals in ("ftz", "ftz_daz")
    carrier = xp_dtype(xp, carrier_dtype(fmt))
    if isinstance(x.dtype, np.dtype) and x.dtype == np.longdouble:
        if fmt.precision < 64 or ftz:
            raise TypeError(
                f"rounding longdouble input to {fmt.name} in mode {rounding!r} is not "
                "supported; convert it to float64 first (which is itself a rounding)"
            )
        return x
    if rounding == "nearest" and not fmt.is_emulated:
        out = _cast(x, carrier, xp)
        return round_to_grid(out.reshape(-1), fmt, rounding, ftz).reshape(x.shape)
    shape = x.shape
    fi = np.finfo(x.dtype)
    if fmt.precision > fi.nmant and fmt.emin <= fi.minexp and fmt.emax >= fi.maxexp - 1:
        flat = xp.reshape(x, (-1,))  # every value of x is in fmt: only the flush can act
        out = round_to_grid(flat, fmt, "toward_zero", ftz) if ftz else flat
    else:
        out = round_to_grid(xp.reshape(x, (-1,)), fmt, rounding, ftz, key, offset)
    return xp.reshape(xp.astype(out, carrier, copy=False), shape)


def round_to(x, fmt):
    """Correctly rounded (nearest-even) conversion to a format, returned in its own dtype.

    Parameters
    ----------
    x : array_like of float16, bfloat16, float32, float64 (or longdouble, for wide targets)
    fmt : str or Format

    Returns
    -------
    array, shape of ``x``, dtype ``get_format(fmt).dtype`` (the float32 carrier for ``tf32``
    and ``eXmY``, which have no dtype of their own)
        Bit-identical to NumPy's / ml_dtypes' ``astype`` for every finite and infinite input
        (verified exhaustively over all 16-bit patterns and their midpoints); NaN input gives a
        NaN of the same sign. Overflow gives ``±inf``, subnormals are rounded exactly.
        float16 results on CuPy are CuPy arrays; bfloat16 arrays exist only in NumPy
        (ml_dtypes), so a bfloat16 result of a CuPy input is TypeError (use :func:`quantize`).

    Examples
    --------
    >>> import numpy as np
    >>> round_to(np.float32(2**-24 * 1.5), "float16")  # tie between two subnormals -> even
    np.float16(1.192e-07)
    """
    fmt = get_format(fmt)
    q = quantize(x, fmt)
    if not fmt.is_emulated or not fmt.has_dtype:
        return q
    xp = array_module(q)
    scalar = q.ndim == 0
    q = xp.reshape(q, (1,)) if scalar else q
    if fmt.name == "bfloat16":
        if xp is not np:
            raise TypeError(
                "bfloat16 arrays exist only in NumPy (ml_dtypes); on this backend use "
                "quantize(x, 'bfloat16'), which returns the values in float32"
            )
        # quantize() leaves NaN as the quiet pattern, whose upper half is still a NaN.
        out = (q.view(np.uint32) >> 16).astype(np.uint16).view(fmt.dtype)
    elif fmt.name == "float16":
        out = _float32_to_float16_exact(q, xp)
    else:  # ml_dtypes' narrower formats: q holds values of fmt, so the cast is exact
        out = q.astype(fmt.dtype)
    return out[0] if scalar else out


def _float32_to_float16_exact(q, xp):
    """float16 bit patterns of float32 values that are already representable in float16.

    Scaling by ``2**-112`` moves float16's exponent range onto float32's (exactly: the
    products are representable, float16 subnormals landing on float32 subnormals), after which
    the float16 pattern is the float32 pattern shifted right by 13. Infinities and NaN do not
    survive the shift and are patched on a sparse mask. NumPy or CuPy arrays (``xp`` their
    module).
    """
    scaled = (q * np.float32(2.0**-112)).view(np.uint32)
    sign = scaled >> 16
    sign &= np.uint32(0x8000)
    scaled >>= 13
    scaled &= np.uint32(0x7FFF)
    scaled |= sign
    bits = scaled.astype(np.uint16)
    special = ~xp.isfinite(q)
    if special.any():
        qs = q[special]
        bits[special] = xp.where(xp.isnan(qs), np.uint16(0x7E00), np.uint16(0x7C00)) | (
            (qs.view(np.uint32) >> 16).astype(np.uint16) & np.uint16(0x8000)
        )
    return bits.view(np.float16)


# --- precision policy ---------------------------------------------------------------------


@dataclass(frozen=True)
class PrecisionPolicy:
    """Which format each part of a computation uses, and how reductions are ordered.

    Attributes
    ----------
    storage : Format
        Format of parameters and activations (what is kept between operations).
    compute : Format
        Accumulation format of matrix products: a GEMM is computed in ``compute`` and rounded
        once to ``storage`` (the tensor-core model). Must be at least as wide as ``storage``.
    loss : Format
        Format of the softmax / StableMax cross-entropy and its logit gradient (the paper's
        ``softmax_precision``).
    order : str
        Summation order of the loss's reductions, one of :data:`REDUCTION_ORDERS`.
    elementary : str
        How ``exp``/``log``/``log1p``/``expm1`` are evaluated (:mod:`numstab.elementary`):
        ``"correct"`` (correctly rounded in the format, the default) or ``"libm"`` (the array
        library's own functions, as before; reproduces older runs bit for bit).
    update : Format or None
        The update ``θ + Δθ`` written back to the parameters: ``storage``'s format in its own
        rounding mode and subnormal rule (``float16@stochastic`` under a ``float16`` storage);
        None: ``storage``.
    activations : Format or None
        The forward's results (layer outputs, the logits, dense inputs): every GEMM of the
        forward is rounded once to it; None: ``storage``.
    gradients : Format or None
        The backward's results (the logit gradient as it enters the network, activation and
        parameter gradients): every GEMM and bias sum of the backward is rounded once to it;
        None: ``storage``. ``activations`` and ``gradients`` share ``storage``'s carrier dtype
        and are at most as wide as ``compute``.

    Each format carries its rounding mode and subnormal rule (:func:`with_arithmetic`), so the
    roles are: parameters (``storage``), GEMM accumulation (``compute``), activations,
    gradients, the loss and its sums (``loss``), the update (``update``); the optimizer state
    has its own format (:mod:`numstab.optim`). :meth:`for_role` gives the policy a forward or
    backward computes with.

    Examples
    --------
    >>> PrecisionPolicy.uniform("float16").compute.name
    'float32'
    >>> PrecisionPolicy.paper("float32", "float64").loss.name
    'float64'
    """

    storage: Format
    compute: Format
    loss: Format
    order: str = "pairwise"
    elementary: str = "correct"
    update: Format | None = None
    activations: Format | None = None
    gradients: Format | None = None

    def __post_init__(self):
        for attr in ("storage", "compute", "loss"):
            object.__setattr__(self, attr, get_format(getattr(self, attr)))
        if self.update is not None:
            object.__setattr__(self, "update", get_format(self.update))
            if self.update.plain != self.storage.plain:
                raise ValueError(
                    f"update format {self.update.name} must be the storage format "
                    f"{self.storage.plain.name} (in any rounding mode): it writes the parameters"
                )
        if self.order not in REDUCTION_ORDERS:
            valid = ", ".join(REDUCTION_ORDERS)
            raise ValueError(f"unknown reduction order {self.order!r}; valid orders: {valid}")
        if self.elementary not in ELEMENTARY_MODES:
            valid = ", ".join(ELEMENTARY_MODES)
            raise ValueError(f"unknown elementary mode {self.elementary!r}; valid: {valid}")
        if self.compute.precision < self.storage.precision:
            raise ValueError(
                f"compute format {self.compute.name} is narrower than storage format "
                f"{self.storage.name}; GEMMs must accumulate at least as wide as they store"
            )
        for role in ("activations", "gradients"):
            if getattr(self, role) is not None:
                object.__setattr__(self, role, self._role_format(role))

    def _role_format(self, role: str) -> Format:
        """The checked format of ``role`` (activations or gradients)."""
        fmt = get_format(getattr(self, role))
        if fmt.carrier != self.storage.carrier:
            raise ValueError(
                f"{role} format {fmt.name} is carried in {fmt.carrier}, the storage format "
                f"{self.storage.name} in {self.storage.carrier}: a role's format must share "
                "the parameters' carrier (e.g. any format up to float32 beside float32 storage)"
            )
        if fmt.precision > self.compute.precision:
            raise ValueError(
                f"{role} format {fmt.name} is wider than the compute format "
                f"{self.compute.name}; GEMMs round their accumulation to it"
            )
        return fmt

    def for_role(self, role: str) -> PrecisionPolicy:
        """The policy whose ``storage`` is ``role``'s format (``"activations"`` for a
        forward, ``"gradients"`` for a backward); itself when the role is not set."""
        fmt = getattr(self, role)
        if fmt is None or fmt == self.storage:
            return self
        return dataclasses.replace(
            self, storage=fmt, update=None, activations=None, gradients=None
        )

    @classmethod
    def uniform(
        cls, fmt, *, loss=None, order: str = "pairwise", elementary: str = "correct"
    ) -> PrecisionPolicy:
        """Everything in ``fmt``; GEMMs of 16-bit formats accumulate in float32.

        ``loss`` overrides the loss format alone (the paper's ``softmax_precision``).
        """
        fmt = get_format(fmt)
        compute = get_format("float32") if fmt.is_emulated else fmt
        return cls(
            storage=fmt,
            compute=compute,
            loss=get_format(loss or fmt),
            order=order,
            elementary=elementary,
        )

    @classmethod
    def paper(
        cls, train_precision, softmax_precision=None, *, order="pairwise", elementary="correct"
    ) -> PrecisionPolicy:
        """The paper's pair: parameters and GEMMs in ``train_precision``, loss in
        ``softmax_precision`` (default: the same)."""
        return cls.uniform(
            train_precision, loss=softmax_precision, order=order, elementary=elementary
        )

    def to_dict(self) -> dict:
        """Plain-JSON description, for run outputs."""
        d = {
            "storage": self.storage.name,
            "compute": self.compute.name,
            "loss": self.loss.name,
            "order": self.order,
            "elementary": self.elementary,
        }
        for role in ("update", "activations", "gradients"):
            if getattr(self, role) is not None:
                d[role] = getattr(self, role).name
        return d


# --- the format an array carries ----------------------------------------------------------

__all__ += ["format_of"]


def format_of(x) -> Format | None:
    """The format of an array's own floating dtype; None when the dtype has no format.

    Parameters
    ----------
    x : numpy.ndarray, NumPy scalar, scalar type (``np.float32``) or numpy.dtype
        Anything with a NumPy ``dtype`` (or a dtype). Byte order does not matter: ``>f4`` is
        float32 (its values, read in native order, are the same numbers).

    Returns
    -------
    Format or None
        float16, bfloat16 and the narrow formats of ml_dtypes (fp8, fp6, fp4), float32,
        float64 or longdouble; None for integer, bool and every other non-floating dtype
        (complex, strings, objects), so that a caller picks its own default and its own error
        message.

    Raises
    ------
    ValueError
        A floating dtype that is no supported format (``longdouble`` where it is not x87).

    Examples
    --------
    >>> format_of(np.zeros(2, dtype=">f2")).name, format_of(np.arange(3))
    ('float16', None)
    """
    # a scalar type such as np.float32 has a ``dtype`` attribute too (a descriptor, no dtype)
    dt = np.dtype(x if isinstance(x, type) else getattr(x, "dtype", x))
    if dt.kind != "f":  # ml_dtypes' formats (float8_e5m2 is of kind "f" and found below)
        return next((f for f in _FORMATS.values() if f.stores(dt)), None)
    return get_format(dt if dt.isnative else dt.newbyteorder("="))
