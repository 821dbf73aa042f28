"""Beam search (`num_beams`, `length_penalty`, `early_stopping`) against transformers' `generate`.

Tiny random OPT and Llama causal LMs written with `save_pretrained`, exported, and decoded by the
torch-free runtime: the best beam's token ids must equal HF's `generate(num_beams=3, ...)` for 20
new tokens. Each model's EOS is a token its beams often choose, so that hypotheses finish both by
EOS and by length. The BLIP-2 chat path, the ORT build with an in-place cache, streaming, stop
strings, the context limit and bad parameters are covered too.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_tiny import word_tokenizer_json

VOCAB, CONTEXT = 200, 128
# A token each random model's beams often pick: as EOS, some searches end on it and some by length.
EOS = {"opt": 82, "llama": 27}
# (length_penalty, early_stopping, min_new_tokens, repetition_penalty)
CASES = [
    (1.0, False, 0, 1.0),
    (1.0, True, 0, 1.0),
    (0.6, False, 0, 1.0),
    (0.6, True, 0, 1.0),
    (2.0, "never", 0, 1.0),
    (-0.5, "never", 0, 1.0),
    (1.0, False, 20, 1.0),
    (1.0, False, 0, 1.3),
]


def _hf_model(style: str):
    from hf_tiny import tiny_causal_lm

    return tiny_causal_lm(style, VOCAB, CONTEXT, EOS[style])


@pytest.fixture(scope="module", params=["opt", "llama"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from mmedge import sdk
    from mmedge.export.exporter import export_model

    root = tmp_path_factory.mktemp(f"beam-{request.param}")
    hf = _hf_model(request.param)
    hf.save_pretrained(root / "src")
    (root / "src" / "tokenizer.json").write_text(word_tokenizer_json(VOCAB))
    export_model(root / "src", root / "pkg")
    return request.param, hf, sdk.Pipeline(str(root / "pkg"))


def _prompts(n: int = 3) -> list[list[int]]:
    return [np.random.default_rng(s).integers(0, VOCAB - 3, 5 + 3 * s).tolist() for s in range(n)]


def _hf_new_tokens(hf, ids: list[int], eos: int, **kwargs: object) -> list[int]:
    """HF's best beam after the prompt, cut before its EOS (HF pads after it)."""
    with torch.no_grad():
        out = hf.generate(torch.tensor([ids]), do_sample=False, **kwargs)[0, len(ids) :].tolist()
    return out[: out.index(eos)] if eos in out else out


def _beam_kwargs(lp: float, early: bool | str, min_new: int, penalty: float) -> dict[str, object]:
    return {
        "max_new_tokens": 20,
        "min_new_tokens": min_new,
        "num_beams": 3,
        "length_penalty": lp,
        "early_stopping": early,
        "repetition_penalty": penalty,
    }


def test_one_beam_is_greedy_as_transformers(exported) -> None:
    style, hf, pipe = exported
    for ids in _prompts(2):
        ref = _hf_new_tokens(hf, ids, EOS[style], max_new_tokens=20, num_beams=1)
        assert (
            pipe.generate_ids(ids, max_new_tokens=20, num_beams=1)
            == ref
            == pipe.generate_ids(ids, max_new_tokens=20)
        )


def test_three_beams_match_transformers(exported) -> None:
    style, hf, pipe = exported
    eos, lengths, mismatches = EOS[style], [], []
    for lp, early, min_new, penalty in CASES:
        kwargs = _beam_kwargs(lp, early, min_new, penalty)
        for ids in _prompts():
            ref = _hf_new_tokens(hf, ids, eos, **kwargs)
            ours = pipe.generate_ids(ids, **kwargs)
            lengths.append(len(ref))
            if ours != ref:
                mismatches.append((kwargs, ids, ours, ref))
    assert not mismatches
    # the cases cover hypotheses ended by EOS and by max_new_tokens
    assert 20 in lengths and min(lengths) < 20
    # and beam search differs from greedy somewhere: the test would not notice a greedy fallback
    greedy = [pipe.generate_ids(ids, max_new_tokens=20) for ids in _prompts()]
    beams = [pipe.generate_ids(ids, **_beam_kwargs(*CASES[0])) for ids in _prompts()]
    assert greedy != beams


