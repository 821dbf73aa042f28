"""A real server driven by the official `openai` client: results equal the in-process pipeline's."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest

openai = pytest.importorskip("openai")

from conftest import data_url, scene_png

from mmedge import sdk


def client(url: str) -> Any:
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=60)


def ask(image: str, question: str) -> list[dict[str, Any]]:
    return [
        {
            "role": "user",
            "content": [
                {"type": "image_url", "image_url": {"url": image}},
                {"type": "text", "text": question},
            ],
        }
    ]


def local(messages: list[dict[str, Any]], png: bytes) -> list[dict[str, Any]]:
    """The same conversation as the pipeline takes it: image parts carry the bytes."""
    out = []
    for m in messages:
        content = m["content"]
        if isinstance(content, list):
            content = [{"type": "image", "image": png} if p["type"] == "image_url" else p for p in content]
        out.append({"role": m["role"], "content": content})
    return out


def test_chat_with_an_image_equals_the_pipeline(server: Any, serve_packages: dict[str, Path]) -> None:
    url, _ = server
    png = scene_png(11)
    messages = ask(data_url(png), "what colour is the circle?")
    reference = sdk.Pipeline(serve_packages["blip2-t"])
    want = reference.chat_messages(local(messages, png), max_new_tokens=12)

    reply = client(url).chat.completions.create(
        model="blip2-t",
        messages=messages,
        max_tokens=12,
        temperature=0,  # type: ignore[arg-type]
    )
    assert reply.choices[0].message.content == want and want
    assert reply.choices[0].finish_reason == "length"  # random weights never say EOS within 12 tokens
    assert reply.usage is not None and reply.usage.completion_tokens == 12
    assert reply.usage.prompt_tokens > 4  # the image's 4 query embeddings and the question's tokens

    stream = client(url).chat.completions.create(
        model="blip2-t",
        messages=messages,  # type: ignore[arg-type]
        max_tokens=12,
        temperature=0,
        stream=True,
        stream_options={"include_usage": True},
    )
    chunks = list(stream)
    pieces = [c.choices[0].delta.content or "" for c in chunks if c.choices]
    assert len([p for p in pieces if p]) > 1, "the answer came in one piece: not streamed"
    assert "".join(pieces) == want
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 12


def test_raw_stream_ends_with_done(server: Any) -> None:
    url, _ = server
    body = {
        "model": "blip2-t",
        "messages": ask(data_url(scene_png(12)), "hi"),
        "max_tokens": 3,
        "stream": True,
    }
    with httpx.stream("POST", f"{url}/v1/chat/completions", json=body, timeout=60) as resp:
        assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in resp.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    assert lines[-1] == "data: [DONE]" and lines.count("data: [DONE]") == 1


def test_a_follow_up_turn_reuses_the_kept_kv_cache(server: Any, serve_packages: dict[str, Path]) -> None:
    url, _ = server
    png = scene_png(13)
    first = ask(data_url(png), "what colour is the circle?")
    c = client(url)
    answer = c.chat.completions.create(model="blip2-t", messages=first, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    follow = [
        *first,
        {"role": "assistant", "content": answer.choices[0].message.content},
        {"role": "user", "content": "and the square?"},
    ]
    reply = c.chat.completions.create(model="blip2-t", messages=follow, max_tokens=4, temperature=0)  # type: ignore[arg-type]
    assert reply.usage is not None and reply.usage.prompt_tokens_details is not None
    cached = reply.usage.prompt_tokens_details.cached_tokens or 0
    # the whole first turn (image, question, answer) came from the cache: more than its prompt
    assert cached > (answer.usage.prompt_tokens if answer.usage else 0)
    reference = sdk.Pipeline(serve_packages["blip2-t"])
    assert reply.choices[0].message.content == reference.chat_messages(local(follow, png), max_new_tokens=4)


def test_sampling_parameters_and_stop(server: Any, serve_packages: dict[str, Path]) -> None:
    url, _ = server
    png = scene_png(14)
    messages = ask(data_url(png), "what is there?")
    c = client(url)
    kw: dict[str, Any] = {
        "model": "blip2-t",
        "messages": messages,
        "max_tokens": 10,
        "temperature": 0.8,
        "top_p": 0.9,
    }
    a = c.chat.completions.create(seed=5, **kw).choices[0].message.content
    assert a == c.chat.completions.create(seed=5, **kw).choices[0].message.content  # seeded: repeatable
    reference = sdk.Pipeline(serve_packages["blip2-t"])
    want = reference.chat_messages(
        local(messages, png), max_new_tokens=10, do_sample=True, temperature=0.8, top_p=0.9, top_k=0, seed=5
    )
    assert a == want
    greedy = reference.chat_messages(local(messages, png), max_new_tokens=10)
    stop = greedy[2:4]  # a piece of the answer: it is cut before it
    cut = c.chat.completions.create(
        model="blip2-t", messages=messages, max_tokens=10, temperature=0, stop=[stop]
    )  # type: ignore[arg-type]
    assert cut.choices[0].message.content == greedy[: greedy.find(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_text_and_image_embeddings_equal_the_pipeline(server: Any, serve_packages: dict[str, Path]) -> None:
    url, _ = server
    reference = sdk.Pipeline(serve_packages["clip-t"])
    texts = ["a red circle", "two blue squares and a star"]
    got = client(url).embeddings.create(
        model="clip-t", input=texts
    )  # base64 on the wire (the client's default)
    vectors = np.array([d.embedding for d in got.data])
    assert np.abs(vectors - reference.embed_texts(texts)).max() < 1e-6
    assert got.usage.prompt_tokens > len(texts)

    floats = client(url).embeddings.create(model="clip-t", input="a red circle", encoding_format="float")
    assert (
        np.abs(np.array(floats.data[0].embedding) - reference.embed_texts(["a red circle"])[0]).max() < 1e-6
    )

    pngs = [scene_png(20), scene_png(21)]
    mixed = client(url).embeddings.create(
        model="clip-t",
        input=[{"image": data_url(pngs[0])}, "a red circle", {"image": data_url(pngs[1])}],  # type: ignore[list-item]
        encoding_format="float",
    )
    got_images = np.array([mixed.data[0].embedding, mixed.data[2].embedding])
    assert np.abs(got_images - reference.embed_images(pngs)).max() < 1e-6
    assert [d.index for d in mixed.data] == [0, 1, 2]


def test_file_urls_inside_the_allowed_directory(server: Any, serve_packages: dict[str, Path]) -> None:
    url, srv = server
    png = scene_png(22)
    path = srv.allowed_dir / "scene.png"
    path.write_bytes(png)
    got = client(url).embeddings.create(
        model="clip-t",
        input=[{"image": path.as_uri()}],
        encoding_format="float",  # type: ignore[list-item]
    )
    reference = sdk.Pipeline(serve_packages["clip-t"])
    assert np.abs(np.array(got.data[0].embedding) - reference.embed_images([png])[0]).max() < 1e-6


def test_index_add_search_remove(server: Any) -> None:
    url, _ = server
    items = [
        {"id": 7, "image": data_url(scene_png(30)), "label": "scene 30"},
        {"id": 8, "text": "a big green star", "label": "star"},
    ]
    added = httpx.post(f"{url}/v1/index/add", json={"model": "clip-t", "items": items}, timeout=60)
    assert added.status_code == 200, added.text
    assert added.json()["added"] == 2
    hits = httpx.post(
        f"{url}/v1/search", json={"model": "clip-t", "query": "a big green star", "k": 2}, timeout=60
    )
    assert hits.status_code == 200, hits.text
    assert hits.json()["data"][0] == {"id": 8, "score": pytest.approx(1.0, abs=1e-5), "label": "star"}
    by_image = httpx.post(
        f"{url}/v1/search",
        json={"model": "clip-t", "query": {"image": data_url(scene_png(30))}, "k": 1},
        timeout=60,
    )
    assert by_image.json()["data"][0]["id"] == 7
    again = httpx.post(f"{url}/v1/index/add", json={"model": "clip-t", "items": items[:1]}, timeout=60)
    assert again.status_code == 400 and "already in the index" in again.json()["error"]["message"]
    removed = httpx.post(f"{url}/v1/index/remove", json={"model": "clip-t", "ids": [8, 99]}, timeout=60)
    assert removed.json()["removed"] == 1
    hits = httpx.post(
        f"{url}/v1/search", json={"model": "clip-t", "query": "a big green star", "k": 2}, timeout=60
    )
    assert [h["id"] for h in hits.json()["data"]] == [7]


def test_models_probes_and_metrics(server: Any) -> None:
    url, _ = server
    models = client(url).models.list()
    assert {(m.id, getattr(m, "task", None)) for m in models.data} == {
        ("clip-t", "retrieval"),
        ("blip2-t", "chat"),
    }
    assert httpx.get(f"{url}/health").json() == {"status": "ok"}
    assert httpx.get(f"{url}/ready").status_code == 200
    text = httpx.get(f"{url}/metrics").text
    for name in (
        "mmedge_serve_requests_total",
        "mmedge_serve_errors_total",
        "mmedge_serve_request_seconds_bucket",
        "mmedge_serve_queue_depth",
        "mmedge_serve_generated_tokens_total",
        "mmedge_serve_embedding_batch_size_bucket",
    ):
        assert name in text, name
    assert 'mmedge_serve_requests_total{route="/health",status="200"}' in text
