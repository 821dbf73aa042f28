"""ORT build of a decoder step: each layer's attention becomes one com.microsoft.GroupQueryAttention
that reads and writes the KV cache in place.

The exported step (`models.decoder`) is standard ONNX: it takes the whole fixed-size cache and
returns only the new tokens' keys/values, which the runtime writes into its buffers. On ORT's CPU
that costs ~25 small nodes per layer (rotary, two score matmuls, mask, softmax, head reshapes). The
rewrite matches, per layer i,

    X (packed q|k|v, (B, S, (H + 2Hkv) * D)) -> Reshape -> Transpose -> Split -> ... present.i.*
    past_key_values.i.value -> MatMul -> Add -> Reshape -> Transpose -> Reshape -> attention output

and writes GroupQueryAttention(X, past_key, past_value, seqlens_k, total_sequence_length, cos, sin)
with the rotary tables of the manifest's `llm.rope_theta` (when set) and scale 1 (the export already
folded 1/sqrt(D) into q). The step's contract changes: `present.i.*` are now the whole cache,
(B, Hkv, max_context, D), and when a caller binds them to the same buffers as `past_key_values.i.*`
GroupQueryAttention writes the new entries into the next free slots itself (slot = position, as
the runtime fills its cache; B = 1 or left-aligned rows). The engine table's settings record
`kv_cache` for readers, but the runtime does not read them: `runtime.generation.LanguageModel` takes
the in-place path when the loaded step's `output_shapes` give `present.*` all `max_context` slots
and its `binding()` returns a persistent binding (buffers bound once, reused across runs); otherwise
the portable contract applies (design: docs/generation.md).
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np

from mmedge.export.graph_simplify import graph_index, remove_dead_nodes
from mmedge.runtime.sections import LLMConfig

log = logging.getLogger(__name__)

IN_PLACE = "in-place"
GQA_HEAD_MULTIPLE = 16  # ORT's GroupQueryAttention takes head sizes that are multiples of 16 only


def rotary_tables(max_context: int, head_dim: int, theta: float) -> tuple[np.ndarray, np.ndarray]:
    """cos/sin caches (max_context, D/2), computed as `LlamaForCausalLM.positions` does (float32)."""
    inv = (1.0 / theta ** (np.arange(0, head_dim, 2, dtype=np.float32) / head_dim)).astype(np.float32)
    angles = np.arange(max_context, dtype=np.float32)[:, None] * inv[None]
    return np.cos(angles).astype(np.float32), np.sin(angles).astype(np.float32)


def decoder_attention_to_gqa(model: Any, llm: LLMConfig) -> int:
    """Rewrite every layer's attention of an exported decoder step (see the module docstring) in
    place; return the number of layers rewritten: all of them, or 0 with the graph untouched."""
    from onnx import TensorProto, helper, numpy_helper

    graph = model.graph
    layers, hkv, d, t = llm.layers, llm.kv_heads, llm.head_dim, llm.max_context
    if d % GQA_HEAD_MULTIPLE:  # the kernel refuses such heads at run time ("head_size shall be ...")
        log.info("head_dim %d is not a multiple of %d; no GroupQueryAttention", d, GQA_HEAD_MULTIPLE)
        return 0
    inits, producer, consumers = graph_index(graph)

    def chain(start: str, ops: tuple[str, ...]) -> Any:
        """Follow single consumers from `start` through `ops`; the last node, or None."""
        node, name = None, start
        for op in ops:
            users = consumers.get(name, [])
            if len(users) != 1 or users[0].op_type != op:
                return None
            node, name = users[0], users[0].output[0]
        return node

    def head_split(name: str) -> Any:
        """The Reshape (B, S, (H + 2Hkv) * D) -> (B, S, H + 2Hkv, D) that `name` comes from through
        Split/Transpose nodes (ORT may move the head transpose past the split)."""
        node = producer.get(name)
        for _ in range(4):
            if node is None or node.op_type not in ("Split", "Transpose"):
                break
            node = producer.get(node.input[0])
        if node is None or node.op_type != "Reshape" or node.input[1] not in inits:
            return None
        shape = numpy_helper.to_array(inits[node.input[1]])
        ok = shape.shape == (4,) and int(shape[3]) == d and int(shape[2]) > 2 * hkv
        return node if ok else None

    sites = []
    for i in range(layers):
        rs = head_split(f"present.{i}.value")
        out = chain(f"past_key_values.{i}.value", ("MatMul", "Add", "Reshape", "Transpose", "Reshape"))
        key = producer.get(f"present.{i}.key")
        if rs is None or out is None or key is None or key.op_type != "Split":
            log.info("layer %d does not match the exported attention pattern; no GroupQueryAttention", i)
            return 0
        heads = int(numpy_helper.to_array(inits[rs.input[1]])[2]) - 2 * hkv
        sites.append((i, rs.input[0], out, heads))

    mask = "attention_mask"
    pre = [
        helper.make_node(
            "ReduceSum", [mask, "gqa_axis1"], ["gqa_total_per_row"], keepdims=0, name="gqa_total_per_row"
        ),
        helper.make_node("Sub", ["gqa_total_per_row", "gqa_one"], ["gqa_seqlens_i64"], name="gqa_seqlens"),
        helper.make_node(
            "Cast", ["gqa_seqlens_i64"], ["gqa_seqlens_k"], to=TensorProto.INT32, name="gqa_seqlens_k"
        ),
        helper.make_node("ReduceMax", ["gqa_total_per_row"], ["gqa_total_i64"], keepdims=0, name="gqa_total"),
        helper.make_node(
            "Cast", ["gqa_total_i64"], ["gqa_total_len"], to=TensorProto.INT32, name="gqa_total_len"
        ),
    ]
    graph.initializer.extend(
        [
            numpy_helper.from_array(np.array([1], np.int64), "gqa_axis1"),
            numpy_helper.from_array(np.array(1, np.int64), "gqa_one"),
        ]
    )
    rotary = llm.rope_theta is not None
    if llm.rope_theta is not None:
        cos, sin = rotary_tables(t, d, llm.rope_theta)
        graph.initializer.extend(
            [numpy_helper.from_array(cos, "gqa_cos_cache"), numpy_helper.from_array(sin, "gqa_sin_cache")]
        )
    for i, packed, out, heads in sites:
        for name in (f"present.{i}.key", f"present.{i}.value"):  # their old producers become dead
            old = producer[name]
            old.output[list(old.output).index(name)] = f"{name}__unused"
        gqa = helper.make_node(
            "GroupQueryAttention",
            [
                packed,
                "",
                "",
                f"past_key_values.{i}.key",
                f"past_key_values.{i}.value",
                "gqa_seqlens_k",
                "gqa_total_len",
                *(["gqa_cos_cache", "gqa_sin_cache"] if rotary else []),
            ],
            [out.output[0], f"present.{i}.key", f"present.{i}.value"],
            name=f"layers.{i}.GroupQueryAttention",
            domain="com.microsoft",
            num_heads=heads,
            kv_num_heads=hkv,
            scale=1.0,
            do_rotary=int(rotary),
            rotary_interleaved=0,
            local_window_size=-1,
        )
        nodes = list(graph.node)
        at = nodes.index(out)
        del graph.node[at]
        graph.node.insert(at, gqa)
    for offset, node in enumerate(pre):
        graph.node.insert(offset, node)
    for o in graph.output:
        if o.name.startswith("present."):
            dims = o.type.tensor_type.shape.dim
            dims[2].Clear()
            dims[2].dim_value = t
    if not any(op.domain == "com.microsoft" for op in model.opset_import):
        model.opset_import.append(helper.make_opsetid("com.microsoft", 1))
    remove_dead_nodes(model)
    return len(sites)
