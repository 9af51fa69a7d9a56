"""Sweep composition: arms from grids, --set overrides (validated like the file)."""

import pytest
import yaml

from manifests import SweepError, parse_sweep, read_sweep_file
from manifests.compose import materialise_arm_grids, parse_override
from manifests.shrink import shrink

BASE = {
    "name": "grid",
    "model": {"preset": "tiny-sd3-deep"},
    "prompts": {"set": "geneval", "limit": 2},
    "arms": [{"name": "baseline", "intervention": None}],
}


def _sweep(**extra):
    return parse_sweep({**BASE, **extra})


def test_grid_is_the_product_with_names_from_the_values():
    sweep = _sweep(arm_grid=[{
        "base": {"preset": "fixed.m1"},
        "vary": {"k": [1, 2], "layers": [[1], [2, 3]], "step_window": [{"start": 0.0, "end": 0.5}, {"start": 0.5, "end": 1.0}]},
    }])
    names = [a.name for a in sweep.arms]
    assert names[0] == "baseline" and len(names) == 1 + 2 * 2 * 2
    assert names[1:3] == ["fixed.m1-k1-L1-w0.0_0.5", "fixed.m1-k1-L1-w0.5_1.0"]
    assert "fixed.m1-k2-L2_3-w0.5_1.0" in names
    by_name = {a.name: a.intervention for a in sweep.arms}
    iv = by_name["fixed.m1-k2-L2_3-w0.5_1.0"]
    assert (iv.k, iv.layers, iv.step_window.start, iv.score_op, iv.selection) == (2, [2, 3], 0.5, "remove", "topk")


def test_grid_over_presets_with_a_name_template():
    sweep = _sweep(arm_grid=[{"vary": {"preset": ["fixed.m1", "fixed.random"], "k": [1, 4]}, "name": "{preset}-k{k}",
                              "base": {"layers": [2]}}])
    assert [a.name for a in sweep.arms[1:]] == ["fixed.m1-k1", "fixed.m1-k4", "fixed.random-k1", "fixed.random-k4"]
    assert sweep.arms[3].intervention.selection == "random" and sweep.arms[3].intervention.layers == [2]


def test_grid_arm_equals_the_hand_written_arm():
    """A generated arm is validated and resolved exactly like the same arm written by hand."""
    generated = _sweep(arm_grid=[{"base": {"preset": "fixed.m1", "layers": [1]}, "vary": {"k": [3]}, "name": "m1k3"}])
    hand = parse_sweep({**BASE, "arms": BASE["arms"] + [{"name": "m1k3", "intervention": {"preset": "fixed.m1", "k": 3, "layers": [1]}}]})
    assert generated.arms == hand.arms


def test_generated_arm_errors_name_the_grid_and_values():
    with pytest.raises(SweepError) as info:
        _sweep(arm_grid=[{"base": {"preset": "fixed.m1", "layers": [1]}, "vary": {"bias": [-1.0, 0.0]}}])
    message = str(info.value)
    assert "arm_grid[0] (bias=-1.0), arm 'fixed.m1-bias-1.0'" in message and "contradicts score_op='remove'" in message
    with pytest.raises(SweepError, match=r"arm_grid\[0\] \(layers=\[9\]\), arm 'fixed.m1-L9'.intervention.layers: layer 9 is outside"):
        _sweep(arm_grid=[{"base": "fixed.m1", "vary": {"layers": [[9]]}}])  # outside the 4-layer model


def test_name_collisions_between_grids_are_refused():
    with pytest.raises(SweepError, match=r"generated arm name 'fixed.m1-k1' is already the name of arm_grid\[0\] \(k=1\)"):
        _sweep(arm_grid=[{"base": "fixed.m1", "vary": {"k": [1]}}, {"base": "fixed.m1", "vary": {"k": [1]}}])


def test_the_frozen_raw_keeps_the_grid_and_expands_the_same(tmp_path):
    path = tmp_path / "g.yaml"
    path.write_text(yaml.safe_dump({**BASE, "arm_grid": [{"base": {"preset": "fixed.m1", "layers": [1]}, "vary": {"k": [1, 2]}}]}))
    sweep, raw = read_sweep_file(path)
    assert "arm_grid" in raw and len(raw["arms"]) == 1
    assert parse_sweep(raw).arms == sweep.arms


def test_smoke_shrink_maps_the_layers_of_generated_arms():
    raw = {**BASE, "model": {"preset": "tiny-sd3-deep"},
           "arm_grid": [{"base": "fixed.m1", "vary": {"layers": [[0], [3]]}, "name": "L{layers}"}]}
    small = shrink(materialise_arm_grids(raw), "sd3", 4)
    sweep = parse_sweep(small)
    assert [a.name for a in sweep.arms] == ["baseline", "L0", "L3"]
    assert "arm_grid" not in small


