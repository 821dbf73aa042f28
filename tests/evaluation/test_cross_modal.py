"""`mmedge eval`'s cross-modal figures for packages that embed more than images and texts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("torch")


@pytest.fixture(scope="module")
def imagebind(tmp_path_factory: pytest.TempPathFactory):
    from mmedge import sdk
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_checkpoint

    root = tmp_path_factory.mktemp("ib")
    export_model(init_checkpoint("imagebind-tiny", root / "ckpt", seed=0), root / "pkg")
    return sdk.Pipeline(str(root / "pkg"))


def test_hits_follow_what_each_modality_carries(imagebind) -> None:
    """A depth map shows no colour, so more scenes answer a depth query than an audio one; the
    figures are R@1 against that definition, for images and captions alike."""
    from mmedge.evaluation.tasks import evaluate_modalities

    out = evaluate_modalities(imagebind, n=60)
    assert set(out) >= {"audio", "depth", "thermal", "imu"}
    assert out["depth"]["chance"] > out["audio"]["chance"] > 0
    assert out["imu"]["chance"] == out["depth"]["chance"]  # both: shape, size, position
    for m in ("audio", "depth", "thermal", "imu"):
        for target in ("image", "text"):
            assert 0.0 <= out[m][f"{m}_to_{target}_r1"] <= 1.0


def test_a_modality_query_finds_itself_through_one_index(imagebind) -> None:
    """An index holding images, texts and depth maps: each depth query's own entry is its nearest
    (identical data, identical embedding), whatever else the index holds."""
    from mmedge.data.modalities import generate_paired

    scenes = generate_paired(5, seed=9)
    imagebind.index = type(imagebind.index)(imagebind.dim, model=imagebind.model_id)
    imagebind.add([p.scene.image for p in scenes], "image", ids=list(range(5)))
    imagebind.add([p.scene.caption for p in scenes], "text", ids=list(range(5, 10)))
    imagebind.add([p.depth for p in scenes], "depth", ids=list(range(10, 15)))
    for i, p in enumerate(scenes):
        (hit,) = imagebind.search(p.depth, k=1, modality="depth")
        assert hit.id == 10 + i and np.isclose(hit.score, 1.0, atol=1e-4)


def test_two_tower_packages_have_no_cross_modal_figures(tiny_pkg_session: Path) -> None:
    from mmedge import sdk
    from mmedge.errors import UnsupportedError
    from mmedge.evaluation.tasks import evaluate_modalities

    with pytest.raises(UnsupportedError, match="images and texts only"):
        evaluate_modalities(sdk.Pipeline(str(tiny_pkg_session)), n=5)


def test_cli_embeds_and_searches_other_modalities(imagebind, tmp_path: Path, capsys) -> None:
    """`mmedge search --add shapes:N --add-modality ...` indexes each scene's image, caption and depth
    map; `--modality audio FILE` queries with a recording; `mmedge embed --modality imu X.npy`."""
    import json

    import soundfile as sf

    from mmedge.data import HELD_OUT_SEED
    from mmedge.data.modalities import SAMPLE_RATE, make_paired
    from mmedge.sdk.cli import main

    pkg = str(imagebind.runner.package.root)
    paired = make_paired(HELD_OUT_SEED, 2)
    sf.write(tmp_path / "q.wav", paired.audio, SAMPLE_RATE, subtype="FLOAT")
    np.save(tmp_path / "imu.npy", paired.imu)
    args = ["search", pkg, "--add", "shapes:6", "--add-modality", "image,text,depth", "-k", "18"]
    assert main([*args, "--modality", "audio", str(tmp_path / "q.wav"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["added"] == {"image": 6, "text": 6, "depth": 6}
    labels = {h["label"] for h in out["hits"]}
    assert len(out["hits"]) == 18 and {"scene 2 (image)", "scene 2 (depth)"} <= labels
    direct = imagebind.embed([paired.audio], "audio", sample_rate=SAMPLE_RATE)
    assert main(["embed", pkg, "--modality", "audio", str(tmp_path / "q.wav"), "--json"]) == 0
    assert np.allclose(json.loads(capsys.readouterr().out)["embeddings"], direct, atol=1e-5)
    assert main(["embed", pkg, "--modality", "imu", str(tmp_path / "imu.npy"), "--json"]) == 0
    assert np.array(json.loads(capsys.readouterr().out)["embeddings"]).shape == (1, imagebind.dim)
    assert main(["embed", pkg, "--modality", "imu", str(tmp_path / "q.wav")]) == 1
    assert "(6, T) .npy" in capsys.readouterr().err
