"""Which ONNX opsets the installed ONNX Runtime implements: what package verification checks graphs against.

It lives apart from the ORT backend so that verifying a package depends on no backend.
"""

from __future__ import annotations

import functools


@functools.lru_cache(maxsize=1)
def max_supported_opset() -> int:
    """Highest default-domain opset the installed onnxruntime implements (from its release notes)."""
    import onnxruntime as ort

    major, minor = (int(x) for x in ort.__version__.split(".")[:2])
    # ORT has no API for this; the table follows the ORT compatibility page. Newer releases keep
    # the last known value, which only makes the check stricter.
    for (ma, mi), opset in (((1, 22), 23), ((1, 20), 21), ((1, 18), 21), ((1, 16), 19), ((1, 14), 18)):
        if (major, minor) >= (ma, mi):
            return opset
    return 17


# The operators a package's graphs may use: those mmedge's exporter, calibration and ORT builds
# produce (clip-tiny and blip2-tiny), plus the standard ops of transformer exports from Hugging
# Face models (convolutional stems, activations, norms). Anything else (Loop, Scan, sequences,
# random ops, custom domains, model-local functions) is refused at verification: an op that no
# build produces is an op an attacker chose.
ALLOWED_OPS: dict[str, frozenset[str]] = {
    "": frozenset(
        [
            "Abs",
            "Add",
            "And",
            "ArgMax",
            "ArgMin",
            "AveragePool",
            "BatchNormalization",
            "Cast",
            "CastLike",
            "Ceil",
            "Clip",
            "Concat",
            "Constant",
            "ConstantOfShape",
            "Conv",
            "Cos",
            "CumSum",
            "DequantizeLinear",
            "Div",
            "Dropout",
            "DynamicQuantizeLinear",
            "Einsum",
            "Elu",
            "Equal",
            "Erf",
            "Exp",
            "Expand",
            "Flatten",
            "Floor",
            "Gather",
            "GatherElements",
            "GatherND",
            "Gelu",
            "Gemm",
            "GlobalAveragePool",
            "Greater",
            "GreaterOrEqual",
            "GroupNormalization",
            "HardSigmoid",
            "HardSwish",
            "Identity",
            "If",
            "InstanceNormalization",
            "IsInf",
            "IsNaN",
            "LayerNormalization",
            "LeakyRelu",
            "Less",
            "LessOrEqual",
            "Log",
            "LogSoftmax",
            "MatMul",
            "MatMulInteger",
            "Max",
            "MaxPool",
            "Min",
            "Mod",
            "Mul",
            "Neg",
            "Not",
            "Or",
            "Pad",
            "Pow",
            "QuantizeLinear",
            "QLinearConv",  # ORT's fusion of an INT8 Conv with its Q/DQ pairs (U-Net, VAE builds)
            "Range",
            "Reciprocal",
            "ReduceL2",
            "ReduceMax",
            "ReduceMean",
            "ReduceMin",
            "ReduceProd",
            "ReduceSum",
            "ReduceSumSquare",
            "Relu",
            "Reshape",
            "Resize",
            "ScatterElements",
            "ScatterND",
            "Shape",
            "Sigmoid",
            "Sign",
            "SimplifiedLayerNormalization",
            "Sin",
            "Size",
            "Slice",
            "Softmax",
            "Softplus",
            "Split",
            "Sqrt",
            "Squeeze",
            "Sub",
            "Sum",
            "Tanh",
            "Tile",
            "TopK",
            "Transpose",
            "Trilu",
            "Unsqueeze",
            "Where",
            "Xor",
        ]
    ),
    "com.microsoft": frozenset(
        [
            "Attention",
            "BiasAdd",
            "BiasGelu",
            "BiasSoftmax",
            "DequantizeLinear",
            "DynamicQuantizeMatMul",
            "EmbedLayerNormalization",
            "FastGelu",
            "FusedConv",
            "FusedGemm",
            "FusedMatMul",
            "Gelu",
            "GemmFastGelu",
            "GroupQueryAttention",
            "MatMulIntegerToFloat",
            "MatMulNBits",
            "MultiHeadAttention",
            "QAttention",
            "QuantizeLinear",
            "QuickGelu",
            "RotaryEmbedding",
            "SimplifiedLayerNormalization",
            "SkipLayerNormalization",
            "SkipSimplifiedLayerNormalization",
        ]
    ),
    # ORT's CPU layout transformation for convolutions (saved in optimized builds)
    "com.microsoft.nchwc": frozenset(
        ["AveragePool", "Conv", "GlobalAveragePool", "MaxPool", "ReorderInput", "ReorderOutput", "Upsample"]
    ),
}
