"""ImageBind in the official key layout -> mmedge export -> every modality's parity.

The checkpoint is written here by `imagebind_reference.OfficialImageBind`, a model composed as the
official code composes it (torch's nn.MultiheadAttention with add_bias_kv, Conv3d over the image
repeated as two frames, `unfold` IMU windows, the -inf causal mask and argmax EOS selection), so its
names are the official ones by construction; a handful are spelled out below as the official code
names them. The reference's outputs are the targets: mmedge's PyTorch model loaded from that file,
and the exported ONNX components run through the package's paths.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from imagebind_reference import OfficialImageBind

from mmedge.errors import ConfigError, UnsupportedError
from mmedge.models.imagebind.config import ImageBindConfig
from mmedge.models.imagebind.modeling import ImageBind, imu_windows

TEXTS = [
    "a red circle",
    "a small blue square at the top left",
    "two stars",
    "a large green star on the right",
]
# Names as the official ImageBindModel's state_dict() spells them (imagebind_model.py and its modules).
OFFICIAL_NAMES = (
    "modality_preprocessors.vision.cls_token",
    "modality_preprocessors.vision.rgbt_stem.proj.1.weight",
    "modality_preprocessors.vision.pos_embedding_helper.pos_embed",
    "modality_preprocessors.text.token_embedding.weight",
    "modality_preprocessors.text.pos_embed",
    "modality_preprocessors.text.mask",
    "modality_preprocessors.audio.rgbt_stem.proj.weight",
    "modality_preprocessors.audio.rgbt_stem.norm_layer.weight",
    "modality_preprocessors.depth.depth_stem.proj.weight",
    "modality_preprocessors.thermal.rgbt_stem.norm_layer.bias",
    "modality_preprocessors.imu.imu_stem.proj.weight",
    "modality_preprocessors.imu.pos_embed",
    "modality_trunks.vision.pre_transformer_layer.0.weight",
    "modality_trunks.text.blocks.1.attn.in_proj_weight",
    "modality_trunks.audio.blocks.0.attn.bias_k",
    "modality_trunks.imu.blocks.1.attn.bias_v",
    "modality_trunks.depth.blocks.0.attn.out_proj.weight",
    "modality_trunks.thermal.blocks.0.norm_1.weight",
    "modality_trunks.vision.blocks.1.mlp.fc2.bias",
    "modality_heads.vision.2.weight",
    "modality_heads.text.proj.0.weight",
    "modality_heads.text.proj.1.weight",
    "modality_heads.imu.3.weight",
    "modality_heads.audio.0.bias",
    "modality_postprocessors.text.1.log_logit_scale",
    "modality_postprocessors.audio.1.log_logit_scale",
    "modality_postprocessors.thermal.1.log_logit_scale",
)
SCALES = {"audio": 20.0, "depth": 5.0, "thermal": 10.0, "imu": 5.0}
INPUTS = {  # modality -> (manifest path, source tensor, shape after the batch)
    "vision": ("image", "pixel_values", (3, 32, 32)),
    "audio": ("audio", "audio_values", (1, 128, 204)),
    "depth": ("depth", "depth_values", (1, 32, 32)),
    "thermal": ("thermal", "thermal_values", (1, 32, 32)),
    "imu": ("imu", "imu_values", (6, 2000)),
    "video": ("video", "video_values", (3, 2, 32, 32)),  # the vision weights on two frames
}
REFERENCE = {"video": "vision"}  # the official model takes a clip where it takes an image


def _config(vocab: int) -> dict:
    trunk = {"width": 32, "layers": 2, "heads": 2}
    return {
        "modalities": ["vision", "text", "audio", "depth", "thermal", "imu"],
        "embed_dim": 24,
        "vision": {"image_size": 32, "patch_size": 8, **trunk},
        "text": {"vocab_size": vocab, "context_length": 24, **trunk},  # official EOS: argmax(ids)
        "audio": trunk,
        "depth": {"image_size": 32, "patch_size": 8, **trunk},
        "thermal": {"image_size": 32, "patch_size": 8, "width": 48, "layers": 1, "heads": 4},
        "imu": trunk,
        "video": True,
    }


def _reference(raw: dict) -> OfficialImageBind:
    torch.manual_seed(0)
    ref = OfficialImageBind(ImageBindConfig.from_dict(raw).to_dict()).eval()
    with torch.no_grad():  # no parameter at a neutral value (LayerNorms at 1/0, zero biases)
        for name, p in ref.named_parameters():
            if not name.endswith("log_logit_scale"):
                p.add_(torch.randn_like(p) * (0.5 if "bias_" in name else 0.1))
        ref.modality_postprocessors["text"][1].log_logit_scale.fill_(2.9)
    return ref


@pytest.fixture(scope="module")
def imagebind(tmp_path_factory: pytest.TempPathFactory):
    from safetensors.torch import save_file
    from tokenizers import Tokenizer

    from mmedge.models.init import tiny_tokenizer_json
    from mmedge.sdk.cli import main

    root = tmp_path_factory.mktemp("imagebind")
    tok = tiny_tokenizer_json(generative=False)
    (root / "tokenizer.json").write_text(tok)
    raw = _config(Tokenizer.from_str(tok).get_vocab_size())
    (root / "imagebind.json").write_text(json.dumps(raw))
    ref = _reference(raw)
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    save_file(state, str(root / "imagebind.safetensors"))
    args = ["export", str(root / "imagebind.safetensors"), "--family", "imagebind"]
    assert main([*args, "--config", str(root / "imagebind.json"), "--out", str(root / "pkg")]) == 0
    return ref, raw, root


def _inputs(n: int = 3, seed: int = 1) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return {m: torch.randn(n, *shape, generator=g) for m, (_, _, shape) in INPUTS.items()}


def _cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _official_ids(
    tokenizer, texts: list[str], context: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(ids padded to the context with 0 as the official tokenizer pads, the runtime's ids padded
    to the longest, its mask)."""
    ids, mask = (torch.from_numpy(x) for x in tokenizer.encode_batch(texts))
    full = torch.zeros(len(texts), context, dtype=torch.int64)
    full[:, : ids.shape[1]] = ids * mask
    return full, ids, mask


