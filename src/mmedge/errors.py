"""Typed errors raised by mmedge. Every message says what was wrong and what is accepted."""

from __future__ import annotations

from typing import Any


class MmedgeError(Exception):
    """Base class of every error mmedge raises on purpose."""


class InvalidInputError(MmedgeError, ValueError):
    """A user-supplied image, text, array or parameter was rejected at the boundary."""


class IntegrityError(MmedgeError):
    """A model package or file failed verification (hash, size, schema, paths)."""


class UnsupportedError(MmedgeError):
    """A format, family, operator or backend that this install cannot handle."""


class ModelNotFoundError(MmedgeError, LookupError):
    """No package matched a name or path; the message lists what exists."""


class ConfigError(MmedgeError, ValueError):
    """A model configuration or checkpoint does not fit the family it claims."""


class MissingDependencyError(MmedgeError, ImportError):
    """An optional library is needed; the message names the extra to install."""


class IndexServiceError(MmedgeError, RuntimeError):
    """A vector index service (a Milvus server, or a Milvus Lite file) failed or refused a request;
    the message names the index and the service's reason."""


class UnbuiltPrecisionWarning(UserWarning):
    """A quantized precision runs without its backend build (correct, but slower than it should be)."""


class ContextFullWarning(UserWarning):
    """Generation stopped before max_new_tokens because the model's context was full."""


def require(module: str, extra: str):
    """Import an optional dependency or raise an error naming the extra that provides it."""
    import importlib

    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingDependencyError(
            f"{module!r} is not installed; install it with: pip install 'mmedge[{extra}]'"
        ) from exc


OPENCV_HINT = (
    "install it with: pip install 'mmedge[images]' (the opencv-python-headless wheel), or use the "
    "platform's own OpenCV (JetPack: apt install nvidia-opencv; Debian/Ubuntu: apt install "
    "python3-opencv; a venv must then be made with --system-site-packages)"
)


def require_opencv() -> Any:
    """The `cv2` module, from the opencv-python-headless wheel or the platform's own OpenCV (JetPack's
    libopencv-python is importable as `cv2` without being a pip distribution), or an error naming both."""
    try:
        import cv2
    except ImportError as exc:
        raise MissingDependencyError(
            f"OpenCV (the cv2 module) is needed to decode, resize and draw images and could not be "
            f"imported ({exc}); {OPENCV_HINT}"
        ) from exc
    return cv2


class BackendError(MmedgeError, RuntimeError):
    """A backend failed to load or run a component; the message names the component and the reason."""


class DeadlineExceededError(BackendError, TimeoutError):
    """A component's run took longer than its deadline and was cancelled."""


class MemoryBudgetError(UnsupportedError):
    """A package needs more memory than the budget a pipeline was given."""
