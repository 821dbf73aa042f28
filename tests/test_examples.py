"""Every example script runs."""

from __future__ import annotations

import contextlib
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import cv2
import numpy as np
import pytest

from mmedge.data import generate_scenes

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def test_retrieval_example(tiny_pkg_session: Path, tmp_path: Path) -> None:
    for i, s in enumerate(generate_scenes(5, seed=4)):
        cv2.imwrite(str(tmp_path / f"{i}.png"), s.image[:, :, ::-1])
    out = subprocess.run(
        [
            sys.executable,
            str(EXAMPLES / "retrieval.py"),
            str(tiny_pkg_session),
            str(tmp_path),
            "a red circle",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert len(out.stdout.strip().splitlines()) == 3


def test_camera_loop_captions_each_frame_of_a_video(tiny_chat_pkg_session: Path, tmp_path: Path) -> None:
    from mmedge import sdk

    video = tmp_path / "camera.avi"
    writer = cv2.VideoWriter(str(video), cv2.VideoWriter_fourcc(*"MJPG"), 10, (64, 64))
    assert writer.isOpened()
    for scene in generate_scenes(6, seed=9, image_size=64):
        writer.write(np.ascontiguousarray(scene.image[:, :, ::-1]))  # VideoWriter takes BGR
    writer.release()

    out = run_example(
        "camera_loop.py", str(tiny_chat_pkg_session), str(video), "--every", "2", "--max-new-tokens", "6"
    )
    lines = out.strip().splitlines()
    rows = [re.fullmatch(r"frame\s+(\d+)\s+([\d.]+) ms  (.*)", line) for line in lines[:-1]]
    assert all(rows), lines
    assert [int(r.group(1)) for r in rows if r] == [0, 2, 4]
    assert all(float(r.group(2)) > 0 for r in rows if r)
    assert lines[-1].startswith("3 frames captioned of 6 read; mean latency")

    pipe = sdk.Pipeline(tiny_chat_pkg_session)  # the same frames, decoded here, captioned in-process
    capture = cv2.VideoCapture(str(video))
    frames = [capture.read()[1] for _ in range(6)]
    want = [pipe.caption(frames[i], channel_order="BGR", max_new_tokens=6) for i in (0, 2, 4)]
    assert [r.group(3) for r in rows if r] == want


def test_openai_client_script_against_mmedge_serve(
    tiny_pkg_session: Path, tiny_chat_pkg_session: Path, tmp_path: Path
) -> None:
    pytest.importorskip("openai")
    pytest.importorskip("fastapi")
    from mmedge import sdk

    image = tmp_path / "scene.png"
    cv2.imwrite(str(image), generate_scenes(1, seed=2, image_size=64)[0].image[:, :, ::-1])
    question = "what colour is the circle?"
    with mmedge_serve(tiny_pkg_session, tiny_chat_pkg_session) as base_url:
        out = run_example(
            "openai_client.py",
            str(image),
            question,
            "--chat-model",
            "blip2-tiny",
            "--embed-model",
            "clip-tiny",
            "--base-url",
            base_url,
            "--max-tokens",
            "8",
        )
    answer = sdk.Pipeline(tiny_chat_pkg_session).chat(str(image), question, max_new_tokens=8)
    clip = sdk.Pipeline(tiny_pkg_session)
    similarity = float(clip.embed_images([str(image)])[0] @ clip.embed_texts([question])[0])
    lines = out.strip().splitlines()
    assert lines[0] == f"answer: {answer}" and answer
    match = re.fullmatch(r"image-question similarity: (-?[\d.]+) \((\d+)-d vectors\)", lines[1])
    assert match and abs(float(match.group(1)) - similarity) < 2e-6 and int(match.group(2)) == clip.dim


@pytest.mark.ray
def test_ray_embedding_script_joins_a_running_instance(
    ray_instance: str, tiny_pkg_session: Path, tmp_path: Path
) -> None:
    from mmedge import sdk
    from mmedge.sdk.ray_embed import read_embeddings

    paths = []
    for i, s in enumerate(generate_scenes(12, seed=6, image_size=48)):
        paths.append(str(tmp_path / "images" / f"{i:02d}.png"))
        (tmp_path / "images").mkdir(exist_ok=True)
        cv2.imwrite(paths[-1], s.image[:, :, ::-1])
    out = run_example(
        "ray_embed.py",
        str(tiny_pkg_session),
        str(tmp_path / "images"),
        str(tmp_path / "out"),
        "--address",
        ray_instance,
        "--actors",
        "1",
        "--batch-size",
        "5",
    )
    assert "'images': 12" in out and len(re.findall(r"-> nearest", out)) == 3
    ids, got, vectors = read_embeddings(tmp_path / "out")
    assert ids.tolist() == list(range(12)) and got == paths
    np.testing.assert_allclose(vectors, sdk.Pipeline(tiny_pkg_session).embed_images(paths), atol=1e-6)


def run_example(name: str, *args: str) -> str:
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@contextlib.contextmanager
def mmedge_serve(*packages: Path) -> Iterator[str]:
    """`mmedge serve PACKAGES --port 0` in a child process; yields its /v1 URL once it listens."""
    server = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "mmedge.sdk.cli",
            "serve",
            *map(str, packages),
            "--port",
            "0",
            "--log-level",
            "warning",
        ],
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert server.stderr is not None
        for line in server.stderr:  # the server prints where it listens once the socket is bound
            match = re.search(r"listening on (http://\S+)", line)
            if match:
                yield match.group(1) + "/v1"
                break
        else:
            pytest.fail(f"mmedge serve exited with {server.wait()} before listening")
    finally:
        server.terminate()
        # uvicorn drains, then re-raises the signal so that the exit status says what stopped it
        assert server.wait(timeout=60) in (0, -signal.SIGTERM)
