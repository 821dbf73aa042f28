"""ITC as in the CLIP paper's pseudo-code, checked against a NumPy transcription of it."""

from __future__ import annotations

import numpy as np
import torch

from mmedge.recipes.losses import MAX_LOGIT_SCALE, itc_loss


def _reference(i_f: np.ndarray, t_f: np.ndarray, t: float) -> float:
    """Radford et al. 2021, Fig. 3: normalise, scaled cosine logits, symmetric cross-entropy."""
    i_e = i_f / np.linalg.norm(i_f, axis=1, keepdims=True)
    t_e = t_f / np.linalg.norm(t_f, axis=1, keepdims=True)
    logits = i_e @ t_e.T * min(np.exp(t), MAX_LOGIT_SCALE)
    labels = np.arange(len(logits))

    def ce(x: np.ndarray, axis: int) -> float:
        x = x - x.max(axis=axis, keepdims=True)
        logp = x - np.log(np.exp(x).sum(axis=axis, keepdims=True))
        return float(-(logp[labels, labels]).mean())

    return (ce(logits, 1) + ce(logits, 0)) / 2


def test_matches_pseudo_code() -> None:
    rng = np.random.default_rng(0)
    i_f, t_f = rng.standard_normal((6, 8)), rng.standard_normal((6, 8))
    for t in (np.log(1 / 0.07), 5.0):  # the second is clipped at exp(t) = 100
        got = itc_loss(torch.tensor(i_f), torch.tensor(t_f), torch.tensor(t))
        assert abs(float(got) - _reference(i_f, t_f, t)) < 1e-9


def test_temperature_is_learned_until_clipped() -> None:
    emb = torch.randn(4, 8)
    for t, has_grad in ((2.0, True), (5.0, False)):
        scale = torch.tensor(t, requires_grad=True)
        itc_loss(emb, emb + 0.1 * torch.randn(4, 8), scale).backward()
        assert (abs(float(scale.grad)) > 0) == has_grad
