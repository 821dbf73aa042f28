"""Hostile images, request parameters and package locations (issue 15, round two).

Each case builds its hostile input here and expects the exact `mmedge.errors` class with a message
naming the problem. Memory bounds are measured in a child process (its own peak RSS, VmHWM), so
the test process's own allocations do not hide them; every test runs under a watchdog.
"""

from __future__ import annotations

import faulthandler
import importlib.util
import os
import struct
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest

import mmedge
from mmedge.errors import InvalidInputError, MmedgeError

WATCHDOG_S = 60
CHILD_TIMEOUT_S = 120
SRC = str(Path(mmedge.__file__).resolve().parents[1])  # the mmedge under test, for child processes
LINUX_ONLY = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc/self/status")


@pytest.fixture(autouse=True)
def _watchdog():
    faulthandler.dump_traceback_later(WATCHDOG_S, exit=True)
    yield
    faulthandler.cancel_dump_traceback_later()


def _child(code: str) -> subprocess.CompletedProcess:
    """Run `code` in a fresh interpreter that has `peak_mb()`: its own peak RSS in MB."""
    prelude = textwrap.dedent("""
        def peak_mb():
            # VmHWM: this process's own peak. (ru_maxrss keeps the forking parent's peak across exec.)
            with open("/proc/self/status") as f:
                return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:")) / 1024
    """)
    env = {**os.environ, "PYTHONPATH": SRC, "PYTHONFAULTHANDLER": "1", "OMP_NUM_THREADS": "1"}
    return subprocess.run(
        [sys.executable, "-c", prelude + textwrap.dedent(code)],
        capture_output=True,
        text=True,
        timeout=CHILD_TIMEOUT_S,
        env=env,
        check=False,
    )


def _grew(proc: subprocess.CompletedProcess) -> float:
    assert proc.returncode == 0, f"child exit {proc.returncode}\n{proc.stdout}\n{proc.stderr[-3000:]}"
    return float(proc.stdout.rsplit("GREW_MB", 1)[1])


# --- images: builders ---------------------------------------------------------------------------


def _chunk(kind: bytes, data: bytes) -> bytes:
    return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))


