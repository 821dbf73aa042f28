"""Token generation over a package's `token_embed` + `llm_step` components, torch-free.

The KV cache is one preallocated buffer per layer and key/value, `max_context` slots long, bound
to the session with IOBinding (read in place). Each step the graph returns only the new tokens'
keys/values, which are written into the next free slots: a token costs O(new tokens) copying,
never a copy of the cache. Decode-step outputs (logits, new keys/values) go into buffers that are
allocated once per generation and reused. A build with an in-place cache
(`builds.ort_decoder`) returns the whole cache as present.*: its buffers are bound once per
cache as both past and present, and the attention kernel writes the new entries itself.

Sampling parameters carry Hugging Face `generate` names; `temperature=0` means greedy.
"""

from __future__ import annotations

import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from mmedge.errors import ContextFullWarning, IntegrityError, InvalidInputError, UnsupportedError
from mmedge.runtime.backends.base import Binding, DeviceCache, Session
from mmedge.runtime.components import ComponentRunner
from mmedge.runtime.texts import TextTokenizer

# Engine-file variant of an LLM build that serves steps of more than one token ("<llm>.int4.prefill";
# `builds.ort_prefill` writes it); decoding runs the plain build.
PREFILL = "prefill"

MAX_STOP_STRINGS = 16
# Beam search runs the decoder step with batch = num_beams; the exported llm_step declares batches
# of 1..8 rows (`models.decoder.base.components`), which TensorRT profiles are sized for.
MAX_NUM_BEAMS = 8
_TINY = float(np.finfo(np.float32).tiny)  # a smaller temperature would round to 0 in float32


