"""`orchestrate plan`'s cost estimate: tiny random models on a CPU, real-scale ones (random or not) on a GPU."""

from pathlib import Path

import yaml

from manifests import Sweep
from orchestrate.estimate import seconds_per_image

DEMO = Path(__file__).resolve().parents[2] / "manifests" / "examples" / "demo.yaml"


def _sweep(**model) -> Sweep:
    raw = yaml.safe_load(DEMO.read_text())
    raw["model"] = model
    raw["generation"].update(height=1024, width=1024, steps=20)
    raw["recording"]["layers"] = [1]
    raw["arms"] = raw["arms"][:1]
    return Sweep.model_validate(raw)


def test_tiny_preset_is_estimated_on_cpu_and_real_scale_random_preset_on_gpu():
    tiny, where_tiny = seconds_per_image(_sweep(preset="tiny-sd3-deep"))
    big, where_big = seconds_per_image(_sweep(preset="sd3-medium-random", dtype="bf16"))
    hub, where_hub = seconds_per_image(_sweep(hub_id="stabilityai/stable-diffusion-3-medium-diffusers", dtype="fp16"))
    assert where_tiny.startswith("CPU") and where_big.endswith("GPU") and where_hub.endswith("GPU")
    assert big == hub  # same geometry, same cost: random weights cost what real ones do
