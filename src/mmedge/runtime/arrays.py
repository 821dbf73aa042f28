"""Boundary checks shared by the non-image modalities' array inputs (torch-free, numpy only).

Each check reads only the array's type, dtype and shape before touching its values, so an absurd
shape (10^8 points, a 10^5 x 10^5 map) is refused before any work or allocation.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError

__all__ = ["check_finite", "real_array"]


def real_array(x: Any, what: str, *, ints: bool = True) -> np.ndarray:
    """`x` as a numpy array of real numbers (floats; with `ints`, also signed/unsigned integers).

    Booleans, complex numbers, objects, strings and datetimes are refused: they have no meaning as
    a measurement, and `np.asarray` would turn them into floats or object arrays silently.
    """
    if not isinstance(x, np.ndarray):
        accepted = "a numpy array of floats" + (" or integers" if ints else "")
        raise InvalidInputError(f"{what} must be {accepted}, got {type(x).__name__}")
    kind = x.dtype.kind
    if kind == "f" or (ints and kind in "iu"):
        return x
    accepted = "float16/32/64" + (", signed or unsigned integers" if ints else "")
    raise InvalidInputError(f"{what} has dtype {x.dtype}; accepted: {accepted}")


def check_finite(x: np.ndarray, what: str) -> None:
    """Refuse NaN and infinity (integers are always finite)."""
    if x.dtype.kind == "f" and not np.isfinite(x).all():
        nan = bool(np.isnan(x).any())
        raise InvalidInputError(f"{what} contains {'NaN' if nan else 'infinity'}; values must be finite")
