"""Image frames of one topic of a ROS bag (ROS 2 sqlite3 or MCAP, or ROS 1), read with rosbags
(the `ros` extra, pure Python), thinned by count (`every`) or by bag time (`max_rate`).

Messages are skipped before they are deserialised, and a message's raw size is capped before it is:
a hostile bag costs at most one capped record at a time. Conversion is `ros_images.message_to_rgb`,
the same as a live ROS 2 node's.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from mmedge.errors import InvalidInputError, UnsupportedError, require
from mmedge.runtime.images import ImageLimits
from mmedge.runtime.ros_images import MSGTYPES, message_to_rgb

_RECORD_OVERHEAD = 1 << 16  # header, frame id and format strings around the pixels


@dataclass(frozen=True)
class BagFrame:
    timestamp: int  # the bag's record time, ns since the epoch: the key of every output line
    stamp: int | None  # the message header's stamp, ns (when the sensor took it)
    index: int  # the message's position on its topic, from 0 (before thinning)
    rgb: np.ndarray  # (H, W, 3) uint8


def check_thinning(every: int, max_rate: float | None) -> None:
    if isinstance(every, bool) or not isinstance(every, int) or every < 1:
        raise InvalidInputError(f"every must be an int >= 1, got {every!r}")
    if max_rate is not None and not (isinstance(max_rate, (int, float)) and 0 < max_rate < float("inf")):
        raise InvalidInputError(f"max_rate must be a positive number of frames per second, got {max_rate!r}")


def bag_frames(
    bag: str | os.PathLike[str],
    topic: str,
    every: int = 1,
    max_rate: float | None = None,
    limits: ImageLimits | None = None,
) -> Iterator[BagFrame]:
    """Frames of `topic` in time order: every `every`-th message, and at most `max_rate` a second of
    bag time. A message that is not a usable image stops the iteration with a typed error naming it."""
    check_thinning(every, max_rate)
    limits = limits or ImageLimits()
    require("rosbags", "ros")
    from rosbags.highlevel import AnyReader, AnyReaderError
    from rosbags.rosbag1 import ReaderError as Ros1Error
    from rosbags.rosbag2 import ReaderError as Ros2Error
    from rosbags.typesys import Stores, get_typestore

    path = Path(bag).expanduser()
    if not path.exists():
        raise InvalidInputError(f"bag {str(path)!r} does not exist")
    cap = max(limits.max_bytes, limits.max_decoded_bytes) + _RECORD_OVERHEAD
    gap = None if max_rate is None else int(1e9 / max_rate)  # ns between kept frames
    try:
        with AnyReader([path], default_typestore=get_typestore(Stores.ROS2_HUMBLE)) as reader:
            conns = [c for c in reader.connections if c.topic == topic]
            if not conns:
                images = sorted({c.topic for c in reader.connections if c.msgtype in MSGTYPES})
                raise InvalidInputError(
                    f"bag {str(path)!r} has no topic {topic!r}; its image topics: {', '.join(images) or 'none'}"
                )
            kinds = {c.msgtype for c in conns} - set(MSGTYPES)
            if kinds:
                raise UnsupportedError(
                    f"topic {topic!r} carries {', '.join(sorted(kinds))}; accepted: {', '.join(MSGTYPES)}"
                )
            last: int | None = None
            for i, (conn, timestamp, raw) in enumerate(reader.messages(connections=conns)):
                if i % every or (gap is not None and last is not None and timestamp - last < gap):
                    continue
                what = f"{topic} message #{i} at {timestamp} ns"
                if len(raw) > cap:
                    raise InvalidInputError(
                        f"{what}: the record is {len(raw)} bytes; images are capped at {cap}"
                    )
                msg = _deserialize(reader, raw, conn.msgtype, what)
                rgb = message_to_rgb(msg, what, limits)
                last = timestamp
                yield BagFrame(timestamp, _stamp(msg), i, rgb)
    except (AnyReaderError, Ros1Error, Ros2Error) as exc:
        raise InvalidInputError(f"cannot read bag {str(path)!r}: {exc}"[:1000]) from None


def _deserialize(reader: object, raw: bytes, msgtype: str, what: str) -> object:
    try:
        return reader.deserialize(raw, msgtype)  # type: ignore[attr-defined]
    except Exception as exc:  # whatever a truncated or crafted record makes the decoder raise
        raise InvalidInputError(
            f"{what}: cannot decode the {msgtype} record ({type(exc).__name__}: {exc})"[:1000]
        ) from None


def _stamp(msg: object) -> int | None:
    stamp = getattr(getattr(msg, "header", None), "stamp", None)
    if stamp is None:
        return None
    return int(stamp.sec) * 1_000_000_000 + int(stamp.nanosec)
