"""The device side runs without torch: sdk, runtime and CLI import, and full retrieval and
classification runs work.

Each check runs in a fresh interpreter whose import system refuses torch and transformers (and
records who asked), so nothing this test process already imported can hide a dependency.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

from child import run_child

# Installed first in the child: refuses the blocked packages and records attempts made by mmedge itself.
_BLOCKER = textwrap.dedent(
    """
    import sys, traceback

    BLOCKED = ("torch", "transformers", "torchvision")
    attempts = []  # (module, importing file) for imports of a blocked package coming from mmedge code

    class _Refuse:
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] not in BLOCKED:
                return None
            frames = [f for f in traceback.extract_stack() if "importlib" not in f.filename]
            importer = frames[-2].filename if len(frames) > 1 else "?"
            if "/mmedge/" in importer.replace("\\\\", "/"):
                attempts.append((name, importer))
            raise ModuleNotFoundError(f"No module named {name!r} (blocked by test_torch_free)", name=name)

    sys.meta_path.insert(0, _Refuse())

    def check_clean():
        for mod in BLOCKED:
            assert sys.modules.get(mod) is None, f"{mod} was imported"
        host_side = sorted(m for m in sys.modules if m.startswith(("mmedge.models", "mmedge.export")))
        assert not host_side, f"host-side modules imported on the device side: {host_side}"
        assert not attempts, f"mmedge code tried to import a blocked package: {attempts}"
    """
)

_RETRIEVAL = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from pathlib import Path

    import numpy as np

    from mmedge import sdk
    from mmedge.runtime.index import VectorIndex
    from mmedge.sdk import cli

    pkg, work = sys.argv[1], Path(sys.argv[2])
    p = sdk.Pipeline(pkg, precision="fp32")

    rng = np.random.default_rng(0)
    arrays = [rng.integers(0, 256, (40 + 9 * i, 56 - 5 * i, 3), dtype=np.uint8) for i in range(4)]
    import cv2  # the images extra (dev has it): write one image to a file and one to encoded bytes
    path = work / "img0.png"
    assert cv2.imwrite(str(path), arrays[0][..., ::-1])
    png = cv2.imencode(".png", arrays[1][..., ::-1])[1].tobytes()

    emb = p.embed_images(arrays)
    n, d = emb.shape
    assert n == 4 and emb.dtype == np.float32 and np.allclose(np.linalg.norm(emb, axis=1), 1, atol=1e-5)
    other = p.embed_images([str(path), png])  # file path and bytes decode to the same pixels as the arrays
    assert np.allclose(other, emb[:2], atol=1e-6), np.abs(other - emb[:2]).max()

    txt = p.embed_texts(["a red circle", "a small blue square at the top left", "star"])
    assert txt.shape == (3, d) and txt.dtype == np.float32
    assert np.allclose(np.linalg.norm(txt, axis=1), 1, atol=1e-5)

    ids = p.add_images(arrays, labels=[f"img{i}" for i in range(4)])
    assert ids == [0, 1, 2, 3] and len(p.index) == 4
    by_text = p.search("a red circle", k=3)
    assert len(by_text) == 3 and {h.id for h in by_text} <= set(ids)
    assert [h.score for h in by_text] == sorted((h.score for h in by_text), reverse=True)
    expected = np.sort(emb @ txt[0])[::-1][:3]
    assert np.allclose([h.score for h in by_text], expected, atol=1e-4), ([h.score for h in by_text], expected)
    by_image = p.search(arrays[2], k=1)
    assert by_image[0].id == 2 and by_image[0].label == "img2" and by_image[0].score > 0.9999

    labels = p.classify(arrays[0], ["red circle", "blue square", "green star"])
    assert sorted(lab.label for lab in labels) == ["blue square", "green star", "red circle"]
    assert abs(sum(lab.score for lab in labels) - 1.0) < 1e-5

    p.index.save(work / "index")
    q = sdk.Pipeline(pkg, precision="fp32")
    q.index = VectorIndex.load(work / "index")
    again = q.search("a red circle", k=3)
    assert [(h.id, h.label) for h in again] == [(h.id, h.label) for h in by_text]
    assert np.allclose([h.score for h in again], [h.score for h in by_text], atol=1e-6)

    # The CLI's device-side commands, in the same torch-free process.
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["verify", pkg, "--json"]) == 0
        assert cli.main(["classify", pkg, str(path), "--labels", "red circle,blue square", "--json"]) == 0
        assert cli.main(["search", pkg, "a red circle", "--add", "shapes:4", "--index", str(work / "cli-index"),
                         "-k", "2", "--json"]) == 0
    text, docs, pos = out.getvalue(), [], 0
    while text[pos:].strip():  # one JSON document per command
        doc, pos = json.JSONDecoder().raw_decode(text, len(text) - len(text[pos:].lstrip()))
        docs.append(doc)
    assert docs[0]["ok"] is True and len(docs[1]["labels"]) == 2 and len(docs[2]["hits"]) == 2, docs

    check_clean()
    print("TORCH_FREE_OK")
    """
)

