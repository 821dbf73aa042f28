"""Train ALBEF on synthetic scenes with its three losses and momentum distillation (Li et al. 2021).

- **ITC** with momentum distillation and **ITM** on hard negatives: `recipes.itc_itm`. Half of
  each batch are near-duplicates of the other half: one attribute edited or traded between two
  objects.
- **MLM** on the caption with the image: 15% of the tokens picked (80% -> [MASK], 10% -> a random
  token, 10% kept), predicted through every layer; distilled from the momentum model as ITC is.

The MLM head, the momentum copies and the queues are training-only: the checkpoint holds the
albef model alone, as `albef.official` keeps of a released file. With `--init CLIP_CHECKPOINT` the
ViT and its projection start from a trained CLIP's (ALBEF starts from a pretrained ViT) and are
tuned at `VISION_LR_SCALE` of the learning rate; without it everything starts from random weights.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmedge.data.scenes import TRAIN_SEED
from mmedge.data.tokenizer_train import BOS_ID, EOS_ID, PAD_ID, train_tokenizer
from mmedge.errors import UnsupportedError
from mmedge.models.albef.modeling import Albef, AlbefConfig
from mmedge.models.blocks import activation
from mmedge.models.checkpoint import save_checkpoint
from mmedge.models.clip.modeling import sincos_2d
from mmedge.models.registry import load_preset
from mmedge.recipes.base import TrainRequest, train_config
from mmedge.recipes.itc_itm import (
    ContrastiveMatching,
    check_batch,
    clip_config,
    init_vision,
    load_clip_init,
    scene_batches,
    train_info,
)
from mmedge.recipes.trainer import train as run_training

log = logging.getLogger(__name__)

DEFAULT_STEPS = 2000
DEFAULT_BATCH = 32
DEFAULT_LR = 1e-3
MASK_TOKEN = "[MASK]"
MLM_PROB = 0.15
# A CLIP-initialised ViT (`--init`) is tuned at this fraction of the learning rate (0: frozen).
VISION_LR_SCALE = 0.1


class MLMHead(nn.Module):
    """BERT's prediction head: dense, activation, LayerNorm, then the word embeddings (tied)."""

    def __init__(self, model: Albef):
        super().__init__()
        t = model.cfg.text
        self.dense = nn.Linear(t.hidden, t.hidden)
        self.act = activation(t.act)
        self.norm = nn.LayerNorm(t.hidden, eps=t.eps)
        self.bias = nn.Parameter(torch.zeros(t.vocab_size))

    def forward(self, x: torch.Tensor, words: torch.Tensor) -> torch.Tensor:
        return self.norm(self.act(self.dense(x))) @ words.t() + self.bias


class _Online(nn.Module):
    """What the optimizer updates: the model and the MLM head."""

    def __init__(self, model: Albef):
        super().__init__()
        self.model = model
        self.mlm = MLMHead(model)


