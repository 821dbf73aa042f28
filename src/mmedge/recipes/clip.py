"""Train a CLIP model with ITC, on synthetic scenes or the user's captioned images; writes a checkpoint.

Synthetic batches are freshly drawn scenes with freshly phrased captions, and the last
`hard_negatives` rows of each batch change one attribute of an earlier row (`data.perturb`), the
near-duplicates that random batches almost never hold. User data (`--data`: a JSONL of
{"image", "text"}, `shapes:N`, ...) is preprocessed once, exactly as the runtime will, and sampled
without replacement each step. `--init` starts from an mmedge checkpoint or an HF `CLIPModel`
directory (its tokenizer and image processor are kept).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from mmedge.data.scenes import TRAIN_SEED
from mmedge.data.tokenizer_train import EOS_ID, PAD_ID, train_tokenizer
from mmedge.errors import ConfigError, InvalidInputError
from mmedge.models.checkpoint import save_checkpoint
from mmedge.models.clip.modeling import CLIP, CLIPConfig
from mmedge.models.registry import load_preset
from mmedge.recipes.base import TrainRequest, check_init_family, loss_record, train_config
from mmedge.recipes.losses import itc_loss
from mmedge.recipes.trainer import amx_bf16_fast
from mmedge.recipes.trainer import train as run_training
from mmedge.runtime.schema import to_json
from mmedge.runtime.sections import PreprocessConfig

log = logging.getLogger(__name__)

# Steps matter more than anything else swept (GPU seed sweep, R@1 on 500 held-out scenes): 1300
# steps gave 0.82-0.97 over 8 seeds, 1800 steps 0.93-0.99. The demo trains this many.
DEFAULT_STEPS = 2000
DEFAULT_BATCH = 128
DEFAULT_HARD_NEGATIVES = 32
DEFAULT_LR = 1e-3  # 2e-3 reached R@1 0.67 after 1000 steps, 1e-3 reached 0.90
SHORT_TEXTS = 0.5
DATA_VOCAB = 2048  # tokenizer trained on the user's captions when not starting from --init


@dataclass(frozen=True)
class _Setup:
    cfg: CLIPConfig
    model: CLIP
    tokenizer_json: str
    preprocess: PreprocessConfig
    keep_preprocess: bool  # record it in the checkpoint (not the family default)


def _pixels(images: list[Any], cfg: PreprocessConfig) -> np.ndarray:
    """Exactly the runtime's preprocessing, so training sees what the device will see."""
    from mmedge.runtime.images import load_image, preprocess

    return preprocess([load_image(x) if not isinstance(x, np.ndarray) else x for x in images], cfg)


def _synthetic_batches(
    tokenizer: Any, pre: PreprocessConfig, batch: int, hard: int, seed: int, short: float
) -> Iterator[Any]:
    """Endless (pixels, ids, mask, text_image, true_of) of fresh scenes from a stream seeded apart
    from the held-out seed. Every image has its full caption (text i for image i); a `short` share
    of the rows without a hard-negative twin also get a short text ("a red circle", as web captions
    are), appended after the captions; `text_image` says whose it is and `true_of[t, i]` which
    images each text describes (`itc_loss` leaves those pairs out of its softmaxes)."""
    from mmedge.data import caption_for, perturb, render, sample_objects
    from mmedge.data.scenes import mention_text, mentions_hold, partial_mentions, scene_key

    rng = np.random.default_rng(np.random.SeedSequence(entropy=TRAIN_SEED, spawn_key=(seed, 1)))
    base = batch - hard
    while True:
        objs = [sample_objects(rng) for _ in range(base)]
        objs += [perturb(objs[i], rng) for i in range(hard)]
        pixels = _pixels([render(o, pre.image_size, rng) for o in objs], pre)
        keys = [scene_key(o) for o in objs]
        texts = [caption_for(o, rng) for o in objs]
        true_of = [[k == other for other in keys] for k in keys]
        owners = list(range(batch))
        for row in range(hard, base):
            if rng.random() < short:
                mentions = partial_mentions(objs[row], rng)
                texts.append(mention_text(mentions, rng))
                true_of.append([mentions_hold(mentions, other) for other in objs])
                owners.append(row)
        ids, mask = tokenizer.encode_batch(texts)
        yield (
            torch.from_numpy(pixels),
            torch.from_numpy(ids),
            torch.from_numpy(mask),
            torch.tensor(owners),
            torch.tensor(true_of),
        )


