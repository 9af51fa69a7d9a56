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


def _manifest(tmp_path, name: str, arms: list[dict], cache: dict | None = None, **generation):
    from orchestrate.create import build_manifest
    from tests.conftest import tiny_sweep

    gen = {"steps": 4, "guidance": 5.0, "height": 64, "width": 64, **generation}
    return build_manifest(tiny_sweep(tmp_path, name=name, prompts=3, arms=arms, generation=gen, cache=cache or {}))[0]


BASE = {"name": "baseline", "intervention": None}
LATE = {"name": "late", "intervention": {"preset": "fixed.m1", "layers": [1], "step_window": {"start": 0.5, "end": 1.0}}}
ALWAYS = {"name": "always", "intervention": {"preset": "fixed.m1", "layers": [1]}}


RANDOM = {"name": "random", "intervention": {"preset": "fixed.random", "layers": [1]}}


def test_sharing_counts_reused_baselines_across_sweeps_and_prefix_steps(tmp_path):
    from orchestrate.estimate import CPU_GROUP_S, plan_costs, step_and_decode_seconds

    first = _manifest(tmp_path, "first", [BASE, LATE])
    second = _manifest(tmp_path, "second", [BASE, ALWAYS])
    other_seed = _manifest(tmp_path, "third", [BASE, ALWAYS], guidance=6.0)  # other settings: other baselines
    off = _manifest(tmp_path, "off", [BASE, LATE], prefix_sharing=False)
    a, b, c, d = plan_costs([first, second, other_seed, off])
    step, decode, _ = step_and_decode_seconds(first.sweep)
    image, group = 4 * step + decode, CPU_GROUP_S
    assert (a.units, a.baseline_units, a.baselines_generated, a.prefix_steps_saved) == (6, 3, 3, 3 * 2)
    assert math.isclose(a.seconds_with, 3 * group + 6 * image - 6 * step)
    assert math.isclose(a.seconds_without, 3 * group + 6 * image)
    assert (b.baselines_generated, b.prefix_steps_saved, b.images_generated) == (0, 0, 3)
    assert math.isclose(b.seconds_with, 3 * group + 3 * image)
    assert c.baselines_generated == 3
    # same baselines as `first`, and its late arm without prefix sharing is another unit only by its start step,
    # which an arm run alone leaves out of its identity (bit-identical from any start): reused
    assert (d.baselines_generated, d.prefix_steps_saved, d.units_reused, d.images_generated) == (0, 0, 3, 0)
    assert math.isclose(d.seconds_with, 3 * group)


def _naive(manifests) -> tuple[int, int, int]:
    """(images generated, baselines reused, intervened units reused) by brute force: a unit is made unless an earlier
    one had the same model, settings (less the batching fields), recording, prompt, seed and intervention."""
    import json

    seen, made, base_reused, arm_reused = set(), 0, 0, 0
    for m in manifests:
        s = m.sweep
        settings = json.dumps([s.model.model_dump(mode="json"), s.generation.model_dump(mode="json", exclude={"arms_per_batch", "prefix_sharing"}),
                               s.recording.model_dump(mode="json")], sort_keys=True)
        for prompt in m.prompts:
            seed = s.seeds.seed(prompt.prompt_id, 0)
            for arm in s.arms:
                key = (settings, prompt.text, seed, None if arm.intervention is None else arm.intervention.model_dump_json())
                if key in seen:
                    base_reused += arm.intervention is None
                    arm_reused += arm.intervention is not None
                else:
                    seen.add(key)
                    made += 1
    return made, base_reused, arm_reused


def test_plan_of_several_sweeps_matches_a_naive_count_of_distinct_units(tmp_path):
    from orchestrate.estimate import CPU_GROUP_S, plan_costs, step_and_decode_seconds

    other_layer = {"name": "other", "intervention": {"preset": "fixed.m1", "layers": [0]}}
    renamed = {"name": "same_as_always", "intervention": ALWAYS["intervention"]}
    manifests = [
        _manifest(tmp_path, "one", [BASE, ALWAYS, RANDOM]),
        _manifest(tmp_path, "two", [BASE, renamed, other_layer]),  # one unit of `one` under another name
        _manifest(tmp_path, "three", [BASE, RANDOM, ALWAYS], guidance=6.0),  # other settings: nothing shared
        _manifest(tmp_path, "four", [BASE, ALWAYS, RANDOM, other_layer]),  # all but nothing new
    ]
    costs = plan_costs(manifests)
    made, base_reused, arm_reused = _naive(manifests)
    assert sum(c.images_generated for c in costs) == made == 3 * (3 + 1 + 3 + 0)
    assert sum(c.baselines_reused for c in costs) == base_reused == 3 * 2
    assert sum(c.units_reused for c in costs) == arm_reused == 3 * (1 + 3)
    step, decode, _ = step_and_decode_seconds(manifests[0].sweep)
    groups = sum(c.groups for c in costs)
    assert math.isclose(sum(c.seconds_with for c in costs), groups * CPU_GROUP_S + made * (4 * step + decode))
    assert math.isclose(sum(c.seconds_without for c in costs), groups * CPU_GROUP_S + sum(c.units for c in costs) * (4 * step + decode))


