"""Arm batching: several arms of one group in one pipeline call, equal to the unbatched path within fp32 rounding."""

import numpy as np
import pytest

from manifests import ArmSpec, GenerationSpec, RecordingSpec
from workers import generate_group
from workers.generate import batch_plans, chunks, encode_prompt, initial_latents, run_batch

PROMPT = "a photo of a red apple on a wooden table"
REC = RecordingSpec(layers=[0, 1], topk=4)
PAD_START = 16 + 77  # tiny-sd3 at 64 px: 16 image keys, 77 CLIP keys, then 256 zero "T5" keys
ARMS = [
    ArmSpec(name="base"),
    ArmSpec(name="m1", intervention={"preset": "fixed.m1", "layers": [1]}),
    ArmSpec(name="rnd", intervention={"preset": "fixed.random", "layers": [0, 1], "k": 2}),
    ArmSpec(name="m2", intervention={"preset": "paper.m2", "layers": [0]}),
    ArmSpec(name="val", intervention={"selection": "topk", "k": 2, "layers": [1], "score_op": "prob_scale", "eta": 0.1,
                                      "value_op": "noise", "sigma": 0.5, "query_scope": "all", "cfg_branch": "cond"}),
]


def _gen(arms_per_batch, steps=2, guidance=5.0):
    return GenerationSpec(steps=steps, guidance=guidance, arms_per_batch=arms_per_batch)


def _pixels(image):
    return np.asarray(image, dtype=np.int16)


@pytest.fixture(scope="module")
def unbatched(tiny_loaded):
    return generate_group(tiny_loaded, PROMPT, 3, ARMS, _gen(1), REC)


def _assert_rows_close(a, b, exact_selection: bool):
    """Same rows in the same order and masses within fp32 rounding. Indices may differ only among exactly tied
    keys: the 256 T5 slots of an SD3 without T5 are identical zero vectors (modality t5_pad), whose masses
    tie up to the last bit, which a different GEMM shape can flip. Random selections must be identical."""
    a, b = a.to_pandas(), b.to_pandas()
    keys = ["step", "layer", "layer_name", "head", "branch", "intervened"]
    assert a[keys].equals(b[keys])

    def tied(i, j):
        return i == j or (i >= PAD_START and j >= PAD_START)

    for x, y in zip(a.itertuples(), b.itertuples()):
        np.testing.assert_allclose(x.topk_mass, y.topk_mass, rtol=1e-5, atol=1e-7)
        assert all(tied(i, j) for i, j in zip(x.topk_idx, y.topk_idx)), (list(x.topk_idx), list(y.topk_idx))
        assert x.entropy == pytest.approx(y.entropy, rel=1e-5)
        if x.intervened:
            if exact_selection:
                assert list(x.selected_idx) == list(y.selected_idx)
            else:
                assert all(tied(i, j) for i, j in zip(sorted(x.selected_idx), sorted(y.selected_idx)))
            assert x.removed_mass_after == pytest.approx(y.removed_mass_after, rel=1e-4, abs=1e-7)


@pytest.mark.parametrize("arms_per_batch", [2])
def test_batched_equals_unbatched_within_fp32_rounding(tiny_loaded, unbatched, arms_per_batch):
    batched = generate_group(tiny_loaded, PROMPT, 3, ARMS, _gen(arms_per_batch), REC)
    assert [r.arm for r in batched] == [a.name for a in ARMS]
    for ref, got in zip(unbatched, batched):
        assert np.abs(_pixels(ref.image) - _pixels(got.image)).max() <= 1, ref.arm  # uint8 levels
        _assert_rows_close(ref.sink_rows, got.sink_rows, exact_selection=ref.arm == "rnd")


def test_batched_latents_match_and_interventions_act_per_element(tiny_loaded):
    """Final latents (before the VAE's uint8 rounding): batched = unbatched to fp32 rounding, and every
    intervened arm moves far more than that from the baseline, so each element got its own intervention."""
    gen = _gen(5)
    encoded = encode_prompt(tiny_loaded, PROMPT, gen)
    latents = initial_latents(tiny_loaded, 3, encoded.height, encoded.width)
    batched = run_batch(tiny_loaded, encoded, ARMS, 3, latents, gen, REC, output_type="latent").images
    single = [run_batch(tiny_loaded, encoded, [arm], 3, latents, gen, REC, output_type="latent").images[0] for arm in ARMS]
    rounding = max(float((b - s).abs().max()) for b, s in zip(batched, single))
    assert rounding < 1e-4
    for arm, b, s in zip(ARMS[1:], batched[1:], single[1:]):
        effect = float((s - single[0]).abs().max())
        assert effect > 100 * max(rounding, 1e-7), arm.name
        assert float((b - batched[0]).abs().max()) == pytest.approx(effect, rel=1e-2)


