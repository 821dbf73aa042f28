"""Writing ONNX models of any size: past protobuf's 2 GB a model's tensors go to one `<name>.data`
file beside it (standard ONNX external data), as `mmedge export` lays out a large graph. Calibration
and builds write their graphs through here, so an SD-1.5-sized U-Net survives every step."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Any

from mmedge.runtime.staging import write_atomic

# Protobuf cannot hold more than 2 GB; keep a margin for the graph itself.
EXTERNAL_DATA_THRESHOLD = 1_800_000_000


def has_external_data(path: Path) -> bool:
    """Whether an ONNX file keeps tensors in external data files."""
    import onnx
    from onnx.external_data_helper import uses_external_data

    model = onnx.load(str(path), load_external_data=False)
    return any(uses_external_data(t) for t in model.graph.initializer)


def needs_external_data(proto: Any) -> bool:
    """Whether a model's initializers are too large to serialise it as one protobuf."""
    return sum(len(t.raw_data) for t in proto.graph.initializer) > EXTERNAL_DATA_THRESHOLD


def save_model(proto: Any, out_path: Path) -> None:
    """Write a model atomically; past the export's size threshold its tensors go to one
    `<name>.data` file beside it (written first), below it a `<name>.data` left there is removed."""
    import onnx

    out_path = Path(out_path)
    if not needs_external_data(proto):
        write_atomic(out_path, proto.SerializeToString())
        out_path.with_name(out_path.name + ".data").unlink(missing_ok=True)  # an earlier large version's
        return
    with tempfile.TemporaryDirectory(prefix="mmedge-save-", dir=out_path.parent) as tmp:
        staged = Path(tmp) / out_path.name
        onnx.save_model(
            proto,
            str(staged),
            save_as_external_data=True,
            all_tensors_to_one_file=True,
            location=out_path.name + ".data",
            size_threshold=1024,
        )
        os.replace(staged.with_name(out_path.name + ".data"), out_path.with_name(out_path.name + ".data"))
        os.replace(staged, out_path)


def copy_model(src: Path, dst: Path) -> None:
    """Copy an ONNX model, with its external data renamed to `dst`'s (`save_model`)."""
    import onnx

    if not has_external_data(src):
        write_atomic(dst, Path(src).read_bytes())
    else:
        save_model(onnx.load(str(src)), dst)
