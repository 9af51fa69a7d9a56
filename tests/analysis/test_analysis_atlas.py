"""analysis.atlas on a hand-made run whose atlas columns are known: heat maps, region shares, summary, files."""

import pyarrow as pa
import pytest
from analysis_fakerun import FakeRunSpec, make_run, unit_id

from analysis.atlas import model_atlas, write_atlas
from jobs import runformat as rf
from jobs.rundir import RunDir


def _rewrite_sink_steps(run, prompts):
    """Baseline arm, cond + uncond, layers 0/1, steps 0/1, heads 0/1. Layer 0: key 5 (an image corner) everywhere;
    layer 1: head 0 sinks on key 100 + prompt (text padding), head 1 on key 5. Ratio = 10·layer + step (+100 uncond)."""
    rows = []
    for p in prompts:
        for step in (0, 1):
            for layer in (0, 1):
                for head in (0, 1):
                    for branch in ("cond", "uncond"):
                        idx = 100 + p if (layer, head) == (1, 0) else 5
                        rows.append({
                            "unit_id": unit_id(p, 0, "base"), "shard_id": 0, "prompt_id": p, "seed_index": 0, "arm": "base", "step": step,
                            "timestep": 1.0, "sigma": 1.0, "layer": layer, "head": head, "branch": branch, "intervened": False,
                            "layer_name": f"transformer_blocks.{layer}.attn", "sink_idx": idx,
                            "sink_region": "text:padding" if idx >= 100 else "image:corner",
                            "sink_row": None if idx >= 100 else 0, "sink_col": None if idx >= 100 else 5,
                            "sink_ratio": 10.0 * layer + step + (100.0 if branch == "uncond" else 0.0),
                        })  # fmt: skip
    rf.atomic_write_parquet(RunDir(run).part_path("sink_steps", 0), pa.Table.from_pylist(rows, schema=rf.SINK_STEPS_SCHEMA))


def test_atlas_of_a_known_run(tmp_path):
    run = make_run(tmp_path / "a", FakeRunSpec(n_prompts=3, n_seeds=1, prompts_per_shard=3, steps=2, layers=(0, 1), heads=2))
    _rewrite_sink_steps(run, range(3))
    atlas = model_atlas(run)
    assert atlas.ratio.to_dict() == {0: {0: 0.0, 1: 10.0}, 1: {0: 1.0, 1: 11.0}}  # cond branch only: no +100
    assert atlas.distinct.to_dict() == {0: {0: 1.0, 1: 2.0}, 1: {0: 1.0, 1: 2.0}}  # layer 1: (3 + 1) / 2 heads
    assert atlas.regions.loc[0, "image:corner"] == 1.0 and atlas.regions.loc[1, "text:padding"] == 0.5
    assert atlas.spatial.shape == (1, 6) and atlas.spatial[0, 5] == 3 * 2 * 3  # units × steps × (2 heads @0 + 1 @1)
    assert atlas.summary["peak_ratio"] == 11.0 and (atlas.summary["peak_layer"], atlas.summary["peak_step"]) == (1, 1)
    assert atlas.summary["distinct_sinks"] == 1 and atlas.summary["dominant_region"] == "image:corner"

    out = tmp_path / "atlas"
    text = write_atlas([run, run], out).read_text()
    assert "RANDOM WEIGHTS" in text and (out / "atlas.png").is_file()
    assert (out / "atlas.csv").read_text().count("\n") == 1 + 2 * 2 * 4  # header + 2 runs × 2 measures × 4 cells


def test_atlas_says_what_to_record(tmp_path):
    run = make_run(tmp_path, FakeRunSpec(n_prompts=2, n_seeds=1, prompts_per_shard=2, steps=1, layers=(0,), heads=1))
    with pytest.raises(ValueError, match="stats: \\[mass, ratio\\]"):
        model_atlas(run)
