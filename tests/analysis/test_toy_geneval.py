"""toy-GenEval: validated on the generator's own renders, and shown to fail images that do not match."""

import dataclasses

import numpy as np
import pytest

from analysis.metrics import get_metric_class, metric_info
from analysis.metrics.toy_geneval import detect, score_image
from workers.toy import scenes


@pytest.mark.slow
def test_accuracy_on_the_generators_renders_is_at_least_99_percent_in_every_category():
    batch = scenes.generate(seed=2024, count=300)  # 50 of each category
    correct = {tag: [] for tag in scenes.CATEGORIES}
    for scene in batch:
        correct[scene.tag].append(score_image(scenes.render(scene), scene.prompt))
    for tag, values in correct.items():
        assert len(values) == 50 and np.mean(values) >= 0.99, (tag, np.mean(values))


def test_detection_recovers_shape_colour_and_place():
    scene = scenes.scene_at(5, 4, "color_attr")
    found = detect(scenes.render(scene))
    assert sorted((d.shape, d.colour) for d in found) == sorted((s.kind, s.colour) for s in scene.shapes)
    for shape in scene.shapes:
        (match,) = [d for d in found if (d.shape, d.colour) == (shape.kind, shape.colour)]
        assert abs(match.cx - shape.cx) <= 1.0 and abs(match.cy - shape.cy) <= 1.0


def _with(scene, **changes):
    return dataclasses.replace(scene, shapes=tuple(dataclasses.replace(s, **changes) for s in scene.shapes))


def test_images_that_do_not_match_their_prompt_score_zero():
    colour = scenes.scene_at(1, 0, "colors")
    other = next(c for c in scenes.COLOURS if c != colour.shapes[0].colour)
    assert score_image(scenes.render(_with(colour, colour=other)), colour.prompt) == 0.0

    shape = scenes.scene_at(1, 1, "single_object")
    wrong = next(k for k in scenes.SHAPES if k != shape.shapes[0].kind)
    assert score_image(scenes.render(_with(shape, kind=wrong)), shape.prompt) == 0.0

    position = scenes.scene_at(1, 2, "position")
    a, b = position.shapes  # swap the two objects' places: the relation reverses
    swapped = (dataclasses.replace(a, cx=b.cx, cy=b.cy), dataclasses.replace(b, cx=a.cx, cy=a.cy))
    assert score_image(scenes.render(dataclasses.replace(position, shapes=swapped)), position.prompt) == 0.0

    counting = scenes.scene_at(1, 3, "counting")
    n = len(counting.shapes)
    fewer = dataclasses.replace(counting, shapes=counting.shapes[:-1])
    assert score_image(scenes.render(fewer), counting.prompt) == 0.0
    bigger_count = scenes.prompt_counting(counting.shapes[0].kind, n - 1) if n > 2 else None
    if bigger_count:  # one object too many for the prompt: GenEval's exclude rule
        assert score_image(scenes.render(counting), bigger_count) == 0.0

    blank = np.full((64, 64, 3), scenes.BACKGROUND, np.uint8)
    assert score_image(blank, "a photo of a circle") == 0.0


def test_it_is_registered_as_a_unit_metric_without_weights():
    assert metric_info("toy_geneval") == {"name": "toy_geneval", "kind": "unit", "higher_is_better": True}
    metric = get_metric_class("toy_geneval")(random_weights=True, device="cpu")
    assert metric.random_weights is False and "no weights" in metric.backbone
    scene = scenes.scene_at(0, 0)
    assert metric.load().score_images([scenes.render(scene)], [scene.prompt]).tolist() == [1.0]
    with pytest.raises(ValueError, match="not a toy-world prompt"):
        metric.score_images([scenes.render(scene)], ["a photo of a cow"])
