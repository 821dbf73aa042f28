"""Hostile ONNX graphs and manifest sizes: every case fails with its exact `mmedge.errors` class.

Each package is a private copy of clip-tiny (or blip2-tiny) edited and re-hashed as an attacker
would. Cases that could hang or allocate gigabytes on an unfixed runtime run in a child process
with a timeout; the others run under a faulthandler watchdog. The decoy tests show that no backend
opens a package file by name: ONNX Runtime opens files natively, where no audit hook sees it, so
the proof is that backends are handed bytes (`runtime/onnx_files.read_model`) and that files named
like every package file in the current directory never reach an output.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from battery_helpers import _edit_manifest, _relist
from test_bad_input_battery import _watchdog

from mmedge.errors import BackendError, DeadlineExceededError, IntegrityError, MmedgeError, UnsupportedError

CHILD_TIMEOUT_S = 120
IMG = np.full((64, 64, 3), 128, np.uint8)
EMBED = 96  # clip-tiny's embedding width


# --- building hostile packages ----------------------------------------------------------------------


def _vision_model(nodes: list, initializers: list | None = None, out_dim: int = EMBED, opset: int = 17):
    """A stand-in vision graph: pixel_values (B, 3, 64, 64) -> `embeds` (B, out_dim) from the first
    pixels, then `nodes` (which may read `embeds` and must write `image_embeds`)."""
    from onnx import TensorProto, helper, numpy_helper

    base = [
        helper.make_node("Flatten", ["pixel_values"], ["flat"], axis=1),
        helper.make_node("Slice", ["flat", "zero", "width", "one_axis"], ["embeds"]),
    ]
    consts = [
        numpy_helper.from_array(np.array([0], np.int64), "zero"),
        numpy_helper.from_array(np.array([out_dim], np.int64), "width"),
        numpy_helper.from_array(np.array([1], np.int64), "one_axis"),
    ]
    graph = helper.make_graph(
        base + nodes,
        "hostile",
        [helper.make_tensor_value_info("pixel_values", TensorProto.FLOAT, ["batch", 3, 64, 64])],
        [helper.make_tensor_value_info("image_embeds", TensorProto.FLOAT, ["batch", out_dim])],
        initializer=consts + list(initializers or []),
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=8)


def _install(pkg: Path, model, rel: str = "onnx/vision.onnx", extra_files: tuple[str, ...] = ()) -> Path:
    import onnx

    onnx.save_model(model, str(pkg / rel))
    return _relist(pkg, rel, *extra_files)


def _with_vision(pkg: Path, nodes: list, initializers: list | None = None, **kw) -> Path:
    return _install(pkg, _vision_model(nodes, initializers, **kw))


def _add_to_embeds(value: str) -> list:
    """Nodes that fold a scalar-ish value into the output, so ORT cannot prune what computes it."""
    from onnx import helper

    return [
        helper.make_node("ReduceSum", [value], ["total"], keepdims=0),
        helper.make_node("Mul", ["total", "zero_f"], ["nothing"]),
        helper.make_node("Add", ["embeds", "nothing"], ["image_embeds"]),
    ]


def _zero_f():
    from onnx import numpy_helper

    return numpy_helper.from_array(np.array(0.0, np.float32), "zero_f")


def _embed(pkg: Path) -> np.ndarray:
    from mmedge import sdk

    return sdk.Pipeline(str(pkg)).embed_images([IMG])


def _run_child(code: str, tmp: Path) -> str:
    """Run `code` in a fresh interpreter; return the last line it printed (the outcome)."""
    script = tmp / "child.py"
    script.write_text(textwrap.dedent(code))
    env = {**os.environ, "PYTHONFAULTHANDLER": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    try:
        proc = subprocess.run(
            [sys.executable, str(script)],
            capture_output=True,
            text=True,
            timeout=CHILD_TIMEOUT_S,
            env=env,
            cwd=tmp,
            check=False,
        )
    except subprocess.TimeoutExpired:
        pytest.fail(f"child hung for {CHILD_TIMEOUT_S}s")
    if proc.returncode != 0:
        pytest.fail(f"child died (exit {proc.returncode}):\n{proc.stderr[-3000:]}")
    return proc.stdout.strip().splitlines()[-1]


_CHILD_EMBED = """
    from mmedge import sdk
    import numpy as np
    try:
        sdk.Pipeline({pkg!r}).embed_images([np.full((64, 64, 3), 128, np.uint8)])
        print("returned")
    except Exception as exc:
        print(type(exc).__name__, exc)
