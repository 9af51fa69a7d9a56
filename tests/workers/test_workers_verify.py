"""workers.verify: every check passes on correct processors (SD3, SD3.5, SDXL) and fails on broken ones."""

import pytest
import torch

import workers.processors.common as common
import workers.processors.sd3 as sd3_processors
from manifests import ArmSpec, GenerationSpec, ModelSpec, PromptSpec, RecordingSpec, Sweep, load_bundled_prompts
from manifests.interventions import PRESETS
from workers.verify import verify_sweep

PROMPTS = load_bundled_prompts("geneval")[:2]
GEN = GenerationSpec(steps=2, guidance=5.0)


def _sweep(preset, arms, generation=GEN, recording=RecordingSpec(layers=[0])):
    # model_construct: tiny presets the manifests table may not list yet
    return Sweep.model_construct(
        name="verify", model=ModelSpec.model_construct(preset=preset), prompts=PromptSpec(set="geneval", limit=2),
        seeds=Sweep.model_fields["seeds"].default, generation=generation, arms=arms, recording=recording,
    )


def _by(rows):
    return {(r["arm"], r["check"]): r for r in rows}


def _assert_all_pass(rows):
    failed = [r for r in rows if not r["passed"]]
    assert not failed, failed


def test_all_sd3_presets_pass(tiny_loaded):
    arms = [ArmSpec(name="base")] + [
        ArmSpec(name=name.replace(".", "_"), intervention={"preset": name, "layers": [1]}) for name in PRESETS if "m4" not in name
    ]
    rows = verify_sweep(tiny_loaded, _sweep("tiny-sd3", arms, GenerationSpec(steps=2, guidance=5.0, arms_per_batch=7)), PROMPTS, max_prompts=1)
    _assert_all_pass(rows)
    by = _by(rows)
    assert {r["check"] for r in rows if r["arm"] == "paper_m3_value_zero"} == {"noop", "selection", "output", "mass_after", "scope", "value_rows"}
    assert {r["check"] for r in rows if r["arm"] == "base"} == {"noop"}
    assert "max mass after 0," in by[("fixed_m1", "mass_after")]["detail"]
    assert by[("fixed_m1", "output")]["detail"].startswith("4 calls")  # 1 prompt × 2 steps × 2 branches × 1 layer
    assert "max |Δpixel| 0" in by[("base", "noop")]["detail"]


def test_sd35_and_sdxl_arms_pass(tiny35_loaded, tiny_xl_loaded):
    sd35 = [
        ArmSpec(name="base"),
        ArmSpec(name="m1", intervention={"preset": "fixed.m1", "layers": [0]}),
        ArmSpec(name="self_mean", intervention={"selection": "topk", "k": 2, "layers": ["transformer_blocks.*.attn2"],
                                                 "query_scope": "all", "score_op": "bias", "bias": -3.0, "value_op": "mean"}),
        ArmSpec(name="m3", intervention={"preset": "paper.m3", "layers": [1]}),
    ]
    _assert_all_pass(verify_sweep(tiny35_loaded, _sweep("tiny-sd35", sd35, recording=RecordingSpec(layers=["transformer_blocks.*.attn2"])), PROMPTS, max_prompts=1))
    sdxl = [
        ArmSpec(name="base"),
        ArmSpec(name="cross", intervention="paper.m4_cross"),
        ArmSpec(name="self", intervention="paper.m4_self"),
        ArmSpec(name="lerp", intervention={"selection": "union_bottomk", "k": 1, "layers": [3], "mass_queries": "all",
                                           "query_scope": "all", "score_op": "prob_scale", "eta": 0.3, "value_op": "lerp"}),
    ]
    _assert_all_pass(verify_sweep(tiny_xl_loaded, _sweep("tiny-sdxl", sdxl, GenerationSpec(steps=2, guidance=5.0, arms_per_batch=2)), PROMPTS, max_prompts=1))


SMALL = [
    ArmSpec(name="base"),
    ArmSpec(name="remove", intervention={"preset": "fixed.m1", "layers": [1]}),
    ArmSpec(name="value", intervention={"selection": "topk", "k": 1, "layers": [1], "score_op": "none", "value_op": "zero", "query_scope": "all"}),
]


def _break_removal(monkeypatch):
    original = common.intervened_attention

    def leaky(q, k, v, selected, score_op, *, bias=None, eta=None):  # "removal" that only lowers the logit
        if score_op == "remove":
            return original(q, k, v, selected, "bias", bias=-2.0)
        return original(q, k, v, selected, score_op, bias=bias, eta=eta)

    monkeypatch.setattr(common, "intervened_attention", leaky)


def _break_value_rows(monkeypatch):
    original = common.apply_value_op

    def spill(v, selected, op, **kw):  # also damps every other value row
        out = original(v, selected, op, **kw)
        return out if op == "none" else out * 0.9

    monkeypatch.setattr(common, "apply_value_op", spill)


def _break_selection(monkeypatch):
    original = common.select_keys

    def inverted(iv, layout, mass, heads, generator_seed=None):  # picks the least-attended keys for topk
        if iv.selection == "topk":
            iv = iv.model_copy(update={"selection": "bottomk"})
        return original(iv, layout, mass, heads, generator_seed)

    monkeypatch.setattr(common, "select_keys", inverted)


def _break_noop(monkeypatch):
    original = sd3_processors.apply_sinks

    def noisy(ctx, layer, q, k, v, attn_out, layout, **kw):  # recording perturbs the output in the last bit
        out = original(ctx, layer, q, k, v, attn_out, layout, **kw)
        return torch.nextafter(out, torch.full_like(out, float("inf"))) if ctx.recording is not None else out

    monkeypatch.setattr(sd3_processors, "apply_sinks", noisy)


@pytest.mark.parametrize(
    "breakage, must_fail",
    [
        (None, set()),
        (_break_removal, {("remove", "output"), ("remove", "mass_after")}),
        (_break_value_rows, {("value", "value_rows"), ("value", "output")}),
        (_break_selection, {("remove", "selection"), ("value", "selection")}),
        (_break_noop, {("base", "noop"), ("remove", "noop"), ("value", "noop")}),
    ],
    ids=["unbroken", "removal-leaks", "value-op-spills", "selection-inverted", "noop-perturbed"],
)
def test_broken_processor_math_fails_its_check(tiny_loaded, monkeypatch, breakage, must_fail):
    if breakage is not None:
        breakage(monkeypatch)
    rows = verify_sweep(tiny_loaded, _sweep("tiny-sd3", SMALL, GenerationSpec(steps=1, guidance=5.0)), PROMPTS, max_prompts=1)
    failed = {(r["arm"], r["check"]) for r in rows if not r["passed"]}
    assert must_fail <= failed, rows
    if breakage is None:
        assert not failed, rows
    elif breakage is not _break_noop:
        assert not any(check == "noop" for _, check in failed)


def test_arm_that_never_intervenes_is_reported(tiny35_loaded):
    arms = [ArmSpec(name="text_in_self", intervention={"selection": "topk", "k": 1, "layers": ["transformer_blocks.*.attn2"], "query_scope": "text"})]
    rows = _by(verify_sweep(tiny35_loaded, _sweep("tiny-sd35", arms), PROMPTS, max_prompts=1))
    assert rows[("text_in_self", "noop")]["passed"]
    assert not rows[("text_in_self", "output")]["passed"] and "no intervened call" in rows[("text_in_self", "output")]["detail"]
