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


def test_texts_that_also_describe_other_images_leave_the_softmax() -> None:
    """B images, T > B texts: text t's target is image text_image[t]; any other pair marked in
    `true_of` is neither a positive nor a negative, so the loss equals a NumPy transcription with
    those logits removed (and with no extra texts and no marks, it is plain ITC)."""
    rng = np.random.default_rng(1)
    i_f, t_f = rng.standard_normal((4, 8)), rng.standard_normal((6, 8))
    owners = np.array([0, 1, 2, 3, 1, 3])  # texts 4 and 5 are short texts of images 1 and 3
    true_of = np.zeros((6, 4), bool)
    true_of[np.arange(6), owners] = True
    true_of[4, 2] = True  # text 4 also describes image 2
    true_of[0, 3] = True  # full caption 0 describes an identical scene 3
    got = itc_loss(
        torch.tensor(i_f), torch.tensor(t_f), torch.tensor(2.0), torch.tensor(owners), torch.tensor(true_of)
    )
    i_e = i_f / np.linalg.norm(i_f, axis=1, keepdims=True)
    t_e = t_f / np.linalg.norm(t_f, axis=1, keepdims=True)
    logits = i_e @ t_e.T * np.exp(2.0)  # (images, texts)

    def ce(x: np.ndarray, targets: np.ndarray, drop: np.ndarray) -> float:
        x = np.where(drop, -np.inf, x)
        x = x - x.max(axis=1, keepdims=True)
        logp = x - np.log(np.exp(x).sum(axis=1, keepdims=True))
        return float(-logp[np.arange(len(x)), targets].mean())

    i2t_drop = true_of.T.copy()
    i2t_drop[np.arange(4), np.arange(4)] = False
    t2i_drop = true_of.copy()
    t2i_drop[np.arange(6), owners] = False
    want = (ce(logits, np.arange(4), i2t_drop) + ce(logits.T, owners, t2i_drop)) / 2
    assert abs(float(got) - want) < 1e-6  # the scale is float32
    square = itc_loss(torch.tensor(i_f), torch.tensor(t_f[:4]), torch.tensor(2.0), None, None)
    assert abs(float(square) - _reference(i_f, t_f[:4], 2.0)) < 1e-6
