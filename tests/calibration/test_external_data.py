"""A graph kept in external data (past protobuf's 2 GB, e.g. an SD-1.5 U-Net) calibrates to an INT8 file
laid out as export lays out a large graph: its tensors in one `<name>.data` file beside it."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import numpy as np
import onnx
import torch


def test_a_model_with_external_data_calibrates(tmp_path: Path) -> None:
    import mmedge.export.model_files as model_files
    from mmedge.calibration.search import calibrate_to_target

    m = torch.nn.Sequential(torch.nn.Linear(64, 64), torch.nn.ReLU(), torch.nn.Linear(64, 8))
    x = torch.randn(4, 64)
    raw = tmp_path / "raw.onnx"
    torch.onnx.export(
        m, (x,), str(raw), dynamo=False, input_names=["x"], output_names=["y"], dynamic_axes={"x": {0: "b"}}
    )
    proto = onnx.load(str(raw))
    onnx.save_model(
        proto,
        str(tmp_path / "m.onnx"),
        save_as_external_data=True,
        all_tensors_to_one_file=True,
        location="m.onnx.data",
        size_threshold=0,
    )
    feeds = [{"x": np.random.default_rng(i).standard_normal((4, 64)).astype(np.float32)} for i in range(3)]
    with mock.patch.object(model_files, "EXTERNAL_DATA_THRESHOLD", 1000):
        res = calibrate_to_target(
            tmp_path / "m.onnx", tmp_path / "m.int8.onnx", feeds, feeds, target_cosine=0.9
        )
    assert res.cosine["y"] > 0.99
    assert (tmp_path / "m.int8.onnx.data").is_file()  # the threshold was lowered to 1000 bytes
    from onnx.external_data_helper import ExternalDataInfo

    int8 = onnx.load(str(tmp_path / "m.int8.onnx"), load_external_data=False)
    locations = {ExternalDataInfo(t).location for t in int8.graph.initializer if t.data_location == 1}
    assert locations == {"m.int8.onnx.data"}
