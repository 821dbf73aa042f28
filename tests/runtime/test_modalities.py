"""Non-audio modalities of the torch-free runtime: point clouds, IMU, depth, thermal, time series,
video clips. References are brute force (points) or torch (IMU windows, antialiased resize)."""

from __future__ import annotations

import struct
import time
import zlib

import cv2
import numpy as np
import pytest

from mmedge.errors import ConfigError, InvalidInputError
from mmedge.runtime import points as points_mod
from mmedge.runtime.depth import (
    DepthConfig,
    MapLimits,
    ThermalConfig,
    depth_to_disparity,
    load_map_png,
    preprocess_depth,
    preprocess_thermal,
    resize_map,
)
from mmedge.runtime.imu import ImuConfig, ImuLimits, imu_windows, preprocess_imu
from mmedge.runtime.points import (
    PointConfig,
    PointLimits,
    farthest_point_sample,
    group_points,
    knn_indices,
    normalize_unit_sphere,
)
from mmedge.runtime.series import SeriesConfig, SeriesLimits, preprocess_series

BAD_DTYPES = [
    np.zeros((40, 3), np.complex64),
    np.zeros((40, 3), bool),
    np.zeros((40, 3), object),
    np.zeros((40, 3), "U1"),
    np.zeros((40, 3), "datetime64[s]"),
]


