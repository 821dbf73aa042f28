"""Train `blip2-tiny` on synthetic scenes, in BLIP-2's two stages, on a frozen mmedge CLIP vision tower.

0. The LM (OPT-style decoder) learns the synthetic captions and "Question: q Answer: a" texts,
   each after the scene's slot text (`data.scene_slots`: one fixed slot per fact, 20 words) placed
   before BOS, then is frozen. Stage 2 puts the image prefix, 20 queries, in that place. A fixed
   slot per fact is what a 2-layer LM can read from a soft prefix; with free-form captions there it
   mixed up which shape sat where. What the LM does not learn is binding: given the slot text it
   answers count and shape questions, but colour questions ("what colour is the circle?") name
   another object's colour, whatever the slot layout, depth or LM style.
1. Stage 1 (Q-Former, frozen image encoder), three losses as in the BLIP-2 paper, each with its
   own attention mask over [queries | text]:
   - ITC: queries and text attend only to themselves; the best-matching query's similarity to
     the text's first token, contrasted over the batch.
   - ITM: all attend to all; a linear head on the query outputs tells matched pairs from hard
     negatives mined from the ITC similarities. It runs on `itm_pairs` of each batch's pairs (three
     Q-Former passes per pair): on the full batch it made a step 4x as costly as ITG alone, and ITG
     is what teaches the queries to hold every object's attributes.
   - ITG: queries attend to queries; text attends to all queries and earlier text; the text is
     generated (next-token loss through a head tied to the Q-Former's word embeddings).
2. Stage 2: the query outputs, projected, are the LM's input prefix; the Q-Former and projector
   learn with the frozen LM's loss on captions (no prompt) and answers (after the template), plus
   (our addition, `slot_weight`) a slot loss that makes projected query i look like the LM's
   input embedding of slot i's token (`_stage2_loss`): the slots are ground truth the synthetic
   data has, and with the slot loss far more queries land nearest to their slot's token on
   held-out scenes than with the LM loss alone.

Steps are fixed counts by default; the `*_budget_s` settings cap a stage by time instead (design
and recipe history: docs/demo.md; measurements: benchmarks/RESULTS.md).
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmedge.data.scenes import EMPTY_SLOT, TRAIN_SEED
from mmedge.data.tokenizer_train import BOS_ID, EOS_ID, PAD_ID, train_tokenizer
from mmedge.errors import ConfigError
from mmedge.models.blip2.modeling import Blip2, Blip2Config
from mmedge.models.blocks import MASK_VALUE
from mmedge.models.checkpoint import save_checkpoint
from mmedge.models.registry import load_preset
from mmedge.recipes.base import TrainRequest
from mmedge.recipes.stages import IGNORE, Stages, clip_vision, encode_pool, lm_loss
from mmedge.recipes.trainer import amx_bf16_fast

SLOT_TEMPERATURE = 0.1  # of the slot loss's cosine cross-entropy
EMPTY_SLOT_WEIGHT = 0.25  # of an empty slot's term in it


@dataclass(frozen=True)
class Blip2TrainSettings:
    clip_checkpoint: str  # a trained clip-tiny: its vision tower becomes the frozen image encoder
    preset: str = "blip2-tiny"
    batch_size: int = 64
    lm_batch_size: int = 32  # the LM's steps are cheap and it learns from their number more than their size
    lm_steps: int = 600
    stage1_steps: int = 300
    stage2_steps: int = 1500
    lm_budget_s: float | None = None
    stage1_budget_s: float | None = None
    stage2_budget_s: float | None = None
    lr: float = 1e-3
    stage2_lr: float = 2e-3
    caption_fraction: float = 0.2  # stage 2: the rest are questions
    itm_pairs: int = 16  # stage 1: matched pairs per batch that also get ITM (with 2 negatives each)
    slot_weight: float = (
        1.0  # stage 2: weight of the slot loss (`_stage2_loss`) beside the LM loss; 0: LM loss only
    )
    pool: int = 8192  # scenes rendered and encoded once for stages 1 and 2
    seed: int = 0
    threads: int = 0
    bf16: bool = True  # autocast where the CPU has AMX (`trainer.amx_bf16_fast`): faster steps


QUESTIONS_PER_SAMPLE = 3  # answers supervised per image: more signal per (costly) image


def _segments(objs: tuple, rng: np.random.Generator, question: bool) -> list[tuple[str, str]]:
    """A caption sample [("", caption)] or a question sample [("Question: q Answer:", " a"), ...]."""
    from mmedge.data import caption_for, questions_for

    if not question:
        return [("", caption_for(objs, rng))]
    qa = questions_for(objs)
    picks = rng.choice(len(qa), size=min(QUESTIONS_PER_SAMPLE, len(qa)), replace=False)
    return [(f"Question: {qa[i].question} Answer:", " " + qa[i].answer) for i in picks]


def _texts(rng: np.random.Generator, n: int) -> Iterator[tuple[tuple, list[tuple[str, str]]]]:
    """(objects, segments) for n fresh scenes: a caption sample, then a question sample, per scene."""
    from mmedge.data import sample_objects

    for _ in range(n):
        objs = sample_objects(rng)
        yield objs, _segments(objs, rng, question=False)
        yield objs, _segments(objs, rng, question=True)


def _encode(
    tok,
    samples: list[list[tuple[str, str]]],
    context: int,
    scene_texts: list[str] | None = None,
    specials: tuple[int | None, int, int] = (BOS_ID, EOS_ID, PAD_ID),
) -> tuple[torch.Tensor, ...]:
    """ids (B, L), attention mask, labels (each target and its EOS only); right-padded.

    Rows are `[scene text] BOS (prompt target EOS)+`. The LM learns with a caption as the scene
    text; in stage 2 the image prefix takes its place, before BOS, as in HF's BLIP-2 inputs.
    `specials` = (BOS or None for a model whose prompts start without one, EOS, pad) ids.
    """
    bos, eos, pad = specials
    rows, labels = [], []
    for i, segments in enumerate(samples):
        scene = tok.encode(scene_texts[i], add_special_tokens=False).ids if scene_texts else []
        start = [] if bos is None else [bos]
        ids, lab = [*scene, *start], [IGNORE] * (len(scene) + len(start))
        for prompt, target in segments:
            head = tok.encode(prompt, add_special_tokens=False).ids if prompt else []
            tail = [*tok.encode(target if prompt else target.strip(), add_special_tokens=False).ids, eos]
            ids += head + tail
            lab += [IGNORE] * len(head) + tail
        rows.append(ids[:context])
        labels.append(lab[:context])
    width = max(map(len, rows))
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    lab_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    for i, (r, lb) in enumerate(zip(rows, labels)):
        ids_t[i, : len(r)] = torch.tensor(r)
        lab_t[i, : len(lb)] = torch.tensor(lb)
    mask = torch.zeros_like(ids_t)
    for i, r in enumerate(rows):
        mask[i, : len(r)] = 1
    return ids_t, mask, lab_t


class _Stage1Heads(nn.Module):
    """BLIP-2 stage-1 heads around the model: projections for ITC, ITM classifier, learned temperature."""

    def __init__(self, model: Blip2, dim: int = 64):
        super().__init__()
        h = model.cfg.qformer.hidden
        self.model = model
        self.vision_proj, self.text_proj = nn.Linear(h, dim), nn.Linear(h, dim)
        self.itm_head = nn.Linear(h, 2)
        self.temp = nn.Parameter(torch.tensor(0.07))


def _masks(queries: int, text_mask: torch.Tensor) -> dict[str, torch.Tensor]:
    """Additive attention biases (B, 1, Q+T, Q+T) for ITC, ITM and ITG."""
    b, t = text_mask.shape
    n = queries + t
    allowed_keys = torch.cat([torch.ones(b, queries, dtype=torch.bool), text_mask.bool()], 1)[
        :, None, :
    ]  # (B,1,N)
    is_q = torch.arange(n) < queries
    uni = (is_q[:, None] == is_q[None, :])[None]  # queries <-> queries, text <-> text
    causal_text = (
        torch.ones(n, n, dtype=torch.bool).tril() | is_q[None, :]
    )  # text sees all queries, earlier text
    gen = torch.where(is_q[:, None], is_q[None, :], causal_text)[None]

    def bias(allowed: torch.Tensor) -> torch.Tensor:
        return torch.where(allowed & allowed_keys, 0.0, MASK_VALUE)[:, None]

    return {
        "itc": bias(uni.expand(b, -1, -1)),
        "itm": bias(allowed_keys.expand(b, n, n)),
        "itg": bias(gen.expand(b, -1, -1)),
    }


def _stage1_loss(
    heads: _Stage1Heads, batch: tuple[torch.Tensor, ...], itm_pairs: int | None = None
) -> torch.Tensor:
    feats, ids, mask = batch
    m = heads.model
    qf = m.qformer
    b, q = feats.shape[0], m.cfg.qformer.num_query_tokens
    queries = m.query_tokens.expand(b, -1, -1)
    text = m.qformer_text(ids)
    masks = _masks(q, mask)
    # ITC
    out = qf(queries, feats, text, masks["itc"])
    zi = F.normalize(heads.vision_proj(out[:, :q]), dim=-1)  # (B, Q, D)
    zt = F.normalize(heads.text_proj(out[:, q]), dim=-1)  # (B, D), first text token
    temp = heads.temp.clamp(0.01, 0.5)
    sim = torch.einsum("iqd,jd->ijq", zi, zt).max(-1).values / temp  # (B images, B texts)
    labels = torch.arange(b)
    itc = (F.cross_entropy(sim, labels) + F.cross_entropy(sim.t(), labels)) / 2
    # ITM on the first `itm_pairs` pairs, hard negatives drawn in proportion to ITC similarity
    n = b if itm_pairs is None else min(itm_pairs, b)
    with torch.no_grad():
        weights = F.softmax(sim.float(), dim=1).fill_diagonal_(0)[:n] + 1e-6
        neg_text = torch.multinomial(weights, 1).squeeze(1)
        neg_img = torch.multinomial(
            F.softmax(sim.t().float(), dim=1).fill_diagonal_(0)[:n] + 1e-6, 1
        ).squeeze(1)
    f3 = torch.cat([feats[:n], feats[:n], feats[neg_img]])
    t3, m3 = torch.cat([text[:n], text[neg_text], text[:n]]), torch.cat([mask[:n], mask[neg_text], mask[:n]])
    out = qf(m.query_tokens.expand(3 * n, -1, -1), f3, t3, _masks(q, m3)["itm"])
    itm_logits = heads.itm_head(out[:, :q]).mean(1)
    itm = F.cross_entropy(itm_logits, torch.cat([torch.ones(n), torch.zeros(2 * n)]).long())
    # ITG
    out = qf(queries, feats, text, masks["itg"])
    logits = out[:, q:] @ m.qformer_text.word_embeddings.weight.t()
    itg = lm_loss(logits, ids.masked_fill(mask == 0, IGNORE))
    return itc + itm + itg


def _stage2_loss(
    model: Blip2, batch: tuple[torch.Tensor, ...], slot_weight: float = 0.0, empty_id: int = -1
) -> torch.Tensor:
    """`_prefix_loss` of the query outputs of image features (stage 2, fine-tuning)."""
    feats, ids, mask, labels, slot_ids = batch
    return _prefix_loss(model, model.query_outputs(feats), ids, mask, labels, slot_ids, slot_weight, empty_id)


def _prefix_loss(
    model: Blip2,
    queries: torch.Tensor,
    ids: torch.Tensor,
    mask: torch.Tensor,
    labels: torch.Tensor,
    slot_ids: torch.Tensor | None = None,
    slot_weight: float = 0.0,
    empty_id: int = -1,
) -> torch.Tensor:
    """The frozen LM's loss after the projected queries; with `slot_weight`, plus the slot loss:
    projected query i should look like the LM's input embedding of slot i's token, in direction
    (cross-entropy over cosine similarities to every token's embedding) and in size (squared log of
    the norm ratio). A plain dot-product cross-entropy grew the prefix to 75x the embeddings' norm,
    which drowned the LM's position embeddings: the LM then mixed up which slot held which shape.
    Empty slots (token `empty_id`) are most slots and the easiest; they weigh EMPTY_SLOT_WEIGHT."""
    prefix = model.language_projection(queries)  # (B, Q, E)
    lm = model.language_model
    embeds = torch.cat([prefix, lm.embed_tokens(ids)], 1)
    full_mask = torch.cat([torch.ones(prefix.shape[:2], dtype=mask.dtype), mask], 1)
    positions = (full_mask.cumsum(1) - 1).clamp(min=0)
    logits = lm.step(embeds, full_mask, positions)[0]
    full_labels = torch.cat([torch.full(prefix.shape[:2], IGNORE, dtype=labels.dtype), labels], 1)
    loss = lm_loss(logits, full_labels)
    if slot_weight and slot_ids is not None:
        table = lm.embed_tokens.weight  # (V, E)
        cosine = F.normalize(prefix, dim=-1) @ F.normalize(table, dim=-1).t()  # (B, Q, V)
        per_slot = F.cross_entropy(
            (cosine / SLOT_TEMPERATURE).flatten(0, 1), slot_ids.flatten(), reduction="none"
        )
        weights = torch.where(slot_ids.flatten() == empty_id, EMPTY_SLOT_WEIGHT, 1.0)
        direction = (per_slot * weights).sum() / weights.sum()
        size = (prefix.norm(dim=-1) / table[slot_ids].norm(dim=-1)).log().square().mean()
        loss = loss + slot_weight * (direction + size)
    return loss


def train_blip2(out: str | Path, settings: Blip2TrainSettings, progress: bool | None = None) -> Path:
    """Train blip2-tiny (LM, stage 1, stage 2) on the frozen vision tower of `settings.clip_checkpoint`."""
    from mmedge.data import caption_for, sample_objects, scene_slots
    from mmedge.models.sources import load_source

    t0 = time.perf_counter()
    clip = load_source(settings.clip_checkpoint, family="clip")
    family, raw = load_preset(settings.preset)
    rng = np.random.default_rng(np.random.SeedSequence(entropy=TRAIN_SEED, spawn_key=(settings.seed, 2)))
    corpus = [p + t for _, segments in _texts(rng, 3000) for p, t in segments]
    corpus += [scene_slots(sample_objects(rng)) for _ in range(3000)]
    tok = train_tokenizer(corpus, vocab_size=320, generation=True)
    vision = clip_vision(clip)
    raw = {
        **raw,
        "vision": {**raw["vision"], **vision},
        "qformer": {**raw["qformer"], "vocab_size": tok.get_vocab_size(), "encoder_hidden": vision["width"]},
        "text": {**raw["text"], "vocab_size": tok.get_vocab_size()},
    }
    cfg: Blip2Config = family.config_from_dict(raw)
    torch.manual_seed(settings.seed)
    model = Blip2(cfg)
    model.vision_model.load_state_dict(clip.model.vision_model.state_dict())
    model.vision_model.requires_grad_(False)
    pre = family.preprocess(cfg)
    assert pre is not None  # an image family always has one
    context = cfg.text.max_context - cfg.qformer.num_query_tokens
    b = settings.batch_size
    stages = Stages(settings.preset, settings.seed, settings.threads, settings.bf16, progress)
    info = stages.info

    # 0. the language model alone, then frozen. Its texts are a scene's slot text, then a caption
    # or a question and answer: it learns to read the scene where stage 2 puts the image prefix.
    example = scene_slots(sample_objects(rng))
    if len(tok.encode(example, add_special_tokens=False).ids) != cfg.qformer.num_query_tokens:
        raise ConfigError(
            f"the slot text {example!r} is not {cfg.qformer.num_query_tokens} tokens: "
            "queries and slots would not pair up"
        )

    def lm_batches() -> Iterator[tuple[torch.Tensor, ...]]:
        n = settings.lm_batch_size
        while True:
            pairs = [x for _, x in zip(range(n), _texts(rng, n))]
            yield _encode(tok, [seg for _, seg in pairs], 2 * context, [scene_slots(o) for o, _ in pairs])

    stages.run(
        "lm",
        model.language_model,
        lm_batches(),
        lambda lm, batch: lm_loss(lm(batch[0], batch[1]), batch[2]),
        settings.lm_steps,
        settings.lr,
        settings.lm_budget_s,
    )
    model.language_model.requires_grad_(False)

    # The image encoder is frozen: render and encode a pool of scenes once; batches draw scenes
    # from it with freshly phrased captions and freshly drawn questions.
    pool = [sample_objects(rng) for _ in range(settings.pool)]
    feats = encode_pool(model.image_features, pool, pre, rng)
    slot_ids = torch.tensor([tok.encode(scene_slots(o), add_special_tokens=False).ids for o in pool])
    info["pool"] = {"scenes": len(pool), "seconds": round(time.perf_counter() - t0, 1)}

    # 1. Q-Former on the frozen image encoder: ITC + ITM + ITG on captions
    def s1_batches() -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            idx = rng.integers(len(pool), size=b)
            ids, mask, _ = _encode(
                tok, [[("", caption_for(pool[i], rng))] for i in idx], cfg.qformer.max_text_positions
            )
            yield feats[idx], ids, mask

    heads = _Stage1Heads(model)
    stages.run(
        "stage1",
        heads,
        s1_batches(),
        lambda h, batch: _stage1_loss(h, batch, settings.itm_pairs),
        settings.stage1_steps,
        settings.lr,
        settings.stage1_budget_s,
    )

    # 2. prefix for the frozen LM: captions and answers
    def s2_batches() -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            idx = rng.integers(len(pool), size=b)
            questions = rng.random(b) >= settings.caption_fraction
            ids, mask, labels = _encode(
                tok, [_segments(pool[i], rng, q) for i, q in zip(idx, questions)], context
            )
            yield feats[idx], ids, mask, labels, slot_ids[idx]

    model.qformer_text.requires_grad_(False)  # stage 2 reads queries only
    (empty_id,) = tok.encode(EMPTY_SLOT, add_special_tokens=False).ids  # one token, as checked above
    stages.run(
        "stage2",
        model,
        s2_batches(),
        lambda m, batch: _stage2_loss(m, batch, settings.slot_weight, empty_id),
        settings.stage2_steps,
        settings.stage2_lr,
        settings.stage2_budget_s,
    )
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["clip_checkpoint"] = str(settings.clip_checkpoint)
    info["bf16"] = settings.bf16 and amx_bf16_fast()
    return save_checkpoint(out, family.name, cfg.to_dict(), model.eval(), tok.to_str(), extra={"train": info})


__all__ = ["Blip2TrainSettings", "train", "train_blip2"]


def train(out: str | Path, request: TrainRequest, progress: bool | None = None) -> Path:
    """`mmedge train` for BLIP-2 presets. From a CLIP checkpoint (`--init`): the staged recipe on
    synthetic scenes, on its frozen vision tower. From a BLIP-2 checkpoint or HF directory:
    fine-tuning on `--data`, a JSONL of LLaVA-style conversations (`blip2_finetune`)."""
    from mmedge.models.checkpoint import read_checkpoint_meta
    from mmedge.models.hf_import import hf_family, is_hf_dir

    if not request.init:
        raise ConfigError(
            "BLIP-2 trains on a CLIP vision tower: pass --init CLIP_CHECKPOINT (e.g. the demo's "
            "$MMEDGE_HOME/checkpoints/clip-tiny) to train on synthetic scenes, or --init BLIP2_CHECKPOINT "
            "with --data CONVERSATIONS.jsonl to fine-tune"
        )
    root = Path(request.init)
    family = hf_family(root).name if is_hf_dir(root) else read_checkpoint_meta(root).get("family")
    if family == "blip2":
        from mmedge.recipes.blip2_finetune import finetune

        return finetune(out, request, progress)
    if family != "clip":
        raise ConfigError(
            f"--init {request.init!r} is a {family!r} model; BLIP-2 starts from a clip or blip2 one"
        )
    if request.data is not None:
        raise ConfigError(
            "the staged BLIP-2 recipe trains on synthetic scenes; to train on your data, fine-tune a "
            "BLIP-2 checkpoint: --init BLIP2_CHECKPOINT --data CONVERSATIONS.jsonl"
        )
    steps = (
        {}
        if request.steps is None
        else dict.fromkeys(("lm_steps", "stage1_steps", "stage2_steps"), request.steps)
    )
    settings = Blip2TrainSettings(
        clip_checkpoint=str(root),
        preset=request.preset,
        seed=request.seed,
        threads=request.threads,
        bf16=request.bf16,
        **({"batch_size": request.batch_size} if request.batch_size else {}),
        **({"lr": request.lr} if request.lr else {}),
        **steps,
    )
    return train_blip2(out, settings, progress=progress)
