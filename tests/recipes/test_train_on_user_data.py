"""`mmedge train` on the user's data: CLIP on captioned images (from scratch and from an HF
directory), BLIP-2 fine-tuned on LLaVA-style conversations. Small data, few steps: the checks are
that training reads the data, lowers the loss, keeps what must stay frozen, and that the result exports."""

from __future__ import annotations

import json
from pathlib import Path

import cv2
import pytest

torch = pytest.importorskip("torch")

from mmedge.data import generate_scenes
from mmedge.errors import ConfigError, InvalidInputError
from mmedge.models.checkpoint import load_weights, read_checkpoint_meta
from mmedge.sdk.cli import main


def _write_images(root: Path, n: int, seed: int = 5) -> list:
    root.mkdir(parents=True, exist_ok=True)
    scenes = generate_scenes(n, seed=seed, image_size=64)
    for i, s in enumerate(scenes):
        assert cv2.imwrite(str(root / f"img{i}.png"), s.image[..., ::-1])
    return scenes


def _captions(root: Path, n: int = 12) -> Path:
    scenes = _write_images(root / "images", n)
    lines = [json.dumps({"image": f"images/img{i}.png", "text": s.caption}) for i, s in enumerate(scenes)]
    (root / "captions.jsonl").write_text("\n".join(lines) + "\n")
    return root / "captions.jsonl"


def _conversations(root: Path, n: int = 8) -> Path:
    scenes = _write_images(root / "images", n, seed=9)
    lines = []
    for i, s in enumerate(scenes):
        turns = []
        for k, qa in enumerate(s.qa[:2]):
            turns += [
                {"from": "human", "value": ("<image>\n" if k == 0 else "") + qa.question},
                {"from": "gpt", "value": qa.answer},
            ]
        lines.append(json.dumps({"image": f"images/img{i}.png", "conversations": turns}))
    (root / "chat.jsonl").write_text("\n".join(lines) + "\n")
    return root / "chat.jsonl"


