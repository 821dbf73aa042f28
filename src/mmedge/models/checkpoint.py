"""mmedge checkpoints: a directory with model.safetensors, config.json and tokenizer.json.

Only safetensors is read by default; pickle-based files are refused unless the caller opts in,
and are then loaded with `weights_only=True`.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from mmedge.errors import ConfigError, IntegrityError, UnsupportedError

CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
TOKENIZER_NAME = "tokenizer.json"
INSTRUCTION_TOKENIZER_NAME = "instruction_tokenizer.json"  # the image path's, where it reads one
FORMAT = "mmedge.checkpoint/2"
_V1 = "mmedge.checkpoint/1"  # read and migrated: its configs named decoder variants and vision towers "style"


def save_checkpoint(
    out_dir: str | os.PathLike,
    family: str,
    config: dict[str, Any],
    model: nn.Module,
    tokenizer_json: str | None = None,
    extra: dict[str, Any] | None = None,
    preprocess: dict[str, Any] | None = None,
    instruction_tokenizer_json: str | None = None,
) -> Path:
    """Write a checkpoint directory atomically (staged next to it, then renamed into place).

    `preprocess` (a manifest preprocess section, JSON form) is kept when it is not the family's
    default, e.g. for a model fine-tuned from an HF directory with its own image processor."""
    from safetensors.torch import save_file

    from mmedge.runtime.staging import staged_dir

    out = Path(out_dir)
    with staged_dir(out) as tmp:
        tensors, seen = {}, set()
        for k, v in model.state_dict().items():  # tied weights (an LM head) are saved as copies
            t = v.detach().contiguous().cpu()
            tensors[k] = t.clone() if t.data_ptr() in seen else t
            seen.add(t.data_ptr())
        save_file(tensors, str(tmp / WEIGHTS_NAME), metadata={"format": FORMAT, "family": family})
        meta = {"format": FORMAT, "family": family, "config": config, **(extra or {})}
        if preprocess is not None:
            meta["preprocess"] = preprocess
        (tmp / CONFIG_NAME).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if tokenizer_json is not None:
            (tmp / TOKENIZER_NAME).write_text(tokenizer_json)
        if instruction_tokenizer_json is not None:
            (tmp / INSTRUCTION_TOKENIZER_NAME).write_text(instruction_tokenizer_json)
    return out


def is_checkpoint(path: Path) -> bool:
    """Whether `path` holds an mmedge checkpoint (which a new one may replace)."""
    try:
        return str(json.loads((path / CONFIG_NAME).read_text()).get("format", "")).startswith(
            "mmedge.checkpoint/"
        )
    except (OSError, ValueError, AttributeError):
        return False


def read_json_object(path: Path) -> dict[str, Any]:
    """Read a JSON file that must hold an object; missing or malformed files are ConfigErrors."""
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise ConfigError(f"{path.parent} has no {path.name}") from None
    except ValueError as exc:
        raise ConfigError(f"{path} is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{path} must hold a JSON object")
    return data


def read_checkpoint_meta(path: str | os.PathLike) -> dict[str, Any]:
    """Read an mmedge checkpoint's config.json (family, config, extras)."""
    p = Path(path) / CONFIG_NAME
    meta = read_json_object(p)
    if meta.get("format") == _V1 and isinstance(meta.get("config"), dict):
        meta = {**meta, "format": FORMAT, "config": _migrate_v1(meta["config"])}
    if meta.get("format") != FORMAT:
        raise ConfigError(f"{p} is not an mmedge checkpoint (format {FORMAT!r} expected)")
    return meta


def _migrate_v1(config: dict[str, Any]) -> dict[str, Any]:
    """A v1 config -> v2: a decoder's "style" is its "variant", a BLIP-2 vision "style" its "tower"."""
    out: dict[str, Any] = {}
    for key, value in config.items():
        if key == "style" and value in ("opt", "llama"):
            key = "variant"
        elif key == "style" and value in ("blip2", "clip"):
            key = "tower"
        out[key] = _migrate_v1(value) if isinstance(value, dict) else value
    return out


def load_weights(
    path: str | os.PathLike, allow_pickle: bool = False, prefixes: tuple[str, ...] = ()
) -> dict[str, torch.Tensor]:
    """Load a state dict from safetensors; pickle files only with explicit opt-in (weights_only).

    `prefixes`: only the tensors named with one of them; safetensors reads no others from disk
    (a vision tower taken from a file that also holds a 7B LM)."""
    p = Path(path)
    if p.suffix == ".safetensors":
        from safetensors import SafetensorError, safe_open

        try:
            with safe_open(str(p), framework="pt") as f:
                names = f.keys()  # safe_open is not iterable
                return {k: f.get_tensor(k) for k in names if not prefixes or k.startswith(prefixes)}
        except (SafetensorError, OSError, ValueError) as exc:
            raise IntegrityError(f"{p}: not a readable safetensors file ({exc})") from None
    if p.suffix in (".bin", ".pt", ".pth", ".ckpt"):
        if not allow_pickle:
            raise UnsupportedError(
                f"{p} is a pickle-based checkpoint, which can run code when loaded; convert it to "
                "safetensors, or pass allow_pickle=True (--allow-pickle) to load it with weights_only=True"
            )
        try:
            state = torch.load(str(p), map_location="cpu", weights_only=True)
        except Exception as exc:  # torch raises UnpicklingError, RuntimeError, ...
            raise IntegrityError(f"{p}: refused by the weights-only loader ({type(exc).__name__})") from None
        if not prefixes or not isinstance(state, dict):
            return state
        return {k: v for k, v in state.items() if isinstance(k, str) and k.startswith(prefixes)}
    raise UnsupportedError(f"{p}: unknown weights format; accepted: .safetensors (or .bin/.pt with opt-in)")


def assign_weights(model: nn.Module, state: dict[str, torch.Tensor], source: str) -> None:
    """Load a state dict strictly: every name present, no extras, shapes and dtypes as the config says."""
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise ConfigError(
            f"{source}: weights do not fit the config; missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for name, t in state.items():
        e = expected[name]
        if tuple(t.shape) != tuple(e.shape):
            raise ConfigError(
                f"{source}: {name} has shape {tuple(t.shape)}, the config needs {tuple(e.shape)}"
            )
        if not t.is_floating_point():
            raise ConfigError(f"{source}: {name} has dtype {t.dtype}; floating point expected")
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=True)


def renamed_state(
    state: dict[str, Any],
    rename: Callable[[str], str | None],
    dropped: Callable[[str], bool],
    source: str,
    layout: str,
) -> dict[str, torch.Tensor]:
    """A state dict in another code base's key layout -> a family's names: `rename` maps a key (None:
    not part of the layout), `dropped` keys are skipped (training-only entries, derived buffers), and
    any other key, or a value that is not a tensor, is refused (`ConfigError` naming `layout`)."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for name, tensor in state.items():
        if not isinstance(name, str) or not isinstance(tensor, torch.Tensor):
            unknown.append(repr(name))
            continue
        if dropped(name):
            continue
        new = rename(name)
        if new is None:
            unknown.append(name)
        else:
            out[new] = tensor
    if unknown:
        raise ConfigError(f"{source}: {len(unknown)} entries are not part of {layout}: {sorted(unknown)[:5]}")
    return out
