"""How numbers are written in messages, tables and reports: one rule for the whole package."""
from __future__ import annotations

import math

__all__ = ["format_number"]


def format_number(x, digits: int = 4, *, decimals: bool = False, missing: str = "-") -> str:
    """``x`` as text: ``missing`` for None and nan; a float with ``digits`` significant digits
    (``f"{x:.{digits}g}"``), or with ``decimals=True`` with ``digits`` digits after the point
    (columns of losses line up), except that a value below 1e-3 in size keeps ``digits``
    significant digits there too (it would read as 0.000); anything else (an int, a string) as
    ``str(x)``."""
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return missing
    if isinstance(x, float):
        if decimals and abs(x) >= 1e-3:
            return f"{x:.{digits}f}"
        return f"{x:.{digits}g}"
    return str(x)