"""


def _expect_in_child(pkg: Path, tmp: Path, expected: type[MmedgeError], match: str) -> None:
    outcome = _run_child(_CHILD_EMBED.format(pkg=str(pkg)), tmp)
    assert outcome.split(" ", 1)[0] == expected.__name__, outcome
    assert match in outcome, outcome


def _install_with_function(pkg: Path, op: str, body: list) -> None:
    """The vision graph with its output computed by model-local function `evil.<op>` (x -> y)."""
    from onnx import helper

    fn = helper.make_function("evil", op, ["x"], ["y"], body, [helper.make_opsetid("", 17)])
    model = _vision_model([helper.make_node(op, ["embeds"], ["image_embeds"], domain="evil")])
    model.opset_import.append(helper.make_opsetid("evil", 1))
    model.functions.append(fn)
    _install(pkg, model)


def _raises(expected: type[MmedgeError], match: str, run: Callable[[], object]) -> MmedgeError:
    with _watchdog(seconds=60), pytest.raises(MmedgeError) as info:
        run()
    assert type(info.value) is expected, f"{type(info.value).__name__}: {info.value}"
    assert match in str(info.value), str(info.value)
    return info.value


def _to_external(pkg: Path, rel: str, location: str) -> tuple[str, str]:
    """Move the largest initializer of `rel` to external data `onnx/<location>`; return its name
    and the data file's package path."""
    import onnx

    model = onnx.load(str(pkg / rel))
    tensor = max(model.graph.initializer, key=lambda t: len(t.raw_data))
    data = tensor.raw_data
    data_rel = f"onnx/{location}"
    (pkg / data_rel).write_bytes(data)
    tensor.ClearField("raw_data")
    tensor.data_location = onnx.TensorProto.EXTERNAL
    for key, value in {"location": location, "offset": "0", "length": str(len(data))}.items():
        entry = tensor.external_data.add()
        entry.key, entry.value = key, value
    onnx.save_model(model, str(pkg / rel))
    _relist(pkg, rel, data_rel)
    return tensor.name, data_rel


# --- finding 1: reads outside the package -------------------------------------------------------------


