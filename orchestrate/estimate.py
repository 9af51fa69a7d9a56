"""GPU-time estimates for `orchestrate plan`, from the step costs measured in benchmarks/RESULTS.md, with and
without sharing (the baseline cache across sweeps, trajectory prefix sharing within a group).

Measured on one H200 (benchmarks/RESULTS.md, bench_worker.py): SD3-medium stock transformer step at 1024² with
CFG 51.8 ms; the paper configuration (record 3 layers, one intervention) 1.08× that; VAE decode ≈ 90 ms. 20
steps then cost ≈ 1.21 s an image, ≈ 2,970 images per GPU-hour, the group throughput measured there. Cost is
scaled linearly with the number of tokens and layers; the tiny random models run on a CPU at about 30 ms a step, the toy model (397 keys) at about 0.27 s.

Sharing, as the workers do it (docs/design.md "Baseline cache", "Prefix sharing"):
- a baseline (an arm without intervention) is generated once per identity: model, prompt text, seed,
  generation settings and recording (what `workers.baseline_identity` keys the cache by, less the hardware and
  code, which are the same within one catalogue run); every other baseline unit with that identity is reused;
- an arm whose intervention starts at step s > 0 (a fraction window; sigma windows are counted from step 0
  here, as the schedule is not known without the model) costs only its steps s.., if the sweep has a baseline
  arm, `generation.prefix_sharing` is on and the sampler is the flow-matching Euler (SD3 / Flux / Qwen-Image / Z-Image default).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from manifests import Manifest, Sweep
from manifests.models import MODEL_NOTES, REAL_SCALE_PRESETS

H200_SD3_STEP_S = 0.0518  # stock step, 4096 image + 333 text tokens, CFG batch 2 (RESULTS.md session 2, (a))
RECORDING_OVERHEAD = 1.08  # paper configuration ≈ 1.077× stock (RESULTS.md, same table)
H200_VAE_1024_S = 0.09
REFERENCE_TOKENS = 4096 + 333
COMPILE_SPEEDUP = 4.22 / 3.52  # generation.compile: inductor, s per 3-arm group eager / compiled (RESULTS.md, issue 13)
CPU_TINY_STEP_S = 0.03
CPU_TINY_DECODE_S = 0.05
CPU_TOY_STEP_S = 0.27  # toy-sd3, 64², CFG: 45 CPU-s for 17 images × 10 steps (benchmarks/RESULTS.md, toy world)
CPU_TOY_DECODE_S = 0.1
GPU_LABEL = "H200 GPU"
_PREFIX_FAMILIES = ("sd3", "flux", "qwen_image", "z_image")  # their default sampler is the flow-matching Euler (workers.generate.PREFIX_SCHEDULERS)
_PREFIX_SCHEDULERS = ("default", "flow_euler")


def step_and_decode_seconds(sweep: Sweep) -> tuple[float, float, str]:
    """(seconds per denoising step, seconds per decode, where) for one image of this sweep."""
    geometry = sweep.model.geometry()
    height, width = sweep.resolution()
    if sweep.model.preset in MODEL_NOTES:  # the toy presets (trained, CPU-sized: docs/toy.md)
        return CPU_TOY_STEP_S, CPU_TOY_DECODE_S, "CPU (toy model)"
    if geometry is not None and geometry.random_weights and sweep.model.preset not in REAL_SCALE_PRESETS:
        return CPU_TINY_STEP_S, CPU_TINY_DECODE_S, "CPU (tiny random model)"
    if geometry is None or geometry.family == "sdxl":
        # a UNet's cost does not follow the transformer token count; scaled by pixels from the SD3 step
        scale = height * width / 1024**2
    else:
        scale = geometry.total_tokens(height, width) / REFERENCE_TOKENS * geometry.num_layers / 24
    step = H200_SD3_STEP_S * RECORDING_OVERHEAD * scale
    if sweep.generation.compile == "inductor":
        step /= COMPILE_SPEEDUP
    return step, H200_VAE_1024_S * (height * width) / 1024**2, GPU_LABEL


def seconds_per_image(sweep: Sweep) -> tuple[float, str]:
    step, decode, where = step_and_decode_seconds(sweep)
    return sweep.generation.steps * step + decode, where


def baseline_identity(sweep: Sweep, prompt: str, seed: int) -> str:
    """What makes two baselines the same image, without the model loaded (hardware and code assumed equal)."""
    return json.dumps(
        {
            "model": sweep.model.model_dump(mode="json", exclude={"device"}),
            "resolution": sweep.resolution(),
            "generation": sweep.generation.model_dump(mode="json", exclude={"arms_per_batch", "prefix_sharing"}),
            "recording": sweep.recording.model_dump(mode="json"),
            "prompt": prompt,
            "seed": seed,
        },
        sort_keys=True,
    )


def prefix_applies(sweep: Sweep) -> bool:
    geometry = sweep.model.geometry()
    family = geometry.family if geometry else None
    return (
        sweep.generation.prefix_sharing
        and any(arm.intervention is None for arm in sweep.arms)  # the baseline's run supplies the prefix
        and family in _PREFIX_FAMILIES
        and sweep.generation.scheduler in _PREFIX_SCHEDULERS
    )


def arm_start_steps(sweep: Sweep) -> dict[str, int]:
    """Per intervened arm, the steps it takes from the baseline under prefix sharing (0: none)."""
    steps = sweep.generation.steps
    if not prefix_applies(sweep):
        return {arm.name: 0 for arm in sweep.arms if arm.intervention is not None}
    out = {}
    for arm in sweep.arms:
        if arm.intervention is None:
            continue
        try:
            out[arm.name] = arm.intervention.first_active_step(steps)
        except ValueError:  # a sigma window: the schedule is needed, counted as from step 0
            out[arm.name] = 0
    return out


@dataclass
class SweepCost:
    """One sweep's images and GPU time, without sharing and with it (given the baselines seen before it)."""

    name: str
    where: str
    units: int
    baseline_units: int
    baselines_generated: int  # distinct baseline identities not seen in an earlier sweep of the plan
    prefix_steps_saved: int
    seconds_without: float
    seconds_with: float

    @property
    def images_generated(self) -> int:
        """Images made with sharing (a prefix-shared arm still makes its image)."""
        return self.units - self.baseline_units + self.baselines_generated


