"""Read Hugging Face model directories without importing transformers.

Generic file reading only: config.json, safetensors weights (single or a sharded index), the
tokenizer, and the image processor settings (`preprocessor_config.json`, or the `image_processor`
part of a whole processor saved as `processor_config.json`). The family that reads the directory
is found by its `model_type` in the registry; its `HFSupport` maps config and weights.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models.checkpoint import load_weights
from mmedge.models.checkpoint import read_json_object as _json
from mmedge.models.registry import Family, family_for_model_type, get_family
from mmedge.runtime.sections import INSTRUCTION_SOURCES, PreprocessConfig

_PIL_BICUBIC = 3  # PIL.Image.Resampling.BICUBIC, as processor configs store it
PROCESSOR_FILES = ("preprocessor_config.json", "processor_config.json")


@dataclass(frozen=True)
class HFSource:
    family: Family
    config: dict[str, Any]  # the family's config (JSON form)
    state: dict[str, torch.Tensor]
    tokenizer_json: str
    preprocess: PreprocessConfig | None
    weight_files: tuple[Path, ...]
    instruction_tokenizer_json: str | None = None  # the image path's (HFSupport.instruction_tokenizer)


def is_hf_dir(path: str | Path) -> bool:
    """An HF model directory has a config.json with a `model_type` (mmedge checkpoints have `format`)."""
    p = Path(path) / "config.json"
    if not p.is_file():
        return False
    try:
        return "model_type" in json.loads(p.read_text())
    except ValueError:
        return False


def hf_family(path: str | Path) -> Family:
    """The registered family that reads this HF directory (by its config's model_type)."""
    return family_for_model_type(_json(Path(path) / "config.json").get("model_type"))


def _weight_files(root: Path, allow_pickle: bool) -> list[Path]:
    index = root / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(_json(index).get("weight_map", {}).values()))
        files = [root / s for s in shards]
        for f in files:
            if f.parent != root:
                raise ConfigError(f"{index}: shard {f.name!r} must lie in the model directory")
        return files
    if (root / "model.safetensors").is_file():
        return [root / "model.safetensors"]
    if (root / "pytorch_model.bin").is_file():
        if not allow_pickle:
            load_weights(root / "pytorch_model.bin", allow_pickle=False)  # raises the explanatory error
        return [root / "pytorch_model.bin"]
    raise ConfigError(f"{root} has no model.safetensors (or sharded index); nothing to import")


def read_weights(
    root: Path, allow_pickle: bool = False, prefixes: tuple[str, ...] = ()
) -> tuple[dict[str, torch.Tensor], tuple[Path, ...]]:
    """(state dict, files read) of an HF model directory, without the buffers HF used to persist;
    `prefixes`: only the tensors named with one of them (`checkpoint.load_weights`)."""
    files = _weight_files(root, allow_pickle)
    state: dict[str, torch.Tensor] = {}
    for f in files:
        state.update(load_weights(f, allow_pickle=allow_pickle, prefixes=prefixes))
    # Buffers HF used to persist; ours are computed.
    state = {k: v for k, v in state.items() if not k.endswith(("position_ids", "rotary_emb.inv_freq"))}
    return state, tuple(files)


def image_processor_settings(root: Path) -> tuple[Path, dict[str, Any]]:
    """(file, settings) of the directory's image processor; refuses a directory that has none."""
    legacy, whole = (root / name for name in PROCESSOR_FILES)
    if legacy.is_file():
        return legacy, _json(legacy)
    if whole.is_file():
        nested = _json(whole).get("image_processor")
        if isinstance(nested, dict):
            return whole, nested
        raise ConfigError(f"{whole} has no 'image_processor' settings; cannot tell how images are prepared")
    raise ConfigError(
        f"{root} has neither {PROCESSOR_FILES[0]} nor {PROCESSOR_FILES[1]}; save the model's image processor "
        "(e.g. `processor.save_pretrained(dir)`) so that images are prepared as the model expects"
    )