@dataclass(frozen=True)
class GenerationConfig:
    """Decoding settings, named as in HF `generate`. Validated on construction."""

    max_new_tokens: int = 32
    min_new_tokens: int = 0
    do_sample: bool = False
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    stop_strings: tuple[str, ...] = ()
    seed: int | None = None
    num_beams: int = 1
    length_penalty: float = 1.0
    early_stopping: bool | str = False

    def __post_init__(self) -> None:
        def is_int(v: Any) -> bool:
            return isinstance(v, (int, np.integer)) and not isinstance(v, bool)

        def is_num(v: Any) -> bool:
            return (
                isinstance(v, (int, float, np.integer, np.floating))
                and not isinstance(v, bool)
                and np.isfinite(v)
            )

        if not is_int(self.max_new_tokens) or self.max_new_tokens <= 0:
            raise InvalidInputError(f"max_new_tokens must be a positive int, got {self.max_new_tokens!r}")
        if not is_int(self.min_new_tokens) or not 0 <= self.min_new_tokens <= self.max_new_tokens:
            raise InvalidInputError(
                f"min_new_tokens must be an int in [0, max_new_tokens], got {self.min_new_tokens!r}"
            )
        if not isinstance(self.do_sample, bool):
            raise InvalidInputError(f"do_sample must be a bool, got {self.do_sample!r}")
        if not is_num(self.temperature) or self.temperature < 0:
            raise InvalidInputError(
                f"temperature must be a finite number >= 0 (0 = greedy), got {self.temperature!r}"
            )
        if not is_int(self.top_k) or self.top_k < 0:
            raise InvalidInputError(f"top_k must be an int >= 0 (0 = off), got {self.top_k!r}")
        if not is_num(self.top_p) or not 0 < self.top_p <= 1:
            raise InvalidInputError(f"top_p must be in (0, 1], got {self.top_p!r}")
        if not is_num(self.repetition_penalty) or self.repetition_penalty <= 0:
            raise InvalidInputError(f"repetition_penalty must be > 0, got {self.repetition_penalty!r}")
        stops = self.stop_strings
        if (
            not isinstance(
                stops, tuple
            )  # from_kwargs turns a list into one; None, 5 or an iterator are refused
            or not all(isinstance(s, str) and s for s in stops)
            or len(stops) > MAX_STOP_STRINGS
        ):
            raise InvalidInputError(
                f"stop_strings must be a list of at most {MAX_STOP_STRINGS} non-empty strings, got {_short(stops)}"
            )
        # numpy's generator takes seeds in [0, 2**128): anything else was a bare ValueError at the first token
        if self.seed is not None and (not is_int(self.seed) or not 0 <= self.seed < 2**128):
            raise InvalidInputError(f"seed must be an int in [0, 2**128) or None, got {_short(self.seed)}")
        if not is_int(self.num_beams) or not 1 <= self.num_beams <= MAX_NUM_BEAMS:
            raise InvalidInputError(
                f"num_beams must be an int in [1, {MAX_NUM_BEAMS}] (1 = no beam search), got {_short(self.num_beams)}"
            )
        if not is_num(self.length_penalty):
            raise InvalidInputError(
                f"length_penalty must be a finite number, got {_short(self.length_penalty)}"
            )
        if not (isinstance(self.early_stopping, bool) or self.early_stopping == "never"):
            raise InvalidInputError(
                f"early_stopping must be True, False or 'never', got {_short(self.early_stopping)}"
            )
        if self.num_beams > 1 and self.do_sample:
            raise InvalidInputError(
                "do_sample=True with num_beams > 1 (beam-sample) is not supported: "
                "use num_beams=1 to sample, or do_sample=False for beam search"
            )

    @property
    def greedy(self) -> bool:
        return not self.do_sample or self.temperature == 0

    @property
    def beams(self) -> bool:
        """Whether this is beam search (`runtime.beam_search`) rather than one token at a time."""
        return self.num_beams > 1

    @classmethod
    def from_kwargs(cls, **kwargs: Any) -> GenerationConfig:
        """Build from `generate`-style keyword arguments; unknown names are errors, not ignored."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(kwargs) - known)
        if unknown:
            raise InvalidInputError(f"unknown generation parameters {unknown}; accepted: {sorted(known)}")
        if "stop_strings" in kwargs and isinstance(kwargs["stop_strings"], list):
            kwargs["stop_strings"] = tuple(kwargs["stop_strings"])
        return cls(**kwargs)


def _short(value: Any) -> str:
    """A parameter value for an error message, cut to a readable length."""
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


@dataclass
class Usage:
    """What one generation used, filled in as it runs: OpenAI-style token counts and why it ended."""

    prompt_tokens: int = 0  # positions before the answer, image embeddings included
    cached_tokens: int = 0  # of which were replayed from a kept KV cache
    completion_tokens: int = 0
    finish_reason: str | None = None  # "stop": EOS or a stop string; "length": max_new_tokens or the context


class KVCache:
    """Per-layer key/value buffers of `max_context` slots; slots [0, length) are filled."""

    def __init__(self, layers: int, batch: int, kv_heads: int, max_context: int, head_dim: int):
        shape = (batch, kv_heads, max_context, head_dim)
        self.buffers = [np.zeros(shape, np.float32) for _ in range(2 * layers)]  # key, value per layer
        self.max_context = max_context
        self.length = 0
        # A cross-attention decoder's keys/values (`cross_key_values.*`, one row shared by every
        # row of the cache), set once per image or question and bound like the cache itself.
        self.cross: dict[str, np.ndarray] = {}
        # (session, binding) per LLM session whose binding has these buffers bound (LanguageModel)
        self.bindings: list[tuple[Session, Binding]] = []
        # (session, copy) per LLM session that keeps a copy of the cache in device memory. Appends and
        # reorders are mirrored there; `version` counts the other changes (`fill_rows`), after which
        # a copy is uploaded again.
        self.device_copies: list[tuple[Session, DeviceCache | None]] = []
        self.version = 0

    def attention_mask(self, new: int) -> np.ndarray:
        """(B, max_context + new) int64: filled slots and the new tokens are 1."""
        mask = np.zeros((self.buffers[0].shape[0], self.max_context + new), np.int64)
        mask[:, : self.length] = 1
        mask[:, self.max_context :] = 1
        return mask

    def append(self, new: Sequence[np.ndarray]) -> None:
        """Write the new tokens' keys/values (B, Hkv, S, D) into the next free slots."""
        s = new[0].shape[2]
        for buf, part in zip(self.buffers, new):
            buf[:, :, self.length : self.length + s] = part
        self.length += s

    def truncate(self, length: int) -> None:
        """Forget every slot from `length` on (their contents are masked out from now on)."""
        self.length = min(self.length, length)

    def fill_rows(self, source: KVCache, row: int = 0) -> None:
        """Every row becomes `source`'s row `row` (its filled slots): a prompt prefilled once at
        batch 1, then fanned out to the beams."""
        n = source.length
        for buf, src in zip(self.buffers, source.buffers):
            buf[:, :, :n] = src[row, :, :n]
        self.length = n
        self.version += 1

    def reorder(self, index: np.ndarray) -> None:
        """Row i becomes row `index[i]` (beam search), in place: the buffers stay those bound to the
        sessions. Only moved rows are copied, and only their filled slots; a source row that is
        itself overwritten is saved first."""
        moved = [i for i in range(len(index)) if index[i] != i]
        if not moved:
            return
        n = self.length
        for _, copy in self.device_copies:  # device copies in step with the host reorder themselves
            if copy is not None and copy.version == self.version:
                copy.reorder(index, n)
        targets = set(moved)
        saved = {
            int(s): [buf[s, :, :n].copy() for buf in self.buffers]
            for s in {int(index[i]) for i in moved}
            if s in targets
        }
        for i in moved:
            s = int(index[i])
            for k, buf in enumerate(self.buffers):
                buf[i, :, :n] = saved[s][k] if s in saved else buf[s, :, :n]