# ---- --set overrides -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pair, path, value", [
    ("generation.steps=4", ("generation", "steps"), 4),
    ("arms[0].intervention.k=2", ("arms", 0, "intervention", "k"), 2),
    ("arms.0.name=x", ("arms", 0, "name"), "x"),
    ("recording.layers=[0, 1]", ("recording", "layers"), [0, 1]),
    ("arms[1].intervention=null", ("arms", 1, "intervention"), None),
    ("description=a=b", ("description",), "a=b"),
])
def test_override_parsing(pair, path, value):
    o = parse_override(pair)
    assert (o.path, o.value) == (path, value)


@pytest.mark.parametrize("pair, expected", [
    ("generation.steps", "expected KEY=VALUE"),
    ("=4", "expected KEY=VALUE"),
    ("generation..steps=4", "not a dotted key"),
    ("[0].k=1", "not a dotted key"),
])
def test_bad_override_syntax(pair, expected):
    with pytest.raises(ValueError, match=expected):
        parse_override(pair)


def test_overrides_are_validated_like_the_file():
    sweep = parse_sweep(BASE, overrides=["generation.steps=3", "seeds.count=2"])
    assert (sweep.generation.steps, sweep.seeds.count) == (3, 2)
    with pytest.raises(SweepError) as info:
        parse_sweep(BASE, overrides=["generation.stepz=3", "generation.guidance=.inf"])
    message = str(info.value)
    assert "generation.stepz: unknown key 'stepz'; did you mean 'steps'?" in message and "(from --set generation.stepz=3)" in message
    assert "generation.guidance: Input should be a finite number (got inf) (from --set generation.guidance=inf)" in message


@pytest.mark.parametrize("pair, expected", [
    ("arms[3].name=x", "--set arms[3].name: arms has 1 item(s); positions are 0..0"),
    ("name.first=x", "--set name.first: name is a str, not a mapping"),
    ("model[0]=x", "--set model[0]: model is not a list"),
])
def test_overrides_that_do_not_fit_the_file(pair, expected):
    with pytest.raises(SweepError) as info:
        parse_sweep(BASE, overrides=[pair])
    assert expected in str(info.value)


def test_override_into_a_generated_arm_grid():
    grid = {"base": {"preset": "fixed.m1", "layers": [1]}, "vary": {"k": [1]}}
    sweep = parse_sweep({**BASE, "arm_grid": [grid]}, overrides=["arm_grid[0].vary.k=[1, 2, 3]"])
    assert [a.intervention.k for a in sweep.arms[1:]] == [1, 2, 3]


def test_three_grids_give_the_arms_of_the_hand_written_k_sweep():
    """The catalogue's Table 19 sweep (16 arms written out by a script) from three one-line grids."""
    from pathlib import Path

    catalogue = Path(__file__).parents[2] / "manifests" / "paper" / "table19_k_sweep.yaml"
    raw = yaml.safe_load(catalogue.read_text())
    ks = [1, 5, 10, 20, 50]
    grids = [{"base": preset, "vary": {"k": ks}, "name": f"{label}_k{{k}}"}
             for label, preset in (("top", "paper.m2"), ("random", "paper.m2_random"), ("bottom", "paper.m2_bottom"))]
    composed = parse_sweep({**raw, "arms": raw["arms"][:1], "arm_grid": grids})
    written = parse_sweep(raw)
    assert {a.name: a.intervention for a in composed.arms} == {a.name: a.intervention for a in written.arms}
    assert len(composed.arms) == 16


def test_a_cross_check_problem_names_the_override_that_caused_it():
    with pytest.raises(SweepError, match=r"layer 9 is outside .* \(from --set arms\[1\]\.intervention\.layers=\[9\]\)"):
        parse_sweep({**BASE, "arms": BASE["arms"] + [{"name": "s", "intervention": {"preset": "fixed.m1", "layers": [1]}}]},
                    overrides=["arms[1].intervention.layers=[9]"])


def test_a_grid_and_its_arms_written_out_are_one_experiment():
    from manifests import Sweep, config_hash, resolve_prompts

    base = {"preset": "fixed.m1", "layers": [1]}
    grid = parse_sweep({**BASE, "arm_grid": [{"base": base, "vary": {"k": [1, 2]}, "name": "m1k{k}"}]})
    hand = parse_sweep({**BASE, "arms": BASE["arms"] + [{"name": f"m1k{k}", "intervention": {**base, "k": k}} for k in (1, 2)]})
    assert grid.arm_grid == [] and grid == hand
    assert config_hash(grid, resolve_prompts(grid)) == config_hash(hand, resolve_prompts(hand))
    # a full dump validates again to the same sweep, and so does a direct model_validate of the raw grid
    assert Sweep.model_validate(grid.model_dump()) == grid
    assert Sweep.model_validate({**BASE, "arm_grid": [{"base": base, "vary": {"k": [1, 2]}, "name": "m1k{k}"}]}) == grid
