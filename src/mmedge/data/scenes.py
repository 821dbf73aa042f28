"""Deterministic synthetic scenes: 1-3 coloured shapes with captions and question-answer pairs."""

from __future__ import annotations

import dataclasses
import itertools
import re
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np

from mmedge.errors import InvalidInputError, require_opencv

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "star")
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 170, 50),
    "blue": (30, 80, 230),
    "yellow": (240, 220, 30),
    "purple": (140, 40, 180),
    "orange": (245, 135, 20),
}
SIZES: tuple[str, ...] = ("small", "large")
POSITIONS: tuple[str, ...] = ("top left", "top right", "center", "bottom left", "bottom right")
TRAIN_SEED = 0
HELD_OUT_SEED = 1_000_003
MAX_OBJECTS = 3
MIN_IMAGE_SIZE = 16

# Object centres as fractions of the image side (x, y): quadrant centres and the image centre.
_POSITION_XY: dict[str, tuple[float, float]] = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "center": (0.5, 0.5),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
}
# Bounding-box side as a fraction of the image side. A large shape at the centre ends 0.19 from the
# middle, short of the quadrant centres at 0.25, so every object's centre pixel stays its own colour.
_SIZE_FRACTION = {"small": 0.22, "large": 0.38}
_COUNT_WORDS = ("zero", "one", "two", "three")
_PREFIXES = ("", "", "there is ", "a picture of ", "an image of ", "a photo of ", "this image shows ")
_CORNER_PHRASES = ("at the {p}", "in the {p}", "in the {p} corner")
_CENTER_PHRASES = ("in the center", "at the center", "in the middle")
_SHIFT = 4  # cv2 fixed-point bits: sub-pixel vertex placement keeps small shapes symmetric.


@dataclass(frozen=True)
class SceneObject:
    """One shape in a scene."""

    shape: str
    colour: str
    size: str
    position: str

    def __post_init__(self) -> None:
        for name, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("colour", self.colour, tuple(COLOURS)),
            ("size", self.size, SIZES),
            ("position", self.position, POSITIONS),
        ):
            if value not in allowed:
                raise InvalidInputError(f"{name} {value!r} is not one of {', '.join(allowed)}")


QA_KINDS: tuple[str, ...] = ("count", "shape", "colour", "position")


@dataclass(frozen=True)
class QA:
    """A question about a scene, its answer and its kind (one of QA_KINDS)."""

    question: str
    answer: str
    kind: str


@dataclass(frozen=True, eq=False)
class Scene:
    """A rendered scene: objects in canonical position order, RGB image, caption and QA pairs."""

    objects: tuple[SceneObject, ...]
    image: np.ndarray  # (H, W, 3) uint8 RGB
    caption: str
    qa: tuple[QA, ...]

    @property
    def key(self) -> tuple[tuple[str, str, str, str], ...]:
        """Canonical hashable identity: two scenes mean the same thing iff their keys are equal."""
        return scene_key(self.objects)


def scene_key(objects: Sequence[SceneObject]) -> tuple[tuple[str, str, str, str], ...]:
    """Return the canonical key of a set of objects (sorted by position)."""
    ordered = sorted(objects, key=lambda o: POSITIONS.index(o.position))
    return tuple((o.shape, o.colour, o.size, o.position) for o in ordered)


def _check_objects(objects: Sequence[SceneObject]) -> tuple[SceneObject, ...]:
    """Validate a scene's objects and return them in canonical position order."""
    if not 1 <= len(objects) <= MAX_OBJECTS:
        raise InvalidInputError(f"a scene holds 1 to {MAX_OBJECTS} objects, got {len(objects)}")
    positions = [o.position for o in objects]
    if len(set(positions)) != len(positions):
        raise InvalidInputError(f"objects must have distinct positions, got {positions}")
    return tuple(sorted(objects, key=lambda o: POSITIONS.index(o.position)))


