"""`orchestrate plan`'s cost estimate: tiny random models on a CPU, real-scale ones (random or not) on a GPU."""

import math
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


def _manifest(tmp_path, name: str, arms: list[dict], **generation):
    from orchestrate.create import build_manifest
    from tests.conftest import tiny_sweep

    gen = {"steps": 4, "guidance": 5.0, "height": 64, "width": 64, **generation}
    return build_manifest(tiny_sweep(tmp_path, name=name, prompts=3, arms=arms, generation=gen))[0]


BASE = {"name": "baseline", "intervention": None}
LATE = {"name": "late", "intervention": {"preset": "fixed.m1", "layers": [1], "step_window": {"start": 0.5, "end": 1.0}}}
ALWAYS = {"name": "always", "intervention": {"preset": "fixed.m1", "layers": [1]}}


def test_sharing_counts_reused_baselines_across_sweeps_and_prefix_steps(tmp_path):
    from orchestrate.estimate import plan_costs, step_and_decode_seconds

    first = _manifest(tmp_path, "first", [BASE, LATE])
    second = _manifest(tmp_path, "second", [BASE, ALWAYS])
    other_seed = _manifest(tmp_path, "third", [BASE, ALWAYS], guidance=6.0)  # other settings: other baselines
    off = _manifest(tmp_path, "off", [BASE, LATE], prefix_sharing=False)
    a, b, c, d = plan_costs([first, second, other_seed, off])
    step, decode, _ = step_and_decode_seconds(first.sweep)
    image = 4 * step + decode
    assert (a.units, a.baseline_units, a.baselines_generated, a.prefix_steps_saved) == (6, 3, 3, 3 * 2)
    assert math.isclose(a.seconds_with, 6 * image - 6 * step) and math.isclose(a.seconds_without, 6 * image)
    assert (b.baselines_generated, b.prefix_steps_saved, b.images_generated) == (0, 0, 3)
    assert math.isclose(b.seconds_with, 3 * image)
    assert c.baselines_generated == 3
    assert (d.baselines_generated, d.prefix_steps_saved) == (0, 0)  # same baselines as `first`; no prefix


def test_plan_of_a_folder_prints_totals_with_and_without_sharing(tmp_path):
    from typer.testing import CliRunner

    from orchestrate.cli import app
    from tests.conftest import tiny_sweep

    folder = tmp_path / "sweeps"
    folder.mkdir()
    gen = {"steps": 4, "guidance": 5.0, "height": 64, "width": 64}
    tiny_sweep(folder, name="one", prompts=2, arms=[BASE, LATE], generation=gen)
    tiny_sweep(folder, name="two", prompts=2, arms=[BASE, ALWAYS], generation=gen)
    result = CliRunner().invoke(app, ["plan", str(folder)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert "total on CPU (tiny random model): 8 images, 4 of them baselines (2 reused) → 6 generated, 4 steps taken" in flat
    single = CliRunner().invoke(app, ["plan", str(folder / "one.yaml")], env={"COLUMNS": "200"})
    assert single.exit_code == 0 and "with sharing: 4 images generated" in " ".join(single.output.split())
