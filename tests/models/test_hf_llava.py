"""HF LlavaForConditionalGeneration (Llama LM) -> mmedge export -> torch-free chat, token for token.

Image files go through mmedge's preprocessing and, for the reference, through HF's processor
(`LlavaProcessor` with the PIL image processor, its chat template and `apply_chat_template`).
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from hf_tiny import LLAVA_TEMPLATE as TEMPLATE
from hf_tiny import llava_conversation as _conversation
from hf_tiny import llava_tokenizer as _tokenizer

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

SIZE, PATCH = 32, 8


def _write_llava(root: Path, *, layers: int | list[int], strategy: str, do_pad: bool, seed: int):
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    vocab = 64
    torch.manual_seed(seed)
    cfg = transformers.LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 3,
            "num_attention_heads": 4,
            "image_size": SIZE,
            "patch_size": PATCH,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": vocab,
            "hidden_size": 48,
            "intermediate_size": 96,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 256,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 3,
        },
        image_token_index=vocab - 1,
        vision_feature_layer=layers,
        vision_feature_select_strategy=strategy,
    )
    hf = transformers.LlavaForConditionalGeneration(cfg).eval()
    with torch.no_grad():  # HF's init leaves the image path tiny; make the image matter to the LM
        for p in hf.model.multi_modal_projector.parameters():
            p.normal_(0, 0.5)
        hf.lm_head.weight.normal_(0, 0.5)
    hf.save_pretrained(root)
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=_tokenizer(vocab),
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
    )
    image_processor = LlavaImageProcessorPil(
        size={"shortest_edge": SIZE}, crop_size={"height": SIZE, "width": SIZE}, do_pad=do_pad
    )
    processor = transformers.LlavaProcessor(
        image_processor=image_processor,
        tokenizer=fast,
        patch_size=PATCH,
        vision_feature_select_strategy=strategy,
        num_additional_image_tokens=1,
        chat_template=TEMPLATE,
    )
    processor.save_pretrained(root)
    return hf, processor


CASES = {  # name: (vision_feature_layer, select strategy, do_pad)
    "layer-2-default-pad": (-2, "default", True),
    "layers-list-full-nopad": ([-3, -1], "full", False),
}


@pytest.fixture(scope="module", params=sorted(CASES))
def llava(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory):
    from mmedge import sdk
    from mmedge.export.exporter import export_model

    layers, strategy, do_pad = CASES[request.param]
    root = tmp_path_factory.mktemp("llava")
    hf, processor = _write_llava(
        root / "src", layers=layers, strategy=strategy, do_pad=do_pad, seed=len(strategy)
    )
    export_model(root / "src", root / "pkg")
    images = []
    for i, (h, w) in enumerate([(40, 57), (64, 30), (32, 32)]):
        from PIL import Image

        arr = (np.random.default_rng(i).random((h, w, 3)) * 255).astype(np.uint8)
        path = root / f"img{i}.png"
        Image.fromarray(arr).save(path)
        images.append(path)
    return hf, processor, sdk.Pipeline(str(root / "pkg")), images


def _reference(hf, processor, conversation, images, n: int = 20):
    from PIL import Image

    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    inputs = processor(images=[Image.open(p) for p in images], text=prompt, return_tensors="pt")
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=n, min_new_tokens=n, do_sample=False)
        logits = hf(**inputs).logits[0, -1].numpy()
    return out[0, inputs["input_ids"].shape[1] :].tolist(), logits, prompt


def _embeds(pipe, messages) -> np.ndarray:
    """The prompt's input embeddings, through the pipeline's own template, tokenizer and image path."""
    sources = [p["image"] for m in messages for p in m["content"] if p["type"] == "image"]
    items = pipe.template.encode(messages, len(sources))
    return pipe._embed(items, [pipe._image(s, "RGB") for s in sources], 0)


def _ours(pipe, messages, n: int = 20) -> list[int]:
    from mmedge.runtime.generation import GenerationConfig

    config = GenerationConfig(max_new_tokens=n, min_new_tokens=n)
    return list(pipe.lm.generate_ids(_embeds(pipe, messages), config))


def test_rendered_prompt_equals_apply_chat_template(llava) -> None:
    _, processor, pipe, images = llava
    hf_conv, ours, _ = _conversation(
        images,
        [
            ("system", "be brief ."),
            ("user", (1, "what is this ?")),
            ("assistant", "a red circle ."),
            ("user", (1, "and that ?")),
        ],
    )
    pieces = pipe.template.render(ours)
    assert "".join(text for text, _ in pieces) == processor.apply_chat_template(
        hf_conv, add_generation_prompt=True
    )


@pytest.mark.parametrize("image", [0, 1, 2])
def test_one_image_greedy_matches_transformers(llava, image: int) -> None:
    hf, processor, pipe, images = llava
    hf_conv, ours, used = _conversation([images[image]], [("user", (1, "what is the shape of this ?"))])
    ref, ref_logits, _ = _reference(hf, processor, hf_conv, used)
    assert _ours(pipe, ours) == ref
    embeds = _embeds(pipe, ours)  # prefill logits of the last prompt position
    logits = pipe.lm.forward(embeds[None], pipe.lm.new_cache(), logits_to_keep=1)[0, -1]
    assert np.abs(logits - ref_logits).max() < 1e-3
    # and the public API gives the same text
    text = pipe.chat_messages(ours, max_new_tokens=20, min_new_tokens=20)
    assert text == pipe.lm.tokenizer.decode(ref)


def test_two_turns_with_two_images_match_transformers(llava) -> None:
    hf, processor, pipe, images = llava
    hf_conv, ours, used = _conversation(
        images,
        [("user", (1, "what is this ?")), ("assistant", "a red circle ."), ("user", (1, "and that ?"))],
    )
    ref, _, _ = _reference(hf, processor, hf_conv, used)
    assert _ours(pipe, ours) == ref


def test_multi_turn_reuses_the_kv_cache_and_images(llava, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmedge import sdk

    _, _, pipe, images = llava
    first = [
        {
            "role": "user",
            "content": [
                {"type": "image", "image": str(images[0])},
                {"type": "text", "text": "what is this ?"},
            ],
        }
    ]
    answer = pipe.chat_messages(first, max_new_tokens=6, min_new_tokens=6)
    fresh = (np.random.default_rng(99).random((45, 33, 3)) * 255).astype(np.uint8)  # not in the image cache
    second = [
        *first,
        {"role": "assistant", "content": [{"type": "text", "text": answer}]},
        {
            "role": "user",
            "content": [{"type": "image", "image": fresh}, {"type": "text", "text": "and that ?"}],
        },
    ]
    fed = {"llm": 0, "vision": 0}
    forward, run = pipe.lm.forward, pipe.runner.run_batched

    def counting_forward(embeds, cache, out=None, logits_to_keep=None):
        fed["llm"] += embeds.shape[1]
        return forward(embeds, cache, out, logits_to_keep)

    def counting_run(component, feeds):
        fed["vision"] += component == "vision"
        return run(component, feeds)

    monkeypatch.setattr(pipe.lm, "forward", counting_forward)
    monkeypatch.setattr(pipe.runner, "run_batched", counting_run)
    reply = pipe.chat_messages(second, max_new_tokens=6, min_new_tokens=6)
    whole = len(_embeds(pipe, second))
    shared = len(_embeds(pipe, first)) + 5  # the first prompt and the answer tokens fed back
    assert fed["vision"] == 1  # only the new image ran through the tower
    assert fed["llm"] == whole - shared + 5  # the rest of the prompt, then 5 decode steps
    assert (
        sdk.Pipeline(str(pipe.runner.package.root)).chat_messages(second, max_new_tokens=6, min_new_tokens=6)
        == reply
    )


def test_bad_conversations_are_typed_errors(llava) -> None:
    from mmedge.errors import InvalidInputError

    _, _, pipe, images = llava
    many = [
        {"type": "image", "image": str(images[0])}
    ] * 16  # 16 x 16 image tokens fill the 256-token context
    with pytest.raises(InvalidInputError, match=r"positions.*16 image.*context of 256"):
        pipe.chat_messages([{"role": "user", "content": [*many, {"type": "text", "text": "what"}]}])
    with pytest.raises(InvalidInputError, match="limit is 16"):
        pipe.chat_messages([{"role": "user", "content": [*many, *many[:1]]}])
    with pytest.raises(InvalidInputError, match="role 'robot'"):
        pipe.chat_messages([{"role": "robot", "content": "what"}])
    with pytest.raises(InvalidInputError, match="max_new_tokens"):
        pipe.chat(str(images[0]), "what", max_new_tokens=0)


def test_both_weight_spellings_and_both_processor_files_import_alike(llava, tmp_path: Path) -> None:
    """Older files nest the tower as vision_tower.vision_model.* and the LM as language_model.model.*;
    transformers 5 models name model.vision_tower.*, model.language_model.*, lm_head.*. Image settings
    live in preprocessor_config.json or nested in processor_config.json."""
    import json
    import shutil

    from safetensors.torch import load_file, save_file

    from mmedge.models.hf_import import load_hf

    _, _, pipe, _ = llava
    src = Path(pipe.runner.manifest.provenance.source["path"])
    base = load_hf(src)
    saved = load_file(src / "model.safetensors")
    spellings = {
        "old": lambda k: k.replace("vision_tower.", "vision_tower.vision_model.", 1),
        "v5": lambda k: (
            "model." + k.replace("language_model.model.", "language_model.", 1)
            if not k.startswith("language_model.lm_head")
            else k.replace("language_model.", "", 1)
        ),
    }
    for name, rename in spellings.items():
        other = tmp_path / name
        shutil.copytree(src, other)
        save_file({rename(k): v for k, v in saved.items()}, str(other / "model.safetensors"))
        if name == "old":  # the image processor saved alone, as older processors were
            nested = json.loads((other / "processor_config.json").read_text()).pop("image_processor")
            (other / "preprocessor_config.json").write_text(json.dumps(nested))
            whole = json.loads((other / "processor_config.json").read_text())
            whole.pop("image_processor", None)
            (other / "processor_config.json").write_text(json.dumps(whole))
        got = load_hf(other)
        assert sorted(got.state) == sorted(base.state), name
        assert all(torch.equal(got.state[k], base.state[k]) for k in base.state), name
        assert got.preprocess == base.preprocess and got.config == base.config, name
