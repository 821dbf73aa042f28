"""Train `llava-tiny` on synthetic scenes in LLaVA's two stages, on a frozen mmedge CLIP vision tower.

Every conversation is cut from the model's own chat template (`_Conversations`), so training feeds
exactly the token ids the chat pipeline will: `[BOS] USER: <image>\\n q ASSISTANT: a EOS USER: q ...`,
the image placeholder expanded to one position per patch token. Only answers (and their EOS) are
targets.

0. The LM (Llama-style decoder), which is not pretrained here, learns the conversations with a
   freshly phrased caption of the scene written where the image will go: question turns about the
   scene (count, shape, colour, position: `data.questions_for`) and caption turns.
1. Stage 1 (feature alignment): the projector alone learns to caption (the caption prompt, answered
   by a caption), tower and LM frozen.
2. Stage 2 (visual instruction tuning): projector and LM learn multi-turn question conversations
   about the image, and some caption turns.

By default the tower is frozen throughout, so a pool of scenes is rendered and encoded once
(`stages.render_pool`, `stages.encode_pixels`); stages 1 and 2 draw scenes from it with fresh
captions and questions. Steps are fixed counts (measurements: benchmarks/RESULTS.md; design:
docs/demo.md).

Stage 2 is long (3800 steps) because the LM learns to find an object by what it is ("what colour
is the star?") late: at 1600 steps colour and position questions were still answered with another
object's attribute. Three settings, off by default, were tried against that binding failure at
1600 steps and did not move it (docs/demo.md):
`tower_lr_scale` tunes the tower in stage 2 (each batch's cached pixels encoded anew; the tuned
tower is what the checkpoint saves), `kind_weights` asks some question kinds more often, and
`probe_weight` adds a training-only loss (`_PatchProbe`, not saved) asking every image token to
carry the (shape, colour) pairs of the objects on its patch.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from mmedge.data.scenes import COLOURS, SHAPES, TRAIN_SEED, position_pixel
from mmedge.data.tokenizer_train import train_tokenizer
from mmedge.errors import ConfigError
from mmedge.models.checkpoint import save_checkpoint
from mmedge.models.llava.modeling import Llava, LlavaConfig
from mmedge.models.registry import load_preset
from mmedge.recipes.base import TrainRequest
from mmedge.recipes.stages import IGNORE, Stages, clip_vision, encode_pixels, lm_loss, render_pool
from mmedge.recipes.trainer import amx_bf16_fast
from mmedge.runtime.prompts import Item
from mmedge.runtime.sections import ChatTemplate

VOCAB = 320  # BPE merges over the synthetic texts; "<image>" is added after


@dataclass(frozen=True)
class LlavaTrainSettings:
    clip_checkpoint: str  # a trained clip-tiny: its vision tower becomes the frozen image encoder
    preset: str = "llava-tiny"
    batch_size: int = 32
    lm_steps: int = 600
    stage1_steps: int = 150
    stage2_steps: int = 3800
    lr: float = 1e-3
    stage2_lr: float = 1e-3
    turns: int = 3  # question turns per conversation: more answers per (long) image prefix
    caption_fraction: float = 0.15  # of the conversations in stages 0 and 2; the rest ask questions
    pool: int = 8192  # scenes rendered and encoded once for stages 1 and 2
    # Stage 2 also tunes the vision tower at this fraction of stage2_lr (0: the tower stays frozen).
    tower_lr_scale: float = 0.0
    # Weight of the patch-probe loss (`_PatchProbe`) in stages 1 and 2 (0: the LM loss alone).
    probe_weight: float = 0.0
    # Odds of asking each question kind, relative to 1 (default: every question of a scene alike).
    kind_weights: dict[str, float] | None = None
    seed: int = 0
    threads: int = 0
    bf16: bool = True  # autocast where the CPU has AMX (`trainer.amx_bf16_fast`)


Turns = Sequence[tuple[str, str]]  # (user text, assistant text)


class _Conversations:
    """Token rows of conversations about one image, in the chat template's own tokens.

    A turn's ids are what the template renders: the first user turn with the image and the
    generation prompt (as `ChatPipeline` asks), a later user turn the same without BOS, an answer
    the tokens the template adds for the assistant's message. The template must render a
    conversation as the concatenation of its turns (checked per answer)."""

    def __init__(self, section: ChatTemplate, tokenizer_json: str, bos: int):
        from tokenizers import Tokenizer

        from mmedge.runtime.chat_template import TemplateChat
        from mmedge.runtime.texts import TextTokenizer

        self.chat = TemplateChat(section, TextTokenizer.from_json(tokenizer_json, context_length=4096))
        self.bos = bos
        self._plain = Tokenizer.from_str(tokenizer_json)
        self.question = lru_cache(maxsize=4096)(self._question)
        self.answer = lru_cache(maxsize=4096)(self._answer)

    def plain(self, text: str) -> list[int]:
        """Ids of text as it reads inside a conversation (no specials)."""
        ids: list[int] = self._plain.encode(text, add_special_tokens=False).ids
        return ids

    def _user(self, text: str, image: bool) -> list[dict]:
        parts = [{"type": "image"}] if image else []
        return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]

    def _question(self, text: str, first: bool) -> tuple[Item, ...]:
        items = self.chat.encode(self._user(text, first), int(first))
        if not first:
            if items[:1] != [self.bos]:
                raise ConfigError("the chat template's conversations do not start with BOS")
            items = items[1:]
        return tuple(items)

    def _answer(self, text: str) -> tuple[int, ...]:
        asked = self.question("?", True)
        reply = [{"role": "assistant", "content": [{"type": "text", "text": text}]}]
        full = self.chat.encode([*self._user("?", True), *reply], 1, add_generation_prompt=False)
        if tuple(full[: len(asked)]) != asked:
            raise ConfigError("the chat template does not render an answer after the generation prompt")
        return tuple(i for i in full[len(asked) :] if i is not None)

    def row(self, turns: Turns, image: Sequence[int], cached: bool = True) -> tuple[list[int], list[int]]:
        """(ids, labels) of a conversation; `image` is what fills the image placeholder (the
        placeholder's id once per image token, or a scene text's ids)."""
        ids: list[int] = []
        labels: list[int] = []
        for k, (question, answer) in enumerate(turns):
            for item in self.question(question, k == 0):
                ids += [*image] if item is None else [item]
            target = self.answer(answer) if cached else self._answer(answer)
            labels += [IGNORE] * (len(ids) - len(labels)) + list(target)
            ids += target
        return ids, labels


def _batch(rows: list[tuple[list[int], list[int]]], pad: int) -> tuple[torch.Tensor, ...]:
    """ids, attention mask, labels (B, L), right-padded."""
    width = max(len(ids) for ids, _ in rows)
    ids_t = torch.full((len(rows), width), pad, dtype=torch.long)
    lab_t = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    mask = torch.zeros((len(rows), width), dtype=torch.long)
    for i, (ids, labels) in enumerate(rows):
        ids_t[i, : len(ids)] = torch.tensor(ids)
        lab_t[i, : len(labels)] = torch.tensor(labels)
        mask[i, : len(ids)] = 1
    return ids_t, mask, lab_t


PAIRS = [(shape, colour) for shape in SHAPES for colour in COLOURS]


def _patch_pairs(objs: tuple, image_size: int, patch: int) -> np.ndarray:
    """(patches, len(PAIRS)) multi-hot: the (shape, colour) of each object overlapping a patch. An
    object sits where four patches meet; a small one's half side (7 px at 64) reaches into all four."""
    grid = image_size // patch
    out = np.zeros((grid, grid, len(PAIRS)), np.float32)
    for o in objs:
        x, y = position_pixel(o.position, image_size)
        rows = [r for r in range(grid) if r * patch < y + patch / 2 and (r + 1) * patch > y - patch / 2]
        cols = [c for c in range(grid) if c * patch < x + patch / 2 and (c + 1) * patch > x - patch / 2]
        for r in rows:
            out[r, cols, PAIRS.index((o.shape, o.colour))] = 1.0
    return out.reshape(grid * grid, len(PAIRS))


