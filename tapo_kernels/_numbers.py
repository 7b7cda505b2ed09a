"""Checks of Python scalars shared by the knobs table (``knobs.py``) and the op validation
(``_checks.py``). Pure Python: no torch, no other module of the package."""

from __future__ import annotations

import math

FLT_MAX = 3.4028234663852886e38


def finite32(value: float) -> bool:
    """Finite, and still finite in float32 (the kernels compute in fp32)."""
    return math.isfinite(value) and abs(value) <= FLT_MAX


def number(name: str, value: object, *, optional: bool = False) -> None:
    """A Python real number (bool and strings are not), or None when ``optional``."""
    if value is None and optional:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise TypeError(f"{name} must be a number, got {type(value).__name__} {value!r}")
