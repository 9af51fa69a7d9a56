"""Synthetic shape scenes with exact labels: the toy world's data generator.

A scene is a few flat-coloured shapes (circle, square, triangle) on a plain light-grey background, 64² px,
drawn with hard edges (no anti-aliasing) so that every pixel belongs to exactly one object or to the
background. Each scene comes with a prompt in one of GenEval's six categories, worded as GenEval words its
prompts, and with GenEval-style metadata (`include` / `exclude` requirements) that say what a correct image
must contain. Objects never touch (a gap of at least `MIN_GAP` px), so connected components of a render are
exactly its objects: `analysis.metrics.toy_geneval` scores an image against its prompt by pixel analysis
and reaches 100 % on these renders.

Everything is a pure function of the seed (numpy's PCG64 through `np.random.default_rng`): the same
`(seed, index)` gives the same scene and the same pixels on every machine.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import numpy as np

IMAGE_SIZE = 64
BACKGROUND = (235, 235, 235)
SHAPES = ("circle", "square", "triangle")
# well-separated sRGB colours; GenEval's colour names for them
COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "green": (35, 160, 55),
    "blue": (35, 70, 215),
    "yellow": (235, 195, 20),
    "purple": (135, 45, 170),
}
COUNT_WORDS = {2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of", "above", "below")
CATEGORIES = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
MIN_GAP = 3  # px between the bounding boxes of two objects
MARGIN = 2  # px between an object and the image border


@dataclass(frozen=True)
class Shape:
    """One object: its kind, colour name, centre (px, x right, y down) and side / diameter (px)."""

    kind: str
    colour: str
    cx: float
    cy: float
    size: float

    def box(self) -> tuple[float, float, float, float]:
        half = self.size / 2
        return (self.cx - half, self.cy - half, self.cx + half, self.cy + half)


@dataclass(frozen=True)
class Scene:
    """A scene: its objects, its prompt, its GenEval category and GenEval-style metadata."""

    shapes: tuple[Shape, ...]
    prompt: str
    tag: str
    metadata: dict = field(hash=False)  # {"include": [...], "exclude": [...]} as in GenEval's evaluation_metadata

    def record(self) -> dict:
        """The GenEval evaluation_metadata.jsonl record of this scene's prompt."""
        return {"tag": self.tag, **self.metadata, "prompt": self.prompt}


def article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def plural(shape: str) -> str:
    return shape + "s"


# --- prompts (GenEval's templates, with shapes for COCO classes) -------------------------------------------


def prompt_single(shape: str) -> str:
    return f"a photo of {article(shape)} {shape}"


def prompt_two(a: str, b: str) -> str:
    return f"a photo of {article(a)} {a} and {article(b)} {b}"


def prompt_counting(shape: str, n: int) -> str:
    return f"a photo of {COUNT_WORDS[n]} {plural(shape)}"


def prompt_colour(colour: str, shape: str) -> str:
    return f"a photo of {article(colour)} {colour} {shape}"


def prompt_position(a: str, relation: str, b: str) -> str:
    return f"a photo of {article(a)} {a} {relation} {article(b)} {b}"


def prompt_colour_attr(ca: str, a: str, cb: str, b: str) -> str:
    return f"a photo of {article(ca)} {ca} {a} and {article(cb)} {cb} {b}"


# --- rendering -----------------------------------------------------------------------------------------------


def shape_mask(kind: str, cx: float, cy: float, size: float, side: int = IMAGE_SIZE) -> np.ndarray:
    """Boolean mask of one shape, sampled at pixel centres (hard edges): a disc of diameter `size`, an axis-
    aligned square of side `size`, or an upward isosceles triangle filling the `size` × `size` box."""
    y, x = np.mgrid[0:side, 0:side].astype(np.float64) + 0.5
    half = size / 2
    if kind == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= half**2
    if kind == "square":
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if kind == "triangle":
        top = cy - half
        return (y >= top) & (y <= cy + half) & (np.abs(x - cx) <= (y - top) / 2)
    raise ValueError(f"unknown shape {kind!r}; expected one of {', '.join(SHAPES)}")