def test_clip_trains_on_a_captions_jsonl(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    from mmedge import sdk
    from mmedge.export.exporter import export_model

    data = _captions(tmp_path)
    ckpt = tmp_path / "ckpt"
    args = [
        "--preset",
        "clip-tiny",
        "--data",
        str(data),
        "--out",
        str(ckpt),
        "--steps",
        "40",
        "--batch-size",
        "12",
    ]
    assert main(["train", "--json", *args]) == 0
    info = read_checkpoint_meta(ckpt)["train"]
    assert info["data"] == str(data) and info["steps"] == 40 and info["batch_size"] == 12
    assert info["final_loss"] < info["first_loss"], info
    export_model(ckpt, tmp_path / "pkg")
    p = sdk.Pipeline(str(tmp_path / "pkg"), precision="fp32")
    assert p.embed_images([str(tmp_path / "images" / "img0.png")]).shape[0] == 1


def test_clip_fine_tunes_an_hf_directory_and_keeps_its_preprocessing(tmp_path: Path) -> None:
    pytest.importorskip("transformers")

    from hf_tiny import write_tiny_hf_clip

    from mmedge.export.exporter import export_model

    hf = tmp_path / "hf"
    mean, std = [0.4, 0.45, 0.5], [0.3, 0.28, 0.26]
    write_tiny_hf_clip(hf, mean, std)
    data, ckpt = _captions(tmp_path), tmp_path / "ckpt"
    args = [
        "--preset",
        "clip-tiny",
        "--init",
        str(hf),
        "--data",
        str(data),
        "--out",
        str(ckpt),
        "--steps",
        "30",
    ]
    assert main(["train", "--json", *args]) == 0
    meta = read_checkpoint_meta(ckpt)
    assert meta["train"]["init"] == str(hf) and meta["train"]["final_loss"] < meta["train"]["first_loss"]
    assert meta["preprocess"]["mean"] == mean and meta["preprocess"]["image_size"] == 32
    manifest = export_model(ckpt, tmp_path / "pkg")
    assert list(manifest.preprocess.mean) == pytest.approx(mean) and manifest.preprocess.std == pytest.approx(
        tuple(std)
    )


def test_blip2_fine_tunes_on_conversations(tmp_path: Path) -> None:
    from mmedge import sdk
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_checkpoint

    base = init_checkpoint("blip2-tiny", tmp_path / "base", seed=0)
    data, ckpt = _conversations(tmp_path), tmp_path / "ft"
    args = ["--preset", "blip2-tiny", "--init", str(base), "--data", str(data), "--out", str(ckpt)]
    assert main(["train", "--json", *args, "--steps", "40", "--batch-size", "8", "--lr", "1e-3"]) == 0
    info = read_checkpoint_meta(ckpt)["train"]
    assert info["conversations"] == 8 and info["steps"] == 40
    assert info["final_loss"] < info["first_loss"], info
    before, after = load_weights(base / "model.safetensors"), load_weights(ckpt / "model.safetensors")
    changed = {k for k in before if not torch.equal(before[k], after[k])}
    assert changed and all(
        k.startswith(("qformer.", "language_projection.", "query_tokens")) for k in changed
    )
    assert any(k.startswith("qformer.") for k in changed) and any(
        k.startswith("language_projection.") for k in changed
    )
    export_model(ckpt, tmp_path / "pkg")
    chat = sdk.Pipeline(str(tmp_path / "pkg"), precision="fp32")
    assert isinstance(
        chat.chat(str(tmp_path / "images" / "img0.png"), "how many shapes are there?", max_new_tokens=3), str
    )


def test_blip2_training_explains_what_it_starts_from(tmp_path: Path) -> None:
    from mmedge.recipes.base import TrainRequest, train_model

    with pytest.raises(ConfigError, match="--init CLIP_CHECKPOINT"):
        train_model(tmp_path / "x", TrainRequest(preset="blip2-tiny"))
    clip = tmp_path / "clip"
    from mmedge.models.init import init_checkpoint

    init_checkpoint("clip-tiny", clip)
    with pytest.raises(ConfigError, match="fine-tune a BLIP-2 checkpoint"):
        train_model(tmp_path / "x", TrainRequest(preset="blip2-tiny", init=str(clip), data="shapes:4"))
    with pytest.raises(ConfigError, match="is a 'clip' model; this recipe trains 'blip2'"):
        from mmedge.recipes.blip2_finetune import finetune

        finetune(
            tmp_path / "x",
            TrainRequest(preset="blip2-tiny", init=str(clip), data=str(_conversations(tmp_path))),
        )


@pytest.mark.parametrize(
    ("record", "match"),
    [
        ({"image": "images/img0.png"}, "conversations"),
        (
            {
                "image": "images/img0.png",
                "conversations": [{"from": "gpt", "value": "x"}, {"from": "human", "value": "y"}],
            },
            "human then gpt",
        ),
        (
            {
                "image": "images/img0.png",
                "conversations": [{"from": "human", "value": "<image>"}, {"from": "gpt", "value": "a"}],
            },
            "empty question",
        ),
        (
            {
                "image": "missing.png",
                "conversations": [{"from": "human", "value": "q"}, {"from": "gpt", "value": "a"}],
            },
            "does not exist",
        ),
    ],
)
def test_bad_conversations_are_refused_by_line(tmp_path: Path, record: dict, match: str) -> None:
    from mmedge.data import load_conversations

    _write_images(tmp_path / "images", 1)
    path = tmp_path / "bad.jsonl"
    path.write_text(json.dumps(record) + "\n")
    with pytest.raises(InvalidInputError, match=match):
        load_conversations(str(path))


def test_clip_data_without_captions_is_refused(tmp_path: Path) -> None:
    from mmedge.recipes.base import TrainRequest, train_model

    _write_images(tmp_path / "folder", 3)
    with pytest.raises(InvalidInputError, match="without text"):
        train_model(tmp_path / "x", TrainRequest(preset="clip-tiny", data=str(tmp_path / "folder"), steps=1))