def _png_zeros(width: int, height: int, depth: int, color: int, channels: int) -> bytes:
    """A valid, all-zero PNG streamed row by row (a 288 MB image in a ~1 MB file, without 288 MB here)."""
    row = bytes(1 + width * channels * depth // 8)
    comp = zlib.compressobj(1)
    idat = b"".join(comp.compress(row) for _ in range(height)) + comp.flush()
    ihdr = struct.pack(">IIBBBBB", width, height, depth, color, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + _chunk(b"IHDR", ihdr) + _chunk(b"IDAT", idat) + _chunk(b"IEND", b"")


def _progressive_jpeg(size: int, repeat: int = 1) -> bytes:
    """A progressive JPEG of a flat image, its scans repeated `repeat` times (libjpeg decodes them all)."""
    import cv2

    jpg = cv2.imencode(".jpg", np.full((size, size, 3), 90, np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1]
    data = jpg.tobytes()
    first, end = data.index(b"\xff\xda"), data.rindex(b"\xff\xd9")
    return data[:first] + data[first:end] * repeat + data[end:]


# --- images ------------------------------------------------------------------------------------


def test_progressive_jpeg_scan_bomb_is_refused_before_decoding() -> None:
    """2,000 scans over a 2048x2048 image: 4 s of decoding before (a minute at 7000x7000), now none."""
    from mmedge.runtime.images import load_image

    bomb = _progressive_jpeg(2048, repeat=200)
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match=r"JPEG has 2000 scans; the limit is 64") as info:
        load_image(bomb)
    assert type(info.value) is InvalidInputError
    assert time.perf_counter() - start < 1.0


def test_ordinary_progressive_jpeg_still_loads() -> None:
    from mmedge.runtime.image_headers import read_header
    from mmedge.runtime.images import load_image

    data = _progressive_jpeg(64)
    assert read_header(data, "jpeg").scans == data.count(b"\xff\xda") >= 2
    assert load_image(data).shape == (64, 64, 3)


def test_jpeg_scan_limit_is_configurable() -> None:
    from mmedge.runtime.images import ImageLimits, load_image

    data = _progressive_jpeg(32)
    with pytest.raises(InvalidInputError, match=r"scans; the limit is 2"):
        load_image(data, limits=ImageLimits(max_jpeg_scans=2))


def test_decoded_bytes_count_bit_depth_and_channels() -> None:
    """A 16-bit RGBA PNG decodes to 8 bytes a pixel: refused from its header when that passes the cap."""
    from mmedge.runtime.images import ImageLimits, load_image

    data = _png_zeros(256, 256, 16, 6, 4)  # 256*256*8 = 524,288 bytes decoded
    with pytest.raises(
        InvalidInputError, match=r"png image of 256x256 decodes to 524288 bytes \(8 a pixel\)"
    ):
        load_image(data, limits=ImageLimits(max_decoded_bytes=500_000))
    rgb8 = _png_zeros(256, 256, 8, 2, 3)  # 196,608 bytes: under the same cap
    assert load_image(rgb8, limits=ImageLimits(max_decoded_bytes=500_000)).shape == (256, 256, 3)


@LINUX_ONLY
def test_sixteen_bit_rgba_png_refused_without_allocating(tmp_path: Path) -> None:
    """6000x6000 16-bit RGBA in a 1.2 MB file: 288 MB decoded (old code: +750 MB peak); now refused first."""
    (tmp_path / "bomb.png").write_bytes(_png_zeros(6000, 6000, 16, 6, 4))
    proc = _child(f"""
        from mmedge.errors import InvalidInputError
        from mmedge.runtime.images import load_image
        data = open({str(tmp_path / "bomb.png")!r}, "rb").read()
        before = peak_mb()
        try:
            load_image(data)
            print("DECODED")
        except InvalidInputError as exc:
            print("REFUSED", exc)
        print("GREW_MB", peak_mb() - before)
    """)
    grew = _grew(proc)
    assert "REFUSED png image of 6000x6000 decodes to 288000000 bytes" in proc.stdout, proc.stdout
    assert grew < 20, f"peak RSS grew {grew:.0f} MB"


@LINUX_ONLY
def test_embed_images_decodes_one_image_at_a_time(tiny_pkg_session: Path, tmp_path: Path) -> None:
    """Eight 2000x2000 PNGs in one call: old code held every decoded image (12 MB each) before
    preprocessing any; now the peak is about one image's worth."""
    import cv2

    img = np.zeros((2000, 2000, 3), np.uint8)
    img[:1000] = 200
    paths = []
    for i in range(8):
        paths.append(str(tmp_path / f"big{i}.png"))
        cv2.imwrite(paths[-1], img)
    one_mb = img.nbytes / 2**20
    proc = _child(f"""
        import numpy as np
        from mmedge import sdk
        pipe = sdk.Pipeline({str(tiny_pkg_session)!r})
        small = pipe.embed_images([np.zeros((64, 64, 3), np.uint8)])  # sessions and buffers warmed up
        before = peak_mb()
        vecs = pipe.embed_images({paths!r})
        print(vecs.shape, "GREW_MB", peak_mb() - before)
    """)
    grew = _grew(proc)
    assert "(8, " in proc.stdout, proc.stdout
    assert grew < 4 * one_mb, f"peak RSS grew {grew:.0f} MB for 8 images of {one_mb:.0f} MB each"


def test_embed_images_one_at_a_time_matches_a_batch(tiny_pkg_session: Path) -> None:
    from mmedge import sdk
    from mmedge.runtime.images import load_image, preprocess

    pipe = sdk.Pipeline(str(tiny_pkg_session))
    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (h, w, 3), dtype=np.uint8) for h, w in ((40, 60), (64, 64), (90, 31))]
    pixels = preprocess([load_image(x) for x in images], pipe.preprocess)
    want = pipe.runner.run_path("image", {"pixel_values": pixels})
    want = want / np.linalg.norm(want, axis=1, keepdims=True)
    np.testing.assert_allclose(pipe.embed_images(images), want, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "path, match",
    [
        pytest.param("\ud800.png", r"image path '\\ud800\.png' is not valid Unicode", id="lone-surrogate"),
        pytest.param("/tmp/x\udfff/y.png", r"is not valid Unicode", id="surrogate-in-dir"),
    ],
)
def test_surrogate_image_path_is_typed(path: str, match: str) -> None:
    from mmedge.runtime.images import load_image

    with pytest.raises(InvalidInputError, match=match):
        load_image(path)


# --- generation parameters ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "kwargs, match",
    [
        pytest.param(
            {"seed": -1}, r"seed must be an int in \[0, 2\*\*128\) or None, got -1", id="seed-negative"
        ),
        pytest.param({"seed": 2**200}, r"seed must be an int in \[0, 2\*\*128\)", id="seed-huge"),
        pytest.param({"seed": -1, "do_sample": True}, r"seed must be", id="seed-negative-sampling"),
        pytest.param({"stop_strings": None}, r"stop_strings must be a list .* got None", id="stop-none"),
        pytest.param({"stop_strings": 5}, r"stop_strings must be a list .* got 5", id="stop-int"),
        pytest.param({"stop_strings": iter(["a"])}, r"stop_strings must be a list", id="stop-iterator"),
        pytest.param({"stop_strings": "ab"}, r"stop_strings must be a list", id="stop-str"),
        pytest.param({"stop_strings": {"a": 1}}, r"stop_strings must be a list", id="stop-dict"),
    ],
)
def test_generation_parameters_are_typed_errors(kwargs: dict, match: str) -> None:
    from mmedge.runtime.generation import GenerationConfig

    with pytest.raises(InvalidInputError, match=match) as info:
        GenerationConfig.from_kwargs(**kwargs)
    assert type(info.value) is InvalidInputError


def test_stop_strings_list_and_tuple_still_accepted() -> None:
    from mmedge.runtime.generation import GenerationConfig

    assert GenerationConfig.from_kwargs(stop_strings=["a", "b"]).stop_strings == ("a", "b")
    assert GenerationConfig.from_kwargs(stop_strings=("a",), seed=0).stop_strings == ("a",)