def read_image_processor(root: Path, base: PreprocessConfig) -> PreprocessConfig:
    """The directory's image processor settings over the family's defaults `base`; refuses what
    the runtime cannot reproduce (it would change every embedding silently)."""
    p, pc = image_processor_settings(root)
    image_size = base.image_size
    wrong = [
        f"{k}={pc[k]!r}" for k in ("do_resize", "do_rescale", "do_normalize") if pc.get(k, True) is not True
    ]
    if pc.get("resample", _PIL_BICUBIC) != _PIL_BICUBIC:
        wrong.append(f"resample={pc['resample']!r}")
    default = (
        {"height": image_size, "width": image_size}
        if base.resize == "exact"
        else {"shortest_edge": image_size}
    )
    size = pc.get("size", default)
    exact = isinstance(size, dict) and "shortest_edge" not in size
    if not exact and pc.get("do_center_crop", True) is not True:
        wrong.append(f"do_center_crop={pc['do_center_crop']!r}")
    if wrong:
        raise UnsupportedError(
            f"{p}: {', '.join(wrong)} is not supported; accepted: bicubic (resample={_PIL_BICUBIC}) resize "
            "(shortest edge + centre crop, or height x width), rescale and normalise, all enabled"
        )
    if exact:
        got = (size.get("height"), size.get("width"))
        if got != (image_size, image_size):
            raise UnsupportedError(f"{p}: resizes to {got}, but the model takes {image_size}x{image_size}")
    else:
        shortest = size["shortest_edge"] if isinstance(size, dict) else int(size)
        crop = pc.get("crop_size", {"height": image_size, "width": image_size})
        crop = (crop.get("height"), crop.get("width")) if isinstance(crop, dict) else (int(crop), int(crop))
        if shortest != image_size or crop != (image_size, image_size):
            raise UnsupportedError(
                f"{p}: resizes to {shortest} and crops {crop}, but the model takes {image_size}; "
                "only resize == crop == image_size is supported"
            )
    try:
        return replace(
            base,
            mean=tuple(pc.get("image_mean", base.mean)),
            std=tuple(pc.get("image_std", base.std)),
            resize="exact" if exact else "shortest",
            rescale=pc.get("rescale_factor", base.rescale),
        )
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def load_hf(
    path: str | Path, allow_pickle: bool = False, max_context: int | None = None, family: str | None = None
) -> HFSource:
    """Read an HF model directory into the family's config + state dict (`family` overrides detection)."""
    root = Path(path)
    fam = get_family(family) if family else hf_family(root)
    if fam.hf is None:
        raise UnsupportedError(f"family {fam.name!r} does not read Hugging Face directories")
    hf_cfg = _json(root / "config.json")
    config = fam.hf.config(hf_cfg, max_context)
    if fam.hf.directory is not None:
        config = fam.hf.directory(root, config)
    parsed = fam.config_from_dict(config)
    state, files = read_weights(root, allow_pickle)
    if fam.hf.weights is not None:
        state = fam.hf.weights(state, parsed)
    base = fam.preprocess(parsed)
    preprocess = read_image_processor(root, base) if base is not None else None
    tokenizer_json = read_tokenizer(root, fam, parsed)
    instruction_json = None
    if fam.hf.instruction_tokenizer is not None:
        sub = root / fam.hf.instruction_tokenizer / "tokenizer.json"
        if not sub.is_file():
            raise ConfigError(
                f"{root} has no {fam.hf.instruction_tokenizer}/tokenizer.json; save the whole processor "
                "(`processor.save_pretrained(dir)`) with fast (Rust) tokenizers"
            )
        instruction_json = sub.read_text()
        check_tokenizer_fits(sub, instruction_json, fam, parsed, INSTRUCTION_SOURCES[0])
    return HFSource(fam, config, state, tokenizer_json, preprocess, files, instruction_json)


def read_tokenizer(root: Path, family: Family, config: Any) -> str:
    """The directory's tokenizer.json, checked to fit the model's token tables."""
    tok = root / "tokenizer.json"
    if not tok.is_file():
        raise ConfigError(f"{root} has no tokenizer.json; save the tokenizer with a fast (Rust) tokenizer")
    tokenizer_json = tok.read_text()
    check_tokenizer_fits(tok, tokenizer_json, family, config)
    return tokenizer_json


def check_tokenizer_fits(
    path: Path, tokenizer_json: str, family: Family, config: Any, ids_input: str = "input_ids"
) -> None:
    """Every id the tokenizer can emit must index each token table of the model (the ranges its
    components declare for `ids_input`); otherwise export would hit an IndexError."""
    from tokenizers import Tokenizer

    try:
        ids = Tokenizer.from_str(tokenizer_json).get_vocab(with_added_tokens=True).values()
    except Exception as exc:  # tokenizers raises bare Exception for malformed JSON
        raise ConfigError(f"{path} is not a readable tokenizer: {exc}") from exc
    top = max(ids, default=-1)
    for decl in family.components(config):
        _, high = decl.int_ranges.get(ids_input, (0, top + 1))
        if top >= high:
            raise ConfigError(f"{path} emits token ids up to {top}, but the model's vocab_size is {high}")
