"""HF causal LMs (OPT, Llama with grouped-query attention) -> mmedge export -> torch-free generation.

Parity is against transformers itself: `save_pretrained` of a small random model, then greedy
`generate`, prefill logits, and sampling-free warpers (repetition penalty) token for token.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB = 200


def _tokenizer_json() -> str:
    from hf_tiny import word_tokenizer_json

    return word_tokenizer_json(VOCAB)


def _hf_model(style: str):
    from hf_tiny import tiny_causal_lm

    return tiny_causal_lm(style, VOCAB, 128, VOCAB - 1)


@pytest.fixture(scope="module", params=["opt", "llama"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from mmedge import sdk
    from mmedge.export.exporter import export_model

    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf = _hf_model(request.param)
    hf.save_pretrained(root / "src")
    (root / "src" / "tokenizer.json").write_text(_tokenizer_json())
    manifest = export_model(root / "src", root / "pkg")
    return hf, sdk.Pipeline(str(root / "pkg")), manifest


def _prompts(n: int = 3) -> list[list[int]]:
    return [np.random.default_rng(s).integers(0, VOCAB - 3, 5 + 3 * s).tolist() for s in range(n)]


def test_manifest_declares_a_fixed_cache(exported) -> None:
    _, _, manifest = exported
    g = manifest.llm
    assert g.max_context == 128 and g.layers == 2
    llm = manifest.components["llm"]
    past = [s for s in llm.inputs if s.name.startswith("past_key_values.")]
    assert [s.name for s in past[:2]] == ["past_key_values.0.key", "past_key_values.0.value"]
    assert all(s.shape[2] == 128 for s in past) and llm.precisions["fp32"].parity["trt_lint_ok"]


def test_greedy_tokens_match_transformers(exported) -> None:
    hf, pipe, _ = exported
    for ids in _prompts():
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert pipe.generate_ids(ids, max_new_tokens=20, min_new_tokens=20) == ref[0, len(ids) :].tolist()


def test_repetition_penalty_matches_transformers(exported) -> None:
    hf, pipe, _ = exported
    ids = _prompts(1)[0]
    with torch.no_grad():
        ref = hf.generate(
            torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False, repetition_penalty=1.8
        )
    assert (
        pipe.generate_ids(ids, max_new_tokens=12, min_new_tokens=12, repetition_penalty=1.8)
        == ref[0, len(ids) :].tolist()
    )


def test_prefill_logits_match_transformers(exported) -> None:
    hf, pipe, _ = exported
    lm = pipe.lm
    for ids in _prompts():
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        ours = lm.forward(lm.embed(np.array([ids])), lm.new_cache())[0]
        assert np.abs(ours - ref).max() < 1e-3
        last = lm.forward(lm.embed(np.array([ids])), lm.new_cache(), logits_to_keep=1)[
            0
        ]  # what a prefill computes
        assert last.shape == (1, VOCAB) and np.abs(last[0] - ref[-1]).max() < 1e-3


def test_cached_decoding_equals_recomputing(exported) -> None:
    """Greedy with the KV cache == greedy re-running the whole sequence with an empty cache each step."""
    _, pipe, _ = exported
    lm = pipe.lm
    ids = _prompts(2)[1]
    cached = pipe.generate_ids(ids, max_new_tokens=15, min_new_tokens=15)
    seq = list(ids)
    for _ in range(15):
        logits = lm.forward(lm.embed(np.array([seq])), lm.new_cache())[0, -1]
        seq.append(int(np.argmax(logits)))
    assert cached == seq[len(ids) :]


def test_ort_build_with_in_place_cache_matches_transformers(exported, tmp_path: Path) -> None:
    """`build --backend ort` fuses each layer's attention into GroupQueryAttention writing the cache
    in place; greedy tokens (prompt, then decode, then a second prompt on the same cache) stay
    identical to transformers and to the portable graph."""
    import shutil

    from mmedge import sdk
    from mmedge.builds.package import build_package
    from mmedge.runtime.generation import GenerationConfig

    hf, pipe, _ = exported
    pkg = tmp_path / "pkg"
    shutil.copytree(pipe.runner.package.root, pkg)
    built = build_package(pkg, backend="ort", precision="fp32")
    assert built["builds"]["llm.fp32"]["ops"]["com.microsoft:GroupQueryAttention"] == 2
    fused = sdk.Pipeline(str(pkg), precision="fp32")
    assert fused.lm.in_place and not pipe.lm.in_place
    for ids in _prompts():
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert fused.generate_ids(ids, max_new_tokens=20, min_new_tokens=20) == ref[0, len(ids) :].tolist()
    lm, first, second = fused.lm, _prompts(2)[1], _prompts(1)[0]
    cache = lm.new_cache()
    six = GenerationConfig(max_new_tokens=6, min_new_tokens=6)
    turn1 = list(lm.generate_ids(lm.embed(np.array([first]))[0], six, cache))
    turn2 = list(lm.generate_ids(lm.embed(np.array([second]))[0], six, cache))
    seq = first + turn1[:-1] + second  # the last token of turn 1 was yielded but never fed back
    with torch.no_grad():
        ref = hf.generate(torch.tensor([seq]), max_new_tokens=6, min_new_tokens=6, do_sample=False)
    assert turn2 == ref[0, len(seq) :].tolist()


def test_sampling_controls(exported) -> None:
    _, pipe, _ = exported
    ids = _prompts(1)[0]
    greedy = pipe.generate_ids(ids, max_new_tokens=10, min_new_tokens=10)
    assert (
        pipe.generate_ids(ids, max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=0) == greedy
    )
    assert (
        pipe.generate_ids(ids, max_new_tokens=10, min_new_tokens=10, do_sample=True, top_k=1, seed=5)
        == greedy
    )
    assert (
        pipe.generate_ids(ids, max_new_tokens=10, min_new_tokens=10, do_sample=True, top_p=1e-6, seed=5)
        == greedy
    )
    a = pipe.generate_ids(ids, max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=5.0, seed=7)
    b = pipe.generate_ids(ids, max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=5.0, seed=7)
    c = pipe.generate_ids(ids, max_new_tokens=10, min_new_tokens=10, do_sample=True, temperature=5.0, seed=8)
    assert a == b and a != c and a != greedy


def test_text_generation_and_streaming(exported) -> None:
    _, pipe, _ = exported
    text = pipe.generate("t5 t6 t7", max_new_tokens=8, min_new_tokens=8)
    pieces = list(pipe.generate("t5 t6 t7", stream=True, max_new_tokens=8, min_new_tokens=8))
    assert len(pieces) > 1 and "".join(pieces) == text and len(text.split()) == 8
    first = text.split()[2]
    cut = pipe.generate("t5 t6 t7", max_new_tokens=8, min_new_tokens=8, stop_strings=[first])
    assert first not in cut and text.startswith(cut)


def test_bad_generation_requests(exported) -> None:
    from mmedge.errors import InvalidInputError

    _, pipe, _ = exported
    bad = [
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"max_new_tokens": -3}, "max_new_tokens"),
        ({"temperature": -0.5}, "temperature"),
        ({"top_p": 0.0}, "top_p"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_k": -1}, "top_k"),
        ({"repetition_penalty": 0}, "repetition_penalty"),
        ({"min_new_tokens": 99, "max_new_tokens": 5}, "min_new_tokens"),
        ({"stop_strings": "x"}, "stop_strings"),
        ({"beams": 4}, "unknown generation parameters"),
        ({"temperature": float("nan")}, "temperature"),
    ]
    for kwargs, match in bad:
        with pytest.raises(InvalidInputError, match=match):
            pipe.generate("t5", **kwargs)
    with pytest.raises(InvalidInputError, match="context"):
        pipe.generate(" ".join(["t9"] * 200), max_new_tokens=4)
    with pytest.raises(InvalidInputError, match="no room to generate"):
        pipe.generate_ids([5] * 128, max_new_tokens=4)


def test_special_tokens_in_user_text_are_plain_text(exported) -> None:
    _, pipe, _ = exported
    ids = pipe.encode_prompt("t5 </s> <pad>")
    assert VOCAB - 1 not in ids and VOCAB - 3 not in ids


def test_import_refuses_unsupported_configs(tmp_path: Path) -> None:
    import json

    from mmedge.errors import UnsupportedError
    from mmedge.models.hf_import import load_hf

    hf = _hf_model("llama")
    hf.save_pretrained(tmp_path)
    (tmp_path / "tokenizer.json").write_text(_tokenizer_json())
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UnsupportedError, match="rope scaling"):
        load_hf(tmp_path)


def test_weight_only_quantization(exported, tmp_path: Path) -> None:
    import shutil

    from mmedge import sdk
    from mmedge.builds.package import build_package
    from mmedge.calibration.package import calibrate_package
    from mmedge.runtime.package import verify_package

    _, pipe, _ = exported
    pkg = tmp_path / "pkg"
    shutil.copytree(pipe.runner.package.root, pkg)
    report = calibrate_package(pkg, "train-shapes:12", samples=4, weight_bits=(4, 8))
    assert report["components"]["embed"] == {"skipped": "no MatMul weights to quantize"}
    llm = verify_package(pkg).manifest.components["llm"]
    for bits in (4, 8):
        rec = llm.precisions[f"int{bits}"]
        assert rec.calibration["method"] == "weight-only" and rec.calibration["bits"] == bits
        assert rec.parity["trt_lint_ok"] and 0 < rec.parity["logits_cosine"] <= 1
    # 8-bit weights stay much closer to fp32 than 4-bit ones on the same tokens
    assert llm.precisions["int8"].parity["logits_cosine"] > max(
        0.999, llm.precisions["int4"].parity["logits_cosine"]
    )
    built = build_package(pkg, backend="ort")
    # per layer: joined q/k/v, output, then fc1 + fc2 (OPT) or joined gate/up + down (Llama); + lm_head
    assert built["builds"]["llm.int4"]["ops"]["com.microsoft:MatMulNBits"] == 2 * 4 + 1
    ids = _prompts(1)[0]
    for precision in ("int4", "int8", "auto"):
        out = sdk.Pipeline(str(pkg), precision=precision).generate_ids(
            ids, max_new_tokens=6, min_new_tokens=6
        )
        assert len(out) == 6 and all(0 <= t < VOCAB for t in out)
    _check_prefill_builds(pkg, built, ids)


def _check_prefill_builds(pkg: Path, built: dict, ids: list[int]) -> None:
    """Each weight-only build has a prefill build (int8 GEMMs); prompts run through it, decoding
    through the 4-bit build, both bound to one cache; `--no-prefill-build` leaves none behind."""
    from mmedge.builds.package import build_package
    from mmedge.runtime.components import ComponentRunner
    from mmedge.runtime.generation import PREFILL, LanguageModel
    from mmedge.runtime.package import verify_package

    for bits in (4, 8):
        rec = built["builds"][f"llm.int{bits}.{PREFILL}"]
        assert rec["int8_gemms"] == 2 * 4 + 1 and rec["rel_error_vs_source"] < 1e-1
    lm = LanguageModel(ComponentRunner(pkg, precision="int4"))
    prefill = lm.runner.variant_session("llm", PREFILL)
    assert prefill is not None and prefill is not lm.runner.session("llm")
    cache, stepwise = lm.new_cache(), lm.new_cache()
    prompt = lm.embed(np.array([ids]))
    logits = lm.forward(prompt, cache, logits_to_keep=1)[0, -1]
    assert [s for s, _ in cache.bindings] == [prefill]
    for i in range(len(ids)):  # the same prompt one token at a time: the 4-bit decode build only
        ref = lm.forward(prompt[:, i : i + 1], stepwise)[0, -1]
    assert [s for s, _ in stepwise.bindings] == [lm.runner.session("llm")]
    cos = float(logits @ ref / (np.linalg.norm(logits) * np.linalg.norm(ref)))
    assert cos > 0.99
    n = len(ids)
    for a, b in zip(cache.buffers, stepwise.buffers):  # the keys/values decoding will read
        assert np.abs(a[:, :, :n] - b[:, :, :n]).max() <= 0.1 * np.abs(b[:, :, :n]).max()
    lm.forward(lm.embed(np.array([[ids[0]]])), cache)  # then decoding, on the same cache
    assert [s for s, _ in cache.bindings] == [prefill, lm.runner.session("llm")]
    build_package(pkg, backend="ort", prefill=False)
    engines = next(iter(verify_package(pkg).manifest.engines.values()))
    assert not [k for k in engines.files if k.endswith(f".{PREFILL}")]
    assert not list(pkg.glob(f"builds/*/*.{PREFILL}.onnx"))
    assert ComponentRunner(pkg, precision="int4").variant_session("llm", PREFILL) is None
