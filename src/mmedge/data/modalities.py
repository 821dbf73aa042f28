"""Synthetic paired modalities for the scenes: depth, thermal, audio and IMU, plus 3-D primitives.

Every scene of `scenes.py` gets a depth map, a thermal image, an audio clip and an IMU trace, each
deterministic from (seed, index) and drawn from its own random stream, so adding a modality never
changes the scenes or the other modalities. Each modality carries only some scene attributes
(`CARRIES`): a depth map shows shapes, sizes and positions but no colour, so retrieval counts as a
hit any scene whose `modality_key` is equal on what the query's modality carries.

How each modality encodes a scene (docs/modalities.md, "Synthetic paired data"):

- depth: disparity (`DISPARITY_SCALE` / metres, as a 518 px focal length and a 7.5 cm baseline
  make it; what the runtime's depth path takes) of a tilted background plane 3.5-4.5 m away, each
  object a flat plate at 1.2-2.4 m;
- thermal: 8-bit, a cool background and each object at a temperature set by its colour, blurred;
- audio: 16 kHz mono, 2 s; position -> when it sounds (five 0.4 s slots, in `POSITIONS` order),
  colour -> pitch, shape -> timbre (sine, odd harmonics, all harmonics, inharmonic bell),
  size -> loudness (large 12 dB louder);
- IMU: 6 x 2000 samples (accelerometer xyz in m/s^2 with gravity on z, gyroscope xyz in rad/s);
  position -> which of five 400-sample slots moves, shape -> the motion pattern, size -> amplitude.

Point clouds are separate: `primitive_cloud` samples the surface of one of `PRIMITIVES`, randomly
scaled and rotated, for Meta-Transformer's point-cloud classification; `shape_signals` gives
one-object recordings and IMU traces labelled by shape, for its audio and IMU classification.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mmedge.data.scenes import (
    COLOURS,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    SceneObject,
    _check_image_size,
    _check_objects,
    draw_object,
    drawing_order,
    make_scene,
    render,
)
from mmedge.errors import InvalidInputError

ATTRIBUTES: tuple[str, ...] = ("shape", "colour", "size", "position")
CARRIES: dict[str, tuple[str, ...]] = {
    "image": ATTRIBUTES,
    "text": ATTRIBUTES,
    "audio": ATTRIBUTES,
    "thermal": ATTRIBUTES,  # one temperature per colour
    "depth": ("shape", "size", "position"),
    "imu": ("shape", "size", "position"),
    "video": ATTRIBUTES,  # a still scene filmed twice: two renders with their own noise
}
MODALITIES: tuple[str, ...] = tuple(CARRIES)

SAMPLE_RATE = 16_000
AUDIO_SECONDS = 2.0
IMU_SAMPLES = 2000
IMU_CHANNELS = 6
GRAVITY = 9.81
DISPARITY_SCALE = 518.0 * 0.075  # focal length (px) x baseline (m): disparity in px = this / depth in m

# Each modality's stream: spawn_key (index, tag) beside the scene's (index,).
_TAGS = {"depth": 101, "thermal": 102, "audio": 103, "imu": 104, "video": 105}
# Four semitones apart: neighbouring colours fall in different mel bins of a 128-bin filterbank.
_PITCH_HZ = dict(zip(COLOURS, 220.0 * 2.0 ** (np.arange(len(COLOURS)) * 4 / 12), strict=True))
# (partial frequency ratios, amplitudes) per shape: sine, odd harmonics (square-like), all
# harmonics (sawtooth-like), inharmonic bell partials.
_TIMBRE: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "circle": ((1.0,), (1.0,)),
    "square": ((1.0, 3.0, 5.0, 7.0), (1.0, 1 / 3, 1 / 5, 1 / 7)),
    "triangle": ((1.0, 2.0, 3.0, 4.0, 5.0, 6.0), (1.0, 1 / 2, 1 / 3, 1 / 4, 1 / 5, 1 / 6)),
    "star": ((1.0, 2.76, 5.40, 8.93), (1.0, 0.6, 0.4, 0.25)),
}
_LOUDNESS = {"small": 0.1, "large": 0.4}  # peak amplitudes: 12 dB apart
_IMU_AMPLITUDE = {"small": 1.0, "large": 2.5}
# Thermal level (0-255) per colour: warm colours hot, cool colours cold; all above the background.
_THERMAL = dict(zip(("blue", "green", "purple", "yellow", "orange", "red"), range(110, 256, 25), strict=True))
PRIMITIVES: tuple[str, ...] = ("sphere", "cube", "cylinder", "cone", "torus", "pyramid")
MAX_CLOUD_POINTS = 1 << 20


@dataclass(frozen=True, eq=False)
class PairedScene:
    """A scene with its depth (disparity) map (H, W) float32, thermal image (H, W) uint8, audio (samples,)
    float32 at `SAMPLE_RATE`, IMU trace (6, 2000) float32 and a 2-frame clip (2, H, W, 3) uint8 (the
    scene's image, then the scene rendered again with fresh background noise)."""

    scene: Scene
    depth: np.ndarray
    thermal: np.ndarray
    audio: np.ndarray
    imu: np.ndarray
    video: np.ndarray

    def data(self, modality: str) -> object:
        """The scene in one of `MODALITIES` (image: the RGB array; text: the caption)."""
        check_modality(modality)
        if modality == "image":
            return self.scene.image
        if modality == "text":
            return self.scene.caption
        value: np.ndarray = getattr(self, modality)
        return value


def check_modality(modality: str) -> None:
    if modality not in CARRIES:
        raise InvalidInputError(
            f"unknown modality {modality!r}; the synthetic data has {', '.join(MODALITIES)}"
        )


def modality_key(objects: Sequence[SceneObject], modality: str) -> tuple[tuple[str, ...], ...]:
    """The scene's identity as far as `modality` can tell (objects in position order, each reduced
    to the attributes the modality carries): two scenes with equal keys look alike in it."""
    check_modality(modality)
    keep = CARRIES[modality]
    return tuple(tuple(getattr(o, a) for a in keep) for o in _check_objects(objects))


def _rng(seed: int, index: int, modality: str) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index, _TAGS[modality])))


