"""Dynamic batching, remote image fetching and the command line, each on its own."""

from __future__ import annotations

import http.server
import subprocess
import sys
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np
import pytest
from conftest import running, scene_png

from mmedge.runtime.images import ImageLimits
from mmedge.sdk.serve import media
from mmedge.sdk.serve.errors import ApiError
from mmedge.sdk.serve.media import ImageFetcher


def batch_count(url: str) -> float:
    text = httpx.get(url + "/metrics").text
    return sum(
        float(line.split()[-1])
        for line in text.splitlines()
        if line.startswith("mmedge_serve_embedding_batch_size_count") and 'kind="text"' in line
    )


@pytest.mark.parametrize(("batch_size", "most_calls"), [(32, 8), (1, 16)])
def test_concurrent_embeddings_share_model_calls(
    served: dict[str, Any], batch_size: int, most_calls: int
) -> None:
    texts = [f"a red circle number {i}" for i in range(16)]
    with running(served, batch_size=batch_size, batch_wait_ms=50) as (url, _):
        with ThreadPoolExecutor(16) as pool:
            replies = list(
                pool.map(
                    lambda t: httpx.post(
                        url + "/v1/embeddings",
                        json={"model": "clip-t", "input": t, "encoding_format": "float"},
                        timeout=60,
                    ),
                    texts,
                )
            )
        calls = batch_count(url)
    vectors = np.array([r.json()["data"][0]["embedding"] for r in replies])
    want = served["clip-t"].embed_texts(texts)
    assert np.abs(vectors - want).max() < 1e-5  # batched with others: other padding, same vectors
    assert calls <= most_calls if batch_size > 1 else calls == 16


class _Images(http.server.BaseHTTPRequestHandler):
    png = b""

    def do_GET(self) -> None:
        if self.path == "/redirect":
            self.send_response(302)
            self.send_header("Location", "http://169.254.169.254/")
            self.end_headers()
            return
        body = self.png if self.path == "/scene.png" else self.png * 100
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture()
def image_host(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    """An image server on 127.0.0.1, reached as `images.test` (loopback counts as public here only)."""
    _Images.png = scene_png(40)
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Images)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    monkeypatch.setattr(media, "is_public", lambda address: True)
    yield httpd.server_address[1]
    httpd.shutdown()


def test_remote_images_from_allowed_hosts(image_host: int) -> None:
    pinned: list[str] = []

    def resolver(host: str, port: int) -> list[str]:
        pinned.append(host)
        return ["127.0.0.1"]

    limits = ImageLimits(max_bytes=len(_Images.png) * 10)
    fetcher = ImageFetcher(None, ("*.test",), limits, 5.0, resolver=resolver)
    assert fetcher.fetch(f"http://images.test:{image_host}/scene.png") == _Images.png
    assert pinned == ["images.test"]  # resolved once, by the checked resolver
    with pytest.raises(ApiError, match="redirects"):
        fetcher.fetch(f"http://images.test:{image_host}/redirect")
    with pytest.raises(ApiError, match="larger than"):
        fetcher.fetch(f"http://images.test:{image_host}/big.png")
    with pytest.raises(ApiError, match="allow-list"):
        fetcher.fetch(f"http://other.example:{image_host}/scene.png")
    with pytest.raises(ApiError, match="credentials"):
        fetcher.fetch(f"http://user:pw@images.test:{image_host}/scene.png")


def test_every_resolved_address_is_checked() -> None:
    fetcher = ImageFetcher(
        None, ("mixed.test",), ImageLimits(), 1.0, resolver=lambda h, p: ["93.184.216.34", "10.0.0.5"]
    )
    with pytest.raises(ApiError, match="non-public address"):
        fetcher.fetch("https://mixed.test/x.png")
    for address in (
        "127.0.0.1",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",
        "::1",
        "fe80::1",
        "fd00::1",
        "::ffff:10.0.0.1",
        "0.0.0.0",
        "224.0.0.1",
    ):
        assert not media.is_public(address), address
    assert media.is_public("93.184.216.34") and media.is_public("2606:2800:220:1::1")


def test_serve_help_explains_every_option() -> None:
    from mmedge.sdk.cli import build_parser

    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    for action in serve._actions:
        if action.option_strings and action.dest != "help":
            assert action.help, f"{action.option_strings} has no help"
    out = subprocess.run(
        [sys.executable, "-m", "mmedge.sdk.cli", "serve", "--help"],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    for option in (
        "--allow-files",
        "--allow-host",
        "--token",
        "--max-queue",
        "--batch-size",
        "--shutdown-timeout",
    ):
        assert option in out


def test_serve_refuses_a_public_bind_without_a_token(
    serve_packages: dict[str, Any], monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmedge.sdk.cli import main

    monkeypatch.delenv("MMEDGE_SERVE_TOKEN", raising=False)
    assert main(["serve", str(serve_packages["clip-t"]), "--host", "0.0.0.0"]) == 1
