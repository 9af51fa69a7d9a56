"""How one (prompt, seed) group's arms become pipeline calls: a pure function of the sweep (no torch here).

The workers run a group by this plan (workers.generate), the cache keys a batched unit by the chunk it ran in
(jobs.run_shard, workers.baseline_identity.unit_identity), and `orchestrate plan` prices and shares units by
the same plan (orchestrate.estimate), so the three can never disagree about which arms share a batch.
"""

from __future__ import annotations

from manifests.interventions import PromptEdit
from manifests.schema import ArmSpec, GenerationSpec


def prompt_edit(arm: ArmSpec) -> PromptEdit | None:
    return None if arm.intervention is None else arm.intervention.prompt


def chunks(arms: list[ArmSpec], arms_per_batch: int) -> list[list[ArmSpec]]:
    """Consecutive chunks of at most `arms_per_batch` arms with the same prompt edit (they share one encoding),
    in the given order (a pure function of the arm list)."""
    if arms_per_batch < 1:
        raise ValueError(f"arms_per_batch must be ≥ 1, got {arms_per_batch}")
    out: list[list[ArmSpec]] = []
    for arm in arms:
        if out and len(out[-1]) < arms_per_batch and prompt_edit(out[-1][0]) == prompt_edit(arm):
            out[-1].append(arm)
        else:
            out.append([arm])
    return out


def start_step(arm: ArmSpec, num_steps: int, sigmas: list[float] | None) -> int:
    """The first step at which the arm's intervention acts (a baseline: never, num_steps).

    Before it the arm computes exactly what the baseline computes: same latents, no intervention (random draws
    are seeded per step, never by how many came before), so those steps can be taken from the baseline.
    """
    if arm.intervention is None:
        return num_steps
    return arm.intervention.first_active_step(num_steps, sigmas)


def group_plan(arms: list[ArmSpec], generation: GenerationSpec, start_steps: dict[str, int]) -> list[tuple[int, list[ArmSpec]]]:
    """(start step, chunk of arms) per pipeline call, in order: a pure function of the arm list and the settings.

    Baselines run first and alone (batch 1: the exact stock image, whatever arms_per_batch is, so one cached
    baseline serves every sweep). The other arms are chunked by `arms_per_batch` in sweep order within cohorts of
    equal start step: step 0 first, then each later start step (those chunks start from the baseline's latents).
    """
    baselines = [arm for arm in arms if arm.intervention is None]
    plan = [(0, [arm]) for arm in baselines]
    cohorts: dict[int, list[ArmSpec]] = {}
    for arm in arms:
        if arm.intervention is not None:
            cohorts.setdefault(start_steps.get(arm.name, 0), []).append(arm)
    for step in sorted(cohorts):
        plan += [(step, chunk) for chunk in chunks(cohorts[step], generation.arms_per_batch)]
    return plan


def resolved_intervention(arm: ArmSpec, num_steps: int) -> dict | None:
    """The arm's intervention as the processors act on it: a fraction window becomes the exact steps it names
    (the processors read a window only through `active_steps`), and a window naming every step is no window, so
    e.g. `step_window: {start: 0, end: 1}` (with or without the paper's gating) keys as the unwindowed arm. A sigma
    window needs the schedule and stays as written."""
    if arm.intervention is None:
        return None
    spec = arm.intervention.model_dump(mode="json")
    window = arm.intervention.step_window
    if window is not None and (window.start is not None or window.end is not None):
        steps = window.active_steps(num_steps)
        spec["step_window"] = None if steps == list(range(num_steps)) else {"active_steps": steps}
    return spec


def chunk_identity(chunk: list[ArmSpec], position: int, step: int, num_steps: int) -> dict:
    """What, beyond the group's baseline identity, decides the pixels and records of arm `chunk[position]`.

    Its resolved intervention (`resolved_intervention`); and when it ran batched with other arms, the whole batch
    (every arm's resolved intervention in order, its position, the batch's start step): GEMM shapes and so
    rounding follow the batch, and a batch that starts at step s > 0 ran steps < s as the baseline did, batch 1.
    An arm run alone is bit-identical whatever its start step (prefix sharing's guarantee), so its start step
    is left out.
    """
    batch = None
    if len(chunk) > 1:
        batch = {"interventions": [resolved_intervention(arm, num_steps) for arm in chunk], "position": position, "start_step": step}
    return {"intervention": resolved_intervention(chunk[position], num_steps), "batch": batch}


def latents_needed(arms: list[ArmSpec], generation: GenerationSpec, sigmas: list[float] | None) -> list[int]:
    """The baseline latents a group's prefix-sharing arms start from (what a cached baseline must hold for them)."""
    if not generation.prefix_sharing:
        return []
    steps = {start_step(arm, generation.steps, sigmas) for arm in arms if arm.intervention is not None}
    return sorted(step for step in steps if 0 < step < generation.steps)
