"""HF BlipForConditionalGeneration / BlipForQuestionAnswering -> mmedge export -> torch-free captions
and VQA answers over a cross-attention decoder.

Parity is against transformers: small random models and a BERT-style tokenizer with [DEC] written
with `save_pretrained` (the whole BlipProcessor), images read from files through mmedge's
preprocessing against BlipImageProcessor (PIL); greedy and 3-beam token ids equal HF's `generate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from models.test_hf_blip_itm import SIZE, _images, _tokenizer

TOKENS = 20
PROMPTS = [None, "a picture of"]
QUESTIONS = ["what is on the left", "the red dog"]


def _config(vocab: int, **text: int) -> transformers.BlipConfig:
    from hf_tiny import tiny_blip_config

    # + [DEC], BLIP's decoder start token, after the vocabulary
    return tiny_blip_config(SIZE, {"vocab_size": vocab + 1, "bos_token_id": vocab, "pad_token_id": 0, **text})


def _export(root: Path, cls: type, seed: int, **text: int):
    from hf_tiny import save_blip_model

    from mmedge import sdk
    from mmedge.export.exporter import export_model

    hf_tok, vocab = _tokenizer()
    hf_tok.add_special_tokens({"bos_token": "[DEC]"})  # BLIP's decoder start token, after the vocabulary
    torch.manual_seed(seed)
    hf = cls(_config(vocab, **text)).eval()
    with torch.no_grad():  # sharper logits: random tiny decoders otherwise tie between tokens
        hf.text_decoder.cls.predictions.decoder.weight.mul_(4)
    processor = save_blip_model(root / "src", hf, hf_tok, SIZE)
    export_model(root / "src", root / "pkg")
    return hf, processor, sdk.Pipeline(str(root / "pkg"))


@pytest.fixture(scope="module")
def caption(tmp_path_factory: pytest.TempPathFactory):
    return _export(tmp_path_factory.mktemp("blip-caption"), transformers.BlipForConditionalGeneration, 0)


@pytest.fixture(scope="module")
def vqa(tmp_path_factory: pytest.TempPathFactory):
    return _export(tmp_path_factory.mktemp("blip-vqa"), transformers.BlipForQuestionAnswering, 1)


def _hf_generate(hf, processor, image: Path, text: str | None, **gen) -> list[int]:
    from PIL import Image

    inputs = processor(images=Image.open(image), text=text, return_tensors="pt")
    args = {"max_new_tokens": TOKENS, "min_new_tokens": 0, **gen}
    with torch.no_grad():
        out = hf.generate(**inputs, **args)[0].tolist()
    if "input_ids" in inputs and isinstance(hf, transformers.BlipForConditionalGeneration):
        start = inputs["input_ids"].shape[1] - 1  # the prompt, less its [SEP]
    else:
        start = 1  # [DEC]
    new = out[start:]
    sep = hf.config.text_config.sep_token_id
    return new[: new.index(sep)] if sep in new else new


def test_caption_package_wires_the_cross_attention_decoder(caption) -> None:
    _, _, pipe = caption
    m = pipe.runner.manifest
    assert (m.family, m.variant, m.task) == ("blip", "caption", "chat")
    assert {n: c.role for n, c in m.components.items()} == {
        "vision": "image_encoder",
        "cross": "cross_kv",
        "embed": "token_embed",
        "llm": "llm_step",
    }
    assert m.pipeline.image_tokens is None and m.llm is not None
    assert (m.llm.bos_token_id, m.llm.eos_token_id) == (48, 3)
    cross = [s for s in m.component("llm").inputs if s.name.startswith("cross_key_values.")]
    assert len(cross) == 4 and cross[0].shape == (1, 4, 17, 8)
    assert all(c.precisions["fp32"].parity["passed"] for c in m.components.values())
    assert type(pipe).__name__ == "CrossAttentionChatPipeline"


@pytest.mark.parametrize("prompt", PROMPTS)
def test_greedy_captions_match_transformers(caption, tmp_path: Path, prompt: str | None) -> None:
    hf, processor, pipe = caption
    images = _images(tmp_path, 3, seed=10)
    lengths = []
    for image in images:
        ref = _hf_generate(hf, processor, image, prompt)
        ours = pipe.generate_ids(str(image), prompt, max_new_tokens=TOKENS)
        assert ours == ref
        lengths.append(len(ref))
        text = pipe.caption(str(image), prompt, max_new_tokens=TOKENS)
        assert text == processor.tokenizer.decode(ref, skip_special_tokens=True)
    assert max(lengths) == TOKENS  # at least one runs the whole 20 tokens


@pytest.mark.parametrize("prompt", PROMPTS)
def test_beam_captions_match_transformers(caption, tmp_path: Path, prompt: str | None) -> None:
    hf, processor, pipe = caption
    for image in _images(tmp_path, 3, seed=11):
        ref = _hf_generate(hf, processor, image, prompt, num_beams=3)
        assert pipe.generate_ids(str(image), prompt, max_new_tokens=TOKENS, num_beams=3) == ref


def test_cached_cross_attention_equals_recomputing_it(caption, tmp_path: Path) -> None:
    """The runtime binds cross keys/values computed once; a PyTorch decoding of the same exported
    model that recomputes them (and the whole sequence) at every step gives the same tokens."""
    from mmedge.models.sources import load_source

    _, _, pipe = caption
    model = load_source(Path(pipe.runner.manifest.provenance.source["path"])).model
    m = pipe.runner.manifest
    for image in _images(tmp_path, 3, seed=12):
        pixels = pipe.runner.image_sources(_pixels(pipe, image))["pixel_values"]
        ids = [m.llm.bos_token_id]
        with torch.no_grad():
            features = model.image_features(torch.from_numpy(pixels))
            for _ in range(TOKENS):
                token = int(model.text_decoder(torch.tensor([ids]), features)[0, -1].argmax())
                if token == m.llm.eos_token_id:
                    break
                ids.append(token)
        assert pipe.generate_ids(str(image), max_new_tokens=TOKENS) == ids[1:]


def _pixels(pipe, image: Path) -> np.ndarray:
    from mmedge.runtime.images import load_image, preprocess

    return preprocess([load_image(str(image))], pipe.runner.preprocess)


def test_vqa_answers_match_transformers(vqa, tmp_path: Path) -> None:
    hf, processor, pipe = vqa
    m = pipe.runner.manifest
    assert (m.variant, m.task) == ("vqa", "chat")
    assert m.component("question").role == "question_encoder"
    assert m.component("cross").inputs[0].name == "question_states"
    lengths = []
    for image in _images(tmp_path, 2, seed=13):
        for question in QUESTIONS:
            ref = _hf_generate(hf, processor, image, question)
            assert pipe.generate_ids(str(image), question, max_new_tokens=TOKENS) == ref
            lengths.append(len(ref))
            beam = _hf_generate(hf, processor, image, question, num_beams=3)
            assert pipe.generate_ids(str(image), question, max_new_tokens=TOKENS, num_beams=3) == beam
            answer = pipe.chat(str(image), question, max_new_tokens=TOKENS)
            assert answer == processor.tokenizer.decode(ref, skip_special_tokens=True)
    assert max(lengths) == TOKENS


def test_vqa_question_longer_than_the_encoder_context_is_an_error(vqa, tmp_path: Path) -> None:
    from mmedge.errors import InvalidInputError

    _, _, pipe = vqa
    (image,) = _images(tmp_path, 1, seed=14)
    with pytest.raises(InvalidInputError, match="context of 40 tokens"):
        pipe.chat(str(image), " ".join(["red"] * 45))
    with pytest.raises(InvalidInputError, match="VQA package"):
        pipe.caption(str(image))
    with pytest.raises(InvalidInputError, match="one question at a time"):
        pipe.chat(str(image), "what", history=[("a", "b")])


def test_manifest_refuses_cross_inputs_that_do_not_fit(caption) -> None:
    from dataclasses import replace

    from mmedge.errors import IntegrityError
    from mmedge.runtime.manifest import TensorSpec

    _, _, pipe = caption
    m = pipe.runner.manifest
    llm, cross = m.component("llm"), m.component("cross")
    wrong = tuple(
        TensorSpec(s.name, s.dtype, (1, 2, 17, 16)) if s.name.startswith("cross_key_values.0.") else s
        for s in llm.inputs
    )
    with pytest.raises(IntegrityError, match="cross_key_values"):
        replace(m, components={**m.components, "llm": replace(llm, inputs=wrong)})
    bad_source = replace(cross, inputs=(TensorSpec("image_features", "float32", (1, 5, 32)),))
    with pytest.raises(IntegrityError, match="cross_kv"):
        replace(m, components={**m.components, "cross": bad_source})
    # without its cross_kv component the package would need image positions it does not declare
    without = {n: c for n, c in m.components.items() if n != "cross"}
    with pytest.raises(IntegrityError, match="image_tokens"):
        replace(m, components=without)
    plain_step = replace(llm, inputs=tuple(s for s in llm.inputs if not s.name.startswith("cross_")))
    with pytest.raises(IntegrityError, match="cross key/value inputs"):
        replace(m, components={**m.components, "llm": plain_step})


def test_generation_timer_times_a_cross_attention_caption(caption) -> None:
    """`mmedge bench`'s generation timer: image path, cross_kv, prefill and 20 new tokens from the
    caption prompt ([DEC] and text tokens), as HF's generate reads it (its input's [SEP] dropped)."""
    from mmedge.runtime.feeds import sample_feeds
    from mmedge.runtime.generation import GenerationConfig
    from mmedge.sdk.bench import GEN_NEW_TOKENS, GEN_PROMPT_TOKENS, generation_prompt, generation_timer

    hf, _, pipe = caption
    runner = pipe.runner
    ids = generation_prompt(runner)
    assert len(ids) == GEN_PROMPT_TOKENS and ids[0] == runner.manifest.llm.bos_token_id
    parts = generation_timer(runner)()
    assert {"image_ms", "cross_ms", "prefill_ms", "e2e_ms", "decode_tokens_per_s"} <= set(parts)
    assert parts["e2e_ms"] >= parts["image_ms"] + parts["cross_ms"]
    entry = runner.manifest.component("vision")
    pixels = sample_feeds(entry.inputs, entry.dims, sizes={"batch": 1})["pixel_values"]
    cache = pipe.lm.new_cache()
    cache.cross = pipe.runner.run_batched(
        "cross",
        {"image_features": runner.run_path_values("image", {"pixel_values": pixels})["image_features"]},
    )
    config = GenerationConfig(max_new_tokens=GEN_NEW_TOKENS, min_new_tokens=GEN_NEW_TOKENS)
    ours = list(pipe.lm.generate_ids(pipe.lm.embed(np.array([ids]))[0], config, cache))
    sep = hf.config.text_config.sep_token_id
    with torch.no_grad():
        out = hf.generate(
            pixel_values=torch.from_numpy(pixels),
            input_ids=torch.tensor([[*ids, sep]]),
            max_new_tokens=GEN_NEW_TOKENS,
            min_new_tokens=GEN_NEW_TOKENS,
            do_sample=False,
        )[0].tolist()
    assert ours == out[len(ids) :]


@pytest.fixture(scope="module")
def caption_heads16(tmp_path_factory: pytest.TempPathFactory):
    # heads of 16 dims: ORT's GroupQueryAttention takes multiples of 16 only
    root = tmp_path_factory.mktemp("blip-caption-gqa")
    return _export(root, transformers.BlipForConditionalGeneration, 2, num_attention_heads=2)


def test_ort_build_with_in_place_cache_matches_transformers(caption_heads16, tmp_path: Path) -> None:
    """The step's self-attention is the decoders' packed q|k|v pattern: `build --backend ort` turns
    each layer into GroupQueryAttention over an in-place cache (its cross-attention stays on the
    bound cross keys/values); greedy and 3-beam captions stay identical to transformers and to the
    portable graph."""
    import shutil

    from mmedge import sdk
    from mmedge.builds.package import build_package

    hf, processor, pipe = caption_heads16
    pkg = tmp_path / "pkg"
    shutil.copytree(pipe.runner.package.root, pkg)
    built = build_package(pkg, backend="ort", precision="fp32")
    assert built["builds"]["llm.fp32"]["ops"]["com.microsoft:GroupQueryAttention"] == 2
    # the ViT's packed q|k|v attention becomes MultiHeadAttention (`builds.ort_mha`)
    assert built["builds"]["vision.fp32"]["ops"]["com.microsoft:MultiHeadAttention"] == 2
    fused = sdk.Pipeline(str(pkg), precision="fp32")
    assert fused.lm.in_place and not pipe.lm.in_place
    lengths = []
    for image in _images(tmp_path, 2, seed=15):
        for prompt in PROMPTS:
            ref = _hf_generate(hf, processor, image, prompt)
            assert fused.generate_ids(str(image), prompt, max_new_tokens=TOKENS) == ref
            assert pipe.generate_ids(str(image), prompt, max_new_tokens=TOKENS) == ref
            lengths.append(len(ref))
        beam = _hf_generate(hf, processor, image, PROMPTS[1], num_beams=3)
        assert fused.generate_ids(str(image), PROMPTS[1], max_new_tokens=TOKENS, num_beams=3) == beam
    assert max(lengths) == TOKENS


def test_weight_only_step_gets_the_prefill_build(caption_heads16, tmp_path: Path) -> None:
    """A weight-only step is built in place with a prefill build (int8 GEMMs for prompts): the
    prompt runs through the prefill build, decoding through the weight-only one, on one cache. The
    weight-only cross_kv (every image row at once) is built onto int8 GEMMs."""
    import shutil

    import onnx

    from mmedge import sdk
    from mmedge.calibration.package import calibrate_package
    from mmedge.runtime.generation import PREFILL

    _, _, pipe = caption_heads16
    pkg = tmp_path / "pkg"
    shutil.copytree(pipe.runner.package.root, pkg)
    calibrate_package(pkg, "train-shapes:12", samples=4, weight_bits=(8,))  # builds for ORT too
    int8 = sdk.Pipeline(str(pkg), precision="int8")
    lm = int8.lm
    assert lm.in_place and lm.runner.precision_of("llm") == "int8"
    assert lm.runner.variant_session("llm", PREFILL) is not None
    (image,) = _images(tmp_path, 1, seed=16)
    out = int8.generate_ids(str(image), PROMPTS[1], max_new_tokens=TOKENS, min_new_tokens=TOKENS)
    assert len(out) == TOKENS
    (cross,) = (pkg / "builds").glob("ort*-cpu/cross.int8.onnx")
    ops = {n.op_type for n in onnx.load(str(cross)).graph.node}
    assert "DynamicQuantizeMatMul" in ops and "MatMulNBits" not in ops
    _check_vision_mha(pkg, tmp_path)


def _check_vision_mha(pkg: Path, tmp_path: Path) -> None:
    """The INT8 ViT's attention (between integer q|k|v and output projections) becomes
    MultiHeadAttention; its features match the same graph built without the rewrite."""
    from mmedge.builds.ort import optimize_for_ort
    from mmedge.builds.sessions import ort_session

    src = pkg / "onnx" / "vision.int8.onnx"
    fused, plain = tmp_path / "fused.onnx", tmp_path / "plain.onnx"
    assert optimize_for_ort(src, fused)["com.microsoft:MultiHeadAttention"] == 2
    assert "com.microsoft:MultiHeadAttention" not in optimize_for_ort(src, plain, fuse_attention=False)
    x = np.random.default_rng(4).standard_normal((3, 3, SIZE, SIZE)).astype(np.float32)
    a, b = (ort_session(p).run(None, {"pixel_values": x})[0] for p in (fused, plain))
    np.testing.assert_allclose(a, b, atol=1e-5 * np.abs(b).max())
