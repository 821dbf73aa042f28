"""Exact graph rewrites that let ONNX Runtime's CPU fusions reach a Q/DQ model's integer kernels.

Each pass edits an onnx.ModelProto in place, keeps the model's values (up to float rounding), and
returns how many sites it changed. `ort_build.optimize_for_ort` runs them around ORT's own optimizer.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmedge.export.graph_simplify import GraphIndex, node_attr, remove_dead_nodes


def activations_to_uint8(model: Any) -> int:
    """Rewrite int8 (zero point 0) activation Q/DQ pairs to uint8 (zero point 128) in place; return the count."""
    from onnx import TensorProto, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    q_nodes = [n for n in graph.node if n.op_type == "QuantizeLinear" and n.domain in ("", "ai.onnx")]
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    u8_zp: dict[tuple, str] = {}
    converted = 0
    for q in q_nodes:
        if q.input[0] in inits or len(q.input) < 3 or q.input[2] not in inits:
            continue
        zp = numpy_helper.to_array(inits[q.input[2]])
        if zp.dtype != np.int8 or zp.size != 1 or q.output[0] in graph_outputs:
            continue
        dqs = consumers.get(q.output[0], [])
        if not dqs or any(
            d.op_type != "DequantizeLinear"
            or len(d.input) < 3
            or d.input[2] not in inits
            or not np.array_equal(numpy_helper.to_array(inits[d.input[2]]), zp)
            for d in dqs
        ):
            continue
        key = (int(zp.reshape(-1)[0]), zp.shape)
        if key not in u8_zp:
            name = f"{q.input[2]}_u8"
            graph.initializer.append(
                numpy_helper.from_array((zp.astype(np.int16) + 128).astype(np.uint8), name)
            )
            u8_zp[key] = name
        for node in (q, *dqs):
            node.input[2] = u8_zp[key]
        converted += 1
        for vi in graph.value_info:  # the Q output changed element type
            if vi.name == q.output[0]:
                vi.type.tensor_type.elem_type = TensorProto.UINT8
    return converted


def gemms_to_matmuls(model: Any) -> int:
    """Rewrite `DQ(weight) -> Gemm` as `DQ(weight^T) -> MatMul -> Add` in place; return the count.

    ORT's CPU QDQ fusions turn a float-output `DQ -> MatMul` into MatMulIntegerToFloat but leave a
    float-output Gemm (2-D Linear with bias, e.g. a classifier head) dequantizing its weight per call.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    producer = {o: n for n in graph.node for o in n.output}
    users: dict[str, int] = {}
    for node in graph.node:
        for name in node.input:
            users[name] = users.get(name, 0) + 1
    count = 0
    for idx in range(len(graph.node)):
        node = graph.node[idx]
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
        if node.op_type != "Gemm" or attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0:
            continue
        if len(node.input) > 2 and node.input[2] and attrs.get("beta", 1.0) != 1.0:
            continue
        dq = producer.get(node.input[1])
        if (
            dq is None
            or dq.op_type != "DequantizeLinear"
            or dq.input[0] not in inits
            or users[dq.output[0]] != 1
        ):
            continue
        dq_axis = {a.name: helper.get_attribute_value(a) for a in dq.attribute}.get("axis", 1)
        if attrs.get("transB", 0):
            w = numpy_helper.to_array(inits[dq.input[0]])
            new_w = numpy_helper.from_array(np.ascontiguousarray(w.T), f"{dq.input[0]}_T")
            graph.initializer.append(new_w)
            dq.input[0] = new_w.name
            if numpy_helper.to_array(inits[dq.input[1]]).size > 1:  # per-channel: the channel axis moves
                del dq.attribute[:]
                dq.attribute.append(helper.make_attribute("axis", 1 - dq_axis))
        out = node.output[0]
        has_bias = len(node.input) > 2 and bool(node.input[2])
        mm_out = f"{out}_matmul" if has_bias else out
        new = [helper.make_node("MatMul", [node.input[0], node.input[1]], [mm_out], name=node.name)]
        if has_bias:
            new.append(helper.make_node("Add", [mm_out, node.input[2]], [out], name=f"{node.name}_bias"))
        graph.node.remove(node)
        for offset, n in enumerate(new):
            graph.node.insert(idx + offset, n)
        count += 1
    return count


