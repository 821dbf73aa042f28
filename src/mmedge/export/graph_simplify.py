"""Standard-op simplifications of an exported graph: fewer nodes, the same values.

The TorchScript exporter writes every `x.view(b, s, heads, head_dim)` with dynamic b and s as
Shape -> Gather -> Unsqueeze -> Concat -> Reshape. A one-token LLM step then spends more time in
these ~10 tiny shape ops per reshape than in some of its matmuls (30-layer Llama: 2495 nodes, of
which about 900 only compute shapes). Symbolic shape inference (ONNX Runtime's) proves which
output dims equal the input's, so such a Reshape can take a constant shape instead: 0 copies the
input's dim, -1 is the single remaining one. Likewise `Gather(Shape(x), i)` of a dim that is fixed
(a KV cache's slot count) becomes a constant. The result is plain ONNX (TensorRT reads it as well).

One rewrite changes weights, exactly up to float rounding: CLIP's quick_gelu between two Linears,
fc2(h * sigmoid(1.702 h)) with h = fc1(x), is written as fc2'(h' * sigmoid(h')) with fc1' = 1.702 fc1
and fc2' = fc2 / 1.702. The exported fc1 and fc2 weights (and fc1's bias) are therefore those of
the checkpoint times 1.702 and 1 / 1.702. ONNX Runtime fuses the new pattern into QuickGelu with
alpha 1, which skips the kernel's extra pass over the tensor (ViT-B/32 int8: 1-6% faster); doing it
here rather than in the ORT build keeps every build bit-exact with the graph it was calibrated on.
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
    except Exception as exc:
        log.info("symbolic shape inference failed (%s); shapes left as exported", exc)
        return {}
    finally:
        noisy.setLevel(level)
    out: dict[str, list[int | str | None]] = {}
    for name, v in known.items():
        t = v.type.tensor_type
        if t.HasField("shape"):
            out[name] = [
                d.dim_param or (d.dim_value if d.HasField("dim_value") else None) for d in t.shape.dim
            ]
    return out


def simplify(model: Any) -> dict[str, int]:
    """Run the rewrites below on `model` in place (one shape inference for all); return counts."""
    from onnx import numpy_helper

    graph = model.graph
    consts: dict[str, np.ndarray] = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    for n in graph.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = numpy_helper.to_array(n.attribute[0].t)
        elif n.op_type == "Identity" and n.input[0] in consts:  # the exporter's alias of an equal weight
            consts[n.output[0]] = consts[n.input[0]]
    dims = _symbolic_dims(model)
    counts = {
        "static_reshapes": _static_reshapes(graph, consts, dims),
        "static_dims": _static_dims(graph, consts, dims),
        "quick_gelu_alpha": _fold_sigmoid_gate_scale(graph, consts),
    }
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
        if (
            node.op_type != "Reshape"
            or node.input[1] in consts
            or any(a.name == "allowzero" and a.i for a in node.attribute)
        ):
            continue
        src, dst = dims.get(node.input[0]), dims.get(node.output[0])
        if src is None or dst is None or None in src or None in dst:
            continue
        shape = [
            d if isinstance(d, int) else 0 if j < len(src) and src[j] == d else -1 for j, d in enumerate(dst)
        ]
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


def _fold_sigmoid_gate_scale(graph: Any, consts: dict[str, np.ndarray]) -> int:
    """`MatMul(h * sigmoid(a * h), W2)` with `h = MatMul(x, W1) + b` becomes
    `MatMul(h' * sigmoid(h'), W2 / a)` with `h' = MatMul(x, a W1) + a b` (the module docstring says
    why). Returns the count."""
    graph_outputs = {o.name for o in graph.output}
    inits, producer, consumers = graph_index(graph)
    names = set(inits)

    def weight(name: str | None) -> bool:
        return name in consts and consts[name].dtype == np.float32

    def users(name: str) -> list[Any]:
        return [] if name in graph_outputs else consumers.get(name, [])

    def other(node: Any, name: str) -> str | None:
        rest = [i for i in node.input if i != name]
        return rest[0] if len(node.input) == 2 and len(rest) == 1 else None

    def scale_weight(node: Any, idx: int, factor: float) -> None:
        name, new = node.input[idx], f"{node.input[idx]}__x{factor:.9g}"
        if new not in names:  # a weight two patterns share is scaled once
            names.add(_constant(graph, new, (consts[name] * np.float32(factor)).astype(np.float32)))
        node.input[idx] = new

    changed = 0
    for sig in [n for n in graph.node if n.op_type == "Sigmoid"]:
        scale_mul = producer.get(sig.input[0])
        if scale_mul is None or scale_mul.op_type != "Mul" or len(users(scale_mul.output[0])) != 1:
            continue
        h = next((i for i in scale_mul.input if other(scale_mul, i) in consts), None)
        alpha = consts[other(scale_mul, h)] if h is not None else None
        if alpha is None or alpha.size != 1 or alpha.dtype != np.float32 or not float(alpha.flat[0]) > 0:
            continue
        a = float(alpha.flat[0])
        gate = users(sig.output[0])
        if len(gate) != 1 or gate[0].op_type != "Mul" or other(gate[0], sig.output[0]) != h:
            continue
        if sorted(id(n) for n in users(h)) != sorted((id(scale_mul), id(gate[0]))):
            continue
        bias_add = producer.get(h)  # h = MatMul(x, W1) + b, both constant and float
        is_add = bias_add is not None and bias_add.op_type == "Add"
        b = next((i for i in bias_add.input if weight(i)), None) if is_add else None
        fc1 = producer.get(other(bias_add, b)) if b is not None else None
        if (
            fc1 is None
            or fc1.op_type != "MatMul"
            or len(users(fc1.output[0])) != 1
            or not weight(fc1.input[1])
        ):
            continue
        fc2s = users(gate[0].output[0])
        if not fc2s or any(
            n.op_type != "MatMul" or n.input[0] != gate[0].output[0] or not weight(n.input[1]) for n in fc2s
        ):
            continue
        scale_weight(fc1, 1, a)
        scale_weight(bias_add, list(bias_add.input).index(b), a)
        for fc2 in fc2s:
            scale_weight(fc2, 1, 1.0 / a)
        sig.input[0] = h  # the scaling Mul is left unread and dropped with the old weights
        changed += 1
    return changed


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
                for g in [a.g] if a.HasField("g") else list(a.graphs):
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


def node_attr(node: Any, key: str, default: Any = None) -> Any:
    """An ONNX node attribute's value, or `default`."""
    from onnx import helper

    return next((helper.get_attribute_value(a) for a in node.attribute if a.name == key), default)


