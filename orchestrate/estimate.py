"""GPU-time estimates for `orchestrate plan`, from the costs measured in benchmarks/RESULTS.md, with and without
sharing (the unit cache across sweeps, trajectory prefix sharing within a group).

Measured on one H200 (benchmarks/RESULTS.md; bench_worker.py, bench_sharing.py): SD3-medium stock transformer step
at 1024² with CFG 51.8 ms; a baseline with paper-configuration recording 1.08× that (1.19–1.25 s an image at 20
steps with the ≈ 90 ms VAE decode); an intervened arm 1.13× (Table-2-A1-like, M1a at 12), and 1.32× for the
selections drawn on the host per head (`random`, `modality_random`: a host sync and a loop over heads every
intervened step); outside the pipeline calls, ≈ 0.15 s per generated image (sink records to Arrow, per-call
set-up) and ≈ 0.07 s per group (text encoding, initial latents, cache look-ups). Cost is scaled linearly with the
number of tokens (a video's: every latent frame's patches; decode per frame) and layers; the tiny random models
run on a CPU at about 30 ms a step, the toy model (397 keys) at about 0.27 s.

Sharing, as the workers do it (docs/design.md "Unit cache", "Prefix sharing"), with the sweeps run in the order
given and one cache for all of them (a sweep with `cache.baselines: off` neither reuses nor publishes):
- a baseline (an arm without intervention) is generated once per identity: model, prompt text, seed,
  generation settings and recording (what `workers.baseline_identity` keys the cache by, less the hardware and
  code, which are the same within one catalogue run); a later sweep whose prefix arms need latents of steps the
  cached entry lacks generates it again (jobs.run_shard does), and the entry then holds both sets of steps;
- an intervened unit is generated once per identity: its group's baseline identity and
  `manifests.grouping.chunk_identity` (resolved intervention; the whole batch when arms_per_batch batches it);
  a batch is reused only when every arm of it is cached (`cache.units`, default on);
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
RECORDING_OVERHEAD = 1.08  # a baseline, paper-configuration recording ≈ 1.077× stock (RESULTS.md, same table)
# an intervened arm's step over a baseline's, measured per image on the catalogue slice (RESULTS.md, "unit cache"):
ARM_STEP_FACTOR = 1.13 / RECORDING_OVERHEAD  # M1a at 12, record 6/12/18: 1.26 s an image
HOST_SELECTION_STEP_FACTOR = 1.32 / RECORDING_OVERHEAD  # fixed.random / modality_random: ≈ 1.45 s an image
HOST_SELECTIONS = ("random", "modality_random")  # drawn on the host per (element, head) (workers.identification)
# host time outside the pipeline calls (RESULTS.md, "unit cache": 3.86 s for 22 images in 8 groups, 3.26 s for 18 in 8):
H200_IMAGE_HOST_S = 0.15  # per generated image (sink records to Arrow, per-call set-up, latents to the host)
H200_GROUP_S = 0.07  # per group (text encoding, initial latents, cache look-ups)
CPU_GROUP_S = 0.13  # a group of the tiny models on a CPU, images included (bench_sharing.py --small)
H200_VAE_1024_S = 0.09
REFERENCE_TOKENS = 4096 + 333
COMPILE_SPEEDUP = 4.22 / 3.52  # generation.compile: inductor, s per 3-arm group eager / compiled (RESULTS.md, issue 13)
CPU_TINY_STEP_S = 0.03
CPU_TINY_DECODE_S = 0.05
CPU_TOY_STEP_S = 0.27  # toy-sd3, 64², CFG: 45 CPU-s for 17 images × 10 steps (benchmarks/RESULTS.md, toy world)
CPU_TOY_DECODE_S = 0.1
GPU_LABEL = "H200 GPU"
_PREFIX_FAMILIES = ("sd3", "flux", "qwen_image", "z_image", "ltx")  # their default sampler is the flow-matching Euler (workers.generate.PREFIX_SCHEDULERS)
_PREFIX_SCHEDULERS = ("default", "flow_euler")


def step_and_decode_seconds(sweep: Sweep) -> tuple[float, float, str]:
    """(seconds per denoising step, seconds per decode, where) for one image of this sweep."""
    geometry = sweep.model.geometry()
    height, width = sweep.resolution()
    frames = sweep.generation.num_frames or (geometry.default_frames if geometry is not None else 1)
    if sweep.model.preset in MODEL_NOTES:  # the toy presets (trained, CPU-sized: docs/toy.md)
        return CPU_TOY_STEP_S, CPU_TOY_DECODE_S, "CPU (toy model)"
    if geometry is not None and geometry.random_weights and sweep.model.preset not in REAL_SCALE_PRESETS:
        return CPU_TINY_STEP_S, CPU_TINY_DECODE_S, "CPU (tiny random model)"
    if geometry is None or geometry.family == "sdxl":
        # a UNet's cost does not follow the transformer token count; scaled by pixels from the SD3 step
        scale = height * width / 1024**2
    else:  # a video's tokens are every latent frame's patches (linear: attention's quadratic part is not modelled)
        scale = geometry.total_tokens(height, width, frames) / REFERENCE_TOKENS * geometry.num_layers / 24
    step = H200_SD3_STEP_S * RECORDING_OVERHEAD * scale
    if sweep.generation.compile == "inductor":
        step /= COMPILE_SPEEDUP
    return step, H200_VAE_1024_S * (height * width) / 1024**2 * frames, GPU_LABEL


def seconds_per_image(sweep: Sweep) -> tuple[float, str]:
    """A baseline image's seconds (all its steps and its decode), and where."""
    step, decode, where = step_and_decode_seconds(sweep)
    return sweep.generation.steps * step + decode, where


