"""A ROS 2 node that captions (chat packages) or embeds (retrieval packages) camera images live.

    python examples/ros2_caption_node.py PACKAGE_OR_NAME /camera/image_raw [--compressed] [--every N]

It subscribes to a sensor_msgs/Image topic (sensor_msgs/CompressedImage with --compressed) and
publishes one std_msgs/String of JSON per processed frame on TOPIC/mmedge: the header stamp and
the caption or the embedding, the same lines `mmedge caption|embed --rosbag` writes for a bag. The
image conversion is mmedge's (`mmedge.runtime.ros_images.message_to_rgb`), shared with the bag reader.

`main` needs a ROS 2 installation (rclpy, sensor_msgs and std_msgs, sourced from /opt/ros/<distro>):
rclpy is not on PyPI, so the test suite cannot run the node's wiring. It runs `FrameHandler`,
which does all the work and imports nothing from ROS, on messages read from a bag.
"""

from __future__ import annotations

import argparse
import logging
from typing import Any

from mmedge import sdk
from mmedge.errors import MmedgeError
from mmedge.runtime.retrieval import RetrievalPipeline
from mmedge.runtime.ros_images import message_to_rgb

log = logging.getLogger("mmedge.ros2")


class FrameHandler:
    """Every `every`-th message -> a dict (stamp and caption or embedding), or None when skipped or refused.

    A refused message (a depth encoding, a truncated frame) is logged and counted, not raised: a live
    node keeps going."""

    def __init__(self, pipeline: Any, topic: str, every: int = 1, max_new_tokens: int = 16):
        self.pipeline, self.topic, self.every = pipeline, topic, every
        self.max_new_tokens = max_new_tokens
        self.seen = 0
        self.errors = 0

    def __call__(self, msg: Any) -> dict[str, object] | None:
        i = self.seen
        self.seen += 1
        if i % self.every:
            return None
        stamp = msg.header.stamp.sec * 1_000_000_000 + msg.header.stamp.nanosec
        try:
            rgb = message_to_rgb(
                msg, f"{self.topic} message #{i} stamped {stamp} ns", self.pipeline.runner.image_limits
            )
            if isinstance(self.pipeline, RetrievalPipeline):
                return {"stamp": stamp, "embedding": self.pipeline.embed_images([rgb])[0].tolist()}
            return {"stamp": stamp, "caption": self.pipeline.caption(rgb, max_new_tokens=self.max_new_tokens)}
        except MmedgeError as exc:
            self.errors += 1
            log.warning("%s", exc)
            return None


def main() -> None:  # pragma: no cover - needs ROS 2
    import json

    import rclpy
    from sensor_msgs.msg import CompressedImage, Image
    from std_msgs.msg import String

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("topic")
    ap.add_argument("--compressed", action="store_true", help="the topic carries sensor_msgs/CompressedImage")
    ap.add_argument("--every", type=int, default=1, help="process every Nth message")
    args = ap.parse_args()

    handle = FrameHandler(sdk.Pipeline(args.package), args.topic, every=args.every)
    rclpy.init()
    node = rclpy.create_node("mmedge")
    out = node.create_publisher(String, args.topic.rstrip("/") + "/mmedge", 10)

    def on_message(msg: Any) -> None:
        result = handle(msg)
        if result is not None:
            out.publish(String(data=json.dumps(result)))

    node.create_subscription(CompressedImage if args.compressed else Image, args.topic, on_message, 10)
    try:
        rclpy.spin(node)
    finally:
        node.destroy_node()
        rclpy.shutdown()


if __name__ == "__main__":
    main()
