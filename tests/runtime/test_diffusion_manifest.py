"""An image_generation manifest whose diffusion section and graphs disagree, or that asks for more
memory than the caps, is refused when parsed (IntegrityError), never in the middle of a call."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest

pytest.importorskip("diffusers")

from families.family_conformance import CASES

from mmedge.errors import IntegrityError
from mmedge.export.exporter import export_model
from mmedge.models.init import init_model
from mmedge.models.registry import get_family
from mmedge.runtime.manifest import MANIFEST_NAME, parse_manifest


@pytest.fixture(scope="module")
def raw(tmp_path_factory) -> dict[str, Any]:
    """The manifest of the conformance test's tiny latent model (U-Net latents 2..16, VAE halving)."""
    root = tmp_path_factory.mktemp("sd-manifest")
    ckpt = init_model(get_family("stable-diffusion"), CASES[("stable-diffusion", "latent")], root / "ckpt")
    export_model(ckpt, root / "pkg")
    return json.loads((root / "pkg" / MANIFEST_NAME).read_text())


def _unet(r: dict) -> dict:
    return r["components"]["unet"]


def _decoder(r: dict) -> dict:
    return r["components"]["vae_decoder"]


MUTATIONS: list[tuple[str, Callable[[dict], Any], str]] = [
    ("huge default", lambda r: r["diffusion"].update(sample_size=4096, latent_channels=64), "elements"),
    ("huge range", lambda r: _unet(r)["dims"]["height"].update(max=1 << 20), "caps"),
    ("tiny scale", lambda r: r["diffusion"].update(scaling_factor=1e-300), "scaling_factor"),
    ("channels", lambda r: r["diffusion"].update(latent_channels=3), "sample and out_sample"),
    ("default outside range", lambda r: r["diffusion"].update(sample_size=64), "outside the denoiser"),
    ("no guidance batch", lambda r: _unet(r)["dims"]["batch"].update(min=1, opt=1, max=1), "2 rows"),
    ("timestep dtype", lambda r: _unet(r)["inputs"][1].update(dtype="int64"), "float32"),
    ("decoder output", lambda r: _decoder(r)["outputs"][0].update(name="image"), "vae_decoder"),
    (
        "decoder channels",
        lambda r: _decoder(r)["outputs"][0].update(shape=["batch", 4, "h", "w"]),
        "vae_decoder",
    ),
    ("decoder range", lambda r: _decoder(r)["dims"]["height"].update(max=8), "cover"),
    (
        "encoder input",
        lambda r: r["components"]["vae_encoder"]["inputs"][0].update(name="image"),
        "vae_encoder",
    ),
    (
        "encoder channels",
        lambda r: r["components"]["vae_encoder"]["outputs"][0].update(shape=["batch", 3, "h", "w"]),
        "vae_encoder",
    ),
    ("text length", lambda r: r["tokenizer"].update(context_length=8), "fixed length"),
    ("steps", lambda r: r["diffusion"].update(steps=5000), "steps"),
]


def test_the_exported_manifest_parses(raw: dict) -> None:
    assert parse_manifest(json.dumps(raw)).diffusion is not None


@pytest.mark.parametrize("mutate, message", [m[1:] for m in MUTATIONS], ids=[m[0] for m in MUTATIONS])
def test_a_disagreeing_manifest_is_refused(raw: dict, mutate: Callable[[dict], Any], message: str) -> None:
    bad = json.loads(json.dumps(raw))
    mutate(bad)
    with pytest.raises(IntegrityError, match=message):
        parse_manifest(json.dumps(bad))


def test_a_pixel_package_has_rgb_latents(raw: dict) -> None:
    bad = json.loads(json.dumps(raw))
    del bad["components"]["vae_decoder"]
    with pytest.raises(IntegrityError, match="pixel space"):
        parse_manifest(json.dumps(bad))
    bad["diffusion"].update(vae_scale_factor=1, latent_channels=3)  # a pixel package, but an encoder
    for spec in (*_unet(bad)["inputs"][:1], *_unet(bad)["outputs"]):
        spec["shape"][1] = 3
    with pytest.raises(IntegrityError, match="vae_encoder needs the vae_decoder"):
        parse_manifest(json.dumps(bad))