def render(scene: Scene, side: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 RGB array [side, side, 3] of the scene."""
    image = np.empty((side, side, 3), dtype=np.uint8)
    image[:] = BACKGROUND
    for shape in scene.shapes:
        image[shape_mask(shape.kind, shape.cx, shape.cy, shape.size, side)] = COLOURS[shape.colour]
    return image


# --- placement -----------------------------------------------------------------------------------------------


def _apart(box: tuple, others: list[tuple]) -> bool:
    x0, y0, x1, y1 = box
    return all(x1 + MIN_GAP <= a0 or a1 + MIN_GAP <= x0 or y1 + MIN_GAP <= b0 or b1 + MIN_GAP <= y0 for a0, b0, a1, b1 in others)


def _place(rng: np.random.Generator, sizes: list[float], side: int = IMAGE_SIZE, tries: int = 200) -> list[tuple[float, float]]:
    """Centres for objects of the given sizes, inside the margins and pairwise apart (rejection sampling)."""
    for _ in range(tries):
        centres: list[tuple[float, float]] = []
        boxes: list[tuple] = []
        for size in sizes:
            half = size / 2
            for _ in range(50):
                cx = rng.uniform(MARGIN + half, side - MARGIN - half)
                cy = rng.uniform(MARGIN + half, side - MARGIN - half)
                box = (cx - half, cy - half, cx + half, cy + half)
                if _apart(box, boxes):
                    centres.append((cx, cy))
                    boxes.append(box)
                    break
            else:
                break
        if len(centres) == len(sizes):
            return centres
    raise RuntimeError(f"could not place objects of sizes {sizes} in {side}² px")  # pragma: no cover - sizes are bounded


def _place_related(rng: np.random.Generator, size_a: float, size_b: float, relation: str,
                   side: int = IMAGE_SIZE) -> tuple[tuple[float, float], tuple[float, float]]:
    """Centres of A and B with A clearly `relation` B: apart along the relation's axis by at least the two
    half-sizes plus a gap, and offset across it by at most a quarter of that distance."""
    horizontal = relation in ("left of", "right of")
    sign = -1.0 if relation in ("left of", "above") else 1.0  # A's coordinate minus B's, along the axis
    lo_a, lo_b = MARGIN + size_a / 2, MARGIN + size_b / 2
    for _ in range(500):
        along = rng.uniform((size_a + size_b) / 2 + 2 * MIN_GAP, side - lo_a - lo_b)
        across = rng.uniform(-along / 4, along / 4)
        # A's and B's coordinates along the axis, then across it
        a_al = rng.uniform(lo_a, side - lo_a)
        b_al = a_al - sign * along
        a_ac = rng.uniform(lo_a, side - lo_a)
        b_ac = a_ac - across
        if not (lo_b <= b_al <= side - lo_b and lo_b <= b_ac <= side - lo_b):
            continue
        a, b = ((a_al, a_ac), (b_al, b_ac)) if horizontal else ((a_ac, a_al), (b_ac, b_al))
        box_a = (a[0] - size_a / 2, a[1] - size_a / 2, a[0] + size_a / 2, a[1] + size_a / 2)
        box_b = (b[0] - size_b / 2, b[1] - size_b / 2, b[0] + size_b / 2, b[1] + size_b / 2)
        if _apart(box_a, [box_b]):
            return a, b
    raise RuntimeError(f"could not place two objects {relation} each other")  # pragma: no cover


# --- scenes of each category -----------------------------------------------------------------------------


def _size(rng: np.random.Generator, crowded: bool) -> float:
    return float(rng.uniform(11, 16) if crowded else rng.uniform(16, 26))


def _pick(rng: np.random.Generator, options, k: int = 1, distinct: bool = True) -> list:
    idx = rng.choice(len(options), size=k, replace=not distinct)
    return [options[int(i)] for i in idx]


def make_scene(rng: np.random.Generator, tag: str) -> Scene:
    """A random scene of GenEval category `tag` (one of CATEGORIES), its prompt and metadata."""
    colours = list(COLOURS)
    if tag == "single_object":
        (kind,), (colour,) = _pick(rng, SHAPES), _pick(rng, colours)
        size = _size(rng, False)
        ((cx, cy),) = _place(rng, [size])
        return Scene((Shape(kind, colour, cx, cy, size),), prompt_single(kind), tag,
                     {"include": [{"class": kind, "count": 1}]})
    if tag == "colors":
        (kind,), (colour,) = _pick(rng, SHAPES), _pick(rng, colours)
        size = _size(rng, False)
        ((cx, cy),) = _place(rng, [size])
        return Scene((Shape(kind, colour, cx, cy, size),), prompt_colour(colour, kind), tag,
                     {"include": [{"class": kind, "count": 1, "color": colour}]})
    if tag == "counting":
        (kind,), (colour,) = _pick(rng, SHAPES), _pick(rng, colours)
        n = int(rng.integers(2, 5))
        sizes = [_size(rng, True) for _ in range(n)]
        shapes = tuple(Shape(kind, colour, cx, cy, s) for (cx, cy), s in zip(_place(rng, sizes), sizes))
        return Scene(shapes, prompt_counting(kind, n), tag,
                     {"include": [{"class": kind, "count": n}], "exclude": [{"class": kind, "count": n + 1}]})
    if tag in ("two_object", "color_attr"):
        a, b = _pick(rng, SHAPES, 2)
        ca, cb = _pick(rng, colours, 2)
        sizes = [_size(rng, True), _size(rng, True)]
        (pa, pb) = _place(rng, sizes)
        shapes = (Shape(a, ca, *pa, sizes[0]), Shape(b, cb, *pb, sizes[1]))
        if tag == "two_object":
            return Scene(shapes, prompt_two(a, b), tag, {"include": [{"class": a, "count": 1}, {"class": b, "count": 1}]})
        return Scene(shapes, prompt_colour_attr(ca, a, cb, b), tag,
                     {"include": [{"class": a, "count": 1, "color": ca}, {"class": b, "count": 1, "color": cb}]})
    if tag == "position":
        a, b = _pick(rng, SHAPES, 2)
        ca, cb = _pick(rng, colours, 2)
        (relation,) = _pick(rng, RELATIONS)
        sizes = [_size(rng, True), _size(rng, True)]
        pa, pb = _place_related(rng, sizes[0], sizes[1], relation)
        # GenEval's layout: the reference object first, the positioned one second ("position": [rel, 0])
        return Scene((Shape(a, ca, *pa, sizes[0]), Shape(b, cb, *pb, sizes[1])), prompt_position(a, relation, b), tag,
                     {"include": [{"class": b, "count": 1}, {"class": a, "count": 1, "position": [relation, 0]}]})
    raise ValueError(f"unknown category {tag!r}; expected one of {', '.join(CATEGORIES)}")


def scene_at(seed: int, index: int, tag: str | None = None) -> Scene:
    """Scene number `index` of the stream of `seed`; its category cycles through CATEGORIES unless given."""
    rng = np.random.default_rng([seed, index])
    return make_scene(rng, tag or CATEGORIES[index % len(CATEGORIES)])


def generate(seed: int, count: int, start: int = 0) -> list[Scene]:
    """Scenes `start` .. `start + count - 1` of the stream of `seed` (categories in turn)."""
    return [scene_at(seed, i) for i in range(start, start + count)]


def render_batch(scenes: list[Scene], side: int = IMAGE_SIZE) -> np.ndarray:
    """uint8 [N, side, side, 3] of the scenes."""
    return np.stack([render(s, side) for s in scenes]) if scenes else np.zeros((0, side, side, 3), np.uint8)


# --- the bundled evaluation prompt set ---------------------------------------------------------------------

EVAL_SEED = 15_000  # the evaluation prompts' stream; training uses other seeds (workers.toy.train)
EVAL_PER_CATEGORY = 6


def distinct_prompts(tag: str) -> int:
    """How many different prompts category `tag` has."""
    s, c, r = len(SHAPES), len(COLOURS), len(RELATIONS)
    return {"single_object": s, "two_object": s * (s - 1), "counting": s * len(COUNT_WORDS), "colors": s * c,
            "position": s * (s - 1) * r, "color_attr": s * (s - 1) * c * (c - 1)}[tag]


def evaluation_records(per_category: int = EVAL_PER_CATEGORY, seed: int = EVAL_SEED) -> list[dict]:
    """GenEval-format records of the bundled `toy-geneval` prompt set: up to `per_category` distinct prompts of
    each category (fewer where the category has fewer), in CATEGORIES order, from the evaluation stream."""
    records: list[dict] = []
    for tag in CATEGORIES:
        seen: set[str] = set()
        index = 0
        while len(seen) < min(per_category, distinct_prompts(tag)):
            scene = scene_at(seed, index, tag)
            index += 1
            if scene.prompt not in seen:
                seen.add(scene.prompt)
                records.append(scene.record())
    return records


def evaluation_jsonl(per_category: int = EVAL_PER_CATEGORY, seed: int = EVAL_SEED) -> str:
    return "".join(json.dumps(r) + "\n" for r in evaluation_records(per_category, seed))


# --- reading a prompt back (what toy-GenEval scores against) ---------------------------------------------

_S = "(" + "|".join(SHAPES) + ")"
_C = "(" + "|".join(COLOURS) + ")"
_N = "(" + "|".join(COUNT_WORDS.values()) + ")"
_R = "(" + "|".join(RELATIONS) + ")"
_PATTERNS = (  # most specific first: "a red circle" would also match the single-object pattern's prefix otherwise
    ("counting", rf"a photo of {_N} {_S}s"),
    ("color_attr", rf"a photo of an? {_C} {_S} and an? {_C} {_S}"),
    ("position", rf"a photo of an? {_S} {_R} an? {_S}"),
    ("two_object", rf"a photo of an? {_S} and an? {_S}"),
    ("colors", rf"a photo of an? {_C} {_S}"),
    ("single_object", rf"a photo of an? {_S}"),
)


class NotAToyPromptError(ValueError):
    """A prompt outside the toy world's grammar (toy-GenEval can only score toy prompts)."""


def parse_prompt(text: str) -> tuple[str, dict]:
    """(category, GenEval-style metadata) of a toy prompt: the inverse of the prompt_* templates."""
    import re

    words = " ".join(text.strip().lower().split())
    for tag, pattern in _PATTERNS:
        m = re.fullmatch(pattern, words)
        if m is None:
            continue
        g = m.groups()
        if tag == "counting":
            n = {w: k for k, w in COUNT_WORDS.items()}[g[0]]
            return tag, {"include": [{"class": g[1], "count": n}], "exclude": [{"class": g[1], "count": n + 1}]}
        if tag == "color_attr":
            return tag, {"include": [{"class": g[1], "count": 1, "color": g[0]}, {"class": g[3], "count": 1, "color": g[2]}]}
        if tag == "position":
            return tag, {"include": [{"class": g[2], "count": 1}, {"class": g[0], "count": 1, "position": [g[1], 0]}]}
        if tag == "two_object":
            return tag, {"include": [{"class": g[0], "count": 1}, {"class": g[1], "count": 1}]}
        if tag == "colors":
            return tag, {"include": [{"class": g[1], "count": 1, "color": g[0]}]}
        return tag, {"include": [{"class": g[0], "count": 1}]}
    raise NotAToyPromptError(
        f"{text!r} is not a toy-world prompt; expected GenEval wording over shapes {', '.join(SHAPES)} and colours "
        f"{', '.join(COLOURS)}, e.g. {prompt_colour_attr('red', 'circle', 'blue', 'square')!r} (workers/toy/scenes.py)"
    )
