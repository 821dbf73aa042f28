"""The meta-transformer family: exported components against PyTorch on every path, the shared
encoder's weight loaders (the official bare-blocks layout, a clip-family checkpoint's vision
trunk), the IMU windowing, the frozen encoder through a training step, and the wiring of one
encoder graph on several runtime paths."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from torch import nn

from mmedge.errors import ConfigError, IntegrityError, UnsupportedError
from mmedge.models.meta_transformer import EMBEDS, loaders
from mmedge.models.meta_transformer.config import MetaTransformerConfig
from mmedge.models.meta_transformer.modeling import (
    MetaTransformer,
    encoder_sha256,
    freeze_encoder,
    imu_windows,
)

# Small widths, the real input geometry: 16 groups of 32 points, a 128 x 204 filterbank at
# strides 10 (229 tokens), 6 x 2000 IMU samples in 40-sample windows (51 tokens).
RAW: dict[str, Any] = {
    "encoder": {"width": 32, "layers": 2, "heads": 2, "pre_norm": True},
    "points": {"groups": 16, "group_size": 32, "channels": [16, 32, 64], "pos_hidden": 16, "classes": 6},
    "audio": {"classes": 4},
    "imu": {"classes": 4},
    "head_hidden": 16,
}
COSINE = 0.9999


def _row_cosine(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return (a * b).sum(-1) / (np.linalg.norm(a, axis=-1) * np.linalg.norm(b, axis=-1))


def _group(cloud: np.ndarray, groups: int, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Farthest point sampling from point 0 and k nearest neighbours, relative to their centres
    (the runtime's grouping, written out here for test inputs only)."""
    chosen, dist = [0], np.full(len(cloud), np.inf)
    for _ in range(groups - 1):
        dist = np.minimum(dist, ((cloud - cloud[chosen[-1]]) ** 2).sum(-1))
        chosen.append(int(dist.argmax()))
    centers = cloud[chosen]
    d = ((centers[:, None] - cloud[None]) ** 2).sum(-1)
    idx = np.argsort(d, axis=1, kind="stable")[:, :k]
    return (cloud[idx] - centers[:, None]).astype(np.float32), centers.astype(np.float32)


def _sources(cfg: MetaTransformerConfig, n: int = 3) -> dict[str, dict[str, np.ndarray]]:
    """Each path's sources for n samples: grouped primitive clouds, a normalised-filterbank-like
    noise, synthetic IMU traces."""
    from mmedge.data.modalities import generate_paired, primitive_clouds

    assert cfg.points is not None
    clouds, _ = primitive_clouds(n, seed=5, points=256)
    grouped = [_group(c, cfg.points.groups, cfg.points.group_size) for c in clouds]
    rng = np.random.default_rng(0)
    return {
        "points": {
            "point_groups": np.stack([g for g, _ in grouped]),
            "point_centers": np.stack([c for _, c in grouped]),
        },
        "audio": {"audio_values": rng.standard_normal((n, 1, 128, 204)).astype(np.float32)},
        "imu": {"imu_values": np.stack([p.imu for p in generate_paired(n, seed=7)])},
    }


@pytest.fixture(scope="module")
def exported(tmp_path_factory: pytest.TempPathFactory):
    """A random-weight checkpoint, exported with `mmedge export`; the model as export loaded it."""
    from mmedge.models.init import init_model
    from mmedge.models.registry import get_family
    from mmedge.models.sources import load_source
    from mmedge.sdk.cli import main

    root = tmp_path_factory.mktemp("mt")
    ckpt = init_model(get_family("meta-transformer"), RAW, root / "ckpt", seed=1)
    lm = load_source(ckpt)
    with torch.no_grad():  # norms away from (1, 0), so that the checks see them
        for name, p in lm.model.named_parameters():
            if "norm" in name:
                p.add_(torch.randn_like(p) * 0.3)
    from mmedge.models.checkpoint import save_checkpoint

    save_checkpoint(ckpt, "meta-transformer", lm.config.to_dict(), lm.model, lm.tokenizer_json)
    assert main(["export", str(ckpt), "--out", str(root / "pkg")]) == 0
    return lm.model.eval(), root / "pkg"