def test_external_data_is_read_from_the_package_not_the_current_directory(
    tiny_pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """location="leak.bin" (listed as onnx/leak.bin) with no onnx/vision.onnx.data: the bytes that
    reach the model are the package's, never ./leak.bin."""
    reference = _embed(tiny_pkg)
    _, data_rel = _to_external(tiny_pkg, "onnx/vision.onnx", "leak.bin")
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    secret = np.random.default_rng(1).standard_normal((tiny_pkg / data_rel).stat().st_size // 4)
    (cwd / "leak.bin").write_bytes(secret.astype(np.float32).tobytes())
    monkeypatch.chdir(cwd)
    with _watchdog(seconds=60):
        got = _embed(tiny_pkg)
    np.testing.assert_allclose(got, reference, atol=1e-5)


def test_component_file_not_named_onnx_is_still_checked(tiny_pkg: Path) -> None:
    from onnx import helper

    model = _vision_model([helper.make_node("Identity", ["embeds"], ["image_embeds"])])
    tensor = model.graph.initializer[0]
    tensor.data_location = 1  # EXTERNAL
    entry = tensor.external_data.add()
    entry.key, entry.value = "location", "secret.bin"
    _install(tiny_pkg, model, rel="onnx/vision.bin")

    def rename(raw: dict) -> None:
        raw["components"]["vision"]["precisions"]["fp32"]["file"] = "onnx/vision.bin"
        del raw["files"]["onnx/vision.onnx"]

    _edit_manifest(tiny_pkg, rename)
    (tiny_pkg / "onnx/vision.onnx").unlink()
    _raises(IntegrityError, "external data file 'onnx/secret.bin' is not listed", lambda: _embed(tiny_pkg))


def test_sparse_initializer_external_data_is_checked(tiny_pkg: Path) -> None:
    from onnx import TensorProto, helper

    values = TensorProto()
    values.name, values.data_type, values.data_location = (
        "sparse_values",
        TensorProto.FLOAT,
        TensorProto.EXTERNAL,
    )
    values.dims.extend([4])
    entry = values.external_data.add()
    entry.key, entry.value = "location", "unlisted.bin"
    indices = helper.make_tensor("sparse_idx", TensorProto.INT64, [4], [0, 1, 2, 3])
    sparse = helper.make_sparse_tensor(values, indices, [EMBED])
    model = _vision_model([helper.make_node("Identity", ["embeds"], ["image_embeds"])])
    model.graph.sparse_initializer.append(sparse)
    _install(tiny_pkg, model)
    _raises(IntegrityError, "external data file 'onnx/unlisted.bin' is not listed", lambda: _embed(tiny_pkg))


def test_constant_in_model_local_function_is_refused(tiny_pkg: Path) -> None:
    from onnx import TensorProto, helper

    value = TensorProto()
    value.name, value.data_type, value.data_location = "c", TensorProto.FLOAT, TensorProto.EXTERNAL
    value.dims.extend([EMBED])
    entry = value.external_data.add()
    entry.key, entry.value = "location", "unlisted.bin"
    body = [helper.make_node("Constant", [], ["c"], value=value), helper.make_node("Add", ["x", "c"], ["y"])]
    _install_with_function(tiny_pkg, "AddConst", body)
    _raises(UnsupportedError, "model-local functions", lambda: _embed(tiny_pkg))


# --- finding 2: files swapped after verification ---------------------------------------------------


def test_external_data_swapped_after_verification_is_refused(tiny_pkg: Path) -> None:
    from mmedge import sdk

    _, data_rel = _to_external(tiny_pkg, "onnx/vision.onnx", "vision.onnx.data")
    pipe = sdk.Pipeline(str(tiny_pkg))  # verified here
    data = bytearray((tiny_pkg / data_rel).read_bytes())
    data[:64] = bytes(64)
    (tiny_pkg / data_rel).write_bytes(bytes(data))  # same size, other weights
    _raises(
        IntegrityError,
        "onnx/vision.onnx.data: sha256 differs from the manifest",
        lambda: pipe.embed_images([IMG]),
    )


def test_model_swapped_after_verification_is_refused(tiny_pkg: Path) -> None:
    import onnx
    from onnx import helper

    from mmedge import sdk

    pipe = sdk.Pipeline(str(tiny_pkg))
    onnx.save_model(
        _vision_model([helper.make_node("Identity", ["embeds"], ["image_embeds"])]),
        str(tiny_pkg / "onnx/vision.onnx"),
    )
    _raises(
        IntegrityError,
        "onnx/vision.onnx: sha256 differs from the manifest",
        lambda: pipe.embed_images([IMG]),
    )


# --- finding 6: hostile graphs and sizes ----------------------------------------------------------------


def _loop_nodes(trips: int) -> tuple[list, list]:
    from onnx import TensorProto, helper, numpy_helper

    body = helper.make_graph(
        [
            helper.make_node("Identity", ["cond_in"], ["cond_out"]),
            helper.make_node("Add", ["v_in", "one_f"], ["v_out"]),
        ],
        "body",
        [
            helper.make_tensor_value_info("i", TensorProto.INT64, []),
            helper.make_tensor_value_info("cond_in", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_in", TensorProto.FLOAT, []),
        ],
        [
            helper.make_tensor_value_info("cond_out", TensorProto.BOOL, []),
            helper.make_tensor_value_info("v_out", TensorProto.FLOAT, []),
        ],
    )
    inits = [
        numpy_helper.from_array(np.array(trips, np.int64), "trips"),
        numpy_helper.from_array(np.array(True), "cond"),
        numpy_helper.from_array(np.array(1.0, np.float32), "one_f"),
        _zero_f(),
    ]
    nodes = [helper.make_node("Loop", ["trips", "cond", "zero_f"], ["v_final"], body=body)]
    return nodes + _add_to_embeds("v_final"), inits


def test_loop_of_a_trillion_iterations_is_refused(tiny_pkg: Path, tmp_path: Path) -> None:
    nodes, inits = _loop_nodes(10**12)
    _with_vision(tiny_pkg, nodes, inits)
    _expect_in_child(tiny_pkg, tmp_path, UnsupportedError, "operator Loop")


def test_constant_of_shape_gigabytes_is_refused(tiny_pkg: Path, tmp_path: Path) -> None:
    from onnx import helper, numpy_helper

    shape = numpy_helper.from_array(np.array([1 << 29], np.int64), "huge_shape")
    nodes = [helper.make_node("ConstantOfShape", ["huge_shape"], ["big"]), *_add_to_embeds("big")]
    _with_vision(tiny_pkg, nodes, [shape, _zero_f()])
    _expect_in_child(tiny_pkg, tmp_path, IntegrityError, "(ConstantOfShape) would build")


@pytest.mark.parametrize(
    "op, inputs",
    [
        ("Expand", lambda: [np.array([1 << 20, 1 << 20], np.int64)]),
        ("Tile", lambda: [np.array([1 << 20, 1 << 20], np.int64)]),
        ("Range", lambda: [np.array(0.0, np.float32), np.array(1e12, np.float32), np.array(1.0, np.float32)]),
    ],
)
def test_constant_sized_expand_tile_range_are_refused(
    op: str, inputs: Callable[[], list], tiny_pkg: Path, tmp_path: Path
) -> None:
    from onnx import helper, numpy_helper

    names = [f"c{i}" for i in range(len(inputs()))]
    consts = [numpy_helper.from_array(a, n) for a, n in zip(inputs(), names)]
    data = ["embeds"] if op != "Range" else []
    nodes = [helper.make_node(op, data + names, ["big"]), *_add_to_embeds("big")]
    _with_vision(tiny_pkg, nodes, [*consts, _zero_f()])
    _expect_in_child(tiny_pkg, tmp_path, IntegrityError, f"({op}) would build")


def _slow_nodes(matmuls: int) -> tuple[list, list]:
    """A square ConstantOfShape sized from the batch dim (not a constant), squared `matmuls` times."""
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "first"),
        numpy_helper.from_array(np.array([1024], np.int64), "scale"),
        _zero_f(),
    ]
    nodes = [
        helper.make_node("Shape", ["pixel_values"], ["shape"]),
        helper.make_node("Gather", ["shape", "first"], ["batch"]),
        helper.make_node("Mul", ["batch", "scale"], ["n"]),
        helper.make_node("Concat", ["n", "n"], ["square"], axis=0),
        helper.make_node("ConstantOfShape", ["square"], ["m0"]),
    ]
    for i in range(matmuls):
        nodes.append(helper.make_node("MatMul", [f"m{i}", f"m{i}"], [f"m{i + 1}"]))
    return nodes + _add_to_embeds(f"m{matmuls}"), inits


def test_run_deadline_cancels_a_long_run(tiny_pkg: Path) -> None:
    from mmedge.runtime.backends.base import SessionOptions
    from mmedge.runtime.components import ComponentRunner

    nodes, inits = _slow_nodes(200)  # minutes of work on a CPU
    _with_vision(tiny_pkg, nodes, inits)
    runner = ComponentRunner(tiny_pkg, options=SessionOptions(run_deadline_s=0.5))
    x = np.zeros((1, 3, 64, 64), np.float32)
    err = _raises(DeadlineExceededError, "deadline", lambda: runner.run_path("image", {"pixel_values": x}))
    assert "vision" in str(err)


def test_run_deadline_cancels_a_loop() -> None:
    """The deadline stops a Loop that verification would refuse, handed to the session directly."""
    from mmedge.runtime.backends.base import SessionOptions
    from mmedge.runtime.backends.ort import OrtSession

    nodes, inits = _loop_nodes(10**12)
    sess = OrtSession(
        _vision_model(nodes, inits).SerializeToString(), SessionOptions(run_deadline_s=0.5), "loop"
    )
    x = np.zeros((1, 3, 64, 64), np.float32)
    _raises(
        DeadlineExceededError,
        "loop: the run took longer than its 0.5 s deadline",
        lambda: sess.run({"pixel_values": x}),
    )


def _manifest_row(pkg: Path, mutate: Callable[[dict], object]) -> Callable[[], object]:
    from mmedge.runtime.manifest import parse_manifest

    raw = json.loads((pkg / "manifest.json").read_text())
    mutate(raw)
    text = json.dumps(raw)
    return lambda: parse_manifest(text)


def _set(path: str, value: object) -> Callable[[dict], None]:
    def mutate(raw: dict) -> None:
        *parents, last = path.split(".")
        node = raw
        for part in parents:
            node = node[part]
        node[last] = value

    return mutate


def _add_llm_component(raw: dict) -> None:
    raw["components"]["extra"] = {**raw["components"]["vision"], "role": "llm_step"}


CLIP_MANIFEST_ROWS = [
    ("preprocess.image_size", 50000, "image_size must be an int in [1, 4096]"),
    ("tokenizer.context_length", 10**9, "tokenizer context_length must be in [1, 131072]"),
    ("retrieval.logit_scale", 1e308, "retrieval logit_scale must be in (0, 1000]"),
    (
        "components.vision.outputs",
        [{"name": "image_embeds", "dtype": "float32", "shape": ["batch", 10**12]}],
        "dim 1000000000000 is outside",
    ),
    ("components.vision.dims", {"batch": {"min": 1, "opt": 1, "max": 10**12}}, "max <= 1048576"),
]


@pytest.mark.parametrize("path, value, match", CLIP_MANIFEST_ROWS, ids=[r[0] for r in CLIP_MANIFEST_ROWS])
def test_manifest_sizes_are_bounded(path: str, value: object, match: str, tiny_pkg_session: Path) -> None:
    _raises(IntegrityError, match, _manifest_row(tiny_pkg_session, _set(path, value)))


def test_manifest_nan_anywhere_is_refused(tiny_pkg_session: Path) -> None:
    row = _manifest_row(
        tiny_pkg_session, _set("components.vision.precisions.fp32.parity", {"cosine": float("nan")})
    )
    _raises(IntegrityError, "non-finite number NaN", row)


def test_manifest_role_must_fit_the_task(tiny_pkg_session: Path) -> None:
    _raises(
        IntegrityError,
        "a retrieval package has no use for a 'llm_step' component",
        _manifest_row(tiny_pkg_session, _add_llm_component),
    )


CHAT_MANIFEST_ROWS = [
    ("llm.layers", 10**4, "llm layers must be in [1, 512]"),
    ("llm.layers", 3, "llm.layers is 3 but the llm_step graph takes 4 past key/value inputs"),
    ("llm.max_context", 1 << 16, "does not fit llm kv_heads=4, max_context=65536"),
    ("llm.vocab_size", 1 << 20, "logits must end in llm.vocab_size=1048576"),
    ("pipeline.image_tokens.count", 10**6, "image_tokens.count must be in [1, 4096]"),
]


@pytest.mark.parametrize(
    "path, value, match", CHAT_MANIFEST_ROWS, ids=[f"{r[0]}={r[1]}" for r in CHAT_MANIFEST_ROWS]
)
def test_chat_manifest_sizes_are_bounded(
    path: str, value: object, match: str, chat_pkg_session: Path
) -> None:
    _raises(IntegrityError, match, _manifest_row(chat_pkg_session, _set(path, value)))


# --- finding 8: every ONNX Runtime failure is typed and names the component ----------------------------


def test_custom_domain_op_is_refused(tiny_pkg: Path) -> None:
    from onnx import helper

    model = _vision_model([helper.make_node("Evil", ["embeds"], ["image_embeds"], domain="com.evil")])
    model.opset_import.append(helper.make_opsetid("com.evil", 1))
    _install(tiny_pkg, model)
    _raises(UnsupportedError, "operator com.evil.Evil", lambda: _embed(tiny_pkg))


def test_recursive_function_is_refused(tiny_pkg: Path) -> None:
    from onnx import helper

    _install_with_function(tiny_pkg, "Rec", [helper.make_node("Rec", ["x"], ["y"], domain="evil")])
    _raises(UnsupportedError, "model-local functions", lambda: _embed(tiny_pkg))


def test_failed_allocation_is_a_backend_error(tiny_pkg: Path, tmp_path: Path) -> None:
    """A size computed at run time (not bounded by verification) that no allocator can satisfy."""
    from onnx import helper, numpy_helper

    inits = [
        numpy_helper.from_array(np.array([0], np.int64), "first"),
        numpy_helper.from_array(np.array([1 << 40], np.int64), "scale"),
        _zero_f(),
    ]
    nodes = [
        helper.make_node("Shape", ["pixel_values"], ["shape"]),
        helper.make_node("Gather", ["shape", "first"], ["batch"]),
        helper.make_node("Mul", ["batch", "scale"], ["n"]),
        helper.make_node("ConstantOfShape", ["n"], ["big"]),
        *_add_to_embeds("big"),
    ]
    _with_vision(tiny_pkg, nodes, inits)
    _expect_in_child(tiny_pkg, tmp_path, BackendError, "vision.fp32")


def test_out_of_range_gather_is_a_backend_error(tiny_pkg: Path) -> None:
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([1000], np.int64), "far")]
    nodes = [helper.make_node("Gather", ["embeds", "far"], ["picked"], axis=1)]
    nodes.append(helper.make_node("Expand", ["picked", "out_shape"], ["image_embeds"]))
    inits.append(numpy_helper.from_array(np.array([1, EMBED], np.int64), "out_shape"))
    _with_vision(tiny_pkg, nodes, inits)
    _raises(BackendError, "vision.fp32: ONNX Runtime", lambda: _embed(tiny_pkg))


