"""Training losses. ITC follows the CLIP paper's pseudo-code (Radford et al. 2021, Fig. 3)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

MAX_LOGIT_SCALE = 100.0


def itc_loss(
    image_embeds: torch.Tensor, text_embeds: torch.Tensor, logit_scale: torch.Tensor
) -> torch.Tensor:
    """Symmetric cross-entropy over cosine logits scaled by exp(t), exp(t) clipped at 100.

    `logit_scale` is the learned log-temperature t. Row i of each batch is a positive pair.
    """
    i = F.normalize(image_embeds, dim=-1)  # (B, D)
    t = F.normalize(text_embeds, dim=-1)  # (B, D)
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    logits = scale * i @ t.t()  # (B, B): image -> text
    labels = torch.arange(logits.shape[0], device=logits.device)
    return (F.cross_entropy(logits, labels) + F.cross_entropy(logits.t(), labels)) / 2
