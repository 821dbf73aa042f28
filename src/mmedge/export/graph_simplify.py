"""Standard-op simplifications of an exported graph: fewer nodes, the same values.

The TorchScript exporter writes every `x.view(b, s, heads, head_dim)` with dynamic b and s as
Shape -> Gather -> Unsqueeze -> Concat -> Reshape. A one-token LLM step then spends more time in
these ~10 tiny shape ops per reshape than in some of its matmuls (30-layer Llama: 2495 nodes, of
which about 900 only compute shapes). Symbolic shape inference (ONNX Runtime's) proves which
output dims equal the input's, so such a Reshape can take a constant shape instead: 0 copies the
input's dim, -1 is the single remaining one. Likewise `Gather(Shape(x), i)` of a dim that is fixed
(a KV cache's slot count) becomes a constant. The result is plain ONNX (TensorRT reads it as well).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

log = logging.getLogger(__name__)


def _symbolic_dims(model: Any) -> dict[str, list[int | str | None]]:
    """Tensor dims (int, symbol or None) by ORT's symbolic shape inference; {} where it fails.

    Runs the inference loop directly: `SymbolicShapeInference.infer_shapes` raises on any op it
    cannot infer and first saves the half-inferred model into the working directory. Symbols are
    merged where a broadcast demands it (`auto_merge`): the step's mask is (B, total_sequence) and
    its scores (B, ., ., max_context + sequence), equal by the manifest's contract, not provably.
    Every export is checked against PyTorch afterwards, at the declared sizes.
    """
    from onnxruntime.tools.symbolic_shape_infer import SymbolicShapeInference

    noisy = logging.getLogger("onnxruntime.tools.symbolic_shape_infer")  # "cannot determine if ..." per merge
    level = noisy.level
    noisy.setLevel(logging.ERROR)
    try:
        inference = SymbolicShapeInference(2**31 - 1, True, False, 0)
        inference._preprocess(model)  # private loop: see the docstring
        while inference.run_:
            inference._infer_impl()
        known = inference.known_vi_
    except Exception as exc:  # noqa: BLE001 - an op it does not know: leave the graph as exported
        log.info("symbolic shape inference failed (%s); shapes left as exported", exc)
        return {}
    finally:
        noisy.setLevel(level)
    out: dict[str, list[int | str | None]] = {}
    for name, v in known.items():
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[name] = [d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim]
    return out


def simplify(model: Any) -> dict[str, int]:
    """Run the rewrites below on `model` in place (one shape inference for all); return counts."""
    from onnx import numpy_helper

    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
    dims = _symbolic_dims(model)
    counts = {"static_reshapes": _static_reshapes(graph, consts, dims), "static_dims": _static_dims(graph, consts, dims)}
    if any(counts.values()):
        counts["dead_nodes"] = remove_dead_nodes(model)
    return counts


def _constant(graph: Any, name: str, value: np.ndarray) -> str:
    from onnx import numpy_helper

    graph.initializer.append(numpy_helper.from_array(value, name))
    return name


def _static_reshapes(graph: Any, consts: dict[str, np.ndarray], dims: dict[str, list]) -> int:
    """Each Reshape with a computed shape gets a constant one (0 = keep the input's dim, one -1)
    where symbolic inference proves it equivalent."""
    changed = 0
    for node in graph.node:
        if node.op_type != "Reshape" or node.input[1] in consts or any(a.name == "allowzero" and a.i for a in node.attribute):
            continue
        src, dst = dims.get(node.input[0]), dims.get(node.output[0])
        if src is None or dst is None or None in src or None in dst:
            continue
        shape = [d if isinstance(d, int) else 0 if j < len(src) and src[j] == d else -1 for j, d in enumerate(dst)]
        if shape.count(-1) > 1:
            continue
        node.input[1] = _constant(graph, f"{node.output[0]}__static_shape", np.array(shape, np.int64))
        changed += 1
    return changed


def _static_dims(graph: Any, consts: dict[str, np.ndarray], dims: dict[str, list]) -> int:
    """`Gather(Shape(x), i)` of a dim that is fixed (a KV cache's slot count in a tensor whose batch
    is dynamic) becomes that constant; ORT only folds Shape when every dim is fixed."""
    shapes = {n.output[0]: n for n in graph.node if n.op_type == "Shape" and not n.attribute}
    changed = 0
    for node in graph.node:
        if node.op_type != "Gather" or node.input[0] not in shapes or node.input[1] not in consts:
            continue
        idx = consts[node.input[1]]
        src = dims.get(shapes[node.input[0]].input[0])
        if idx.ndim > 1 or src is None:
            continue
        picked = [src[int(i)] for i in np.atleast_1d(idx)]
        if not all(isinstance(d, int) for d in picked):
            continue
        value = np.array(picked if idx.ndim else picked[0], np.int64)
        name = _constant(graph, f"{node.output[0]}__static_dim", value)
        node.op_type, node.domain = "Identity", ""
        del node.input[:]
        node.input.append(name)
        del node.attribute[:]
        changed += 1
    return changed


def graph_index(graph: Any) -> tuple[dict[str, Any], dict[str, Any], dict[str, list[Any]]]:
    """(initializers by name, producing node by output name, consuming nodes by input name)."""
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    return {i.name: i for i in graph.initializer}, {o: n for n in graph.node for o in n.output}, consumers


def remove_dead_nodes(model: Any) -> int:
    """Drop nodes none of whose outputs reach a graph output (e.g. orphaned shape chains); return the count."""
    graph = model.graph
    live = {o.name for o in graph.output}
    alive = []
    for node in reversed(list(graph.node)):
        if any(o in live for o in node.output):
            alive.append(node)
            live.update(i for i in node.input if i)
            for a in node.attribute:  # names a subgraph reads from the outer scope stay live
                for g in ([a.g] if a.HasField("g") else list(a.graphs)):
                    live.update(i for n in g.node for i in n.input if i)
    removed = len(graph.node) - len(alive)
    if removed:
        del graph.node[:]
        graph.node.extend(reversed(alive))
    # Weights only dead nodes read, including those of nodes a pass already unlinked (e.g. the
    # separate q/k/v weights that QAttention merged: 21 MB of ViT-B/32's build). An initializer
    # that is also a graph input stays: dropping it would turn a default into a required input.
    live.update(i.name for i in graph.input)
    kept = [i for i in graph.initializer if i.name in live]
    if len(kept) != len(graph.initializer):
        del graph.initializer[:]
        graph.initializer.extend(kept)
    return removed
