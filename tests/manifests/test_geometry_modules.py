"""The attention-module names the manifests table knows (what layer patterns are checked against at plan
time) are exactly those of the built models, and patterns that would match nothing are refused."""

import re

import pytest

from manifests import SweepError, parse_sweep
from manifests.models import HUB_GEOMETRY, PRESET_GEOMETRY

TINY = ["tiny-sd3", "tiny-sd3-deep", "tiny-sd35", "tiny-sdxl", "tiny-flux", "tiny-pixart", "tiny-qwen-image", "tiny-z-image",
        "tiny-wan", "tiny-ltx-video"]


@pytest.mark.slow
@pytest.mark.parametrize("preset", TINY)
def test_module_names_match_the_built_model(preset):
    import workers
    from manifests import ModelSpec

    loaded = workers.load_pipeline(ModelSpec(preset=preset), device="cpu")
    assert list(PRESET_GEOMETRY[preset].modules) == loaded.attention_layers


def test_the_tables_name_every_block_they_count():
    """Where a table lists module names (models added without them are checked at load time only)."""
    known = [g for g in list(PRESET_GEOMETRY.values()) + list(HUB_GEOMETRY.values()) if g.modules]
    assert len(known) >= len(TINY) + 7  # the tiny presets, sd3-medium-random and the six hub models of the paper
    for geo in known:
        if geo.family == "sdxl":  # integer layer i = the i-th attn2
            assert sum(name.endswith(".attn2") for name in geo.modules) == geo.num_layers
        elif geo.family == "pixart":
            assert len(geo.modules) == 2 * geo.num_layers
        elif geo.family == "z_image":  # integer layer i = layers.{i}.attention; the refiners by glob
            assert sum(name.startswith("layers.") for name in geo.modules) == geo.num_layers
        else:
            assert len({name.rsplit(".", 1)[0] for name in geo.modules}) == geo.num_layers


@pytest.mark.parametrize("preset, pattern, ok", [
    ("tiny-sdxl", "mid_block.*.attn2", True),
    ("tiny-sdxl", "transformer_blocks.0.attn", False),
    ("tiny-flux", "single_transformer_blocks.*", True),
    ("tiny-pixart", "*.attn2", True),
    ("tiny-sd3", "*attn2", False),
    ("tiny-sd35", "*attn2", True),
])
def test_patterns_are_checked_against_the_model(preset, pattern, ok):
    data = {"name": "p", "model": {"preset": preset}, "prompts": {"set": "geneval", "limit": 1},
            "generation": {"height": 64, "width": 64},
            "arms": [{"name": "a", "intervention": {"selection": "topk", "layers": [pattern]}}]}
    if ok:
        parse_sweep(data)
    else:
        with pytest.raises(SweepError, match=re.escape(f"layer pattern '{pattern}' matches no attention module of {preset}")):
            parse_sweep(data)
