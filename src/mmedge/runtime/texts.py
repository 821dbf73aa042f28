"""Text tokenisation for text towers (torch-free; HF `tokenizers`).

User text is always plain text: a typed "<|endoftext|>" is split like any other characters and
never becomes the special token, so a caption cannot end the sequence early or forge a prompt.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from mmedge.errors import ConfigError, IntegrityError, InvalidInputError

# Tried in order when no pad id is given: HF CLIP pads with its end-of-text token.
_PAD_TOKENS = ("<pad>", "<|endoftext|>")


@dataclass(frozen=True)
class TextLimits:
    """Caps checked on every text before it reaches the tokenizer.

    `max_chars` bounds one text and `max_total_chars` one call. A batch is tokenised in chunks of
    about `chunk_chars` characters, each text first cut to `chars_per_token` characters per context
    token, so a call's memory does not grow with its texts' lengths (see `encode_batch`).
    """

    max_chars: int = 10_000
    max_total_chars: int = 1_000_000
    chars_per_token: int = 16
    chunk_chars: int = 1 << 18


class TextTokenizer:
    """Batch encoder: specials from the post-processor, truncation that keeps EOS, padding to longest.

    The constructor takes ownership of `tokenizer` (a `tokenizers.Tokenizer`) and reconfigures it.
    `pad_id` defaults to the tokenizer's padding setting, else the id of "<pad>" or "<|endoftext|>".
    """

    def __init__(
        self,
        tokenizer: Any,
        context_length: int,
        pad_id: int | None = None,
        lowercase: bool = False,
        limits: TextLimits = TextLimits(),
        expansion: int = 1,
    ) -> None:
        if isinstance(context_length, bool) or not isinstance(context_length, int):
            raise ConfigError(f"context_length must be an int, got {context_length!r}")
        specials = tokenizer.num_special_tokens_to_add(False)
        if context_length <= specials:
            # tokenizers silently skips truncation when the budget cannot hold its special tokens
            raise ConfigError(
                f"context_length {context_length} leaves no room for text after {specials} special tokens"
            )
        self.pad_id = _pad_id(tokenizer) if pad_id is None else int(pad_id)
        if not 0 <= self.pad_id < tokenizer.get_vocab_size(with_added_tokens=True):
            raise ConfigError(f"pad_id {self.pad_id} is outside the vocabulary")
        self.context_length = context_length
        self.lowercase = lowercase
        self.limits = limits
        self.expansion = max(1, int(expansion))  # normalized characters per input character, worst case
        # The post-processor adds specials inside the max_length budget, so EOS survives truncation.
        tokenizer.enable_truncation(max_length=context_length)
        # Chunks are padded here (right, to the longest of the call): the library pads per chunk.
        tokenizer.no_padding()
        tokenizer.encode_special_tokens = True  # specials typed by a user are plain text
        self._tok = tokenizer
        self._templates: Any = None  # built on first use by `encode_template`
        self._plain: Any = None
        self._added: tuple[str, ...] = ()

    @classmethod
    def from_file(
        cls,
        path: str | os.PathLike[str],
        context_length: int,
        pad_id: int | None = None,
        lowercase: bool = False,
        limits: TextLimits = TextLimits(),
    ) -> TextTokenizer:
        """Load a `tokenizer.json` (HF tokenizers format)."""
        try:
            data = Path(path).read_bytes()
        except OSError as exc:
            raise IntegrityError(f"cannot load tokenizer {os.fspath(path)!r}: {exc}") from exc
        return cls.from_bytes(data, context_length, pad_id, lowercase, limits)

    @classmethod
    def from_bytes(
        cls,
        data: bytes,
        context_length: int,
        pad_id: int | None = None,
        lowercase: bool = False,
        limits: TextLimits = TextLimits(),
    ) -> TextTokenizer:
        """Build from the bytes of a `tokenizer.json` (e.g. `Package.read_verified`'s, hashed as read)."""
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise IntegrityError(f"cannot load tokenizer: it is not UTF-8 ({exc.reason})") from None
        return cls.from_json(text, context_length, pad_id, lowercase, limits)

    @classmethod
    def from_json(
        cls,
        text: str,
        context_length: int,
        pad_id: int | None = None,
        lowercase: bool = False,
        limits: TextLimits = TextLimits(),
    ) -> TextTokenizer:
        """Build from the JSON text of a `tokenizer.json`; its components must pass `tokenizer_policy`."""
        from tokenizers import Tokenizer

        from mmedge.runtime.tokenizer_policy import check_tokenizer_json

        profile = check_tokenizer_json(text)  # before Rust parses it: a bad charsmap panics or aborts
        try:
            tok = Tokenizer.from_str(text)
        except BaseException as exc:  # bare Exception for malformed files; pyo3 PanicException(BaseException)
            if not _is_error(exc):
                raise
            raise IntegrityError(f"cannot parse tokenizer JSON: {exc}") from None
        return cls(tok, context_length, pad_id, lowercase, limits, expansion=profile.expansion)

    def encode_batch(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """Encode texts -> (input_ids, attention_mask), both int64 (N, L), L = longest <= context_length."""
        if isinstance(texts, str) or not isinstance(texts, Sequence):
            raise InvalidInputError(f"encode_batch takes a list of strings, got {type(texts).__name__}")
        if len(texts) == 0:
            raise InvalidInputError("encode_batch got no texts")
        checked = [self._checked(i, t) for i, t in enumerate(texts)]
        total = sum(len(t) for t in checked)
        if total > self.limits.max_total_chars:
            raise InvalidInputError(
                f"the texts of one call have {total} characters; the limit is {self.limits.max_total_chars}"
            )
        # Truncation happens after tokenising, so a whole 10,000-character text would become
        # thousands of tokens (and overflow encodings) to keep 77. Tokenise a cut prefix first; keep
        # its tokens when they fill the context and end before the cut word; else the whole text.
        cut = self.context_length * self.limits.chars_per_token
        rows: list[list[int] | None] = [None] * len(checked)
        for chunk in self._chunks(range(len(checked)), [min(len(t), cut) for t in checked]):
            prefixes = [checked[i][:cut] for i in chunk]
            for i, prefix, enc in zip(chunk, prefixes, self._encode(prefixes, add_special_tokens=True)):
                if len(checked[i]) <= cut or _fills_before_cut(prefix, enc):
                    rows[i] = enc.ids
        rest = [i for i, row in enumerate(rows) if row is None]
        for chunk in self._chunks(rest, [len(checked[i]) for i in rest]):
            for i, enc in zip(chunk, self._encode([checked[i] for i in chunk], add_special_tokens=True)):
                rows[i] = enc.ids
        width = max(len(row or ()) for row in rows)
        ids = np.full((len(rows), width), self.pad_id, np.int64)  # (N, L), padded right
        mask = np.zeros((len(rows), width), np.int64)  # (N, L)
        for i, row in enumerate(rows):
            ids[i, : len(row or ())] = row or ()
            mask[i, : len(row or ())] = 1
        return ids, mask

    def _chunks(self, items: Sequence[int], lengths: Sequence[int]) -> list[list[int]]:
        """Consecutive groups of `items` whose normalized text fits the chunk budget (at least one each)."""
        budget = max(1, self.limits.chunk_chars // self.expansion)
        out: list[list[int]] = []
        used = budget
        for item, n in zip(items, lengths):
            if used + n > budget:
                out.append([])
                used = 0
            out[-1].append(item)
            used += n
        return out

    def encode(self, text: str, add_special_tokens: bool = True, allow_empty: bool = False) -> list[int]:
        """Token ids of one text, unpadded; a text longer than `context_length` tokens is an error."""
        enc = self._encode(
            [text if allow_empty and text == "" else self._checked(0, text)], add_special_tokens
        )[0]
        if enc.overflowing:
            raise InvalidInputError(
                f"text is longer than the model's context of {self.context_length} tokens; shorten it"
            )
        return [i for i, m in zip(enc.ids, enc.attention_mask) if m]

    def encode_padded(self, texts: Sequence[str], length: int) -> np.ndarray:
        """Token ids of texts padded (right, with `pad_id`) to `length` <= context_length, int64
        (N, length), for a graph of one text length (Stable Diffusion's text encoder). A blank text
        is the specials alone (the unconditional prompt of classifier-free guidance)."""
        if not 1 <= length <= self.context_length:
            raise InvalidInputError(f"length must be in [1, {self.context_length}], got {length}")
        ids = np.full((len(texts), length), self.pad_id, np.int64)
        blank = [i for i, t in enumerate(texts) if isinstance(t, str) and not t.strip()]
        rest = [i for i in range(len(texts)) if i not in set(blank)]
        if rest:
            rows, mask = self.encode_batch([texts[i] for i in rest])
            for i, row, keep in zip(rest, rows, mask):
                tokens = row[keep == 1][:length]
                ids[i, : len(tokens)] = tokens
        if blank:
            tokens = self.encode("", allow_empty=True)[:length]
            ids[blank, : len(tokens)] = tokens
        return ids

    def overflows(self, text: str) -> bool:
        """Whether `text` has more tokens than the context (encode_batch cuts it to the context)."""
        return bool(self._encode([self._checked(0, text)], add_special_tokens=True)[0].overflowing)

    def encode_template(self, pieces: Sequence[tuple[str, bool]], add_special_tokens: bool) -> list[int]:
        """Token ids of a rendered chat template: `(text, plain)` pieces, where the template's own
        text (plain=False) has its special tokens recognised and user text (plain=True) does not.

        Joined and tokenised as one string, exactly as an HF processor tokenises a rendered
        template, unless a user piece holds the text of an added token: then each piece is
        tokenised on its own (the user's piece as plain text) and the post-processor adds the
        specials, so a typed "<image>" or "</s>" never becomes that token.
        """
        from tokenizers import Encoding

        if self._templates is None:
            from tokenizers import Tokenizer

            pair = []
            for plain in (False, True):  # same vocabulary, untruncated; specials recognised or not
                tok = Tokenizer.from_str(self._tok.to_str())
                tok.no_truncation()
                tok.no_padding()
                tok.encode_special_tokens = plain
                pair.append(tok)
            self._added = tuple(t.content for t in pair[0].get_added_tokens_decoder().values())
            self._templates, self._plain = pair
        total = sum(len(text) for text, _ in pieces)
        if total > self.limits.max_total_chars:
            raise InvalidInputError(
                f"the conversation has {total} characters; the limit is {self.limits.max_total_chars}"
            )
        for text, _ in pieces:
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as exc:
                raise InvalidInputError(f"text is not valid Unicode: {exc.reason}") from exc
        try:
            if not any(plain and any(a in text for a in self._added) for text, plain in pieces):
                enc = self._templates.encode(
                    "".join(t for t, _ in pieces), add_special_tokens=add_special_tokens
                )
            else:
                parts = [
                    (self._plain if plain else self._templates).encode(text, add_special_tokens=False)
                    for text, plain in pieces
                    if text
                ]
                merged = Encoding.merge(parts, growing_offsets=True) if parts else self._templates.encode("")
                enc = self._templates.post_process(merged, add_special_tokens=add_special_tokens)
        except BaseException as exc:
            if not _is_error(exc):
                raise
            raise InvalidInputError(f"tokenizer rejected the text: {exc}") from exc
        return list(enc.ids)

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = True) -> str:
        """Text of token ids (special tokens dropped by default)."""
        return self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def token_id(self, token: str) -> int | None:
        """Id of a token string (e.g. a special token), or None."""
        return self._tok.token_to_id(token)

    def _checked(self, i: int, text: object) -> str:
        if not isinstance(text, str):
            raise InvalidInputError(f"text {i} is {type(text).__name__}; expected str")
        if len(text) > self.limits.max_chars:  # before tokenising: a 1 MB string never reaches Rust
            raise InvalidInputError(
                f"text {i} has {len(text)} characters; the limit is {self.limits.max_chars}"
            )
        if not text.strip():
            raise InvalidInputError(f"empty text at index {i}: blank or whitespace-only text is not accepted")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as exc:  # lone surrogates cannot cross into Rust
            raise InvalidInputError(f"text {i} is not valid Unicode: {exc.reason}") from exc
        return text.lower() if self.lowercase else text

    def _encode(self, batch: list[str], add_special_tokens: bool) -> list[Any]:
        try:
            return self._tok.encode_batch(batch, add_special_tokens=add_special_tokens)
        except BaseException as exc:  # Rust panics surface as pyo3 PanicException(BaseException)
            if not _is_error(exc):
                raise
            raise InvalidInputError(f"tokenizer rejected the text: {exc}") from exc


def _is_error(exc: BaseException) -> bool:
    """An Exception or a Rust panic; KeyboardInterrupt, SystemExit and friends are not errors here."""
    return isinstance(exc, Exception) or type(exc).__name__ == "PanicException"


def _fills_before_cut(prefix: str, enc: Any) -> bool:
    """True when a cut prefix's encoding overflowed the context and its kept tokens end before the
    last space of the prefix: the cut word cannot change them, so the whole text encodes the same."""
    if not enc.overflowing:
        return False
    end = max(
        (stop for (_, stop), special in zip(enc.offsets, enc.special_tokens_mask) if not special), default=0
    )
    return prefix.rfind(" ") >= end


def _pad_id(tok: Any) -> int:
    if tok.padding is not None:
        return int(tok.padding["pad_id"])
    for token in _PAD_TOKENS:
        found = tok.token_to_id(token)
        if found is not None:
            return int(found)
    raise ConfigError(f"tokenizer has no padding setting and none of {_PAD_TOKENS}; pass pad_id explicitly")