def arm_step_factor(arm, where: str) -> float:
    """An arm's step cost over its sweep's baseline step (1 for a baseline, and on a CPU, where it is not measured)."""
    if arm.intervention is None or where != GPU_LABEL:
        return 1.0
    return HOST_SELECTION_STEP_FACTOR if arm.intervention.selection in HOST_SELECTIONS else ARM_STEP_FACTOR


def group_seconds(where: str) -> float:
    return H200_GROUP_S if where == GPU_LABEL else CPU_GROUP_S


def image_host_seconds(where: str) -> float:
    return H200_IMAGE_HOST_S if where == GPU_LABEL else 0.0


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
        and sweep.generation.scheduler in _PREFIX_SCHEDULERS
        and (family in _PREFIX_FAMILIES or (family == "wan" and sweep.generation.scheduler == "flow_euler"))
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
    """One sweep's images and GPU time, without sharing and with it (given what earlier sweeps of the plan made)."""

    name: str
    where: str
    units: int
    groups: int
    baseline_units: int
    baselines_generated: int  # baselines generated (distinct identities not cached before, and regenerations)
    baselines_regenerated: int  # of those: cached before, but without the latents this sweep's prefix arms need
    intervened_units: int
    units_reused: int  # intervened units taken from the cache (made by an earlier sweep of the plan)
    prefix_steps_saved: int
    seconds_without: float
    seconds_with: float

    @property
    def baselines_reused(self) -> int:
        return self.baseline_units - self.baselines_generated

    @property
    def images_generated(self) -> int:
        """Images made with sharing (a prefix-shared arm still makes its image)."""
        return self.units - self.baselines_reused - self.units_reused


@dataclass
class PlanCache:
    """What the sweeps planned so far have put in the one cache: baseline identity -> latent steps held, and the
    intervened units' identities."""

    baselines: dict
    units: set

    @classmethod
    def empty(cls) -> "PlanCache":
        return cls({}, set())


