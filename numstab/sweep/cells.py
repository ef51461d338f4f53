"""Values as a SPEC writes them and as the sweep's tables show them.

Axis values are written in SPEC syntax (``none``, ``true``, ``[16, 16]``, floats by ``repr``),
result values as CSV cells (empty for None, floats by ``repr`` so that they round-trip).
"""

from __future__ import annotations

import json
import math


def _freeze(v):
    """A hashable stand-in for a value read from a SPEC or a run folder."""
    if isinstance(v, (list, tuple)):
        return tuple(_freeze(x) for x in v)
    if isinstance(v, dict):
        return json.dumps(v, sort_keys=True, default=repr)
    return v


def _jsonable(v):
    """A config value as JSON holds it (a tuple becomes a list)."""
    if isinstance(v, tuple):
        return list(v)
    return v


def _cell_axis(v) -> str:
    """An axis value as it appears in tables: SPEC syntax (``none``, ``true``, ``[16, 16]``)."""
    if v is None:
        return "none"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (list, tuple)):
        return json.dumps(list(v))
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _spec_value(v) -> str:
    """A value written as in a SPEC (for error messages)."""
    if isinstance(v, str):
        return json.dumps(v)
    return _cell_axis(v)


def _cell(v) -> str:
    """A result value in a CSV: empty for None, repr for floats (round-trips exactly)."""
    if v is None:
        return ""
    if isinstance(v, float):
        return repr(v)
    return str(v)


def _sort_key(v):
    """A key that orders mixed values: None, numbers, strings, lists, anything else."""
    if v is None:
        return (0, 0)
    if isinstance(v, (bool, int, float)):
        return (1, v)
    if isinstance(v, str):
        return (2, v)
    if isinstance(v, (list, tuple)):
        return (3, tuple(_sort_key(x) for x in v))
    return (4, repr(v))


def _error_text(error) -> str:
    """A run's recorded error on one line: ``"Type: message"`` ("" for none)."""
    if not error:
        return ""
    if not isinstance(error, dict):
        return str(error).replace("\n", " ")
    return f"{error.get('type')}: {error.get('message')}".replace("\n", " ")


def _finite_or_none(o):
    """Plain JSON data with every non-finite float replaced by None (strict JSON)."""
    if isinstance(o, dict):
        return {k: _finite_or_none(v) for k, v in o.items()}
    if isinstance(o, list):
        return [_finite_or_none(v) for v in o]
    if isinstance(o, float) and not math.isfinite(o):
        return None
    return o
