"""Fine-tune a BLIP-2 model on the user's conversations (LLaVA-style JSONL), as BLIP-2's stage 2.

The image encoder and the LM stay frozen; the Q-Former and the projector learn with the LM's loss
on the answers, each question written with the model's prompt template after the image prefix, as
the chat pipeline will present it. Image features are computed once (the encoder is frozen).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import torch

from mmedge.errors import InvalidInputError
from mmedge.models.checkpoint import save_checkpoint
from mmedge.models.registry import load_preset
from mmedge.recipes.base import TrainRequest, check_init_family, loss_record, train_config
from mmedge.recipes.blip2 import _encode, _stage2_loss
from mmedge.recipes.trainer import amx_bf16_fast
from mmedge.recipes.trainer import train as run_training
from mmedge.runtime.schema import to_json

log = logging.getLogger(__name__)
DEFAULT_STEPS = 300
DEFAULT_BATCH = 16
DEFAULT_LR = 1e-4  # a trained Q-Former: smaller steps than training it from scratch (2e-3)


def finetune(out: str | Path, request: TrainRequest, progress: bool | None = None) -> Path:
    """Fine-tune the BLIP-2 model of `request.init` on the conversations of `request.data`."""
    from tokenizers import Tokenizer

    from mmedge.data import load_conversations
    from mmedge.models.decoder import bos_marker
    from mmedge.models.sources import load_source
    from mmedge.runtime.images import load_image, preprocess

    if request.data is None:
        raise InvalidInputError("fine-tuning BLIP-2 needs --data: a JSONL of LLaVA-style conversations")
    t0 = time.perf_counter()
    family, _ = load_preset(request.preset)
    lm = load_source(request.init or "")
    check_init_family(family, lm.family, request.init or "")
    model, cfg = lm.model, lm.config
    conversations = load_conversations(request.data)
    assert lm.preprocess is not None  # a blip2 model always has one
    for part in model.children():
        part.requires_grad_(False)
    model.qformer.requires_grad_(True)
    model.language_projection.requires_grad_(True)
    model.query_tokens.requires_grad_(True)
    with torch.no_grad():  # the frozen encoder: features once per image
        model.eval()
        feats = torch.cat(
            [
                model.image_features(
                    torch.from_numpy(
                        preprocess([load_image(c.image) for c in conversations[i : i + 32]], lm.preprocess)
                    )
                )
                for i in range(0, len(conversations), 32)
            ]
        )
    tok = Tokenizer.from_str(lm.tokenizer_json)
    text = cfg.text
    bos = text.bos_token_id if bos_marker(lm.tokenizer_json, text.bos_token_id) else None
    context = text.max_context - cfg.qformer.num_query_tokens
    samples = [[(cfg.prompt_template.replace("{}", q), " " + a) for q, a in c.turns] for c in conversations]
    batch = min(request.batch_size or DEFAULT_BATCH, len(conversations))
    rng = np.random.default_rng(request.seed)

    def batches() -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            idx = rng.choice(len(conversations), size=batch, replace=False)
            ids, mask, labels = _encode(
                tok, [samples[i] for i in idx], context, specials=(bos, text.eos_token_id, text.pad_token_id)
            )
            slots = torch.zeros((batch, cfg.qformer.num_query_tokens), dtype=torch.long)  # no slot loss
            yield feats[idx], ids, mask, labels, slots

    tc = train_config(request, DEFAULT_STEPS, DEFAULT_LR)
    losses = run_training(
        model,
        batches(),
        lambda m, b: _stage2_loss(m, b),
        tc,
        progress=progress,
        desc=f"fine-tune {request.preset}",
    )
    info = {
        "train": {
            "preset": request.preset,
            "init": request.init,
            "data": request.data,
            "conversations": len(conversations),
            "steps": len(losses),
            "batch_size": batch,
            "bf16": request.bf16 and amx_bf16_fast(),
            **loss_record(losses, t0),
        }
    }
    log.info(
        "fine-tuned %d steps, loss %.3f -> %.3f",
        len(losses),
        info["train"]["first_loss"],
        info["train"]["final_loss"],
    )
    keep = lm.preprocess != family.preprocess(cfg)
    return save_checkpoint(
        out,
        family.name,
        cfg.to_dict(),
        model.eval(),
        lm.tokenizer_json,
        extra=info,
        preprocess=to_json(lm.preprocess) if keep else None,
    )
