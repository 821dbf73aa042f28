"""HF Mistral and Qwen2 causal LMs (grouped-query attention) -> mmedge export -> torch-free generation.

Parity is against transformers: `save_pretrained` of a small random model, then greedy `generate`
and prefill logits. The Mistral case sets `head_dim` apart from hidden / heads; the Qwen2 case has
random (non-zero) q/k/v biases, a tied LM head and a sliding window on its second layer. Both
windows equal the cache size, the shortest that never masks; a shorter one is refused.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from hf_tiny import word_tokenizer_json

VOCAB = 200
CONTEXT = 128  # max_position_embeddings, and so the exported max_context
IDS = {"pad_token_id": VOCAB - 3, "bos_token_id": VOCAB - 2, "eos_token_id": VOCAB - 1}
SIZES = {
    "vocab_size": VOCAB,
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 96,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": CONTEXT,
    "initializer_range": 0.3,
    "rms_norm_eps": 1e-5,
    "rope_theta": 500.0,
    **IDS,
}


def _hf_model(style: str, **overrides: object):
    torch.manual_seed(0)
    if style == "mistral":
        cfg = transformers.MistralConfig(
            **{**SIZES, "head_dim": 32, "sliding_window": CONTEXT, "tie_word_embeddings": False, **overrides}
        )
        return transformers.MistralForCausalLM(cfg).eval()
    cfg = transformers.Qwen2Config(
        **{
            **SIZES,
            "tie_word_embeddings": True,
            "use_sliding_window": True,
            "sliding_window": CONTEXT,
            "max_window_layers": 1,
            **overrides,
        }
    )
    model = transformers.Qwen2ForCausalLM(cfg).eval()
    with torch.no_grad():  # HF initialises biases to zero, which would hide a dropped bias
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(std=0.5)
    return model


def _save(hf, root: Path) -> Path:
    hf.save_pretrained(root)
    (root / "tokenizer.json").write_text(word_tokenizer_json(VOCAB))
    return root


@pytest.fixture(scope="module", params=["mistral", "qwen2"])
def exported(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from mmedge import sdk
    from mmedge.export.exporter import export_model

    root = tmp_path_factory.mktemp(f"hf-{request.param}")
    hf = _hf_model(request.param)
    src = _save(hf, root / "src")
    manifest = export_model(src, root / "pkg")
    return request.param, hf, sdk.Pipeline(str(root / "pkg")), manifest, src


def _prompts(n: int = 3) -> list[list[int]]:
    return [np.random.default_rng(s).integers(0, VOCAB - 3, 5 + 3 * s).tolist() for s in range(n)]


def test_manifest_records_the_variant_and_cache_geometry(exported) -> None:
    style, _, _, manifest, _ = exported
    assert manifest.family == "causal-lm" and manifest.variant == style
    llm = manifest.llm
    assert (llm.max_context, llm.layers, llm.kv_heads) == (CONTEXT, 2, 2)
    assert llm.head_dim == (32 if style == "mistral" else 64 // 4)  # Mistral sets head_dim 32
    assert llm.rope_theta == 500.0
    assert (llm.bos_token_id, llm.eos_token_id, llm.pad_token_id) == (VOCAB - 2, VOCAB - 1, VOCAB - 3)


def test_qwen2_biases_sit_on_q_k_v_only(exported) -> None:
    style, hf, _, _, hf_dir = exported
    if style != "qwen2":
        pytest.skip("Qwen2 only")
    from mmedge.models.decoder import DecoderConfig, build_decoder
    from mmedge.models.hf_import import load_hf

    src = load_hf(hf_dir)
    ours = build_decoder(DecoderConfig.from_dict(src.config)).model.layers[0].self_attn
    theirs = hf.model.layers[0].self_attn
    for name in ("q_proj", "k_proj", "v_proj"):
        assert getattr(ours, name).bias is not None and getattr(theirs, name).bias.abs().max() > 0.1
    assert ours.o_proj.bias is None and theirs.o_proj.bias is None
    assert src.config["tie_word_embeddings"] and "lm_head.weight" in src.state


def test_greedy_tokens_match_transformers(exported) -> None:
    _, hf, pipe, _, _ = exported
    for ids in _prompts():
        with torch.no_grad():
            ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
        assert pipe.generate_ids(ids, max_new_tokens=20, min_new_tokens=20) == ref[0, len(ids) :].tolist()


def test_prefill_logits_match_transformers(exported) -> None:
    _, hf, pipe, _, _ = exported
    lm = pipe.lm
    for ids in _prompts():
        with torch.no_grad():
            ref = hf(torch.tensor([ids])).logits[0].numpy()
        ours = lm.forward(lm.embed(np.array([ids])), lm.new_cache())[0]
        assert ours.shape == ref.shape and np.abs(ours - ref).max() < 1e-3


def test_ort_build_with_in_place_cache_matches_transformers(exported, tmp_path: Path) -> None:
    """The fused GroupQueryAttention build reads the head size from the packed q|k|v projection:
    Mistral's head_dim apart from hidden / heads and Qwen2's biased projection must both survive."""
    import shutil

    from mmedge import sdk
    from mmedge.builds.package import build_package

    _, hf, pipe, _, _ = exported
    pkg = tmp_path / "pkg"
    shutil.copytree(pipe.runner.package.root, pkg)
    built = build_package(pkg, backend="ort", precision="fp32")
    assert built["builds"]["llm.fp32"]["ops"]["com.microsoft:GroupQueryAttention"] == 2
    fused = sdk.Pipeline(str(pkg), precision="fp32")
    assert fused.lm.in_place
    ids = _prompts()[2]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert fused.generate_ids(ids, max_new_tokens=20, min_new_tokens=20) == ref[0, len(ids) :].tolist()


@pytest.mark.parametrize("style", ["mistral", "qwen2"])
def test_a_window_shorter_than_the_cache_is_refused(style: str, tmp_path: Path) -> None:
    from mmedge.errors import UnsupportedError
    from mmedge.models.hf_import import load_hf

    src = _save(_hf_model(style, sliding_window=64), tmp_path)
    with pytest.raises(UnsupportedError, match=rf"{style} sliding_window 64 .*max_context {CONTEXT}"):
        load_hf(src)
    assert load_hf(src, max_context=64).config["max_context"] == 64  # a cache the window covers


def test_qwen2_window_applies_only_where_hf_applies_it(tmp_path: Path) -> None:
    """Qwen2 slides only with use_sliding_window, and only on the layers from max_window_layers on
    (or those `layer_types` marks); a short window on no layer is no reason to refuse."""
    from mmedge.errors import UnsupportedError
    from mmedge.models.hf_import import load_hf

    src = _save(_hf_model("qwen2", sliding_window=64, max_window_layers=2), tmp_path)
    assert load_hf(src).config["max_context"] == CONTEXT  # layer_types: all full attention
    cfg = json.loads((src / "config.json").read_text())
    cfg.pop("layer_types")  # as older config.json files have it: max_window_layers decides
    for use, first_sliding, refused in ((True, 2, False), (True, 1, True), (False, 0, False)):
        cfg.update(use_sliding_window=use, max_window_layers=first_sliding)
        (src / "config.json").write_text(json.dumps(cfg))
        if refused:
            with pytest.raises(UnsupportedError, match="sliding_window 64"):
                load_hf(src)
        else:
            assert load_hf(src).config["max_context"] == CONTEXT


def test_special_ids_default_as_the_hf_config_classes() -> None:
    from mmedge.errors import UnsupportedError
    from mmedge.models.decoder import hf_decoder_config

    sizes = {"vocab_size": VOCAB, "hidden_size": 64, "num_hidden_layers": 2, "num_attention_heads": 4}
    mistral = hf_decoder_config({"model_type": "mistral", **sizes})  # ids omitted: MistralConfig's
    assert (mistral["bos_token_id"], mistral["eos_token_id"], mistral["pad_token_id"]) == (1, 2, 0)
    qwen2 = hf_decoder_config({"model_type": "qwen2", **sizes, "bos_token_id": None, "eos_token_id": 7})
    assert (qwen2["bos_token_id"], qwen2["eos_token_id"], qwen2["pad_token_id"]) == (7, 7, 0)
    with pytest.raises(UnsupportedError, match="sets no eos_token_id"):
        hf_decoder_config({"model_type": "qwen2", **sizes, "eos_token_id": None})
    with pytest.raises(UnsupportedError, match="one end-of-sequence id"):
        hf_decoder_config({"model_type": "qwen2", **sizes, "eos_token_id": [5, 7]})


def test_heads_the_fused_kernel_refuses_keep_the_portable_step(tmp_path: Path) -> None:
    """ORT's GroupQueryAttention takes head sizes that are multiples of 16: with head_dim 8 the ORT
    build leaves the attention as exported, and generation still matches transformers."""
    from mmedge import sdk
    from mmedge.builds.package import build_package
    from mmedge.export.exporter import export_model

    hf = _hf_model("mistral", head_dim=8)
    export_model(_save(hf, tmp_path / "src"), tmp_path / "pkg")
    built = build_package(tmp_path / "pkg", backend="ort", precision="fp32")
    assert "com.microsoft:GroupQueryAttention" not in built["builds"]["llm.fp32"]["ops"]
    pipe = sdk.Pipeline(str(tmp_path / "pkg"), precision="fp32")
    assert not pipe.lm.in_place
    ids = _prompts(1)[0]
    with torch.no_grad():
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=20, min_new_tokens=20, do_sample=False)
    assert pipe.generate_ids(ids, max_new_tokens=20, min_new_tokens=20) == ref[0, len(ids) :].tolist()
