"""HF CLIPModel directories -> mmedge package: embeddings match transformers, bad directories are refused.

Tiny random-weight `CLIPModel`s are written with transformers' own `save_pretrained` (weights,
config, a CLIP-format BPE tokenizer and the image processor), exported with `export_model`
(which reads them without transformers) and run through `sdk.Pipeline`. The reference is
transformers itself: its image processor, tokenizer and `get_image_features`/`get_text_features`.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from mmedge import sdk
from mmedge.errors import ConfigError, UnsupportedError
from mmedge.export.exporter import export_model

try:  # transformers 5: the PIL backend is the bit-exact reference; plain CLIPImageProcessor may be torchvision's
    from transformers.models.clip.image_processing_pil_clip import CLIPImageProcessorPil as ImageProcessor
except ImportError:  # transformers 4
    from transformers import CLIPImageProcessor as ImageProcessor

MIN_COSINE = 0.9999
MAX_ABS_ERR = 2e-5  # per element of the L2-normalised embeddings
CONTEXT = 16  # max_position_embeddings: short, so the long caption below is truncated
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
TEXTS = [
    "a photo of a red cat",
    "x",
    "Photo, PHOTO... of?  a   red\tcat!",
    "café ☕ to the photo",  # bytes outside ASCII go through the byte-level alphabet
    "a red cat to the photo of a red cat to the photo of a red cat to the photo",  # > CONTEXT tokens
]
IMAGE_SHAPES = [(50, 70), (120, 90), (17, 40)]  # (H, W) besides the model's own size: down- and upscaling


def _byte_alphabet() -> list[str]:
    """GPT-2/CLIP's printable stand-ins for the 256 byte values."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    chars, extra = {b: chr(b) for b in keep}, 0
    for b in range(256):
        if b not in chars:
            chars[b], extra = chr(256 + extra), extra + 1
    return [chars[b] for b in range(256)]