def _masks(objects: Sequence[SceneObject], image_size: int) -> list[tuple[SceneObject, np.ndarray]]:
    """Each object's coverage (H, W) float32 in [0, 1] (anti-aliased edges), in drawing order."""
    out = []
    for o in drawing_order(_check_objects(objects)):
        canvas = np.zeros((image_size, image_size), np.uint8)
        draw_object(canvas, o, 255)
        out.append((o, canvas.astype(np.float32) / 255.0))
    return out


def render_depth(objects: Sequence[SceneObject], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """(image_size, image_size) float32 disparity (`DISPARITY_SCALE` / metres): colour leaves no trace."""
    _check_image_size(image_size)
    ramp = np.linspace(0.0, 1.0, image_size, dtype=np.float32)
    far = float(rng.uniform(3.5, 4.0))
    tilt = float(rng.uniform(0.0, 0.5))
    depth = np.broadcast_to(far + tilt * ramp[:, None], (image_size, image_size)).copy()
    for _, alpha in _masks(objects, image_size):
        near = np.float32(rng.uniform(1.2, 2.4))
        depth += alpha * (near - depth)
    depth += rng.normal(0.0, 0.01, depth.shape).astype(np.float32)  # sensor noise
    return (DISPARITY_SCALE / depth).astype(np.float32)


def render_thermal(objects: Sequence[SceneObject], image_size: int, rng: np.random.Generator) -> np.ndarray:
    """(image_size, image_size) uint8 thermal image: each colour its own temperature, softly blurred."""
    from mmedge.errors import require_opencv

    cv2 = require_opencv()
    _check_image_size(image_size)
    heat = np.full((image_size, image_size), float(rng.uniform(50.0, 80.0)), np.float32)
    for o, alpha in _masks(objects, image_size):
        level = np.float32(_THERMAL[o.colour] + rng.uniform(-4.0, 4.0))
        heat += alpha * (level - heat)
    heat = cv2.GaussianBlur(heat, (0, 0), sigmaX=image_size / 64)
    heat += rng.normal(0.0, 2.0, heat.shape).astype(np.float32)
    return np.clip(np.rint(heat), 0, 255).astype(np.uint8)


def _slot(position: str, length: int) -> tuple[int, int]:
    """The [start, end) samples of a position's time slot in a signal of `length` samples."""
    width = length // len(POSITIONS)
    start = POSITIONS.index(position) * width
    return start, start + width


def synth_audio(objects: Sequence[SceneObject], rng: np.random.Generator) -> np.ndarray:
    """(AUDIO_SECONDS * SAMPLE_RATE,) float32 in [-1, 1]: one tone per object in its position's slot."""
    n = int(AUDIO_SECONDS * SAMPLE_RATE)
    audio = rng.normal(0.0, 0.003, n).astype(np.float64)
    for o in _check_objects(objects):
        start, end = _slot(o.position, n)
        pad = (end - start) // 8  # silence between slots keeps each object's onset sharp
        t = np.arange(end - start - 2 * pad) / SAMPLE_RATE
        ratios, amps = (np.asarray(v) for v in _TIMBRE[o.shape])
        f0 = _PITCH_HZ[o.colour] * 2.0 ** (rng.uniform(-0.2, 0.2) / 12)  # a fifth of a semitone
        phases = rng.uniform(0, 2 * np.pi, len(ratios))
        tone = (amps[:, None] * np.sin(2 * np.pi * f0 * ratios[:, None] * t + phases[:, None])).sum(0)
        envelope = np.minimum(1.0, t / 0.01) * np.exp(-t * (8.0 if o.shape == "star" else 2.0))
        gain = _LOUDNESS[o.size] * 10 ** (rng.uniform(-1.5, 1.5) / 20) / amps.sum()
        audio[start + pad : end - pad] += gain * envelope * tone
    return np.clip(audio, -1.0, 1.0).astype(np.float32)


def synth_imu(objects: Sequence[SceneObject], rng: np.random.Generator) -> np.ndarray:
    """(6, 2000) float32: accelerometer xyz (gravity on z), gyroscope xyz; one motion per object."""
    imu = rng.normal(0.0, 0.05, (IMU_CHANNELS, IMU_SAMPLES))
    imu[2] += GRAVITY
    for o in _check_objects(objects):
        start, end = _slot(o.position, IMU_SAMPLES)
        u = np.linspace(0.0, 1.0, end - start, endpoint=False)
        a = _IMU_AMPLITUDE[o.size] * rng.uniform(0.9, 1.1)
        cycles = 2 * np.pi * 3 * u
        if o.shape == "circle":  # circular motion in the horizontal plane
            imu[0, start:end] += a * np.cos(cycles)
            imu[1, start:end] += a * np.sin(cycles)
        elif o.shape == "square":  # back and forth in jerks along x, then y
            imu[0, start:end] += a * np.sign(np.sin(cycles))
            imu[1, start:end] += a * np.sign(np.cos(cycles))
        elif o.shape == "triangle":  # turning: a sawtooth yaw rate
            imu[5, start:end] += a * (2 * ((3 * u) % 1.0) - 1)
        else:  # star: five vertical taps
            imu[2, start:end] += a * 3 * np.exp(-(((5 * u) % 1.0 - 0.5) ** 2) / 0.005)
    return imu.astype(np.float32)


def make_paired(seed: int, index: int, image_size: int = 64) -> PairedScene:
    """Scene `index` of the stream for `seed` with its paired modalities."""
    scene = make_scene(seed, index, image_size)
    objs = scene.objects
    return PairedScene(
        scene=scene,
        depth=render_depth(objs, image_size, _rng(seed, index, "depth")),
        thermal=render_thermal(objs, image_size, _rng(seed, index, "thermal")),
        audio=synth_audio(objs, _rng(seed, index, "audio")),
        imu=synth_imu(objs, _rng(seed, index, "imu")),
        video=np.stack([scene.image, render(objs, image_size, _rng(seed, index, "video"))]),
    )


def iter_paired(seed: int, image_size: int = 64, start: int = 0) -> Iterator[PairedScene]:
    """Paired scenes start, start+1, ... of the stream for `seed`, forever."""
    index = start
    while True:
        yield make_paired(seed, index, image_size)
        index += 1


def generate_paired(n: int, seed: int, image_size: int = 64) -> list[PairedScene]:
    """The first n paired scenes of the stream for `seed`."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidInputError(f"n must be a non-negative int, got {n!r}")
    return [make_paired(seed, i, image_size) for i in range(n)]


def _random_rotation(rng: np.random.Generator) -> np.ndarray:
    q, r = np.linalg.qr(rng.normal(size=(3, 3)))
    q *= np.sign(np.diag(r))  # uniform over rotations and reflections
    return q * np.sign(np.linalg.det(q))  # a proper rotation


def _surface(kind: str, n: int, rng: np.random.Generator) -> np.ndarray:
    """n points on the unit-sized surface of primitive `kind`, (n, 3)."""
    u, v = rng.random(n), rng.random(n)
    if kind == "sphere":
        p = rng.normal(size=(n, 3))
        return p / np.linalg.norm(p, axis=1, keepdims=True)
    if kind == "cube":
        p = rng.uniform(-1, 1, (n, 3))
        axis = rng.integers(3, size=n)
        p[np.arange(n), axis] = np.where(rng.random(n) < 0.5, -1.0, 1.0)
        return p
    theta = 2 * np.pi * u
    if kind == "cylinder":  # side area 4 pi, caps 2 pi: a third of the points on the caps
        cap = rng.random(n) < 1 / 3
        r = np.where(cap, np.sqrt(v), 1.0)
        z = np.where(cap, np.where(rng.random(n) < 0.5, -1.0, 1.0), 2 * v - 1)
        return np.stack([r * np.cos(theta), r * np.sin(theta), z], 1)
    if kind == "cone":  # apex at z = 1, base radius 1 at z = -1
        base = rng.random(n) < 1 / (1 + np.sqrt(5))  # base area / total area
        r = np.sqrt(v)  # area within radius r grows as r^2 on the base and the side alike
        z = np.where(base, -1.0, 1 - 2 * r)
        return np.stack([r * np.cos(theta), r * np.sin(theta), z], 1)
    if kind == "torus":  # tube radius 0.35 around a ring of radius 0.65
        phi = 2 * np.pi * v
        ring = 0.65 + 0.35 * np.cos(phi)
        return np.stack([ring * np.cos(theta), ring * np.sin(theta), 0.35 * np.sin(phi)], 1)
    if kind == "pyramid":  # square base at z = -1, apex at z = 1
        base = rng.random(n) < 1 / (1 + np.sqrt(5))  # base 4, four faces sqrt(5) each
        side = rng.integers(4, size=n)
        # a point on a triangular face: half-width w from 1 (the base edge, z = -1) to 0 (the apex)
        w = np.sqrt(v)
        along = (2 * u - 1) * w
        across = np.where(side % 2 == 0, 1.0, -1.0) * w
        x = np.where(side < 2, across, along)
        y = np.where(side < 2, along, across)
        z = 1 - 2 * w
        bx, by = 2 * u - 1, 2 * v - 1
        return np.stack([np.where(base, bx, x), np.where(base, by, y), np.where(base, -1.0, z)], 1)
    raise InvalidInputError(f"unknown primitive {kind!r}; one of {', '.join(PRIMITIVES)}")


def primitive_cloud(kind: str, rng: np.random.Generator, points: int = 1024) -> np.ndarray:
    """(points, 3) float32 surface samples of a primitive, scaled 0.7-1.3 per axis, rotated at
    random, with 1% noise, in random order."""
    if (
        isinstance(points, bool)
        or not isinstance(points, (int, np.integer))
        or not 1 <= points <= MAX_CLOUD_POINTS
    ):
        raise InvalidInputError(f"points must be an int in [1, {MAX_CLOUD_POINTS}], got {points!r}")
    p = _surface(kind, int(points), rng) * rng.uniform(0.7, 1.3, 3)
    p = p @ _random_rotation(rng).T + rng.normal(0.0, 0.01, p.shape)
    return p.astype(np.float32)


def primitive_clouds(n: int, seed: int, points: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """n labelled clouds, (n, points, 3) float32 and (n,) int64 indices into `PRIMITIVES`, cycling
    through the primitives; cloud i depends only on (seed, i)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidInputError(f"n must be a non-negative int, got {n!r}")
    labels = np.arange(n, dtype=np.int64) % len(PRIMITIVES)
    clouds = np.empty((n, points, 3), np.float32)
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(i, 105)))
        clouds[i] = primitive_cloud(PRIMITIVES[labels[i]], rng, points)
    return clouds, labels