@dataclass
class _StepBuffers:
    """Outputs of a one-token step, allocated once per generation and reused."""

    logits: np.ndarray
    present: list[np.ndarray]


class LanguageModel:
    """A package's `token_embed` + `llm_step` components, with its `llm` section's contract."""

    def __init__(self, runner: ComponentRunner):
        self.runner = runner
        m = runner.manifest
        if m.llm is None:
            raise UnsupportedError(f"package {m.name!r} has no language model (task {m.task})")
        self.config = m.llm
        self.max_context = m.llm.max_context
        self.layers, self.kv_heads, self.head_dim = m.llm.layers, m.llm.kv_heads, m.llm.head_dim
        self.vocab_size = m.llm.vocab_size
        self.eos_token_id = m.llm.eos_token_id
        self.bos_token_id = m.llm.bos_token_id
        self.embed_component, self.llm_component = runner.role("token_embed"), runner.role("llm_step")
        llm = m.component(self.llm_component)
        self._past = [s.name for s in llm.inputs if s.name.startswith("past_key_values.")]
        self._present = [s.name for s in llm.outputs if s.name.startswith("present.")]
        self.cross_names = [s.name for s in llm.inputs if s.name.startswith("cross_key_values.")]
        self._embeds_out = m.component(self.embed_component).outputs[0].name
        # A build with an in-place cache (`builds.ort_decoder`) returns the whole cache as present.*:
        # bound to the past buffers, its attention kernel writes the new entries itself. That needs a
        # session that keeps buffers bound between runs.
        session = runner.session(self.llm_component)
        shape = session.output_shapes.get(self._present[0], ()) if self._present else ()
        self.in_place = len(shape) > 2 and shape[2] == self.max_context and session.binding() is not None
        # Rows per step the exported graphs take (beam search runs num_beams rows).
        ranges = [m.component(c).dims.get("batch") for c in (self.embed_component, self.llm_component)]
        self.max_batch = min((r.max for r in ranges if r is not None), default=1)

    @property
    def tokenizer(self) -> TextTokenizer:
        return self.runner.tokenizer

    def new_cache(self, batch: int = 1) -> KVCache:
        return KVCache(self.layers, batch, self.kv_heads, self.max_context, self.head_dim)

    def embed(self, ids: np.ndarray) -> np.ndarray:
        """Token embeddings (B, S, E) of ids (B, S)."""
        ids = np.asarray(ids, np.int64)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise InvalidInputError(f"token ids must lie in [0, {self.vocab_size})")
        return self.runner.session(self.embed_component).run({"input_ids": ids})[self._embeds_out]

    def forward(
        self,
        embeds: np.ndarray,
        cache: KVCache,
        out: _StepBuffers | None = None,
        logits_to_keep: int | None = None,
    ) -> np.ndarray:
        """Run new token embeddings (B, S, E) through the LLM, append to `cache`; logits (B, K, V)
        of the last K = `logits_to_keep` positions (default all S)."""
        b, s = embeds.shape[:2]
        if cache.length + s > self.max_context:
            raise InvalidInputError(
                f"{cache.length} cached + {s} new tokens exceed the model's context of {self.max_context} tokens"
            )
        keep = s if logits_to_keep is None else min(int(logits_to_keep), s)
        if sorted(cache.cross) != sorted(self.cross_names):
            raise InvalidInputError(
                "this decoder cross-attends: its cache needs the cross keys/values "
                f"{self.cross_names[:2]}... (cross_kv), got {sorted(cache.cross)[:2]}"
            )
        feeds = {
            "inputs_embeds": np.ascontiguousarray(embeds, np.float32),
            "logits_to_keep": np.array([keep], np.int64),
            "attention_mask": cache.attention_mask(s),
            "position_ids": np.broadcast_to(
                np.arange(cache.length, cache.length + s, dtype=np.int64), (b, s)
            ).copy(),
        }
        if out is None or s != 1:
            shape = (b, self.kv_heads, s, self.head_dim)
            out = _StepBuffers(
                np.empty((b, keep, self.vocab_size), np.float32),
                [] if self.in_place else [np.empty(shape, np.float32) for _ in self._present],
            )
        if (
            self.in_place
        ):  # the cache is bound once per session; only this step's small tensors are bound here
            prefill = self.runner.variant_session(self.llm_component, PREFILL) if s > 1 else None
            binding = self._binding(cache, prefill or self.runner.session(self.llm_component))
            binding.bind(feeds, {"logits": out.logits})
            binding.run()
            cache.length += s
        else:
            session = self.runner.session(self.llm_component)
            device = self._device_copy(cache, session)
            if device is not None:  # the cache lives on the device: only this step's tensors move
                if device.version != cache.version:
                    device.load(cache.buffers, cache.version)
                device.step(feeds, cache.cross, out.logits, out.present, cache.length)
            else:
                past = dict(zip(self._past, cache.buffers)) | cache.cross  # bound in place, not copied
                session.run_into(
                    {**feeds, **past}, {"logits": out.logits, **dict(zip(self._present, out.present))}
                )
            cache.append(out.present)
        if not np.isfinite(out.logits).all():  # bound outputs skip the runner's checks; never sample NaN
            raise IntegrityError(f"component {self.llm_component!r} produced non-finite logits")
        return out.logits

    def _device_copy(self, cache: KVCache, sess: Session) -> DeviceCache | None:
        """The cache's copy in `sess`'s device memory, made on first use (None: a host backend)."""
        for bound, copy in cache.device_copies:
            if bound is sess:
                return copy
        new = sess.device_cache(self._past, self._present, cache.buffers[0].shape)
        cache.device_copies.append((sess, new))
        return new

    def _binding(self, cache: KVCache, sess: Session) -> Binding:
        """The cache's binding to an LLM session (the decode build, or the prefill build of
        `builds.ort_prefill` for prompts), its buffers bound as both past and present."""
        for bound, binding in cache.bindings:
            if bound is sess:
                return binding
        new = sess.binding()
        if new is None:
            raise UnsupportedError("this LLM session cannot keep the KV cache bound in place")
        new.bind(dict(zip(self._past, cache.buffers)) | cache.cross, dict(zip(self._present, cache.buffers)))
        cache.bindings.append((sess, new))
        return new

    def step_buffers(self, batch: int) -> _StepBuffers:
        """Outputs of a one-token step over `batch` rows, to reuse for every step of a generation."""
        shape = (batch, self.kv_heads, 1, self.head_dim)
        return _StepBuffers(
            np.empty((batch, 1, self.vocab_size), np.float32),
            [] if self.in_place else [np.empty(shape, np.float32) for _ in self._present],
        )

    def room(self, prompt: int, cache: KVCache, config: GenerationConfig) -> int:
        """How many tokens can be generated after `prompt` new positions on `cache`; a prompt that
        leaves no room, or `min_new_tokens` that cannot fit, is an error."""
        if cache.length + prompt + 1 > self.max_context:
            raise InvalidInputError(
                f"the prompt ({prompt} tokens, {cache.length} already cached) leaves no room to generate "
                f"within the model's context of {self.max_context} tokens"
            )
        room = self.max_context - cache.length - prompt + 1  # the last token is never fed back
        if config.min_new_tokens > room:
            raise InvalidInputError(
                f"min_new_tokens={config.min_new_tokens} does not fit: the prompt leaves room for {room} new tokens "
                f"within the model's context of {self.max_context}"
            )
        return room

    def generate_ids(
        self,
        prompt: np.ndarray,
        config: GenerationConfig,
        cache: KVCache | None = None,
        history: Sequence[int] = (),
    ) -> Iterator[int]:
        """Yield new token ids for one sequence; `prompt` is (S, E) embeddings appended to `cache`.

        `history` (earlier token ids) only feeds the repetition penalty. Stops at EOS (not yielded),
        after `max_new_tokens`, or when the context is full (a `ContextFullWarning` says so);
        `min_new_tokens` that cannot fit is an error. Beam search is `runtime.beam_search`.
        """
        if config.beams:
            raise InvalidInputError(
                "generate_ids yields one sequence token by token; beam search is beam_search"
            )
        cache = cache if cache is not None else self.new_cache()
        self.room(len(prompt), cache, config)
        rng = np.random.default_rng(config.seed)
        seen = np.zeros(self.vocab_size, bool)
        seen[[t for t in history if 0 <= t < self.vocab_size]] = True
        step = self.step_buffers(1)
        logits = self.forward(prompt[None], cache, logits_to_keep=1)[0, -1]
        for n in range(config.max_new_tokens):
            token = _choose(
                logits.copy(), config, rng, seen, self.eos_token_id if n < config.min_new_tokens else None
            )
            if token == self.eos_token_id:
                return
            yield token
            seen[token] = True
            if n + 1 == config.max_new_tokens:
                return
            if cache.length + 1 > self.max_context:  # the context is full: stop rather than overflow
                warnings.warn(
                    f"generation stopped after {n + 1} of max_new_tokens={config.max_new_tokens} tokens: "
                    f"the model's context of {self.max_context} tokens is full",
                    ContextFullWarning,
                    stacklevel=2,
                )
                return
            logits = self.forward(self.embed(np.array([[token]])), cache, step)[0, -1]