def test_a_batch_is_shared_only_whole_and_cache_off_shares_nothing(tmp_path):
    from orchestrate.estimate import plan_costs

    one = _manifest(tmp_path, "one", [BASE, ALWAYS, RANDOM])
    batched = _manifest(tmp_path, "batched", [BASE, ALWAYS, RANDOM], arms_per_batch=2)  # another batch shape
    batched_again = _manifest(tmp_path, "batched-again", [BASE, ALWAYS, RANDOM], arms_per_batch=2)
    split = _manifest(tmp_path, "split", [BASE, ALWAYS, {"name": "new", "intervention": {"preset": "fixed.m1", "layers": [0]}}, RANDOM],
                      arms_per_batch=2)  # batches [always, new] (not cached) and [random] alone (as `one` ran it)
    _, b, c, d = plan_costs([one, batched, batched_again, split])
    assert (b.units_reused, c.units_reused, d.units_reused) == (0, 6, 3)
    off = _manifest(tmp_path, "cache-off", [BASE, ALWAYS, RANDOM], cache={"baselines": "off"})
    _, e = plan_costs([one, off])
    assert (e.baselines_reused, e.units_reused, e.images_generated) == (0, 0, 9)


def test_a_baseline_cached_without_the_latents_a_prefix_needs_is_generated_again(tmp_path):
    from orchestrate.estimate import plan_costs

    plain = _manifest(tmp_path, "plain", [BASE, ALWAYS])
    late = _manifest(tmp_path, "late", [BASE, LATE])
    late_again = _manifest(tmp_path, "late-again", [BASE, {"name": "late2", "intervention": LATE["intervention"]}])
    _, b, c = plan_costs([plain, late, late_again])
    assert (b.baselines_generated, b.baselines_regenerated, b.prefix_steps_saved) == (3, 3, 6)
    assert (c.baselines_generated, c.baselines_reused, c.units_reused) == (0, 3, 3)


def test_plan_of_a_folder_prints_totals_with_and_without_sharing(tmp_path):
    from typer.testing import CliRunner

    from orchestrate.cli import app
    from tests.conftest import tiny_sweep

    folder = tmp_path / "sweeps"
    folder.mkdir()
    gen = {"steps": 4, "guidance": 5.0, "height": 64, "width": 64}
    tiny_sweep(folder, name="one", prompts=2, arms=[BASE, LATE], generation=gen)
    tiny_sweep(folder, name="two", prompts=2, arms=[BASE, ALWAYS, {**LATE, "name": "late_too"}], generation=gen)
    result = CliRunner().invoke(app, ["plan", str(folder)], env={"COLUMNS": "200"})
    assert result.exit_code == 0, result.output
    flat = " ".join(result.output.split())
    assert ("total on CPU (tiny random model): 10 images in 4 groups; 2 of 4 baselines reused (0 generated again for "
            "latents), 2 of 6 intervened units reused → 6 generated, 4 steps taken from baselines") in flat
    assert "hint:" not in flat
    tiny_sweep(folder, name="three", prompts=2, arms=[BASE, {"name": "early", "intervention": {**LATE["intervention"], "step_window": {"start": 0.25, "end": 1.0}}}],
               generation=gen)
    hinted = " ".join(CliRunner().invoke(app, ["plan", str(folder)], env={"COLUMNS": "200"}).output.split())
    assert "hint: three generates 2 baselines again for their prefix latents" in hinted
    single = CliRunner().invoke(app, ["plan", str(folder / "one.yaml")], env={"COLUMNS": "200"})
    assert single.exit_code == 0 and "with sharing: 4 images generated" in " ".join(single.output.split())
