"""The HTTP routes: OpenAI's chat completions, embeddings and models, mmedge's search and index,
and the probes and metrics. `create_app` wires them to already opened pipelines."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmedge.runtime.chat import ChatPipeline
from mmedge.runtime.generation import Usage
from mmedge.runtime.images import load_image
from mmedge.runtime.pipelines import AnyPipeline
from mmedge.runtime.retrieval import RetrievalPipeline
from mmedge.runtime.textgen import TextGenerationPipeline
from mmedge.sdk.serve.admission import Admission
from mmedge.sdk.serve.batching import Batcher
from mmedge.sdk.serve.completions import (
    Generation,
    chunk_body,
    completion_body,
    completion_id,
    generation_kwargs,
    start_generation,
)
from mmedge.sdk.serve.config import ServeConfig
from mmedge.sdk.serve.errors import ApiError, from_exception
from mmedge.sdk.serve.media import ImageFetcher
from mmedge.sdk.serve.metrics import ServeMetrics
from mmedge.sdk.serve.middleware import AuthLayer, BodyLimitLayer, MetricsLayer
from mmedge.sdk.serve.schemas import (
    ChatRequest,
    EmbeddingRequest,
    ImageInput,
    IndexAddRequest,
    IndexRemoveRequest,
    SearchRequest,
)

log = logging.getLogger("mmedge.serve")


@dataclass
class Served:
    """One package as the server offers it."""

    name: str
    pipe: AnyPipeline
    fetcher: ImageFetcher
    batchers: dict[str, Batcher] = field(default_factory=dict)  # "text" / "image", retrieval only

    @property
    def task(self) -> str:
        return self.pipe.runner.manifest.task


class State:
    """Everything the routes share."""

    def __init__(self, pipelines: Mapping[str, AnyPipeline], config: ServeConfig):
        self.config = config
        self.metrics = ServeMetrics()
        self.admission = Admission(config.workers, config.max_queue, config.retry_after_s, self.metrics)
        self.draining = False
        self.models: dict[str, Served] = {}
        for name, pipe in pipelines.items():
            fetcher = ImageFetcher(
                config.allow_files, config.allow_hosts, pipe.runner.image_limits, config.fetch_timeout_s
            )
            served = Served(name, pipe, fetcher)
            if isinstance(pipe, RetrievalPipeline):
                served.batchers = {
                    "text": self._batcher(name, "text", _text_embedder(pipe)),
                    "image": self._batcher(name, "image", _image_embedder(pipe)),
                }
            self.models[name] = served

    def _batcher(self, model: str, kind: str, embed: Any) -> Batcher:
        c = self.config
        return Batcher(
            embed,
            self.admission,
            c.batch_size,
            c.batch_wait_ms / 1000,
            self.metrics.batch_size.labels(model, kind).observe,
            self.metrics.batch_queue.set,
        )

    def indexed_model(self, name: str) -> Served:
        """A retrieval model whose index this server may use."""
        if not self.config.index_routes:
            raise ApiError(
                400,
                "the index routes are off: each replica would keep its own in-memory index",
                code="index_not_shared",
            )
        return self.model(name, ("retrieval",))

    def model(self, name: str, tasks: tuple[str, ...]) -> Served:
        served = self.models.get(name)
        if served is None:
            raise ApiError(
                404, f"model {name!r} is not served here; see GET /v1/models", code="model_not_found"
            )
        if served.task not in tasks:
            raise ApiError(
                400,
                f"model {name!r} is a {served.task} model; this endpoint needs a {' or '.join(tasks)} model",
                code="wrong_model_task",
            )
        return served

    async def close(self) -> None:
        for served in self.models.values():
            for batcher in served.batchers.values():
                await batcher.close()
        self.admission.shutdown()


def _text_embedder(pipe: RetrievalPipeline) -> Any:
    def embed(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        _, mask = pipe.runner.tokenizer.encode_batch(texts)  # the token counts for `usage`
        return pipe.embed_texts(texts), mask.sum(axis=1)

    return embed


def _image_embedder(pipe: RetrievalPipeline) -> Any:
    def embed(images: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
        return pipe.embed_images(images), np.zeros(len(images), np.int64)

    return embed


def create_app(pipelines: Mapping[str, AnyPipeline], config: ServeConfig) -> Any:
    """The ASGI app serving `pipelines` (model name -> opened pipeline) under `config`."""
    state = State(pipelines, config)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        yield
        state.draining = True
        await state.close()

    app = FastAPI(title="mmedge", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.mmedge = state
    _error_handlers(app)
    _routes(app, state)
    wrapped: Any = BodyLimitLayer(app, config.max_body_bytes)
    if config.token is not None:
        wrapped = AuthLayer(wrapped, config.token)
    wrapped = MetricsLayer(wrapped, state.metrics)
    wrapped.state = state  # the server flips `draining` on shutdown signals
    return wrapped


def _error(exc: BaseException) -> JSONResponse:
    error = from_exception(exc)
    return JSONResponse(error.body(), status_code=error.status, headers=error.headers)


def _error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def api_error(_: Request, exc: ApiError) -> JSONResponse:
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        kinds = {e.get("type") for e in errors}
        code = (
            "invalid_json"
            if "json_invalid" in kinds
            else "unknown_field"
            if "extra_forbidden" in kinds
            else "invalid_value"
        )
        shown = []
        for e in errors[:5]:  # where and what, never the input itself (it may be huge)
            where = ".".join(str(p) for p in e.get("loc", ()) if p != "body")
            shown.append(f"{where or 'body'}: {e.get('msg', 'invalid')}")
        more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
        return _error(ApiError(400, "; ".join(shown) + more, code=code))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400:  # FastAPI's only own 400: a body it could not decode
            return _error(ApiError(400, "the request body is not valid JSON (UTF-8)", code="invalid_json"))
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(ApiError(exc.status_code, str(exc.detail), code=code))

    @app.exception_handler(Exception)
    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        return _error(exc)


def _routes(app: FastAPI, state: State) -> None:
    config = state.config

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready")
    async def ready() -> JSONResponse:
        if state.draining:
            return _error(ApiError(503, "the server is shutting down", "server_error", "draining"))
        return JSONResponse({"status": "ready", "models": sorted(state.models)})

    @app.get("/metrics")
    async def metrics() -> Response:
        return Response(state.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {
            "object": "list",
            "data": [
                {"id": name, "object": "model", "created": 0, "owned_by": "mmedge", "task": s.task}
                for name, s in sorted(state.models.items())
            ],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request) -> Response:
        served = state.model(req.model, ("chat", "generation"))
        gen = generation_kwargs(req, config.max_tokens)
        if req.stream:
            return await _stream(served, req, gen)
        async with state.admission.place():
            usage = Usage()
            job = await _started(served, req, gen, usage)
            text = await _collect(job, request)
            state.metrics.prompt_tokens.labels(served.name).inc(usage.prompt_tokens)
            return JSONResponse(completion_body(completion_id(), served.name, text, usage))

    async def _started(served: Served, req: ChatRequest, gen: dict[str, Any], usage: Usage) -> Generation:
        """The request's generation, running in the pool (validation and images already done)."""
        pipe = served.pipe
        assert isinstance(pipe, (ChatPipeline, TextGenerationPipeline))
        try:
            pieces = await asyncio.wait_for(
                state.admission.run(lambda: start_generation(pipe, req, gen, served.fetcher.fetch, usage)),
                config.request_timeout_s,
            )
        except asyncio.TimeoutError:
            raise ApiError(
                504, "the request timed out before generation started", "timeout_error", "timeout"
            ) from None
        job = Generation(pieces, asyncio.get_running_loop())
        counted = state.metrics.generated_tokens.labels(served.name)

        def run() -> None:
            try:
                job.run()
            finally:  # counted from the pool thread, so tokens made after a cancel are counted too
                counted.inc(usage.completion_tokens)
                if job.stop.is_set():
                    state.metrics.cancelled.inc()

        task = asyncio.ensure_future(state.admission.run(run))
        task.add_done_callback(_log_failure)
        return job

    async def _collect(job: Generation, request: Request) -> str:
        """The whole answer; the generation stops if the client leaves or the time runs out."""
        text: list[str] = []
        gone = asyncio.ensure_future(_disconnected(request))
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.request_timeout_s
        try:
            while True:
                piece = asyncio.ensure_future(job.next())
                done, _ = await asyncio.wait(
                    {piece, gone},
                    timeout=max(0.0, deadline - loop.time()),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                if piece not in done:
                    piece.cancel()
                    job.stop.set()
                    if gone in done:
                        raise ApiError(499, "the client closed the request", code="client_closed")
                    raise ApiError(504, "the request timed out", "timeout_error", "timeout")
                value = piece.result()
                if value is None:
                    return "".join(text)
                text.append(value)
        except BaseException:
            job.stop.set()
            raise
        finally:
            gone.cancel()

    async def _stream(served: Served, req: ChatRequest, gen: dict[str, Any]) -> Response:
        place = state.admission.place()
        await place.__aenter__()  # held until the response ends, however it ends (`finish`)
        try:
            usage = Usage()
            job = await _started(served, req, gen, usage)
        except BaseException:
            await place.__aexit__(None, None, None)
            raise
        finished = False

        async def finish() -> None:
            nonlocal finished
            job.stop.set()
            if not finished:
                finished = True
                await place.__aexit__(None, None, None)

        include_usage = req.stream_options is not None and req.stream_options.include_usage
        cid = completion_id()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + config.request_timeout_s

        async def events() -> AsyncIterator[bytes]:
            try:
                yield _sse(chunk_body(cid, served.name, {"role": "assistant", "content": ""}))
                while True:
                    try:
                        piece = await asyncio.wait_for(job.next(), max(0.0, deadline - loop.time()))
                    except asyncio.TimeoutError:
                        job.stop.set()
                        yield _sse(ApiError(504, "the request timed out", "timeout_error", "timeout").body())
                        break
                    except Exception as exc:  # the answer has begun: the error goes in the stream
                        yield _sse(from_exception(exc).body())
                        break
                    if piece is None:
                        yield _sse(chunk_body(cid, served.name, {}, usage.finish_reason or "stop"))
                        if include_usage:
                            yield _sse(chunk_body(cid, served.name, {}, usage=usage))
                        state.metrics.prompt_tokens.labels(served.name).inc(usage.prompt_tokens)
                        break
                    yield _sse(chunk_body(cid, served.name, {"content": piece}))
                yield b"data: [DONE]\n\n"
            finally:  # also when the client went away: the response task is cancelled or closed
                await finish()

        return _Stream(events(), finish)

    @app.post("/v1/embeddings")
    async def embeddings(req: EmbeddingRequest) -> dict[str, Any]:
        served = state.model(req.model, ("retrieval",))
        inputs: list[str | ImageInput] = [req.input] if isinstance(req.input, str) else list(req.input)
        async with state.admission.place():
            vectors, tokens = await _timed(_embed(served, inputs))
        data = [
            {"object": "embedding", "index": i, "embedding": _encoded(v, req.encoding_format)}
            for i, v in enumerate(vectors)
        ]
        used = int(tokens.sum())
        return {
            "object": "list",
            "data": data,
            "model": served.name,
            "usage": {"prompt_tokens": used, "total_tokens": used},
        }

    async def _timed(work: Any) -> Any:
        try:
            return await asyncio.wait_for(work, config.request_timeout_s)
        except asyncio.TimeoutError:
            raise ApiError(504, "the request timed out", "timeout_error", "timeout") from None

    async def _embed(served: Served, inputs: list[str | ImageInput]) -> tuple[np.ndarray, np.ndarray]:
        """Vectors (in input order) and token counts of texts and images, through the batchers."""
        texts = [(i, x) for i, x in enumerate(inputs) if isinstance(x, str)]
        images = [(i, x) for i, x in enumerate(inputs) if isinstance(x, ImageInput)]
        limits = served.pipe.runner.image_limits

        def decode() -> list[np.ndarray]:
            return [load_image(served.fetcher.fetch(x.image), limits=limits) for _, x in images]

        parts: list[Any] = []
        if texts:
            parts.append(served.batchers["text"].submit([x for _, x in texts]))
        if images:
            arrays = await state.admission.run(decode)
            parts.append(served.batchers["image"].submit(arrays))
        results = await asyncio.gather(*parts)
        assert isinstance(served.pipe, RetrievalPipeline)
        vectors = np.empty((len(inputs), served.pipe.dim), np.float32)
        tokens = np.zeros(len(inputs), np.int64)
        for group, (vec, tok) in zip([g for g in (texts, images) if g], results):
            rows = [i for i, _ in group]
            vectors[rows], tokens[rows] = vec, tok
        return vectors, tokens

    @app.post("/v1/search")
    async def search(req: SearchRequest) -> dict[str, Any]:
        served = state.indexed_model(req.model)
        pipe = served.pipe
        assert isinstance(pipe, RetrievalPipeline)
        async with state.admission.place():
            vectors, _ = await _timed(_embed(served, [req.query]))
            if len(pipe.index) == 0:
                raise ApiError(
                    400, "the index is empty: add items with POST /v1/index/add", code="empty_index"
                )
            hits = await state.admission.run(lambda: pipe.index.search(vectors, req.k)[0])
        return {
            "object": "list",
            "model": served.name,
            "data": [{"id": h.id, "score": h.score, "label": h.label} for h in hits],
        }

    @app.post("/v1/index/add")
    async def index_add(req: IndexAddRequest) -> dict[str, Any]:
        served = state.indexed_model(req.model)
        pipe = served.pipe
        assert isinstance(pipe, RetrievalPipeline)
        inputs: list[str | ImageInput] = [
            item.text if item.text is not None else ImageInput(image=item.image or "") for item in req.items
        ]
        ids = [item.id for item in req.items]
        labels = None if req.items[0].label is None else [item.label or "" for item in req.items]
        async with state.admission.place():
            vectors, _ = await _timed(_embed(served, inputs))
            await state.admission.run(lambda: pipe.index.add(ids, vectors, labels=labels))
        return {"object": "index.add", "model": served.name, "added": len(ids), "size": len(pipe.index)}

    @app.post("/v1/index/remove")
    async def index_remove(req: IndexRemoveRequest) -> dict[str, Any]:
        served = state.indexed_model(req.model)
        pipe = served.pipe
        assert isinstance(pipe, RetrievalPipeline)
        async with state.admission.place():
            removed = await state.admission.run(lambda: pipe.index.remove(req.ids))
        return {"object": "index.remove", "model": served.name, "removed": removed, "size": len(pipe.index)}


class _Stream(StreamingResponse):
    """An SSE response that runs `finish` however it ends, even if its body never starts
    (a client gone before the first byte)."""

    def __init__(self, events: AsyncIterator[bytes], finish: Callable[[], Awaitable[None]]):
        super().__init__(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        self.finish = finish

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.finish()


async def _disconnected(request: Request) -> None:
    """Returns when the client closes the connection (the body has been read already)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


def _sse(body: dict[str, Any]) -> bytes:
    return b"data: " + json.dumps(body, separators=(",", ":")).encode() + b"\n\n"


def _encoded(vector: np.ndarray, encoding: str) -> Any:
    if encoding == "base64":  # OpenAI's: little-endian float32 bytes
        return base64.b64encode(vector.astype("<f4").tobytes()).decode()
    return vector.tolist()


def _log_failure(task: asyncio.Future[Any]) -> None:
    if not task.cancelled() and task.exception() is not None:
        log.error("generation task failed", exc_info=task.exception())
