"""Shared fixtures: a random-weight clip-tiny checkpoint and its exported package (session-wide)."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest


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
