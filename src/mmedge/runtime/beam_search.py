"""Beam search over the KV-cached decoder, with Hugging Face `generate(num_beams=...)`'s semantics.

As transformers' `GenerationMixin._beam_search`: each step takes the log-softmax of every running
beam's logits (repetition penalty and the `min_new_tokens` EOS ban applied to those log-probs),
adds the beam's score, and keeps the best 2 * num_beams candidates over all beams and tokens. Of
those, the ones among the top num_beams that end (EOS, or the last allowed token) become finished
hypotheses scored sum_logprobs / generated_length ** length_penalty (the length counts the new
tokens, EOS included, not the prompt); the best num_beams candidates that do not end run on.
`early_stopping`: True ends the search once num_beams hypotheses are finished; False and "never"
end it when the best running beam can no longer beat the worst finished one, judged at the
current length (False) or, with a positive length penalty, at the longest allowed ("never").

The prompt is prefilled once at batch 1; its cache slots are then copied to num_beams rows, and
every step runs the decoder with batch = num_beams. After each step the cache rows follow their
beams: `KVCache.reorder` copies only the rows whose beam changed, in place, so buffers bound to a
session stay bound. A cross-attention decoder's keys/values have one row that every beam reads
(the step's attention broadcasts it), so they are neither repeated nor reordered. The caller's
cache keeps the prompt only.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from mmedge.errors import ContextFullWarning, InvalidInputError
from mmedge.runtime.generation import GenerationConfig, KVCache, LanguageModel


@dataclass(frozen=True)
class BeamResult:
    """The best hypothesis: its new tokens (EOS not included) and how it ended."""

    tokens: list[int]
    eos: bool  # ended by EOS; otherwise by max_new_tokens or the context
    score: float  # sum of log-probs / length ** length_penalty


def beam_search(
    lm: LanguageModel,
    prompt: np.ndarray,
    config: GenerationConfig,
    cache: KVCache | None = None,
    history: Sequence[int] = (),
) -> BeamResult:
    """Beam search after `prompt` (S, E) embeddings appended to `cache` (batch 1; it keeps only the
    prompt afterwards). `history` (earlier token ids) feeds the repetition penalty, as in `generate_ids`."""
    k = config.num_beams
    if k > lm.max_batch:
        raise InvalidInputError(
            f"num_beams={k} needs {k} rows per decoder step; this package's LLM takes at most {lm.max_batch} "
            f"(manifest dims['batch']). Use num_beams <= {lm.max_batch}, or re-export the model with a current "
            "mmedge, whose decoder step takes batches of up to 8"
        )
    cache = cache if cache is not None else lm.new_cache()
    n_max = min(config.max_new_tokens, lm.room(len(prompt), cache, config))
    vocab, eos, lp = lm.vocab_size, lm.eos_token_id, config.length_penalty

    logits = lm.forward(prompt[None], cache, logits_to_keep=1)[:, -1]  # (1, V)
    beams = lm.new_cache(k)
    beams.cross = cache.cross  # one row, shared by every beam: bound once, never reordered
    step = lm.step_buffers(k)
    # Per running beam: its score, its new tokens, and the token ids the repetition penalty sees.
    # The first step has one row: HF's copies of the prompt start at -1e9 and never win it.
    scores = np.zeros(1, np.float32)
    tokens = np.zeros((1, 0), np.int64)
    seen = np.zeros((1, vocab), bool)
    seen[0, [t for t in history if 0 <= t < vocab]] = True
    finished: list[tuple[np.float32, list[int], bool]] = []  # best first, at most k

    for n in range(n_max):
        logp = _log_softmax(logits)
        if config.repetition_penalty != 1.0 and seen.any():
            hit = logp[seen]
            logp[seen] = np.where(hit < 0, hit * config.repetition_penalty, hit / config.repetition_penalty)
        if n < config.min_new_tokens:
            logp[:, eos] = -np.inf
        total = (logp + scores[:, None]).ravel()
        cand = _top(total, 2 * k)
        cand_scores, src, tok = total[cand], cand // vocab, cand % vocab
        last = n + 1 == n_max
        ends = np.ones(len(cand), bool) if last else tok == eos

        # Only the top k candidates may finish; none once k are finished under early_stopping=True.
        if not (config.early_stopping is True and len(finished) == k):
            length = np.float32(float(n + 1) ** lp)
            new = [
                (cand_scores[r] / length, [*tokens[src[r]].tolist(), int(tok[r])], bool(tok[r] == eos))
                for r in np.flatnonzero(ends[:k])
            ]
            if new:  # a stable sort: an earlier hypothesis wins a tie, as HF's merge keeps it first
                finished = sorted(finished + new, key=lambda h: -h[0])[:k]
        if last:
            break

        run = np.flatnonzero(~ends)[:k]  # at most k candidates end on EOS, so k of 2k run on
        scores, src, tok = cand_scores[run], src[run], tok[run]
        tokens = np.concatenate([tokens[src], tok[:, None]], axis=1)
        seen = seen[src]
        seen[np.arange(k), tok] = True

        if len(finished) == k:
            if config.early_stopping is True:
                break
            # Can the best running beam still beat the worst finished hypothesis?
            best_length = n_max if (config.early_stopping == "never" and lp > 0) else n + 1
            if scores[0] / np.float32(float(best_length) ** lp) <= finished[-1][0]:
                break

        if n == 0:
            beams.fill_rows(cache)  # every first-step candidate continues the prompt
        else:
            beams.reorder(src)
        logits = lm.forward(lm.embed(tok[:, None]), beams, step)[:, -1]

    best_score, best, ended = finished[0]
    if ended:
        best = best[:-1]
    elif n_max < config.max_new_tokens and len(best) == n_max:
        warnings.warn(
            f"beam search stopped after {n_max} of max_new_tokens={config.max_new_tokens} tokens: "
            f"the model's context of {lm.max_context} tokens is full",
            ContextFullWarning,
            stacklevel=3,
        )
    return BeamResult(best, ended, float(best_score))


def _log_softmax(logits: np.ndarray) -> np.ndarray:
    """Row-wise log-softmax in float32, as torch computes it (shift by the max, subtract log-sum-exp)."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    return shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))


def _top(values: np.ndarray, m: int) -> np.ndarray:
    """Indices of the m largest values, best first (ties: the lower index first)."""
    part = np.argpartition(-values, m - 1)[:m]
    return part[np.lexsort((part, -values[part]))]
