"""Per-node quantization sensitivity from one ORT run: each node's error with only its own inputs quantized.

For every quantized node X of a Q/DQ model, the fp32 graph gets a twin X' whose inputs pass through
copies of X's Q/DQ chains (same scales, same int8 weights). Both outputs are exposed, so one pass over
a few feeds gives every node's local noise-to-signal ratio ||X' - X||^2 / ||X||^2 with fp32 inputs,
i.e. the error that node adds by itself. This costs about two fp32 inferences per feed however many
nodes there are, where "quantize everything but X" would cost one quantization and evaluation per node.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

_QDQ = ("QuantizeLinear", "DequantizeLinear")


def add_quantized_twins(fp32: Any, qdq: Any, nodes: Sequence[str]) -> tuple[Any, dict[str, tuple[str, str]]]:
    """Return the fp32 model plus a Q/DQ twin of each node, and node -> (fp32 output, twin output)."""
    import onnx
    from onnx import helper

    model = onnx.ModelProto()
    model.CopyFrom(fp32)
    g = model.graph
    have_init = {i.name for i in g.initializer}
    q_inits = {i.name: i for i in qdq.graph.initializer}
    producer = {o: n for n in qdq.graph.node for o in n.output}
    by_name = {n.name: n for n in qdq.graph.node}
    fp32_names = {n.name for n in g.node}
    pairs: dict[str, tuple[str, str]] = {}

    def need_init(name: str) -> None:
        if name and name not in have_init and name in q_inits:
            g.initializer.append(q_inits[name])
            have_init.add(name)

    def twin_of(tensor: str, tag: str) -> str:
        # Rebuild the Q/DQ chain feeding `tensor` in the Q/DQ model, rooted at fp32 tensors.
        node = producer.get(tensor)
        if node is None or node.op_type not in _QDQ:
            return tensor
        src = twin_of(node.input[0], tag)
        for name in node.input[1:]:
            need_init(name)
        if node.input[0] in q_inits:
            need_init(node.input[0])
            src = node.input[0]
        out = f"{tensor}__twin_{tag}"
        g.node.append(
            helper.make_node(
                node.op_type,
                [src, *node.input[1:]],
                [out],
                name=f"{node.name}__twin_{tag}",
                domain=node.domain,
                **{a.name: helper.get_attribute_value(a) for a in node.attribute},
            )
        )
        return out

    for k, name in enumerate(nodes):
        qnode = by_name.get(name)
        if qnode is None or name not in fp32_names:
            continue
        tag = str(k)
        inputs = [twin_of(t, tag) if t else t for t in qnode.input]
        out = f"{qnode.output[0]}__twin_{tag}"
        g.node.append(
            helper.make_node(
                qnode.op_type,
                inputs,
                [out, *[f"{o}__twin_{tag}" for o in qnode.output[1:]]],
                name=f"{name}__twin",
                domain=qnode.domain,
                **{a.name: helper.get_attribute_value(a) for a in qnode.attribute},
            )
        )
        pairs[name] = (qnode.output[0], out)
    outputs = {o.name for o in g.output}
    for ref, twin in pairs.values():
        for t in (ref, twin):
            if t not in outputs:
                g.output.append(helper.make_empty_tensor_value_info(t))
                outputs.add(t)
    return model, pairs


def node_sensitivity(
    fp32: Any,
    qdq: Any,
    nodes: Sequence[str],
    feeds: Sequence[Mapping[str, np.ndarray]],
    threads: int = 2,
) -> dict[str, float]:
    """Local noise-to-signal ratio of each quantized node (higher = keep in float first)."""
    from mmedge.builds.sessions import ort_session

    model, pairs = add_quantized_twins(fp32, qdq, nodes)
    fix_outputs_types(model, fp32)
    sess = ort_session(model, threads)
    names = sorted({t for pair in pairs.values() for t in pair})
    err = dict.fromkeys(pairs, 0.0)
    sig = dict.fromkeys(pairs, 0.0)
    for feed in feeds:
        values = dict(zip(names, sess.run(names, dict(feed))))
        for node, (ref, twin) in pairs.items():
            r = values[ref].astype(np.float64)
            err[node] += float(np.sum((values[twin].astype(np.float64) - r) ** 2))
            sig[node] += float(np.sum(r * r))
    return {n: err[n] / sig[n] if sig[n] > 0 else (0.0 if err[n] == 0 else float("inf")) for n in pairs}


def fix_outputs_types(model: Any, fp32: Any) -> None:
    """Give the added graph outputs an element type (ORT needs one); twins copy their source's type."""
    import onnx
    from onnx import TensorProto

    known: dict[str, int] = {}
    inferred = onnx.shape_inference.infer_shapes(fp32, strict_mode=False)
    for vi in (*inferred.graph.value_info, *inferred.graph.output, *inferred.graph.input):
        if vi.type.tensor_type.elem_type:
            known[vi.name] = vi.type.tensor_type.elem_type
    for out in model.graph.output:
        if not out.type.tensor_type.elem_type:
            base = out.name.split("__twin_")[0]
            out.type.tensor_type.elem_type = known.get(out.name, known.get(base, TensorProto.FLOAT))
