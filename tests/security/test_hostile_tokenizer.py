"""Hostile tokenizer.json files and text batches (issue 15, round two).

A package's tokenizer.json is parsed by the Rust `tokenizers` library, which runs what the file
describes. Each row here edits the exported clip-tiny package's tokenizer.json and re-hashes the
manifest, as an attacker would, and expects verification to refuse it with an `IntegrityError`
naming the component. The raw cases that panic, abort or exhaust memory in the library run again
in a child process under a memory limit, so an abort fails one test instead of the run.
"""

from __future__ import annotations

import base64
import faulthandler
import json
import os
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import pytest

import mmedge
from mmedge.errors import IntegrityError, InvalidInputError

WATCHDOG_S = 60
CHILD_TIMEOUT_S = 120
SRC = str(Path(mmedge.__file__).resolve().parents[1])  # the mmedge under test, for child processes

CLIP_RE = r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|[^\s\p{L}\p{N}]+"
LLAMA3_RE = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Backtracks on a long run of letters with no "!" (the retry limit only stops it after seconds).
SLOW_RE = r"(\p{L}+\s?)+!"


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


# --- builders ---------------------------------------------------------------------------------


def _precompiled() -> dict:
    """A 4 KB charsmap that is not one: tokenizers panics (PanicException) while parsing it."""
    return {
        "type": "Precompiled",
        "precompiled_charsmap": base64.b64encode(b"\xff\xff\xff\x00" + b"\x01" * 3000).decode(),
    }


def _replace(pattern: dict, content: str) -> dict:
    return {"type": "Replace", "pattern": pattern, "content": content}


def _split(regex: str) -> dict:
    return {"type": "Split", "pattern": {"Regex": regex}, "behavior": "Isolated", "invert": False}


def _edit_tokenizer(pkg: Path, mutate: Callable[[dict], object]) -> Path:
    """Rewrite the package's tokenizer.json and record its new size and sha256 in the manifest."""
    path = pkg / "tokenizer.json"
    raw = json.loads(path.read_text())
    mutate(raw)
    path.write_text(json.dumps(raw))
    _rehash(pkg, "tokenizer.json")
    return pkg


def _rehash(pkg: Path, rel: str) -> None:
    from mmedge.runtime.package import sha256_file

    manifest = json.loads((pkg / "manifest.json").read_text())
    manifest["files"][rel] = {"sha256": sha256_file(pkg / rel), "size": (pkg / rel).stat().st_size}
    (pkg / "manifest.json").write_text(json.dumps(manifest))


def _set(key: str, value: object) -> Callable[[dict], object]:
    return lambda raw: raw.update({key: value})


# (id, mutation of tokenizer.json, pattern the IntegrityError must match)
HOSTILE = [
    (
        "precompiled-normalizer",
        _set("normalizer", _precompiled()),
        r"normalizer type 'Precompiled' is not accepted",
    ),
    (
        "chained-replace-expansion",  # 9,999 characters -> 900 million
        _set(
            "normalizer",
            {
                "type": "Sequence",
                "normalizers": [_replace({"String": "a"}, "b" * 300), _replace({"String": "b"}, "c" * 300)],
            },
        ),
        r"Replace normalizer must insert a string of at most 16 characters",
    ),
    (
        "replace-product-over-limit",  # each within the insert cap, 256 together
        _set(
            "normalizer",
            {
                "type": "Sequence",
                "normalizers": [_replace({"String": "a"}, "b" * 16), _replace({"String": "b"}, "c" * 16)],
            },
        ),
        r"the normalizers can grow a text 256 times; the limit is 64",
    ),
    (
        "replace-empty-pattern",
        _set("normalizer", _replace({"String": ""}, "x")),
        r"pattern must be a non-empty String",
    ),
    (
        "replace-unknown-regex",
        _set("normalizer", _replace({"Regex": "(a|a)*$"}, " ")),
        r"regex '\(a\|a\)\*\$' is not a known",
    ),
    (
        "split-backtracking-regex",
        _set("pre_tokenizer", _split(SLOW_RE)),
        r"pre_tokenizer Split regex .* is not a known",
    ),
    (
        "split-regex-in-sequence",
        _set(
            "pre_tokenizer", {"type": "Sequence", "pretokenizers": [{"type": "Whitespace"}, _split(SLOW_RE)]}
        ),
        r"pre_tokenizer Split regex",
    ),
    ("decoder-unknown-regex", _set("decoder", _replace({"Regex": ".*.*=.*"}, "")), r"decoder Replace regex"),
    ("unigram-model", lambda r: r["model"].update(type="Unigram"), r"model type 'Unigram' is not accepted"),
    (
        "unknown-pre-tokenizer",
        _set("pre_tokenizer", {"type": "UnicodeScripts"}),
        r"pre_tokenizer type 'UnicodeScripts'",
    ),
    (
        "unknown-post-processor",
        _set("post_processor", {"type": "Evil"}),
        r"post_processor type 'Evil' is not accepted",
    ),
    (
        "nested-sequence",
        _set("normalizer", {"type": "Sequence", "normalizers": [{"type": "Sequence", "normalizers": []}]}),
        r"nested normalizer Sequences are not accepted",
    ),
    (
        "long-sequence",
        _set("normalizer", {"type": "Sequence", "normalizers": [{"type": "Lowercase"}] * 17}),
        r"Sequence must list at most 16 normalizers",
    ),
    (
        "prepend-long",
        _set("normalizer", {"type": "Prepend", "prepend": "x" * 17}),
        r"Prepend normalizer must insert",
    ),
    ("model-missing", lambda r: r.pop("model"), r"it has no model object"),
    # found by the tokenizer_json fuzz target: a "type" that is an object, not a name
    ("model-type-object", lambda r: r["model"].update(type={"": 4}), r"model type \{'': 4\} is not accepted"),
    ("normalizer-type-list", _set("normalizer", {"type": ["Lowercase"]}), r"normalizer type \['Lowercase'\]"),
]