def pairwise_sq(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(A, B) squared distances, summed x + y + z in that order, in float64."""
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (
        (a[:, None, 0] - b[None, :, 0]) ** 2
        + (a[:, None, 1] - b[None, :, 1]) ** 2
        + (a[:, None, 2] - b[None, :, 2]) ** 2
    )


def fps_reference(xyz: np.ndarray, count: int) -> list[int]:
    """Greedy farthest point sampling from the full distance matrix: start at 0, then each pick
    maximises the minimum distance to the points already picked (the lowest index on a tie)."""
    dist = pairwise_sq(xyz, xyz)
    chosen = [0]
    while len(chosen) < count:
        to_set = dist[:, chosen].min(axis=1)
        best = max(range(len(xyz)), key=lambda i: (to_set[i], -i))
        chosen.append(best)
    return chosen


# ---------------------------------------------------------------------------------------------
# Point clouds
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", range(4))
def test_fps_matches_brute_force(seed: int) -> None:
    rng = np.random.default_rng(seed)
    xyz = rng.normal(size=(int(rng.integers(40, 200)), 3)).astype(np.float32)
    count = int(rng.integers(2, 24))
    got = farthest_point_sample(xyz, count)
    assert got.dtype == np.int64 and got.tolist() == fps_reference(xyz, count)
    assert len(set(got.tolist())) == count  # distinct while points are distinct


def test_fps_ties_pick_the_lowest_index() -> None:
    # A unit cube's corners: after corner 0, the opposite corner; then six corners tie.
    cube = np.array([[x, y, z] for x in (0, 1) for y in (0, 1) for z in (0, 1)], np.float32)
    got = farthest_point_sample(cube, 8)
    assert got.tolist() == fps_reference(cube, 8)
    assert got[:3].tolist() == [0, 7, 1]


def test_fps_with_duplicates_is_deterministic() -> None:
    xyz = np.zeros((10, 3), np.float32)
    assert farthest_point_sample(xyz, 4).tolist() == [0, 0, 0, 0]


@pytest.mark.parametrize("seed", range(3))
@pytest.mark.parametrize("order", ["random", "sorted"])
def test_knn_matches_stable_argsort(seed: int, order: str) -> None:
    rng = np.random.default_rng(seed)
    xyz = rng.uniform(-1, 1, size=(3000, 3))
    if order == "sorted":  # spatially ordered rows: the strided bound sees few near points
        xyz = xyz[np.argsort(xyz[:, 0])]
    queries = xyz[rng.choice(3000, 20, replace=False)]
    for k in (1, 16, 47):
        want = np.argsort(pairwise_sq(queries, xyz), axis=1, kind="stable")[:, :k]
        np.testing.assert_array_equal(knn_indices(xyz, queries, k), want)


def test_knn_ties_on_a_grid_and_in_blocks(monkeypatch: pytest.MonkeyPatch) -> None:
    # Integer grid: many equal distances; ties go to the lower index, as a stable argsort.
    xyz = np.stack(np.meshgrid(*[np.arange(5.0)] * 3, indexing="ij"), -1).reshape(-1, 3)
    queries = xyz[[0, 31, 62, 124]]
    want = np.argsort(pairwise_sq(queries, xyz), axis=1, kind="stable")[:, :11]
    np.testing.assert_array_equal(knn_indices(xyz, queries, 11), want)
    monkeypatch.setattr(points_mod, "_KNN_BLOCK", 2 * len(xyz))  # two queries a block
    np.testing.assert_array_equal(knn_indices(xyz, queries, 11), want)


def test_group_points_relative_neighbourhoods() -> None:
    rng = np.random.default_rng(7)
    cloud = rng.normal(size=(500, 3)) * 4 + 10
    cfg = PointConfig(groups=16, group_size=8)
    groups = group_points(cloud, cfg)
    assert groups.neighbourhoods.shape == (16, 8, 3) and groups.neighbourhoods.dtype == np.float32
    assert groups.centres.shape == (16, 3) and groups.centres.dtype == np.float32
    norm = normalize_unit_sphere(cloud)
    np.testing.assert_allclose(norm.mean(0), 0, atol=1e-12)
    assert np.isclose(np.linalg.norm(norm, axis=1).max(), 1.0)
    centre_idx = fps_reference(norm, 16)
    np.testing.assert_allclose(groups.centres, norm[centre_idx], atol=1e-6)
    knn = np.argsort(pairwise_sq(norm[centre_idx], norm), axis=1, kind="stable")[:, :8]
    np.testing.assert_allclose(groups.neighbourhoods, norm[knn] - norm[centre_idx][:, None], atol=1e-6)
    np.testing.assert_array_equal(groups.neighbourhoods[:, 0], 0)  # a centre is its own nearest point
    again = group_points(cloud.copy(), cfg)
    np.testing.assert_array_equal(again.neighbourhoods, groups.neighbourhoods)
    np.testing.assert_array_equal(again.centres, groups.centres)


def test_group_points_defaults_and_extra_channels() -> None:
    rng = np.random.default_rng(3)
    cloud = np.concatenate([rng.normal(size=(2048, 3)), rng.uniform(0, 1, size=(2048, 3))], 1).astype(
        np.float32
    )
    start = time.perf_counter()
    raw = group_points(cloud)
    assert time.perf_counter() - start < 1.0
    assert raw.neighbourhoods.shape == (64, 32, 6)
    plain = group_points(cloud[:, :3], PointConfig(normalize=False))
    rel = group_points(cloud, PointConfig(features="relative"))
    # The same groups: extra channels never move the geometry.
    np.testing.assert_array_equal(raw.neighbourhoods[..., :3], rel.neighbourhoods[..., :3])
    norm = normalize_unit_sphere(cloud[:, :3])
    centre_idx = farthest_point_sample(norm, 64)
    knn = knn_indices(norm, norm[centre_idx], 32)
    np.testing.assert_allclose(raw.neighbourhoods[..., 3:], cloud[knn, 3:])
    np.testing.assert_allclose(
        rel.neighbourhoods[..., 3:], cloud[knn, 3:] - cloud[centre_idx, None, 3:], atol=1e-6
    )
    # normalize=False: centres in the input's own coordinates.
    assert np.isin(plain.centres, cloud[:, :3]).all()


def test_points_refused_from_the_shape_before_any_work() -> None:
    huge = np.broadcast_to(np.zeros(3, np.float32), (10**8, 3))  # no memory behind it
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match=r"100000000 points.*max_points=1000000"):
        group_points(huge)
    assert time.perf_counter() - start < 0.1
    with pytest.raises(InvalidInputError, match="max_points=50"):
        group_points(np.zeros((51, 3)), limits=PointLimits(max_points=50))
    with pytest.raises(InvalidInputError, match="max_channels=16"):
        group_points(np.zeros((100, 17), np.float32))


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_points_non_finite_refused(bad: float) -> None:
    cloud = np.random.default_rng(0).normal(size=(100, 3))
    cloud[57, 1] = bad
    with pytest.raises(InvalidInputError, match=r"NaN|infinity"):
        group_points(cloud)


def test_points_bad_inputs() -> None:
    cloud = np.random.default_rng(0).normal(size=(100, 3))
    with pytest.raises(InvalidInputError, match=r"31 points; PointConfig.group_size=32"):
        group_points(cloud[:31], PointConfig(groups=8))
    with pytest.raises(InvalidInputError, match=r"40 points; PointConfig.groups=64"):
        group_points(cloud[:40])
    for shape in [(100, 2), (100,), (10, 10, 3)]:
        with pytest.raises(InvalidInputError, match="expected \\(N, 3\\)"):
            group_points(np.zeros(shape))
    for arr in BAD_DTYPES:
        with pytest.raises(InvalidInputError, match="dtype"):
            group_points(arr)
    with pytest.raises(InvalidInputError, match="numpy array"):
        group_points(cloud.tolist())  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        PointConfig(groups=0)
    with pytest.raises(ConfigError):
        PointConfig(features="normals")


# ---------------------------------------------------------------------------------------------
# IMU
# ---------------------------------------------------------------------------------------------


def test_imu_windows_match_imagebinds_unfold() -> None:
    torch = pytest.importorskip("torch")
    x = np.random.default_rng(0).normal(size=(3, 6, 2000)).astype(np.float32)
    t = torch.from_numpy(x)
    # ImageBind's IMUPreprocessor.forward: unfold the time axis, permute, flatten each window.
    ref = t.unfold(-1, 8, 8).permute(0, 2, 1, 3)
    ref = ref.reshape(ref.size(0), ref.size(1), -1).numpy()
    assert ref.shape == (3, 250, 48)
    np.testing.assert_array_equal(imu_windows(x), ref)
    np.testing.assert_array_equal(imu_windows(x[1]), ref[1])  # unbatched (6, T) -> (250, 48)
    # What the exporter writes instead of unfold (ONNX Runtime rejects it): reshape + permute.
    exported = t.reshape(3, 6, 250, 8).permute(0, 2, 1, 3).reshape(3, 250, 48).numpy()
    np.testing.assert_array_equal(exported, ref)
    # Element order, spelled out: token t holds channel c's samples 8t .. 8t+7 at 8c .. 8c+7.
    assert imu_windows(x[0])[5, 2 * 8 + 3] == x[0, 2, 5 * 8 + 3]


def test_preprocess_imu_crop_and_pad() -> None:
    trace = np.arange(6 * 3000, dtype=np.float64).reshape(6, 3000)
    out = preprocess_imu(trace)
    assert out.shape == (6, 2000) and out.dtype == np.float32
    np.testing.assert_array_equal(out, trace[:, 500:2500])
    np.testing.assert_array_equal(preprocess_imu(trace, ImuConfig(crop="start")), trace[:, :2000])
    short = np.ones((6, 1500), np.int16)
    padded = preprocess_imu(short)
    assert padded[:, :1500].min() == 1 and not padded[:, 1500:].any()
    assert preprocess_imu(trace[:, :2000]).base is None  # a new array, never the caller's
    with pytest.raises(ConfigError, match="multiple of window"):
        ImuConfig(samples=2001)


def test_imu_bad_inputs() -> None:
    for shape in [(2000, 6), (6,), (3, 6, 2000), (5, 2000), (7, 2000)]:
        with pytest.raises(InvalidInputError, match=r"expected \(6, T\)"):
            preprocess_imu(np.zeros(shape, np.float32))
    with pytest.raises(InvalidInputError, match="no samples"):
        preprocess_imu(np.zeros((6, 0), np.float32))
    huge = np.broadcast_to(np.float32(0), (6, 10**9))
    with pytest.raises(InvalidInputError, match="max_samples=1000000"):
        preprocess_imu(huge)
    with pytest.raises(InvalidInputError, match="max_samples=100"):
        preprocess_imu(np.zeros((6, 101)), limits=ImuLimits(max_samples=100))
    trace = np.zeros((6, 2000))
    trace[4, 1234] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        preprocess_imu(trace)
    for dtype in (bool, np.complex128, object):
        with pytest.raises(InvalidInputError, match="dtype"):
            preprocess_imu(np.zeros((6, 2000), dtype))
    with pytest.raises(InvalidInputError, match="numpy array"):
        preprocess_imu([[0.0] * 2000] * 6)  # type: ignore[arg-type]
    with pytest.raises(InvalidInputError, match="multiple of 8"):
        imu_windows(np.zeros((6, 2001)))


# ---------------------------------------------------------------------------------------------
# Depth and thermal
# ---------------------------------------------------------------------------------------------


def torch_resize_crop(x: np.ndarray, size: int) -> np.ndarray:
    """torchvision's Resize(size) (antialiased bilinear on a tensor) + CenterCrop(size), in float64."""
    torch = pytest.importorskip("torch")
    h, w = x.shape
    new = (size, int(size * w / h)) if h <= w else (int(size * h / w), size)
    t = torch.from_numpy(x.astype(np.float64))[None, None]
    out = torch.nn.functional.interpolate(t, size=new, mode="bilinear", antialias=True, align_corners=False)
    top, left = round((new[0] - size) / 2.0), round((new[1] - size) / 2.0)
    return out[0, 0, top : top + size, left : left + size].numpy()


@pytest.mark.parametrize("shape", [(480, 640), (640, 480), (100, 37), (224, 224), (9, 300), (1000, 1000)])
def test_resize_map_matches_torch_antialiased_bilinear(shape: tuple[int, int]) -> None:
    x = np.random.default_rng(0).uniform(0, 5, size=shape).astype(np.float32)
    got = resize_map(x, 224)
    assert got.shape == (224, 224) and got.dtype == np.float32
    np.testing.assert_allclose(got, torch_resize_crop(x, 224), rtol=0, atol=1e-5)


def test_preprocess_depth_values() -> None:
    cfg = DepthConfig()
    out = preprocess_depth(np.full((120, 160), 10.0, np.float32))
    assert out.shape == (1, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out, (10 / 75 - 0.0418) / 0.0295, rtol=1e-5)
    # Clamped to [0.01, 75] before scaling, as Omnivore's DepthNorm.
    np.testing.assert_allclose(preprocess_depth(np.full((8, 8), 500.0)), (1 - 0.0418) / 0.0295, rtol=1e-5)
    np.testing.assert_allclose(
        preprocess_depth(np.full((8, 8), -3.0)), (0.01 / 75 - 0.0418) / 0.0295, rtol=1e-5
    )
    # Against the torch pipeline: clamp, /75, Resize(224), CenterCrop(224), Normalize.
    disparity = np.random.default_rng(1).uniform(-5, 90, size=(300, 410)).astype(np.float32)
    ref = (torch_resize_crop(np.clip(disparity, 0.01, 75) / 75, 224) - cfg.mean) / cfg.std
    np.testing.assert_allclose(preprocess_depth(disparity)[0], ref, rtol=0, atol=1e-3)  # /0.0295 scales 1e-5
    small = preprocess_depth(disparity, DepthConfig(image_size=32, mean=0.0, std=1.0))
    np.testing.assert_allclose(small[0], torch_resize_crop(np.clip(disparity, 0.01, 75) / 75, 32), atol=1e-6)
    for ints in (np.uint16, np.int32):  # integer disparity maps are fine
        assert preprocess_depth(np.full((8, 8), 10, ints)).shape == (1, 224, 224)


def test_depth_to_disparity() -> None:
    depth = np.array([[1.0, 2.0, 0.0], [0.001, 100.0, 0.5]], np.float32)
    got = depth_to_disparity(depth, focal_px=500.0)
    want = 0.075 * 500 / np.array([[1.0, 2.0, 1.0], [0.01, 50.0, 0.5]])
    want[0, 2] = 0.0  # a hole (no reading) is "far", not "nearest"
    np.testing.assert_allclose(got, want, rtol=1e-6)
    assert got.dtype == np.float32
    with pytest.raises(InvalidInputError, match="focal_px"):
        depth_to_disparity(depth, focal_px=0.0)
    with pytest.raises(InvalidInputError, match="max_depth"):
        depth_to_disparity(depth, focal_px=500.0, max_depth=0.001)


def png_bytes(arr: np.ndarray) -> bytes:
    ok, buf = cv2.imencode(".png", arr)
    assert ok
    return buf.tobytes()


def test_depth_png_path_and_bytes(tmp_path) -> None:
    rng = np.random.default_rng(2)
    depth_mm = rng.integers(0, 8000, size=(240, 320)).astype(np.uint16)
    path = tmp_path / "depth.png"
    path.write_bytes(png_bytes(depth_mm))
    np.testing.assert_array_equal(load_map_png(path), depth_mm)
    want = preprocess_depth(
        depth_to_disparity(depth_mm.astype(np.float32) * np.float32(0.001), focal_px=520.0)
    )
    np.testing.assert_array_equal(preprocess_depth(path, focal_px=520.0), want)
    np.testing.assert_array_equal(preprocess_depth(path.read_bytes(), focal_px=520.0), want)
    # Without focal_px the PNG holds disparity: values x png_scale.
    np.testing.assert_array_equal(
        preprocess_depth(str(path), png_scale=0.01),
        preprocess_depth(depth_mm.astype(np.float32) * np.float32(0.01)),
    )


def fake_png(width: int, height: int, depth: int = 16, colour: int = 0) -> bytes:
    """A PNG whose header claims a size, with no pixels behind it."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    ihdr = struct.pack(">IIBBBBB", width, height, depth, colour, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"")) + chunk(b"IEND", b"")
    )


def test_depth_bad_inputs(tmp_path) -> None:
    for arr in BAD_DTYPES:
        with pytest.raises(InvalidInputError, match="dtype"):
            preprocess_depth(arr)
    for shape in [(10,), (10, 10, 3), (2, 10, 10, 1)]:
        with pytest.raises(InvalidInputError, match="single-channel"):
            preprocess_depth(np.ones(shape, np.float32))
    with pytest.raises(InvalidInputError, match="zero size"):
        preprocess_depth(np.ones((0, 10), np.float32))
    for bad in (np.nan, np.inf):
        d = np.ones((50, 50), np.float32)
        d[10, 20] = bad
        with pytest.raises(InvalidInputError, match=r"NaN|infinity"):
            preprocess_depth(d)
    huge = np.broadcast_to(np.float32(1), (100_000, 100_000))
    start = time.perf_counter()
    with pytest.raises(InvalidInputError, match="max_pixels=50000000"):
        preprocess_depth(huge)
    assert time.perf_counter() - start < 0.1
    with pytest.raises(InvalidInputError, match=r"max_pixels=50000000"):
        load_map_png(fake_png(100_000, 100_000))  # from the header, before decoding
    with pytest.raises(InvalidInputError, match="single-channel grey"):
        load_map_png(png_bytes(np.zeros((8, 8, 3), np.uint8)))
    with pytest.raises(InvalidInputError, match="not a PNG"):
        load_map_png(b"\xff\xd8\xff\xe0 not really a jpeg")
    good = png_bytes(np.ones((64, 64), np.uint16))
    with pytest.raises(InvalidInputError, match="truncated"):
        load_map_png(good[: len(good) // 2])
    with pytest.raises(InvalidInputError, match="max_bytes=10"):
        load_map_png(good, MapLimits(max_bytes=10))
    big = tmp_path / "big.png"
    big.write_bytes(good)
    with pytest.raises(InvalidInputError, match="max_bytes=10"):
        load_map_png(big, MapLimits(max_bytes=10))
    with pytest.raises(InvalidInputError, match="cannot read"):
        load_map_png(tmp_path / "missing.png")
    with pytest.raises(InvalidInputError, match="not a regular file"):
        load_map_png(tmp_path)
    with pytest.raises(InvalidInputError, match="accepted: a path or bytes"):
        load_map_png(12)  # type: ignore[arg-type]
    with pytest.raises(ConfigError):
        DepthConfig(std=0.0)
    with pytest.raises(ConfigError):
        DepthConfig(min_disparity=80.0)


def test_preprocess_thermal() -> None:
    frame = np.random.default_rng(4).integers(0, 256, size=(512, 640)).astype(np.uint8)
    out = preprocess_thermal(frame)
    assert out.shape == (1, 224, 224) and out.dtype == np.float32
    np.testing.assert_allclose(out[0], torch_resize_crop(frame / 255.0, 224), atol=1e-5)
    np.testing.assert_allclose(preprocess_thermal(np.full((9, 9), 255, np.uint8)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(preprocess_thermal(np.full((9, 9), 65535, np.uint16)), 1.0, rtol=1e-6)
    np.testing.assert_allclose(
        preprocess_thermal(np.full((9, 9), 0.25), ThermalConfig(mean=0.5, std=0.25)), -1.0, rtol=1e-6
    )
    raw = np.random.default_rng(5).integers(7000, 9000, size=(120, 160)).astype(np.uint16)
    stretched = preprocess_thermal(raw, ThermalConfig(scale="minmax"))
    unit = (raw - raw.min()) / float(raw.max() - raw.min())
    np.testing.assert_allclose(stretched[0], torch_resize_crop(unit, 224), atol=1e-5)
    assert not preprocess_thermal(np.full((9, 9), 3.0), ThermalConfig(scale="minmax")).any()  # flat: zeros
    np.testing.assert_array_equal(preprocess_thermal(png_bytes(frame)), out)


def test_thermal_bad_inputs() -> None:
    with pytest.raises(InvalidInputError, match=r"\[0, 1\]"):
        preprocess_thermal(np.full((9, 9), 2.0))
    with pytest.raises(InvalidInputError, match="int32"):
        preprocess_thermal(np.zeros((9, 9), np.int32))
    with pytest.raises(InvalidInputError, match="NaN"):
        preprocess_thermal(np.full((9, 9), np.nan))
    for arr in BAD_DTYPES:
        with pytest.raises(InvalidInputError, match="dtype"):
            preprocess_thermal(arr)
    with pytest.raises(InvalidInputError, match="max_pixels"):
        preprocess_thermal(
            np.broadcast_to(np.uint8(0), (20_000, 20_000)), limits=MapLimits(max_pixels=10**8 - 1)
        )
    with pytest.raises(ConfigError):
        ThermalConfig(scale="log")


# ---------------------------------------------------------------------------------------------
# Time series
# ---------------------------------------------------------------------------------------------


def test_preprocess_series() -> None:
    rng = np.random.default_rng(6)
    x = rng.normal(size=(500, 4)) * [1, 10, 100, 0.1] + [0, 5, -50, 3]
    s = preprocess_series(x)
    assert s.values.shape == (96, 4) and s.values.dtype == np.float32
    kept = x[-96:]
    np.testing.assert_allclose(s.mean, kept.mean(0), rtol=1e-6)
    np.testing.assert_allclose(s.std, np.sqrt(kept.var(0) + 1e-5), rtol=1e-6)
    np.testing.assert_allclose(s.values, (kept - kept.mean(0)) / np.sqrt(kept.var(0) + 1e-5), atol=1e-5)
    np.testing.assert_allclose(s.values * s.std + s.mean, kept, atol=1e-3)  # invertible
    start = preprocess_series(x, SeriesConfig(keep="start"))
    np.testing.assert_allclose(start.mean, x[:96].mean(0), rtol=1e-6)
    short = preprocess_series(x[:10])
    assert not short.values[:86].any() and short.values[86:].any()  # padded in front of the kept end
    short_start = preprocess_series(x[:10], SeriesConfig(keep="start"))
    assert short_start.values[:10].any() and not short_start.values[10:].any()
    flat = preprocess_series(np.full((20,), 7.0))  # 1-D: one channel; a constant channel stays finite
    assert flat.values.shape == (96, 1) and not flat.values.any()


def test_series_bad_inputs() -> None:
    x = np.zeros((100, 3))
    x[-5, 1] = np.nan
    with pytest.raises(InvalidInputError, match="NaN"):
        preprocess_series(x)
    with pytest.raises(InvalidInputError, match="expected \\(T,\\) or \\(T, C\\)"):
        preprocess_series(np.zeros((4, 5, 6)))
    with pytest.raises(InvalidInputError, match="empty"):
        preprocess_series(np.zeros((0, 3)))
    with pytest.raises(InvalidInputError, match="max_steps=10000000"):
        preprocess_series(np.broadcast_to(np.float32(0), (10**9, 2)))
    with pytest.raises(InvalidInputError, match="max_channels=8"):
        preprocess_series(np.zeros((10, 9)), limits=SeriesLimits(max_channels=8))
    with pytest.raises(InvalidInputError, match="dtype"):
        preprocess_series(np.zeros((10, 2), bool))
    with pytest.raises(ConfigError):
        SeriesConfig(keep="middle")


# ---------------------------------------------------------------------------------------------
# Video through the image path
# ---------------------------------------------------------------------------------------------


def test_video_clip_uses_the_image_path() -> None:
    from mmedge.runtime.images import CLIP_MEAN, CLIP_STD, PreprocessConfig, preprocess
    from mmedge.runtime.video import uniform_frame_indices, video_clip

    rng = np.random.default_rng(8)
    frames = [rng.integers(0, 256, size=(48, 64, 3), dtype=np.uint8) for _ in range(7)]
    cfg = PreprocessConfig(image_size=32, mean=CLIP_MEAN, std=CLIP_STD)
    clip = video_clip(frames, cfg)
    assert clip.shape == (3, 2, 32, 32) and clip.dtype == np.float32
    np.testing.assert_array_equal(clip, preprocess([frames[0], frames[6]], cfg).transpose(1, 0, 2, 3))
    assert uniform_frame_indices(10, 4).tolist() == [0, 3, 6, 9]
    assert video_clip(frames[:1], cfg).shape == (3, 2, 32, 32)  # one frame: repeated
    with pytest.raises(InvalidInputError):
        video_clip([], cfg)