def test_graph_that_does_not_type_check_is_a_backend_error(tiny_pkg: Path) -> None:
    from onnx import helper, numpy_helper

    inits = [numpy_helper.from_array(np.array([1], np.int64), "an_int")]
    _with_vision(tiny_pkg, [helper.make_node("Add", ["embeds", "an_int"], ["image_embeds"])], inits)
    _raises(BackendError, "vision.fp32: ONNX Runtime cannot load the graph", lambda: _embed(tiny_pkg))


# --- finding 9: outputs are checked against the manifest ---------------------------------------------


def test_nan_output_is_refused_and_names_the_component(tiny_pkg: Path) -> None:
    from onnx import helper, numpy_helper

    nan = numpy_helper.from_array(np.array(np.nan, np.float32), "nan")
    _with_vision(tiny_pkg, [helper.make_node("Mul", ["embeds", "nan"], ["image_embeds"])], [nan])
    _raises(
        IntegrityError,
        "component 'vision' produced output 'image_embeds' holding NaN",
        lambda: _embed(tiny_pkg),
    )


def test_wrong_shape_output_is_refused(tiny_pkg: Path) -> None:
    from onnx import helper

    _with_vision(tiny_pkg, [helper.make_node("Identity", ["embeds"], ["image_embeds"])], out_dim=EMBED - 1)
    _raises(
        IntegrityError,
        "component 'vision' produced output 'image_embeds' with shape (1, 95)",
        lambda: _embed(tiny_pkg),
    )


