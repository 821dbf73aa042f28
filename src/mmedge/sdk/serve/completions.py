"""Chat completions: OpenAI requests -> pipeline calls, and the answers back in OpenAI's shapes.

Messages map one to one onto `ChatPipeline.chat_messages` (an `image_url` part becomes an image
part holding the fetched bytes), so a conversation that extends an earlier one is replayed from
the pipeline's kept KV cache. A text-generation package answers a single user message.

Generation runs in a pool thread that hands text pieces to the event loop; the loop sets `stop`
when the client goes away or the request times out, and the thread stops pulling the pipeline's
iterator at the next piece, so no more tokens are generated.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

from mmedge.runtime.chat import ChatPipeline
from mmedge.runtime.generation import Usage
from mmedge.runtime.textgen import TextGenerationPipeline
from mmedge.sdk.serve.errors import ApiError
from mmedge.sdk.serve.schemas import ChatRequest, ImagePart

_END = object()


def generation_kwargs(req: ChatRequest, max_tokens_cap: int) -> dict[str, Any]:
    """HF-style generation parameters of a request (OpenAI's defaults: temperature 1, top_p 1)."""
    if req.max_tokens is not None and req.max_completion_tokens is not None:
        raise ApiError(400, "give max_tokens or max_completion_tokens, not both", code="invalid_value")
    wanted = req.max_completion_tokens or req.max_tokens or max_tokens_cap
    if wanted > max_tokens_cap:
        raise ApiError(
            400, f"max_tokens is {wanted}; this server allows at most {max_tokens_cap}", code="invalid_value"
        )
    temperature = 1.0 if req.temperature is None else req.temperature
    gen: dict[str, Any] = {"max_new_tokens": wanted, "seed": req.seed}
    if temperature > 0:  # OpenAI samples from the whole distribution: no top-k cut
        gen.update(do_sample=True, temperature=temperature, top_k=0, top_p=req.top_p or 1.0)
    if req.stop is not None:
        gen["stop_strings"] = [req.stop] if isinstance(req.stop, str) else list(req.stop)
    return gen


def pipeline_messages(req: ChatRequest, fetch: Callable[[str], bytes]) -> list[dict[str, Any]]:
    """The request's messages in the chat pipeline's form, images fetched (blocking: run in the pool)."""
    out: list[dict[str, Any]] = []
    for m in req.messages:
        if isinstance(m.content, str):
            out.append({"role": m.role, "content": m.content})
            continue
        parts: list[dict[str, Any]] = []
        for p in m.content:
            if isinstance(p, ImagePart):
                parts.append({"type": "image", "image": fetch(p.image_url.url)})
            else:
                parts.append({"type": "text", "text": p.text})
        out.append({"role": m.role, "content": parts})
    return out


def start_generation(
    pipe: ChatPipeline | TextGenerationPipeline,
    req: ChatRequest,
    gen: dict[str, Any],
    fetch: Callable[[str], bytes],
    usage: Usage,
) -> Iterator[str]:
    """The pipeline's piece iterator for a request (blocking: images are fetched and encoded, and
    a bad request fails here, before any answer is sent)."""
    if isinstance(pipe, ChatPipeline):
        return pipe.chat_messages(pipeline_messages(req, fetch), stream=True, usage=usage, **gen)  # type: ignore[return-value]
    m = req.messages
    if len(m) != 1 or m[0].role != "user" or not isinstance(m[0].content, str):
        raise ApiError(
            400,
            "a text-generation model takes one user message whose content is a string",
            code="invalid_value",
        )
    return pipe.generate(m[0].content, stream=True, usage=usage, **gen)  # type: ignore[return-value]


class Generation:
    """Pieces of one generation passed from a pool thread to the event loop."""

    def __init__(self, pieces: Iterator[str], loop: asyncio.AbstractEventLoop):
        self.pieces, self.loop = pieces, loop
        self.queue: asyncio.Queue[object] = asyncio.Queue()
        self.stop = threading.Event()

    def run(self) -> None:
        """Pull pieces until the end or `stop` (in a pool thread); the iterator is closed either way."""
        try:
            for piece in self.pieces:
                self.loop.call_soon_threadsafe(self.queue.put_nowait, piece)
                if self.stop.is_set():
                    break
        except BaseException as exc:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, exc)
        finally:
            close = getattr(self.pieces, "close", None)
            if close is not None:
                close()
            self.loop.call_soon_threadsafe(self.queue.put_nowait, _END)

    async def next(self) -> str | None:
        """The next piece; None at the end; the generation's error is raised here."""
        item = await self.queue.get()
        if item is _END:
            return None
        if isinstance(item, BaseException):
            raise item
        assert isinstance(item, str)
        return item


def completion_id() -> str:
    return "chatcmpl-" + secrets.token_hex(12)


def usage_body(usage: Usage) -> dict[str, Any]:
    return {
        "prompt_tokens": usage.prompt_tokens,
        "completion_tokens": usage.completion_tokens,
        "total_tokens": usage.prompt_tokens + usage.completion_tokens,
        "prompt_tokens_details": {"cached_tokens": usage.cached_tokens},
    }


def completion_body(cid: str, model: str, text: str, usage: Usage) -> dict[str, Any]:
    return {
        "id": cid,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": usage.finish_reason or "stop",
                "logprobs": None,
            }
        ],
        "usage": usage_body(usage),
    }


def chunk_body(
    cid: str, model: str, delta: dict[str, Any], finish: str | None = None, usage: Usage | None = None
) -> dict[str, Any]:
    body: dict[str, Any] = {
        "id": cid,
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": model,
        "choices": [] if usage is not None else [{"index": 0, "delta": delta, "finish_reason": finish}],
    }
    if usage is not None:
        body["usage"] = usage_body(usage)
    return body
