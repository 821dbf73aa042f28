"""Synthetic paired modalities: deterministic, and each carries exactly the attributes it declares."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from mmedge.data import make_scene
from mmedge.data.modalities import (
    CARRIES,
    DISPARITY_SCALE,
    IMU_SAMPLES,
    PRIMITIVES,
    SAMPLE_RATE,
    _surface,
    generate_paired,
    make_paired,
    modality_key,
    primitive_cloud,
    primitive_clouds,
    render_depth,
    render_thermal,
    synth_audio,
    synth_imu,
)
from mmedge.data.scenes import POSITIONS, SceneObject
from mmedge.errors import InvalidInputError

RED_CIRCLE = SceneObject("circle", "red", "large", "top left")


def _rng() -> np.random.Generator:
    return np.random.default_rng(7)


def test_paired_scenes_are_deterministic_and_keep_the_scene():
    a, b = make_paired(5, 3), generate_paired(4, 5)[3]
    assert np.array_equal(a.scene.image, make_scene(5, 3).image)
    for m in ("depth", "thermal", "audio", "imu", "video"):
        assert np.array_equal(getattr(a, m), getattr(b, m))
    assert a.depth.shape == (64, 64) and a.depth.dtype == np.float32
    assert a.thermal.shape == (64, 64) and a.thermal.dtype == np.uint8
    assert a.audio.shape == (2 * SAMPLE_RATE,) and a.audio.dtype == np.float32
    assert a.imu.shape == (6, IMU_SAMPLES) and a.imu.dtype == np.float32
    # a still scene filmed twice: the same objects, fresh background noise in the second frame
    assert a.video.shape == (2, 64, 64, 3) and np.array_equal(a.video[0], a.scene.image)
    assert not np.array_equal(a.video[1], a.video[0])
    assert a.data("text") == a.scene.caption and a.data("depth") is a.depth
    with pytest.raises(InvalidInputError, match="unknown modality"):
        a.data("smell")


def test_modality_keys_drop_what_a_modality_cannot_see():
    blue = dataclasses.replace(RED_CIRCLE, colour="blue")
    assert modality_key([RED_CIRCLE], "depth") == modality_key([blue], "depth")
    assert modality_key([RED_CIRCLE], "imu") == (("circle", "large", "top left"),)
    assert modality_key([RED_CIRCLE], "audio") != modality_key([blue], "audio")
    assert set(CARRIES) == {"image", "text", "audio", "depth", "thermal", "imu", "video"}


@pytest.mark.parametrize("render", [render_depth, synth_imu])
def test_colour_leaves_no_trace_where_not_carried(render):
    blue = dataclasses.replace(RED_CIRCLE, colour="blue")
    args = (64,) if render is render_depth else ()
    same = render([RED_CIRCLE], *args, _rng()), render([blue], *args, _rng())
    assert np.array_equal(*same)
    for field, value in (("shape", "square"), ("size", "small"), ("position", "center")):
        other = render([dataclasses.replace(RED_CIRCLE, **{field: value})], *args, _rng())
        assert not np.allclose(other, same[0], atol=0.05), field


def test_depth_puts_objects_in_front_of_the_background():
    disparity = render_depth([RED_CIRCLE], 64, _rng())  # near is large
    assert DISPARITY_SCALE / disparity[16, 16] < 2.5 < 3.4 < DISPARITY_SCALE / disparity[48, 48]


def test_thermal_orders_colours_by_temperature():
    levels = [
        render_thermal([dataclasses.replace(RED_CIRCLE, colour=c)], 64, _rng())[16, 16]
        for c in ("blue", "green", "purple", "yellow", "orange", "red")
    ]
    assert levels == sorted(levels) and levels[0] > 90


def _spectrum_peak(x: np.ndarray) -> float:
    spec = np.abs(np.fft.rfft(x * np.hanning(len(x))))
    return float(np.fft.rfftfreq(len(x), 1 / SAMPLE_RATE)[np.argmax(spec)])


def test_audio_encodes_position_pitch_loudness_and_timbre():
    slot = len(synth_audio([RED_CIRCLE], _rng())) // len(POSITIONS)
    for p, position in enumerate(POSITIONS):
        x = synth_audio([dataclasses.replace(RED_CIRCLE, position=position)], _rng())
        energy = (x.reshape(len(POSITIONS), slot) ** 2).sum(1)
        assert int(np.argmax(energy)) == p and energy[p] > 100 * np.delete(energy, p).max()
    peaks = [
        _spectrum_peak(synth_audio([dataclasses.replace(RED_CIRCLE, colour=c)], _rng())[:slot])
        for c in ("red", "green", "blue", "yellow", "purple", "orange")
    ]
    semitones = 12 * np.log2(np.asarray(peaks) / 220.0)
    assert np.allclose(semitones, np.arange(6) * 4, atol=0.3)
    loud = synth_audio([RED_CIRCLE], _rng())[:slot]
    quiet = synth_audio([dataclasses.replace(RED_CIRCLE, size="small")], _rng())[:slot]
    assert 8 < 20 * np.log10(np.sqrt((loud**2).mean() / (quiet**2).mean())) < 16
    sine = np.abs(np.fft.rfft(loud))
    odd = np.abs(np.fft.rfft(synth_audio([dataclasses.replace(RED_CIRCLE, shape="square")], _rng())[:slot]))
    freqs = np.fft.rfftfreq(slot, 1 / SAMPLE_RATE)
    third = np.abs(freqs - 3 * 220.0).argmin()
    near = slice(third - 3, third + 4)
    assert odd[near].max() > 20 * sine[near].max()


def test_imu_moves_in_the_object_slot():
    imu = synth_imu([dataclasses.replace(RED_CIRCLE, position="center")], _rng())
    motion = np.abs(imu - imu.mean(1, keepdims=True)).reshape(6, len(POSITIONS), -1).sum((0, 2))
    assert int(np.argmax(motion)) == POSITIONS.index("center")
    assert abs(float(imu[2].mean()) - 9.81) < 0.2


def test_primitive_surfaces_are_what_they_say():
    rng = _rng()
    p = {k: _surface(k, 2000, rng) for k in PRIMITIVES}
    r = {k: np.hypot(v[:, 0], v[:, 1]) for k, v in p.items()}
    assert np.allclose(np.linalg.norm(p["sphere"], axis=1), 1)
    assert np.allclose(np.abs(p["cube"]).max(1), 1) and np.abs(p["cube"]).max() <= 1
    z = p["cylinder"][:, 2]
    assert np.all(np.isclose(r["cylinder"], 1) | np.isclose(np.abs(z), 1)) and r["cylinder"].max() <= 1 + 1e-9
    z = p["cone"][:, 2]
    assert np.all(np.isclose(r["cone"], (1 - z) / 2) | np.isclose(z, -1))
    assert np.allclose((r["torus"] - 0.65) ** 2 + p["torus"][:, 2] ** 2, 0.35**2)
    x, y, z = p["pyramid"].T
    assert np.all(np.isclose(np.maximum(np.abs(x), np.abs(y)), (1 - z) / 2) | np.isclose(z, -1))
    faces = np.isclose(p["cube"], 1).sum(0), np.isclose(p["cube"], -1).sum(0)
    assert np.all(np.concatenate(faces) > 2000 / 6 * 0.7)  # all six faces, about evenly


def test_primitive_clouds_are_labelled_and_deterministic():
    clouds, labels = primitive_clouds(8, seed=3, points=256)
    again, _ = primitive_clouds(8, seed=3, points=256)
    assert clouds.shape == (8, 256, 3) and clouds.dtype == np.float32 and np.array_equal(clouds, again)
    assert [PRIMITIVES[i] for i in labels[:6]] == list(PRIMITIVES)
    assert np.abs(clouds).max() < 2.5
    for bad in (0, -1, 2**21, 1.5, True):
        with pytest.raises(InvalidInputError, match="points"):
            primitive_cloud("cube", _rng(), bad)
    with pytest.raises(InvalidInputError, match="unknown primitive"):
        primitive_cloud("donut", _rng())
