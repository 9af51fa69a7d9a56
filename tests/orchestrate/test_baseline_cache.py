"""The baseline cache across runs: reuse is bit-identical, provenance says so, entries are atomic (tiny SD3, CPU)."""

from __future__ import annotations

import hashlib
import multiprocessing
import zipfile
from pathlib import Path

import pyarrow.dataset as ds
import pytest

from jobs.baseline_cache import BaselineCache, identity_key, resolve_root
from jobs.rundir import RunDir
from jobs.run_shard import run_shard
from orchestrate.create import create_run
from tests.conftest import tiny_sweep
from tests.orchestrate.cache_publisher import publish_many

LATE = {"preset": "fixed.m1", "layers": [1], "step_window": {"start": 0.5, "end": 1.0}}


def _run(tmp: Path, name: str, cache: str, arms: list[dict], generation: dict | None = None, units_cache: bool = True) -> RunDir:
    generation = generation or {"steps": 4, "guidance": 5.0, "height": 64, "width": 64}
    sweep = tiny_sweep(tmp, name=name, prompts=1, generation=generation, arms=arms, cache={"baselines": cache, "units": units_cache})
    run, manifest, _ = create_run(sweep, None)
    for shard in manifest.shard_ids:
        run_shard(run.root, shard)
    return run


def _units(run: RunDir):
    return ds.dataset(run.tables_dir / "units", format="parquet").to_table().to_pandas().set_index("arm")


def _sinks(run: RunDir, arm: str):
    table = ds.dataset(run.tables_dir / "sink_steps", format="parquet").to_table().to_pandas()
    return table[table.arm == arm].drop(columns=["unit_id"]).reset_index(drop=True)


def _png(run: RunDir, arm: str) -> str:
    return hashlib.sha256((run.root / _units(run).loc[arm, "image_path"]).read_bytes()).hexdigest()


@pytest.mark.slow
def test_second_run_reuses_the_baseline_bit_for_bit(tmp_path, monkeypatch):
    monkeypatch.delenv("SINKSCOPE_BASELINE_CACHE", raising=False)
    cache = tmp_path / "shared-cache"
    baseline, late = {"name": "baseline", "intervention": None}, {"name": "late", "intervention": LATE}
    reference = _run(tmp_path, "ref", "off", [baseline, late])
    # intervened units stay out of the cache here, so the consumer's late arm really starts from cached latents
    producer = _run(tmp_path, "producer", str(cache), [baseline, late], units_cache=False)
    consumer = _run(tmp_path, "consumer", str(cache), [baseline, {"name": "late2", "intervention": LATE}], units_cache=False)

    (entry,) = BaselineCache(cache).entries()
    produced, consumed = _units(producer), _units(consumer)
    assert produced["reused_from"].isna().all()  # generated there, then published
    assert consumed.loc["baseline", "reused_from"] == str(entry) and consumed.loc["baseline", "seconds"] == 0.0
    assert consumed.loc["late2", "start_step"] == 2 and _units(reference).loc["late", "start_step"] == 2
    for run in (producer, consumer):
        assert _png(run, "baseline") == _png(reference, "baseline")
        assert _sinks(run, "baseline").drop(columns=["arm"]).equals(_sinks(reference, "baseline").drop(columns=["arm"]))
    # the late arm starts from the cached latents of step 2 and still equals the run that generated everything
    assert _png(consumer, "late2") == _png(reference, "late")
    assert _sinks(consumer, "late2").drop(columns=["arm"]).equals(_sinks(reference, "late").drop(columns=["arm"]))
    with zipfile.ZipFile(entry) as archive:
        assert sorted(archive.namelist()) == ["image.png", "latents.safetensors", "meta.json", "sink_steps.parquet"]

    # a damaged entry is a miss: the baseline is generated again (same pixels) and the entry republished intact
    entry.write_bytes(entry.read_bytes()[:-100])
    again = _run(tmp_path, "after-damage", str(cache), [baseline])
    assert _units(again)["reused_from"].isna().all() and _png(again, "baseline") == _png(reference, "baseline")
    assert BaselineCache(cache).get(entry.stem) is not None

    # the environment switch turns it off for one submission
    monkeypatch.setenv("SINKSCOPE_BASELINE_CACHE", "off")
    off = _run(tmp_path, "switched-off", str(cache), [baseline])
    assert _units(off)["reused_from"].isna().all()


def test_resolve_root(tmp_path, monkeypatch):
    monkeypatch.delenv("SINKSCOPE_BASELINE_CACHE", raising=False)
    monkeypatch.setenv("SINKSCOPE_CACHE", str(tmp_path))
    assert resolve_root("auto") == tmp_path.resolve() / "baselines"
    assert resolve_root("off") is None
    assert resolve_root(str(tmp_path / "x")) == (tmp_path / "x").resolve()
    monkeypatch.setenv("SINKSCOPE_BASELINE_CACHE", "off")
    assert resolve_root(str(tmp_path / "x")) is None


def test_identity_key_depends_on_every_field():
    base = {"prompt": "a cat", "seed": 1, "model": {"files": {"a.safetensors": "ab"}}}
    assert identity_key(base) == identity_key(dict(reversed(list(base.items()))))
    assert identity_key(base) != identity_key({**base, "seed": 2})
    assert identity_key(base) != identity_key({**base, "model": {"files": {"a.safetensors": "ac"}}})


def test_concurrent_publishers_never_expose_a_partial_entry(tmp_path):
    """Four processes publish the same key over and over (growing latent steps) while this one reads it."""
    ctx = multiprocessing.get_context("spawn")
    procs = [ctx.Process(target=publish_many, args=(str(tmp_path), n, 15)) for n in range(4)]
    for p in procs:
        p.start()
    cache, seen = BaselineCache(tmp_path), 0
    while any(p.is_alive() for p in procs):
        entry = cache.get("k" * 64)
        if entry is not None:  # whole or absent, never mixed: every member comes from one writer
            seen += 1
            assert entry.image_png == entry.latents == entry.sink_steps_parquet
            assert entry.image_png[:1] == bytes([entry.meta["producer"]["writer"]])
    for p in procs:
        p.join()
        assert p.exitcode == 0
    final = cache.get("k" * 64)
    assert final is not None and final.latent_steps
    assert [p.name for p in cache.entry_path("k" * 64).parent.iterdir()] == [f"{'k' * 64}.zip"]  # no temp files left
