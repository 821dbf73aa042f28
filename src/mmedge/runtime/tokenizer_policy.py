"""Which `tokenizer.json` configurations a package may carry (checked before the Rust parser sees one).

The HF `tokenizers` library runs whatever a tokenizer.json describes: a corrupt `Precompiled`
charsmap panics (a `BaseException`) or aborts, chained `Replace` normalizers multiply a text's
length, and a `Split` or `Replace` regex may backtrack for minutes. So a tokenizer is accepted only
when every normalizer, pre-tokenizer, model, post-processor and decoder is of a listed type, every
regex is one of a few known patterns (CLIP, GPT-2, Llama 3, whitespace), and the normalizers
together cannot grow a text by more than `MAX_EXPANSION` times. These are the components of
mmedge's own tokenizers and of the HF CLIP, OPT (BLIP-2), Llama and BERT (InstructBLIP's Q-Former)
tokenizers.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from mmedge.errors import IntegrityError

MAX_TOKENIZER_BYTES = 64 * 1024 * 1024  # Llama 3's tokenizer.json is 9 MB
MAX_EXPANSION = 64  # normalized characters per input character, worst case
MAX_INSERT_CHARS = 16  # content of a Replace or Prepend
MAX_SEQUENCE = 16  # components in one Sequence

# Worst-case characters out per character in: Unicode's stated bounds for normalization forms
# (NFC 3, NFD 4, NFKC/NFKD 18) and full case mapping (3).
_NORMALIZERS: dict[str, int] = {
    "NFC": 3,
    "NFD": 4,
    "NFKC": 18,
    "NFKD": 18,
    "Lowercase": 3,
    "Strip": 1,
    "StripAccents": 1,
    "Prepend": 1,  # adds its content once; bounded by MAX_INSERT_CHARS
    "Replace": 1,  # factor computed from its pattern and content
    # BERT's: spaces around CJK characters (3), then accent stripping (NFD, 4) and lowercasing (3)
    "BertNormalizer": 36,
}
_PRE_TOKENIZERS = frozenset(
    {
        "ByteLevel",
        "Whitespace",
        "WhitespaceSplit",
        "Metaspace",
        "Split",
        "Punctuation",
        "Digits",
        "BertPreTokenizer",  # whitespace and punctuation, no regex
    }
)
_MODELS = frozenset({"BPE", "WordPiece", "WordLevel"})
_POST_PROCESSORS = frozenset({"TemplateProcessing", "RobertaProcessing", "BertProcessing", "ByteLevel"})
_DECODERS = frozenset(
    {"ByteLevel", "Metaspace", "BPEDecoder", "WordPiece", "ByteFallback", "Fuse", "Strip", "Replace"}
)

# Every regex a tokenizer may use, with the fewest characters it matches (for Replace's expansion).
# Anything else could be tuned to backtrack just under Oniguruma's retry limit on every text.
KNOWN_REGEXES: dict[str, int] = {
    # CLIP: whitespace runs (normalizer) and its word pattern (pre-tokenizer), with and without specials
    r"\s+": 1,
    r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+": 1,
    r"'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+": 1,
    # GPT-2 / OPT byte-level words
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+": 1,
    # Llama 3 (tiktoken cl100k style)
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+": 1,
}


@dataclass(frozen=True)
class TokenizerProfile:
    """What the check learnt: the normalizers' worst-case growth, characters out per character in."""

    expansion: int


def check_tokenizer_json(data: bytes | str, name: str = "tokenizer.json") -> TokenizerProfile:
    """Refuse a tokenizer.json whose components are not all accepted; IntegrityError names the first."""
    size = len(data)
    if size > MAX_TOKENIZER_BYTES:
        raise IntegrityError(f"{name} is {size} bytes; the limit is {MAX_TOKENIZER_BYTES}")
    try:
        raw = json.loads(data)
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise IntegrityError(f"cannot parse tokenizer JSON {name}: {exc}") from None
    if not isinstance(raw, dict):
        raise IntegrityError(f"cannot parse tokenizer JSON {name}: the top level is not an object")
    if not isinstance(raw.get("model"), dict):
        raise IntegrityError(f"cannot parse tokenizer JSON {name}: it has no model object")
    _one(name, "model", raw["model"], _MODELS)
    expansion = _normalizer(name, raw.get("normalizer"))
    if expansion > MAX_EXPANSION:
        raise IntegrityError(
            f"{name}: the normalizers can grow a text {expansion} times; the limit is {MAX_EXPANSION}"
        )
    _walk(name, "pre_tokenizer", raw.get("pre_tokenizer"), _PRE_TOKENIZERS, "pretokenizers")
    _walk(name, "post_processor", raw.get("post_processor"), _POST_PROCESSORS, "processors")
    _walk(name, "decoder", raw.get("decoder"), _DECODERS, "decoders")
    return TokenizerProfile(expansion)


