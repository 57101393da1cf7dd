"""How the reports write numbers: percentages, signed points, plain numbers, intervals, times.

Every formatter writes ``-`` for an undefined value (``None`` or NaN), never ``nan``.
"""

from __future__ import annotations

import math


def _undefined(v) -> bool:
    return v is None or (isinstance(v, float) and math.isnan(v))


def pct(v, digits: int = 2) -> str:
    """A fraction as a percentage: 0.8865 -> ``88.65%``."""
    return "-" if _undefined(v) else f"{100 * v:.{digits}f}%"


def pts(v, unit: str = " pts", digits: int = 2) -> str:
    """A change of accuracy as signed percentage points (``unit`` after it)."""
    return "-" if _undefined(v) else f"{100 * v:+.{digits}f}{unit}"


def num(v, fmt: str = ".4f") -> str:
    return "-" if _undefined(v) else format(v, fmt)


def ci(interval) -> str:
    """A 95% interval of a change (fractions) in signed points."""
    return f"[{100 * interval[0]:+.2f}, {100 * interval[1]:+.2f}] pts" if interval else "-"


def seconds(s) -> str:
    """A time per example: milliseconds, or microseconds below 10 us."""
    if _undefined(s):
        return "-"
    return f"{s * 1e3:.4f} ms" if s >= 1e-5 else f"{s * 1e6:.3f} µs"


def flops(v) -> str:
    """A count of floating-point operations with an SI prefix: 1.16e6 -> ``1.16 MFLOPs``."""
    if _undefined(v):
        return "-"
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(v) >= scale:
            return f"{v / scale:.3g} {prefix}FLOPs"
    return f"{v:.3g} FLOPs"
