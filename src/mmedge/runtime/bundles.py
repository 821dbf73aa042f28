"""Device bundles on the device: can this device run what a bundle carries (docs/bundles.md)?

A bundle (`mmedge pack`) carries one target's files: ORT builds are tied to an onnxruntime version
and a CPU architecture, the CUDA and TensorRT execution providers need an onnxruntime build that
has them, and native TensorRT needs the `tensorrt` package (the engines are built on the device).
A bundle opened where its target cannot run is refused when it is opened, naming both sides,
rather than failing at its first call.
"""

from __future__ import annotations

import importlib.util
import platform

from mmedge.errors import UnsupportedError
from mmedge.runtime.manifest import Manifest

# target -> (backend, ORT device) it runs on
TARGET_RUNS = {
    "ort-cpu": ("ort", "cpu"),
    "ort-cuda": ("ort", "cuda"),
    "ort-tensorrt": ("ort", "tensorrt"),
    "tensorrt": ("tensorrt", "cuda"),
}
_PROVIDER = {"ort-cuda": "CUDAExecutionProvider", "ort-tensorrt": "TensorrtExecutionProvider"}


def machine_arch() -> str:
    """The CPU architecture as ORT builds care about it (x86_64 / aarch64)."""
    arch = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(arch, arch)


def check_machine(manifest: Manifest) -> None:
    """Refuse a bundle whose target this device cannot run (UnsupportedError naming both)."""
    bundle = manifest.bundle
    if bundle is None:
        return
    what = f"bundle {manifest.name!r} is packed for {bundle.target}"
    need = bundle.runtime
    if "machine" in need and need["machine"] != machine_arch():
        raise UnsupportedError(
            f"{what} on {need['machine']} (its ORT builds are for that CPU); this device is "
            f"{machine_arch()}: pack it for this device (`mmedge pack ... --portable` carries graphs any CPU runs)"
        )
    if bundle.target.startswith("ort-"):
        import onnxruntime as ort

        if "onnxruntime" in need and need["onnxruntime"] != ort.__version__:
            raise UnsupportedError(
                f"{what} with onnxruntime {need['onnxruntime']} builds; this device has onnxruntime "
                f"{ort.__version__}: install onnxruntime=={need['onnxruntime']}, or pack it again with this "
                "version (or with --portable)"
            )
        provider = _PROVIDER.get(bundle.target)
        if provider is not None and provider not in ort.get_available_providers():
            raise UnsupportedError(
                f"{what} ({provider}); this device's onnxruntime has {ort.get_available_providers()}: "
                "install 'mmedge[gpu]' (onnxruntime-gpu) or pack the bundle for ort-cpu"
            )
    elif importlib.util.find_spec("tensorrt") is None:
        raise UnsupportedError(
            f"{what} (engines are built on the device on first use); this device has no TensorRT: "
            "install 'mmedge[trt]' (or JetPack's TensorRT), or pack the bundle for ort-cpu"
        )


def check_runner(manifest: Manifest, backend: str, device: str) -> None:
    """Refuse running a bundle with another backend or device than its target's."""
    bundle = manifest.bundle
    if bundle is None:
        return
    want = TARGET_RUNS[bundle.target]
    runs = (backend, device if backend == "ort" else want[1])
    if runs != want:
        raise UnsupportedError(
            f"bundle {manifest.name!r} is packed for {bundle.target} (backend {want[0]!r}, device "
            f"{want[1]!r}); it was asked to run with backend {backend!r}, device {device!r}: leave "
            "backend and device unset, or pack the package for that target"
        )