class _PatchProbe(nn.Module):
    """Training only (not saved): a linear read-out of the (shape, colour) pairs at each projected
    image token. Its loss asks every image token to carry its own object's bound attributes, the key
    a question's "the circle" / "the red circle" must find among the image tokens."""

    def __init__(self, model: Llava):
        super().__init__()
        self.model = model
        self.head = nn.Linear(model.cfg.text.embed_dim, len(PAIRS))


def _image_loss(
    model: Llava,
    batch: tuple[torch.Tensor, ...],
    image_id: int,
    pixels: bool = False,
    probe: nn.Module | None = None,
    probe_weight: float = 0.0,
) -> torch.Tensor:
    """The LM's loss with the projected image features at the placeholder positions (HF LLaVA's
    `masked_scatter`: each row holds exactly one image's worth of placeholders). The batch holds the
    tower's features, or with `pixels` the pixel values the tower encodes; with a `probe`, also each
    image token's (shape, colour) pairs, whose loss (summed over pairs) is added at `probe_weight`."""
    feats, ids, mask, labels, *pairs = batch
    if pixels:
        feats = model.image_features(feats)
    lm = model.language_model
    embeds = lm.embed_tokens(ids)
    prefix = model.multi_modal_projector(feats).to(embeds.dtype)
    embeds = embeds.masked_scatter((ids == image_id)[..., None], prefix)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    loss = lm_loss(lm.step(embeds, mask, positions)[0], labels)
    if probe is not None:
        logits = probe(prefix.float())
        bce = F.binary_cross_entropy_with_logits(logits, pairs[0], reduction="none")
        loss = loss + probe_weight * bce.sum(-1).mean()
    return loss


