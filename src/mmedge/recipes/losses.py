"""Training losses. ITC follows the CLIP paper's pseudo-code (Radford et al. 2021, Fig. 3)."""

from __future__ import annotations

import torch
from torch.nn import functional as F

MAX_LOGIT_SCALE = 100.0


def itc_loss(
    image_embeds: torch.Tensor,
    text_embeds: torch.Tensor,
    logit_scale: torch.Tensor,
    text_image: torch.Tensor | None = None,
    true_of: torch.Tensor | None = None,
) -> torch.Tensor:
    """Symmetric cross-entropy over cosine logits scaled by exp(t), exp(t) clipped at 100.

    `logit_scale` is the learned log-temperature t. Image i's target is text i; with more texts
    than images (B images, T >= B texts), text t's target is image `text_image[t]` (default t).
    `true_of` (T, B) bool marks every text that describes an image ("a circle" and each image with
    a circle): such pairs, other than each row's target, are left out of both softmaxes instead of
    being pushed apart.
    """
    i = F.normalize(image_embeds, dim=-1)  # (B, D)
    t = F.normalize(text_embeds, dim=-1)  # (T, D)
    scale = logit_scale.exp().clamp(max=MAX_LOGIT_SCALE)
    logits = scale * i @ t.t()  # (B, T): image -> text
    b, n = logits.shape
    image_targets = torch.arange(b, device=logits.device)
    text_targets = torch.arange(n, device=logits.device) if text_image is None else text_image
    i2t, t2i = logits, logits.t()
    if true_of is not None:
        not_target_i2t = torch.ones_like(true_of.t())
        not_target_i2t[image_targets, image_targets] = False
        not_target_t2i = torch.ones_like(true_of)
        not_target_t2i[torch.arange(n), text_targets] = False
        i2t = i2t.masked_fill(true_of.t() & not_target_i2t, float("-inf"))
        t2i = t2i.masked_fill(true_of & not_target_t2i, float("-inf"))
    return (F.cross_entropy(i2t, image_targets) + F.cross_entropy(t2i, text_targets)) / 2