def test_the_reference_has_the_official_names(imagebind) -> None:
    ref, _, _ = imagebind
    names = set(ref.state_dict())
    assert not [n for n in OFFICIAL_NAMES if n not in names]
    assert all(n.startswith("modality_") for n in names)
    # buffers saved as the official saves them: the fixed scales and the text mask
    assert {n for n, _ in ref.named_buffers()} == {
        "modality_preprocessors.text.mask",
        *(f"modality_postprocessors.{m}.1.log_logit_scale" for m in SCALES),
    }


def test_official_layout_loads_and_matches_the_reference(imagebind) -> None:
    from mmedge.models import checkpoint
    from mmedge.models.imagebind.official import from_official
    from mmedge.models.init import tiny_tokenizer_json
    from mmedge.runtime.texts import TextTokenizer

    ref, raw, _ = imagebind
    model = ImageBind(ImageBindConfig.from_dict(raw)).eval()
    checkpoint.assign_weights(model, from_official(ref.state_dict(), "test"), "test")
    x = _inputs()
    tok = TextTokenizer.from_json(tiny_tokenizer_json(generative=False), 24, 0)
    full, ids, mask = _official_ids(tok, TEXTS, 24)
    with torch.no_grad():
        for m in INPUTS:
            want = ref(REFERENCE.get(m, m), x[m])
            scale = SCALES.get(m, 1.0)
            got = getattr(model, f"encode_{'image' if m == 'vision' else m}")(x[m])
            torch.testing.assert_close(got * scale, want, atol=2e-5 * scale, rtol=1e-4)
        want = ref("text", full)
        torch.testing.assert_close(model.encode_text(ids, mask) * want.norm(dim=-1, keepdim=True), want)
    assert model.logit_scales() == pytest.approx({"text": np.exp(2.9), **SCALES}, rel=1e-6)


