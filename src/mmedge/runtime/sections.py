"""The manifest's typed sections: what a package declares about preprocessing, text, the LLM,
prompts, retrieval and how its components are wired (torch-free, no OpenCV).

Writers (export, calibration, builds) construct these dataclasses and readers (the runtime) get
them from `schema.from_json`, so both sides share one definition. Each class checks its own values
on construction; `manifest.Manifest` checks how the sections fit together for a task.
"""

from __future__ import annotations

import math
import re
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from mmedge.errors import ConfigError, IntegrityError

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
MAX_CLASSES = 1 << 16  # class labels of one classification path
MAX_LABEL_CHARS = 256  # one class label
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
    pad_square: bool = False  # pad to a square in the mean colour first (LLaVA-1.5's expand2square)

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
        if not isinstance(self.pad_square, bool):
            raise ConfigError(f"pad_square must be a bool, got {self.pad_square!r}")


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


# Bounds of what a manifest may ask for: every pinpoint becomes a uint8 canvas and (1 + tiles)
# float32 views, so a hostile section must not reach gigabytes. LLaVA-NeXT uses 5 pinpoints of
# at most 3 x 3 tiles of 336 pixels (1008 x 1008).
MAX_PINPOINTS = 64
MAX_GRID_SIDE = 16  # tiles along either side of a pinpoint
MAX_GRID_PIXELS = 1 << 25  # one pinpoint's area: 16 x 16 tiles of 336 fit; as float32 views, 384 MiB


