"""Public facade: `from mmedge import sdk; p = sdk.Pipeline("clip-tiny")`. Torch-free."""

from mmedge.errors import (
    ConfigError,
    IntegrityError,
    InvalidInputError,
    MmedgeError,
    ModelNotFoundError,
    UnsupportedError,
)
from mmedge.runtime.store import list_packages, model_home
from mmedge.sdk.pipeline import Pipeline

__all__ = [
    "ConfigError",
    "IntegrityError",
    "InvalidInputError",
    "MmedgeError",
    "ModelNotFoundError",
    "Pipeline",
    "UnsupportedError",
    "list_packages",
    "model_home",
]
