"""ROS image messages -> (H, W, 3) uint8 RGB arrays, checked like any other image input.

One conversion for messages read from a bag (rosbags) and received live (rclpy, see
examples/ros2_caption_node.py): both give objects with the fields of sensor_msgs/Image
(`height`, `width`, `encoding`, `step`, `data`) or sensor_msgs/CompressedImage (`format`,
`data`), whose `data` supports the buffer protocol (numpy arrays, bytes, array.array). Nothing here
imports a ROS library.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from mmedge.errors import InvalidInputError, UnsupportedError
from mmedge.runtime.images import ImageLimits, load_image

IMAGE = "sensor_msgs/msg/Image"
COMPRESSED = "sensor_msgs/msg/CompressedImage"
MSGTYPES = (IMAGE, COMPRESSED)
# encoding -> (channels, channel order)
ENCODINGS = {"rgb8": (3, "RGB"), "bgr8": (3, "BGR"), "mono8": (1, "RGB")}
_DEPTH = ("16UC1", "16SC1", "32FC1", "mono16")


def msgtype_of(msg: Any) -> str:
    """The ROS type of a message object: rosbags records it, rclpy messages answer by their fields."""
    name = getattr(msg, "__msgtype__", None)
    if isinstance(name, str):
        return name
    if hasattr(msg, "format") and hasattr(msg, "data"):
        return COMPRESSED
    if hasattr(msg, "encoding") and hasattr(msg, "step"):
        return IMAGE
    return type(msg).__name__


def message_to_rgb(msg: Any, what: str, limits: ImageLimits | None = None) -> np.ndarray:
    """A new (H, W, 3) uint8 RGB array from a sensor_msgs/Image or CompressedImage; every refusal is a
    typed error whose message starts with `what` (e.g. "/camera message #12 at 1700000000500000000 ns")."""
    kind = msgtype_of(msg)
    limits = limits or ImageLimits()
    try:
        if kind == IMAGE:
            return _raw_to_rgb(msg, limits)
        if kind == COMPRESSED:
            return _compressed_to_rgb(msg, limits)
    except (InvalidInputError, UnsupportedError) as exc:
        raise type(exc)(f"{what}: {exc}") from None
    raise UnsupportedError(f"{what}: a {kind} message is not an image; accepted: {', '.join(MSGTYPES)}")


def _buffer(data: Any) -> np.ndarray:
    try:
        return np.frombuffer(memoryview(data).cast("B"), np.uint8)
    except (TypeError, ValueError):
        raise InvalidInputError(f"image data is a {type(data).__name__}, not a byte buffer") from None


def _raw_to_rgb(msg: Any, limits: ImageLimits) -> np.ndarray:
    encoding = str(msg.encoding)
    if encoding not in ENCODINGS:
        if encoding in _DEPTH or "16" in encoding:
            raise UnsupportedError(
                f"encoding {encoding!r} is a 16-bit or float (depth) image; the models take 8-bit colour or "
                f"grey images ({', '.join(ENCODINGS)}): convert depth to a colour map first"
            )
        raise UnsupportedError(
            f"image encoding {encoding[:40]!r} is not accepted; accepted: {', '.join(ENCODINGS)}"
        )
    channels, order = ENCODINGS[encoding]
    height, width, step = int(msg.height), int(msg.width), int(msg.step)
    if height <= 0 or width <= 0:
        raise InvalidInputError(f"image has zero size ({width}x{height})")
    if height * width > limits.max_pixels:  # before any copy: the header alone can claim anything
        raise InvalidInputError(
            f"image is {width}x{height} = {width * height} pixels; the cap is {limits.max_pixels}"
        )
    if step < width * channels:
        raise InvalidInputError(
            f"row step {step} is shorter than {width} {encoding} pixels ({width * channels} bytes)"
        )
    data = _buffer(msg.data)
    if data.size != height * step:
        raise InvalidInputError(
            f"image data is {data.size} bytes; {height} rows of step {step} make {height * step}"
        )
    rows = data.reshape(height, step)[:, : width * channels]
    pixels = rows.reshape(height, width, channels) if channels > 1 else rows
    return load_image(pixels, channel_order=order, limits=limits)  # a new array, never a view of the message


def _compressed_to_rgb(msg: Any, limits: ImageLimits) -> np.ndarray:
    fmt = str(msg.format)
    if "compresseddepth" in fmt.lower():
        raise UnsupportedError(
            f"format {fmt[:60]!r} is a compressed depth image; the models take 8-bit colour or grey images"
        )
    return load_image(_buffer(msg.data).tobytes(), limits=limits)  # format from the magic bytes, capped
