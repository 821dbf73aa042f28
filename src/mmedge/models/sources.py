"""Load a model from an mmedge checkpoint or an HF directory into one shape: `LoadedModel`."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import nn

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models.registry import Family, families, get_family
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
    path: str | Path,
    family: str | None = None,
    allow_pickle: bool = False,
    max_context: int | None = None,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
) -> LoadedModel:
    """Load an mmedge checkpoint or HF model directory (family detected; `family` overrides;
    `max_context`: the KV cache slots of an imported LM, default the family's choice), or a weights
    file in a family's official layout (`load_official`: `config` and `tokenizer` apply to it)."""
    from mmedge.models import checkpoint, hf_import
    from mmedge.runtime.package import sha256_file

    root = Path(path)
    if root.is_file():
        return load_official(root, family, config, tokenizer, allow_pickle)
    if config is not None or tokenizer is not None:
        raise ConfigError("--config and --tokenizer apply to a weights file in a family's official layout")
    if not root.is_dir():
        raise ConfigError(
            f"{root} is not a directory; expected an mmedge checkpoint, an HF model directory or a "
            "weights file in a family's official layout"
        )
    if (root / "model_index.json").is_file():
        return load_diffusers(root, family, allow_pickle, max_context)
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


def load_diffusers(
    root: Path, family: str | None = None, allow_pickle: bool = False, max_context: int | None = None
) -> LoadedModel:
    """A diffusers-format directory (`model_index.json`), read by the family that names its pipeline
    class (`Family.diffusers`)."""
    from mmedge.models import checkpoint, hf_import
    from mmedge.models.registry import family_for_pipeline
    from mmedge.runtime.package import sha256_file

    if max_context is not None:
        raise ConfigError("max_context applies to language models; a diffusers directory has none")
    index = checkpoint.read_json_object(root / "model_index.json")
    fam = get_family(family) if family else family_for_pipeline(index.get("_class_name"))
    if fam.diffusers is None:
        raise UnsupportedError(f"family {fam.name!r} does not read diffusers directories")
    src = fam.diffusers.load(root, allow_pickle)
    cfg = fam.config_from_dict(src.config)
    hf_import.check_tokenizer_fits(root / "tokenizer", src.tokenizer_json, fam, cfg)
    model = fam.build(cfg)
    checkpoint.assign_weights(model, src.state, str(root))
    files = {str(f.relative_to(root)): sha256_file(f) for f in src.weight_files}
    source = {"kind": "diffusers", "path": str(root.resolve()), "weights": files}
    return LoadedModel(fam, cfg, model.eval(), src.tokenizer_json, fam.preprocess(cfg), source)


def load_official(
    path: Path,
    family: str | None,
    config: str | Path | None = None,
    tokenizer: str | Path | None = None,
    allow_pickle: bool = False,
) -> LoadedModel:
    """A weights file in the official release's layout of `family` (e.g. ALBEF's `ALBEF.pth`).

    The config is the family's JSON config at `config` (default: the family's defaults, the
    released model's sizes); the tokenizer a `tokenizer.json` (default: the one beside the file).
    Safetensors, or a pickle-based file with `allow_pickle`, read with `weights_only=True`."""
    from mmedge.models import checkpoint, hf_import
    from mmedge.runtime.package import sha256_file

    able = sorted(f.name for f in families().values() if f.official is not None)
    if family is None:
        raise ConfigError(f"{path} is a weights file: name its family with --family (one of {able})")
    fam = get_family(family)
    if fam.official is None:
        raise UnsupportedError(f"family {family!r} reads no official weights files; families that do: {able}")
    raw = checkpoint.read_json_object(Path(config)) if config is not None else {}
    cfg = fam.config_from_dict(raw)
    tok = Path(tokenizer) if tokenizer is not None else path.parent / checkpoint.TOKENIZER_NAME
    if not tok.is_file():
        raise ConfigError(f"no tokenizer at {tok}; pass --tokenizer (a tokenizers JSON file)")
    tokenizer_json = tok.read_text()
    hf_import.check_tokenizer_fits(tok, tokenizer_json, fam, cfg)
    state = checkpoint.load_weights(path, allow_pickle=allow_pickle)
    if not isinstance(state, dict):
        raise ConfigError(f"{path} does not hold a state dict")
    model = fam.build(cfg)
    checkpoint.assign_weights(model, fam.official(state, str(path)), str(path))
    source = {"kind": "official", "path": str(path.resolve()), "weights": {path.name: sha256_file(path)}}
    return LoadedModel(fam, cfg, model.eval(), tokenizer_json, fam.preprocess(cfg), source)
