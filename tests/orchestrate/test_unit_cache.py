"""Intervened units in the cache across runs: reuse is bit-identical to generating them, batches reuse whole
(tiny SD3, CPU). The storage guarantees (atomic entries, concurrent publishers) are the baseline cache's own
(tests/orchestrate/test_baseline_cache.py): intervened units go through the same publish and get."""

from __future__ import annotations

import pytest

from jobs.baseline_cache import BaselineCache, identity_key
from manifests import ArmSpec
from manifests.grouping import chunk_identity
from tests.orchestrate.test_baseline_cache import LATE, _png, _run, _sinks, _units

BASELINE = {"name": "baseline", "intervention": None}
SINK = {"preset": "fixed.m1", "layers": [1]}
RANDOM = {"preset": "fixed.random", "layers": [1]}
OTHER = {"preset": "fixed.m1", "layers": [0]}


def _same(run, arm, reference, ref_arm) -> bool:
    return _png(run, arm) == _png(reference, ref_arm) and _sinks(run, arm).drop(columns=["arm"]).equals(
        _sinks(reference, ref_arm).drop(columns=["arm"]))


@pytest.mark.slow
def test_intervened_units_are_reused_bit_for_bit_across_runs(tmp_path, monkeypatch):
    monkeypatch.delenv("SINKSCOPE_BASELINE_CACHE", raising=False)
    cache = str(tmp_path / "cache")
    arms = [BASELINE, {"name": "sink", "intervention": SINK}, {"name": "random", "intervention": RANDOM},
            {"name": "late", "intervention": LATE}]
    reference = _run(tmp_path, "ref", "off", arms)
    producer = _run(tmp_path, "producer", cache, arms)
    assert _units(producer)["reused_from"].isna().all()
    # other arm names, one arm the producer never ran: the three known units come from the cache
    consumer = _run(tmp_path, "consumer", cache, [BASELINE, {"name": "sink2", "intervention": SINK},
                                                   {"name": "random2", "intervention": RANDOM},
                                                   {"name": "late2", "intervention": LATE},
                                                   {"name": "other", "intervention": OTHER},
                                                   # a window naming every step acts as no window: the same unit
                                                   {"name": "windowed", "intervention": {**SINK, "step_window": {"start": 0.0, "end": 1.0}}}])
    units = _units(consumer)
    entries = {str(p) for p in BaselineCache(cache).entries()}
    assert units.loc["windowed", "reused_from"] == units.loc["sink2", "reused_from"]
    assert _same(consumer, "windowed", reference, "sink")
    for arm in ("baseline", "sink2", "random2", "late2"):
        assert units.loc[arm, "reused_from"] in entries and units.loc[arm, "seconds"] == 0.0, arm
    assert units.loc["late2", "start_step"] == 2  # provenance keeps where its trajectory would have started
    assert units["reused_from"].isna().sum() == 1 and units["reused_from"].isna()["other"]
    for arm, ref in (("baseline", "baseline"), ("sink2", "sink"), ("random2", "random"), ("late2", "late")):
        assert _same(consumer, arm, reference, ref), arm

    # cache.units: false keeps intervened units out (baselines still reused)
    only_baselines = _run(tmp_path, "baselines-only", cache, arms, units_cache=False)
    assert _units(only_baselines)["reused_from"].notna().tolist() == [True, False, False, False]
    assert _same(only_baselines, "sink", reference, "sink")


