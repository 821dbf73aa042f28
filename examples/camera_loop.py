"""Caption camera frames as they come, with each frame's latency: OpenCV capture + a chat package.

    python examples/camera_loop.py PACKAGE_OR_NAME VIDEO [--every N] [--max-frames N] [--max-new-tokens N]

VIDEO is a video file or a camera index (0 for the first camera). Every Nth frame is captioned; one
line per captioned frame gives its index, the caption latency and the caption, then a summary line.
Frames come from OpenCV in BGR order, which the pipeline takes as is (`channel_order="BGR"`).
"""

from __future__ import annotations

import argparse
import time

import cv2

from mmedge import sdk


def main(argv: list[str] | None = None) -> list[tuple[int, float, str]]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("package")
    ap.add_argument("video", help="a video file, or a camera index such as 0")
    ap.add_argument("--every", type=int, default=1, help="caption every Nth frame")
    ap.add_argument("--max-frames", type=int, default=None, help="stop after this many captions")
    ap.add_argument("--max-new-tokens", type=int, default=16)
    args = ap.parse_args(argv)

    pipe = sdk.Pipeline(args.package)
    capture = cv2.VideoCapture(int(args.video) if args.video.isdigit() else args.video)
    if not capture.isOpened():
        raise SystemExit(f"cannot open {args.video!r}")
    done: list[tuple[int, float, str]] = []
    index = 0
    try:
        while args.max_frames is None or len(done) < args.max_frames:
            ok, frame = capture.read()
            if not ok:  # the end of a file, or a camera that went away
                break
            if index % args.every == 0:
                start = time.perf_counter()
                caption = pipe.caption(frame, channel_order="BGR", max_new_tokens=args.max_new_tokens)
                ms = (time.perf_counter() - start) * 1000
                print(f"frame {index:5d}  {ms:8.1f} ms  {caption}", flush=True)
                done.append((index, ms, str(caption)))
            index += 1
    finally:
        capture.release()
    if done:
        mean = sum(ms for _, ms, _ in done) / len(done)
        print(f"{len(done)} frames captioned of {index} read; mean latency {mean:.1f} ms")
    return done


if __name__ == "__main__":
    main()
