"""The manifest's typed sections: what a package declares about preprocessing, text, the LLM,
prompts, retrieval and how its components are wired (torch-free, no OpenCV).

Writers (export, calibration, builds) construct these dataclasses and readers (the runtime) get
them from `schema.from_json`, so both sides share one definition. Each class checks its own values
on construction; `manifest.Manifest` checks how the sections fit together for a task.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from typing import Literal

from mmedge.errors import ConfigError

CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# Upper bounds of the sizes a manifest sets: each becomes an allocation (an image buffer, a KV
# cache, a batch of token ids), so a hostile manifest must not be able to ask for gigabytes.
MAX_IMAGE_SIZE = 4096  # pixels per side (4096^2 x 3 float32 = 192 MiB)
MAX_CONTEXT = 1 << 17  # tokens: a text encoder's or an LLM's context
MAX_LAYERS = 512
MAX_HEADS = 1024
MAX_HEAD_DIM = 1024
MAX_VOCAB = 1 << 22
MAX_KV_CACHE_BYTES = 16 << 30  # one sequence's float32 KV cache (a 7B model at 4k tokens: 4 GiB)
MAX_IMAGE_TOKENS = 4096
MAX_LOGIT_SCALE = 1000.0  # CLIP clamps its learned scale at 100; far larger ones overflow softmax
_MODES = {"resize": ("shortest", "exact"), "crop": ("center",), "resample": ("pil", "cv2")}


@dataclass(frozen=True)
class PreprocessConfig:
    """Resize / crop / normalise settings of an image input (the manifest's `preprocess` section).

    `resample`: "pil" = PIL bicubic bit for bit (as transformers); "cv2" = OpenCV INTER_AREA when
    shrinking: 3-5x faster on photos, mean 0.3 levels (max ~30) from PIL. Upscaling is exact in both.
    """

    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    resize: str = "shortest"
    crop: str = "center"
    rescale: float = 1 / 255
    resample: str = "pil"

    def __post_init__(self) -> None:
        if (
            isinstance(self.image_size, bool)
            or not isinstance(self.image_size, int)
            or not 1 <= self.image_size <= MAX_IMAGE_SIZE
        ):
            raise ConfigError(f"image_size must be an int in [1, {MAX_IMAGE_SIZE}], got {self.image_size!r}")
        for name in ("mean", "std"):
            value = getattr(self, name)
            ok = isinstance(value, (list, tuple)) and len(value) == 3
            if not ok or not all(
                isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value
            ):
                raise ConfigError(f"{name} must be 3 finite numbers, got {value!r}")
            object.__setattr__(self, name, tuple(float(v) for v in value))
        if min(self.std) <= 0:
            raise ConfigError(f"std must be positive, got {self.std}")
        for name, accepted in _MODES.items():
            if getattr(self, name) not in accepted:
                raise ConfigError(f"{name}={getattr(self, name)!r} is not supported; accepted: {accepted}")
        if not (isinstance(self.rescale, (int, float)) and math.isfinite(self.rescale) and self.rescale > 0):
            raise ConfigError(f"rescale must be a positive finite number, got {self.rescale!r}")


@dataclass(frozen=True)
class TokenizerConfig:
    """The package's `tokenizer.json` and how texts are encoded with it."""

    file: str
    context_length: int  # longest encoded text, in tokens (specials included)
    pad_id: int

    def __post_init__(self) -> None:
        if not 1 <= self.context_length <= MAX_CONTEXT or not 0 <= self.pad_id < MAX_VOCAB:
            raise ConfigError(
                f"tokenizer context_length must be in [1, {MAX_CONTEXT}] and pad_id in [0, {MAX_VOCAB}), got {self}"
            )


@dataclass(frozen=True)
class LLMConfig:
    """The cached decoder step's contract (docs/generation.md): cache geometry and special tokens.

    `rope_theta` is the rotary base the step applies to queries and keys, or None when positions
    are learned embeddings: what a build that replaces the attention by a fused kernel must reproduce.
    """

    max_context: int  # KV cache slots
    layers: int
    kv_heads: int
    head_dim: int
    vocab_size: int
    bos_token_id: int
    eos_token_id: int
    pad_token_id: int
    rope_theta: float | None = None

    def __post_init__(self) -> None:
        bounds = {
            "max_context": MAX_CONTEXT,
            "layers": MAX_LAYERS,
            "kv_heads": MAX_HEADS,
            "head_dim": MAX_HEAD_DIM,
            "vocab_size": MAX_VOCAB,
        }
        for name, most in bounds.items():
            if not 1 <= getattr(self, name) <= most:
                raise ConfigError(f"llm {name} must be in [1, {most}], got {getattr(self, name)}")
        cache = 2 * self.layers * self.kv_heads * self.max_context * self.head_dim * 4
        if cache > MAX_KV_CACHE_BYTES:
            raise ConfigError(
                f"llm KV cache of {cache / 2**30:.1f} GiB per sequence exceeds {MAX_KV_CACHE_BYTES >> 30} GiB"
            )
        for name in ("bos_token_id", "eos_token_id", "pad_token_id"):
            if not 0 <= getattr(self, name) < self.vocab_size:
                raise ConfigError(
                    f"llm {name} {getattr(self, name)} is outside the vocabulary of {self.vocab_size}"
                )
        if self.rope_theta is not None and not 0 < self.rope_theta < float("inf"):
            raise ConfigError(f"llm rope_theta must be positive, got {self.rope_theta}")


# Markers a prompt template may hold. User text is substituted only into the text between them.
IMAGE, BOS, EOS, PROMPT, ANSWER = "{image}", "{bos}", "{eos}", "{prompt}", "{answer}"
MARKERS = (IMAGE, BOS, EOS, PROMPT, ANSWER)
_MARKER = re.compile("|".join(re.escape(m) for m in MARKERS))


@dataclass(frozen=True)
class PromptConfig:
    """How a conversation becomes the LLM's input sequence.

    Templates are text with markers: `{image}` where an image's embeddings go (anywhere in the
    prompt), `{bos}` / `{eos}` for the LLM's special tokens (inserted by id), `{prompt}` for the
    user's text and `{answer}` for an earlier answer replayed in the history. The template is split
    at its markers before any user text is put in, so text a user types ("{image}", "<s>") stays text.
    A conversation is `first_turn`, then `answer` and `turn` for every later question.
    """

    first_turn: str  # e.g. "{image}{bos}Question: {prompt} Answer:"
    turn: str  # e.g. " Question: {prompt} Answer:"
    answer: str = " {answer}"
    caption: str | None = None  # a chat package's captioning prompt, e.g. "{image}{bos}"
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for name, need in (("first_turn", PROMPT), ("turn", PROMPT), ("answer", ANSWER)):
            text = getattr(self, name)
            if markers(text).count(need) != 1:
                raise ConfigError(f"prompt.{name} {text!r} must hold {need} exactly once")
        if ANSWER in markers(self.first_turn) + markers(self.turn):
            raise ConfigError(f"prompt turns cannot hold {ANSWER}")
        if self.caption is not None and {PROMPT, ANSWER} & set(markers(self.caption)):
            raise ConfigError(f"prompt.caption {self.caption!r} cannot hold {PROMPT} or {ANSWER}")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ConfigError("prompt.stop_strings must be non-empty strings")


def markers(template: str) -> list[str]:
    """The markers of a template, in order."""
    return _MARKER.findall(template)


def split_template(template: str) -> list[str]:
    """A template as its text and marker pieces, in order (markers kept, empty text dropped)."""
    return [piece for piece in re.split(f"({_MARKER.pattern})", template) if piece]


def template_text(template: str) -> str:
    """A template's own text, markers dropped: the instruction of a prompt without user text
    (what an image path that reads an instruction gets when captioning)."""
    return "".join(piece for piece in split_template(template) if piece not in MARKERS)


@dataclass(frozen=True)
class RetrievalConfig:
    """Zero-shot classification settings of a dual encoder."""

    logit_scale: float  # the learned temperature, exp(t): probabilities = softmax(logit_scale * cosine)
    label_templates: tuple[str, ...] = ("{}",)  # each label is embedded in every template ("{}" = label)

    def __post_init__(self) -> None:
        if not 0 < self.logit_scale <= MAX_LOGIT_SCALE:
            raise ConfigError(
                f"retrieval logit_scale must be in (0, {MAX_LOGIT_SCALE:g}], got {self.logit_scale}"
            )
        if not self.label_templates or not all("{}" in t for t in self.label_templates):
            raise ConfigError("retrieval label_templates must be non-empty strings holding '{}'")


# Role vocabulary: what a component does, and the path (if any) that runs it. The runtime finds
# components by role and walks paths; it never looks a component up by name.
ROLES: dict[str, str | None] = {
    "image_encoder": "image",  # pixels -> image features or an image embedding
    "image_resampler": "image",  # image features (+ an instruction) -> a fixed number of tokens (Q-Former)
    "image_projector": "image",  # -> the LLM's embedding width
    "text_encoder": "text",  # token ids -> a text embedding
    "token_embed": None,  # token ids -> LLM input embeddings
    "llm_step": None,  # one cached decoder step over embeddings
}
# Image-path sources that hold the user's instruction, tokenised with the manifest's
# `instruction_tokenizer` (InstructBLIP's Q-Former reads the question along with the image).
INSTRUCTION_SOURCES = ("qformer_input_ids", "qformer_attention_mask")
# What each path may start from: preprocessed pixels (and an instruction), or tokenised text.
PATH_SOURCES: dict[str, tuple[str, ...]] = {
    "image": ("pixel_values", *INSTRUCTION_SOURCES),
    "text": ("input_ids", "attention_mask"),
}


@dataclass(frozen=True)
class Step:
    """One component run on a path: which path values feed its inputs, what its outputs are called."""

    component: str
    inputs: dict[str, str]  # graph input -> value name
    outputs: dict[str, str]  # graph output -> value name


@dataclass(frozen=True)
class Path:
    """An ordered chain of components from the path's sources to `output`."""

    steps: tuple[Step, ...]
    output: str

    def __post_init__(self) -> None:
        if not self.steps:
            raise ConfigError("a path needs at least one step")


@dataclass(frozen=True)
class ImageTokens:
    """How many LLM positions one image takes. Rules this runtime knows: "fixed" (`count`)."""

    rule: Literal["fixed"]
    count: int

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_IMAGE_TOKENS:
            raise ConfigError(f"image_tokens.count must be in [1, {MAX_IMAGE_TOKENS}], got {self.count}")


@dataclass(frozen=True)
class PipelineConfig:
    """How the task runs: the paths from raw inputs to embeddings and the image's LLM positions."""

    paths: dict[str, Path] = field(default_factory=dict)  # "image", "text"
    image_tokens: ImageTokens | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.paths) - set(PATH_SOURCES))
        if unknown:
            raise ConfigError(f"unknown paths {unknown}; this runtime knows {sorted(PATH_SOURCES)}")