@pytest.mark.parametrize("temperature", [1e-40, 1e-320, 5e-324, 1e-8])
def test_tiny_temperature_samples_the_top_token(temperature: float) -> None:
    """Old code: logits / 1e-40 overflowed to inf, inf - inf = NaN, `Probabilities contain NaN`."""
    from mmedge.runtime import generation
    from mmedge.runtime.generation import GenerationConfig

    cfg = GenerationConfig.from_kwargs(do_sample=True, temperature=temperature, seed=0, top_k=0)
    logits = np.random.default_rng(1).normal(size=320).astype(np.float32) * 30
    seen = np.zeros(320, bool)
    for top_k in (0, 5):
        cfg = GenerationConfig.from_kwargs(do_sample=True, temperature=temperature, seed=0, top_k=top_k)
        token = generation._choose(logits.copy(), cfg, np.random.default_rng(0), seen, None)
        assert token == int(np.argmax(logits))


def _choose_as_before(logits: np.ndarray, temperature: float, top_k: int, top_p: float, seed: int) -> int:
    """The sampling step as it was (divide, then shift), for ordinary temperatures."""
    logits = logits / temperature
    kth = np.partition(logits, -top_k)[-top_k]
    logits[logits < kth] = -np.inf
    probs = np.exp(logits - logits.max())
    probs /= probs.sum()
    order = np.argsort(probs)
    drop = order[np.cumsum(probs[order]) <= 1.0 - top_p]
    probs[drop] = 0.0
    probs /= probs.sum()
    return int(np.random.default_rng(seed).choice(probs.size, p=probs))


def test_sampling_at_ordinary_temperatures_is_unchanged() -> None:
    from mmedge.runtime import generation
    from mmedge.runtime.generation import GenerationConfig

    logits = np.random.default_rng(2).normal(size=64).astype(np.float32) * 3
    for temperature in (0.7, 1.0, 1.5):
        cfg = GenerationConfig.from_kwargs(do_sample=True, temperature=temperature, top_k=10, top_p=0.9)
        for seed in range(20):
            ours = generation._choose(
                logits.copy(), cfg, np.random.default_rng(seed), np.zeros(64, bool), None
            )
            assert ours == _choose_as_before(logits.copy(), temperature, 10, 0.9, seed), (temperature, seed)


# --- package locations --------------------------------------------------------------------------


@pytest.mark.parametrize(
    "location, match",
    [
        pytest.param(42, r"takes a package name or path \(str or os.PathLike\), got int", id="int"),
        pytest.param(None, r"got NoneType", id="none"),
        pytest.param(b"clip-tiny", r"got bytes", id="bytes"),
        pytest.param("x" * 5000, r"package path is 5000 bytes long; the limit is 4096", id="name-5000"),
        pytest.param(
            "/tmp/" + "a" * 300, r"has a 300-byte name; the limit is 255 bytes per name", id="component-300"
        ),
        pytest.param("a/" * 3000, r"package path is 6000 bytes long", id="deep-path"),
        pytest.param("\ud800", r"is not valid Unicode", id="lone-surrogate"),
        pytest.param("/tmp/pkg\udcff\ud800", r"is not valid Unicode", id="surrogate-path"),
        pytest.param("pkg\x00name", r"contains a NUL character", id="nul"),
        pytest.param(Path("x" * 300), r"has a 300-byte name", id="pathlike-long"),
    ],
)
def test_pipeline_location_is_typed(location: object, match: str, store: Path) -> None:
    from mmedge import sdk

    with pytest.raises(InvalidInputError, match=match) as info:
        sdk.Pipeline(location)  # type: ignore[arg-type]
    assert type(info.value) is InvalidInputError


def test_pipeline_location_unknown_name_is_still_not_found(store: Path) -> None:
    from mmedge import sdk
    from mmedge.errors import ModelNotFoundError

    with pytest.raises(ModelNotFoundError):
        sdk.Pipeline("no-such-model")


# --- fuzz targets for these entry points ---------------------------------------------------------


def _harness():
    path = Path(__file__).resolve().parents[2] / "fuzz" / "fuzz_entry_points.py"
    spec = importlib.util.spec_from_file_location("fuzz_entry_points_inputs", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("name", ["tokenizer_json", "image_header"])
def test_fuzz_target_runs_on_hostile_seeds(name: str, tiny_pkg_session: Path, tmp_path: Path) -> None:
    fuzz = _harness()
    assert name in fuzz.TARGETS
    target = fuzz.make_target(name, package=tiny_pkg_session, workdir=tmp_path)
    extra = [
        _progressive_jpeg(64, repeat=10),
        _png_zeros(64, 64, 16, 6, 4),
        b"J\xff\xd8\xff\xda",
        b"P" + bytes(40),
    ]
    for i, data in enumerate(fuzz.seeds(name, tiny_pkg_session) + extra):
        try:
            target(data)
        except MmedgeError:
            pytest.fail(f"{name} input {i}: the target must swallow MmedgeError")
        except Exception as exc:
            pytest.fail(f"{name} input {i} ({data[:60]!r}) raised {type(exc).__name__}: {exc}")