def _position_phrase(position: str, rng: np.random.Generator) -> str:
    """Draw a phrasing of where an object is ("at the top left", "in the middle", ...)."""
    if position == "center":
        return _CENTER_PHRASES[int(rng.integers(len(_CENTER_PHRASES)))]
    return _CORNER_PHRASES[int(rng.integers(len(_CORNER_PHRASES)))].format(p=position)


def _framed(body: str, rng: np.random.Generator) -> str:
    """A caption's body with a drawn lead-in ("a photo of ", ...) and, half the time, a full stop."""
    prefix = _PREFIXES[int(rng.integers(len(_PREFIXES)))]
    suffix = "." if rng.random() < 0.5 else ""
    return prefix + body + suffix


def caption_for(objects: Sequence[SceneObject], rng: np.random.Generator) -> str:
    """Draw a fresh lowercase caption naming every object's size, colour, shape and position."""
    ordered = _check_objects(objects)
    parts = [f"a {o.size} {o.colour} {o.shape} {_position_phrase(o.position, rng)}" for o in ordered]
    if len(parts) == 1:
        body = parts[0]
    else:
        comma = "," if len(parts) > 2 and rng.random() < 0.5 else ""
        body = ", ".join(parts[:-1]) + f"{comma} and " + parts[-1]
    return _framed(body, rng)


@dataclass(frozen=True)
class Mention:
    """One object as a short text names it: the shape, and only some of its other attributes."""

    shape: str
    colour: str | None = None
    size: str | None = None
    position: str | None = None

    def holds_for(self, o: SceneObject) -> bool:
        """Whether object `o` is what this mention describes."""
        return (
            o.shape == self.shape
            and self.colour in (None, o.colour)
            and self.size in (None, o.size)
            and self.position in (None, o.position)
        )


def mentions_hold(mentions: Sequence[Mention], objects: Sequence[SceneObject]) -> bool:
    """Whether a scene has a distinct object for each mention (a short text is true of it)."""
    return any(
        all(m.holds_for(o) for m, o in zip(mentions, chosen))
        for chosen in itertools.permutations(objects, len(mentions))
    )


def partial_mentions(objects: Sequence[SceneObject], rng: np.random.Generator) -> tuple[Mention, ...]:
    """Draw a short description of a scene, as web captions are: one object (or two), named by its
    shape with its colour about half the time and its size or position now and then."""
    ordered = _check_objects(objects)
    count = 2 if len(ordered) > 1 and rng.random() < 0.25 else 1
    chosen = sorted(rng.choice(len(ordered), size=count, replace=False))
    return tuple(
        Mention(
            o.shape,
            o.colour if rng.random() < 0.5 else None,
            o.size if rng.random() < 0.2 else None,
            o.position if rng.random() < 0.2 else None,
        )
        for o in (ordered[int(i)] for i in chosen)
    )


def mention_text(mentions: Sequence[Mention], rng: np.random.Generator) -> str:
    """Phrase mentions as a caption ("a red circle", "a photo of a small star in the middle")."""
    parts = []
    for m in mentions:
        words = " ".join(w for w in (m.size, m.colour, m.shape) if w)
        where = f" {_position_phrase(m.position, rng)}" if m.position else ""
        parts.append(f"a {words}{where}")
    return _framed(" and ".join(parts), rng)


EMPTY_SLOT = "none"
# the count; size, colour and shape per position; then the colour of each shape
SLOT_WORDS = 1 + 3 * len(POSITIONS) + len(SHAPES)


def _unique_shapes(objects: Sequence[SceneObject]) -> set[str]:
    """Shapes that exactly one object has: "the star" names an object only then."""
    counts = Counter(o.shape for o in objects)
    return {shape for shape, n in counts.items() if n == 1}