def _clip_tokenizer(root: Path):
    """A CLIP-format BPE tokenizer written as vocab.json + merges.txt and loaded by transformers.

    Vocabulary as CLIP's: the 256 byte stand-ins, the same with `</w>`, the merges, then SOT and EOT
    as the two highest ids (so EOT is also the argmax that legacy eos_token_id == 2 configs pool at).
    """
    alphabet = _byte_alphabet()
    merges = ["r e", "re d</w>", "c a", "ca t</w>", "o f</w>", "p h", "ph o", "t o</w>", "pho to</w>"]
    vocab = [*alphabet, *(c + "</w>" for c in alphabet), *(m.replace(" ", "") for m in merges), SOT, EOT]
    root.mkdir(parents=True)
    (root / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(vocab)}, ensure_ascii=False))
    (root / "merges.txt").write_text("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizerFast.from_pretrained(root)
    assert (
        tok.eos_token_id == len(vocab) - 1 and tok.bos_token_id == len(vocab) - 2 and len(tok) == len(vocab)
    )
    return tok


@dataclass(frozen=True)
class Case:
    name: str
    image_size: int = 32
    patch_size: int = 8
    vision_width: int = 32
    text_width: int = 32
    layers: int = 2
    projection_dim: int = 32
    vision_act: str = "quick_gelu"
    text_act: str = "quick_gelu"
    layer_norm_eps: float = 1e-5
    legacy_eos: bool = False  # config eos_token_id == 2: HF pools at argmax(input_ids)
    processor: dict[str, Any] = field(default_factory=dict)
    shards: bool = False  # save with a sharded safetensors index
    whole_processor: bool = False  # save a whole CLIPProcessor (transformers 5: processor_config.json only)


CASES = [
    Case("default"),
    Case(
        "size48-patch16-mean",
        image_size=48,
        patch_size=16,
        layers=1,
        processor={"image_mean": [0.5, 0.4, 0.3], "image_std": [0.2, 0.25, 0.3]},
    ),
    Case("proj20-widths-sharded", vision_width=48, text_width=32, projection_dim=20, layers=1, shards=True),
    Case(
        "gelu-patch12-eps",
        image_size=36,
        patch_size=12,
        vision_act="gelu",
        text_act="gelu",
        layer_norm_eps=0.1,
    ),
    Case("mixed-act", vision_act="gelu", text_act="quick_gelu", layers=1),
    Case("legacy-eos2", layers=1, legacy_eos=True),
    Case(
        "whole-processor-size40-mean",
        image_size=40,
        patch_size=8,
        layers=1,
        processor={"image_mean": [0.45, 0.5, 0.55], "image_std": [0.3, 0.2, 0.25]},
        whole_processor=True,
    ),
]


def _hf_model(case: Case, tok):
    text = {
        "vocab_size": len(tok),
        "hidden_size": case.text_width,
        "intermediate_size": 2 * case.text_width,
        "num_hidden_layers": case.layers,
        "num_attention_heads": 4,
        "max_position_embeddings": CONTEXT,
        "hidden_act": case.text_act,
        "layer_norm_eps": case.layer_norm_eps,
        "bos_token_id": tok.bos_token_id,
        "eos_token_id": 2 if case.legacy_eos else tok.eos_token_id,
        "pad_token_id": 1 if case.legacy_eos else tok.pad_token_id,
    }
    vision = {
        "image_size": case.image_size,
        "patch_size": case.patch_size,
        "hidden_size": case.vision_width,
        "intermediate_size": 2 * case.vision_width,
        "num_hidden_layers": case.layers,
        "num_attention_heads": 4,
        "hidden_act": case.vision_act,
        "layer_norm_eps": case.layer_norm_eps,
    }
    cfg = transformers.CLIPConfig(text_config=text, vision_config=vision, projection_dim=case.projection_dim)
    torch.manual_seed(0)
    model = transformers.CLIPModel(cfg).eval()
    with torch.no_grad():
        # HF's init (std 0.02, zero biases, identity LayerNorms) leaves every block close to the identity, so
        # a wrong activation or mask would hide under the tolerance. Scale-preserving weights make them count.
        for name, p in model.named_parameters():
            if p.ndim >= 2:
                p.normal_(0.0, p[0].numel() ** -0.5)  # (out, in...) -> std 1/sqrt(fan_in)
            elif "norm" in name and name.endswith(".weight"):
                p.normal_(1.0, 0.1)
            elif p.ndim == 1:
                p.normal_(0.0, 0.1)
    return model


def _save(root: Path, case: Case, model, tok):
    s = case.image_size
    proc = ImageProcessor(size={"shortest_edge": s}, crop_size={"height": s, "width": s}, **case.processor)
    model.save_pretrained(root, **({"max_shard_size": "40KB"} if case.shards else {}))
    if case.whole_processor:
        transformers.CLIPProcessor(image_processor=proc, tokenizer=tok).save_pretrained(root)
    else:
        tok.save_pretrained(root)
        proc.save_pretrained(root)
    return proc


def _features(out) -> torch.Tensor:
    """transformers 5 returns a model output whose pooler_output is the projected features; 4 a tensor."""
    feats = out if isinstance(out, torch.Tensor) else out.pooler_output
    return torch.nn.functional.normalize(feats, dim=-1)


def _images(size: int) -> list[np.ndarray]:
    rng = np.random.default_rng(size)
    return [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in [(size, size), *IMAGE_SHAPES]]


def _cosines(a: np.ndarray, b: torch.Tensor) -> np.ndarray:
    return (a.astype(np.float64) * b.numpy().astype(np.float64)).sum(axis=1)


@pytest.fixture(scope="module")
def tok(tmp_path_factory: pytest.TempPathFactory):
    return _clip_tokenizer(tmp_path_factory.mktemp("tok") / "clip-bpe")


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory: pytest.TempPathFactory, tok) -> Path:
    """A valid HF directory (default case) that error tests copy and break."""
    root = tmp_path_factory.mktemp("hf") / "clip-default"
    _save(root, CASES[0], _hf_model(CASES[0], tok), tok)
    return root


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_embeddings_match_transformers(case: Case, tok, tmp_path: Path) -> None:
    model = _hf_model(case, tok)
    hf_dir = tmp_path / "hf"
    proc = _save(hf_dir, case, model, tok)
    processor_file = "processor_config.json" if case.whole_processor else "preprocessor_config.json"
    assert (hf_dir / "tokenizer.json").is_file() and (hf_dir / processor_file).is_file()
    assert case.whole_processor != (hf_dir / "preprocessor_config.json").is_file()
    assert (hf_dir / "model.safetensors.index.json").is_file() == case.shards
    manifest = export_model(hf_dir, tmp_path / "pkg")
    assert manifest.family == "clip" and manifest.provenance.source["kind"] == "hf"
    p = sdk.Pipeline(tmp_path / "pkg", precision="fp32")

    images = _images(case.image_size)
    pixels = torch.from_numpy(np.asarray(proc(images, return_tensors="np")["pixel_values"]))
    enc = tok(TEXTS, padding=True, truncation=True, max_length=CONTEXT, return_tensors="pt")
    with torch.no_grad():
        ref_img = _features(model.get_image_features(pixel_values=pixels))
        ref_txt = _features(model.get_text_features(**enc))

    # Same tokens as transformers (pad ids may differ; they are masked out).
    ids, mask = p.runner.tokenizer.encode_batch(TEXTS)
    assert mask.tolist() == enc["attention_mask"].tolist()
    assert (ids * mask).tolist() == (enc["input_ids"] * enc["attention_mask"]).tolist()
    assert mask.sum(axis=1).min() < mask.shape[1] == CONTEXT  # the batch really pads, and truncates

    ours_img, ours_txt = p.embed_images(images), p.embed_texts(TEXTS)
    img_cos, txt_cos = _cosines(ours_img, ref_img), _cosines(ours_txt, ref_txt)
    err = max(np.abs(ours_img - ref_img.numpy()).max(), np.abs(ours_txt - ref_txt.numpy()).max())
    print(
        f"\n{case.name}: min cosine images {img_cos.min():.8f} texts {txt_cos.min():.8f}, max|err| {err:.1e}"
    )
    assert img_cos.min() >= MIN_COSINE, img_cos
    assert txt_cos.min() >= MIN_COSINE, txt_cos
    # fp32 parity is ~1e-6: a near-miss such as quick_gelu for gelu passes the cosine bar but not this one.
    assert err <= MAX_ABS_ERR, err
    # Rows really differ: a tower that maps every input to one vector would match trivially.
    for ref in (ref_img.numpy(), ref_txt.numpy()):
        sims = ref @ ref.T
        assert sims[~np.eye(len(ref), dtype=bool)].max() < 0.99


