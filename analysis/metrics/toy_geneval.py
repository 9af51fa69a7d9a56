"""toy-GenEval: a ground-truth alignment score for images of the toy world (workers.toy.scenes).

GenEval scores an image against its prompt with an object detector and a colour classifier, per category
(single object, two objects, counting, colours, position, colour attribution). In the toy world the objects
are flat-coloured shapes on a plain background, so pixel analysis does the detector's job exactly:

1. colour segmentation: each pixel goes to the nearest of the background colour (the median of the image
   border, so a tinted background still counts as background) and the toy palette, or to nothing if it is
   farther than MAX_COLOUR_DISTANCE from all of them (blended edges);
2. connected components (scipy.ndimage.label, 8-connectivity) per colour, those under MIN_AREA px dropped;
3. shape: the component's mask against a disc, a square and an upward triangle inscribed in its bounding box
   (highest intersection over union); position: the centre of the bounding box.

The prompt is read back into GenEval's metadata (`include` / `exclude` requirements) by
`workers.toy.scenes.parse_prompt`, and an image is correct (1) or not (0) by GenEval's rules: enough objects
of each required shape (of the required colour, if one is given); for counting, not one more; for position,
the required relation between the objects, with GenEval's tolerance (offsets shrunk by 10 % of the objects'
sizes, then the direction must lie within 60° of the axis). The score needs no weights: it is the same on
every machine, and on the generator's own renders it is 100 % (tests/analysis/test_toy_geneval.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .base import Metric

MAX_COLOUR_DISTANCE = 110.0  # RGB units: farther from every palette colour and the background → unassigned
MIN_AREA = 20  # px; the smallest rendered object (a triangle of side 11) covers about 60
POSITION_TOLERANCE = 0.1  # GenEval's: offsets shrink by this fraction of the two objects' mean size


@dataclass(frozen=True)
class Detection:
    shape: str
    colour: str
    cx: float  # bounding-box centre, px
    cy: float
    width: int
    height: int
    area: int


@lru_cache(maxsize=None)
def _templates(height: int, width: int) -> dict[str, np.ndarray]:
    """Masks of each shape inscribed in a height × width box, sampled at pixel centres."""
    y, x = np.mgrid[0:height, 0:width].astype(np.float64) + 0.5
    u, v = (x - width / 2) / (width / 2), y / height  # u in [-1, 1] across, v in [0, 1] down
    return {
        "circle": u**2 + ((y - height / 2) / (height / 2)) ** 2 <= 1.0,
        "square": np.ones((height, width), dtype=bool),
        "triangle": np.abs(u) <= v,
    }


def classify_shape(mask: np.ndarray) -> str:
    """The shape whose inscribed template overlaps the (bounding-box-cropped) mask best."""
    best, best_iou = "square", -1.0
    for name, template in _templates(*mask.shape).items():
        iou = (mask & template).sum() / max(1, (mask | template).sum())
        if iou > best_iou:
            best, best_iou = name, iou
    return best


def detect(image) -> list[Detection]:
    """The objects of an image (PIL image or uint8 RGB array), largest first."""
    from scipy import ndimage

    from workers.toy.scenes import COLOURS

    rgb = np.asarray(image.convert("RGB") if hasattr(image, "convert") else image, dtype=np.float64)[..., :3]
    border = np.concatenate([rgb[0], rgb[-1], rgb[:, 0], rgb[:, -1]])
    references = np.vstack([np.median(border, axis=0), np.array(list(COLOURS.values()), dtype=np.float64)])
    distance = np.linalg.norm(rgb[:, :, None, :] - references[None, None], axis=-1)
    nearest = distance.argmin(-1)
    nearest[distance.min(-1) > MAX_COLOUR_DISTANCE] = 0  # unassigned pixels count as background
    names = list(COLOURS)
    found: list[Detection] = []
    for k, colour in enumerate(names, start=1):
        labels, n = ndimage.label(nearest == k, structure=np.ones((3, 3), dtype=int))
        for index, sl in enumerate(ndimage.find_objects(labels), start=1):
            mask = labels[sl] == index
            area = int(mask.sum())
            if area < MIN_AREA:
                continue
            ys, xs = sl
            found.append(Detection(classify_shape(mask), colour, (xs.start + xs.stop) / 2, (ys.start + ys.stop) / 2,
                                   xs.stop - xs.start, ys.stop - ys.start, area))
    return sorted(found, key=lambda d: -d.area)


def relations(a: Detection, b: Detection) -> set[str]:
    """GenEval-style relations of `a` to `b` ("left of", "right of", "above", "below"; none if they overlap)."""
    offset = np.array([a.cx - b.cx, a.cy - b.cy])
    slack = POSITION_TOLERANCE * np.array([(a.width + b.width) / 2, (a.height + b.height) / 2])
    revised = np.maximum(np.abs(offset) - slack, 0) * np.sign(offset)
    norm = np.linalg.norm(revised)
    if norm == 0:
        return set()
    dx, dy = revised / norm
    out = set()
    if dx < -0.5:
        out.add("left of")
    if dx > 0.5:
        out.add("right of")
    if dy < -0.5:
        out.add("above")
    if dy > 0.5:
        out.add("below")
    return out


def satisfies(metadata: dict, detections: list[Detection]) -> bool:
    """GenEval's rule: every `include` requirement met, no `exclude` requirement reached."""
    groups: list[list[Detection]] = []
    for req in metadata.get("include", []):
        found = [d for d in detections if d.shape == req["class"]]
        if "color" in req:
            found = [d for d in found if d.colour == req["color"]]
        if len(found) < req["count"]:
            return False
        found = found[: req["count"]]  # the largest ones (GenEval: the most confident)
        if "position" in req:
            relation, target = req["position"]
            if not all(relation in relations(a, b) for a in found for b in groups[target]):
                return False
        groups.append(found)
    for req in metadata.get("exclude", []):
        if sum(d.shape == req["class"] for d in detections) >= req["count"]:
            return False
    return True


def score_image(image, prompt: str) -> float:
    """1.0 if the image shows what the toy prompt asks for, else 0.0."""
    from workers.toy.scenes import parse_prompt

    _, metadata = parse_prompt(prompt)
    return float(satisfies(metadata, detect(image)))


def category(prompt: str) -> str:
    """The GenEval category of a toy prompt."""
    from workers.toy.scenes import parse_prompt

    return parse_prompt(prompt)[0]


class ToyGenEvalMetric(Metric):
    """Per-image 0/1 correctness against a toy-world prompt; mean = accuracy (per category: by the prompts' tag)."""

    name = "toy_geneval"
    kind = "unit"
    higher_is_better = True
    default_batch_size = 64

    def configure(self) -> None:
        self.random_weights = False  # pixel rules, no weights: nothing random about it, whatever the run asks

    @property
    def backbone(self) -> str:
        return "pixel analysis (no weights): colour segmentation + connected components"

    def _load(self) -> None:
        pass

    def score_images(self, images: list, prompts: list[str]) -> np.ndarray:
        from workers.toy.scenes import parse_prompt

        for prompt in dict.fromkeys(prompts):  # every prompt checked before any image is scored
            parse_prompt(prompt)
        return np.array([score_image(image, prompt) for image, prompt in zip(images, prompts)], dtype=np.float64)