def test_in_place_cache_build_runs_the_beams(exported, tmp_path: Path) -> None:
    """The ORT build's GroupQueryAttention writes the cache in place with batch = num_beams rows;
    reordering the rows keeps the bound buffers."""
    from mmedge import sdk
    from mmedge.builds.package import build_package

    style, hf, pipe = exported
    if style != "llama":
        pytest.skip("one build is enough")
    pkg = tmp_path / "pkg"
    shutil.copytree(pipe.runner.package.root, pkg)
    build_package(pkg, backend="ort", precision="fp32")
    fused = sdk.Pipeline(str(pkg), precision="fp32")
    assert fused.lm.in_place
    for case in (CASES[0], CASES[3], CASES[4]):
        kwargs = _beam_kwargs(*case)
        for ids in _prompts(2):
            assert fused.generate_ids(ids, **kwargs) == _hf_new_tokens(hf, ids, EOS[style], **kwargs)


def test_the_context_limits_the_beams_as_max_new_tokens(exported) -> None:
    """A prompt near the end of the context generates what fits, with a warning, as HF does with
    that many new tokens."""
    from mmedge.errors import ContextFullWarning

    style, hf, pipe = exported
    ids = np.random.default_rng(9).integers(0, VOCAB - 3, CONTEXT - 8).tolist()  # room for 9
    ref = _hf_new_tokens(hf, ids, EOS[style], max_new_tokens=9, min_new_tokens=9, num_beams=3)
    with pytest.warns(ContextFullWarning, match="full"):
        ours = pipe.generate_ids(ids, max_new_tokens=20, min_new_tokens=9, num_beams=3)
    assert ours == ref and len(ours) == 9


def test_text_streams_once_the_search_ends(exported) -> None:
    from mmedge.runtime.generation import Usage

    _, _, pipe = exported
    kwargs = _beam_kwargs(*CASES[0])
    u = Usage()
    whole = pipe.generate("t5 t7 t9", usage=u, **kwargs)
    usage = Usage()
    pieces = list(pipe.generate("t5 t7 t9", stream=True, usage=usage, **kwargs))
    assert "".join(pieces) == whole
    ids = pipe.encode_prompt("t5 t7 t9")
    tokens = pipe.generate_ids(ids, **kwargs)
    assert whole == pipe.lm.tokenizer.decode(tokens)
    assert usage.completion_tokens == u.completion_tokens == len(tokens)
    assert usage.finish_reason == ("length" if len(tokens) == 20 else "stop")
    # a stop string cuts the best beam's text (the search itself runs as without it)
    words = whole.split()
    assert len(words) > 3
    usage = Usage()
    cut = pipe.generate("t5 t7 t9", stop_strings=[words[2]], usage=usage, **kwargs)
    assert cut == whole[: whole.index(words[2])] and usage.finish_reason == "stop"


def test_kv_cache_reorder_moves_rows_in_place() -> None:
    from mmedge.runtime.generation import KVCache

    rng = np.random.default_rng(0)
    for index in ([0, 1, 2, 3], [2, 0, 1, 3], [1, 1, 1, 0], [3, 3, 0, 0], [0, 0, 0, 0]):
        cache = KVCache(layers=2, batch=4, kv_heads=2, max_context=6, head_dim=3)
        for buf in cache.buffers:
            buf[...] = rng.standard_normal(buf.shape)
        cache.length = 4
        ids = [id(b) for b in cache.buffers]
        before = [b.copy() for b in cache.buffers]
        cache.reorder(np.array(index))
        assert [id(b) for b in cache.buffers] == ids  # the buffers bound to sessions stay
        for old, new in zip(before, cache.buffers):
            np.testing.assert_array_equal(new[:, :, :4], old[index, :, :4])
            np.testing.assert_array_equal(new[:, :, 4:], old[:, :, 4:])  # empty slots are not copied


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"num_beams": 0}, "num_beams must be an int in \\[1, 8\\]"),
        ({"num_beams": -1}, "num_beams"),
        ({"num_beams": 3.0}, "num_beams"),
        ({"num_beams": True}, "num_beams"),
        ({"num_beams": 9}, "num_beams"),
        ({"num_beams": "3"}, "num_beams"),
        ({"num_beams": 3, "length_penalty": float("nan")}, "length_penalty"),
        ({"num_beams": 3, "length_penalty": "1"}, "length_penalty"),
        ({"num_beams": 3, "early_stopping": "always"}, "early_stopping"),
        ({"num_beams": 3, "early_stopping": 1}, "early_stopping"),
        ({"num_beams": 3, "do_sample": True}, "beam-sample"),
        ({"num_beam": 3}, "unknown generation parameters"),
    ],
)
def test_bad_beam_parameters_are_refused(kwargs: dict[str, object], match: str) -> None:
    from mmedge.errors import InvalidInputError
    from mmedge.runtime.generation import GenerationConfig

    with pytest.raises(InvalidInputError, match=match):
        GenerationConfig.from_kwargs(**kwargs)


