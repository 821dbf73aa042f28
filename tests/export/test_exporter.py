"""Export writes a verified package: parity recorded, TensorRT lint clean, tamper detected, atomic."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import onnx
import pytest

from mmedge.errors import IntegrityError
from mmedge.runtime.manifest import MANIFEST_NAME
from mmedge.runtime.package import verify_package


def test_manifest_records_parity_and_lint(tiny_pkg_session: Path) -> None:
    m = verify_package(tiny_pkg_session).manifest
    for name in ("vision", "text"):
        parity = m.components[name].precisions["fp32"].parity
        assert parity["passed"] and parity["max_abs_err"] < 1e-4 and parity["cosine"] > 0.99999
        assert parity["trt_lint_ok"] is True
    assert m.provenance.opset >= 17 and m.provenance.source["kind"] == "mmedge"
    assert m.tokenizer is not None and m.tokenizer.file in m.files
    for rel, entry in m.files.items():
        assert (tiny_pkg_session / rel).stat().st_size == entry.size


def test_graphs_have_dynamic_batch_and_opset(tiny_pkg_session: Path) -> None:
    import onnxruntime as ort

    model = onnx.load(str(tiny_pkg_session / "onnx" / "vision.onnx"))
    assert {o.version for o in model.opset_import if o.domain in ("", "ai.onnx")} >= {17}
    assert model.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    sess = ort.InferenceSession(
        str(tiny_pkg_session / "onnx" / "vision.onnx"), providers=["CPUExecutionProvider"]
    )
    out = sess.run(None, {"pixel_values": np.zeros((3, 3, 64, 64), np.float32)})[0]
    assert out.shape[0] == 3


def test_altered_onnx_fails_verify_and_load(tiny_pkg: Path) -> None:
    from mmedge import sdk
    from mmedge.sdk.cli import main

    path = tiny_pkg / "onnx" / "vision.onnx"
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))
    assert main(["verify", str(tiny_pkg)]) == 1  # a refused package: exit 1 (2 is bad usage)
    pipe = sdk.Pipeline(str(tiny_pkg))  # opening reads no file: the graph is checked as it loads
    with pytest.raises(IntegrityError, match="altered"):
        pipe.embed_images([np.zeros((64, 64, 3), np.uint8)])


def test_symlinked_file_is_refused(tiny_pkg: Path, tmp_path: Path) -> None:
    tok = tiny_pkg / "tokenizer.json"
    outside = tmp_path / "outside.json"
    outside.write_bytes(tok.read_bytes())
    tok.unlink()
    tok.symlink_to(outside)
    with pytest.raises(IntegrityError, match="symlink"):
        verify_package(tiny_pkg)


def test_failed_export_leaves_old_package(
    tiny_ckpt: Path, tiny_pkg: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mmedge.export.exporter as exporter

    before = (tiny_pkg / MANIFEST_NAME).read_bytes()
    calls = []

    def boom(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("simulated crash while exporting the second component")
        return real(*args, **kwargs)

    real = exporter.export_component
    monkeypatch.setattr(exporter, "export_component", boom)
    with pytest.raises(RuntimeError, match="simulated"):
        exporter.export_model(tiny_ckpt, tiny_pkg)
    assert (tiny_pkg / MANIFEST_NAME).read_bytes() == before
    verify_package(tiny_pkg)
    assert not [p for p in tiny_pkg.parent.iterdir() if p.name.startswith(".mmedge-staging")]


def test_an_external_data_package_builds_for_ort(
    tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Past the protobuf limit the ORT build keeps its weights in a `.data` file beside it too; a
    rebuild under the limit drops that file."""
    import mmedge.export.model_files as model_files
    from mmedge import sdk
    from mmedge.builds.package import build_package
    from mmedge.export.exporter import export_model

    limit = model_files.EXTERNAL_DATA_THRESHOLD
    monkeypatch.setattr(model_files, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "ext"
    export_model(tiny_ckpt, out)
    unbuilt = sdk.Pipeline(str(out)).embed_texts(["a red circle", "a blue star"])
    build_package(out)
    m = verify_package(out).manifest
    (engine,) = m.engines.values()
    assert {"vision.fp32", "text.fp32"} <= set(engine.files)
    for rel in engine.files.values():
        assert f"{rel}.data" in m.files and (out / f"{rel}.data").stat().st_size > 1000
    built = engine.files["text.fp32"]
    got = sdk.Pipeline(str(out)).embed_texts(["a red circle", "a blue star"])
    np.testing.assert_allclose(got, unbuilt, atol=1e-4)
    monkeypatch.setattr(model_files, "EXTERNAL_DATA_THRESHOLD", limit)
    build_package(out)
    assert f"{built}.data" not in verify_package(out).manifest.files and not (out / f"{built}.data").exists()


def test_external_data_package(tiny_ckpt: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Past the protobuf limit a graph's weights go to one external file, verified and loadable."""
    import mmedge.export.model_files as model_files
    from mmedge import sdk

    monkeypatch.setattr(model_files, "EXTERNAL_DATA_THRESHOLD", 1000)
    out = tmp_path / "ext"
    from mmedge.export.exporter import export_model

    export_model(tiny_ckpt, out)
    m = verify_package(out).manifest
    assert "onnx/vision.onnx.data" in m.files
    emb = sdk.Pipeline(str(out)).embed_texts(["a red circle"])
    assert emb.shape[0] == 1 and np.isclose(np.linalg.norm(emb), 1.0, atol=1e-5)
    # An external-data entry pointing outside its file is refused before any runtime sees it.
    model = onnx.load(str(out / "onnx" / "vision.onnx"), load_external_data=False)
    for t in model.graph.initializer:
        for e in t.external_data:
            if e.key == "offset":
                e.value = str(10**12)
                break
        else:
            continue
        break
    onnx.save_model(model, str(out / "onnx" / "vision.onnx"))
    raw = json.loads((out / MANIFEST_NAME).read_text())
    from mmedge.runtime.package import sha256_file

    f = out / "onnx" / "vision.onnx"
    raw["files"]["onnx/vision.onnx"] = {"sha256": sha256_file(f), "size": f.stat().st_size}
    (out / MANIFEST_NAME).write_text(json.dumps(raw))
    with pytest.raises(IntegrityError, match="points outside"):
        verify_package(out)