def fuse_integer_matmul_bias(model: Any) -> int:
    """Fold `MatMulIntegerToFloat -> Add(const bias)` into the op's bias input in place; return the count.

    ORT's QDQ fusion leaves the bias as a separate Add; the kernel can add it in its output epilogue.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    consumers: dict[str, list[Any]] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    graph_outputs = {o.name for o in graph.output}
    dead = []
    for node in graph.node:
        if node.op_type != "MatMulIntegerToFloat" or node.domain != "com.microsoft":
            continue
        if len(node.input) > 6 and node.input[6]:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or node.output[0] in graph_outputs or users[0].op_type != "Add":
            continue
        add = users[0]
        bias = next((i for i in add.input if i != node.output[0]), None)
        b = inits.get(node.input[1])
        if bias not in inits or b is None or list(add.input).count(node.output[0]) != 1:
            continue
        bias_arr = numpy_helper.to_array(inits[bias])
        if bias_arr.dtype != np.float32 or bias_arr.ndim != 1 or bias_arr.shape[0] != b.dims[-1]:
            continue
        while len(node.input) < 6:
            node.input.append("")
        if len(node.input) == 6:
            node.input.append(bias)
        else:
            node.input[6] = bias
        node.output[0] = add.output[0]
        dead.append(add)
    for add in dead:
        graph.node.remove(add)
    return len(dead)


def shapes_skip_qdq(model: Any) -> int:
    """Point `Shape(DQ(Q(x)))` at `x` in place: same shape, no per-call dequantize; return the count.

    (Pointing `Shape(x)` at `Q(x)` instead would free more producers for fusion, but it hides the
    Shape->Gather->Reshape patterns ORT's reshape fusion looks for and the graph grows.)
    """
    producer = {o: n for n in model.graph.node for o in n.output}
    count = 0
    for node in model.graph.node:
        if node.op_type != "Shape" or node.domain not in ("", "ai.onnx"):
            continue
        dq = producer.get(node.input[0])
        q = producer.get(dq.input[0]) if dq is not None and dq.op_type == "DequantizeLinear" else None
        if q is not None and q.op_type == "QuantizeLinear":
            node.input[0] = q.input[0]
            count += 1
    return count


def fold_constant_dequantize(model: Any) -> int:
    """Replace each DequantizeLinear of a constant (a weight ORT did not fuse) by its float value.

    Such a DQ feeds a float kernel (e.g. a Conv without a quantized output) and would otherwise
    dequantize the whole weight on every call. Returns the number folded.
    """
    from onnx import numpy_helper

    graph = model.graph
    inits = {i.name: i for i in graph.initializer}
    folded = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or not all(i in inits for i in node.input if i):
            continue
        x = numpy_helper.to_array(inits[node.input[0]]).astype(np.float32)
        scale = numpy_helper.to_array(inits[node.input[1]]).astype(np.float32)
        zp = (
            numpy_helper.to_array(inits[node.input[2]]).astype(np.float32)
            if len(node.input) > 2 and node.input[2]
            else np.zeros_like(scale)
        )
        axis = next((a.i for a in node.attribute if a.name == "axis"), 1)
        if scale.ndim == 1 and scale.size > 1:
            shape = [1] * x.ndim
            shape[axis % x.ndim] = scale.size
            scale, zp = scale.reshape(shape), zp.reshape(shape)
        elif scale.ndim > 1 or any(a.name == "block_size" and a.i for a in node.attribute):
            continue  # blocked quantization: leave it to ORT
        graph.initializer.append(
            numpy_helper.from_array(((x - zp) * scale).astype(np.float32), node.output[0])
        )
        folded.append(node)
    for node in folded:
        graph.node.remove(node)
    return len(folded)


def attention_to_qattention(model: Any) -> int:
    """Replace unmasked self-attention over integer q/k/v projections by com.microsoft.QAttention.

    Matches, after ORT's optimizer and `fuse_integer_matmul_bias`:
        q/k/v = MatMulIntegerToFloat(x_u8, W, ..., bias)   (one shared quantized input)
        -> Reshape -> Transpose (q, v: 0,2,1,3; k: 0,2,3,1) -> FusedMatMul(alpha = 1/sqrt(d))
        -> Softmax -> MatMul(., v) -> QuantizeLinear -> Transpose(0,2,1,3) -> Reshape
    and writes QAttention(x_u8, [Wq|Wk|Wv], [bq|bk|bv]) -> QuantizeLinear. One int8 GEMM with three
    times the columns replaces three, and the head split, transposes and softmax run inside one
    kernel: ~10% of ViT-B/32's int8 latency. The int8 arithmetic is unchanged; `build` checks
    the built graph against its source. Returns the number of attention blocks replaced.
    """
    from onnx import helper, numpy_helper

    graph = model.graph
    index = GraphIndex(graph)
    inits, producer, only_user, attr = index.inits, index.producer, index.only_user, node_attr

    def projection(name: str, perm: list[int]) -> tuple[Any, ...] | None:
        tr = producer.get(name)
        if tr is None or tr.op_type != "Transpose" or list(attr(tr, "perm", [])) != perm:
            return None
        rs = producer.get(tr.input[0])
        mm = producer.get(rs.input[0]) if rs is not None and rs.op_type == "Reshape" else None
        if mm is None or mm.op_type != "MatMulIntegerToFloat" or len(mm.input) < 7 or not mm.input[6]:
            return None
        if not all(mm.input[i] in inits for i in (1, 2, 3, 6)) or (mm.input[4] and mm.input[4] not in inits):
            return None
        if mm.input[5] and (mm.input[5] not in inits or numpy_helper.to_array(inits[mm.input[5]]).any()):
            return None  # QAttention takes no per-column weight zero points; ours are symmetric
        if any(only_user(t.output[0], op) is None for t, op in ((mm, "Reshape"), (rs, "Transpose"))):
            return None
        return mm, rs, tr

    replaced, dead = 0, set()
    for softmax, scores, mix in index.attention_cores():
        parts = [
            projection(scores.input[0], [0, 2, 1, 3]),
            projection(scores.input[1], [0, 2, 3, 1]),
            projection(mix.input[1], [0, 2, 1, 3]),
        ]
        if any(p is None for p in parts):
            continue
        mms = [p[0] for p in parts]  # type: ignore[index]
        if len({(m.input[0], m.input[2], m.input[4]) for m in mms}) != 1:
            continue
        quant = only_user(mix.output[0], "QuantizeLinear")
        back = only_user(quant.output[0], "Transpose") if quant is not None else None
        merge = only_user(back.output[0], "Reshape") if back is not None else None
        if merge is None or list(attr(back, "perm", [])) != [0, 2, 1, 3]:
            continue
        weights = [numpy_helper.to_array(inits[m.input[1]]) for m in mms]
        width = weights[0].shape[0]
        if any(w.ndim != 2 or w.shape != (width, width) or w.dtype != np.int8 for w in weights):
            continue
        alpha = float(attr(scores, "alpha", 1.0))
        head_dim = round(alpha**-2) if alpha > 0 else 0
        if head_dim < 1 or width % head_dim or abs(alpha - head_dim**-0.5) > 1e-6 * alpha:
            continue  # QAttention scales by 1/sqrt(head_dim); anything else is not this pattern
        scales = [
            np.broadcast_to(numpy_helper.to_array(inits[m.input[3]]).astype(np.float32), (width,))
            for m in mms
        ]
        biases = [numpy_helper.to_array(inits[m.input[6]]).astype(np.float32) for m in mms]
        stem = f"{softmax.name or softmax.output[0]}_qattention"
        graph.initializer.extend(
            [
                numpy_helper.from_array(np.concatenate(weights, axis=1), f"{stem}_weight"),
                numpy_helper.from_array(np.concatenate(biases), f"{stem}_bias"),
                numpy_helper.from_array(np.concatenate(scales), f"{stem}_weight_scale"),
            ]
        )
        x = mms[0]
        new = [
            helper.make_node(
                "QAttention",
                [
                    x.input[0],
                    f"{stem}_weight",
                    f"{stem}_bias",
                    x.input[2],
                    f"{stem}_weight_scale",
                    "",
                    x.input[4],
                ],
                [f"{stem}_out"],
                name=stem,
                domain="com.microsoft",
                num_heads=width // head_dim,
            ),
            helper.make_node(
                "QuantizeLinear",
                [f"{stem}_out", *quant.input[1:]],
                [merge.output[0]],
                name=f"{stem}_quantize",
            ),
        ]
        at = list(graph.node).index(quant)
        for offset, node in enumerate(new):
            graph.node.insert(at + offset, node)
        dead.update(id(n) for n in (scores, softmax, mix, quant, back, merge))
        dead.update(id(n) for p in parts for n in p)  # type: ignore[union-attr]
        replaced += 1
    if dead:
        kept = [n for n in graph.node if id(n) not in dead]
        del graph.node[:]
        graph.node.extend(kept)
        remove_dead_nodes(model)
    return replaced