_SHAPE_TAG = 106  # the one-object draws of `shape_signals`, beside the scenes' and clouds' streams


def shape_signals(n: int, seed: int, modality: str) -> tuple[list[np.ndarray], np.ndarray]:
    """n one-object recordings (`modality` "audio": (AUDIO_SECONDS * SAMPLE_RATE,) float32) or IMU
    traces ("imu": (6, 2000) float32) and their (n,) int64 indices into `SHAPES`, for shape
    classification. Item i's shape is SHAPES[i % 4] (every class as often, give or take one); its
    colour, size and position are drawn uniformly, as `sample_objects` draws them; it depends only
    on (seed, i)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidInputError(f"n must be a non-negative int, got {n!r}")
    if modality not in ("audio", "imu"):
        raise InvalidInputError(f"shape signals are audio or imu, not {modality!r}")
    labels = np.arange(n, dtype=np.int64) % len(SHAPES)
    synth = synth_audio if modality == "audio" else synth_imu
    out = []
    for i in range(n):
        rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(i, _SHAPE_TAG)))
        names = tuple(COLOURS)
        obj = SceneObject(
            SHAPES[int(labels[i])],
            names[int(rng.integers(len(names)))],
            SIZES[int(rng.integers(len(SIZES)))],
            POSITIONS[int(rng.integers(len(POSITIONS)))],
        )
        out.append(synth((obj,), rng))
    return out, labels


def labelled_examples(
    modality: str, n: int, seed: int
) -> tuple[list[np.ndarray], np.ndarray, tuple[str, ...]]:
    """The synthetic classification task of a modality: (n raw examples, their label indices, the
    class names). points: `primitive_clouds` of 1024 points, classes `PRIMITIVES`; audio, imu:
    `shape_signals`, classes `SHAPES`."""
    if modality == "points":
        clouds, labels = primitive_clouds(n, seed)
        return list(clouds), labels, PRIMITIVES
    raw, labels = shape_signals(n, seed, modality)
    return raw, labels, SHAPES


__all__ = [
    "ATTRIBUTES",
    "CARRIES",
    "MODALITIES",
    "PRIMITIVES",
    "SAMPLE_RATE",
    "PairedScene",
    "generate_paired",
    "iter_paired",
    "labelled_examples",
    "make_paired",
    "modality_key",
    "primitive_cloud",
    "primitive_clouds",
    "render_depth",
    "render_thermal",
    "shape_signals",
    "synth_audio",
    "synth_imu",
]
