"""Expansion: determinism, pairing, shard layout, seed rule, bundled prompt sets."""

import copy
from pathlib import Path

import pytest
import yaml

from manifests import expand, load_bundled_prompts, parse_sweep, read_sweep_file, resolve_prompts, unit_id
from manifests.interventions import PRESETS, Intervention, StepWindow

DEMO = Path(__file__).parents[2] / "manifests" / "examples" / "sd3_tiny.yaml"  # the demo before the toy world


def _manifest(data):
    sweep = parse_sweep(data)
    return expand(sweep, resolve_prompts(sweep))


@pytest.fixture
def demo_data():
    return yaml.safe_load(DEMO.read_text())


def test_same_sweep_same_hash_units_and_shards(demo_data):
    a, b = _manifest(demo_data), _manifest(copy.deepcopy(demo_data))
    assert a.config_hash == b.config_hash
    assert a.table.equals(b.table)


def test_hash_ignores_executor_and_output_but_not_results(demo_data):
    base = _manifest(demo_data).config_hash
    moved = copy.deepcopy(demo_data)
    moved["output_root"] = "/elsewhere"
    moved["executor"] = {"kind": "slurm", "partition": "gpu"}
    assert _manifest(moved).config_hash == base
    changed = copy.deepcopy(demo_data)
    changed["generation"]["steps"] = 5
    assert _manifest(changed).config_hash != base


def test_every_arm_of_a_pair_shares_seed_and_shard(demo_data):
    table = _manifest(demo_data).table.to_pandas()
    arms = {a["name"] for a in demo_data["arms"]}
    for (_, _), group in table.groupby(["prompt_id", "seed_index"]):
        assert set(group.arm) == arms
        assert group.seed.nunique() == 1
        assert group.shard_id.nunique() == 1
        assert group.group_index.nunique() == 1


def test_shards_hold_whole_prompts(demo_data):
    demo_data["sharding"]["prompts_per_shard"] = 3
    m = _manifest(demo_data)
    table = m.table.to_pandas()
    assert m.shard_ids == [0, 1]
    assert table.groupby("shard_id").prompt_id.nunique().tolist() == [3, 1]
    assert len(table) == 4 * 2 * 3


def test_seed_rule_reproduces_paper_42_plus_i():
    data = {"name": "s", "model": {"preset": "tiny-sd3"}, "prompts": {"set": "geneval", "limit": 3},
            "seeds": {"base": 42, "count": 2}, "arms": [{"name": "baseline"}]}
    table = _manifest(data).table.to_pandas()
    first = table[table.seed_index == 0].seed.tolist()
    assert first == [42, 43, 44]
    assert len(set(table.seed)) == len(table)  # no collisions between prompts and seed indices


def test_bundled_sets():
    geneval = load_bundled_prompts("geneval")
    assert len(geneval) == 553
    assert geneval[0].tag == "single_object"
    balanced = load_bundled_prompts("geneval-balanced-100")
    assert len(balanced) == 100
    assert sorted({p.tag for p in balanced}) == ["color_attr", "colors", "counting", "position", "single_object", "two_object"]
    assert all(geneval[p.geneval_index].text == p.text for p in balanced)


def test_prompt_file_relative_to_sweep(tmp_path):
    (tmp_path / "p.txt").write_text("a cat\n\n a dog \n")
    (tmp_path / "s.yaml").write_text(yaml.safe_dump(
        {"name": "f", "model": {"preset": "tiny-sd3"}, "prompts": {"file": "p.txt"}, "arms": [{"name": "b"}]}))
    sweep, _ = read_sweep_file(tmp_path / "s.yaml")
    prompts = resolve_prompts(sweep, base_dir=tmp_path)
    # a prompt's id is its line number - 1, blank lines included
    assert [(p.prompt_id, p.text) for p in prompts] == [(0, "a cat"), (2, "a dog")]


def test_every_preset_is_valid_for_sd3_medium():
    for name in PRESETS:
        data = {"name": "p", "model": {"hub_id": "stabilityai/stable-diffusion-3-medium-diffusers"},
                "prompts": {"set": "geneval", "limit": 1}, "arms": [{"name": "a", "intervention": name}]}
        if name.startswith("paper.m4"):
            continue  # SDXL presets: name patterns, checked with the SDXL model
        parse_sweep(data)


def test_preset_with_overrides():
    data = {"name": "p", "model": {"preset": "tiny-sd3"}, "prompts": {"set": "geneval", "limit": 1},
            "arms": [{"name": "a", "intervention": {"preset": "paper.m1a", "k": 5, "layers": [0, 1]}}]}
    iv = parse_sweep(data).arms[0].intervention
    assert (iv.k, iv.layers, iv.query_scope, iv.bias) == (5, [0, 1], "all", -1e4)


@pytest.mark.parametrize(
    "window,steps,expected",
    [
        ({"start": 0.0, "end": 0.2}, 20, [0, 1, 2, 3]),
        ({"start": 0.8, "end": 1.0}, 20, [16, 17, 18, 19]),
        ({"start": 0.4, "end": 0.6}, 20, [8, 9, 10, 11]),
        ({"start": 0.0, "end": 1.0}, 4, [0, 1, 2, 3]),
    ],
)
def test_step_window_names_exactly_its_steps(window, steps, expected):
    assert StepWindow(**window).active_steps(steps) == expected


def test_legacy_gating_reproduces_the_paper_quirk():
    late = StepWindow(start=0.8, end=1.0, legacy_paper_gating=True).active_steps(20)
    assert late[0] == 0  # the paper's late window also intervenes at step 0
    assert 19 in late and 16 not in late


def test_sigma_window():
    sigmas = [1.0, 0.8, 0.5, 0.2]
    assert StepWindow(sigma_min=0.3, sigma_max=0.9).active_steps(4, sigmas) == [1, 2]


def test_intervention_budget():
    assert Intervention(selection="static", indices=[0, 3], layers=[1]).keys_per_head == 2
    assert Intervention(selection="topk", k=5, layers=[1]).keys_per_head == 5


def test_metric_names_match_the_analysis_registry():
    import analysis.metrics

    from manifests.schema import METRICS

    assert sorted(METRICS) == sorted(analysis.metrics.available())


def test_column_wise_expansion_matches_the_unit_rules():
    data = {"name": "t", "model": {"preset": "tiny-sd3"}, "prompts": {"set": "geneval", "ids": [7, 3, 80, 12, 5]},
            "seeds": {"count": 3, "base": 11, "stride": 1000}, "sharding": {"prompts_per_shard": 2},
            "arms": [{"name": "b"}, {"name": "s", "intervention": {"preset": "fixed.m1", "layers": [1]}}]}
    manifest = _manifest(data)
    sweep = manifest.sweep
    rows = manifest.table.to_pylist()
    expected = [(p.prompt_id, s, a.name) for p in manifest.prompts for s in range(3) for a in sweep.arms]
    assert [(r["prompt_id"], r["seed_index"], r["arm"]) for r in rows] == expected
    for position, r in enumerate(rows):
        prompt_position = position // 6
        assert r["unit_id"] == unit_id(r["prompt_id"], r["seed_index"], r["arm"])
        assert r["seed"] == sweep.seeds.seed(r["prompt_id"], r["seed_index"])
        assert r["shard_id"] == prompt_position // 2 and r["group_index"] == (prompt_position % 2) * 3 + r["seed_index"]
        assert r["prompt"] == manifest.prompts[prompt_position].text