def test_pipelines_refuse_bad_beams_and_a_package_with_smaller_batches(exported, monkeypatch) -> None:
    from mmedge.errors import InvalidInputError

    _, _, pipe = exported
    for bad in (0, 9, 2.5):
        with pytest.raises(InvalidInputError, match="num_beams"):
            pipe.generate("t5", num_beams=bad)
        with pytest.raises(InvalidInputError, match="num_beams"):
            pipe.generate_ids([5, 6], num_beams=bad)
    with pytest.raises(InvalidInputError, match="beam-sample"):
        pipe.generate("t5", num_beams=2, do_sample=True)
    monkeypatch.setattr(pipe.lm, "max_batch", 2)  # as a package whose llm_step takes 2 rows at most
    with pytest.raises(InvalidInputError, match=r"at most 2 .*re-export"):
        pipe.generate_ids([5, 6], num_beams=3)
    assert len(pipe.generate_ids([5, 6], num_beams=2, max_new_tokens=4, min_new_tokens=4)) == 4


def test_cli_generate_takes_the_beam_options(exported, capsys: pytest.CaptureFixture[str]) -> None:
    import json

    from mmedge.sdk.cli import main

    _, _, pipe = exported
    root = str(pipe.runner.package.root)
    kwargs = _beam_kwargs(0.6, "never", 0, 1.0)
    args = [
        "--num-beams",
        "3",
        "--length-penalty",
        "0.6",
        "--early-stopping",
        "never",
        "--max-new-tokens",
        "20",
    ]
    assert main(["generate", root, "t5 t7 t9", *args, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["text"] == pipe.generate("t5 t7 t9", **kwargs)
    assert main(["generate", root, "t5", "--num-beams", "0", "--json"]) == 1
    assert "num_beams" in capsys.readouterr().out


# -- the chat path: BLIP-2 (OPT) -----------------------------------------------------------------
BLIP_VOCAB, QUERIES, SIZE = 120, 4, 32


@pytest.fixture(scope="module")
def blip2(tmp_path_factory: pytest.TempPathFactory):
    from hf_tiny import write_tiny_hf_blip2

    from mmedge import sdk
    from mmedge.export.exporter import export_model

    root = tmp_path_factory.mktemp("beam-blip2")
    hf = write_tiny_hf_blip2(root / "src", BLIP_VOCAB, QUERIES, SIZE, qformer_layers=2)
    export_model(root / "src", root / "pkg")
    return hf, sdk.Pipeline(str(root / "pkg"))


def test_chat_beams_match_transformers_and_keep_the_prompt_cached(blip2) -> None:
    from PIL import Image

    from mmedge.runtime.generation import Usage

    hf, pipe = blip2
    img = (np.random.default_rng(5).random((40, 57, 3)) * 255).astype(np.uint8)
    px = transformers.BlipImageProcessor(size={"height": SIZE, "width": SIZE})(
        Image.fromarray(img), return_tensors="pt"
    )["pixel_values"]
    prompt = "Question: t7 t9 t11 Answer:"
    ids = [BLIP_VOCAB - 1] * QUERIES + pipe.lm.tokenizer.encode(prompt)
    for lp, early in ((1.0, False), (0.6, True)):
        kwargs = {
            "max_new_tokens": 12,
            "min_new_tokens": 12,
            "num_beams": 3,
            "length_penalty": lp,
            "early_stopping": early,
        }
        with torch.no_grad():
            ref = hf.generate(pixel_values=px, input_ids=torch.tensor([ids]), **kwargs)[0, -12:].tolist()
        assert pipe.chat(img, "t7 t9 t11", **kwargs) == pipe.lm.tokenizer.decode(ref)
    # the kept conversation holds the prompt (the beams ran in their own cache): a follow-up
    # replays it, and the answer and the new question run
    answer = pipe.chat(img, "t7 t9 t11", num_beams=3, max_new_tokens=5, min_new_tokens=5)
    messages = [
        {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "t7 t9 t11"}]},
        {"role": "assistant", "content": answer},
        {"role": "user", "content": "t4"},
    ]
    usage = Usage()
    pipe.chat_messages(messages, usage=usage, num_beams=3, max_new_tokens=3)
    assert usage.cached_tokens == len(ids)
    caption = pipe.caption(img, num_beams=2, max_new_tokens=4, min_new_tokens=4)
    assert len(caption.split()) == 4
