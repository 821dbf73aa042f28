"""export.graph_simplify: constant reshape shapes, fixed dims and the quick_gelu fold, checked against PyTorch."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
ort = pytest.importorskip("onnxruntime")
onnx = pytest.importorskip("onnx")


class _Heads(torch.nn.Module):
    """Splits heads with dims read from the input (dynamic b, s) and slices a cache at its fixed size."""

    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(32, 32)

    def forward(self, x: torch.Tensor, cache: torch.Tensor) -> torch.Tensor:
        b, s, _ = x.shape
        q = self.proj(x).view(b, s, 4, 8).transpose(1, 2)  # (B, 4, S, 8)
        scores = q.reshape(b, 2, 2 * s, 8) @ cache.transpose(-1, -2)  # (B, 2, 2S, T)
        t = cache.shape[2]
        return scores[..., : t // 2].reshape(b, 4, s, -1).transpose(1, 2).reshape(b, s, -1)


def _export(tmp_path: Path) -> tuple[torch.nn.Module, object]:
    torch.manual_seed(0)
    model = _Heads().eval()
    path = tmp_path / "m.onnx"
    with torch.inference_mode():
        torch.onnx.export(
            model,
            (torch.randn(2, 3, 32), torch.randn(2, 2, 6, 8)),
            str(path),
            dynamo=False,
            input_names=["x", "cache"],
            output_names=["y"],
            opset_version=17,
            dynamic_axes={
                "x": {0: "batch", 1: "sequence"},
                "cache": {0: "batch"},
                "y": {0: "batch", 1: "sequence"},
            },
        )
    return model, onnx.load(str(path))


def _run(proto: object, x: np.ndarray, cache: np.ndarray) -> np.ndarray:
    sess = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"])
    return sess.run(None, {"x": x, "cache": cache})[0]


def test_shape_arithmetic_removed_and_values_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from mmedge.export.graph_simplify import simplify

    model, proto = _export(tmp_path)
    before = [n.op_type for n in proto.graph.node]
    work = tmp_path / "cwd"
    work.mkdir()
    monkeypatch.chdir(work)
    counts = simplify(proto)
    assert os.listdir(work) == []  # shape inference leaves nothing behind in the working directory
    after = [n.op_type for n in proto.graph.node]
    assert counts["static_reshapes"] == 4 and counts["static_dims"] >= 1
    assert before.count("Shape") >= 2 and after.count("Shape") == 0
    assert all(i.name not in {n.output[0] for n in proto.graph.node} for i in proto.graph.initializer)
    onnx.checker.check_model(proto)
    rng = np.random.default_rng(1)
    for b, s in ((1, 1), (2, 3), (3, 7)):  # sizes other than the export's own
        x, cache = rng.standard_normal((b, s, 32), np.float32), rng.standard_normal((b, 2, 6, 8), np.float32)
        with torch.inference_mode():
            ref = model(torch.from_numpy(x), torch.from_numpy(cache)).numpy()
        np.testing.assert_allclose(_run(proto, x, cache), ref, rtol=1e-5, atol=1e-5)


def test_unprovable_reshape_is_left_alone(tmp_path: Path) -> None:
    from mmedge.export.graph_simplify import simplify

    class Flatten2(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            b, s, c = x.shape
            return x.reshape(b * s, c).reshape(-1, b * c)  # two dims computed from inputs: no single -1

    path = tmp_path / "f.onnx"
    torch.onnx.export(
        Flatten2(),
        (torch.randn(2, 3, 4),),
        str(path),
        dynamo=False,
        input_names=["x"],
        output_names=["y"],
        opset_version=17,
        dynamic_axes={"x": {0: "b", 1: "s"}},
    )
    proto = onnx.load(str(path))
    simplify(proto)
    x = np.random.default_rng(0).standard_normal((3, 5, 4), np.float32)
    y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )[0]
    np.testing.assert_array_equal(y, x.reshape(15, 4).reshape(-1, 12))


class _Mlp(torch.nn.Module):
    """Two CLIP MLPs: fc2(quick_gelu(fc1(x))). Their fc1 biases are equal (zero, as at init), which the
    exporter writes as one weight and an Identity; `tap` also returns an fc1 output (a third reader)."""

    def __init__(self, tap: bool = False, alpha: float = 1.702) -> None:
        super().__init__()
        self.fc1 = torch.nn.ModuleList(torch.nn.Linear(32, 128) for _ in range(2))
        self.fc2 = torch.nn.ModuleList(torch.nn.Linear(128, 32) for _ in range(2))
        for fc in self.fc1:
            torch.nn.init.zeros_(fc.bias)
        self.tap, self.alpha = tap, alpha

    def forward(self, x: torch.Tensor):
        for fc1, fc2 in zip(self.fc1, self.fc2):
            h = fc1(x)
            x = x + fc2(h * torch.sigmoid(self.alpha * h) if self.alpha != 1 else h * torch.sigmoid(h))
        return (x, h) if self.tap else x


def _export_mlp(tmp_path: Path, model: torch.nn.Module) -> object:
    path = tmp_path / "mlp.onnx"
    outputs = ["y", "h"] if getattr(model, "tap", False) else ["y"]
    with torch.inference_mode():
        torch.onnx.export(
            model,
            (torch.randn(2, 5, 32),),
            str(path),
            dynamo=False,
            input_names=["x"],
            output_names=outputs,
            opset_version=17,
            dynamic_axes={"x": {0: "b", 1: "s"}},
        )
    return onnx.load(str(path))


def test_quick_gelu_scale_moves_into_the_linears(tmp_path: Path) -> None:
    from mmedge.export.graph_simplify import simplify

    torch.manual_seed(0)
    model = _Mlp().eval()
    proto = _export_mlp(tmp_path, model)
    ops = [n.op_type for n in proto.graph.node]
    assert "Identity" in ops  # the shared zero bias
    assert simplify(proto)["quick_gelu_alpha"] == 2
    assert [n.op_type for n in proto.graph.node].count("Mul") == ops.count("Mul") - 2
    onnx.checker.check_model(proto)
    assert not {i.name for i in proto.graph.initializer} - {i for n in proto.graph.node for i in n.input}
    rng = np.random.default_rng(2)
    for b, s in ((1, 1), (3, 50)):
        x = rng.standard_normal((b, s, 32), np.float32) * 3
        with torch.inference_mode():
            ref = model(torch.from_numpy(x)).numpy()
        y = ort.InferenceSession(proto.SerializeToString(), providers=["CPUExecutionProvider"]).run(
            None, {"x": x}
        )[0]
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
    # the point of the rewrite: ORT now fuses a QuickGelu whose kernel skips its alpha pass
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED
    so.optimized_model_filepath = str(tmp_path / "opt.onnx")
    ort.InferenceSession(proto.SerializeToString(), so, providers=["CPUExecutionProvider"])
    gelus = [n for n in onnx.load(so.optimized_model_filepath).graph.node if n.op_type == "QuickGelu"]
    assert [onnx.helper.get_attribute_value(a) for n in gelus for a in n.attribute if a.name == "alpha"] == [
        1.0,
        1.0,
    ]


@pytest.mark.parametrize("model", [_Mlp(tap=True), _Mlp(alpha=1.0)], ids=["h-read-elsewhere", "silu"])
def test_quick_gelu_rewrite_leaves_other_patterns_alone(tmp_path: Path, model: torch.nn.Module) -> None:
    from mmedge.export.graph_simplify import simplify

    proto = _export_mlp(tmp_path, model.eval())
    sigmoid_inputs = [n.input[0] for n in proto.graph.node if n.op_type == "Sigmoid"]
    # "h-read-elsewhere": only the first block, whose fc1 output is not a graph output, is rewritten
    assert simplify(proto)["quick_gelu_alpha"] == (1 if model.tap else 0)
    assert [n.input[0] for n in proto.graph.node if n.op_type == "Sigmoid"][-1] == sigmoid_inputs[-1]
