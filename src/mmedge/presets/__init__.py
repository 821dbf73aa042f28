"""Named model configs that ship with mmedge (JSON: `{"family", "description", "config"}`). Torch-free,
so the command line can list them without the host-side packages."""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from mmedge.errors import ModelNotFoundError


def list_presets() -> list[str]:
    """Names of the presets that ship with mmedge."""
    return sorted(p.name[:-5] for p in resources.files(__name__).iterdir() if p.name.endswith(".json"))


def read_preset(name: str) -> dict[str, Any]:
    """The preset's JSON document, or a ModelNotFoundError listing the presets."""
    if name not in list_presets():
        raise ModelNotFoundError(f"no preset {name!r}; presets: {list_presets()}")
    data: dict[str, Any] = json.loads(resources.files(__name__).joinpath(f"{name}.json").read_text())
    return data
