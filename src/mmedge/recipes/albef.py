"""Train ALBEF on synthetic scenes with its three losses and momentum distillation (Li et al. 2021).

- **ITC** over the batch and queues of earlier batches' momentum features. The momentum model (an
  exponential moving average of the encoders and projections) gives soft targets: the loss is
  against `alpha * softmax(momentum similarities) + (1 - alpha) * ground truth`, alpha ramped up
  from 0 over the first fifth of training. Ground truth: every pair whose scenes are identical.
- **ITM** on each positive pair, one negative image per text and one negative text per image, each
  drawn with probability softmax(ITC similarity) over the batch (identical scenes excluded): the
  hard negatives of the contrastive space. A quarter of each batch edits one attribute of another
  row (`data.perturb`), the near-duplicates ITM has to tell apart.
- **MLM** on the caption with the image: 15% of the tokens picked (80% -> [MASK], 10% -> a random
  token, 10% kept), predicted through every layer; distilled from the momentum model as ITC is.

The MLM head, the momentum copies and the queues are training-only: the checkpoint holds the
albef model alone, as `albef.official` keeps of a released file.
"""

from __future__ import annotations

import copy
import logging
import time
import zlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmedge.data.scenes import TRAIN_SEED
from mmedge.data.tokenizer_train import BOS_ID, EOS_ID, PAD_ID, train_tokenizer
from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models.albef.modeling import Albef, AlbefConfig
from mmedge.models.blocks import activation
from mmedge.models.checkpoint import save_checkpoint
from mmedge.models.clip.modeling import sincos_2d
from mmedge.models.registry import load_preset
from mmedge.recipes.base import TrainRequest, train_config
from mmedge.recipes.trainer import amx_bf16_fast
from mmedge.recipes.trainer import train as run_training
from mmedge.runtime.sections import PreprocessConfig

log = logging.getLogger(__name__)

DEFAULT_STEPS = 800
DEFAULT_BATCH = 32
DEFAULT_HARD_NEGATIVES = 8  # rows that edit one attribute of an earlier row
DEFAULT_LR = 1e-3
QUEUE = 1024  # momentum features kept from earlier batches (ALBEF: 65,536 at batch 512)
MOMENTUM = 0.995
ALPHA = 0.4  # distillation weight, ALBEF's
MASK_TOKEN = "[MASK]"
MLM_PROB = 0.15


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


