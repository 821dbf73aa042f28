"""Which ONNX opsets the installed ONNX Runtime implements: what package verification checks graphs against.

It lives apart from the ORT backend so that verifying a package depends on no backend.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def max_supported_opset() -> int:
    """Highest default-domain opset the installed onnxruntime implements (from its release notes)."""
    import onnxruntime as ort

    major, minor = (int(x) for x in ort.__version__.split(".")[:2])
    # ORT has no API for this; the table follows the ORT compatibility page. Newer releases keep
    # the last known value, which only makes the check stricter.
    for (ma, mi), opset in (((1, 22), 23), ((1, 20), 21), ((1, 18), 21), ((1, 16), 19), ((1, 14), 18)):
        if (major, minor) >= (ma, mi):
            return opset
    return 17