# --- no backend opens a package file by name ---------------------------------------------------------------


def _decoys(cwd: Path, pkg: Path, extra: tuple[str, ...] = ()) -> None:
    """Garbage files named like every package file and external-data location, under `cwd`."""
    rng = np.random.default_rng(7)
    names = [p.relative_to(pkg).as_posix() for p in pkg.rglob("*") if p.is_file()]
    for rel in {*names, *(Path(n).name for n in names), *extra}:
        target = cwd / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        size = (pkg / rel).stat().st_size if (pkg / rel).is_file() else 4096
        target.write_bytes(rng.integers(0, 256, size, dtype=np.uint8).tobytes())


class _Opens:
    """Python-level file opens (sys.addaudithook 'open' events) while armed."""

    def __init__(self) -> None:
        self.armed, self.paths = False, []
        sys.addaudithook(self._hook)  # hooks cannot be removed; an unarmed one records nothing

    def _hook(self, event: str, args: tuple) -> None:
        if self.armed and event == "open" and isinstance(args[0], (str, bytes, os.PathLike)):
            self.paths.append(os.path.abspath(os.fsdecode(args[0])))


_OPENS: _Opens | None = None


def _opens() -> _Opens:
    global _OPENS
    if _OPENS is None:
        _OPENS = _Opens()
    return _OPENS