def _one(name: str, kind: str, node: Any, accepted: frozenset[str] | dict[str, int]) -> str:
    kind_of = node.get("type") if isinstance(node, dict) else None
    if not isinstance(kind_of, str) or kind_of not in accepted:  # a dict "type" is unhashable
        raise IntegrityError(
            f"{name}: {kind} type {kind_of!r} is not accepted; accepted: {', '.join(sorted(accepted))}"
        )
    return str(kind_of)


def _members(name: str, kind: str, node: dict[str, Any], key: str) -> list[Any]:
    items = node.get(key)
    if not isinstance(items, list) or len(items) > MAX_SEQUENCE:
        raise IntegrityError(f"{name}: a {kind} Sequence must list at most {MAX_SEQUENCE} {key}")
    return items


def _walk(name: str, kind: str, node: Any, accepted: frozenset[str], key: str) -> None:
    """Check one component (None = absent), recursing into a Sequence's members."""
    if node is None:
        return
    if isinstance(node, dict) and node.get("type") == "Sequence":
        for member in _members(name, kind, node, key):
            if isinstance(member, dict) and member.get("type") == "Sequence":
                raise IntegrityError(f"{name}: nested {kind} Sequences are not accepted")
            _walk(name, kind, member, accepted, key)
        return
    kind_of = _one(name, kind, node, accepted)
    if kind_of in ("Split", "Replace"):
        _pattern(name, f"{kind} {kind_of}", node.get("pattern"))


def _pattern(name: str, where: str, pattern: Any) -> int:
    """Fewest characters the pattern matches; a regex must be a known one, a string non-empty."""
    if isinstance(pattern, dict) and len(pattern) == 1:
        ((how, value),) = pattern.items()
        if how == "String" and isinstance(value, str) and value:
            return len(value)
        if how == "Regex" and isinstance(value, str):
            if value not in KNOWN_REGEXES:
                raise IntegrityError(
                    f"{name}: {where} regex {value[:80]!r} is not a known tokenizer regex; "
                    "only the CLIP, GPT-2 and Llama patterns are accepted"
                )
            return KNOWN_REGEXES[value]
    raise IntegrityError(f"{name}: {where} pattern must be a non-empty String or a known Regex")


def _normalizer(name: str, node: Any) -> int:
    """Worst-case expansion of the normalizer (1 when absent)."""
    if node is None:
        return 1
    if isinstance(node, dict) and node.get("type") == "Sequence":
        factor = 1
        for member in _members(name, "normalizer", node, "normalizers"):
            if isinstance(member, dict) and member.get("type") == "Sequence":
                raise IntegrityError(f"{name}: nested normalizer Sequences are not accepted")
            factor *= _normalizer(name, member)
        return factor
    kind = _one(name, "normalizer", node, _NORMALIZERS)
    if kind == "Prepend":
        _insert(name, kind, node.get("prepend"))
    if kind != "Replace":
        return _NORMALIZERS[kind]
    shortest = _pattern(name, "normalizer Replace", node.get("pattern"))
    content = _insert(name, kind, node.get("content"))
    return max(1, -(-len(content) // shortest))


def _insert(name: str, kind: str, content: Any) -> str:
    if not isinstance(content, str) or len(content) > MAX_INSERT_CHARS:
        raise IntegrityError(
            f"{name}: a {kind} normalizer must insert a string of at most {MAX_INSERT_CHARS} characters"
        )
    return content