class AlbefTraining(ContrastiveMatching):
    """ITC + ITM (`itc_itm.ContrastiveMatching`) and MLM; `loss(batch)` is one step's."""

    def __init__(self, model: Albef, mask_id: int, steps: int, frozen_vision: bool = False):
        super().__init__(_Online(model), float(model.temp), steps, frozen_vision)
        self.mask_id = mask_id

    def _masked(self, ids: torch.Tensor, mask: torch.Tensor, vocab: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(input ids with BERT's masking, labels: -100 except at the picked tokens)."""
        special = (ids == PAD_ID) | (ids == BOS_ID) | (ids == EOS_ID) | (mask == 0)
        picked = (torch.rand(ids.shape) < MLM_PROB) & ~special
        labels = ids.masked_fill(~picked, -100)
        roll = torch.rand(ids.shape)
        out = ids.masked_fill(picked & (roll < 0.8), self.mask_id)
        swap = picked & (roll >= 0.8) & (roll < 0.9)
        return torch.where(swap, torch.randint(4, vocab, ids.shape), out), labels

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        itc_itm, f = self.itc_itm(batch)
        _, ids, mask, _ = batch
        te, layers = self.online.model.text_encoder, self.online.model.text_encoder.cfg.layers
        # MLM conditioned on the image, distilled from the momentum model
        masked, mlm_labels = self._masked(ids, mask, te.cfg.vocab_size)
        hidden = te.run_layers(te.embeddings(masked), mask, f.image, 0, layers)
        logits = self.online.mlm(hidden, te.embeddings.word_embeddings.weight)
        picked = mlm_labels != -100
        if not picked.any():
            return itc_itm + logits.sum() * 0.0
        ce = F.cross_entropy(logits[picked], mlm_labels[picked])
        with torch.no_grad():
            tm = self.momentum.model.text_encoder
            hidden_m = tm.run_layers(tm.embeddings(masked), mask, f.image_m, 0, layers)
            soft = F.softmax(self.momentum.mlm(hidden_m, tm.embeddings.word_embeddings.weight)[picked], -1)
        distill = -(F.log_softmax(logits[picked], -1) * soft).sum(-1).mean()
        return itc_itm + (1 - f.alpha) * ce + f.alpha * distill


def _tokenizer_json(seed: int) -> str:
    """The demo's BPE tokenizer of scene captions, with a [MASK] token for MLM."""
    from mmedge.data import caption_for, generate_scenes

    rng = np.random.default_rng(seed)
    captions = [caption_for(s.objects, rng) for s in generate_scenes(2000, seed=TRAIN_SEED, image_size=32)]
    tok = train_tokenizer(captions, vocab_size=256)
    tok.add_special_tokens([MASK_TOKEN])
    return str(tok.to_str())


def train(out: str | Path, request: TrainRequest, progress: bool | None = None) -> Path:
    """Train `request.preset` on synthetic scenes and save a checkpoint directory at `out`."""
    from tokenizers import Tokenizer

    from mmedge.runtime.texts import TextTokenizer

    if request.data is not None:
        raise UnsupportedError("the albef recipe trains on synthetic scenes (no --data)")
    clip = load_clip_init(request.init, "albef")
    t0 = time.perf_counter()
    family, raw = load_preset(request.preset)
    batch = request.batch_size or DEFAULT_BATCH
    # half of each batch: near-duplicates of the other half (itc_itm.scene_batches)
    hard = batch // 2 if request.hard_negatives is None else request.hard_negatives
    check_batch(batch, hard)
    tokenizer_json = _tokenizer_json(request.seed)
    tok = Tokenizer.from_str(tokenizer_json)
    raw = {**raw, "text": {**raw["text"], "vocab_size": tok.get_vocab_size(), "pad_token_id": PAD_ID}}
    cfg: AlbefConfig = family.config_from_dict(raw if clip is None else clip_config(raw, clip))
    torch.manual_seed(request.seed)
    model = Albef(cfg)
    if clip is None:  # explicit 2-D positions, as clip-tiny starts from (layout is in every caption)
        with torch.no_grad():
            pos = model.vision_model.embeddings.position_embedding
            pos.copy_(sincos_2d(cfg.vision.image_size // cfg.vision.patch_size, cfg.vision.width)[None])
    # ALBEF starts from a pretrained ViT: here the CLIP tower and its image projection
    lr_scales = init_vision(model, clip, VISION_LR_SCALE)
    # The temperature stays at the preset's: ALBEF learns it in linear space, where an Adam step at
    # lr 1e-3 moves 0.07 by about 1.4%; in the first run it fell to 0.013 within the warm-up and
    # contrastive R@1 stayed near chance (benchmarks/RESULTS.md, "albef-tiny").
    model.temp.requires_grad_(False)
    tc = dataclasses.replace(train_config(request, DEFAULT_STEPS, DEFAULT_LR), lr_scales=lr_scales or ())
    training = AlbefTraining(
        model, mask_id=int(tok.token_to_id(MASK_TOKEN)), steps=tc.steps, frozen_vision=lr_scales is None
    )
    texts = TextTokenizer.from_json(tokenizer_json, context_length=cfg.text.max_positions, pad_id=PAD_ID)
    batches = scene_batches(texts, family.preprocess(cfg), batch, hard, request.seed)
    losses = run_training(
        training,
        batches,
        lambda t, b: t.loss(b),
        tc,
        progress=progress,
        desc=f"train {request.preset}",
    )
    info = {"train": train_info(request, batch, hard, losses, t0)}
    log.info("trained %d steps, final loss %.3f", len(losses), info["train"]["final_loss"])
    return save_checkpoint(out, family.name, cfg.to_dict(), model, tokenizer_json, extra=info)
