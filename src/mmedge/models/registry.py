"""The family registry: each family package registers itself; nothing outside it names the family.

A family (architecture group, e.g. "blip2") has variants (sub-architectures, e.g. its LM kind) and
one task (pipeline kind: retrieval, chat, generation). It declares, as data and small functions,
everything the host side needs: how to parse and build its config and model, its exportable
components, its manifest sections, how Hugging Face directories map onto it, and its training
recipe. `docs/adding-a-family.md` walks through a new one.

Families are found by importing every subpackage of `mmedge.models` (a family package calls
`register` when imported) and every module named by an `mmedge.families` entry point, so a
third-party family installs as its own distribution.
"""

from __future__ import annotations

import importlib
import pkgutil
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models.component import ComponentDecl
from mmedge.presets import read_preset
from mmedge.runtime.diffusion_config import DiffusionConfig
from mmedge.runtime.manifest import TASKS
from mmedge.runtime.modality_inputs import ModalitiesConfig
from mmedge.runtime.sections import (
    ChatTemplate,
    ClassificationConfig,
    ImageTokens,
    LLMConfig,
    PreprocessConfig,
    PromptConfig,
    RetrievalConfig,
)

ENTRY_POINT_GROUP = "mmedge.families"


@dataclass(frozen=True)
class Sections:
    """A family's manifest sections for one model (export adds files, tokenizer file, engines)."""

    context_length: int  # the tokenizer's longest text
    pad_id: int
    llm: LLMConfig | None = None
    prompt: PromptConfig | None = None
    retrieval: RetrievalConfig | None = None
    image_tokens: ImageTokens | None = None
    chat_template: ChatTemplate | None = None  # a Jinja-templated chat, instead of `prompt`
    files: dict[str, bytes] = field(default_factory=dict)  # extra package files, e.g. llava-next's newline
    # The image path's instruction tokenizer (`sections.INSTRUCTION_SOURCES`): longest text, pad id.
    instruction_context_length: int | None = None
    instruction_pad_id: int = 0
    modalities: ModalitiesConfig | None = (
        None  # preprocessing of the audio, depth, thermal, imu, points paths
    )
    classification: ClassificationConfig | None = None  # class labels per path (classification task)
    diffusion: DiffusionConfig | None = None  # scheduler and latent geometry (image_generation task)


@dataclass(frozen=True)
class HFSupport:
    """How Hugging Face directories of this family map onto it (read without transformers)."""

    model_types: tuple[str, ...]  # config.json `model_type`s this family reads
    architectures: tuple[str, ...]  # HF classes, for the docs table
    config: Callable[[dict[str, Any], int | None], dict[str, Any]]  # (HF config, max_context) -> config JSON
    # HF state dict -> the family's state dict (renames, tied weights saved once); default: as saved
    weights: Callable[[dict[str, torch.Tensor], Any], dict[str, torch.Tensor]] | None = None
    # (directory, config JSON) -> config JSON with settings kept beside config.json (chat template, processor)
    directory: Callable[[Path, dict[str, Any]], dict[str, Any]] | None = None
    # subfolder holding the image path's instruction tokenizer (a processor's sub-tokenizer)
    instruction_tokenizer: str | None = None


@dataclass(frozen=True)
class DiffusersSource:
    """What a family reads from a diffusers-format directory (`model_index.json` at its root)."""

    config: dict[str, Any]  # the family's config (JSON form)
    state: dict[str, torch.Tensor]  # the family's state dict
    tokenizer_json: str
    weight_files: tuple[Path, ...]


@dataclass(frozen=True)
class DiffusersSupport:
    """How diffusers pipeline directories of this family map onto it (read without diffusers)."""

    pipelines: tuple[str, ...]  # model_index.json `_class_name`s this family reads
    load: Callable[[Path, bool], DiffusersSource]  # (directory, allow_pickle) -> config, weights, tokenizer


@dataclass(frozen=True)
class Parts:
    """Separately released parts that a family assembles into one model (`mmedge assemble`)."""

    variant: str
    vision: Path  # HF directory of the image encoder (and resampler) with its image processor
    llm: Path  # HF directory of the language model with its tokenizer
    projection: Path  # weights of the trained projection between them
    allow_pickle: bool = False  # read pickle-based weights (with weights_only=True)
    max_context: int | None = None  # KV cache slots of the package (None: the decoder default)