def _choose(
    logits: np.ndarray, cfg: GenerationConfig, rng: np.random.Generator, seen: np.ndarray, ban: int | None
) -> int:
    """Pick the next token from last-position logits (V,), HF warper order: penalty, temperature, top-k, top-p."""
    if cfg.repetition_penalty != 1.0 and seen.any():
        hit = logits[seen]
        logits[seen] = np.where(hit < 0, hit * cfg.repetition_penalty, hit / cfg.repetition_penalty)
    if ban is not None:
        logits[ban] = -np.inf  # min_new_tokens not reached yet
    if cfg.greedy:
        return int(np.argmax(logits))
    # Shift before dividing: a tiny temperature then sends every other logit to -inf (probability 0)
    # instead of the top one to inf (inf - inf = NaN), so temperature -> 0 tends to greedy.
    with np.errstate(over="ignore"):  # overflow to -inf is the intended result
        logits = (logits - logits.max()) / max(cfg.temperature, _TINY)
    if 0 < cfg.top_k < logits.size:
        kth = np.partition(logits, -cfg.top_k)[-cfg.top_k]
        logits[logits < kth] = -np.inf
    probs = np.exp(logits)
    probs /= probs.sum()
    if cfg.top_p < 1.0:
        order = np.argsort(probs)  # ascending, as HF's TopPLogitsWarper
        cum = np.cumsum(probs[order])
        drop = order[cum <= 1.0 - cfg.top_p]
        drop = drop[:-1] if drop.size == probs.size else drop  # keep at least one token
        probs[drop] = 0.0
        probs /= probs.sum()
    return int(rng.choice(probs.size, p=probs))


