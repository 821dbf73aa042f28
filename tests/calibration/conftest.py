"""A tiny two-block transformer (Linear, GELU, LayerNorm, softmax attention) exported to ONNX once."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("onnxruntime.quantization")

DIM, HEADS, TOKENS = 32, 4, 8


class _Block(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.ln1, self.ln2 = torch.nn.LayerNorm(DIM), torch.nn.LayerNorm(DIM)
        self.qkv, self.proj = torch.nn.Linear(DIM, 3 * DIM), torch.nn.Linear(DIM, DIM)
        self.fc1, self.fc2 = torch.nn.Linear(DIM, 4 * DIM), torch.nn.Linear(4 * DIM, DIM)

    def forward(self, x):  # (B, N, C)
        b, n, c = x.shape
        q, k, v = self.qkv(self.ln1(x)).reshape(b, n, 3, HEADS, c // HEADS).permute(2, 0, 3, 1, 4).unbind(0)
        att = torch.softmax(q @ k.transpose(-1, -2) / (c // HEADS) ** 0.5, dim=-1)  # (B, H, N, N)
        x = x + self.proj((att @ v).transpose(1, 2).reshape(b, n, c))
        return x + self.fc2(torch.nn.functional.gelu(self.fc1(self.ln2(x))))


class _Tiny(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = torch.nn.Linear(16, DIM)
        self.blocks = torch.nn.Sequential(_Block(), _Block())
        self.head = torch.nn.Linear(DIM, 8)

    def forward(self, x):  # (B, N, 16) -> (B, 8)
        return self.head(self.blocks(self.embed(x)).mean(dim=1))


def feeds(n: int, seed: int) -> list[dict[str, np.ndarray]]:
    rng = np.random.default_rng(seed)
    return [{"x": rng.normal(size=(1, TOKENS, 16)).astype(np.float32)} for _ in range(n)]


@pytest.fixture(scope="session")
def tiny_onnx(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.manual_seed(0)
    model = _Tiny().eval()
    path = tmp_path_factory.mktemp("tiny") / "tiny.onnx"
    torch.onnx.export(
        model,
        (torch.randn(1, TOKENS, 16),),
        str(path),
        dynamo=False,
        opset_version=17,
        input_names=["x"],
        output_names=["y"],
        dynamic_axes={"x": {0: "batch"}, "y": {0: "batch"}},
    )
    return path


@pytest.fixture(scope="session")
def calib_feeds() -> list[dict[str, np.ndarray]]:
    return feeds(32, 0)


@pytest.fixture(scope="session")
def eval_feeds() -> list[dict[str, np.ndarray]]:
    return feeds(8, 1)