class AlbefTraining(nn.Module):
    """The model, its MLM head, their momentum copy and the feature queues; `loss(batch)` is one step's."""

    def __init__(self, model: Albef, mask_id: int, steps: int):
        super().__init__()
        self.online = _Online(model)
        self.momentum = copy.deepcopy(self.online).requires_grad_(False)
        d = model.cfg.embed_dim
        self.register_buffer("image_queue", F.normalize(torch.randn(d, QUEUE), dim=0))
        self.register_buffer("text_queue", F.normalize(torch.randn(d, QUEUE), dim=0))
        self.register_buffer("idx_queue", torch.full((1, QUEUE), -1, dtype=torch.long))
        self.ptr = 0
        self.mask_id, self.steps, self.step = mask_id, steps, 0

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
    def _itc_parts(m: Albef, pixels: torch.Tensor, ids: torch.Tensor, mask: torch.Tensor) -> tuple:
        features = m.vision_model.hidden_states(pixels)
        te = m.text_encoder
        text = te.run_layers(te.embeddings(ids), mask, None, 0, te.cfg.fusion_from)
        image_feat = F.normalize(m.vision_proj(features[:, 0]), dim=-1)
        text_feat = F.normalize(m.text_proj(text[:, 0]), dim=-1)
        return features, text, image_feat, text_feat

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
        pixels, ids, mask, idx = batch
        m, mm = self.online.model, self.momentum.model
        te = m.text_encoder
        fusion_from, layers = te.cfg.fusion_from, te.cfg.layers
        alpha = ALPHA * min(1.0, self.step / max(1, self.steps // 5))
        self.step += 1
        features, text, image_feat, text_feat = self._itc_parts(m, pixels, ids, mask)

        # ITC with momentum distillation over the batch and the queues
        idx_all = torch.cat([idx[None], self.idx_queue], dim=1)  # (1, B + Q)
        positive = (idx[:, None] == idx_all).float()
        targets = positive / positive.sum(1, keepdim=True)
        with torch.no_grad():
            self._momentum_update()
            features_m, _, image_feat_m, text_feat_m = self._itc_parts(mm, pixels, ids, mask)
            image_all = torch.cat([image_feat_m.t(), self.image_queue], dim=1)
            text_all = torch.cat([text_feat_m.t(), self.text_queue], dim=1)
            i2t_targets = alpha * F.softmax(image_feat_m @ text_all / m.temp, 1) + (1 - alpha) * targets
            t2i_targets = alpha * F.softmax(text_feat_m @ image_all / m.temp, 1) + (1 - alpha) * targets
        sim_i2t = image_feat @ text_all / m.temp
        sim_t2i = text_feat @ image_all / m.temp
        itc = (
            -(
                (F.log_softmax(sim_i2t, 1) * i2t_targets).sum(1).mean()
                + (F.log_softmax(sim_t2i, 1) * t2i_targets).sum(1).mean()
            )
            / 2
        )
        self._enqueue(image_feat_m, text_feat_m, idx)

        # ITM: positives, and negatives drawn by contrastive similarity
        b = pixels.shape[0]
        with torch.no_grad():
            same = idx[:, None] == idx[None]
            w_i2t = F.softmax(sim_i2t[:, :b].float(), 1).masked_fill(same, 0) + 1e-9 * ~same
            w_t2i = F.softmax(sim_t2i[:, :b].float(), 1).masked_fill(same, 0) + 1e-9 * ~same
            neg_image = torch.multinomial(w_t2i, 1)[:, 0]  # per text
            neg_text = torch.multinomial(w_i2t, 1)[:, 0]  # per image
        text3 = torch.cat([text, text, text[neg_text]])
        mask3 = torch.cat([mask, mask, mask[neg_text]])
        image3 = torch.cat([features, features[neg_image], features])
        fused = te.run_layers(text3, mask3, image3, fusion_from, layers)[:, 0]
        labels = torch.cat([torch.ones(b), torch.zeros(2 * b)]).long()
        itm = F.cross_entropy(m.itm_head(fused), labels)

        # MLM conditioned on the image, distilled from the momentum model
        masked, mlm_labels = self._masked(ids, mask, te.cfg.vocab_size)
        words = te.embeddings.word_embeddings.weight
        hidden = te.run_layers(te.embeddings(masked), mask, features, 0, layers)
        logits = self.online.mlm(hidden, words)
        picked = mlm_labels != -100
        if picked.any():
            ce = F.cross_entropy(logits[picked], mlm_labels[picked])
            with torch.no_grad():
                tm = mm.text_encoder
                hidden_m = tm.run_layers(tm.embeddings(masked), mask, features_m, 0, layers)
                soft = F.softmax(
                    self.momentum.mlm(hidden_m, tm.embeddings.word_embeddings.weight)[picked], -1
                )
            distill = -(F.log_softmax(logits[picked], -1) * soft).sum(-1).mean()
            mlm = (1 - alpha) * ce + alpha * distill
        else:
            mlm = logits.sum() * 0.0
        return itc + itm + mlm


def _scene_id(key: Any) -> int:
    return zlib.crc32(repr(key).encode())


def _batches(tokenizer: Any, pre: PreprocessConfig, batch: int, hard: int, seed: int) -> Iterator[Any]:
    """Endless (pixels, ids, mask, scene ids): fresh scenes and captions; the last `hard` rows edit
    one attribute of the first ones."""
    from mmedge.data import caption_for, perturb, render, sample_objects
    from mmedge.data.scenes import scene_key
    from mmedge.runtime.images import preprocess

    rng = np.random.default_rng(np.random.SeedSequence(entropy=TRAIN_SEED, spawn_key=(seed, 2)))
    while True:
        objs = [sample_objects(rng) for _ in range(batch - hard)]
        objs += [perturb(objs[i], rng) for i in range(hard)]
        pixels = preprocess([render(o, pre.image_size, rng) for o in objs], pre)
        ids, mask = tokenizer.encode_batch([caption_for(o, rng) for o in objs])
        idx = torch.tensor([_scene_id(scene_key(o)) for o in objs], dtype=torch.long)
        yield torch.from_numpy(pixels), torch.from_numpy(ids), torch.from_numpy(mask), idx


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

    if request.data is not None or request.init is not None:
        raise UnsupportedError("the albef recipe trains from scratch on synthetic scenes (no --data, --init)")
    t0 = time.perf_counter()
    family, raw = load_preset(request.preset)
    batch = request.batch_size or DEFAULT_BATCH
    hard = DEFAULT_HARD_NEGATIVES if request.hard_negatives is None else request.hard_negatives
    if not 0 <= hard <= batch // 2:
        raise ConfigError(f"hard_negatives must be in [0, batch_size / 2], got {hard}")
    if QUEUE % batch:
        raise ConfigError(f"batch_size must divide the queue of {QUEUE}, got {batch}")
    tokenizer_json = _tokenizer_json(request.seed)
    tok = Tokenizer.from_str(tokenizer_json)
    cfg: AlbefConfig = family.config_from_dict(
        {**raw, "text": {**raw["text"], "vocab_size": tok.get_vocab_size(), "pad_token_id": PAD_ID}}
    )
    torch.manual_seed(request.seed)
    model = Albef(cfg)
    with torch.no_grad():  # explicit 2-D positions, as clip-tiny starts from (layout is in every caption)
        pos = model.vision_model.embeddings.position_embedding
        pos.copy_(sincos_2d(cfg.vision.image_size // cfg.vision.patch_size, cfg.vision.width)[None])
    # The temperature stays at the preset's: ALBEF learns it in linear space, where an Adam step at
    # lr 1e-3 moves 0.07 by about 1.4%; in the first run it fell to 0.013 within the warm-up and
    # contrastive R@1 stayed near chance (benchmarks/RESULTS.md, "albef-tiny").
    model.temp.requires_grad_(False)
    tc = train_config(request, DEFAULT_STEPS, DEFAULT_LR)
    training = AlbefTraining(model, mask_id=int(tok.token_to_id(MASK_TOKEN)), steps=tc.steps)
    texts = TextTokenizer.from_json(tokenizer_json, context_length=cfg.text.max_positions, pad_id=PAD_ID)
    batches = _batches(texts, family.preprocess(cfg), batch, hard, request.seed)
    losses = run_training(
        training,
        batches,
        lambda t, b: t.loss(b),
        tc,
        progress=progress,
        desc=f"train {request.preset}",
    )
    info = {
        "train": {
            "preset": request.preset,
            "data": "synthetic scenes",
            "steps": len(losses),
            "batch_size": batch,
            "hard_negatives": hard,
            "queue": QUEUE,
            "momentum": MOMENTUM,
            "alpha": ALPHA,
            "bf16": request.bf16 and amx_bf16_fast(),
            "first_loss": float(np.mean(losses[:5])),
            "final_loss": float(np.mean(losses[-20:])),
            "seconds": round(time.perf_counter() - t0, 1),
        }
    }
    log.info("trained %d steps, final loss %.3f", len(losses), info["train"]["final_loss"])
    return save_checkpoint(out, family.name, cfg.to_dict(), model, tokenizer_json, extra=info)
