"""What ALBEF and BLIP train alike: ITC with momentum distillation and ITM on hard negatives.

- **ITC** over the batch and queues of earlier batches' momentum features. The momentum model (an
  exponential moving average of the online modules) gives soft targets: the loss is against
  `alpha * softmax(momentum similarities) + (1 - alpha) * ground truth`, alpha ramped up from 0
  over the first fifth of training. Ground truth: every pair whose scenes are identical.
- **ITM** on each positive pair, one negative image per text and one negative text per image, each
  drawn with probability softmax(ITC similarity) over the batch (identical scenes excluded): the
  hard negatives of the contrastive space. Part of each batch are near-duplicates of other rows
  (`scene_batches`), the pairs ITM has to tell apart.

A family's recipe adds its third loss (ALBEF: masked language modelling; BLIP: captioning with the
image-grounded decoder) on the features `itc_itm` returns. The ViT may start from a trained CLIP
checkpoint (`--init`), as ALBEF and BLIP start from a pretrained ViT.
"""

from __future__ import annotations

import copy
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmedge.data.scenes import TRAIN_SEED
from mmedge.errors import ConfigError
from mmedge.recipes.base import loss_record
from mmedge.runtime.sections import PreprocessConfig

QUEUE = 1024  # momentum features kept from earlier batches (ALBEF: 65,536 at batch 512)
MOMENTUM = 0.995
ALPHA = 0.4  # distillation weight, ALBEF's and BLIP's
# Half of the near-duplicate rows trade an attribute between two objects instead of editing one
# (`scene_batches`). Off: blip-tiny at 3000 steps re-ranked 3-object scenes far worse with them
# (benchmarks/RESULTS.md, "blip-tiny and albef-tiny from clip-tiny").
SWAPS = False
ITM_NEGATIVES = 1  # negatives per text and per image for ITM (ALBEF and BLIP: 1)


@dataclass
class Features:
    """One step's image features (online and momentum) and the distillation weight, for the
    family's third loss."""

    image: torch.Tensor
    image_m: torch.Tensor
    alpha: float