class TextStream:
    """Incremental detokenisation: text pieces as tokens arrive, cut before the first stop string.

    Like HF's TextStreamer, it decodes all ids so far and emits what is new, holding back an
    incomplete UTF-8 sequence and any tail that could still grow into a stop string.
    """

    def __init__(self, tokenizer: TextTokenizer, stop_strings: Sequence[str] = ()):
        self.tokenizer, self.stops = tokenizer, tuple(stop_strings)
        self.hold = max((len(s) - 1 for s in self.stops), default=0)
        self.ids: list[int] = []
        self.text = ""  # emitted so far
        self.stopped = False

    def _decoded(self) -> str:
        full = self.tokenizer.decode(self.ids)
        cut = min((i for i in (full.find(s) for s in self.stops) if i >= 0), default=-1)
        if cut >= 0:
            self.stopped = True
            return full[:cut]
        return full

    def _emit(self, ready: str) -> str:
        piece = ready[len(self.text) :]
        self.text += piece
        return piece

    def push(self, token: int) -> str:
        """Add a token; return the newly completed text (may be empty)."""
        self.ids.append(token)
        full = self._decoded()
        if not self.stopped and (full.endswith("\ufffd") or self.hold):
            full = full[: len(full) - self.hold] if not full.endswith("\ufffd") else full[: len(self.text)]
        return self._emit(full)

    def finish(self) -> str:
        """Flush what was held back at the end of generation."""
        return self._emit(self._decoded())