@pytest.mark.slow
def test_a_batch_is_reused_whole_or_run_whole(tmp_path, monkeypatch):
    monkeypatch.delenv("SINKSCOPE_BASELINE_CACHE", raising=False)
    cache = str(tmp_path / "cache")
    arms = [BASELINE, {"name": "sink", "intervention": SINK}, {"name": "random", "intervention": RANDOM}]
    batched = {"steps": 4, "guidance": 5.0, "height": 64, "width": 64, "arms_per_batch": 2}
    _run(tmp_path, "alone", cache, arms)  # units made one at a time: not what a batch of two computes
    reference = _run(tmp_path, "ref", "off", arms, generation=batched)
    first = _run(tmp_path, "first", cache, arms, generation=batched)
    assert _units(first).loc[["sink", "random"], "reused_from"].isna().all()
    assert _same(first, "sink", reference, "sink") and _same(first, "random", reference, "random")

    second = _run(tmp_path, "second", cache, [*arms, {"name": "other", "intervention": OTHER}], generation=batched)
    units = _units(second)
    assert units.loc[["baseline", "sink", "random"], "reused_from"].notna().all() and units["reused_from"].isna()["other"]
    assert _same(second, "sink", reference, "sink") and _same(second, "random", reference, "random")

    # one member of the batch lost from the cache: the batch runs whole, and both are what the batch computes
    random_entry = BaselineCache(cache).entry_path(_units(second).loc["random", "reused_from"].split("/")[-1][:-4])
    random_entry.unlink()
    third = _run(tmp_path, "third", cache, arms, generation=batched)
    assert _units(third).loc[["sink", "random"], "reused_from"].isna().all()
    assert _same(third, "sink", reference, "sink") and _same(third, "random", reference, "random")


def test_chunk_identity_follows_what_changes_the_computation():
    sink, rnd = ArmSpec(name="a", intervention=SINK), ArmSpec(name="b", intervention=RANDOM)
    renamed = ArmSpec(name="c", intervention=SINK)

    def key(chunk, position, step=0):
        return identity_key({"group": 1, "unit": chunk_identity(chunk, position, step, 4)})

    assert key([sink], 0) == key([renamed], 0)  # the arm's name is not in it
    assert key([sink], 0) == key([sink], 0, step=2)  # alone: bit-identical from any start step
    assert key([sink], 0) != key([rnd], 0)
    assert key([sink, rnd], 0) != key([sink], 0)  # batched: the batch decides the rounding
    assert key([sink, rnd], 0) != key([rnd, sink], 1)
    assert key([sink, rnd], 0) != key([sink, rnd], 0, step=2)
    assert key([sink, rnd], 0) == key([renamed, rnd], 0)
    # a window naming every step is no window, with or without the paper's gating; one naming fewer steps is not
    for window in ({"start": 0.0, "end": 1.0}, {"start": 0.0, "end": 1.0, "legacy_paper_gating": True}):
        assert key([ArmSpec(name="w", intervention={**SINK, "step_window": window})], 0) == key([sink], 0)
    late = ArmSpec(name="late", intervention={**SINK, "step_window": {"start": 0.5, "end": 1.0}})
    late_by_other_bounds = ArmSpec(name="late", intervention={**SINK, "step_window": {"start": 0.4, "end": 0.9}})
    assert key([late], 0) != key([sink], 0) and key([late], 0) == key([late_by_other_bounds], 0)  # steps 2, 3 of 4


@pytest.mark.slow
def test_a_baseline_republished_for_more_latents_keeps_the_steps_it_held(tmp_path, monkeypatch):
    monkeypatch.delenv("SINKSCOPE_BASELINE_CACHE", raising=False)
    cache = str(tmp_path / "cache")
    early = {**LATE, "step_window": {"start": 0.25, "end": 1.0}}  # starts at step 1 of 4; LATE at step 2
    _run(tmp_path, "late", cache, [BASELINE, {"name": "late", "intervention": LATE}], units_cache=False)
    grown = _run(tmp_path, "early", cache, [BASELINE, {"name": "early", "intervention": early}], units_cache=False)
    assert _units(grown)["reused_from"].isna().all()  # the entry lacked step 1: the baseline ran again
    (entry,) = BaselineCache(cache).entries()
    assert BaselineCache(cache).get(entry.stem).latent_steps == [1, 2]
    again = _run(tmp_path, "late-again", cache, [BASELINE, {"name": "late", "intervention": LATE}], units_cache=False)
    assert _units(again).loc["baseline", "reused_from"] == str(entry)


def test_an_unquoted_yaml_off_turns_the_cache_off():
    from manifests.schema import CacheSpec

    assert CacheSpec.model_validate({"baselines": False}).baselines == "off"  # `baselines: off` in YAML 1.1
    with pytest.raises(ValueError):
        CacheSpec.model_validate({"baselines": True})