def scene_slots(objects: Sequence[SceneObject]) -> str:
    """The scene as fixed slots (SLOT_WORDS words, one meaning per slot): the count word; size,
    colour and shape for each position in POSITIONS order (`none none none` where it is empty);
    then, for each of SHAPES, its colour when exactly one object has that shape, else `none`.

    `blip2-tiny`'s LM learns to read this text where the image prefix will go, and stage 2 trains
    query i to stand for slot i (see `recipes.blip2`). The colour-by-shape block gives
    "what colour is the star?" a fixed place to look. The LM does not learn to use it for colour,
    but learned the "what shape is at ...?" questions faster with it (measurements:
    benchmarks/RESULTS.md; design: docs/demo.md).
    """
    ordered = _check_objects(objects)
    at = {o.position: o for o in ordered}
    words = [_COUNT_WORDS[len(at)]]
    for p in POSITIONS:
        o = at.get(p)
        words += [o.size, o.colour, o.shape] if o else [EMPTY_SLOT] * 3
    unique = _unique_shapes(ordered)
    colour_of = {o.shape: o.colour for o in ordered if o.shape in unique}
    words += [colour_of.get(shape, EMPTY_SLOT) for shape in SHAPES]
    return " ".join(words)


_CAPTION_OBJECT = re.compile(
    r"\b(?P<size>{})\s+(?P<colour>{})\s+(?P<shape>{})\s+(?:at|in)\s+the\s+"
    r"(?P<position>top left|top right|bottom left|bottom right|center|middle)\b".format(
        "|".join(SIZES), "|".join(COLOURS), "|".join(SHAPES)
    )
)


def parse_caption(text: str) -> tuple[SceneObject, ...]:
    """Read back the objects a caption describes (canonical order); unreadable parts are skipped."""
    found: dict[str, SceneObject] = {}
    for m in _CAPTION_OBJECT.finditer(text.lower()):
        position = "center" if m["position"] == "middle" else m["position"]
        found.setdefault(position, SceneObject(m["shape"], m["colour"], m["size"], position))
    return tuple(found[p] for p in POSITIONS if p in found)


def questions_for(objects: Sequence[SceneObject]) -> tuple[QA, ...]:
    """Return the scene's QA pairs: count, then per object shape, colour and position questions."""
    ordered = _check_objects(objects)
    unique = _unique_shapes(ordered)
    pair_counts = Counter((o.colour, o.shape) for o in ordered)
    qa = [QA("how many shapes are there?", _COUNT_WORDS[len(ordered)], "count")]
    for o in ordered:
        where = "in the center" if o.position == "center" else f"at the {o.position}"
        qa.append(QA(f"what shape is {where}?", o.shape, "shape"))
        if o.shape in unique:  # otherwise "the star" would be ambiguous
            qa.append(QA(f"what colour is the {o.shape}?", o.colour, "colour"))
        if pair_counts[(o.colour, o.shape)] == 1:
            qa.append(QA(f"where is the {o.colour} {o.shape}?", o.position, "position"))
    return tuple(qa)


def position_pixel(position: str, image_size: int = 64) -> tuple[int, int]:
    """Return the (x, y) pixel at the centre of a position; the object there always covers it."""
    fx, fy = _POSITION_XY[position]
    return int(fx * image_size), int(fy * image_size)