def test_exported_components_match_the_official_model(imagebind) -> None:
    from mmedge.runtime.components import ComponentRunner
    from mmedge.runtime.package import verify_package

    ref, _, root = imagebind
    pkg = verify_package(root / "pkg")
    m = pkg.manifest
    assert (m.family, m.variant, m.task) == ("imagebind", "imagebind", "retrieval")
    roles = {n: c.role for n, c in m.components.items()}
    assert roles == {
        "vision": "image_encoder",
        "text": "text_encoder",
        "audio": "audio_encoder",
        "depth": "depth_encoder",
        "thermal": "thermal_encoder",
        "imu": "imu_encoder",
        "video": "video_encoder",
    }
    assert sorted(m.pipeline.paths) == ["audio", "depth", "image", "imu", "text", "thermal", "video"]
    assert m.retrieval is not None
    assert m.retrieval.scales == pytest.approx({"text": np.exp(2.9), **SCALES}, rel=1e-6)
    assert m.retrieval.logit_scale == pytest.approx(np.exp(2.9), rel=1e-6)
    runner = ComponentRunner(pkg, precision="fp32")
    x = _inputs(n=4, seed=2)
    cosines = {}
    with torch.no_grad():
        for modality, (path, source, _) in INPUTS.items():
            want = ref(REFERENCE.get(modality, modality), x[modality]).numpy()
            got = runner.run_path(path, {source: x[modality].numpy()})
            assert got.shape == (4, 24) and np.allclose(np.linalg.norm(got, axis=-1), 1, atol=1e-5)
            cosines[modality] = float(_cosine(got, want).min())
        full, ids, mask = _official_ids(runner.tokenizer, TEXTS, 24)
        want = ref("text", full).numpy()
        got = runner.run_path("text", {"input_ids": ids.numpy(), "attention_mask": mask.numpy()})
        cosines["text"] = float(_cosine(got, want).min())
    print("imagebind ONNX vs official-layout reference, min cosine per modality:", cosines)
    assert min(cosines.values()) >= 0.9999, cosines


def test_the_pipeline_embeds_each_modality_through_its_path(imagebind) -> None:
    """`embed(data, modality)` on synthetic paired scenes: the runtime's preprocessing (sized by the
    package's `modalities` section) then the modality's graph, against the reference on the same
    preprocessed rows (an audio recording's clips averaged, as ImageBind averages them)."""
    from mmedge import sdk
    from mmedge.data.modalities import SAMPLE_RATE, generate_paired
    from mmedge.runtime.modality_inputs import prepare

    ref, _, root = imagebind
    pipe = sdk.Pipeline(str(root / "pkg"), precision="fp32")
    sections = pipe.runner.manifest.modalities
    assert pipe.modalities == ("image", "text", "audio", "depth", "thermal", "imu", "video")
    assert sections is not None and sections.imu is not None and sections.imu.samples == 2000
    scenes = generate_paired(2, seed=5, image_size=32)
    for modality, (_, source, shape) in INPUTS.items():
        if modality == "vision":
            continue
        rate = SAMPLE_RATE if modality == "audio" else None
        items = [s.data(modality) for s in scenes]
        got = pipe.embed(items, modality, sample_rate=rate)
        want = []
        for item in items:
            rows = prepare(
                modality,
                item,
                getattr(sections, modality),
                sample_rate=rate,
                image=pipe.runner.manifest.preprocess,
            )[source]
            assert rows.shape[1:] == shape
            with torch.no_grad():
                emb = ref(REFERENCE.get(modality, modality), torch.from_numpy(rows))
                emb = torch.nn.functional.normalize(emb, dim=-1)
            want.append(torch.nn.functional.normalize(emb.mean(0), dim=0).numpy())
        assert _cosine(got, np.stack(want)).min() >= 0.9999, modality
    pipe.add([s.data("depth") for s in scenes], "depth", labels=["d0", "d1"])
    pipe.add([s.scene.image for s in scenes], "image", labels=["i0", "i1"])
    hits = pipe.search(scenes[0].audio, modality="audio", sample_rate=SAMPLE_RATE, k=4)
    assert sorted(h.label for h in hits) == ["d0", "d1", "i0", "i1"]


