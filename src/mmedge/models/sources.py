"""Load a model from an mmedge checkpoint or an HF directory into one shape: `LoadedModel`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmedge.errors import ConfigError
from mmedge.models.registry import Family, get_family
from mmedge.runtime.schema import from_json
from mmedge.runtime.sections import PreprocessConfig


@dataclass(frozen=True)
class LoadedModel:
    family: Family
    config: Any  # the family's frozen config dataclass
    model: nn.Module
    tokenizer_json: str
    preprocess: PreprocessConfig | None  # the manifest's "preprocess" section
    source: dict[str, Any]  # provenance: kind, path, weight hashes
    instruction_tokenizer_json: str | None = None  # the image path's, where it reads an instruction

    @property
    def variant(self) -> str:
        return self.family.variant_of(self.config)


def load_source(
    path: str | Path, family: str | None = None, allow_pickle: bool = False, max_context: int | None = None
) -> LoadedModel:
    """Load an mmedge checkpoint or HF model directory (family detected; `family` overrides;
    `max_context`: the KV cache slots of an imported LM, default the family's choice)."""
    from mmedge.models import checkpoint, hf_import
    from mmedge.runtime.package import sha256_file

    root = Path(path)
    if not root.is_dir():
        raise ConfigError(
            f"{root} is not a directory; expected an mmedge checkpoint or an HF model directory"
        )
    if hf_import.is_hf_dir(root):
        src = hf_import.load_hf(root, allow_pickle=allow_pickle, max_context=max_context, family=family)
        cfg = src.family.config_from_dict(src.config)
        model = src.family.build(cfg)
        checkpoint.assign_weights(model, src.state, str(root))
        files = {f.name: sha256_file(f) for f in src.weight_files}
        source = {"kind": "hf", "path": str(root.resolve()), "weights": files}
        return LoadedModel(
            src.family,
            cfg,
            model.eval(),
            src.tokenizer_json,
            src.preprocess,
            source,
            src.instruction_tokenizer_json,
        )
    if max_context is not None:
        raise ConfigError("max_context applies to HF directories; an mmedge checkpoint's config sets it")
    meta = checkpoint.read_checkpoint_meta(root)
    fam = get_family(family or meta["family"])
    cfg = fam.config_from_dict(meta["config"])
    model = fam.build(cfg)
    weights = root / checkpoint.WEIGHTS_NAME
    checkpoint.assign_weights(model, checkpoint.load_weights(weights), str(root))
    tok = root / checkpoint.TOKENIZER_NAME
    if not tok.is_file():
        raise ConfigError(f"{root} has no {checkpoint.TOKENIZER_NAME}")
    # A checkpoint fine-tuned from an HF directory keeps that directory's image preprocessing.
    recorded = meta.get("preprocess")
    preprocess = (
        from_json(PreprocessConfig, recorded, "checkpoint preprocess") if recorded else fam.preprocess(cfg)
    )
    source = {
        "kind": "mmedge",
        "path": str(root.resolve()),
        "weights": {weights.name: sha256_file(weights)},
        "train": meta.get("train", {}),
    }
    instruction = root / checkpoint.INSTRUCTION_TOKENIZER_NAME
    return LoadedModel(
        fam,
        cfg,
        model.eval(),
        tok.read_text(),
        preprocess,
        source,
        instruction.read_text() if instruction.is_file() else None,
    )
