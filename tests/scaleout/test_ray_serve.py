"""`mmedge serve --ray`: the serve app as a Ray Serve deployment with 2 replicas, driven by `openai`."""

from __future__ import annotations

import base64
import socket
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import pytest

from mmedge import sdk
from mmedge.data import generate_scenes
from mmedge.errors import ConfigError

pytestmark = pytest.mark.ray
openai = pytest.importorskip("openai")
pytest.importorskip("fastapi")
pytest.importorskip("prometheus_client")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def deployment(ray_instance: str, tiny_pkg_session: Path, tiny_chat_pkg_session: Path) -> Iterator[str]:
    from ray import serve

    from mmedge.sdk.serve.config import ServeConfig
    from mmedge.sdk.serve.ray_deploy import deploy, undeploy

    url = deploy(
        [tiny_pkg_session, tiny_chat_pkg_session],
        ServeConfig(port=free_port(), max_tokens=32),
        replicas=2,
        backend="ort",
        precision="auto",
        threads=1,
    )
    try:
        yield url
    finally:
        undeploy()
        serve.shutdown()  # frees the replicas' CPUs for the other Ray tests


def client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def scene_png(seed: int) -> bytes:
    ok, buf = cv2.imencode(".png", generate_scenes(1, seed=seed, image_size=48)[0].image[:, :, ::-1])
    assert ok
    return buf.tobytes()


def test_two_replicas_run(deployment: str) -> None:
    from ray import serve

    app = serve.status().applications["mmedge"]
    assert str(app.status).endswith("RUNNING")
    (state,) = app.deployments.values()
    assert state.replica_states.get("RUNNING") == 2


def test_embeddings_through_the_replicas_equal_the_pipeline(deployment: str, tiny_pkg_session: Path) -> None:
    png = scene_png(5)
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    texts = ["a red circle", "a small blue star", "two shapes"]
    local = sdk.Pipeline(tiny_pkg_session)
    want = np.vstack([local.embed_texts(texts), local.embed_images([png])])

    def ask(_: int) -> np.ndarray:
        reply = client(deployment).embeddings.create(model="clip-tiny", input=[*texts, {"image": url}])  # type: ignore[list-item]
        return np.array([d.embedding for d in reply.data], np.float32)

    with ThreadPoolExecutor(8) as pool:  # several at once: both replicas answer
        for got in pool.map(ask, range(16)):
            np.testing.assert_allclose(got, want, rtol=0, atol=1e-6)


def test_chat_through_the_replicas_equals_the_pipeline(deployment: str, tiny_chat_pkg_session: Path) -> None:
    png = scene_png(7)
    question = "what colour is the circle?"
    url = "data:image/png;base64," + base64.b64encode(png).decode()
    messages = [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": url}}, {"type": "text", "text": question}],
        }
    ]
    want = sdk.Pipeline(tiny_chat_pkg_session).chat_messages(
        [{"role": "user", "content": [{"type": "image", "image": png}, {"type": "text", "text": question}]}],
        max_new_tokens=10,
    )
    reply = client(deployment).chat.completions.create(
        model="blip2-tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
    )
    assert reply.choices[0].message.content == want and want
    stream = client(deployment).chat.completions.create(
        model="blip2-tiny",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=10,
        temperature=0,
        stream=True,
    )
    assert "".join(c.choices[0].delta.content or "" for c in stream if c.choices) == want


def test_errors_keep_the_openai_shape(deployment: str) -> None:
    with pytest.raises(openai.NotFoundError) as err:
        client(deployment).embeddings.create(model="nope", input=["x"])
    assert err.value.body["code"] == "model_not_found"  # type: ignore[index]


def test_index_routes_are_off_across_replicas(deployment: str) -> None:
    """Each replica would keep its own in-memory index: a search could miss what another one added."""
    import httpx

    for route, body in (
        ("index/add", {"model": "clip-tiny", "items": [{"id": 1, "text": "a red circle"}]}),
        ("search", {"model": "clip-tiny", "query": "a red circle"}),
    ):
        reply = httpx.post(f"{deployment}/v1/{route}", json=body, timeout=60)
        assert reply.status_code == 400 and reply.json()["error"]["code"] == "index_not_shared"


def test_refusals_before_deploying(tiny_pkg_session: Path, tmp_path: Path) -> None:
    pytest.importorskip("ray", reason="the ray extra is not installed")
    import shutil

    from mmedge.sdk.serve.config import ServeConfig
    from mmedge.sdk.serve.ray_deploy import deploy

    with pytest.raises(ConfigError, match="fixed --port"):
        deploy([tiny_pkg_session], ServeConfig(port=0), 2, "ort", "auto", 1)
    twin = tmp_path / "twin"
    shutil.copytree(tiny_pkg_session, twin)
    with pytest.raises(ConfigError, match="two packages are named"):
        deploy([tiny_pkg_session, twin], ServeConfig(port=free_port()), 2, "ort", "auto", 1)


def test_ray_options_need_ray(tiny_pkg_session: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from mmedge.sdk import cli

    code = cli.main(["serve", str(tiny_pkg_session), "--replicas", "2", "--ray-address", "10.0.0.1:6379"])
    assert code == 1
    assert "--ray-address, --replicas apply with --ray only" in capsys.readouterr().err