def test_batched_runs_are_deterministic(tiny_loaded):
    first = generate_group(tiny_loaded, PROMPT, 5, ARMS, _gen(3), REC)
    second = generate_group(tiny_loaded, PROMPT, 5, ARMS, _gen(3), REC)
    for x, y in zip(first, second):
        assert np.array_equal(_pixels(x.image), _pixels(y.image))
        assert x.sink_rows.equals(y.sink_rows)


def test_baseline_in_a_batch_is_untouched_by_its_neighbours(tiny_loaded):
    """run_batch level (generate_group runs baselines alone): a baseline beside an intervened arm is the stock
    attention of that batch shape, equal to a baseline beside its twin."""
    from workers.recorder import records_to_table

    twin = ArmSpec(name="twin")  # a second baseline in the same batch shape
    encoded = encode_prompt(tiny_loaded, PROMPT, _gen(2))
    latents = initial_latents(tiny_loaded, 8, encoded.height, encoded.width)
    with_intervention = run_batch(tiny_loaded, encoded, [ARMS[0], ARMS[1]], 8, latents, _gen(2), REC)
    with_baseline = run_batch(tiny_loaded, encoded, [ARMS[0], twin], 8, latents, _gen(2), REC)
    base_rows = [records_to_table([r for r in run.context.records if r.arm == "base"]) for run in (with_intervention, with_baseline)]
    assert np.array_equal(_pixels(with_intervention.images[0]), _pixels(with_baseline.images[0]))
    assert base_rows[0].equals(base_rows[1])
    assert not any(base_rows[0].column("intervened").to_pylist())
    assert np.array_equal(_pixels(with_baseline.images[0]), _pixels(with_baseline.images[1]))


def test_baselines_run_alone_whatever_the_batch_size(tiny_loaded, unbatched):
    """generate_group's baseline is the batch-1 image at every arms_per_batch, so one cached baseline serves all."""
    batched = generate_group(tiny_loaded, PROMPT, 3, ARMS[:3], _gen(3), REC)
    assert np.array_equal(_pixels(batched[0].image), _pixels(unbatched[0].image))
    assert batched[0].sink_rows.equals(unbatched[0].sink_rows)


def test_batch_layout_and_grouping(tiny_loaded):
    assert [[a.name for a in c] for c in chunks(ARMS, 2)] == [["base", "m1"], ["rnd", "m2"], ["val"]]
    assert chunks(ARMS, 2) == chunks(list(ARMS), 2)
    encoded = encode_prompt(tiny_loaded, PROMPT, _gen(3))
    plans = batch_plans(ARMS[:3], 42, encoded)
    assert [(p.arm, p.branch) for p in plans] == [
        ("base", "uncond"), ("m1", "uncond"), ("rnd", "uncond"), ("base", "cond"), ("m1", "cond"), ("rnd", "cond")
    ]
    assert all(p.unit_seed == 42 for p in plans)
    no_cfg = batch_plans(ARMS[:2], 42, encode_prompt(tiny_loaded, PROMPT, _gen(2, guidance=1.0)))
    assert [(p.arm, p.branch) for p in no_cfg] == [("base", "cond"), ("m1", "cond")]
    rows = generate_group(tiny_loaded, PROMPT, 3, ARMS[:2], _gen(2, guidance=1.0), REC)
    assert set(rows[1].sink_rows.column("branch").to_pylist()) == {"cond"}
    with pytest.raises(ValueError, match="duplicate arm names"):
        generate_group(tiny_loaded, PROMPT, 3, [ARMS[0], ARMS[0]], _gen(2), REC)


def test_recording_top5_query_stride_changes_only_top5(tiny_loaded):
    """recording.top5_query_stride reaches the statistics: top-5 comes from the query subsample, while the
    mass, entropy, selections and pixels of the run stay those of the exact recording."""
    arms = ARMS[:2]
    exact = generate_group(tiny_loaded, PROMPT, 3, arms, _gen(1), REC)
    strided = generate_group(tiny_loaded, PROMPT, 3, arms, _gen(1), REC.model_copy(update={"top5_query_stride": 3}))
    for e, s in zip(exact, strided):
        assert np.array_equal(_pixels(e.image), _pixels(s.image))
        a, b = e.sink_rows.to_pandas(), s.sink_rows.to_pandas()
        assert a["entropy"].tolist() == b["entropy"].tolist()
        assert [list(x) for x in a["topk_mass"]] == [list(x) for x in b["topk_mass"]]
        assert a["top5_conc"].notna().all() and b["top5_conc"].notna().all()
        assert (a["top5_conc"] != b["top5_conc"]).any()  # 16 image queries -> 6 of them