def test_every_path_matches_pytorch(exported) -> None:
    from mmedge.runtime.components import ComponentRunner

    model, pkg = exported
    runner = ComponentRunner(pkg, precision="fp32")
    cosines = {}
    for modality, sources in _sources(model.cfg).items():
        values = runner.run_path_values(modality, sources)
        with torch.no_grad():
            inputs = [torch.from_numpy(sources[s]) for s in sources]
            tokens = model.tokenize(modality, *inputs)
            hidden = model.encoder(tokens)
            logits, embeds = model.heads[modality](hidden)
        for name, ref in (
            ("tokens", tokens),
            ("hidden_states", hidden),
            ("logits", logits),
            (EMBEDS[modality], embeds),
        ):
            cos = _row_cosine(values[name], ref.numpy()).min()
            cosines[f"{modality}.{name}"] = cos
            assert cos >= COSINE, (modality, name, cos)
        assert runner.run_path(modality, sources).shape == (3, model.cfg.modality(modality).classes)
        assert np.allclose(np.linalg.norm(values[EMBEDS[modality]], axis=1), 1, atol=1e-5)
    print("1 - cosine", {k: float(f"{1 - v:.1e}") for k, v in cosines.items()})


def test_one_encoder_graph_runs_on_every_path(exported) -> None:
    from mmedge.runtime.package import verify_package

    _, pkg = exported
    m = verify_package(pkg).manifest
    assert (m.family, m.variant, m.task) == ("meta-transformer", "shared-encoder", "classification")
    roles = {n: c.role for n, c in m.components.items()}
    assert roles == {
        "points_tokenizer": "modality_tokenizer",
        "audio_tokenizer": "modality_tokenizer",
        "imu_tokenizer": "modality_tokenizer",
        "encoder": "shared_encoder",
        "points_head": "task_head",
        "audio_head": "task_head",
        "imu_head": "task_head",
    }
    assert {p: [s.component for s in path.steps] for p, path in m.pipeline.paths.items()} == {
        p: [f"{p}_tokenizer", "encoder", f"{p}_head"] for p in ("points", "audio", "imu")
    }
    assert {p: path.output for p, path in m.pipeline.paths.items()} == dict.fromkeys(
        m.pipeline.paths, "logits"
    )
    # one graph file for the encoder, with the token count symbolic over every modality's
    assert sorted(f for f in m.files if "encoder" in f) == ["onnx/encoder.onnx"]
    enc = m.component("encoder")
    assert enc.inputs[0].shape == ("batch", "sequence", 32)
    assert (enc.dims["sequence"].min, enc.dims["sequence"].max) == (17, 229)
    assert enc.precisions["fp32"].parity["cosine"] >= COSINE


def test_wiring_refuses_a_component_off_its_roles_paths(exported) -> None:
    from mmedge.runtime.manifest import parse_manifest

    _, pkg = exported
    doc = json.loads((pkg / "manifest.json").read_text())
    doc.pop("signature", None)

    def parse(d: dict) -> None:
        parse_manifest(json.dumps(d))

    parse(doc)  # as written
    bad = json.loads(json.dumps(doc))
    bad["pipeline"]["paths"]["image"] = bad["pipeline"]["paths"].pop("imu")
    with pytest.raises(
        IntegrityError, match=r"a 'modality_tokenizer' component does not run on the 'image' path"
    ):
        parse(bad)
    bad = json.loads(json.dumps(doc))
    bad["pipeline"]["paths"] = {}
    with pytest.raises(IntegrityError, match="needs one of the paths"):
        parse(bad)


