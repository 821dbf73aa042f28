"""HF Blip2ForConditionalGeneration (OPT) -> mmedge export -> torch-free caption / chat.

Parity is against transformers: `save_pretrained` of a small random model, then `generate` with
the image tokens HF's processor would insert, token for token.
"""

from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

VOCAB, QUERIES, SIZE = 120, 4, 32


@pytest.fixture(scope="module")
def blip2(tmp_path_factory: pytest.TempPathFactory):
    from hf_tiny import write_tiny_hf_blip2

    from mmedge import sdk
    from mmedge.export.exporter import export_model

    root = tmp_path_factory.mktemp("blip2")
    hf = write_tiny_hf_blip2(root / "src", VOCAB, QUERIES, SIZE, qformer_layers=3)
    export_model(root / "src", root / "pkg")
    return hf, sdk.Pipeline(str(root / "pkg"))


def _pixels(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal((1, 3, SIZE, SIZE)).astype(np.float32)


def _prefix(pipe, pixels: np.ndarray) -> np.ndarray:
    r = pipe.runner
    feats = r.session("vision").run({"pixel_values": pixels})["image_embeds"]
    query = r.session("qformer").run({"image_embeds": feats})["query_output"]
    return r.session("projector").run({"query_output": query})["image_prefix"][0]


def test_components_and_manifest(blip2) -> None:
    _, pipe = blip2
    m = pipe.runner.manifest
    assert m.family == "blip2" and m.task == "chat"
    assert sorted(m.components) == ["embed", "llm", "projector", "qformer", "vision"]
    # this tokenizer adds no BOS when encoding, so the prompt has none either (as HF's processor)
    assert (
        m.prompt.first_turn == "{image}Question: {prompt} Answer:"
        and m.prompt.turn == " Question: {prompt} Answer:"
    )
    assert m.pipeline.image_tokens.count == QUERIES
    assert [s.component for s in m.pipeline.paths["image"].steps] == ["vision", "qformer", "projector"]
    assert {c.role for c in m.components.values()} == {
        "image_encoder",
        "image_resampler",
        "image_projector",
        "token_embed",
        "llm_step",
    }
    assert m.preprocess.resize == "exact"
    assert all(c.precisions["fp32"].parity["trt_lint_ok"] for c in m.components.values())


def test_greedy_generation_matches_transformers(blip2) -> None:
    from mmedge.runtime.generation import GenerationConfig

    hf, pipe = blip2
    lm = pipe.lm
    for seed in range(3):
        prompt = [2, *np.random.default_rng(seed).integers(4, VOCAB - 2, 3 + 2 * seed).tolist()]
        px = _pixels(seed)
        ids = torch.tensor([[VOCAB - 1] * QUERIES + prompt])
        with torch.no_grad():
            ref = hf.generate(
                pixel_values=torch.from_numpy(px), input_ids=ids, max_new_tokens=20, min_new_tokens=20
            )
            ref_logits = hf(pixel_values=torch.from_numpy(px), input_ids=ids).logits[0].numpy()
        embeds = np.concatenate([_prefix(pipe, px), lm.embed(np.array([prompt]))[0]])
        ours = list(lm.generate_ids(embeds, GenerationConfig(max_new_tokens=20, min_new_tokens=20)))
        assert ours == ref[0, -20:].tolist()
        assert np.abs(lm.forward(embeds[None], lm.new_cache())[0] - ref_logits).max() < 1e-3


def test_chat_end_to_end_matches_transformers(blip2) -> None:
    """An image file through our preprocessing == BlipImageProcessor + HF generate."""
    from PIL import Image

    hf, pipe = blip2
    img = (np.random.default_rng(5).random((40, 57, 3)) * 255).astype(np.uint8)
    proc = transformers.BlipImageProcessor(size={"height": SIZE, "width": SIZE})
    px = proc(Image.fromarray(img), return_tensors="pt")["pixel_values"]
    prompt = "Question: t7 t9 t11 Answer:"
    ids = torch.tensor([[VOCAB - 1] * QUERIES + pipe.lm.tokenizer.encode(prompt)])
    with torch.no_grad():
        ref = hf.generate(pixel_values=px, input_ids=ids, max_new_tokens=10, min_new_tokens=10)[
            0, -10:
        ].tolist()
    answer = pipe.chat(img, "t7 t9 t11", max_new_tokens=10, min_new_tokens=10)
    assert answer == pipe.lm.tokenizer.decode(ref)


def test_multi_turn_reuses_the_cache_and_matches_recomputing(blip2, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmedge import sdk

    _, pipe = blip2
    img = (np.random.default_rng(6).random((32, 32, 3)) * 255).astype(np.uint8)
    a1 = pipe.chat(img, "t5 t6", max_new_tokens=6, min_new_tokens=6)
    history = [("t5 t6", a1)]
    calls = {"vision": 0, "llm_tokens": 0}
    forward = pipe.lm.forward

    def counting_forward(embeds, cache, out=None, logits_to_keep=None):
        calls["llm_tokens"] += embeds.shape[1]
        return forward(embeds, cache, out, logits_to_keep)

    run = pipe.runner.run_batched

    def counting_run(component, feeds):
        calls["vision"] += component == "vision"
        return run(component, feeds)

    monkeypatch.setattr(pipe.lm, "forward", counting_forward)
    monkeypatch.setattr(pipe.runner, "run_batched", counting_run)
    a2 = pipe.chat(img, "t7 t8", history=history, max_new_tokens=6, min_new_tokens=6)
    new_question = len(pipe.lm.tokenizer.encode(" Question: t7 t8 Answer:", add_special_tokens=False))
    assert calls["vision"] == 0  # the image prefix came from the cache
    # the new question, one token per later step, and the last answer token kept for the next turn
    assert calls["llm_tokens"] == new_question + 5 + 1
    fresh = sdk.Pipeline(str(pipe.runner.package.root))
    assert fresh.chat(img, "t7 t8", history=history, max_new_tokens=6, min_new_tokens=6) == a2


def test_caption_stream_and_bad_input(blip2) -> None:
    from mmedge.errors import InvalidInputError

    _, pipe = blip2
    img = (np.random.default_rng(7).random((32, 32, 3)) * 255).astype(np.uint8)
    cap = pipe.caption(img, max_new_tokens=5, min_new_tokens=5)
    assert len(cap.split()) == 5
    pieces = list(pipe.chat(img, "t4", stream=True, max_new_tokens=5, min_new_tokens=5))
    assert "".join(pieces) == pipe.chat(img, "t4", max_new_tokens=5, min_new_tokens=5)
    for kwargs, match in (
        ({"max_new_tokens": 0}, "max_new_tokens"),
        ({"temperature": -1}, "temperature"),
        ({"top_p": 2.0}, "top_p"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            pipe.chat(img, "t4", **kwargs)
    with pytest.raises(InvalidInputError, match="history"):
        pipe.chat(img, "t4", history=[("only a question",)])
    with pytest.raises(InvalidInputError, match="context"):
        pipe.chat(img, " ".join(["t9"] * 300))
    with pytest.raises(InvalidInputError):
        pipe.chat(b"not an image", "t4")


def test_import_refuses_unsupported_blip2() -> None:
    from mmedge.errors import UnsupportedError
    from mmedge.models.blip2.hf import blip2_config as _blip2_config

    cfg = {
        "vision_config": {},
        "qformer_config": {"use_qformer_text_input": True},
        "text_config": {"model_type": "opt"},
    }
    with pytest.raises(UnsupportedError, match="text input"):
        _blip2_config(cfg, None)
    with pytest.raises(UnsupportedError, match="t5"):
        _blip2_config({**cfg, "qformer_config": {}, "text_config": {"model_type": "t5"}}, None)


def test_messages_on_a_marker_template_take_one_image_first(blip2) -> None:
    from mmedge.errors import InvalidInputError

    _, pipe = blip2
    img = (np.random.default_rng(8).random((32, 32, 3)) * 255).astype(np.uint8)
    first = {"role": "user", "content": [{"type": "image", "image": img}, {"type": "text", "text": "t4"}]}
    assert pipe.chat_messages([first], max_new_tokens=4) == pipe.chat(img, "t4", max_new_tokens=4)
    two = {"role": "user", "content": [{"type": "image", "image": img}, *first["content"]]}
    for messages, match in (
        ([two], "exactly one image"),
        ([{"role": "system", "content": "x"}, first], "no system message"),
        ([first, first], "assistant message"),
        ([first, {"role": "assistant", "content": "t5"}], "last message"),
    ):
        with pytest.raises(InvalidInputError, match=match):
            pipe.chat_messages(messages)