class ContrastiveMatching(nn.Module):
    """`online` (the optimized modules; `online.model` is an ITC + ITM model with `vision_model`,
    `text_encoder`, `vision_proj`, `text_proj`, `itm_head`), its momentum copy and the queues."""

    def __init__(self, online: nn.Module, temp: float, steps: int, frozen_vision: bool = False):
        super().__init__()
        self.online = online
        self.momentum = copy.deepcopy(online).requires_grad_(False)
        d = online.model.cfg.embed_dim
        self.register_buffer("image_queue", F.normalize(torch.randn(d, QUEUE), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(d, QUEUE), dim=0))
        self.register_buffer("idx_queue", torch.full((1, QUEUE), -1, dtype=torch.long))
        self.ptr = 0
        self.temp, self.steps, self.step, self.frozen_vision = temp, steps, 0, frozen_vision

    @torch.no_grad()
    def _momentum_update(self) -> None:
        for p, pm in zip(self.online.parameters(), self.momentum.parameters()):
            pm.mul_(MOMENTUM).add_(p.detach(), alpha=1 - MOMENTUM)

    @torch.no_grad()
    def _enqueue(self, image_feat: torch.Tensor, text_feat: torch.Tensor, idx: torch.Tensor) -> None:
        n = image_feat.shape[0]
        at = torch.arange(self.ptr, self.ptr + n) % QUEUE
        self.image_queue[:, at] = image_feat.t().float()
        self.text_queue[:, at] = text_feat.t().float()
        self.idx_queue[0, at] = idx
        self.ptr = (self.ptr + n) % QUEUE

    @staticmethod
    def _itc_parts(m: Any, features: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
        text = m.text_encoder.text(ids, mask)
        image_feat = F.normalize(m.vision_proj(features[:, 0]), dim=-1)
        text_feat = F.normalize(m.text_proj(text[:, 0]), dim=-1)
        return text, image_feat, text_feat

    def itc_itm(self, batch: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, Features]:
        """(ITC + ITM loss, the image features for the family's third loss)."""
        pixels, ids, mask, idx = batch
        m, mm = self.online.model, self.momentum.model
        alpha = ALPHA * min(1.0, self.step / max(1, self.steps // 5))
        self.step += 1
        if self.frozen_vision:  # one forward serves both: the momentum copy of a frozen tower is it
            with torch.no_grad():
                features = features_m = m.vision_model.hidden_states(pixels)
        else:
            features = m.vision_model.hidden_states(pixels)
        text, image_feat, text_feat = self._itc_parts(m, features, ids, mask)

        idx_all = torch.cat([idx[None], self.idx_queue], dim=1)  # (1, B + Q)
        positive = (idx[:, None] == idx_all).float()
        targets = positive / positive.sum(1, keepdim=True)
        with torch.no_grad():
            self._momentum_update()
            if not self.frozen_vision:
                features_m = mm.vision_model.hidden_states(pixels)
            _, image_feat_m, text_feat_m = self._itc_parts(mm, features_m, ids, mask)
            image_all = torch.cat([image_feat_m.t(), self.image_queue], dim=1)
            text_all = torch.cat([text_feat_m.t(), self.text_queue], dim=1)
            i2t_targets = alpha * F.softmax(image_feat_m @ text_all / self.temp, 1) + (1 - alpha) * targets
            t2i_targets = alpha * F.softmax(text_feat_m @ image_all / self.temp, 1) + (1 - alpha) * targets
        sim_i2t = image_feat @ text_all / self.temp
        sim_t2i = text_feat @ image_all / self.temp
        itc = (
            -(
                (F.log_softmax(sim_i2t, 1) * i2t_targets).sum(1).mean()
                + (F.log_softmax(sim_t2i, 1) * t2i_targets).sum(1).mean()
            )
            / 2
        )
        self._enqueue(image_feat_m, text_feat_m, idx)

        b = pixels.shape[0]
        with torch.no_grad():
            same = idx[:, None] == idx[None]
            w_i2t = F.softmax(sim_i2t[:, :b].float(), 1).masked_fill(same, 0) + 1e-9 * ~same
            w_t2i = F.softmax(sim_t2i[:, :b].float(), 1).masked_fill(same, 0) + 1e-9 * ~same
            k = ITM_NEGATIVES
            neg_image = torch.multinomial(w_t2i, k).t().reshape(-1)  # per text, k of them
            neg_text = torch.multinomial(w_i2t, k).t().reshape(-1)  # per image
        arange = torch.arange(b)
        te, rows = m.text_encoder, torch.cat([arange, arange.repeat(k), neg_text])
        image3 = torch.cat([features, features[neg_image], features.repeat(k, 1, 1)])
        if te.cfg.fusion_from:  # ALBEF: the fusion layers continue the text layers' states
            fused = te.run_layers(text[rows], mask[rows], image3, te.cfg.fusion_from, te.cfg.layers)
        else:  # BLIP: the text mode skipped cross-attention in every layer, so all run again
            fused = te.fuse(ids[rows], mask[rows], image3)
        labels = torch.cat([torch.ones(b), torch.zeros(2 * k * b)]).long()
        itm = F.cross_entropy(m.itm_head(fused[:, 0]), labels)
        return itc + itm, Features(features, features_m, alpha)


def scene_id(key: Any) -> int:
    return zlib.crc32(repr(key).encode())


def scene_batches(tokenizer: Any, pre: PreprocessConfig, batch: int, hard: int, seed: int) -> Iterator[Any]:
    """Endless (pixels, ids, mask, scene ids): fresh scenes and captions; the last `hard` rows are
    near-duplicates of the first ones, in turn (more than half the batch: some scenes get two):
    one attribute edited (`data.perturb`), and with `SWAPS` every other one an attribute traded
    between two objects (`data.swap_attribute`: the same words bound otherwise)."""
    from mmedge.data import caption_for, perturb, render, sample_objects, swap_attribute
    from mmedge.data.scenes import scene_key
    from mmedge.runtime.images import preprocess

    rng = np.random.default_rng(np.random.SeedSequence(entropy=TRAIN_SEED, spawn_key=(seed, 2)))
    while True:
        fresh = batch - hard
        objs = [sample_objects(rng) for _ in range(fresh)]
        objs += [(swap_attribute if SWAPS and i % 2 else perturb)(objs[i % fresh], rng) for i in range(hard)]
        pixels = preprocess([render(o, pre.image_size, rng) for o in objs], pre)
        ids, mask = tokenizer.encode_batch([caption_for(o, rng) for o in objs])
        idx = torch.tensor([scene_id(scene_key(o)) for o in objs], dtype=torch.long)
        yield torch.from_numpy(pixels), torch.from_numpy(ids), torch.from_numpy(mask), idx


def check_batch(batch: int, hard: int) -> None:
    if not 0 <= hard <= batch * 2 // 3:
        raise ConfigError(f"hard_negatives must be in [0, 2/3 of batch_size], got {hard}")
    if QUEUE % batch:
        raise ConfigError(f"batch_size must divide the queue of {QUEUE}, got {batch}")


def load_clip_init(init: str | None, family: str) -> Any:
    """The loaded CLIP checkpoint `--init` names (its vision tower starts the ViT), or None."""
    if init is None:
        return None
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.models.sources import load_source

    found = read_checkpoint_meta(init).get("family")
    if found != "clip":
        raise ConfigError(
            f"--init {init!r} is a {found!r} checkpoint; {family} starts its ViT from a clip one "
            "(e.g. the demo's $MMEDGE_HOME/checkpoints/clip-tiny)"
        )
    return load_source(init, family="clip")


def clip_config(raw: dict[str, Any], clip: Any) -> dict[str, Any]:
    """A preset's config with the CLIP checkpoint's vision tower and ITC width."""
    from mmedge.recipes.stages import clip_vision

    vision = {**clip_vision(clip), "tower": "clip"}
    text = {**raw["text"], "encoder_hidden": vision["width"]}
    return {**raw, "vision": vision, "text": text, "embed_dim": clip.config.projection_dim}


@torch.no_grad()
def start_from_clip(model: nn.Module, clip: Any) -> None:
    """Copy the CLIP tower and its image projection into an ITC + ITM model."""
    model.vision_model.load_state_dict(clip.model.vision_model.state_dict())
    model.vision_proj.weight.copy_(clip.model.visual_projection.weight)
    model.vision_proj.bias.zero_()


def init_vision(model: nn.Module, clip: Any, vision_lr_scale: float) -> tuple[tuple[str, float], ...] | None:
    """Start the ViT from `clip` (when given) and set what trains: returns the trainer's lr_scales
    for the tuned tower, or None when it stays frozen (`vision_lr_scale` 0)."""
    if clip is None:
        return ()
    start_from_clip(model, clip)
    if vision_lr_scale == 0:
        model.vision_model.requires_grad_(False)
        return None
    return (("online.model.vision_model.", vision_lr_scale),)


def train_info(request: Any, batch: int, hard: int, losses: list[float], started: float) -> dict:
    """The checkpoint's `train` record."""
    from mmedge.recipes.trainer import amx_bf16_fast

    return {
        "preset": request.preset,
        "data": "synthetic scenes",
        "init": request.init,
        "steps": len(losses),
        "batch_size": batch,
        "hard_negatives": hard,
        "queue": QUEUE,
        "momentum": MOMENTUM,
        "alpha": ALPHA,
        "bf16": request.bf16 and amx_bf16_fast(),
        **loss_record(losses, started),
    }
