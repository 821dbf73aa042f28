"""The conformance path every registered family and variant must pass, and a tiny config per case.

init (random weights) -> export (parity recorded) -> calibrate -> build -> verify -> sdk.Pipeline
-> one task call. Used by test_conformance.py (the registry), test_renaming.py and test_toy_family.py.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from mmedge import sdk
from mmedge.builds.package import build_package
from mmedge.calibration.package import calibrate_package
from mmedge.data import generate_scenes
from mmedge.export.exporter import export_model
from mmedge.models.init import init_model
from mmedge.models.registry import Family
from mmedge.runtime.backends.ort import ort_target
from mmedge.runtime.package import verify_package
from mmedge.runtime.pipelines import PIPELINES

_VISION = {
    "image_size": 32,
    "patch_size": 16,
    "width": 32,
    "layers": 1,
    "heads": 2,
    "mlp_dim": 64,
    "act": "gelu",
}
# Special ids of the tiny tokenizer (data.tokenizer_train): pad 0, bos 1, unk 2, eos 3.
_SPECIALS = {"bos_token_id": 1, "eos_token_id": 3, "pad_token_id": 0}
_DECODERS = {
    "opt": {
        "variant": "opt",
        "vocab_size": 0,
        "hidden": 32,
        "layers": 2,
        "heads": 2,
        "ffn_dim": 64,
        "max_positions": 64,
        "max_context": 48,
        **_SPECIALS,
    },
    "llama": {
        "variant": "llama",
        "vocab_size": 0,
        "hidden": 32,
        "layers": 2,
        "heads": 2,
        "kv_heads": 1,
        "ffn_dim": 64,
        "max_positions": 64,
        "max_context": 48,
        "act": "silu",
        "tie_word_embeddings": False,
        **_SPECIALS,
    },
}
# Mistral with a head size apart from hidden / heads; Qwen2 with q/k/v biases and a tied LM head.
_DECODERS["mistral"] = {**_DECODERS["llama"], "variant": "mistral", "head_size": 32}
_DECODERS["qwen2"] = {**_DECODERS["llama"], "variant": "qwen2", "bias": True, "tie_word_embeddings": True}

_QFORMER = {
    "hidden": 32,
    "layers": 1,
    "heads": 2,
    "intermediate": 64,
    "cross_attention_frequency": 1,
    "encoder_hidden": 32,
    "num_query_tokens": 4,
}

# A 1-layer CLIP text tower (clip's; Stable Diffusion's text encoder); a 2-block U-Net (latents halved once), a 2-block VAE.
_TEXT = {
    "vocab_size": 0,
    "context_length": 16,
    "width": 32,
    "layers": 1,
    "heads": 2,
    "mlp_dim": 64,
    "act": "gelu",
    "eos_token_id": 3,
    "pad_token_id": 0,
}
_SD_UNET = {
    "sample_size": 8,
    "block_out_channels": [16, 32],
    "layers_per_block": 1,
    "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
    "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
    "cross_attention_dim": 32,
    "attention_head_dim": 4,
    "norm_num_groups": 8,
}
_SD_VAE = {
    "block_out_channels": [8, 16],
    "down_block_types": ["DownEncoderBlock2D"] * 2,
    "up_block_types": ["UpDecoderBlock2D"] * 2,
    "norm_num_groups": 8,
    "sample_size": 16,
}
_SD_SCHEDULER = {"kind": "ddim", "beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}

# (family, variant) -> tiny config in the family's JSON form ("vocab_size": 0 = the tokenizer's size)
CASES: dict[tuple[str, str], dict[str, Any]] = {
    ("clip", "vit"): {
        "vision": _VISION,
        "text": _TEXT,
        "projection_dim": 32,
    },
    ("blip", "itm"): {
        "vision": {"tower": "blip2", **_VISION, "eps": 1e-5},
        "text": {
            "vocab_size": 0,
            "hidden": 32,
            "layers": 2,
            "heads": 2,
            "intermediate": 64,
            "max_positions": 32,
            "encoder_hidden": 32,
        },
        "embed_dim": 16,
    },
    ("albef", "itm"): {
        "vision": _VISION,
        "text": {
            "vocab_size": 0,
            "hidden": 32,
            "layers": 3,
            "heads": 2,
            "intermediate": 64,
            "max_positions": 32,
            "encoder_hidden": 32,
            "fusion_from": 1,
        },
        "embed_dim": 16,
    },
    ("imagebind", "imagebind"): {
        "vision": {k: _VISION[k] for k in ("image_size", "patch_size", "width", "layers", "heads")},
        "text": {
            "vocab_size": 0,
            "context_length": 16,
            "width": 32,
            "layers": 1,
            "heads": 2,
            "eos_token_id": 3,
            "pad_token_id": 0,
        },
        # audio (128 x 204 filterbank) and IMU (6 x 2000 samples) keep the official input sizes
        **{m: {"width": 32, "layers": 1, "heads": 2} for m in ("audio", "imu")},
        **{
            m: {"image_size": 32, "patch_size": 16, "width": 32, "layers": 1, "heads": 2}
            for m in ("depth", "thermal")
        },
        "embed_dim": 32,
    },
    **{
        ("blip", v): {
            "variant": v,
            "vision": {"tower": "blip2", **_VISION, "eps": 1e-5},
            "text": {
                "vocab_size": 0,
                "hidden": 32,
                "layers": 2,
                "heads": 2,
                "intermediate": 64,
                "max_positions": 96,  # the tokenizer's context: the calibration texts fit
                "encoder_hidden": 32,
            },
            "max_context": 32,
            "bos_token_id": 1,  # the tiny tokenizer's BOS and EOS stand for [DEC] and [SEP]
            "sep_token_id": 3,
        }
        for v in ("caption", "vqa")
    },
    **{
        ("blip2", v): {
            "vision": {"tower": "clip", **_VISION, "eps": 1e-5},
            "qformer": _QFORMER,
            "text": _DECODERS[v],
            "resize": "shortest",
        }
        for v in _DECODERS
    },
    **{
        ("instructblip", v): {
            "vision": {"tower": "clip", **_VISION, "eps": 1e-5},
            "qformer": {
                **_QFORMER,
                "vocab_size": 0,  # the instruction's tokenizer is the checkpoint's tiny one
                "max_text_positions": 32,
            },
            "text": _DECODERS[v],
            "resize": "shortest",
        }
        for v in _DECODERS
    },
    **{("causal-lm", v): cfg for v, cfg in _DECODERS.items()},
    ("stable-diffusion", "latent"): {
        "text": _TEXT,
        "unet": _SD_UNET,
        "vae": _SD_VAE,
        "scheduler": _SD_SCHEDULER,
        "steps": 3,
    },
    ("stable-diffusion", "pixel"): {
        "text": _TEXT,
        "unet": {**_SD_UNET, "in_channels": 3, "out_channels": 3, "sample_size": 16},
        "vae": None,
        "scheduler": {**_SD_SCHEDULER, "kind": "euler"},
        "steps": 3,
        "guidance": 1.0,
    },
    ("meta-transformer", "shared-encoder"): {
        "encoder": {"width": 32, "layers": 1, "heads": 2},
        "points": {"groups": 8, "group_size": 4, "channels": [8, 16, 32], "pos_hidden": 8, "classes": 3},
        "audio": {"mel_bins": 32, "frames": 40, "patch": 16, "fstride": 8, "tstride": 8, "classes": 2},
        "imu": {"channels": 6, "samples": 80, "window": 8, "classes": 2},
    },
    **{
        ("llava", v): {
            "vision": {**_VISION, "layers": 2, "eps": 1e-5},
            "text": _DECODERS["llama"],
            "variant": v,
            "pad_square": v == "1.5",
            "grid_pinpoints": [[32, 64], [64, 32]] if v == "next" else [],
        }
        for v in ("v1", "1.5", "next")
    },
    **{
        ("minigpt4", v): {
            "variant": v,
            "vision": {**_VISION, "patch_size": 8},  # 16 patches: 4 merged tokens for llama2
            **(
                {
                    "qformer": {
                        "hidden": 32,
                        "layers": 1,
                        "heads": 2,
                        "intermediate": 64,
                        "encoder_hidden": 32,
                        "num_query_tokens": 4,
                    }
                }
                if v == "vicuna"
                else {}
            ),
            # the official system text alone is ~100 tokens of the tiny tokenizer
            "text": {**_DECODERS["llama"], "max_positions": 192, "max_context": 160},
        }
        for v in ("vicuna", "llama2")
    },
}


def task_call(pipe: Any, task: str) -> None:
    """One call of the package's task, with a sanity check on what it returns."""
    image = generate_scenes(1, seed=3, image_size=48)[0].image
    if task == "retrieval":
        emb = pipe.embed_images([image, image])
        assert emb.shape[0] == 2 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-4)
        labels = pipe.classify(image, ["circle", "square"])
        assert abs(sum(label.score for label in labels) - 1) < 1e-5
        if pipe.itm is not None:  # a re-ranker: match probabilities, two-stage search
            probs = pipe.itm_scores(image, ["a red circle", "a blue square"])
            assert probs.shape == (2,) and ((probs >= 0) & (probs <= 1)).all()
            pipe.add_images([image, image])
            hits = pipe.search("a red circle", k=1, rerank=2, source=lambda hit: image)
            assert len(hits) == 1 and hits[0].itm is not None
    elif task == "chat":
        answer = pipe.chat(image, "what colour is the circle?", max_new_tokens=3, min_new_tokens=3)
        assert isinstance(answer, str) and answer
        if not getattr(pipe, "answers_questions", False):  # a VQA model does not caption
            assert isinstance(pipe.caption(image, max_new_tokens=2), str)
    elif task == "generation":
        text = pipe.generate("a small red circle", max_new_tokens=3, min_new_tokens=3)
        assert isinstance(text, str) and text
    elif task == "classification":
        from mmedge.data.modalities import SAMPLE_RATE, make_paired, primitive_clouds

        paired = make_paired(3, 0)
        data = {"points": primitive_clouds(2, seed=3, points=256)[0], "audio": [paired.audio] * 2}
        data["imu"] = [paired.imu] * 2
        for m in pipe.modalities:
            rate = SAMPLE_RATE if m == "audio" else None
            logits = pipe.logits(data[m], m, sample_rate=rate)
            assert logits.shape == (2, len(pipe.labels[m])) and np.isfinite(logits).all(), m
            top = pipe.classify(data[m], m, top_k=2, sample_rate=rate)
            assert [len(r) for r in top] == [min(2, len(pipe.labels[m]))] * 2
    elif task == "image_generation":
        out = pipe.generate("a small red circle", seed=0)
        side = pipe.default_size
        assert out.pixels.shape == (side, side, 3) and np.isfinite(out.image).all()
    else:
        raise AssertionError(f"no task call for {task!r}: add one here")


def run_conformance(family: Family, raw: dict[str, Any], root: Path) -> Path:
    """The whole path for one family config; returns the package. Asserts every stage's record."""
    ckpt = init_model(family, raw, root / "ckpt")
    pkg = root / "pkg"
    manifest = export_model(ckpt, pkg)
    assert manifest.family == family.name and manifest.variant in family.variants
    assert all(c.precisions["fp32"].parity["passed"] for c in manifest.components.values())
    report = calibrate_package(pkg, "train-shapes:16", samples=8, build=None)
    quantized = {
        name: sorted(set(c.precisions) - {"fp32"})
        for name, c in verify_package(pkg).manifest.components.items()
    }
    assert any(quantized.values()), report  # at least one component was quantized
    built = build_package(pkg, backend="ort")
    m = verify_package(pkg).manifest
    assert set(m.engines[ort_target()].files) >= set(built["builds"]) >= {f"{n}.fp32" for n in m.components}
    assert m.task in PIPELINES, m.task
    task_call(sdk.Pipeline(str(pkg)), m.task)  # "auto": the quantized builds
    task_call(sdk.Pipeline(str(pkg), precision="fp32"), m.task)
    return pkg