def stream_text(
    lm: LanguageModel,
    prompt_embeds: np.ndarray,
    config: GenerationConfig,
    cache: KVCache | None = None,
    history: Sequence[int] = (),
    generated: list[int] | None = None,
    stream: TextStream | None = None,
    usage: Usage | None = None,
) -> Iterator[str]:
    """Generate and yield text pieces; token ids are appended to `generated` when given, and a
    caller's `stream` shows afterwards whether a stop string cut the text (`stream.stopped`).
    `usage` (when given) counts the tokens as they come and records why generation ended."""
    stream = stream or TextStream(lm.tokenizer, config.stop_strings)
    usage = usage if usage is not None else Usage()
    cache = cache if cache is not None else lm.new_cache()
    if config.beams:
        yield from _stream_beams(lm, prompt_embeds, config, cache, history, generated, stream, usage)
        return
    for token in lm.generate_ids(prompt_embeds, config, cache, history):
        if generated is not None:
            generated.append(token)
        usage.completion_tokens += 1
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            usage.finish_reason = "stop"
            return
    # Ended without a stop string: EOS ("stop") unless the token budget or the context ran out.
    full = usage.completion_tokens == config.max_new_tokens or cache.length + 1 > lm.max_context
    usage.finish_reason = "length" if full else "stop"
    tail = stream.finish()
    if tail:
        yield tail


def _stream_beams(
    lm: LanguageModel,
    prompt_embeds: np.ndarray,
    config: GenerationConfig,
    cache: KVCache,
    history: Sequence[int],
    generated: list[int] | None,
    stream: TextStream,
    usage: Usage,
) -> Iterator[str]:
    """`stream_text` for beam search: the best hypothesis is known only when the search ends, so its
    text comes then, cut before the first stop string. `cache` keeps the prompt only."""
    from mmedge.runtime.beam_search import beam_search

    result = beam_search(lm, prompt_embeds, config, cache, history)
    for token in result.tokens:
        if generated is not None:
            generated.append(token)
        usage.completion_tokens += 1
        piece = stream.push(token)
        if piece:
            yield piece
        if stream.stopped:
            usage.finish_reason = "stop"
            return
    usage.finish_reason = "stop" if result.eos else "length"
    tail = stream.finish()
    if tail:
        yield tail
