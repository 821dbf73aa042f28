"""ROS bags: a bag written here with rosbags' writer (raw rgb8 / bgr8 / mono8 and JPEG frames) gives the
same embeddings, captions and answers as the same frames passed as arrays; thinning by count and rate;
hostile messages refused with typed errors that name the message; the example ROS 2 node's handler."""

from __future__ import annotations

import array
import importlib.util
import json
import sys
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import cv2
import numpy as np
import pytest

pytest.importorskip("rosbags", reason="the ros extra (rosbags) is not installed")

from rosbags.rosbag2 import Writer
from rosbags.typesys import Stores, get_typestore

from mmedge import sdk
from mmedge.data import generate_scenes
from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.runtime.images import ImageLimits
from mmedge.runtime.ros_images import message_to_rgb
from mmedge.runtime.rosbag import bag_frames
from mmedge.sdk.cli import main

TS = get_typestore(Stores.ROS2_HUMBLE)
IMAGE, COMPRESSED = "sensor_msgs/msg/Image", "sensor_msgs/msg/CompressedImage"
T0 = 1_700_000_000_000_000_000  # ns
GAP = 100_000_000  # 10 frames a second


def _header(i: int) -> Any:
    stamp = TS.types["builtin_interfaces/msg/Time"](sec=T0 // 10**9, nanosec=i * 1000)
    return TS.types["std_msgs/msg/Header"](stamp=stamp, frame_id="cam")


def raw_msg(i: int, rgb: np.ndarray, layout: str, pad: int = 0, **override: Any) -> Any:
    """A sensor_msgs/Image of an RGB frame; `pad` bytes at the end of each row (step > width * 3)."""
    pixels = {"rgb8": rgb, "bgr8": rgb[..., ::-1], "mono8": rgb[..., :1]}[layout]
    h, w, c = pixels.shape
    rows = np.zeros((h, w * c + pad), np.uint8)
    rows[:, : w * c] = pixels.reshape(h, w * c)
    fields = {"height": h, "width": w, "encoding": layout, "is_bigendian": 0, "step": w * c + pad}
    fields.update(override)
    data = override.pop("data", rows.ravel())
    return TS.types[IMAGE](header=_header(i), **{**fields, "data": data})


def jpeg_msg(i: int, rgb: np.ndarray) -> Any:
    _ok, jpg = cv2.imencode(".jpg", rgb[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return TS.types[COMPRESSED](header=_header(i), format="rgb8; jpeg compressed bgr8", data=jpg.ravel())


def write_bag(path: Path, topics: dict[str, list[Any]]) -> Path:
    with Writer(path, version=9) as w:
        for topic, msgs in topics.items():
            conn = w.add_connection(topic, msgs[0].__msgtype__, typestore=TS)
            for i, m in enumerate(msgs):
                w.write(conn, T0 + i * GAP, TS.serialize_cdr(m, m.__msgtype__))
    return path


FRAMES = [s.image for s in generate_scenes(6, seed=5, image_size=64)]
FRAMES[1] = np.ascontiguousarray(FRAMES[1][:48])  # one frame not square: 64 wide, 48 high


@pytest.fixture(scope="module")
def bag(tmp_path_factory: pytest.TempPathFactory) -> Path:
    encodings = ["rgb8", "bgr8", "rgb8", "bgr8", "mono8", "rgb8"]
    raw = [raw_msg(i, f, e, pad=(4 if i == 2 else 0)) for i, (f, e) in enumerate(zip(FRAMES, encodings))]
    jpeg = [jpeg_msg(i, f) for i, f in enumerate(FRAMES[:3])]
    return write_bag(tmp_path_factory.mktemp("bag") / "drive", {"/cam": raw, "/cam/compressed": jpeg})


def _arrays() -> list[np.ndarray]:
    """The frames as the bag's messages carry them: mono8 keeps one channel (broadcast to grey)."""
    out = [f.copy() for f in FRAMES]
    out[4] = np.repeat(FRAMES[4][..., :1], 3, axis=2)
    return out


def _jpeg_arrays() -> list[np.ndarray]:
    return [cv2.imdecode(jpeg_msg(i, f).data, cv2.IMREAD_COLOR)[..., ::-1] for i, f in enumerate(FRAMES[:3])]


def _lines(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_frames_are_the_arrays_and_keyed_by_timestamp(bag: Path) -> None:
    frames = list(bag_frames(bag, "/cam"))
    assert [f.timestamp for f in frames] == [T0 + i * GAP for i in range(6)]
    assert [f.stamp for f in frames] == [T0 + i * 1000 for i in range(6)]
    for got, want in zip(frames, _arrays()):
        np.testing.assert_array_equal(got.rgb, want)
    for got, want in zip(bag_frames(bag, "/cam/compressed"), _jpeg_arrays()):
        np.testing.assert_array_equal(got.rgb, want)


def test_every_and_max_rate(bag: Path) -> None:
    assert [f.index for f in bag_frames(bag, "/cam", every=2)] == [0, 2, 4]
    assert [f.index for f in bag_frames(bag, "/cam", max_rate=4.0)] == [0, 3]  # >= 250 ms apart
    assert [f.index for f in bag_frames(bag, "/cam", every=2, max_rate=4.0)] == [0, 4]
    with pytest.raises(InvalidInputError, match="every must be"):
        list(bag_frames(bag, "/cam", every=0))
    with pytest.raises(InvalidInputError, match="max_rate must be"):
        list(bag_frames(bag, "/cam", max_rate=0.0))


def test_embed_over_a_bag_equals_the_arrays(tiny_pkg_session: Path, bag: Path, tmp_path: Path) -> None:
    p = sdk.Pipeline(tiny_pkg_session)
    for topic, arrays in (("/cam", _arrays()), ("/cam/compressed", _jpeg_arrays())):
        out = tmp_path / f"{topic.strip('/').replace('/', '_')}.jsonl"
        argv = ["embed", str(tiny_pkg_session), "--rosbag", str(bag), "--topic", topic, "--out", str(out)]
        assert main(argv) == 0
        lines = _lines(out)
        assert [line["timestamp"] for line in lines] == [T0 + i * GAP for i in range(len(arrays))]
        got = np.array([line["embedding"] for line in lines], np.float32)
        want = np.concatenate([p.embed_images([a]) for a in arrays])
        np.testing.assert_array_equal(got, want)  # per frame, the same numbers exactly


@pytest.fixture(scope="module")
def blip2_fp32(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from mmedge.export.exporter import export_model
    from mmedge.models.init import init_checkpoint

    root = tmp_path_factory.mktemp("blip2")
    export_model(init_checkpoint("blip2-tiny", root / "ckpt", seed=0), root / "pkg")  # fp32: no calibration
    return root / "pkg"


def test_caption_and_chat_over_a_bag_equal_the_arrays(
    blip2_fp32: Path, bag: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    p = sdk.Pipeline(blip2_fp32)
    gen = ["--max-new-tokens", "4"]
    out = tmp_path / "captions.jsonl"
    assert (
        main(["caption", str(blip2_fp32), "--rosbag", str(bag), "--topic", "/cam", "--out", str(out), *gen])
        == 0
    )
    assert [line["caption"] for line in _lines(out)] == [p.caption(a, max_new_tokens=4) for a in _arrays()]
    capsys.readouterr()
    argv = ["chat", str(blip2_fp32), "--rosbag", str(bag), "--topic", "/cam/compressed", "what is it?", *gen]
    assert main([*argv, "--every", "2"]) == 0  # no --out: JSONL on stdout
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["index"] for line in lines] == [0, 2]
    want = [p.chat(_jpeg_arrays()[i], "what is it?", max_new_tokens=4) for i in (0, 2)]
    assert [line["answer"] for line in lines] == want


def _bad_bag(tmp_path: Path, msg: Any) -> Path:
    good = raw_msg(0, FRAMES[0], "rgb8")
    return write_bag(tmp_path / "bad", {"/cam": [good, msg]})


@pytest.mark.parametrize(
    ("override", "error", "message"),
    [
        (
            {"data": np.zeros(64 * 64 * 3 - 1, np.uint8)},
            InvalidInputError,
            "12287 bytes; 64 rows of step 192 make 12288",
        ),
        ({"step": 10}, InvalidInputError, "row step 10 is shorter"),
        ({"encoding": "yuv9000"}, UnsupportedError, "encoding 'yuv9000' is not accepted"),
        ({"encoding": "16UC1"}, UnsupportedError, "16-bit or float \\(depth\\)"),
        ({"encoding": "mono16"}, UnsupportedError, "16-bit"),
        ({"width": 100_000, "height": 100_000}, InvalidInputError, "10000000000 pixels; the cap is 50000000"),
        ({"width": 0}, InvalidInputError, "zero size"),
    ],
)
def test_hostile_raw_messages_name_the_message(
    tmp_path: Path, override: dict, error: type[Exception], message: str
) -> None:
    bag = _bad_bag(tmp_path, raw_msg(1, FRAMES[0], "rgb8", **override))
    frames = bag_frames(bag, "/cam")
    assert next(frames).index == 0  # the good message first
    with pytest.raises(error, match=f"^/cam message #1 at {T0 + GAP} ns: .*{message}"):
        next(frames)


def test_hostile_compressed_and_topics(tmp_path: Path) -> None:
    not_image = TS.types[COMPRESSED](
        header=_header(0), format="jpeg", data=np.frombuffer(b"\x00\x01 not an image", np.uint8)
    )
    depth = TS.types[COMPRESSED](
        header=_header(1), format="16UC1; compressedDepth", data=np.zeros(9, np.uint8)
    )
    big = TS.types[COMPRESSED](header=_header(2), format="jpeg", data=np.zeros(70_000, np.uint8))
    string = TS.types["std_msgs/msg/String"](data="x")
    bag = write_bag(tmp_path / "c", {"/c": [not_image], "/d": [depth], "/big": [big], "/s": [string]})
    with pytest.raises(InvalidInputError, match=r"^/c message #0 at .* ns: image data is an unknown format"):
        list(bag_frames(bag, "/c"))
    with pytest.raises(UnsupportedError, match=r"^/d message #0 .*compressed depth"):
        list(bag_frames(bag, "/d"))
    with pytest.raises(UnsupportedError, match="topic '/s' carries std_msgs/msg/String"):
        list(bag_frames(bag, "/s"))
    with pytest.raises(InvalidInputError, match="no topic '/x'; its image topics: /big, /c, /d"):
        list(bag_frames(bag, "/x"))
    with pytest.raises(InvalidInputError, match=r"the record is .* bytes; images are capped"):
        list(bag_frames(bag, "/big", limits=ImageLimits(max_bytes=10, max_decoded_bytes=10)))
    with pytest.raises(InvalidInputError, match="does not exist"):
        list(bag_frames(tmp_path / "none", "/c"))


def test_a_failed_run_leaves_no_output(
    tiny_pkg_session: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    bag = _bad_bag(tmp_path, raw_msg(1, FRAMES[0], "rgb8", encoding="16UC1"))
    out = tmp_path / "emb.jsonl"
    out.write_text("previous run\n")
    argv = ["embed", str(tiny_pkg_session), "--rosbag", str(bag), "--topic", "/cam", "--out", str(out)]
    assert main(argv) == 1
    assert "/cam message #1" in capsys.readouterr().err
    assert out.read_text() == "previous run\n" and list(tmp_path.glob(".emb.jsonl.*")) == []
    assert main(["embed", str(tiny_pkg_session), "--topic", "/cam", "x.png"]) == 1
    assert "--topic apply with --rosbag BAG only" in capsys.readouterr().err
    assert main(["embed", str(tiny_pkg_session), "--rosbag", str(bag)]) == 1
    assert "--rosbag needs --topic" in capsys.readouterr().err


def test_live_messages_convert_alike(bag: Path) -> None:
    """rclpy gives array.array data and no __msgtype__: the conversion is the same."""
    rgb = FRAMES[3]
    live = SimpleNamespace(
        height=64,
        width=64,
        encoding="bgr8",
        is_bigendian=0,
        step=192,
        data=array.array("B", rgb[..., ::-1].tobytes()),
    )
    np.testing.assert_array_equal(message_to_rgb(live, "/cam"), rgb)
    _ok, jpg = cv2.imencode(".png", rgb[..., ::-1])
    compressed = SimpleNamespace(format="png", data=jpg.tobytes())
    np.testing.assert_array_equal(message_to_rgb(compressed, "/cam"), rgb)
    with pytest.raises(InvalidInputError, match=r"^/cam: image data is a list"):
        message_to_rgb(SimpleNamespace(**{**vars(live), "data": list(rgb.ravel())}), "/cam")


def test_example_node_handler_without_ros(tiny_pkg_session: Path, bag: Path) -> None:
    path = Path(__file__).resolve().parents[2] / "examples" / "ros2_caption_node.py"
    spec = importlib.util.spec_from_file_location("ros2_caption_node", path)
    assert spec and spec.loader
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    assert "rclpy" not in sys.modules  # importing the example needs no ROS
    p = sdk.Pipeline(tiny_pkg_session)
    handle = mod.FrameHandler(p, topic="/cam", every=2)
    msgs = [raw_msg(i, f, "rgb8") for i, f in enumerate(FRAMES[:3])]
    out = [handle(m) for m in msgs]
    assert out[1] is None and out[0] is not None and out[2] is not None
    assert out[2]["stamp"] == T0 + 2000
    np.testing.assert_array_equal(np.float32(out[2]["embedding"]), p.embed_images([FRAMES[2]])[0])
    bad = raw_msg(3, FRAMES[0], "rgb8", encoding="16UC1")
    assert handle(bad) is None and handle.errors == 0  # message #3: skipped (every 2nd)
    assert handle(bad) is None and handle.errors == 1  # message #4: refused and logged; the node goes on
