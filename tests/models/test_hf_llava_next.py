"""HF LlavaNextForConditionalGeneration (Mistral LM) -> mmedge export -> torch-free chat, token for token.

Any-resolution images: images whose aspect ratios select different grids from the pinpoints, and
a conversation holding two images. The reference is HF's `LlavaNextProcessor` (PIL image
processor, its chat template) and `generate`.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hf_tiny import LLAVA_TEMPLATE, llava_conversation, llava_tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

TILE, PATCH, VOCAB = 32, 8, 64
PINPOINTS = [[32, 64], [64, 32], [64, 64], [32, 96], [96, 32]]
SIZES = {"wide": (30, 80), "tall": (90, 28), "square": (50, 50), "small": (12, 20)}


@pytest.fixture(scope="module")
def llava_next(tmp_path_factory: pytest.TempPathFactory):
    from PIL import Image
    from transformers.models.llava_next.image_processing_pil_llava_next import LlavaNextImageProcessorPil

    from mmedge import sdk
    from mmedge.export.exporter import export_model

    root = tmp_path_factory.mktemp("llava-next")
    torch.manual_seed(0)
    cfg = transformers.LlavaNextConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": TILE,
            "patch_size": PATCH,
        },
        text_config={
            "model_type": "mistral",
            "vocab_size": VOCAB,
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 512,
            "sliding_window": None,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 3,
        },
        image_token_index=VOCAB - 1,
        image_grid_pinpoints=PINPOINTS,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    hf = transformers.LlavaNextForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # make the image (and the newline) matter to the LM
        for p in hf.model.multi_modal_projector.parameters():
            p.normal_(0, 0.5)
        hf.model.image_newline.normal_(0, 1.0)
        hf.lm_head.weight.normal_(0, 0.5)
    src = root / "src"
    hf.save_pretrained(src)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=llava_tokenizer(VOCAB),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    processor = transformers.LlavaNextProcessor(
        image_processor=LlavaNextImageProcessorPil(
            size={"shortest_edge": TILE},
            crop_size={"height": TILE, "width": TILE},
            image_grid_pinpoints=PINPOINTS,
        ),
        tokenizer=fast,
        patch_size=PATCH,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    )
    processor.save_pretrained(src)
    export_model(src, root / "pkg")
    images = {}
    for i, (name, (h, w)) in enumerate(SIZES.items()):
        path = root / f"{name}.png"
        Image.fromarray((np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)).save(path)
        images[name] = path
    return hf, processor, sdk.Pipeline(str(root / "pkg")), images


def _reference(hf, processor, conversation, images: list[Path], n: int = 20):
    from PIL import Image

    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[Image.open(p) for p in images], text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        logits = hf(**inputs).logits[0, -1].numpy()
    return out[0, inputs["input_ids"].shape[1] :].tolist(), logits, inputs["input_ids"].shape[1]


def _ours(pipe, messages, n: int = 20):
    from mmedge.runtime.generation import GenerationConfig

    sources = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
    items = pipe.template.encode(messages, len(sources))
    embeds = pipe._embed(items, [pipe._image(s, "RGB") for s in sources], 0)
    ids = list(pipe.lm.generate_ids(embeds, GenerationConfig(max_new_tokens=n, min_new_tokens=n)))
    logits = pipe.lm.forward(embeds[None], pipe.lm.new_cache(), logits_to_keep=1)[0, -1]
    return ids, logits, len(embeds)


def test_manifest_declares_the_anyres_rule(llava_next) -> None:
    _, _, pipe, _ = llava_next
    m = pipe.runner.manifest
    assert m.variant == "next" and m.llm.max_context == 512
    tokens = m.pipeline.image_tokens
    assert tokens.rule == "anyres" and tokens.count == (TILE // PATCH) ** 2
    assert tokens.anyres.grid_pinpoints == tuple(tuple(p) for p in PINPOINTS)
    assert tokens.newline in m.files


def test_images_select_different_grids(llava_next) -> None:
    from mmedge.runtime.anyres import select_best_resolution

    grids = {select_best_resolution(hw, PINPOINTS) for hw in SIZES.values()}
    assert len(grids) >= 3


@pytest.mark.parametrize("name", sorted(SIZES))
def test_one_image_greedy_matches_transformers(llava_next, name: str) -> None:
    hf, processor, pipe, images = llava_next
    hf_conv, ours, used = llava_conversation([images[name]], [("user", (1, "what is the shape of this ?"))])
    ref, ref_logits, length = _reference(hf, processor, hf_conv, used)
    ids, logits, positions = _ours(pipe, ours)
    assert positions == length  # the same number of image tokens as HF's processor inserts
    assert ids == ref
    assert np.abs(logits - ref_logits).max() < 1e-3


def test_two_images_in_one_conversation_match_transformers(llava_next) -> None:
    hf, processor, pipe, images = llava_next
    hf_conv, ours, used = llava_conversation(
        [images["wide"], images["tall"]],
        [("user", (1, "what is this ?")), ("assistant", "a red circle ."), ("user", (1, "and that ?"))],
    )
    ref, ref_logits, length = _reference(hf, processor, hf_conv, used)
    ids, logits, positions = _ours(pipe, ours)
    assert positions == length and ids == ref
    assert np.abs(logits - ref_logits).max() < 1e-3
    assert pipe.chat_messages(ours, max_new_tokens=20, min_new_tokens=20) == pipe.lm.tokenizer.decode(ref)


def test_a_tampered_newline_file_is_refused(llava_next, tmp_path: Path) -> None:
    import shutil

    from mmedge import sdk
    from mmedge.errors import IntegrityError

    _, _, pipe, images = llava_next
    pkg = tmp_path / "pkg"
    shutil.copytree(pipe.runner.package.root, pkg)
    path = pkg / pipe.runner.manifest.pipeline.image_tokens.newline
    data = bytearray(path.read_bytes())
    data[-1] ^= 1
    path.write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="image_newline"):
        sdk.Pipeline(str(pkg)).chat(str(images["wide"]), "what")
