"""The toy world's data generator, its prompt grammar, the bundled prompt set and the shipped toy model."""

import json
from pathlib import Path

import numpy as np
import pytest

from manifests.models import MODEL_NOTES, PRESET_GEOMETRY, TOY_NOTE
from manifests.prompts import load_bundled
from workers.toy import scenes
from workers.toy.model import COMPONENTS, TOY_PRESET, WEIGHTS_DIR, model_card


def test_the_same_seed_gives_the_same_pixels_and_another_seed_other_ones():
    a, b, c = scenes.render(scenes.scene_at(3, 5)), scenes.render(scenes.scene_at(3, 5)), scenes.render(scenes.scene_at(4, 5))
    assert a.shape == (64, 64, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b) and not np.array_equal(a, c)


def test_every_category_is_generated_in_turn_and_objects_never_touch():
    batch = scenes.generate(seed=0, count=120)
    assert [s.tag for s in batch[:6]] == list(scenes.CATEGORIES)
    for scene in batch:
        boxes = [s.box() for s in scene.shapes]
        for i, box in enumerate(boxes):
            x0, y0, x1, y1 = box
            assert scenes.MARGIN - 0.5 <= x0 and x1 <= 64 - scenes.MARGIN + 0.5, scene
            assert scenes._apart(box, boxes[:i]), scene


def test_prompts_read_back_into_the_metadata_they_were_made_with():
    for scene in scenes.generate(seed=11, count=300):
        assert scenes.parse_prompt(scene.prompt) == (scene.tag, scene.metadata)
    assert scenes.parse_prompt("a photo of an  Yellow circle ") == ("colors", {"include": [{"class": "circle", "count": 1, "color": "yellow"}]})


def test_a_prompt_outside_the_grammar_is_rejected_with_an_example():
    with pytest.raises(scenes.NotAToyPromptError, match="a photo of a red circle and a blue square"):
        scenes.parse_prompt("a photo of a bench")


def test_the_bundled_prompt_set_is_what_the_generator_writes():
    prompts = load_bundled("toy-geneval")
    records = scenes.evaluation_records()
    assert [p.text for p in prompts] == [r["prompt"] for r in records]
    assert [p.tag for p in prompts] == [r["tag"] for r in records]
    assert [json.loads(p.metadata) for p in prompts] == [{k: v for k, v in r.items() if k not in ("prompt", "tag")} for r in records]
    assert {p.tag for p in prompts} == set(scenes.CATEGORIES)
    assert len({p.text for p in prompts}) == len(prompts)


def test_the_shipped_weights_fit_the_budget_and_the_card_names_the_training_run():
    files = [p for p in WEIGHTS_DIR.rglob("*.safetensors")]
    assert {p.parent.name for p in files} == set(COMPONENTS)
    assert sum(p.stat().st_size for p in files) <= 20 * 1024**2
    card = model_card()
    assert card["preset"] == TOY_PRESET and card["device"] and card["transformer"]["steps"] > 0
    assert set(card["source_sha256"]) == {"workers/toy/train.py", "workers/toy/model.py", "workers/toy/scenes.py"}
    assert (WEIGHTS_DIR / "MODEL_CARD.md").is_file()


@pytest.mark.slow
def test_the_toy_preset_loads_offline_through_the_normal_loader_and_says_what_it_is():
    from manifests.schema import ModelSpec
    from workers.loading import load_pipeline

    loaded = load_pipeline(ModelSpec(preset=TOY_PRESET), device="cpu")
    assert loaded.random_weights is False and not PRESET_GEOMETRY[TOY_PRESET].random_weights
    assert TOY_NOTE in loaded.description and MODEL_NOTES[TOY_PRESET] == TOY_NOTE
    assert (loaded.geometry.num_layers, loaded.geometry.heads) == (6, 4)
    assert loaded.geometry.image_tokens(64, 64) == 64
    # trained, not random: the VAE reconstructs a render closely (PSNR well above a random VAE's ~8 dB)
    import torch

    image = scenes.render(scenes.scene_at(0, 3))
    x = torch.from_numpy(image).permute(2, 0, 1)[None].float() / 127.5 - 1
    with torch.no_grad():
        vae = loaded.pipe.vae
        rec = vae.decode(vae.encode(x).latent_dist.mode()).sample.clamp(-1, 1)
    psnr = 10 * np.log10(4.0 / float(((rec - x) ** 2).mean()))
    assert psnr > 25, psnr
