"""Hostile HTTP input: each is a 4xx JSON error object, and the server stays healthy afterwards."""

from __future__ import annotations

import base64
import json
import select
import socket
import struct
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import data_url, running, scene_png

from mmedge.errors import ConfigError
from mmedge.runtime.generation import LanguageModel
from mmedge.sdk.serve.config import ServeConfig

TOKEN = "s3cret-token"


@pytest.fixture(scope="module")
def hostile(served: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Any]]:
    allowed = tmp_path_factory.mktemp("allowed")
    with running(
        served,
        token=TOKEN,
        allow_files=allowed,
        allow_hosts=("127.0.0.1", "169.254.169.254", "localhost", "*.nip.io"),
        max_tokens=48,
        max_body_bytes=1 << 20,
    ) as (url, srv):
        srv.allowed_dir = allowed
        yield url, srv


def post(url: str, path: str, body: Any = None, token: str | None = TOKEN, **kw: Any) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if body is not None:
        kw["content"] = body if isinstance(body, (bytes, str)) else json.dumps(body)
        headers["Content-Type"] = "application/json"
    return httpx.post(url + path, headers=headers, timeout=60, **kw)


def assert_error(resp: httpx.Response, status: int, code: str | None = None) -> dict[str, Any]:
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith("application/json")
    error = resp.json()["error"]
    assert set(error) >= {"message", "type", "code"} and isinstance(error["message"], str)
    assert "Traceback" not in resp.text and 'File "' not in resp.text
    if code is not None:
        assert error["code"] == code, error
    return error


def assert_healthy(url: str) -> None:
    assert httpx.get(url + "/health", timeout=10).status_code == 200
    ok = post(url, "/v1/embeddings", {"model": "clip-t", "input": "still fine"})
    assert ok.status_code == 200, ok.text


def chat(image: str = "", text: str = "hi", **extra: Any) -> dict[str, Any]:
    content: list[dict[str, Any]] = [{"type": "text", "text": text}]
    if image:
        content.insert(0, {"type": "image_url", "image_url": {"url": image}})
    return {"model": "blip2-t", "messages": [{"role": "user", "content": content}], **extra}