@dataclass(frozen=True)
class AnyResConfig:
    """Pinpoints, tile geometry and normalisation of an anyres image input.

    `grid_pinpoints` are (height, width) resolutions, each a multiple of `tile_size` (the vision
    tower's input side S); `patch_size` is the tower's patch side, so a tile gives
    (S / patch_size)^2 feature tokens.
    """

    grid_pinpoints: tuple[tuple[int, int], ...]
    tile_size: int
    patch_size: int
    mean: tuple[float, float, float] = CLIP_MEAN
    std: tuple[float, float, float] = CLIP_STD
    rescale: float = 1 / 255

    def __post_init__(self) -> None:
        if not _is_int(self.tile_size) or not 1 <= self.tile_size <= MAX_IMAGE_SIZE:
            raise ConfigError(f"tile_size must be an int in [1, {MAX_IMAGE_SIZE}], got {self.tile_size!r}")
        # Normalisation follows the same rules as a plain image input's.
        base = PreprocessConfig(self.tile_size, self.mean, self.std, rescale=self.rescale)
        object.__setattr__(self, "mean", base.mean)
        object.__setattr__(self, "std", base.std)
        if not _is_int(self.patch_size) or not 1 <= self.patch_size <= self.tile_size:
            raise ConfigError(
                f"patch_size must be an int in [1, tile_size={self.tile_size}], got {self.patch_size!r}"
            )
        if self.tile_size % self.patch_size:
            raise ConfigError(f"tile_size {self.tile_size} is not a multiple of patch_size {self.patch_size}")
        object.__setattr__(self, "grid_pinpoints", _check_pinpoints(self.grid_pinpoints, self.tile_size))

    @property
    def tokens_per_side(self) -> int:
        """Feature tokens along one side of a tile (CLS excluded)."""
        return self.tile_size // self.patch_size

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (tuples become lists)."""
        from mmedge.runtime import schema

        out: dict[str, Any] = schema.to_json(self)
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AnyResConfig:
        """Strict inverse of `to_dict`: unknown or missing keys and wrong types are ConfigErrors."""
        from mmedge.runtime import schema

        try:
            return schema.from_json(cls, dict(data), "anyres")
        except IntegrityError as exc:
            raise ConfigError(str(exc)) from None


def _is_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _check_pinpoints(pinpoints: object, tile: int) -> tuple[tuple[int, int], ...]:
    if not isinstance(pinpoints, (list, tuple)) or not pinpoints:
        raise ConfigError(
            f"grid_pinpoints must be a non-empty list of (height, width) pairs, got {pinpoints!r}"
        )
    if len(pinpoints) > MAX_PINPOINTS:
        raise ConfigError(f"grid_pinpoints has {len(pinpoints)} entries; the limit is {MAX_PINPOINTS}")
    checked = []
    for point in pinpoints:
        if (
            not isinstance(point, (list, tuple))
            or len(point) != 2
            or not all(_is_int(v) and v > 0 for v in point)
        ):
            raise ConfigError(f"grid pinpoint {point!r} is not a (height, width) pair of positive ints")
        height, width = point
        if height % tile or width % tile:
            raise ConfigError(f"grid pinpoint {height}x{width} is not a multiple of tile_size {tile}")
        if max(height, width) // tile > MAX_GRID_SIDE or height * width > MAX_GRID_PIXELS:
            raise ConfigError(
                f"grid pinpoint {height}x{width} is {height // tile}x{width // tile} tiles of {tile}; the limits "
                f"are {MAX_GRID_SIDE} tiles a side and {MAX_GRID_PIXELS} pixels"
            )
        checked.append((height, width))
    return tuple(checked)


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


MAX_CHAT_TEMPLATE_CHARS = 1 << 16


@dataclass(frozen=True)
class ChatTemplate:
    """A Jinja chat template (as HF tokenizers and processors ship them) that renders a conversation.

    The template writes `image_token` where an image goes; the runtime renders it in a sandbox
    (`runtime.chat_template`) with user text held out of the template's reach, and tokenises the
    result as the HF processor does (`add_special_tokens`: the tokenizer's own BOS/EOS around it).
    `bos_token` / `eos_token` are the strings the template may reference by those names.
    """

    template: str
    image_token: str = "<image>"
    bos_token: str = ""
    eos_token: str = ""
    add_special_tokens: bool = True
    caption_prompt: str | None = None  # the user text `caption()` sends with the image
    stop_strings: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not isinstance(self.template, str) or not 0 < len(self.template) <= MAX_CHAT_TEMPLATE_CHARS:
            raise ConfigError(
                f"chat_template.template must be a string of 1 to {MAX_CHAT_TEMPLATE_CHARS} characters"
            )
        if not isinstance(self.image_token, str) or not self.image_token:
            raise ConfigError("chat_template.image_token must be a non-empty string")
        if not all(isinstance(s, str) and s for s in self.stop_strings):
            raise ConfigError("chat_template.stop_strings must be non-empty strings")


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
    # Per path, the scale the original model multiplies that path's unit-length embedding by
    # (ImageBind's postprocessors: text learned, audio 20, depth 5, thermal 10, IMU 5); a path
    # without one has scale 1. The paths' outputs stay unit-length: the original model's logits
    # between paths a and b are scales[a] * scales[b] * cosine. Empty for two-tower families.
    scales: dict[str, float] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not 0 < self.logit_scale <= MAX_LOGIT_SCALE:
            raise ConfigError(
                f"retrieval logit_scale must be in (0, {MAX_LOGIT_SCALE:g}], got {self.logit_scale}"
            )
        for path, scale in self.scales.items():
            if path not in PATH_SOURCES or not 0 < scale <= MAX_LOGIT_SCALE:
                raise ConfigError(
                    f"retrieval scales[{path!r}] = {scale}: paths are {sorted(PATH_SOURCES)}, scales in "
                    f"(0, {MAX_LOGIT_SCALE:g}]"
                )
        if not self.label_templates or not all("{}" in t for t in self.label_templates):
            raise ConfigError("retrieval label_templates must be non-empty strings holding '{}'")


@dataclass(frozen=True)
class ClassificationConfig:
    """The class labels of a classification package (the manifest's `classification` section):
    per path, `labels[i]` names the path's `logits[..., i]`. Labels are distinct non-empty strings;
    the manifest checks that every path has labels as many as its logits' last dim."""

    labels: dict[str, tuple[str, ...]]

    def __post_init__(self) -> None:
        for path, names in self.labels.items():
            if path not in PATH_SOURCES:
                raise ConfigError(f"classification labels[{path!r}]: paths are {sorted(PATH_SOURCES)}")
            if not 1 <= len(names) <= MAX_CLASSES:
                raise ConfigError(
                    f"classification labels[{path!r}]: {len(names)} labels; a path has 1 to {MAX_CLASSES}"
                )
            if not all(isinstance(n, str) and n.strip() and len(n) <= MAX_LABEL_CHARS for n in names):
                raise ConfigError(
                    f"classification labels[{path!r}] must be non-empty strings of at most "
                    f"{MAX_LABEL_CHARS} characters"
                )
            if len(set(names)) != len(names):
                twice = sorted(n for n, count in Counter(names).items() if count > 1)
                raise ConfigError(
                    f"classification labels[{path!r}] repeat {twice}: each label names one class"
                )


# Paths of modalities beside images and text whose components a family shares between them:
# Meta-Transformer's one encoder runs on every one of these paths.
SHARED_ENCODER_PATHS = ("points", "audio", "imu")
# Role vocabulary: what a component does, and the path (if any) that runs it, or the paths it may run
# on (a tuple: which of them a package's pipeline section says). The runtime finds components by role
# and walks paths; it never looks a component up by name.
ROLES: dict[str, str | tuple[str, ...] | None] = {
    "image_encoder": "image",  # pixels -> image features or an image embedding
    "image_resampler": "image",  # image features (+ an instruction) -> a fixed number of tokens (Q-Former)
    "image_projector": "image",  # -> the LLM's embedding width
    "text_encoder": "text",  # token ids -> a text embedding
    "token_embed": None,  # token ids -> LLM input embeddings
    "llm_step": None,  # one cached decoder step over embeddings
    # image features + token ids -> (no match, match) logits: re-scores retrieval candidates (BLIP's
    # ITM); its inputs are text-path sources and values of the image path, bound by name
    "itm": None,
    # image features + question ids -> the question's states, grounded in the image (BLIP's VQA
    # question encoder); run once per (image, question), its output feeds `cross_kv`
    "question_encoder": None,
    # the states a decoder cross-attends to (image features, or question states) -> each layer's
    # cross keys/values, `cross_key_values.<i>.key/value`: computed once, bound to every llm_step
    "cross_kv": None,
    # a modality's input (point groups, a filterbank, an IMU trace) -> `tokens` of the shared encoder's width
    "modality_tokenizer": SHARED_ENCODER_PATHS,
    # tokens of any modality -> hidden states: one graph, exported and calibrated once, on every such path
    "shared_encoder": SHARED_ENCODER_PATHS,
    # hidden states -> a task's logits (and a normalised embedding)
    "task_head": SHARED_ENCODER_PATHS,
    # Further modalities into a retrieval package's embedding space (ImageBind), each on its own
    # path: a log-mel filterbank clip, a disparity map, a thermal image, IMU samples -> an embedding
    "audio_encoder": "audio",
    "depth_encoder": "depth",
    "thermal_encoder": "thermal",
    "imu_encoder": "imu",
    # two frames (a clip) through the image encoder's weights, into the image embeddings' space
    "video_encoder": "video",
    # latents + timestep + the text path's conditioning -> the scheduler's model output (a U-Net), run
    # once per denoising step (twice the batch with classifier-free guidance)
    "denoiser": None,
    # latents (scaled as the diffusion section says) -> an image in [-1, 1]
    "vae_decoder": None,
    # an image in [-1, 1] -> its latents (the posterior's mean, before scaling): image-to-image
    "vae_encoder": None,
}


def role_paths(role: str) -> tuple[str, ...]:
    """The paths a component of `role` may run on (none for a role off every path)."""
    where = ROLES[role]
    return () if where is None else (where,) if isinstance(where, str) else where


# Image-path sources that hold the user's instruction, tokenised with the manifest's
# `instruction_tokenizer` (InstructBLIP's Q-Former reads the question along with the image).
INSTRUCTION_SOURCES = ("qformer_input_ids", "qformer_attention_mask")
# What each path may start from: preprocessed pixels (and an instruction), or tokenised text.
PATH_SOURCES: dict[str, tuple[str, ...]] = {
    "image": ("pixel_values", *INSTRUCTION_SOURCES),
    "text": ("input_ids", "attention_mask"),
    # the runtime's FPS + kNN grouping: (B, G, K, 3) neighbourhoods relative to their (B, G, 3) centres
    "points": ("point_groups", "point_centers"),
    "audio": ("audio_values",),  # (B, 1, mel bins, frames) log-mel filterbank
    "depth": ("depth_values",),  # (B, 1, S, S) disparity
    "thermal": ("thermal_values",),  # (B, 1, S, S)
    "imu": ("imu_values",),  # (B, channels, samples)
    "video": ("video_values",),  # (B, 3, frames, S, S), each frame preprocessed as an image
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
    """How many LLM positions one image takes. Rules: "fixed" (`count` per image, BLIP-2, LLaVA-1.5)
    and "anyres" (LLaVA-NeXT: the image path runs on a base view and the tiles of `anyres`, each
    giving `count` embeddings, packed on the host with the newline embedding stored in `newline`,
    a float32 .npy file of the package)."""

    rule: Literal["fixed", "anyres"]
    count: int
    anyres: AnyResConfig | None = None
    newline: str | None = None

    def __post_init__(self) -> None:
        if not 1 <= self.count <= MAX_IMAGE_TOKENS:
            raise ConfigError(f"image_tokens.count must be in [1, {MAX_IMAGE_TOKENS}], got {self.count}")
        if (self.rule == "anyres") != (self.anyres is not None) or (self.anyres is None) != (
            self.newline is None
        ):
            raise ConfigError("image_tokens.anyres and .newline are set exactly when the rule is 'anyres'")


@dataclass(frozen=True)
class PipelineConfig:
    """How the task runs: the paths from raw inputs to embeddings and the image's LLM positions."""

    paths: dict[str, Path] = field(default_factory=dict)  # "image", "text"
    image_tokens: ImageTokens | None = None

    def __post_init__(self) -> None:
        unknown = sorted(set(self.paths) - set(PATH_SOURCES))
        if unknown:
            raise ConfigError(f"unknown paths {unknown}; this runtime knows {sorted(PATH_SOURCES)}")


# Where a device bundle runs (`mmedge pack --target`): ORT's CPU provider, ORT's CUDA or TensorRT
# execution provider, or native TensorRT (engines built on the device on first use).
BUNDLE_TARGETS = ("ort-cpu", "ort-cuda", "ort-tensorrt", "tensorrt")


@dataclass(frozen=True)
class BundleConfig:
    """A device bundle's target: what it was packed for and from what (docs/bundles.md).

    `runtime` holds what the packed files need of the machine (e.g. {"onnxruntime": "1.32.0",
    "machine": "x86_64"} for ORT builds), checked when the bundle is opened. `settings` are the
    TensorRT build settings a "tensorrt" bundle's device uses to build its engines. `fp32_sha256`
    keeps, per component, the sha256 of the fp32 graph the bundle was packed from (what names the
    model, e.g. in a retrieval index, although the bundle does not carry that graph). `source` is a
    record (the package it came from, its manifest's sha256), never interpreted."""

    target: str
    precision: str
    runtime: dict[str, str] = field(default_factory=dict)
    settings: dict[str, Any] = field(default_factory=dict)
    fp32_sha256: dict[str, str] = field(default_factory=dict)
    source: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.target not in BUNDLE_TARGETS:
            raise ConfigError(f"bundle target {self.target!r} is not one of {list(BUNDLE_TARGETS)}")
        if self.precision not in ("fp32", "fp16", "int8", "int4"):
            raise ConfigError(f"bundle precision {self.precision!r} is not fp32, fp16, int8 or int4")
