"""Measure an exported graph against its PyTorch module on the same inputs."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from mmedge.models.component import ComponentDecl
from mmedge.runtime.metrics import row_cosine


def measure_parity(
    model: torch.nn.Module, decl: ComponentDecl, onnx_path: Path, feeds_list: list[dict[str, np.ndarray]]
) -> dict[str, float | int | bool]:
    """Run torch and ORT on each feed; report worst max-abs error, mean cosine and pass/fail."""
    import onnxruntime as ort

    module = decl.build(model).eval()
    so = ort.SessionOptions()
    so.log_severity_level = 3
    sess = ort.InferenceSession(str(onnx_path), so, providers=["CPUExecutionProvider"])
    max_abs, ref_scale, cosines = 0.0, 0.0, []
    for feeds in feeds_list:
        with torch.inference_mode():
            ref = module(*(torch.from_numpy(feeds[s.name]) for s in decl.inputs))
        refs = ref if isinstance(ref, tuple) else (ref,)
        outs = sess.run([s.name for s in decl.outputs], feeds)
        for r, o in zip(refs, outs):
            r = r.numpy()
            max_abs = max(max_abs, float(np.abs(r - o).max()))
            ref_scale = max(ref_scale, float(np.abs(r).max()))
            cosines.append(row_cosine(_rows(r), _rows(o)))
    return {
        "max_abs_err": max_abs,
        "cosine": min(cosines),
        "samples": len(feeds_list),
        # The tolerance is relative to the output's magnitude (fp32 reassociation error scales with it).
        "atol": decl.parity_atol,
        "passed": max_abs <= decl.parity_atol * max(1.0, ref_scale),
    }


def _rows(a: np.ndarray) -> np.ndarray:
    """One float64 row per sample (batch dim first), for the row cosine."""
    return a.reshape(a.shape[0], -1).astype(np.float64)
