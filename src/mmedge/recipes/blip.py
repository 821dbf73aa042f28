"""Train BLIP on synthetic scenes with its three losses (Li et al. 2022): ITC, ITM and LM.

- **ITC** with momentum distillation and **ITM** on hard negatives, as ALBEF's
  (`recipes.itc_itm`); BLIP's text encoder cross-attends in every layer, and its text mode skips
  the cross-attention (`models.fusion`).
- **LM**: the image-grounded decoder (`BlipTextDecoder`, cross-attending to every image token)
  writes the caption after `[DEC]` and ends it with the end token, cross-entropy with BLIP's label
  smoothing of 0.1. The decoder has its own weights (BLIP shares all but self-attention between
  encoder and decoder to save parameters; the exported models would carry both copies anyway).

The ViT and its projection start from a trained CLIP checkpoint (`--init`, required: BLIP starts
from a pretrained ViT) and are tuned at `VISION_LR_SCALE` of the learning rate.

Then **VQA** fine-tuning, as BLIP's: the question encoder starts from the image-grounded text
encoder, the answer decoder from the caption decoder (the ViT frozen); LM loss on [DEC] answer [end]
for one question of each fresh scene.

Three checkpoints come out, as HF publishes BLIP per task: `OUT` (variant `itm`: retrieval with ITM
re-ranking), `OUT-caption` (variant `caption`: the ViT and the caption decoder) and `OUT-vqa`
(variant `vqa`).
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F

from mmedge.data.tokenizer_train import EOS_ID, PAD_ID, train_tokenizer
from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models.blip.decoder import BlipTextDecoder
from mmedge.models.blip.modeling import Blip, BlipCaptioner, BlipConfig, BlipVQA
from mmedge.models.checkpoint import is_checkpoint, save_checkpoint
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
VISION_LR_SCALE = 0.1
TEMP = 0.07  # BLIP's initial ITC temperature, kept fixed (see recipes.albef)
LABEL_SMOOTHING = 0.1
DEC_TOKEN = "[DEC]"
CAPTION_SUFFIX = "-caption"
VQA_SUFFIX = "-vqa"
VQA_STEPS = 600  # the VQA fine-tuning after pre-training
VQA_LR = 5e-4


class _Online(nn.Module):
    """What the optimizer updates: the ITC + ITM model and the caption decoder."""

    def __init__(self, model: Blip, decoder: BlipTextDecoder):
        super().__init__()
        self.model = model
        self.decoder = decoder


class BlipTraining(ContrastiveMatching):
    """ITC + ITM (`itc_itm.ContrastiveMatching`) and the decoder's LM loss; `loss(batch)` is one step's."""

    def __init__(self, model: Blip, decoder: BlipTextDecoder, dec_id: int, steps: int, frozen_vision: bool):
        super().__init__(_Online(model, decoder), TEMP, steps, frozen_vision)
        self.dec_id = dec_id

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        itc_itm, f = self.itc_itm(batch)
        _, ids, mask, _ = batch
        inputs, labels = decoder_rows(ids, mask, self.dec_id)
        return itc_itm + lm_loss(self.online.decoder(inputs, f.image), labels)


def decoder_rows(ids: torch.Tensor, mask: torch.Tensor, dec_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(decoder inputs, labels) of tokenized texts (start token first, padded): the decoder reads
    [DEC] text and predicts text [end]; labels are -100 past the end."""
    lengths = mask.sum(1)
    dec = torch.cat([ids, torch.full_like(ids[:, :1], PAD_ID)], dim=1)
    dec[:, 0] = dec_id
    dec[torch.arange(len(dec)), lengths] = EOS_ID
    labels = dec[:, 1:].masked_fill(torch.arange(dec.shape[1] - 1)[None] >= lengths[:, None], -100)
    return dec[:, :-1], labels