@pytest.mark.parametrize("mutate, match", [pytest.param(m, p, id=i) for i, m, p in HOSTILE])
def test_hostile_tokenizer_refused_at_verification(tiny_pkg: Path, mutate, match: str) -> None:
    from mmedge import sdk

    _edit_tokenizer(tiny_pkg, mutate)
    with pytest.raises(IntegrityError, match=match) as info:
        sdk.Pipeline(str(tiny_pkg), preload=True)
    assert type(info.value) is IntegrityError


@pytest.mark.parametrize(
    "data, match",
    [
        pytest.param(b"\xff\xfe not utf-8", "not UTF-8", id="not-utf8"),
        pytest.param(b"[" * 100_000, "cannot parse tokenizer JSON", id="deep-nesting"),
        pytest.param(b"[1, 2]", "the top level is not an object", id="not-object"),
    ],
)
def test_unparseable_tokenizer_refused_at_verification(tiny_pkg: Path, data: bytes, match: str) -> None:
    from mmedge import sdk

    (tiny_pkg / "tokenizer.json").write_bytes(data)
    _rehash(tiny_pkg, "tokenizer.json")
    with pytest.raises(IntegrityError, match=match):
        sdk.Pipeline(str(tiny_pkg), preload=True)


def test_tokenizer_swapped_after_verification_is_refused(tiny_pkg: Path, tmp_path: Path) -> None:
    """The tokenizer is read lazily at the first text call: the bytes parsed then must be the ones hashed."""
    from mmedge import sdk

    pipe = sdk.Pipeline(str(tiny_pkg))  # verified; the tokenizer is not loaded yet
    raw = json.loads((tiny_pkg / "tokenizer.json").read_text())
    raw["model"]["vocab"] = {
        tok: (i * 7) % len(raw["model"]["vocab"]) for i, tok in enumerate(raw["model"]["vocab"])
    }
    swapped = tmp_path / "swapped.json"
    swapped.write_text(json.dumps(raw))
    os.replace(swapped, tiny_pkg / "tokenizer.json")
    with pytest.raises(IntegrityError, match=r"tokenizer\.json: sha256 differs from the manifest"):
        pipe.embed_texts(["a red circle"])


def test_tokenizer_swapped_for_same_size_file_is_refused(tiny_pkg: Path) -> None:
    from mmedge import sdk

    pipe = sdk.Pipeline(str(tiny_pkg))
    path = tiny_pkg / "tokenizer.json"
    data = path.read_bytes()
    assert b'"version":"1.0"' in data.replace(b" ", b"")
    path.write_bytes(data.replace(b'"1.0"', b'"1.1"', 1))  # same size, one byte changed
    with pytest.raises(IntegrityError, match=r"sha256 differs"):
        pipe.embed_texts(["a red circle"])