def png_header_bomb(width: int, height: int) -> bytes:
    """A small PNG whose header claims width x height pixels (a decompression bomb's shape)."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 65536, 9)  # the first rows only: a bomb need not be complete to hurt
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize(
    ("body", "code"),
    [
        (b'{"model": "clip-t", "input": ', "invalid_json"),
        (b"\xff\xfe not json", "invalid_json"),
        ({"model": "clip-t", "input": 5}, "invalid_value"),
        ({"model": ["clip-t"], "input": "x"}, "invalid_value"),
        ({"model": "clip-t", "input": "x", "user": "me"}, "unknown_field"),
        ({"model": "clip-t", "input": "x" * 10_001}, "invalid_value"),
        ({"model": "clip-t", "input": [[1, 2, 3]]}, "invalid_value"),  # token arrays are not taken
        ({"model": "nope", "input": "x"}, "model_not_found"),
        ({"model": "blip2-t", "input": "x"}, "wrong_model_task"),
    ],
)
def test_bad_embedding_bodies(hostile: Any, body: Any, code: str) -> None:
    url, _ = hostile
    assert_error(post(url, "/v1/embeddings", body), 404 if code == "model_not_found" else 400, code)
    assert_healthy(url)


@pytest.mark.parametrize(
    ("extra", "code"),
    [
        ({"max_tokens": -1}, "invalid_value"),
        ({"max_tokens": 10**9}, "invalid_value"),
        ({"max_tokens": "5"}, "invalid_value"),
        ({"temperature": 3}, "invalid_value"),
        ({"stream": "yes"}, "invalid_value"),
        ({"logit_bias": {"1": 5}}, "unknown_field"),
        ({"stop": [""]}, "invalid_value"),
    ],
)
def test_bad_chat_parameters(hostile: Any, extra: dict[str, Any], code: str) -> None:
    url, _ = hostile
    assert_error(post(url, "/v1/chat/completions", chat(data_url(scene_png(1)), **extra)), 400, code)
    assert_healthy(url)


def test_ten_thousand_messages(hostile: Any) -> None:
    url, _ = hostile
    body = {"model": "blip2-t", "messages": [{"role": "user", "content": "hi"}] * 10_000}
    error = assert_error(post(url, "/v1/chat/completions", body), 400, "invalid_value")
    assert "1024" in error["message"]
    assert_healthy(url)


def test_a_conversation_the_package_cannot_take(hostile: Any) -> None:
    url, _ = hostile
    body = {"model": "blip2-t", "messages": [{"role": "system", "content": "be brief"}]}
    assert_error(post(url, "/v1/chat/completions", body), 400, "invalid_value")
    assert_healthy(url)


@pytest.mark.parametrize(
    ("image", "code"),
    [
        ("http://127.0.0.1:9/x.png", "host_not_allowed"),
        ("http://169.254.169.254/latest/meta-data/", "host_not_allowed"),
        ("http://localhost/x.png", "host_not_allowed"),
        ("http://[::ffff:127.0.0.1]/x.png", "host_not_allowed"),
        ("https://example.com/x.png", "host_not_allowed"),  # not on the allow-list
        ("file:///etc/passwd", "file_not_allowed"),
        ("ftp://example.com/x.png", "invalid_image_url"),
        ("data:image/png;base64,@@@", "invalid_image_url"),
        ("data:text/plain;base64,aGk=", "invalid_image_url"),
    ],
)
def test_image_urls_that_are_refused(hostile: Any, image: str, code: str) -> None:
    url, _ = hostile
    assert_error(post(url, "/v1/chat/completions", chat(image)), 400, code)
    assert_error(post(url, "/v1/embeddings", {"model": "clip-t", "input": [{"image": image}]}), 400, code)
    assert_healthy(url)


def test_file_urls_cannot_leave_the_allowed_directory(hostile: Any, tmp_path: Any) -> None:
    url, srv = hostile
    outside = tmp_path / "outside.png"
    outside.write_bytes(scene_png(2))
    link = srv.allowed_dir / "link.png"
    link.symlink_to(outside)
    for target in (outside.as_uri(), link.as_uri(), (srv.allowed_dir / ".." / outside.name).as_uri()):
        assert_error(
            post(url, "/v1/embeddings", {"model": "clip-t", "input": [{"image": target}]}),
            400,
            "file_not_allowed",
        )
    assert_healthy(url)


def test_a_decompression_bomb_is_refused_from_its_header(hostile: Any) -> None:
    url, _ = hostile
    bomb = png_header_bomb(100_000, 100_000)
    assert len(bomb) < 1000
    error = assert_error(post(url, "/v1/chat/completions", chat(data_url(bomb))), 400, "invalid_value")
    assert "pixels" in error["message"]
    assert_error(post(url, "/v1/embeddings", {"model": "clip-t", "input": [{"image": data_url(bomb)}]}), 400)
    assert_healthy(url)


def test_missing_or_wrong_bearer_token(hostile: Any) -> None:
    url, _ = hostile
    for token in (None, "wrong", TOKEN + "x"):
        resp = post(url, "/v1/embeddings", {"model": "clip-t", "input": "x"}, token=token)
        assert_error(resp, 401, "invalid_api_key")
        assert resp.headers["www-authenticate"] == "Bearer"
    assert_error(httpx.get(url + "/metrics", headers={"Authorization": "Basic " + TOKEN}), 401)
    assert httpx.get(url + "/ready").status_code == 200  # probes need no token
    assert_healthy(url)


def test_unknown_routes_and_methods(hostile: Any) -> None:
    url, _ = hostile
    assert_error(post(url, "/v1/completions", {"model": "x"}), 404, "not_found")
    assert_error(httpx.get(url + "/v1/embeddings", headers={"Authorization": f"Bearer {TOKEN}"}), 405)
    assert_healthy(url)


def _raw(url: str, head: bytes, body: Iterator[bytes]) -> tuple[bytes, int]:
    """Send a request over a raw socket, reading as soon as the server answers; (the response,
    body bytes sent before the server stopped reading)."""
    host, port = url.removeprefix("http://").split(":")
    sock = socket.create_connection((host, int(port)), timeout=10)
    sent, response = 0, b""
    try:
        sock.sendall(head)
        for chunk in body:
            if select.select([sock], [], [], 0)[0]:
                break  # answered: stop sending
            try:
                sock.settimeout(2)
                sock.sendall(chunk)
            except OSError:  # timed out or reset: the server stopped reading
                break
            sent += len(chunk)
        sock.settimeout(10)
        while True:
            try:
                data = sock.recv(65536)
            except OSError:
                break
            if not data:
                break
            response += data
        return response, sent
    finally:
        sock.close()


def test_a_100_mb_body_is_refused_by_its_content_length(hostile: Any) -> None:
    url, _ = hostile
    size = 100 * 1024 * 1024
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {size}\r\n\r\n"
    ).encode()
    start = time.monotonic()
    response, sent = _raw(url, head, iter([b"{" + b" " * 65535] * 1600))
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert b'"body_too_large"' in response
    assert sent < 64 * 1024 * 1024 and time.monotonic() - start < 30
    assert_healthy(url)


def test_a_streamed_100_mb_body_is_refused_without_reading_it_all(hostile: Any) -> None:
    url, _ = hostile
    head = (
        f"POST /v1/embeddings HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\n"
        "Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
    ).encode()
    piece = b" " * (1 << 20)
    chunks = (b"%x\r\n" % len(piece) + piece + b"\r\n" for _ in range(100))
    response, sent = _raw(url, head, chunks)
    assert response.startswith(b"HTTP/1.1 413"), response[:200]
    assert sent < 64 * 1024 * 1024, f"{sent} bytes were read before the refusal"
    assert_healthy(url)


def slow_tokens(monkeypatch: pytest.MonkeyPatch, seconds: float) -> None:
    """Every LLM step takes `seconds` longer: long enough to leave in the middle of an answer."""
    forward = LanguageModel.forward

    def slow(self: LanguageModel, *args: Any, **kw: Any) -> Any:
        time.sleep(seconds)
        return forward(self, *args, **kw)

    monkeypatch.setattr(LanguageModel, "forward", slow)


def metric(url: str, name: str) -> float:
    text = httpx.get(url + "/metrics", headers={"Authorization": f"Bearer {TOKEN}"}).text
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(name))


def test_a_client_leaving_mid_stream_stops_generation(hostile: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    url, _ = hostile
    slow_tokens(monkeypatch, 0.05)
    before = metric(url, "mmedge_serve_generated_tokens_total")
    cancelled = metric(url, "mmedge_serve_cancelled_generations_total")
    body = chat(data_url(scene_png(3)), max_tokens=48, temperature=0, stream=True)
    headers = {"Authorization": f"Bearer {TOKEN}"}
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, headers=headers, timeout=60) as resp:
        for line in resp.iter_lines():
            if '"content"' in line and '"content":""' not in line:
                break  # the first piece of the answer arrived: leave (the block closes the connection)
        else:
            raise AssertionError("the stream ended before any piece")
    deadline = time.monotonic() + 20
    while metric(url, "mmedge_serve_cancelled_generations_total") == cancelled:
        assert time.monotonic() < deadline, "the generation was not stopped"
        time.sleep(0.05)
    generated = metric(url, "mmedge_serve_generated_tokens_total") - before
    assert 1 <= generated < 20, generated  # 48 would mean it ran to the end
    assert_healthy(url)


def test_a_full_queue_answers_429_with_retry_after(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_tokens(monkeypatch, 0.05)
    with running(served, workers=1, max_queue=0, max_tokens=48) as (url, _):
        body = chat(data_url(scene_png(4)), max_tokens=30, temperature=0)
        first: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: first.update(r=post(url, "/v1/chat/completions", body, token=None))
        )
        thread.start()
        deadline = time.monotonic() + 10
        while "mmedge_serve_in_flight 1.0" not in httpx.get(url + "/metrics").text:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        busy = post(url, "/v1/embeddings", {"model": "clip-t", "input": "x"}, token=None)
        assert_error(busy, 429, "queue_full")
        assert busy.headers["retry-after"] == "1"
        thread.join()
        assert first["r"].status_code == 200
        assert post(url, "/v1/embeddings", {"model": "clip-t", "input": "x"}, token=None).status_code == 200


def test_shutdown_finishes_requests_in_flight(
    served: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    slow_tokens(monkeypatch, 0.05)
    with running(served, max_tokens=48) as (url, srv):
        body = chat(data_url(scene_png(5)), max_tokens=20, temperature=0)
        result: dict[str, Any] = {}
        thread = threading.Thread(
            target=lambda: result.update(r=post(url, "/v1/chat/completions", body, token=None))
        )
        thread.start()
        time.sleep(0.3)  # the request is generating
        srv.stop()
        thread.join(timeout=30)
        assert srv.state.draining
        assert result["r"].status_code == 200 and result["r"].json()["usage"]["completion_tokens"] == 20


def test_binding_beyond_loopback_needs_a_token() -> None:
    with pytest.raises(ConfigError, match="bearer token"):
        ServeConfig(host="0.0.0.0")
    assert ServeConfig(host="0.0.0.0", token="t").token == "t"
    assert ServeConfig(host="::1").token is None


def test_base64_of_the_right_size_only() -> None:
    from mmedge.runtime.images import ImageLimits
    from mmedge.sdk.serve.errors import ApiError
    from mmedge.sdk.serve.media import ImageFetcher

    fetcher = ImageFetcher(None, (), ImageLimits(max_bytes=1000), 1.0)
    assert fetcher.fetch("data:image/png;base64," + base64.b64encode(b"x" * 1000).decode()) == b"x" * 1000
    with pytest.raises(ApiError, match="larger than 1000 bytes"):
        fetcher.fetch("data:image/png;base64," + base64.b64encode(b"x" * 1004).decode())