class GraphIndex:
    """A graph's initializers, producers and consumers, and `only_user`: the one node reading a
    tensor when it is of type `op` and the tensor is not a graph output (what a fusion may rewrite)."""

    def __init__(self, graph: Any):
        self.graph = graph
        self.inits, self.producer, self.consumers = graph_index(graph)
        self.outputs = {o.name for o in graph.output}

    def only_user(self, name: str, op: str) -> Any:
        users = self.consumers.get(name, [])
        ok = len(users) == 1 and users[0].op_type == op and name not in self.outputs
        return users[0] if ok else None

    def attention_cores(self) -> list[tuple[Any, Any, Any]]:
        """(softmax, scores, mix) of every unmasked attention core ORT's optimizer leaves:
        FusedMatMul(q, k, alpha) -> Softmax(last axis) -> MatMul(probs, v), each feeding only the next."""
        out = []
        for softmax in [n for n in self.graph.node if n.op_type == "Softmax"]:
            scores = self.producer.get(softmax.input[0])
            if scores is None or scores.op_type != "FusedMatMul" or node_attr(softmax, "axis", -1) != -1:
                continue
            if any(node_attr(scores, k, 0) for k in ("transA", "transB", "transBatchA", "transBatchB")):
                continue
            mix = self.only_user(softmax.output[0], "MatMul")
            if mix is None or self.only_user(scores.output[0], "Softmax") is None:
                continue
            if mix.input[0] == softmax.output[0]:
                out.append((softmax, scores, mix))
        return out