_CLASSIFICATION = textwrap.dedent(
    """
    import contextlib, io, json, sys
    from pathlib import Path

    import numpy as np

    from mmedge import sdk
    from mmedge.data.modalities import SAMPLE_RATE, primitive_clouds, shape_signals
    from mmedge.runtime.classification import ClassificationPipeline
    from mmedge.sdk import cli

    pkg, work = sys.argv[1], Path(sys.argv[2])
    p = sdk.Pipeline(pkg, precision="fp32")
    assert isinstance(p, ClassificationPipeline) and p.modalities == ("points", "audio", "imu"), p
    clouds, _ = primitive_clouds(2, seed=1, points=300)
    rows = p.classify(clouds, "points", top_k=6)
    assert [len(r) for r in rows] == [6, 6] and abs(sum(x.score for x in rows[0]) - 1) < 1e-6
    clips, _ = shape_signals(2, seed=1, modality="audio")
    assert p.logits(clips, "audio", sample_rate=SAMPLE_RATE).shape == (2, 4)
    np.save(work / "cloud.npy", clouds[0])

    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert cli.main(["classify", pkg, str(work / "cloud.npy"), "--modality", "points", "--json"]) == 0
        assert cli.main(["eval", pkg, "--limit", "4", "--json"]) == 0
    text, docs, pos = out.getvalue(), [], 0
    while text[pos:].strip():  # one JSON document per command
        doc, pos = json.JSONDecoder().raw_decode(text, len(text) - len(text[pos:].lstrip()))
        docs.append(doc)
    assert len(docs[0]["results"][0]["labels"]) == 5 and docs[1]["imu"]["chance"] == 0.25, docs

    check_clean()
    print("TORCH_FREE_OK")
    """
)

_IMPORTS = textwrap.dedent(
    """
    import importlib, pkgutil

    import mmedge.runtime
    import mmedge.sdk

    names = ["mmedge", "mmedge.errors"]
    for pkg in (mmedge.runtime, mmedge.sdk):
        names += [m.name for m in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + ".")]
    for name in names:
        importlib.import_module(name)
    assert "mmedge.sdk.cli" in names and "mmedge.runtime.retrieval" in names, names
    check_clean()
    print("TORCH_FREE_OK", len(names))
    """
)


def _run(script: str, *args: str) -> str:
    return run_child(_BLOCKER + script, "TORCH_FREE_OK", *args)


def test_blocker_really_blocks_torch() -> None:
    """Guard for the harness itself: in the child, `import torch` must fail."""
    _run("try:\n    import torch\nexcept ImportError:\n    print('TORCH_FREE_OK')\n")


def test_runtime_and_sdk_modules_import_without_torch() -> None:
    _run(_IMPORTS)


def test_retrieval_run_without_torch(tiny_pkg: Path, tmp_path: Path) -> None:
    _run(_RETRIEVAL, str(tiny_pkg), str(tmp_path))


def test_classification_run_without_torch(mt_pkg_session: Path, tmp_path: Path) -> None:
    _run(_CLASSIFICATION, str(mt_pkg_session), str(tmp_path))
