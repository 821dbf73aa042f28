"""Shared fixtures: random-weight clip-tiny, blip2-tiny and meta-transformer-tiny checkpoints and
packages (session-wide)."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest


def pytest_configure(config: pytest.Config) -> None:
    """Load torch (where installed) before any test can load usearch: usearch's extension, loaded
    first, makes torch.jit hang later in the same process (the ONNX export behind the fixtures).
    Point the model store ($MMEDGE_HOME, where check records are kept) at a fresh folder, so the
    suite neither reads nor writes the user's."""
    with contextlib.suppress(ImportError):
        import torch  # noqa: F401
    os.environ["MMEDGE_HOME"] = tempfile.mkdtemp(prefix="mmedge-test-home-")


@pytest.fixture(scope="session")
def tiny_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmedge.models.init import init_checkpoint

    return init_checkpoint("clip-tiny", tmp_path_factory.mktemp("ckpt") / "clip-tiny-ckpt", seed=0)


@pytest.fixture(scope="session")
def tiny_pkg_session(tmp_path_factory: pytest.TempPathFactory, tiny_ckpt: Path) -> Path:
    from mmedge.export.exporter import export_model

    out = tmp_path_factory.mktemp("pkg") / "clip-tiny"
    export_model(tiny_ckpt, out)
    return out


@pytest.fixture(scope="session")
def chat_pkg_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight blip2-tiny package (int8 encoders, int4 LLM, ORT build): read-only."""
    from mmedge.builds.package import build_package
    from mmedge.calibration.package import calibrate_package
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_checkpoint

    root = tmp_path_factory.mktemp("chat")
    ckpt = init_checkpoint("blip2-tiny", root / "ckpt", seed=0)
    export_model(ckpt, root / "blip2-tiny")
    calibrate_package(root / "blip2-tiny", "train-shapes:24", samples=16)
    build_package(root / "blip2-tiny", backend="ort")
    return root / "blip2-tiny"


@pytest.fixture(scope="session")
def tiny_chat_pkg_session(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight blip2-tiny package as exported (fp32, no builds): read-only."""
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_checkpoint

    root = tmp_path_factory.mktemp("chat-fp32")
    export_model(init_checkpoint("blip2-tiny", root / "ckpt", seed=0), root / "blip2-tiny")
    return root / "blip2-tiny"


@pytest.fixture(scope="session")
def mt_ckpt(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A random-weight meta-transformer-tiny checkpoint (points, audio and IMU heads)."""
    from mmedge.models.init import init_checkpoint

    return init_checkpoint("meta-transformer-tiny", tmp_path_factory.mktemp("mt") / "ckpt", seed=0)


@pytest.fixture(scope="session")
def mt_pkg_session(tmp_path_factory: pytest.TempPathFactory, mt_ckpt: Path) -> Path:
    """`mt_ckpt` exported (fp32, no builds): a classification package, read-only."""
    from mmedge.export.exporter import export_model

    out = tmp_path_factory.mktemp("mt-pkg") / "meta-transformer-tiny"
    export_model(mt_ckpt, out)
    return out


@pytest.fixture(scope="session")
def ray_instance() -> Iterator[str]:
    """A small local Ray instance (2 CPUs, 200 MB object store) for the session; yields its address,
    which other processes join as they would join a cluster."""
    ray = pytest.importorskip("ray", reason="Ray tests need the ray extra (pip install 'mmedge[ray]')")
    ray.init(num_cpus=2, object_store_memory=200 * 1024**2, include_dashboard=False, log_to_driver=False)
    try:
        yield ray.get_runtime_context().gcs_address
    finally:
        ray.shutdown()


@pytest.fixture()
def tiny_pkg(tmp_path: Path, tiny_pkg_session: Path) -> Path:
    """A private copy of the exported package, safe to modify."""
    dst = tmp_path / "clip-tiny"
    shutil.copytree(tiny_pkg_session, dst)
    return dst


@pytest.fixture()
def store(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """An empty model store ($MMEDGE_HOME) for this test."""
    home = tmp_path / "store"
    home.mkdir()
    monkeypatch.setenv("MMEDGE_HOME", str(home))
    return home