def test_pickle_files_load_weights_only_and_bad_layouts_are_refused(imagebind, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from mmedge.models.sources import load_source

    ref, raw, root = imagebind
    opts = {"family": "imagebind", "config": root / "imagebind.json", "tokenizer": root / "tokenizer.json"}
    torch.save(ref.state_dict(), tmp_path / "imagebind_huge.pth")
    with pytest.raises(UnsupportedError, match="pickle"):
        load_source(tmp_path / "imagebind_huge.pth", **opts)
    lm = load_source(tmp_path / "imagebind_huge.pth", allow_pickle=True, **opts)
    assert lm.source["kind"] == "official" and lm.family.name == "imagebind"
    torch.testing.assert_close(
        lm.model.state_dict()["audio.encoder.layers.0.self_attn.bias_k"],
        ref.state_dict()["modality_trunks.audio.blocks.0.attn.bias_k"],
    )
    state = {k: v.contiguous() for k, v in ref.state_dict().items()}
    extra = {**state, "modality_heads.vision.3.weight": torch.zeros(24, 32)}  # not ImageBind's
    save_file(extra, str(tmp_path / "other.safetensors"))
    with pytest.raises(
        ConfigError, match=r"not part of ImageBind's layout.*modality_heads\.vision\.3\.weight"
    ):
        load_source(tmp_path / "other.safetensors", **opts)
    short = {k: v for k, v in state.items() if k != "modality_trunks.audio.blocks.0.attn.bias_k"}
    save_file(short, str(tmp_path / "short.safetensors"))
    with pytest.raises(ConfigError, match=r"missing \['audio\.encoder\.layers\.0\.self_attn\.bias_k'\]"):
        load_source(tmp_path / "short.safetensors", **opts)
    # a model without depth cannot take a file with it: a device's modalities are the config's
    (tmp_path / "no-depth.json").write_text(
        json.dumps({**raw, "modalities": ["vision", "text", "audio", "thermal", "imu"]})
    )
    with pytest.raises(ConfigError, match=r"unexpected \['depth\."):
        load_source(root / "imagebind.safetensors", **{**opts, "config": tmp_path / "no-depth.json"})


def test_imu_windows_equal_the_official_unfold() -> None:
    x = torch.randn(3, 6, 2000)
    official = x.unfold(-1, 8, 8).permute(0, 2, 1, 3)  # (B, 250, 6, 8)
    official = official.reshape(official.size(0), official.size(1), -1)
    assert torch.equal(imu_windows(x, 8), official)
    assert imu_windows(x, 8).shape == (3, 250, 48)
    # channel-major: window 1 holds samples 8..15 of channel 0, then of channel 1, ...
    assert torch.equal(imu_windows(x, 8)[0, 1, :16], torch.cat([x[0, 0, 8:16], x[0, 1, 8:16]]))


def test_imu_export_has_no_unfold(imagebind) -> None:
    import onnx

    _, _, root = imagebind
    ops = {n.op_type for n in onnx.load(str(root / "pkg" / "onnx" / "imu.onnx")).graph.node}
    assert "Unfold" not in ops and not any(op.startswith("Col2Im") for op in ops)


def test_text_takes_the_eos_features_under_the_causal_mask() -> None:
    """The embedding of a padded batch equals each text run alone, cut after its EOS: with a causal
    mask nothing after the EOS reaches it. EOS is the largest id (official, argmax) or a given id."""
    vocab = 50
    for eos in (None, 3):
        raw = _config(vocab)
        raw["text"] = {**raw["text"], "eos_token_id": eos}
        torch.manual_seed(0)
        model = ImageBind(ImageBindConfig.from_dict({**raw, "modalities": ["vision", "text"]})).eval()
        end = vocab - 1 if eos is None else eos
        rows = [[1, 7, 9, end], [1, 12, 5, 8, 11, 6, end], [1, end]]
        n = max(map(len, rows))
        ids = torch.tensor([r + [0] * (n - len(r)) for r in rows])
        mask = torch.tensor([[1] * len(r) + [0] * (n - len(r)) for r in rows])
        if eos is not None:  # ids above the EOS must not move the selection
            ids[0, 1] = 40
        with torch.no_grad():
            batch = model.encode_text(ids, mask)
            alone = torch.cat(
                [
                    model.encode_text(ids[i : i + 1, : len(r)], mask[i : i + 1, : len(r)])
                    for i, r in enumerate(rows)
                ]
            )
            # the official way: the full context, padding unmasked, -inf causal mask
            full = torch.zeros(3, 24, dtype=torch.int64)
            full[:, :n] = ids
            official = model.encode_text(full, torch.ones_like(full))
        torch.testing.assert_close(batch, alone, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(batch, official, atol=1e-5, rtol=1e-5)


def test_config_is_strict_and_subsets_export_only_their_modalities() -> None:
    from mmedge.export.exporter import wire_paths
    from mmedge.models.registry import get_family

    family = get_family("imagebind")
    with pytest.raises(ConfigError, match="unknown keys"):
        ImageBindConfig.from_dict({"audio": {"widht": 3}})
    with pytest.raises(ConfigError, match="'vision' and 'text'"):
        ImageBindConfig.from_dict({"modalities": ["text", "audio"]})
    with pytest.raises(ConfigError, match="each once"):
        ImageBindConfig.from_dict({"modalities": ["vision", "text", "smell"]})
    with pytest.raises(ConfigError, match="multiple of window"):
        ImageBindConfig.from_dict({"imu": {"samples": 2001}})
    cfg = ImageBindConfig.from_dict({"modalities": ["imu", "vision", "text"], "thermal": {"width": 96}})
    assert cfg.present == ("vision", "text", "imu")
    assert cfg.thermal.logit_scale == 10.0 and cfg.thermal.heads == 12  # thermal's own defaults kept
    assert ImageBindConfig.from_dict(cfg.to_dict()) == cfg
    decls = family.components(cfg)
    assert [d.name for d in decls] == ["vision", "text", "imu"]
    assert sorted(wire_paths(decls)) == ["image", "imu", "text"]
    released = family.components(family.config_from_dict({}))  # imagebind_huge's sizes
    shapes = {d.name: d.inputs[0].shape for d in released}
    assert shapes["audio"] == ("batch", 1, 128, 204) and shapes["imu"] == ("batch", 6, 2000)
    assert shapes["vision"] == ("batch", 3, 224, 224) and shapes["depth"] == ("batch", 1, 224, 224)


def test_retrieval_scales_name_known_paths() -> None:
    from mmedge.runtime.sections import RetrievalConfig

    assert RetrievalConfig(14.3, scales={"audio": 20.0, "imu": 5.0}).scales["audio"] == 20.0
    with pytest.raises(ConfigError, match="scales"):
        RetrievalConfig(14.3, scales={"smell": 2.0})
    with pytest.raises(ConfigError, match="scales"):
        RetrievalConfig(14.3, scales={"audio": 0.0})


def test_tiny_preset_sizes() -> None:
    from mmedge.models.registry import load_preset

    family, raw = load_preset("imagebind-tiny")
    cfg = family.config_from_dict({**raw, "text": {**raw["text"], "vocab_size": 256}})
    _, clip = load_preset("clip-tiny")
    assert (cfg.vision.image_size, cfg.vision.patch_size) == (
        clip["vision"]["image_size"],
        clip["vision"]["patch_size"],
    )
    assert cfg.present == ("vision", "text", "audio", "depth", "thermal", "imu") and cfg.embed_dim == 96
    assert {getattr(cfg, m).width for m in cfg.present} == {96}
    assert (cfg.audio.mel_bins, cfg.audio.frames, cfg.imu.samples) == (128, 204, 2000)


def test_a_still_clip_embeds_as_its_image_and_clips_are_checked(imagebind) -> None:
    """The video path's stem is the image's Conv3d over two real frames: a clip of one image twice is
    that image's embedding; another second frame moves it; clips come as arrays of frames."""
    from mmedge import sdk
    from mmedge.data.modalities import make_paired
    from mmedge.errors import InvalidInputError

    _, _, root = imagebind
    pipe = sdk.Pipeline(str(root / "pkg"), precision="fp32")
    scene = make_paired(7, 0, image_size=32)
    assert scene.video.shape == (2, 32, 32, 3) and np.array_equal(scene.video[0], scene.scene.image)
    image = pipe.embed_images([scene.scene.image])
    still = pipe.embed(np.stack([scene.scene.image] * 2), "video")
    np.testing.assert_allclose(still, image, atol=1e-5)
    moving = pipe.embed(np.stack([scene.video, np.stack([scene.scene.image] * 2)]), "video")
    assert moving.shape == (2, 24) and float(moving[0] @ image[0]) < 0.99999
    np.testing.assert_allclose(moving[1], image[0], atol=1e-5)
    with pytest.raises(InvalidInputError, match=r"\(T, H, W, 3\)"):
        pipe.embed(scene.scene.image, "video")  # one frame is not a clip
    with pytest.raises(InvalidInputError):
        pipe.embed(np.zeros((2, 32, 32), np.uint8), "video")  # frames without colour channels