def lm_loss(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy(logits.flatten(0, 1), labels.flatten(), label_smoothing=LABEL_SMOOTHING)


class VqaTraining(nn.Module):
    """BLIP's VQA fine-tuning: the question read with cross-attention to the (frozen) image, the
    answer decoder cross-attending to the question's states; LM loss on [DEC] answer [end]."""

    def __init__(self, model: BlipVQA, dec_id: int):
        super().__init__()
        self.model, self.dec_id = model, dec_id

    def loss(self, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
        pixels, q_ids, q_mask, a_ids, a_mask = batch
        with torch.no_grad():
            image = self.model.image_features(pixels)
        states = self.model.encode_question(image, q_ids, q_mask)
        inputs, labels = decoder_rows(a_ids, a_mask, self.dec_id)
        return lm_loss(self.model.text_decoder(inputs, states, q_mask), labels)


def _vqa_batches(tokenizer: Any, answers: Any, pre: Any, batch: int, seed: int) -> Iterator[Any]:
    """Endless (pixels, question ids, mask, answer ids, mask): fresh scenes, one question each."""
    import numpy as np

    from mmedge.data import questions_for, render, sample_objects
    from mmedge.data.scenes import TRAIN_SEED
    from mmedge.runtime.images import preprocess

    rng = np.random.default_rng(np.random.SeedSequence(entropy=TRAIN_SEED, spawn_key=(seed, 3)))
    while True:
        objs = [sample_objects(rng) for _ in range(batch)]
        qas = [qa[int(rng.integers(len(qa)))] for qa in map(questions_for, objs)]
        pixels = preprocess([render(o, pre.image_size, rng) for o in objs], pre)
        q_ids, q_mask = tokenizer.encode_batch([qa.question for qa in qas])
        a_ids, a_mask = answers.encode_batch([qa.answer for qa in qas])
        yield tuple(torch.from_numpy(x) for x in (pixels, q_ids, q_mask, a_ids, a_mask))


def _tokenizer_json(seed: int) -> str:
    """A BPE tokenizer of scene captions, questions and answers that decodes with spaces, plus
    BLIP's [DEC] token."""
    import numpy as np

    from mmedge.data import caption_for, generate_scenes
    from mmedge.data.scenes import TRAIN_SEED

    rng = np.random.default_rng(seed)
    texts = []
    for s in generate_scenes(2000, seed=TRAIN_SEED, image_size=32):
        texts += [caption_for(s.objects, rng), *(f"{qa.question} {qa.answer}" for qa in s.qa)]
    tok = train_tokenizer(texts, vocab_size=288, generation=True)
    tok.add_special_tokens([DEC_TOKEN])
    return str(tok.to_str())


def task_checkpoint_path(out: str | Path, variant: str) -> Path:
    """Where the `caption` or `vqa` checkpoint goes beside `out` (the itm one)."""
    out = Path(out)
    return out.with_name(out.name + {"caption": CAPTION_SUFFIX, "vqa": VQA_SUFFIX}[variant])


def train(out: str | Path, request: TrainRequest, progress: bool | None = None) -> Path:
    """Train `request.preset` on synthetic scenes; save `out` (itm), `out`-caption and `out`-vqa.
    `request.steps` sets each phase's steps (pre-training, VQA)."""
    from tokenizers import Tokenizer

    from mmedge.runtime.staging import check_replaceable
    from mmedge.runtime.texts import TextTokenizer

    if request.data is not None:
        raise UnsupportedError("the blip recipe trains on synthetic scenes (no --data)")
    if request.init is None:
        raise ConfigError(
            "BLIP starts from a pretrained ViT: pass --init CLIP_CHECKPOINT (e.g. the demo's "
            "$MMEDGE_HOME/checkpoints/clip-tiny)"
        )
    caption_out, vqa_out = task_checkpoint_path(out, "caption"), task_checkpoint_path(out, "vqa")
    for path in (caption_out, vqa_out):
        check_replaceable(path, is_checkpoint, "checkpoint", False)
    clip = load_clip_init(request.init, "blip")
    t0 = time.perf_counter()
    family, raw = load_preset(request.preset)
    batch = request.batch_size or DEFAULT_BATCH
    # half of each batch: near-duplicates of the other half (itc_itm.scene_batches)
    hard = batch // 2 if request.hard_negatives is None else request.hard_negatives
    check_batch(batch, hard)
    tokenizer_json = _tokenizer_json(request.seed)
    tok = Tokenizer.from_str(tokenizer_json)
    dec_id = int(tok.token_to_id(DEC_TOKEN))
    raw = {
        **raw,
        "variant": "itm",
        "text": {**raw["text"], "vocab_size": tok.get_vocab_size(), "pad_token_id": PAD_ID},
        "bos_token_id": dec_id,
        "sep_token_id": EOS_ID,
    }
    cfg: BlipConfig = family.config_from_dict(clip_config(raw, clip))
    torch.manual_seed(request.seed)
    model, decoder = Blip(cfg), BlipTextDecoder(cfg.text)
    lr_scales = init_vision(model, clip, VISION_LR_SCALE)
    tc = dataclasses.replace(train_config(request, DEFAULT_STEPS, DEFAULT_LR), lr_scales=lr_scales or ())
    training = BlipTraining(model, decoder, dec_id, tc.steps, frozen_vision=lr_scales is None)
    # one slot short of the positions: the decoder's input appends the end token
    context = cfg.text.max_positions - 1
    texts = TextTokenizer.from_json(tokenizer_json, context_length=context, pad_id=PAD_ID)
    batches = scene_batches(texts, family.preprocess(cfg), batch, hard, request.seed)
    losses = run_training(
        training, batches, lambda t, b: t.loss(b), tc, progress=progress, desc=f"train {request.preset}"
    )
    info = {"train": train_info(request, batch, hard, losses, t0)}
    log.info("trained %d steps, final loss %.3f", len(losses), info["train"]["final_loss"])

    caption_cfg = dataclasses.replace(cfg, variant="caption")
    captioner = BlipCaptioner(caption_cfg)
    captioner.vision_model.load_state_dict(model.vision_model.state_dict())
    captioner.text_decoder.load_state_dict(decoder.state_dict())

    # VQA, as BLIP fine-tunes it: the question encoder starts from the image-grounded text
    # encoder, the answer decoder from the caption decoder
    t1 = time.perf_counter()
    vqa_cfg = dataclasses.replace(cfg, variant="vqa")
    vqa = BlipVQA(vqa_cfg)
    vqa.vision_model.load_state_dict(model.vision_model.state_dict())
    vqa.vision_model.requires_grad_(False)
    vqa.text_encoder.load_state_dict(model.text_encoder.state_dict())
    vqa.text_decoder.load_state_dict(decoder.state_dict())
    questions = TextTokenizer.from_json(tokenizer_json, context_length=cfg.text.max_positions, pad_id=PAD_ID)
    answers = TextTokenizer.from_json(tokenizer_json, context_length=8, pad_id=PAD_ID)
    vqa_tc = dataclasses.replace(tc, steps=request.steps or VQA_STEPS, lr=request.lr or VQA_LR, lr_scales=())
    vqa_losses = run_training(
        VqaTraining(vqa, dec_id),
        _vqa_batches(questions, answers, family.preprocess(cfg), batch, request.seed),
        lambda t, b: t.loss(b),
        vqa_tc,
        progress=progress,
        desc=f"train {request.preset} (VQA)",
    )
    info["train"]["vqa"] = {
        "steps": len(vqa_losses),
        "final_loss": float(sum(vqa_losses[-20:]) / len(vqa_losses[-20:])),
        "seconds": round(time.perf_counter() - t1, 1),
    }
    save_checkpoint(caption_out, family.name, caption_cfg.to_dict(), captioner, tokenizer_json, extra=info)
    save_checkpoint(vqa_out, family.name, vqa_cfg.to_dict(), vqa, tokenizer_json, extra=info)
    log.info("caption and VQA checkpoints: %s, %s", caption_out, vqa_out)
    return save_checkpoint(out, family.name, cfg.to_dict(), model, tokenizer_json, extra=info)
