"""Every `./dev mmedge ...` command of the README runs, in a folder holding the inputs it names.

The inputs are made here: sample scenes (`mmedge data scenes`), tiny random HF directories written
with transformers' `save_pretrained` for `hf/clip`, `hf/blip2-opt` and `hf/llama` (and diffusers' for
`hf/sd15`), a random BLIP-2
checkpoint for `ckpt/blip2`, a random MiniGPT-4 projection, and the JSONL files. One substitution keeps the test short: `train`
commands get `--steps 3` (the recipes' step counts take minutes). A command that needs what this
machine lacks (`--backend tensorrt`) must fail cleanly, naming the extra to install.
"""

from __future__ import annotations

import importlib.util
import json
import re
import shlex
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

README = Path(__file__).resolve().parents[1] / "README.md"
NEEDS_ABSENT_LIBRARY = {"build": "mmedge[trt]"}  # verb -> the extra its error must name


def readme_commands() -> list[list[str]]:
    """The argument lists of the README's `./dev mmedge` commands (bash blocks, `&&` split)."""
    commands = []
    for block in re.findall(r"```bash\n(.*?)```", README.read_text(), re.DOTALL):
        for line in block.splitlines():
            for part in line.split("&&"):
                words = shlex.split(part, comments=True)
                if words[:2] == ["./dev", "mmedge"]:
                    commands.append(words[2:])
    return commands


def _word_tokenizer(vocab: int) -> str:
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"t{i}": i for i in range(vocab)}, unk_token="t3"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok.to_str()


def _hf_blip2(root: Path) -> None:
    cfg = transformers.Blip2Config(
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        qformer_config={
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "intermediate_size": 64,
            "vocab_size": 100,
        },
        text_config={
            "model_type": "opt",
            "vocab_size": 120,
            "hidden_size": 32,
            "num_hidden_layers": 1,
            "ffn_dim": 64,
            "num_attention_heads": 4,
            "max_position_embeddings": 128,
            "word_embed_proj_dim": 32,
            "bos_token_id": 2,
            "eos_token_id": 1,
        },
        num_query_tokens=4,
        image_token_index=119,
    )
    transformers.Blip2ForConditionalGeneration(cfg).save_pretrained(root)
    transformers.BlipImageProcessor(size={"height": 32, "width": 32}).save_pretrained(root)
    (root / "tokenizer.json").write_text(_word_tokenizer(120))


def _hf_llama(root: Path) -> None:
    cfg = transformers.LlamaConfig(
        vocab_size=96,
        hidden_size=32,
        num_hidden_layers=1,
        intermediate_size=64,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
    )
    transformers.LlamaForCausalLM(cfg).save_pretrained(root)
    (root / "tokenizer.json").write_text(_word_tokenizer(96))


def _hf_llava(root: Path) -> None:
    """A LLaVA-1.5-shaped HF directory: model, PIL image processor, tokenizer with <image>, chat template."""
    from hf_tiny import LLAVA_TEMPLATE, llava_tokenizer
    from transformers.models.llava.image_processing_pil_llava import LlavaImageProcessorPil

    cfg = transformers.LlavaConfig(
        vision_config={
            "model_type": "clip_vision_model",
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 4,
            "image_size": 32,
            "patch_size": 8,
        },
        text_config={
            "model_type": "llama",
            "vocab_size": 64,
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 1,
            "num_attention_heads": 4,
            "num_key_value_heads": 2,
            "max_position_embeddings": 128,
            "bos_token_id": 1,
            "eos_token_id": 2,
            "pad_token_id": 3,
        },
        image_token_index=63,
    )
    transformers.LlavaForConditionalGeneration(cfg).save_pretrained(root)
    tokenizer = transformers.PreTrainedTokenizerFast(
        tokenizer_object=llava_tokenizer(64), bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )
    transformers.LlavaProcessor(
        image_processor=LlavaImageProcessorPil(
            size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
        ),
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_TEMPLATE,
    ).save_pretrained(root)


def _minigpt4_projection(path: Path) -> None:
    """MiniGPT-4's llama_proj between hf/blip2-opt's Q-Former (32 wide) and hf/llama (32 wide)."""
    from safetensors.torch import save_file

    save_file({"llama_proj.weight": torch.randn(32, 32), "llama_proj.bias": torch.zeros(32)}, str(path))


@pytest.fixture()
def workspace(tmp_path: Path, store: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    import cv2
    from hf_tiny import write_tiny_hf_clip

    from mmedge.data import generate_scenes
    from mmedge.models.init import init_checkpoint

    torch.manual_seed(0)
    write_tiny_hf_clip(tmp_path / "hf" / "clip")
    _hf_blip2(tmp_path / "hf" / "blip2-opt")
    _hf_llama(tmp_path / "hf" / "llama")
    _hf_llava(tmp_path / "hf" / "llava-1.5")
    _minigpt4_projection(tmp_path / "minigpt4.safetensors")
    if importlib.util.find_spec("diffusers") is not None:  # the dev extra has it
        from diffusers_tiny import write_tiny_sd

        write_tiny_sd(tmp_path / "hf" / "sd15")
    init_checkpoint("blip2-tiny", tmp_path / "ckpt" / "blip2")
    scenes = generate_scenes(6, seed=12, image_size=64)
    (tmp_path / "photos").mkdir()
    for i, s in enumerate(scenes):
        cv2.imwrite(str(tmp_path / "photos" / f"{i}.png"), s.image[..., ::-1])
    cv2.imwrite(str(tmp_path / "photo.jpg"), scenes[0].image[..., ::-1])
    (tmp_path / "captions.jsonl").write_text(
        "".join(
            json.dumps({"image": f"photos/{i}.png", "text": s.caption}) + "\n" for i, s in enumerate(scenes)
        )
    )
    chats = [
        {
            "image": f"photos/{i}.png",
            "conversations": [
                {"from": "human", "value": "<image>\n" + s.qa[0].question},
                {"from": "gpt", "value": s.qa[0].answer},
            ],
        }
        for i, s in enumerate(scenes)
    ]
    (tmp_path / "chat.jsonl").write_text("".join(json.dumps(c) + "\n" for c in chats))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_the_readme_has_commands_for_the_whole_path() -> None:
    verbs = {c[0] for c in readme_commands()}
    assert {
        "data",
        "train",
        "export",
        "calibrate",
        "build",
        "eval",
        "bench",
        "search",
        "classify",
        "verify",
        "caption",
        "chat",
        "generate",
    } <= verbs, verbs


def test_every_readme_command_runs(workspace: Path, capsys: pytest.CaptureFixture) -> None:
    from mmedge.sdk.cli import main

    for argv in readme_commands():
        if argv[0] == "train":
            argv = [*argv, "--steps", "3"]
        code = main(argv)
        captured = capsys.readouterr()
        if argv[0] in NEEDS_ABSENT_LIBRARY and code == 1 and NEEDS_ABSENT_LIBRARY[argv[0]] in captured.err:
            continue  # e.g. TensorRT is not installed here: a clean error naming the extra
        assert code == 0, f"`mmedge {shlex.join(argv)}` failed:\n{captured.err}"
        assert "Traceback" not in captured.err
    assert np.load is not None  # numpy stays importable after the run (no stray monkeypatching)