def _polygon(shape: str, cx: float, cy: float, side: float) -> np.ndarray | None:
    """Vertices (N, 2) of a polygonal shape fitted in a side x side box, or None for a circle."""
    if shape == "square":
        h = side * 0.44  # square side 0.88: about the same area as the circle
        pts = [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    elif shape == "triangle":
        w = side * 1.05
        h = w * 0.866
        pts = [(cx, cy - h / 2), (cx + w / 2, cy + h / 2), (cx - w / 2, cy + h / 2)]
    elif shape == "star":
        radii = np.where(np.arange(10) % 2 == 0, side * 0.58, side * 0.29)
        angles = -np.pi / 2 + np.arange(10) * np.pi / 5
        # Centre the star's bounding box vertically (its points reach higher than they hang low).
        dy = (1 - np.cos(np.pi / 5)) * side * 0.58 / 2
        pts = list(zip(cx + radii * np.cos(angles), cy + dy + radii * np.sin(angles)))
    else:
        return None
    return np.round(np.asarray(pts) * (1 << _SHIFT)).astype(np.int32)


def render(
    objects: Sequence[SceneObject], image_size: int = 64, rng: np.random.Generator | None = None
) -> np.ndarray:
    """Draw objects on a noisy grey background; returns (image_size, image_size, 3) uint8 RGB."""
    ordered = _check_objects(objects)
    _check_image_size(image_size)
    rng = rng if rng is not None else np.random.default_rng(0)
    # Grey-ish light or dark background: never saturated, so never confused with an object colour.
    level = int(rng.integers(170, 216)) if rng.random() < 0.5 else int(rng.integers(45, 91))
    low = (level - 7 + rng.integers(-8, 9, size=3)).astype(np.uint8)  # within 30..216
    # Noise 0..15 from raw bytes (4x faster than rng.integers); low + 15 <= 231 never overflows.
    raw = np.frombuffer(rng.bytes(image_size * image_size * 3), np.uint8)
    image = (raw & 15).reshape(image_size, image_size, 3)
    image += low
    for o in drawing_order(ordered):
        draw_object(image, o, COLOURS[o.colour])
    return image


def drawing_order(objects: Sequence[SceneObject]) -> list[SceneObject]:
    """Large shapes first, so a small one on top of a large neighbour's edge stays visible."""
    return sorted(objects, key=lambda o: o.size != "large")


def draw_object(canvas: np.ndarray, o: SceneObject, value: int | tuple[int, ...]) -> None:
    """Fill object `o`'s shape into a square uint8 canvas (H, W) or (H, W, C), anti-aliased."""
    cv2 = require_opencv()
    image_size = canvas.shape[0]
    fx, fy = _POSITION_XY[o.position]
    cx, cy = fx * image_size - 0.5, fy * image_size - 0.5  # cv2 puts pixel centres on integers
    side = _SIZE_FRACTION[o.size] * image_size
    pts = _polygon(o.shape, cx, cy, side)
    if pts is None:
        centre = (round(cx * (1 << _SHIFT)), round(cy * (1 << _SHIFT)))
        radius = round(side / 2 * (1 << _SHIFT))
        cv2.circle(canvas, centre, radius, value, -1, cv2.LINE_AA, _SHIFT)
    else:
        cv2.fillPoly(canvas, [pts], value, cv2.LINE_AA, _SHIFT)


def _check_image_size(image_size: int) -> None:
    """Reject image sizes too small to tell the shapes apart."""
    if isinstance(image_size, bool) or not isinstance(image_size, (int, np.integer)):
        raise InvalidInputError(f"image_size must be an int, got {type(image_size).__name__}")
    if image_size < MIN_IMAGE_SIZE:
        raise InvalidInputError(f"image_size must be at least {MIN_IMAGE_SIZE}, got {image_size}")


def sample_objects(rng: np.random.Generator) -> tuple[SceneObject, ...]:
    """Draw 1-3 objects at distinct positions, uniformly over shapes, colours and sizes."""
    count = int(rng.integers(1, MAX_OBJECTS + 1))
    slots = np.sort(rng.choice(len(POSITIONS), size=count, replace=False))
    names = tuple(COLOURS)
    return tuple(
        SceneObject(
            SHAPES[int(rng.integers(len(SHAPES)))],
            names[int(rng.integers(len(names)))],
            SIZES[int(rng.integers(len(SIZES)))],
            POSITIONS[int(p)],
        )
        for p in slots
    )


PERTURB_KINDS = ("shape", "colour", "size", "position")


def perturb(
    objects: Sequence[SceneObject], rng: np.random.Generator, weights: Sequence[float] | None = None
) -> tuple[SceneObject, ...]:
    """A hard negative: the same scene with one attribute of one object changed.

    Contrastive training on such pairs teaches the fine distinctions (one colour, one size,
    one position) that random in-batch negatives rarely present. `weights` gives the odds of
    changing each of PERTURB_KINDS (uniform by default).
    """
    objs = list(_check_objects(objects))
    i = int(rng.integers(len(objs)))
    o = objs[i]
    p = None if weights is None else np.asarray(weights, dtype=np.float64) / np.sum(weights)
    kind = PERTURB_KINDS[int(rng.choice(len(PERTURB_KINDS), p=p))]
    if kind == "position":
        free = [p for p in POSITIONS if p not in {x.position for x in objs}]
        if not free:
            kind = "shape"
        else:
            o = dataclasses.replace(o, position=free[int(rng.integers(len(free)))])
    if kind != "position":
        pool = {"shape": SHAPES, "colour": tuple(COLOURS), "size": SIZES}[kind]
        current = getattr(o, kind)
        choices = [v for v in pool if v != current]
        o = dataclasses.replace(o, **{kind: choices[int(rng.integers(len(choices)))]})
    objs[i] = o
    return tuple(sorted(objs, key=lambda x: POSITIONS.index(x.position)))


SWAP_KINDS = ("shape", "colour", "size")


def swap_attribute(objects: Sequence[SceneObject], rng: np.random.Generator) -> tuple[SceneObject, ...]:
    """A binding negative: two objects trade one attribute they differ in (a small red circle and a
    large blue square become a small blue circle and a large red square) — the same words, bound
    to other objects. Scenes where no two objects differ in a shape, colour or size get `perturb`'s
    one-attribute edit instead."""
    objs = list(_check_objects(objects))
    options = [
        (i, j, kind)
        for i in range(len(objs))
        for j in range(i + 1, len(objs))
        for kind in SWAP_KINDS
        if getattr(objs[i], kind) != getattr(objs[j], kind)
    ]
    if not options:
        return perturb(objs, rng)
    i, j, kind = options[int(rng.integers(len(options)))]
    a, b = getattr(objs[i], kind), getattr(objs[j], kind)
    objs[i], objs[j] = dataclasses.replace(objs[i], **{kind: b}), dataclasses.replace(objs[j], **{kind: a})
    return tuple(objs)


def make_scene(seed: int, index: int, image_size: int = 64) -> Scene:
    """Return scene `index` of the stream for `seed`; it depends only on (seed, index, image_size)."""
    for name, value in (("seed", seed), ("index", index)):
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
            raise InvalidInputError(f"{name} must be a non-negative int, got {value!r}")
    rng = np.random.default_rng(np.random.SeedSequence(entropy=seed, spawn_key=(index,)))
    objects = sample_objects(rng)
    caption = caption_for(objects, rng)
    # Rendering draws from the rng last, so objects and captions do not depend on image_size.
    return Scene(objects, render(objects, image_size, rng), caption, questions_for(objects))


def iter_scenes(seed: int = TRAIN_SEED, image_size: int = 64, start: int = 0) -> Iterator[Scene]:
    """Yield scenes start, start+1, ... of the stream for `seed` forever."""
    _check_image_size(image_size)
    index = start
    while True:
        yield make_scene(seed, index, image_size)
        index += 1


def generate_scenes(n: int, seed: int, image_size: int = 64) -> list[Scene]:
    """Return the first n scenes of the stream for `seed` (scene i is the same for every n > i)."""
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise InvalidInputError(f"n must be a non-negative int, got {n!r}")
    _check_image_size(image_size)
    return [make_scene(seed, i, image_size) for i in range(n)]


def _vocabulary() -> tuple[str, ...]:
    """Every word a caption, slot text, question or answer can contain, sorted."""
    text = " ".join(
        (
            *_PREFIXES,
            *_CORNER_PHRASES,
            *_CENTER_PHRASES,
            *_COUNT_WORDS[1:],
            *SHAPES,
            *COLOURS,
            *SIZES,
            *POSITIONS,
            EMPTY_SLOT,
            "a and how many shapes are there what shape is colour where the at",
        )
    )
    return tuple(sorted(set(re.findall(r"[a-z]+", text)) - {"p"}))


VOCABULARY: tuple[str, ...] = _vocabulary()
