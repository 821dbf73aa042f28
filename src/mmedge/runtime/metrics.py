"""Task metrics computed on embeddings (torch-free)."""

from __future__ import annotations

from collections.abc import Hashable, Sequence

import numpy as np


def recall_at_k(
    sim: np.ndarray, query_keys: Sequence[Hashable], item_keys: Sequence[Hashable], ks: Sequence[int] = (1, 5)
) -> dict[int, float]:
    """Fraction of queries whose top-k items include one with the query's key.

    `sim` is (Q, I); a retrieved item counts as a hit when its key equals the query's key, so
    any image of an identical scene is a correct answer.
    """
    ids: dict[Hashable, int] = {}
    ikeys = np.array([ids.setdefault(k, len(ids)) for k in item_keys])  # keys -> small ints
    qkeys = np.array([ids.setdefault(k, len(ids)) for k in query_keys])
    order = np.argsort(-sim, axis=1, kind="stable")[:, : max(ks)]  # (Q, K)
    hits = ikeys[order] == qkeys[:, None]  # (Q, K) bool
    return {k: float(hits[:, :k].any(axis=1).mean()) for k in ks}


def retrieval_metrics(
    image_emb: np.ndarray, text_emb: np.ndarray, keys: Sequence[Hashable]
) -> dict[str, float]:
    """Text->image and image->text recall@1/@5 for paired (image_i, text_i) with scene keys."""
    sim = text_emb @ image_emb.T  # (N texts, N images)
    t2i = recall_at_k(sim, keys, keys)
    i2t = recall_at_k(sim.T, keys, keys)
    return {"t2i_r1": t2i[1], "t2i_r5": t2i[5], "i2t_r1": i2t[1], "i2t_r5": i2t[5], "n": len(keys)}


def row_cosine(ref: np.ndarray, out: np.ndarray) -> float:
    """Mean over rows of cosine(ref_row, out_row); two all-zero rows count as identical."""
    num = (ref * out).sum(axis=1)
    den = np.linalg.norm(ref, axis=1) * np.linalg.norm(out, axis=1)
    both_zero = (den == 0) & (np.abs(ref).sum(axis=1) == 0) & (np.abs(out).sum(axis=1) == 0)
    cos = np.where(den > 0, num / np.where(den > 0, den, 1.0), np.where(both_zero, 1.0, 0.0))
    return float(np.mean(cos))