def test_image_sources_match_arrays(base_dir: Path, tmp_path: Path) -> None:
    """A path, PNG bytes and a PIL image embed exactly like the array they encode."""
    from PIL import Image

    p = sdk.Pipeline(_export(base_dir, tmp_path), precision="fp32")
    arr = _images(32)[1]
    png = tmp_path / "img.png"
    Image.fromarray(arr).save(png)
    got = p.embed_images([arr, str(png), png.read_bytes(), Image.open(png)])
    assert np.allclose(got, got[0], atol=1e-6)


def test_zero_shot_probabilities_match_transformers(base_dir: Path, tmp_path: Path, tok) -> None:
    """The learned temperature reaches classify(): probabilities == logits_per_image.softmax(-1)."""
    model = transformers.CLIPModel.from_pretrained(base_dir).eval()
    with torch.no_grad():
        model.logit_scale.fill_(3.2)  # not the init value, so a default temperature would show
    hf_dir = tmp_path / "hf"
    _save(hf_dir, CASES[0], model, tok)
    p = sdk.Pipeline(_export(hf_dir, tmp_path), precision="fp32")
    labels = ["a red cat", "a photo", "cat to the photo of red"]
    proc = transformers.CLIPProcessor.from_pretrained(hf_dir)
    for image in _images(32)[:3]:
        got = {r.label: r.score for r in p.classify(image, labels, templates=["{}"])}
        enc = proc(text=labels, images=[image], return_tensors="pt", padding=True)
        with torch.no_grad():
            ref = model(**enc).logits_per_image.softmax(-1)[0].numpy()
        assert np.abs(np.array([got[lab] for lab in labels]) - ref).max() < 1e-4, (got, ref)
        assert ref.max() - ref.min() > 0.05  # the labels really score apart


def test_missing_image_processor_is_refused(base_dir: Path, tmp_path: Path) -> None:
    """Neither preprocessor_config.json nor processor_config.json: refuse rather than guess."""
    root = _broken(base_dir, tmp_path)
    (root / "preprocessor_config.json").unlink()
    with pytest.raises(ConfigError, match=r"preprocessor_config\.json nor processor_config\.json"):
        _export(root, tmp_path)


def _export(src: Path, tmp_path: Path, **kw: Any) -> Path:
    out = tmp_path / "pkg"
    export_model(src, out, **kw)
    return out