def test_from_json_refuses_precompiled_without_a_panic() -> None:
    """Old code: pyo3 PanicException, a BaseException that passed every `except Exception`."""
    from mmedge.runtime.texts import TextTokenizer

    raw = json.loads(_tiny_json())
    raw["normalizer"] = _precompiled()
    with pytest.raises(IntegrityError, match="Precompiled"):
        TextTokenizer.from_json(json.dumps(raw), context_length=16, pad_id=0)


def _tiny_json() -> str:
    from mmedge.models.init import tiny_tokenizer_json

    return tiny_tokenizer_json(generative=False)


# --- accepted shapes: mmedge's own tokenizers and HF CLIP / OPT / Llama 2 / Llama 3 --------------

_VOCAB = [
    "<unk>",
    "<s>",
    "</s>",
    "a",
    "b",
    "ab",
    "Ġ",
    "▁",
    "<|startoftext|>",
    "<|endoftext|>",
    "a</w>",
    "b</w>",
]


def _bpe(**extra: object) -> dict:
    return {
        "type": "BPE", "dropout": None, "unk_token": "<unk>", "continuing_subword_prefix": None,
        "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False,
        "vocab": {t: i for i, t in enumerate(_VOCAB)}, "merges": ["a b"], **extra,
    }  # fmt: skip


def _template(first: str, first_id: int) -> dict:
    return {
        "type": "TemplateProcessing",
        "single": [{"SpecialToken": {"id": first, "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
        "pair": [{"Sequence": {"id": "A", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}],
        "special_tokens": {first: {"id": first, "ids": [first_id], "tokens": [first]}},
    }


_BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
SHAPES = {
    "clip": {
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "NFC"}, _replace({"Regex": r"\s+"}, " "), {"type": "Lowercase"}]},
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": CLIP_RE}, "behavior": "Removed", "invert": True},
            {**_BYTE_LEVEL, "use_regex": False}]},
        "post_processor": {"type": "RobertaProcessing", "sep": ["<|endoftext|>", 9], "cls": ["<|startoftext|>", 8],
                           "trim_offsets": False, "add_prefix_space": False},
        "decoder": _BYTE_LEVEL,
        "model": _bpe(end_of_word_suffix="</w>"),
    },
    "opt": {"normalizer": None, "pre_tokenizer": _BYTE_LEVEL, "post_processor": _template("</s>", 2),
            "decoder": _BYTE_LEVEL, "model": _bpe()},
    "llama2": {
        "normalizer": {"type": "Sequence", "normalizers": [
            {"type": "Prepend", "prepend": "▁"}, _replace({"String": " "}, "▁")]},
        "pre_tokenizer": None,
        "post_processor": _template("<s>", 1),
        "decoder": {"type": "Sequence", "decoders": [
            _replace({"String": "▁"}, " "), {"type": "ByteFallback"}, {"type": "Fuse"},
            {"type": "Strip", "content": " ", "start": 1, "stop": 0}]},
        "model": _bpe(byte_fallback=True, fuse_unk=True),
    },
    "llama3": {
        "normalizer": None,
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_RE}, "behavior": "Isolated", "invert": False},
            {**_BYTE_LEVEL, "use_regex": False}]},
        "post_processor": {"type": "Sequence", "processors": [_BYTE_LEVEL, _template("<s>", 1)]},
        "decoder": _BYTE_LEVEL,
        "model": _bpe(ignore_merges=True),
    },
}  # fmt: skip


@pytest.mark.parametrize("name", sorted(SHAPES))
def test_real_tokenizer_shapes_are_accepted(name: str) -> None:
    from mmedge.runtime.texts import TextTokenizer

    spec = {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [], **SHAPES[name]}
    tok = TextTokenizer.from_json(json.dumps(spec), context_length=8, pad_id=0)
    ids, mask = tok.encode_batch(["a b ab", "ab"])
    assert ids.shape == mask.shape and ids.shape[0] == 2


@pytest.mark.parametrize("generative", [False, True])
def test_mmedge_tokenizers_are_accepted(generative: bool) -> None:
    from mmedge.models.init import tiny_tokenizer_json
    from mmedge.runtime.tokenizer_policy import check_tokenizer_json

    assert check_tokenizer_json(tiny_tokenizer_json(generative=generative)).expansion == 9  # NFC x Lowercase


# --- native aborts and memory, in a child process -------------------------------------------------