def _data_batches(
    items: list[Any], tokenizer: Any, pre: PreprocessConfig, batch: int, seed: int
) -> Iterator[Any]:
    """Endless (pixels, ids, mask) drawn from the user's items, each epoch in a fresh order."""
    pixels = np.concatenate(
        [_pixels([it.image for it in items[i : i + 64]], pre) for i in range(0, len(items), 64)]
    )
    pixels = pixels.astype(np.float16)  # half the memory; batches go back to float32
    ids, mask = tokenizer.encode_batch([it.text for it in items])
    rng = np.random.default_rng(seed)
    while True:
        order = rng.permutation(len(items))
        for i in range(0, len(order) - batch + 1, batch):
            idx = order[i : i + batch]
            yield (
                torch.from_numpy(pixels[idx].astype(np.float32)),
                torch.from_numpy(ids[idx]),
                torch.from_numpy(mask[idx]),
            )


def _loss(model: CLIP, batch: tuple[torch.Tensor, ...]) -> torch.Tensor:
    pixels, ids, mask, *pairs = batch  # synthetic batches also say which texts describe which images
    return itc_loss(model.encode_image(pixels), model.encode_text(ids, mask), model.logit_scale, *pairs)


def _setup(request: TrainRequest, captions: list[str] | None) -> _Setup:
    """The model to train: from --init, or the preset's config with a tokenizer trained here."""
    from mmedge.data import caption_for, generate_scenes

    family, raw = load_preset(request.preset)
    if request.init:
        from mmedge.models.sources import load_source

        lm = load_source(request.init)
        check_init_family(family, lm.family, request.init)
        assert lm.preprocess is not None  # clip always has one
        default = family.preprocess(lm.config)
        return _Setup(lm.config, lm.model, lm.tokenizer_json, lm.preprocess, lm.preprocess != default)
    if captions is None:  # synthetic scenes: a tiny vocabulary of their captions
        rng = np.random.default_rng(request.seed)
        captions = [
            caption_for(s.objects, rng) for s in generate_scenes(2000, seed=TRAIN_SEED, image_size=32)
        ]
        vocab = 256
    else:
        vocab = DATA_VOCAB
    tok = train_tokenizer(captions, vocab_size=vocab)
    text = {**raw["text"], "vocab_size": tok.get_vocab_size(), "eos_token_id": EOS_ID, "pad_token_id": PAD_ID}
    cfg: CLIPConfig = family.config_from_dict({**raw, "text": text})
    torch.manual_seed(request.seed)
    return _Setup(cfg, CLIP(cfg), str(tok.to_str()), family.preprocess(cfg), False)


def train(out: str | Path, request: TrainRequest, progress: bool | None = None) -> Path:
    """Train `request.preset` and save a checkpoint directory at `out`."""
    from mmedge.data import load_data
    from mmedge.runtime.texts import TextTokenizer

    t0 = time.perf_counter()
    family, raw = load_preset(request.preset)
    batch = request.batch_size or DEFAULT_BATCH
    items = None
    if request.data is not None:
        if request.hard_negatives is not None:
            raise ConfigError("hard negatives are edits of synthetic scenes; they do not apply to --data")
        items = load_data(request.data, image_size=raw["vision"]["image_size"])
        if any(it.text is None for it in items):
            raise InvalidInputError(
                f"CLIP trains on captioned images; {request.data!r} has images without text"
            )
        if len(items) < 2:
            raise InvalidInputError("CLIP's contrastive loss needs at least 2 captioned images")
        batch = min(batch, len(items))
    hard = DEFAULT_HARD_NEGATIVES if request.hard_negatives is None else request.hard_negatives
    if items is None and not 0 <= hard < batch:
        raise ConfigError(f"hard_negatives must be in [0, batch_size), got {hard}")
    setup = _setup(request, [it.text for it in items] if items is not None else None)
    cfg = setup.cfg
    tokenizer = TextTokenizer.from_json(
        setup.tokenizer_json, context_length=cfg.text.context_length, pad_id=cfg.text.pad_token_id
    )
    if items is None:
        batches = _synthetic_batches(tokenizer, setup.preprocess, batch, hard, request.seed, SHORT_TEXTS)
    else:
        batches = _data_batches(items, tokenizer, setup.preprocess, batch, request.seed)
    tc = train_config(request, DEFAULT_STEPS, DEFAULT_LR)
    losses = run_training(setup.model, batches, _loss, tc, progress=progress, desc=f"train {request.preset}")
    info = {
        "train": {
            "preset": request.preset,
            "data": request.data or "synthetic scenes",
            "init": request.init,
            "steps": len(losses),
            "batch_size": batch,
            "hard_negatives": hard if items is None else 0,
            "bf16": request.bf16 and amx_bf16_fast(),
            **loss_record(losses, t0),
        }
    }
    log.info("trained %d steps, final loss %.3f", len(losses), info["train"]["final_loss"])
    preprocess = to_json(setup.preprocess) if setup.keep_preprocess else None
    return save_checkpoint(
        out, family.name, cfg.to_dict(), setup.model, setup.tokenizer_json, extra=info, preprocess=preprocess
    )