def _tokenizer(
    corpus: list[str], image_token: str, section_of: Callable[[str], ChatTemplate], conversations: list[Turns]
) -> str:
    """The BPE tokenizer, trained on the synthetic texts and on conversations as the chat template
    (`section_of(tokenizer JSON)`) renders them, so it learns the template's own words; plus the
    image placeholder as a special token."""
    from tokenizers import AddedToken

    from mmedge.runtime.chat_template import TemplateChat
    from mmedge.runtime.texts import TextTokenizer

    def build(texts: list[str]) -> str:
        tok = train_tokenizer(texts, vocab_size=VOCAB, generation=True)
        tok.add_special_tokens([AddedToken(image_token, special=True, normalized=False)])
        return str(tok.to_str())

    first_json = build(corpus)
    first = TemplateChat(section_of(first_json), TextTokenizer.from_json(first_json, context_length=4096))
    rendered = []
    for turns in conversations:
        messages: list[dict] = []
        for k, (question, answer) in enumerate(turns):
            image = [{"type": "image"}] if k == 0 else []
            messages.append({"role": "user", "content": [*image, {"type": "text", "text": question}]})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        rendered.append("".join(text for text, _ in first.render(messages, add_generation_prompt=False)))
    return build(corpus + rendered)


def train_llava(out: str | Path, settings: LlavaTrainSettings, progress: bool | None = None) -> Path:
    """Train llava-tiny (LM, stage 1, stage 2) on the frozen vision tower of `settings.clip_checkpoint`."""
    from tokenizers import Tokenizer

    from mmedge.data import caption_for, questions_for, sample_objects
    from mmedge.models.sources import load_source

    t0 = time.perf_counter()
    clip = load_source(settings.clip_checkpoint, family="clip")
    family, raw = load_preset(settings.preset)
    if family.name != "llava":
        raise ConfigError(f"preset {settings.preset!r} is a {family.name!r} model; this recipe trains llava")
    rng = np.random.default_rng(np.random.SeedSequence(entropy=TRAIN_SEED, spawn_key=(settings.seed, 3)))

    raw = {**raw, "vision": {**raw["vision"], **clip_vision(clip)}}

    def config(vocab: int) -> LlavaConfig:
        cfg: LlavaConfig = family.config_from_dict({**raw, "text": {**raw["text"], "vocab_size": vocab}})
        return cfg

    def section_of(cfg: LlavaConfig, model: Llava, tokenizer_json: str) -> ChatTemplate:
        section = family.sections(cfg, model, tokenizer_json).chat_template
        assert section is not None  # llava 1.5 always renders with its template
        return section

    probe = config(VOCAB + 1)  # the settings that do not depend on the tokenizer

    def conversation(objs: tuple, caption: bool) -> list[tuple[str, str]]:
        if caption:
            return [(probe.caption_prompt, caption_for(objs, rng))]
        qa = questions_for(objs)
        odds = None
        if settings.kind_weights:
            w = np.array([settings.kind_weights.get(x.kind, 1.0) for x in qa])
            odds = w / w.sum()
        picks = rng.choice(len(qa), size=min(settings.turns, len(qa)), replace=False, p=odds)
        return [(qa[i].question, qa[i].answer) for i in picks]

    samples = [sample_objects(rng) for _ in range(2000)]
    texts = [caption_for(o, rng) for o in samples] + [probe.caption_prompt]
    texts += [f"{qa.question} {qa.answer}" for o in samples for qa in questions_for(o)]
    tokenizer_json = _tokenizer(
        texts,
        probe.image_token,
        lambda tj: section_of(probe, Llava(probe), tj),
        [conversation(o, caption=i % 2 == 0) for i, o in enumerate(samples[:500])],
    )
    cfg = config(Tokenizer.from_str(tokenizer_json).get_vocab_size())
    torch.manual_seed(settings.seed)
    model = Llava(cfg)
    model.vision_tower.load_state_dict(clip.model.vision_model.state_dict())
    model.vision_tower.requires_grad_(False)
    convs = _Conversations(section_of(cfg, model, tokenizer_json), tokenizer_json, cfg.text.bos_token_id)
    image_id = convs.chat.image_id
    pad, b = cfg.text.pad_token_id, settings.batch_size
    stages = Stages(settings.preset, settings.seed, settings.threads, settings.bf16, progress)

    def drawn(objs: tuple) -> tuple[list[tuple[str, str]], bool]:
        caption = bool(rng.random() < settings.caption_fraction)
        return conversation(objs, caption), caption

    # 0. the LM alone, a caption of the scene where the image goes
    def lm_batches() -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            rows = []
            for _ in range(b):
                objs = sample_objects(rng)
                turns, caption = drawn(objs)
                scene = convs.plain(caption_for(objs, rng))
                rows.append(convs.row(turns, scene, cached=not caption))
            yield _batch(rows, pad)

    stages.run(
        "lm",
        model.language_model,
        lm_batches(),
        lambda lm, batch: lm_loss(lm(batch[0], batch[1]), batch[2]),
        settings.lm_steps,
        settings.lr,
    )

    pool = [sample_objects(rng) for _ in range(settings.pool)]
    pixels = render_pool(pool, family.preprocess(cfg), rng)
    feats = encode_pixels(model.image_features, pixels)
    tune_tower = settings.tower_lr_scale > 0
    stages.info["pool"] = {"scenes": len(pool), "seconds": round(time.perf_counter() - t0, 1)}
    placeholder = [image_id] * cfg.image_tokens
    probed = settings.probe_weight > 0
    if probed and cfg.select_strategy != "default":
        raise ConfigError("the patch probe reads patch tokens only (select_strategy 'default')")
    pairs = (
        torch.from_numpy(
            np.stack([_patch_pairs(o, cfg.vision.image_size, cfg.vision.patch_size) for o in pool])
        )
        if probed
        else None
    )
    trained: nn.Module = _PatchProbe(model) if probed else model

    def loss_of(m: nn.Module, batch: tuple[torch.Tensor, ...], pixels: bool) -> torch.Tensor:
        if isinstance(m, _PatchProbe):
            return _image_loss(m.model, batch, image_id, pixels, m.head, settings.probe_weight)
        assert isinstance(m, Llava)
        return _image_loss(m, batch, image_id, pixels)

    def image_batches(caption_only: bool, images: torch.Tensor) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            idx = rng.integers(len(pool), size=b)
            rows = []
            for i in idx:
                turns, caption = (conversation(pool[i], True), True) if caption_only else drawn(pool[i])
                rows.append(convs.row(turns, placeholder, cached=not caption))
            yield (images[idx], *_batch(rows, pad), *(() if pairs is None else (pairs[idx],)))

    # 1. the projector alone learns to caption; tower and LM frozen
    model.language_model.requires_grad_(False)
    stages.run(
        "stage1",
        trained,
        image_batches(caption_only=True, images=feats),
        lambda m, batch: loss_of(m, batch, False),
        settings.stage1_steps,
        settings.lr,
    )
    # 2. projector and LM (and the tower, when tuned) on conversations about the image
    model.language_model.requires_grad_(True)
    model.vision_tower.requires_grad_(tune_tower)
    images = pixels if tune_tower else feats  # a tuned tower encodes each batch's pixels anew
    del pixels, feats
    tower = "model.vision_tower." if probed else "vision_tower."
    stages.run(
        "stage2",
        trained,
        image_batches(caption_only=False, images=images),
        lambda m, batch: loss_of(m, batch, tune_tower),
        settings.stage2_steps,
        settings.stage2_lr,
        lr_scales=((tower, settings.tower_lr_scale),) if tune_tower else (),
    )
    info = stages.info
    info["seconds"] = round(time.perf_counter() - t0, 1)
    info["clip_checkpoint"] = str(settings.clip_checkpoint)
    info["bf16"] = settings.bf16 and amx_bf16_fast()
    return save_checkpoint(
        out, family.name, cfg.to_dict(), model.eval(), tokenizer_json, extra={"train": info}
    )