@dataclass(frozen=True)
class Family:
    """Everything the host side needs to know about one family."""

    name: str
    task: str
    variants: tuple[str, ...]
    summary: str  # one line for the families table
    config_from_dict: Callable[[dict[str, Any]], Any]  # strict: unknown keys are ConfigErrors
    variant_of: Callable[[Any], str]
    build: Callable[[Any], nn.Module]
    components: Callable[[Any], tuple[ComponentDecl, ...]]
    preprocess: Callable[[Any], PreprocessConfig | None]  # default image preprocessing (None: no images)
    sections: Callable[[Any, nn.Module, str], Sections]  # (config, model, tokenizer JSON)
    hf: HFSupport | None = None
    recipe: str | None = None  # module with `train(out, request)`, e.g. "mmedge.recipes.clip"
    assemble: Callable[[Parts], Any] | None = None  # Parts -> models.sources.LoadedModel
    # A state dict in the official release's key layout (a file outside HF) -> the family's names,
    # dropping what only training reads and refusing the rest (`mmedge export FILE --family`).
    official: Callable[[dict[str, Any], str], dict[str, torch.Tensor]] | None = None
    # Tokens the family's prompts need in its tokenizer (e.g. llava's "<image>"), added as special
    # tokens to the tokenizers it trains or makes for random-weight checkpoints.
    special_tokens: Callable[[Any], tuple[str, ...]] = lambda cfg: ()
    # The task of a config, for a family whose variants serve different tasks (blip: retrieval for
    # `itm`, chat for `caption` and `vqa`); None: every variant serves `task`.
    task_of: Callable[[Any], str] | None = None
    diffusers: DiffusersSupport | None = None  # diffusers-format directories (`model_index.json`)

    def __post_init__(self) -> None:
        if self.task not in TASKS:
            raise ConfigError(f"family {self.name!r}: task {self.task!r} is not one of {TASKS}")
        if not self.variants:
            raise ConfigError(f"family {self.name!r} declares no variants")

    def task_for(self, cfg: Any) -> str:
        """The task (pipeline kind) of a package exported from `cfg`."""
        task = self.task if self.task_of is None else self.task_of(cfg)
        if task not in TASKS:
            raise ConfigError(f"family {self.name!r}: task {task!r} is not one of {TASKS}")
        return task


_REGISTRY: dict[str, Family] = {}
_LOADED = False
_LOCK = threading.RLock()


def register(family: Family) -> Family:
    """Add a family (its package calls this on import); a second family of the same name is an error."""
    with _LOCK:
        old = _REGISTRY.get(family.name)
        if old is not None and old is not family:
            raise ConfigError(f"family {family.name!r} is registered twice")
        _REGISTRY[family.name] = family
    return family


def unregister(name: str) -> None:
    """Remove a family (tests that register toy families clean up with this)."""
    with _LOCK:
        _REGISTRY.pop(name, None)


def _load() -> None:
    global _LOADED
    with _LOCK:
        if _LOADED:
            return
        _LOADED = True
        import mmedge.models as pkg

        for info in pkgutil.iter_modules(pkg.__path__, pkg.__name__ + "."):
            if info.ispkg:
                importlib.import_module(info.name)
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            importlib.import_module(ep.value.split(":")[0])


def families() -> dict[str, Family]:
    """Every registered family, by name."""
    _load()
    return dict(sorted(_REGISTRY.items()))


def get_family(name: str) -> Family:
    """Return a family by name, or raise listing the known ones."""
    known = families()
    if name not in known:
        raise ConfigError(f"unknown family {name!r}; known: {sorted(known)}")
    return known[name]


def family_for_model_type(model_type: Any) -> Family:
    """The family that reads HF directories of `model_type`."""
    found = [f for f in families().values() if f.hf is not None and model_type in f.hf.model_types]
    if not found:
        accepted = sorted(t for f in families().values() if f.hf for t in f.hf.model_types)
        raise UnsupportedError(f"HF model_type {model_type!r} is not supported; supported: {accepted}")
    return found[0]


def family_for_pipeline(class_name: Any) -> Family:
    """The family that reads diffusers directories of pipeline class `class_name`."""
    found = [
        f for f in families().values() if f.diffusers is not None and class_name in f.diffusers.pipelines
    ]
    if not found:
        accepted = sorted(p for f in families().values() if f.diffusers for p in f.diffusers.pipelines)
        raise UnsupportedError(f"diffusers pipeline {class_name!r} is not supported; supported: {accepted}")
    return found[0]


def load_preset(name: str) -> tuple[Family, dict[str, Any]]:
    """Return (family, config dict) of a named preset."""
    raw = read_preset(name)
    return get_family(raw["family"]), raw["config"]