def _broken(base_dir: Path, tmp_path: Path) -> Path:
    root = tmp_path / "hf"
    shutil.copytree(base_dir, root)
    return root


def _edit_json(path: Path, **changes: Any) -> None:
    data = json.loads(path.read_text())
    for key, value in changes.items():
        section, _, name = key.rpartition("__")
        target = data[section] if section else data
        if value is None:
            target.pop(name, None)
        else:
            target[name] = value
    path.write_text(json.dumps(data))


def test_missing_tokenizer_is_config_error(base_dir: Path, tmp_path: Path) -> None:
    root = _broken(base_dir, tmp_path)
    (root / "tokenizer.json").unlink()
    with pytest.raises(ConfigError, match=r"tokenizer\.json"):
        _export(root, tmp_path)
    assert not (tmp_path / "pkg").exists()


def test_pickle_weights_refused_by_default(base_dir: Path, tmp_path: Path, tok) -> None:
    root = _broken(base_dir, tmp_path)
    (root / "model.safetensors").unlink()
    model = _hf_model(CASES[0], tok)
    torch.save(model.state_dict(), root / "pytorch_model.bin")
    with pytest.raises(UnsupportedError, match="pickle"):
        _export(root, tmp_path)
    assert not (tmp_path / "pkg").exists()
    # Explicit opt-in loads it with weights_only=True, and the package still matches transformers.
    p = sdk.Pipeline(_export(root, tmp_path, allow_pickle=True), precision="fp32")
    enc = tok(TEXTS[:2], padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = _features(model.get_text_features(**enc))
    assert _cosines(p.embed_texts(TEXTS[:2]), ref).min() >= MIN_COSINE


def test_unsupported_model_type(base_dir: Path, tmp_path: Path) -> None:
    root = _broken(base_dir, tmp_path)
    _edit_json(root / "config.json", model_type="siglip")
    with pytest.raises(UnsupportedError, match="siglip"):
        _export(root, tmp_path)


@pytest.mark.parametrize("name", ["text_model.embeddings.token_embedding.weight", "visual_projection.weight"])
def test_wrong_tensor_shape_names_the_tensor(base_dir: Path, tmp_path: Path, name: str) -> None:
    from safetensors.torch import load_file, save_file

    root = _broken(base_dir, tmp_path)
    state = load_file(str(root / "model.safetensors"))
    state[name] = torch.zeros(state[name].shape[0] + 1, *state[name].shape[1:])
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=name.replace(".", r"\.")):
        _export(root, tmp_path)
    assert not (tmp_path / "pkg").exists()


def test_missing_tensor_names_the_tensor(base_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    root = _broken(base_dir, tmp_path)
    state = load_file(str(root / "model.safetensors"))
    del state["text_model.final_layer_norm.weight"]
    save_file(state, str(root / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(ConfigError, match=r"text_model\.final_layer_norm\.weight"):
        _export(root, tmp_path)


def test_tokenizer_beyond_vocab_is_config_error(base_dir: Path, tmp_path: Path) -> None:
    """Token ids the embedding table cannot index are refused up front, not an IndexError mid-export."""
    root = _broken(base_dir, tmp_path)
    _edit_json(root / "config.json", text_config__vocab_size=300)
    with pytest.raises(ConfigError, match="vocab_size"):
        _export(root, tmp_path)


@pytest.mark.parametrize(
    "changes",
    [
        {"size": {"height": 32, "width": 28}},  # squash to a non-square size the model cannot take
        {"resample": 2},  # bilinear
        {"do_normalize": False},
        {"do_center_crop": False},
        {"do_rescale": False},
        {"crop_size": {"height": 32, "width": 28}},
        {"size": {"shortest_edge": 40}},  # resize != crop
    ],
    ids=[
        "squash-non-square",
        "bilinear",
        "no-normalize",
        "no-crop",
        "no-rescale",
        "crop-not-square",
        "resize-not-crop",
    ],
)
def test_preprocessing_the_runtime_cannot_reproduce_is_refused(
    base_dir: Path, tmp_path: Path, changes: dict[str, Any]
) -> None:
    """Each of these would change every image embedding silently; refusing beats a wrong package."""
    root = _broken(base_dir, tmp_path)
    _edit_json(root / "preprocessor_config.json", **changes)
    with pytest.raises(UnsupportedError):
        _export(root, tmp_path)
