"""A Fraction oracle of rounding to a binary format's grid, from the definition (p, emin).

Shared by the tests of the precision roles and of the stochastic-rounding audit (imported as
``from fraction_rounding import ...``). No overflow handling: callers stay below ``max``.
"""

from __future__ import annotations

import math
from fractions import Fraction


def grid_neighbours(x: Fraction, fmt) -> tuple[Fraction, Fraction]:
    """``(lo, hi)``: the values of ``fmt`` with ``lo <= x < hi`` around ``x >= 0``
    (``lo == hi == x`` for 0): the quantum ``2**(max(e, emin) - p + 1)`` of ``x``'s binade."""
    if x == 0:
        return x, x
    e = x.numerator.bit_length() - x.denominator.bit_length()
    e -= x < Fraction(2) ** e  # now 2**e <= x < 2**(e+1)
    q = Fraction(2) ** (max(e, fmt.emin) - fmt.precision + 1)
    k = math.floor(x / q)
    return k * q, (k + 1) * q


def round_fraction(x: Fraction, fmt, mode: str) -> Fraction:
    """``x`` rounded to ``fmt`` in ``mode`` (nearest, toward_zero, up, down, odd), exactly."""
    neg = x < 0
    lo, hi = grid_neighbours(abs(x), fmt)
    rem, q = abs(x) - lo, hi - lo
    k = lo / q if q else 0
    up = rem > 0 and {
        "nearest": rem > q / 2 or (rem == q / 2 and k % 2 == 1),
        "toward_zero": False,
        "up": not neg,
        "down": neg,
        "odd": k % 2 == 0,
    }[mode]
    r = hi if up else lo
    return -r if neg else r