def test_a_declared_path_outside_the_role_is_refused(tmp_path: Path) -> None:
    from mmedge.export.exporter import wire_paths
    from mmedge.models.meta_transformer import components

    decls = components(MetaTransformerConfig.from_dict(RAW))
    paths = wire_paths(decls)
    assert [s.component for s in paths["audio"].steps] == ["audio_tokenizer", "encoder", "audio_head"]
    from mmedge.models.component import decl_paths

    assert decl_paths(decls[3]) == ("points", "audio", "imu")
    strays = (replace(decls[0], paths=("image",)), *decls[1:])
    from mmedge.export.exporter import export_loaded
    from mmedge.models.registry import get_family
    from mmedge.models.sources import LoadedModel

    family = get_family("meta-transformer")
    family = replace(family, components=lambda cfg: strays)
    cfg = MetaTransformerConfig.from_dict(RAW)
    lm = LoadedModel(family, cfg, MetaTransformer(cfg), "{}", None, {})
    with pytest.raises(ConfigError, match="names paths"):
        export_loaded(lm, tmp_path / "pkg")
    assert not (tmp_path / "pkg").exists()


def test_a_missing_modality_has_no_components_and_no_path() -> None:
    from mmedge.export.exporter import wire_paths
    from mmedge.models.meta_transformer import components

    cfg = MetaTransformerConfig.from_dict({**RAW, "audio": None})
    decls = components(cfg)
    assert [d.name for d in decls] == [
        "points_tokenizer",
        "imu_tokenizer",
        "encoder",
        "points_head",
        "imu_head",
    ]
    assert sorted(wire_paths(decls)) == ["imu", "points"]
    assert cfg.to_dict()["audio"] is None and MetaTransformerConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "raw, match",
    [
        ({"encoder": {"width": 32, "heads": 3}}, "multiple of heads"),
        ({"encoder": {"act": "swish"}}, "activation"),
        ({"points": {"classes": 2, "labels": ["a"]}}, "labels"),
        ({"imu": {"samples": 2000, "window": 30}}, "multiple of window"),
        ({"audio": {"mel_bins": 8}}, "smaller than one"),
        ({"points": None, "audio": None, "imu": None}, "at least one"),
        ({"pool": ["cls", "sum"]}, "pool"),
        ({"points": {"colour": 3}}, "unknown keys"),
        ({"depth": {}}, "unknown keys"),
        ({"points": {"channels": [8, 16]}}, "channels"),
        ({"imu": [1]}, "object or null"),
    ],
)
def test_config_is_strict(raw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        MetaTransformerConfig.from_dict(raw)


def test_config_round_trips_and_preset_matches_clip_tiny() -> None:
    from mmedge.models.registry import load_preset

    cfg = MetaTransformerConfig.from_dict(RAW)
    assert MetaTransformerConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg
    family, raw = load_preset("meta-transformer-tiny")
    tiny = family.config_from_dict(raw)
    _, clip = load_preset("clip-tiny")
    v = clip["vision"]
    enc = tiny.encoder
    assert (enc.width, enc.layers, enc.heads, enc.mlp_dim, enc.act) == (
        v["width"],
        v["layers"],
        v["heads"],
        v["mlp_dim"],
        v["act"],
    )
    assert (tiny.points.groups, tiny.points.group_size, tiny.points.classes) == (64, 32, 6)
    assert tiny.points.labels == ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")
    assert (tiny.audio.classes, tiny.imu.classes) == (4, 4)
    assert [tiny.modality(m).tokens for m in tiny.modalities] == [65, 229, 51]


@pytest.mark.parametrize("window", [8, 40])
def test_imu_windows_equal_unfold(window: int) -> None:
    x = torch.randn(2, 6, 2000)
    ref = x.unfold(-1, window, window).permute(0, 2, 1, 3).reshape(2, 2000 // window, 6 * window)
    assert torch.equal(imu_windows(x, window), ref)
    # token t, entry c * W + k is channel c's sample t * W + k
    assert imu_windows(x, window)[1, 3, 2 * window + 5] == x[1, 2, 3 * window + 5]


def test_imu_tokenizer_exports_without_unfold(exported) -> None:
    import onnx

    _, pkg = exported
    ops = {n.op_type for n in onnx.load(str(pkg / "onnx" / "imu_tokenizer.onnx")).graph.node}
    assert "Unfold" not in ops and not any("Col2Im" in o or "Im2Col" in o for o in ops)


# -- the official encoder layout ------------------------------------------------------------------


class _TimmBlock(nn.Module):
    """timm's `vision_transformer.Block` as the official README builds it (qkv_bias, nn.LayerNorm,
    nn.GELU, no layer scale), written from its definition so that its state dict has the released
    names and its output is an independent reference."""

    def __init__(self, dim: int, heads: int, mlp_ratio: float = 4.0):
        super().__init__()
        self.heads = heads
        self.norm1 = nn.LayerNorm(dim)
        self.attn = nn.Module()
        self.attn.qkv = nn.Linear(dim, 3 * dim)
        self.attn.proj = nn.Linear(dim, dim)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = nn.Module()
        self.mlp.fc1 = nn.Linear(dim, int(dim * mlp_ratio))
        self.mlp.fc2 = nn.Linear(int(dim * mlp_ratio), dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, c = x.shape
        qkv = (
            self.attn.qkv(self.norm1(x)).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        )
        att = nn.functional.scaled_dot_product_attention(qkv[0], qkv[1], qkv[2])
        x = x + self.attn.proj(att.transpose(1, 2).reshape(b, n, c))
        return x + self.mlp.fc2(nn.functional.gelu(self.mlp.fc1(self.norm2(x))))


def _official(width: int = 32, layers: int = 2, heads: int = 2) -> nn.Sequential:
    torch.manual_seed(3)
    ref = nn.Sequential(*[_TimmBlock(width, heads) for _ in range(layers)]).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


def _official_model(layers: int = 2) -> MetaTransformer:
    return MetaTransformer(
        MetaTransformerConfig.from_dict({**RAW, "encoder": {"width": 32, "layers": layers, "heads": 2}})
    ).eval()


OFFICIAL_NAMES = [  # as in Meta-Transformer_base_patch16_encoder.pth, for the first two blocks
    "0.norm1.weight",
    "0.norm1.bias",
    "0.attn.qkv.weight",
    "0.attn.qkv.bias",
    "0.attn.proj.weight",
    "0.attn.proj.bias",
    "0.norm2.weight",
    "0.norm2.bias",
    "0.mlp.fc1.weight",
    "0.mlp.fc1.bias",
    "0.mlp.fc2.weight",
    "0.mlp.fc2.bias",
    "1.norm1.weight",
    "1.attn.qkv.weight",
    "1.mlp.fc2.bias",
]


@pytest.mark.parametrize("fmt", ["pth", "safetensors"])
def test_official_encoder_file_loads_and_computes_the_blocks(fmt: str, tmp_path: Path) -> None:
    from safetensors.torch import save_file

    ref = _official()
    state = ref.state_dict()
    assert set(OFFICIAL_NAMES) <= set(state) and len(state) == 24
    path = tmp_path / f"Meta-Transformer_encoder.{fmt}"
    if fmt == "pth":
        torch.save(state, path)
        with pytest.raises(UnsupportedError, match="pickle"):
            loaders.load_official_encoder(_official_model(), path)
    else:
        save_file({k: v.contiguous() for k, v in state.items()}, str(path))
    model = _official_model()
    loaders.load_official_encoder(model, path, allow_pickle=fmt == "pth")
    x = torch.randn(2, 9, 32)
    with torch.no_grad():
        assert torch.allclose(model.encoder(x), ref(x), atol=1e-5)


def test_official_layout_refuses_other_names_and_sizes() -> None:
    state = _official().state_dict()
    cfg = _official_model().cfg.encoder
    renamed = loaders.from_official(state, cfg)
    assert renamed["encoder.layers.1.self_attn.projection.weight"] is state["1.attn.proj.weight"]
    for extra in ("norm.weight", "2.norm1.weight", "0.ls1.gamma", "blocks.0.norm1.weight", "00.norm1.weight"):
        with pytest.raises(ConfigError, match="unexpected"):
            loaders.from_official({**state, extra: torch.zeros(32)}, cfg)
    with pytest.raises(ConfigError, match=r"missing \['1.mlp.fc2.bias'\]"):
        loaders.from_official({k: v for k, v in state.items() if k != "1.mlp.fc2.bias"}, cfg)
    with pytest.raises(ConfigError, match="missing"):  # a 3-block config, a 2-block file
        loaders.from_official(state, _official_model(layers=3).cfg.encoder)
    with pytest.raises(ConfigError, match="act='gelu'"):
        loaders.from_official(state, replace(cfg, act="quick_gelu"))
    with pytest.raises(ConfigError, match="pre_norm"):
        loaders.from_official(state, replace(cfg, pre_norm=True))
    with pytest.raises(ConfigError, match="named tensors"):
        loaders.from_official({**state, "0.norm1.weight": [1.0]}, cfg)
    wide = _official(width=64).state_dict()
    with pytest.raises(ConfigError, match="shape"):
        loaders.assign_encoder(_official_model(), loaders.from_official(wide, cfg), "wide")


# -- a clip-family checkpoint's vision trunk ------------------------------------------------------


def _clip_checkpoint(root: Path, act: str) -> tuple[Any, Path]:
    from mmedge.models.checkpoint import save_checkpoint
    from mmedge.models.clip.modeling import CLIP, CLIPConfig

    raw = {
        "vision": {
            "image_size": 32,
            "patch_size": 16,
            "width": 32,
            "layers": 2,
            "heads": 2,
            "mlp_dim": 128,
            "act": act,
        },
        "text": {"vocab_size": 64, "context_length": 8, "width": 32, "layers": 1, "heads": 2, "mlp_dim": 64},
        "projection_dim": 16,
        "layer_norm_eps": 1e-5,
    }
    torch.manual_seed(4)
    clip = CLIP(CLIPConfig.from_dict(raw)).eval()
    with torch.no_grad():
        for p in clip.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    return clip, save_checkpoint(root / f"clip-{act}", "clip", clip.cfg.to_dict(), clip, "{}")


@pytest.mark.parametrize("act", ["quick_gelu", "gelu"])
def test_clip_vision_trunk_becomes_the_encoder(act: str, tmp_path: Path) -> None:
    clip, ckpt = _clip_checkpoint(tmp_path, act)
    cfg = MetaTransformerConfig.from_dict(
        {**RAW, "encoder": {"width": 32, "layers": 2, "heads": 2, "act": act, "pre_norm": True}}
    )
    model = MetaTransformer(cfg).eval()
    loaders.load_clip_encoder(model, ckpt)
    vm = clip.vision_model
    x = torch.randn(2, 7, 32)
    px = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(model.encoder(x), vm.encoder(vm.pre_layrnorm(x)), atol=1e-5)
        # the whole image tower, with the encoder in the middle: CLIP's own hidden states
        assert torch.allclose(
            vm.post_layernorm(model.encoder(vm.embeddings(px))), vm.hidden_states(px), atol=1e-5
        )


def test_clip_trunk_must_fit_the_encoder_config(tmp_path: Path) -> None:
    _, ckpt = _clip_checkpoint(tmp_path, "quick_gelu")
    gelu = MetaTransformer(
        MetaTransformerConfig.from_dict(
            {**RAW, "encoder": {"width": 32, "layers": 2, "heads": 2, "pre_norm": True}}
        )
    )
    with pytest.raises(ConfigError, match="act"):
        loaders.load_clip_encoder(gelu, ckpt)
    plain = MetaTransformer(
        MetaTransformerConfig.from_dict(
            {**RAW, "encoder": {"width": 32, "layers": 2, "heads": 2, "act": "quick_gelu"}}
        )
    )
    with pytest.raises(ConfigError, match=r"set encoder\.pre_norm"):
        loaders.load_clip_encoder(plain, ckpt)
    from mmedge.models.checkpoint import load_weights, read_checkpoint_meta

    state = load_weights(ckpt / "model.safetensors")
    meta = read_checkpoint_meta(ckpt)
    enc = replace(gelu.cfg.encoder, act="quick_gelu")
    with pytest.raises(ConfigError, match="not part of CLIP's vision trunk"):
        loaders.from_clip(
            {**state, "vision_model.encoder.layers.2.mlp.fc1.weight": torch.zeros(1)}, meta["config"], enc
        )
    partial = {k: v for k, v in state.items() if "layers.1.self_attn.k_proj" not in k}
    with pytest.raises(ConfigError, match="missing"):
        loaders.assign_encoder(gelu, loaders.from_clip(partial, meta["config"], enc), "partial")


def test_meta_transformer_tiny_starts_from_clip_tiny(tmp_path: Path) -> None:
    from mmedge.models.init import init_checkpoint
    from mmedge.models.registry import load_preset
    from mmedge.models.sources import load_source

    clip = load_source(init_checkpoint("clip-tiny", tmp_path / "clip-tiny")).model
    family, raw = load_preset("meta-transformer-tiny")
    model = family.build(family.config_from_dict(raw)).eval()
    loaders.load_clip_encoder(model, tmp_path / "clip-tiny")
    vm = clip.vision_model
    x = torch.randn(1, 65, 96)
    with torch.no_grad():
        assert torch.allclose(model.encoder(x), vm.encoder(vm.pre_layrnorm(x)), atol=1e-5)


# -- the frozen encoder ---------------------------------------------------------------------------


def _step(model: MetaTransformer, params: list, sources: dict[str, dict[str, np.ndarray]]) -> None:
    opt = torch.optim.AdamW(params, lr=1e-2, weight_decay=0.1)
    model.train()
    loss = torch.zeros(())
    for modality, src in sources.items():
        logits, _ = model(modality, *(torch.from_numpy(v) for v in src.values()))
        loss = loss + nn.functional.cross_entropy(logits, torch.arange(len(logits)) % logits.shape[1])
    opt.zero_grad()
    loss.backward()
    opt.step()


@pytest.mark.parametrize("given", ["trainable", "all"])
def test_a_training_step_leaves_the_frozen_encoder_byte_identical(given: str) -> None:
    cfg = MetaTransformerConfig.from_dict(RAW)
    torch.manual_seed(0)
    model = MetaTransformer(cfg)
    sources = _sources(cfg, n=2)
    before = encoder_sha256(model)
    tok_before = model.tokenizers["imu"].proj.weight.detach().clone()
    trainable = freeze_encoder(model)
    assert not any(p.requires_grad for p in model.encoder.parameters())
    assert {id(p) for p in trainable} == {
        id(p) for n, p in model.named_parameters() if not n.startswith("encoder.")
    }
    # an optimizer handed every parameter skips the frozen ones (their grad stays None), decay included
    _step(model, trainable if given == "trainable" else list(model.parameters()), sources)
    assert all(p.grad is None for p in model.encoder.parameters())
    assert encoder_sha256(model) == before
    assert not torch.equal(model.tokenizers["imu"].proj.weight, tok_before)  # the rest did train


def test_an_unfrozen_encoder_changes_its_hash() -> None:
    cfg = MetaTransformerConfig.from_dict(RAW)
    torch.manual_seed(0)
    model = MetaTransformer(cfg)
    before = encoder_sha256(model)
    _step(model, list(model.parameters()), _sources(cfg, n=2))
    assert encoder_sha256(model) != before
