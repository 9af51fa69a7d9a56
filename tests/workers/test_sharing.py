"""Prefix sharing and reused baselines in generate_group are bit-identical to generating everything (tiny SD3, CPU)."""

from __future__ import annotations

import pyarrow.compute as pc
import pytest
import torch

from manifests.schema import ArmSpec, GenerationSpec, RecordingSpec
from workers.generate import ReusedBaseline, generate_group, group_plan, latents_needed, start_step

RECORDING = RecordingSpec(layers=[0, 1], topk=3)
PROMPT, SEED = "a red cube on a blue sphere", 43


def _arms() -> list[ArmSpec]:
    late = {"preset": "fixed.m1", "layers": [1], "step_window": {"start": 0.5, "end": 1.0}}
    mid_random = {"preset": "fixed.random", "layers": [0], "step_window": {"start": 0.25, "end": 0.75}}
    return [
        ArmSpec(name="baseline"),
        ArmSpec.model_validate({"name": "late", "intervention": late}),
        ArmSpec.model_validate({"name": "always", "intervention": {"preset": "fixed.m1", "layers": [1]}}),
        ArmSpec.model_validate({"name": "mid_random", "intervention": mid_random}),
    ]


def _generation(**kw) -> GenerationSpec:
    return GenerationSpec(steps=4, guidance=5.0, height=64, width=64, **kw)


def _pixels(image) -> torch.Tensor:
    return torch.frombuffer(bytearray(image.tobytes()), dtype=torch.uint8)


def _assert_same(a, b) -> None:
    assert a.arm == b.arm
    assert torch.equal(_pixels(a.image), _pixels(b.image)), f"{a.arm}: pixels differ"
    assert a.sink_rows.equals(b.sink_rows), f"{a.arm}: sink rows differ"


def test_start_steps_and_plan():
    arms = _arms()
    assert [start_step(arm, 4, None) for arm in arms] == [4, 2, 0, 1]
    assert latents_needed(arms, _generation(), None) == [1, 2]
    assert latents_needed(arms, _generation(prefix_sharing=False), None) == []
    plan = group_plan(arms, _generation(arms_per_batch=3), {"late": 2, "mid_random": 1})
    assert [(step, [a.name for a in chunk]) for step, chunk in plan] == [
        (0, ["baseline"]), (0, ["always"]), (1, ["mid_random"]), (2, ["late"])]


@pytest.fixture(scope="module")
def runs(tiny_loaded):
    """The same group with prefix sharing and without (baseline, an arm from step 2, a random arm from step 1)."""
    arms = [arm for arm in _arms() if arm.name != "always"]
    shared = generate_group(tiny_loaded, PROMPT, SEED, arms, _generation(), RECORDING)
    full = generate_group(tiny_loaded, PROMPT, SEED, arms, _generation(prefix_sharing=False), RECORDING)
    return arms, shared, full


@pytest.mark.slow
def test_prefix_sharing_is_bit_identical_to_running_from_step_0(runs):
    _, shared, full = runs
    assert [r.start_step for r in shared] == [0, 2, 1]
    assert [r.start_step for r in full] == [0, 0, 0]
    for a, b in zip(shared, full):
        _assert_same(a, b)
    # the intervention really acted from its start step on (the test could not pass by ignoring it)
    late = shared[1].sink_rows
    assert not any(late.filter(pc.less(late.column("step"), 2)).column("intervened").to_pylist())
    assert any(late.filter(pc.greater_equal(late.column("step"), 2)).column("intervened").to_pylist())
    assert not torch.equal(_pixels(shared[0].image), _pixels(shared[1].image))


@pytest.mark.slow
def test_reused_baseline_stands_in_bit_for_bit(tiny_loaded, runs):
    arms, first, _ = runs
    base = first[0]
    reused = ReusedBaseline(image=base.image, png=b"png", sink_rows=base.sink_rows,
                            trajectory={s: base.trajectory[s].clone() for s in (1, 2)},
                            final_latents=base.final_latents, sigmas=base.sigmas)
    second = generate_group(tiny_loaded, PROMPT, SEED, arms, _generation(), RECORDING, reused={"baseline": reused})
    assert second[0].png == b"png" and second[0].seconds == 0.0
    for a, b in zip(first, second):
        _assert_same(a, b)
    partial = ReusedBaseline(base.image, b"png", base.sink_rows, {1: base.trajectory[1]}, base.final_latents, base.sigmas)
    with pytest.raises(ValueError, match="starts at step 2"):
        generate_group(tiny_loaded, PROMPT, SEED, arms, _generation(), RECORDING, reused={"baseline": partial})


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_prefix_sharing_is_bit_identical_on_the_gpu(_private_cache):
    """The same check with the tiny SD3 on CUDA in bf16 (benchmarks/bench_sharing.py repeats it at SD3-medium scale)."""
    from manifests import ModelSpec
    from workers import load_pipeline

    loaded = load_pipeline(ModelSpec(preset="tiny-sd3", dtype="bf16"), device="cuda")
    arms = [arm for arm in _arms() if arm.name != "always"]
    shared = generate_group(loaded, PROMPT, SEED, arms, _generation(), RECORDING)
    full = generate_group(loaded, PROMPT, SEED, arms, _generation(prefix_sharing=False), RECORDING)
    assert [r.start_step for r in shared] == [0, 2, 1]
    for a, b in zip(shared, full):
        _assert_same(a, b)


@pytest.mark.slow
def test_a_second_baseline_arm_is_the_first_ones_result(tiny_loaded):
    gen = GenerationSpec(steps=2, guidance=5.0, height=64, width=64)
    both = generate_group(tiny_loaded, PROMPT, SEED, [ArmSpec(name="baseline"), ArmSpec(name="twin")], gen, RECORDING)
    alone = generate_group(tiny_loaded, PROMPT, SEED, [ArmSpec(name="twin")], gen, RECORDING)
    assert both[1].same_as == "baseline" and both[1].seconds == 0.0 and alone[0].same_as is None
    _assert_same(both[1], alone[0])


def test_a_prompt_edit_arm_shares_no_prefix_and_keeps_its_own_encoding(tiny_loaded):
    """A late step window with a prompt-side edit: the edit changes the text keys from step 0, so the arm runs
    from step 0 with its own encoding (same pixels with and without prefix sharing)."""
    late_edit = {"preset": "fixed.m1", "layers": [1], "step_window": {"start": 0.5, "end": 1.0},
                 "prompt": {"pad_token": ","}}
    arms = [ArmSpec(name="baseline"), ArmSpec.model_validate({"name": "late_edit", "intervention": late_edit})]
    assert start_step(arms[1], 4, None) == 0
    assert latents_needed(arms, _generation(), None) == []
    shared = generate_group(tiny_loaded, PROMPT, SEED, arms, _generation(), RECORDING)
    full = generate_group(tiny_loaded, PROMPT, SEED, arms, _generation(prefix_sharing=False), RECORDING)
    for a, b in zip(shared, full):
        _assert_same(a, b)
    assert not torch.equal(_pixels(shared[0].image), _pixels(shared[1].image))
