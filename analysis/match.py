"""Matching run configurations against a figure's ``match`` tables.

A configuration is a dict of :class:`numstab.run.TrainConfig` fields (tuples as lists);
a ``match`` table maps fields to a value or a list of alternatives, ``"none"`` for None.
"""

from __future__ import annotations

__all__ = ["config_matches", "norm_value", "values_equal"]


def norm_value(v):
    """A config or SPEC value in comparable form: "none" -> None, tuples -> lists."""
    if isinstance(v, str) and v == "none":
        return None
    if isinstance(v, tuple):
        return list(v)
    return v


def values_equal(a, b) -> bool:
    a, b = norm_value(a), norm_value(b)
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return float(a) == float(b)
    return a == b


def config_matches(config: dict, match: dict | None) -> bool:
    """Whether a configuration (a dict of TrainConfig fields) matches a ``match`` table.

    Each key must equal the value, or one of the values when a list is given (for ``hidden``,
    a list of integers is one value and a list of lists the alternatives); ``"none"`` matches
    None. An empty or missing table matches everything.
    """
    for k, want in (match or {}).items():
        have = config.get(k)
        if isinstance(want, list) and not (
            k == "hidden" and all(isinstance(x, int) and not isinstance(x, bool) for x in want)
        ):
            if not any(values_equal(have, w) for w in want):
                return False
        elif not values_equal(have, want):
            return False
    return True