def _child(code: str, limit_mb: int = 2048) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter with an address-space limit; a panic or abort ends only it."""
    prelude = textwrap.dedent(f"""
        import resource
        resource.setrlimit(resource.RLIMIT_AS, ({limit_mb} << 20, {limit_mb} << 20))

        def peak_mb():
            # VmHWM: this process's own peak RSS. (ru_maxrss keeps the forking parent's peak across exec.)
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    """)
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONFAULTHANDLER": "1", "RAYON_NUM_THREADS": "2"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, env=env, check=False,
    )  # fmt: skip


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_hostile_tokenizers_in_child_process_never_reach_rust(tmp_path: Path) -> None:
    """Every hostile file, loaded and then used on a 9,999-character text under a 2 GB limit: each
    must be an IntegrityError (old code: a panic, an abort for memory, or a minute of regex)."""
    cases = {i: m for i, m, _ in HOSTILE}
    paths = []
    for name in ("precompiled-normalizer", "chained-replace-expansion", "split-backtracking-regex"):
        raw = json.loads(_tiny_json())
        cases[name](raw)
        (tmp_path / f"{name}.json").write_text(json.dumps(raw))
        paths.append(str(tmp_path / f"{name}.json"))
    proc = _child(f"""
        from mmedge.errors import IntegrityError
        from mmedge.runtime.texts import TextTokenizer
        for path in {paths!r}:
            print("START", path, flush=True)
            try:
                tok = TextTokenizer.from_file(path, context_length=16, pad_id=0)
                tok.encode_batch(["a" * 9_999, "abc " * 2_499])
                print("ACCEPTED", path, flush=True)
            except IntegrityError as exc:
                print("REFUSED", path, exc, flush=True)
    """)
    assert proc.returncode == 0, f"child exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    assert proc.stdout.count("REFUSED") == len(paths), proc.stdout + proc.stderr[-3000:]


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")
def test_long_texts_are_cut_before_tokenising_peak_memory(tmp_path: Path) -> None:
    """100 texts of 10,000 characters (the per-call cap): old code tokenised every whole text
    (+50 MB here, 4.9 GB for 4,096 texts); now each is cut to what the context can use."""
    (tmp_path / "tok.json").write_text(_tiny_json())
    proc = _child(f"""
        from mmedge.runtime.texts import TextTokenizer
        tok = TextTokenizer.from_file({str(tmp_path / "tok.json")!r}, context_length=32, pad_id=0)
        tok.encode_batch(["warm up"])
        before = peak_mb()
        ids, mask = tok.encode_batch([("a red circle " * 800)[:10_000] for _ in range(100)])
        grew = peak_mb() - before
        print(ids.shape, int(mask.sum()), "GREW_MB", grew)
    """)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "(100, 32) 3200" in proc.stdout, proc.stdout
    grew = float(proc.stdout.split("GREW_MB")[1])
    assert grew < 20, f"peak RSS grew {grew:.1f} MB for one call"


def test_total_characters_per_call_are_capped() -> None:
    from mmedge.runtime.texts import TextLimits, TextTokenizer

    tok = TextTokenizer.from_json(_tiny_json(), 16, pad_id=0, limits=TextLimits(max_total_chars=1_000))
    tok.encode_batch(["a red circle " * 38] * 2)  # 988 characters
    with pytest.raises(InvalidInputError, match=r"texts of one call have 1200 characters; the limit is 1000"):
        tok.encode_batch(["x" * 600, "y" * 600])


def test_cut_texts_encode_as_whole_texts() -> None:
    """Cutting before tokenising changes no ids: long texts, whitespace runs, one long word, specials."""
    from tokenizers import Tokenizer

    from mmedge.runtime.texts import TextLimits, TextTokenizer

    text = _tiny_json()
    new = TextTokenizer.from_json(text, 16, pad_id=0, limits=TextLimits(chars_per_token=2, chunk_chars=300))
    old = Tokenizer.from_str(text)
    old.enable_truncation(max_length=16)
    old.enable_padding(pad_id=0)
    old.encode_special_tokens = True
    batch = [
        "a red circle " * 40,
        " " * 3_000 + "a big blue star",
        "redcircle" * 300,
        "tiny",
        "a <|endoftext|> b " * 30,
        "\t\n" * 500 + "red" + " x" * 50,
    ]
    ids, mask = new.encode_batch(batch)
    want = old.encode_batch(batch)
    assert ids.tolist() == [e.ids for e in want]
    assert mask.tolist() == [e.attention_mask for e in want]
