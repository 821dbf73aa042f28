"""Servers on 127.0.0.1 (an OS-chosen port) in a thread, over tiny random-weight packages."""

from __future__ import annotations

import base64
import contextlib
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("fastapi")
pytest.importorskip("uvicorn")
pytest.importorskip("prometheus_client")
pytest.importorskip("torch")  # the packages are made here: init + export

sys.path.insert(0, str(Path(__file__).parent))
from packages import BLIP2, CLIP, make_package

from mmedge.sdk.serve.config import ServeConfig
from mmedge.sdk.serve.server import Server, open_pipelines


@pytest.fixture(scope="session")
def serve_packages(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("serve")
    return {
        "clip-t": make_package("clip", CLIP, root, "clip-t"),
        "blip2-t": make_package("blip2", BLIP2, root, "blip2-t"),
    }


@pytest.fixture(scope="session")
def served(serve_packages: dict[str, Path]) -> dict[str, Any]:
    """The pipelines servers share (each server has its own queue, pool and metrics)."""
    return open_pipelines(list(serve_packages.values()), "ort", "auto", 1)


@contextlib.contextmanager
def running(pipelines: dict[str, Any], **settings: Any) -> Iterator[tuple[str, Server]]:
    server = Server(pipelines, ServeConfig(port=0, **settings), log_level="warning")
    sock = server.bind()
    thread = threading.Thread(target=server.run, args=(sock,), daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.uvicorn.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}", server
    finally:
        server.stop()
        thread.join(timeout=30)
        assert not thread.is_alive(), "the server did not shut down"


@pytest.fixture(scope="module")
def server(served: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Server]]:
    files = tmp_path_factory.mktemp("allowed")
    with running(served, allow_files=files, max_tokens=48) as (url, srv):
        srv.allowed_dir = files  # type: ignore[attr-defined]
        yield url, srv


def scene_png(seed: int) -> bytes:
    import cv2

    from mmedge.data import generate_scenes

    image = generate_scenes(1, seed=seed, image_size=48)[0].image
    ok, buf = cv2.imencode(".png", image[:, :, ::-1])
    assert ok
    return buf.tobytes()


def data_url(png: bytes) -> str:
    return "data:image/png;base64," + base64.b64encode(png).decode()