def sweep_cost(manifest: Manifest, cache: PlanCache | None = None) -> SweepCost:
    """Cost of one sweep; `cache` holds what earlier sweeps of the same plan generated (updated)."""
    from manifests.grouping import chunk_identity, group_plan

    sweep = manifest.sweep
    cache = PlanCache.empty() if cache is None else cache
    shared = sweep.cache.baselines != "off"  # off: this sweep neither reuses nor publishes
    units_shared = shared and sweep.cache.units
    step, decode, where = step_and_decode_seconds(sweep)
    n = sweep.generation.steps
    image = {arm.name: n * step * arm_step_factor(arm, where) + decode + image_host_seconds(where) for arm in sweep.arms}
    arm_step = {arm.name: step * arm_step_factor(arm, where) for arm in sweep.arms}
    starts = arm_start_steps(sweep)
    needed = {s for s in starts.values() if 0 < s < n}
    baselines = [arm for arm in sweep.arms if arm.intervention is None]
    calls = [(start, chunk) for start, chunk in group_plan(list(sweep.arms), sweep.generation, starts)
             if chunk[0].intervention is not None]
    chunk_keys = [[json.dumps(chunk_identity(chunk, i, start, n), sort_keys=True) for i in range(len(chunk))] for start, chunk in calls]
    groups = len(manifest.prompts) * sweep.seeds.count
    generated = regenerated = reused_units = saved_steps = 0
    seconds_with = 0.0
    for prompt in manifest.prompts:
        for seed_index in range(sweep.seeds.count):
            key = baseline_identity(sweep, prompt.text, sweep.seeds.seed(prompt.prompt_id, seed_index))
            seconds_with += group_seconds(where)
            if baselines:
                held = cache.baselines.get(key) if shared else None
                if held is None or not needed <= held:
                    generated += 1
                    regenerated += held is not None
                    seconds_with += image[baselines[0].name]  # further baseline arms take its result (workers)
                    if shared:
                        cache.baselines[key] = (held or set()) | needed
            for (start, chunk), ids in zip(calls, chunk_keys):
                ids = [key + unit for unit in ids]
                if units_shared and all(i in cache.units for i in ids):
                    reused_units += len(chunk)
                    continue
                seconds_with += sum(image[arm.name] - start * arm_step[arm.name] for arm in chunk)
                saved_steps += start * len(chunk)
                if units_shared:
                    cache.units.update(ids)
    seconds_without = groups * (group_seconds(where) + sum(image.values()))
    return SweepCost(
        name=sweep.name, where=where, units=manifest.num_units, groups=groups, baseline_units=groups * len(baselines),
        baselines_generated=generated, baselines_regenerated=regenerated, intervened_units=groups * (len(sweep.arms) - len(baselines)),
        units_reused=reused_units, prefix_steps_saved=saved_steps, seconds_without=seconds_without, seconds_with=seconds_with,
    )


def plan_costs(manifests: list[Manifest]) -> list[SweepCost]:
    """Costs of several sweeps run one after another with one shared cache (in the order given)."""
    cache = PlanCache.empty()
    return [sweep_cost(m, cache) for m in manifests]


def hours_or_minutes(seconds: float, where: str) -> str:
    return f"{seconds / 3600:.2f} GPU-hours" if where.endswith("GPU") else f"{seconds / 60:.1f} CPU-minutes"


def describe(sweep: Sweep, cost: SweepCost) -> str:
    per_image, where = seconds_per_image(sweep)
    return (
        f"estimate: ≈{per_image:.2f} s per baseline image's steps and decode on {where} (paper-configuration recording; "
        f"intervened arms and host time on top, benchmarks/RESULTS.md) → "
        f"≈{hours_or_minutes(cost.seconds_without, where)} for {cost.units} images without sharing"
    )


def describe_sharing(cost: SweepCost) -> str:
    regenerated = f", {cost.baselines_regenerated} generated again for latents they lacked" if cost.baselines_regenerated else ""
    return (
        f"with sharing: {cost.images_generated} images generated ({cost.baselines_reused} of {cost.baseline_units} "
        f"baselines reused{regenerated}; {cost.units_reused} of {cost.intervened_units} intervened units reused), "
        f"{cost.prefix_steps_saved} denoising steps taken from baselines → ≈{hours_or_minutes(cost.seconds_with, cost.where)} "
        f"({cost.seconds_with / cost.seconds_without:.0%} of {hours_or_minutes(cost.seconds_without, cost.where)})"
    )
