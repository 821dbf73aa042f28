"""ORT build pass: unmasked self-attention over one packed q|k|v projection -> com.microsoft.MultiHeadAttention.

A ViT whose attention projects q, k and v with one matmul (BLIP's `qkv`) leaves ORT's optimizer with

    qkv (B, S, 3C) -> Reshape (B, S, 3, H, D) -> Split (axis 2) -> Squeeze / Transpose per part
    -> FusedMatMul(q, k^T, alpha) -> Softmax -> MatMul(., v) [-> QuantizeLinear] -> Transpose -> Reshape

which runs as separate kernels that write the whole (B, H, S, S) score tensor and read it back twice
(softmax, then the value matmul): 16 MB per layer for 577 tokens and 12 heads. The rewrite is

    qkv -> Split (last axis, three C-wide parts) -> MultiHeadAttention(q, k, v, scale = alpha) [-> QuantizeLinear]

one kernel for the same softmax(alpha q k^T) v, without the head transposes. On BLIP-base's INT8
ViT (577 tokens, 2 threads) the attention's node time was about the same on an idle machine and a
quarter lower while other processes ran (benchmarks/RESULTS.md, BLIP-base-sized captioning). The
projections are untouched (integer GEMMs in a Q/DQ build), and so is the QuantizeLinear of the
attention output: it is element-wise, so it commutes with the head transposes it followed. The
kernel's float summation order differs; `build` checks the built graph against its source
(`builds.checks`).
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmedge.export.graph_simplify import GraphIndex, graph_index, node_attr, remove_dead_nodes


def packed_attention_to_mha(model: Any) -> int:
    """Rewrite each matched attention block (module docstring) in place; return how many."""
    from onnx import helper, numpy_helper

    graph = model.graph
    index = GraphIndex(graph)
    inits, only_user = index.inits, index.only_user
    replaced, dead = 0, set()
    for softmax, scores, mix in index.attention_cores():
        packed = packed_projections(graph, (scores.input[0], scores.input[1], mix.input[1]))
        if packed is None:
            continue
        qkv, chain, heads, head_dim = packed
        quant = only_user(mix.output[0], "QuantizeLinear")
        back = only_user((quant or mix).output[0], "Transpose")
        merge = only_user(back.output[0], "Reshape") if back is not None else None
        if merge is None or list(node_attr(back, "perm", [])) != [0, 2, 1, 3]:
            continue
        shape = numpy_helper.to_array(inits[merge.input[1]]) if merge.input[1] in inits else None
        if shape is None or shape.shape != (3,) or int(shape[2]) not in (-1, heads * head_dim):
            continue  # the merge must give (B, S, C), what MultiHeadAttention returns
        stem = f"{softmax.name or softmax.output[0]}_mha"
        graph.initializer.append(
            numpy_helper.from_array(np.full(3, heads * head_dim, np.int64), f"{stem}_split")
        )
        parts = [f"{stem}_{p}" for p in "qkv"]
        attended = merge.output[0] if quant is None else f"{stem}_out"
        new = [
            helper.make_node("Split", [qkv, f"{stem}_split"], parts, name=f"{stem}_split", axis=-1),
            helper.make_node(
                "MultiHeadAttention",
                parts,
                [attended],
                name=stem,
                domain="com.microsoft",
                num_heads=heads,
                scale=float(node_attr(scores, "alpha", 1.0)),
            ),
        ]
        if quant is not None:
            new.append(
                helper.make_node(
                    "QuantizeLinear", [attended, *quant.input[1:]], [merge.output[0]], name=f"{stem}_quantize"
                )
            )
        at = list(graph.node).index(mix)
        for offset, node in enumerate(new):
            graph.node.insert(at + offset, node)
        dead.update(id(n) for n in (scores, softmax, mix, back, merge, *chain, *([quant] if quant else [])))
        replaced += 1
    if dead:
        kept = [n for n in graph.node if id(n) not in dead]
        del graph.node[:]
        graph.node.extend(kept)
        if not any(op.domain == "com.microsoft" for op in model.opset_import):
            model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
        remove_dead_nodes(model)
    return replaced


def packed_projections(graph: Any, names: tuple[str, str, str]) -> tuple[str, list[Any], int, int] | None:
    """Where an attention's q (B, H, S, D), k^T (B, H, D, S) and v (B, H, S, D) inputs `names` come
    from one packed projection: (the packed (B, S, 3C) tensor, the Reshape, Split and per-part
    nodes between, H, D), or None.

    Each part's Transpose / Squeeze chain is followed axis by axis (batch, sequence, part, head,
    dim), so any order of them that yields the wanted layout matches (ORT moves the transposes
    around the squeezes) and no other does."""
    from onnx import numpy_helper

    inits, producer, consumers = graph_index(graph)
    graph_outputs = {o.name for o in graph.output}

    def single(name: str) -> bool:
        return len(consumers.get(name, [])) == 1 and name not in graph_outputs

    def const(node: Any, index: int, key: str) -> list[int] | None:
        if len(node.input) > index and node.input[index]:
            if node.input[index] not in inits:
                return None
            return [int(v) for v in numpy_helper.to_array(inits[node.input[index]]).reshape(-1)]
        value = node_attr(node, key)
        return None if value is None else [int(v) for v in value]

    chains, split = [], None
    for name in names:
        if not single(name):
            return None
        chain, node = [], producer.get(name)
        while node is not None and node.op_type in ("Transpose", "Squeeze") and len(chain) < 4:
            chain.append(node)
            if not single(node.input[0]):
                return None
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Split" or (split is not None and node is not split) or not chain:
            return None
        split = node
        chains.append(chain[::-1])
    assert split is not None
    reshape = producer.get(split.input[0])
    if reshape is None or reshape.op_type != "Reshape" or not single(split.input[0]):
        return None
    shape = const(reshape, 1, "shape")
    if shape is None or len(shape) != 5 or shape[2] != 3 or min(shape[3:]) < 1:
        return None
    if int(node_attr(split, "axis", 0)) % 5 != 2 or const(split, 1, "split") not in (None, [1, 1, 1]):
        return None
    if len(split.output) != 3 or not all(single(o) for o in split.output):
        return None
    wanted = (["b", "h", "s", "d"], ["b", "h", "d", "s"], ["b", "h", "s", "d"])
    for part, (chain, want) in enumerate(zip(chains, wanted)):
        if chain[0].input[0] != split.output[part]:
            return None
        axes = ["b", "s", "p", "h", "d"]
        for node in chain:
            if node.op_type == "Transpose":
                perm = node_attr(node, "perm")
                if perm is None or sorted(perm) != list(range(len(axes))):
                    return None
                axes = [axes[i] for i in perm]
            else:
                drop = const(node, 1, "axes")
                if drop is None or [axes[i % len(axes)] for i in drop] != ["p"]:
                    return None  # only the split's part axis (size 1) may be squeezed
                axes = [a for a in axes if a != "p"]
        if axes != want:
            return None
    return reshape.input[0], [reshape, split, *(n for c in chains for n in c)], shape[3], shape[4]