def test_no_backend_opens_a_package_file_by_name_retrieval(
    tiny_pkg: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmedge import sdk

    reference = sdk.Pipeline(str(tiny_pkg))
    ref_img, ref_txt = reference.embed_images([IMG]), reference.embed_texts(["a red circle"])
    _to_external(tiny_pkg, "onnx/text.onnx", "text.onnx.data")  # the standard layout
    _to_external(tiny_pkg, "onnx/vision.onnx", "leak.bin")  # a location with no .data name
    cwd = tmp_path / "cwd"
    _decoys(cwd, tiny_pkg, extra=("leak.bin", "text.onnx.data", "vision.onnx.data"))
    monkeypatch.chdir(cwd)
    opens = _opens()
    opens.paths.clear()
    opens.armed = True
    try:
        with _watchdog(seconds=60):
            pipe = sdk.Pipeline(str(tiny_pkg))
            img, txt = pipe.embed_images([IMG]), pipe.embed_texts(["a red circle"])
    finally:
        opens.armed = False
    np.testing.assert_allclose(img, ref_img, atol=1e-5)
    np.testing.assert_allclose(txt, ref_txt, atol=1e-5)
    inside_tmp = [p for p in opens.paths if p.startswith(str(tmp_path))]
    assert inside_tmp and all(p.startswith(str(tiny_pkg)) for p in inside_tmp), inside_tmp


def test_no_backend_opens_a_package_file_by_name_chat(
    chat_pkg_session: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from mmedge import sdk

    pkg = tmp_path / "blip2-tiny"
    shutil.copytree(chat_pkg_session, pkg)
    ref = sdk.Pipeline(str(pkg)).caption(IMG, max_new_tokens=6)
    cwd = tmp_path / "cwd"
    _decoys(cwd, pkg)
    monkeypatch.chdir(cwd)
    opens = _opens()
    opens.paths.clear()
    opens.armed = True
    try:
        with _watchdog(seconds=120):
            got = sdk.Pipeline(str(pkg)).caption(IMG, max_new_tokens=6)
    finally:
        opens.armed = False
    assert got == ref
    inside_tmp = [p for p in opens.paths if p.startswith(str(tmp_path))]
    assert inside_tmp and all(p.startswith(str(pkg)) for p in inside_tmp), inside_tmp


# a file opened by path: relative paths resolve against the current directory (AT_FDCWD); listing a
# directory (O_DIRECTORY, as Python's import system does for sys.path's "") reads no file's bytes
_OPENED = re.compile(r'^\d+\s+open(?:at2?\(AT_FDCWD, |\()"([^"]*)"(?!.*O_DIRECTORY)')


@pytest.mark.skipif(not sys.platform.startswith("linux") or not shutil.which("strace"), reason="needs strace")
def test_no_file_in_the_current_directory_is_opened_natively(tiny_pkg: Path, tmp_path: Path) -> None:
    """What the audit hook cannot see: ORT's own (native) opens. The clip path runs in a child under
    strace from a directory of decoys; no file under that directory, and no file outside the package
    under the test's folder, may be opened by any thread."""
    _to_external(tiny_pkg, "onnx/text.onnx", "text.onnx.data")
    _to_external(tiny_pkg, "onnx/vision.onnx", "leak.bin")
    cwd = tmp_path / "cwd"
    _decoys(cwd, tiny_pkg, extra=("leak.bin", "text.onnx.data", "vision.onnx.data"))
    script = (
        "import numpy as np; from mmedge import sdk; "
        f"p = sdk.Pipeline({str(tiny_pkg)!r}); "
        "p.embed_images([np.full((64, 64, 3), 128, np.uint8)]); p.embed_texts(['a red circle'])"
    )
    trace = tmp_path / "opens.txt"
    cmd = [
        "strace",
        "-f",
        "-qq",
        "-e",
        "trace=open,openat,openat2",
        "-o",
        str(trace),
        sys.executable,
        "-c",
        script,
    ]
    done = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=300)
    if done.returncode != 0 and "ptrace" in done.stderr:
        pytest.skip(f"strace cannot trace here: {done.stderr.strip()[:200]}")
    assert done.returncode == 0, done.stderr[-2000:]
    opened = [
        os.path.normpath(os.path.join(cwd, m[1]))
        for line in trace.read_text().splitlines()
        if (m := _OPENED.match(line))
    ]
    assert any(o.startswith(str(tiny_pkg)) for o in opened)  # the trace saw the package being read
    in_cwd = [o for o in opened if o == str(cwd) or o.startswith(str(cwd) + os.sep)]
    assert not in_cwd, in_cwd
    outside_pkg = [
        o
        for o in opened
        if o.startswith(str(tmp_path)) and not o.startswith(str(tiny_pkg)) and o != str(trace)
    ]
    assert not outside_pkg, outside_pkg


def test_ort_session_refuses_a_path() -> None:
    """By construction: the ORT session takes bytes only, never a path ORT would open itself."""
    from mmedge.runtime.backends.base import SessionOptions
    from mmedge.runtime.backends.ort import OrtSession

    with pytest.raises(TypeError, match="verified bytes"):
        OrtSession("onnx/vision.onnx", SessionOptions())  # type: ignore[arg-type]


def test_nan_logits_of_the_llm_step_are_refused(chat_pkg_session: Path, tmp_path: Path) -> None:
    """The decode loop binds the LLM's outputs directly (no component runner), so it checks the
    logits itself: a graph that turns them into NaN is refused, never sampled from."""
    import onnx
    from onnx import helper, numpy_helper

    pkg = tmp_path / "blip2-tiny"
    shutil.copytree(chat_pkg_session, pkg)
    edited = []
    for path in sorted(pkg.rglob("*.onnx")):
        model = onnx.load(str(path))
        if "logits" not in {o.name for o in model.graph.output}:
            continue
        for node in model.graph.node:
            node.output[:] = ["logits_clean" if o == "logits" else o for o in node.output]
        model.graph.initializer.append(numpy_helper.from_array(np.array(np.nan, np.float32), "nan"))
        model.graph.node.append(helper.make_node("Mul", ["logits_clean", "nan"], ["logits"]))
        onnx.save(model, str(path))
        edited.append(path.relative_to(pkg).as_posix())
    assert len(edited) >= 2  # the exported step and its ORT builds
    _relist(pkg, *edited)
    from mmedge import sdk

    _raises(
        IntegrityError,
        "component 'llm' produced non-finite logits",
        lambda: sdk.Pipeline(str(pkg)).caption(IMG, max_new_tokens=4),
    )