def sweep_cost(manifest: Manifest, seen: set[str] | None = None) -> SweepCost:
    """Cost of one sweep; `seen` holds baseline identities generated by earlier sweeps of the same plan (updated)."""
    sweep = manifest.sweep
    seen = set() if seen is None else seen
    step, decode, where = step_and_decode_seconds(sweep)
    n = sweep.generation.steps
    per_image = n * step + decode
    starts = arm_start_steps(sweep)
    baselines = [arm for arm in sweep.arms if arm.intervention is None]
    groups = len(manifest.prompts) * sweep.seeds.count
    generated = 0
    for prompt in manifest.prompts:
        for seed_index in range(sweep.seeds.count):
            if not baselines:
                continue
            key = baseline_identity(sweep, prompt.text, sweep.seeds.seed(prompt.prompt_id, seed_index))
            if key not in seen:
                seen.add(key)
                generated += 1
    saved_steps = groups * sum(starts.values())
    intervened_units = groups * len(starts)
    seconds_with = generated * per_image + intervened_units * per_image - saved_steps * step
    return SweepCost(
        name=sweep.name, where=where, units=manifest.num_units, baseline_units=groups * len(baselines),
        baselines_generated=generated, prefix_steps_saved=saved_steps, seconds_without=manifest.num_units * per_image,
        seconds_with=seconds_with,
    )


def plan_costs(manifests: list[Manifest]) -> list[SweepCost]:
    """Costs of several sweeps run one after another with one shared baseline cache (in the order given)."""
    seen: set[str] = set()
    return [sweep_cost(m, seen) for m in manifests]


def hours_or_minutes(seconds: float, where: str) -> str:
    return f"{seconds / 3600:.2f} GPU-hours" if where.endswith("GPU") else f"{seconds / 60:.1f} CPU-minutes"


def describe(sweep: Sweep, num_units: int) -> str:
    per_image, where = seconds_per_image(sweep)
    return (
        f"estimate: ≈{per_image:.2f} s per image on {where} (paper-configuration recording) → "
        f"≈{hours_or_minutes(per_image * num_units, where)} for {num_units} images without sharing"
    )


def describe_sharing(cost: SweepCost) -> str:
    return (
        f"with sharing: {cost.images_generated} images generated ({cost.baseline_units - cost.baselines_generated} of "
        f"{cost.baseline_units} baselines reused), {cost.prefix_steps_saved} denoising steps taken from baselines → "
        f"≈{hours_or_minutes(cost.seconds_with, cost.where)} "
        f"({cost.seconds_with / cost.seconds_without:.0%} of {hours_or_minutes(cost.seconds_without, cost.where)})"
    )