def train(out: str | Path, request: TrainRequest, progress: bool | None = None) -> Path:
    """`mmedge train` for LLaVA presets: the staged recipe on synthetic scenes, on the frozen vision
    tower of a CLIP checkpoint (`--init`, e.g. the demo's $MMEDGE_HOME/checkpoints/clip-tiny)."""
    from mmedge.models.checkpoint import read_checkpoint_meta

    if not request.init or read_checkpoint_meta(request.init).get("family") != "clip":
        raise ConfigError(
            "LLaVA trains on a CLIP vision tower: pass --init CLIP_CHECKPOINT (an mmedge clip "
            "checkpoint, e.g. the demo's $MMEDGE_HOME/checkpoints/clip-tiny)"
        )
    if request.data is not None:
        raise ConfigError("the LLaVA recipe trains on synthetic scenes; it takes no --data")
    steps = (
        {}
        if request.steps is None
        else dict.fromkeys(("lm_steps", "stage1_steps", "stage2_steps"), request.steps)
    )
    settings = LlavaTrainSettings(
        clip_checkpoint=str(request.init),
        preset=request.preset,
        seed=request.seed,
        threads=request.threads,
        bf16=request.bf16,
        **({"batch_size": request.batch_size} if request.batch_size else {}),
        **({"lr": request.lr, "stage2_lr": request.lr} if request.lr else {}),
        **steps,
    )
    return train_llava(out, settings, progress=progress)
