"""Recording by module-name pattern: SD3.5 `.attn2` and SDXL `attn1`, with stable integer ids and the module name."""

import numpy as np
import pytest
import torch

from manifests import ArmSpec, GenerationSpec, RecordingSpec
from workers import SINK_STEP_SCHEMA, generate_group

PROMPT = "a blue bird on a branch"
GEN = GenerationSpec(steps=2, guidance=5.0)


def _capture(module):
    seen = []

    def hook(m, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).detach().clone())

    return seen, module.register_forward_pre_hook(hook, with_kwargs=True)


def _self_attention_mass(attn, hidden):
    """Naive float64 softmax of a self-attention module over its own projections (QK-norm included)."""
    b, heads = hidden.shape[0], attn.heads

    def split(x):
        return x.view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    with torch.no_grad():
        q, k = split(attn.to_q(hidden)), split(attn.to_k(hidden))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
    p = torch.softmax(q.double() @ k.double().transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    return p.mean(dim=2)


def _check_rows_against(rows, mass, steps):
    for step in range(steps):
        for e, branch in enumerate(["uncond", "cond"]):
            for head in range(mass[step].shape[1]):
                row = rows[(rows.step == step) & (rows.branch == branch) & (rows["head"] == head)].iloc[0]
                np.testing.assert_allclose(row.topk_mass, mass[step][e, head, list(row.topk_idx)].numpy(), rtol=1e-4, atol=1e-8)
                assert row.max_mass == pytest.approx(float(mass[step][e, head].max()), rel=1e-4)


def test_sd35_attn2_by_pattern(tiny35_loaded):
    loaded = tiny35_loaded
    ids = {info.name: info.layer_id for info in loaded.layers}
    assert ids == {"transformer_blocks.0.attn": 0, "transformer_blocks.0.attn2": 2, "transformer_blocks.1.attn": 1}
    assert loaded.layer_name(2) == "transformer_blocks.0.attn2"
    attn2 = loaded.pipe.transformer.transformer_blocks[0].attn2
    seen, handle = _capture(attn2)
    rec = RecordingSpec(layers=[1, "transformer_blocks.*.attn2", "transformer_blocks.1.attn"], topk=3)  # overlap: recorded once
    try:
        result = generate_group(loaded, PROMPT, 4, [ArmSpec(name="base")], GEN, rec)[0]
    finally:
        handle.remove()
    table = result.sink_rows
    assert table.schema.equals(SINK_STEP_SCHEMA) and table.schema.field("layer").type == "int32"
    rows = table.to_pandas()
    assert sorted(set(zip(rows.layer, rows.layer_name))) == [(1, "transformer_blocks.1.attn"), (2, "transformer_blocks.0.attn2")]
    assert len(rows) == 2 * GEN.steps * 2 * 4  # 2 modules × steps × branches × heads, no duplicates
    attn2_rows = rows[rows.layer == 2]
    assert {m for mods in attn2_rows.topk_modality for m in mods} == {"image"}  # self-attention: image keys only
    _check_rows_against(attn2_rows, [_self_attention_mass(attn2, h) for h in seen], GEN.steps)
    # recording by pattern leaves the image bit-identical
    plain = generate_group(loaded, PROMPT, 4, [ArmSpec(name="base")], GEN, RecordingSpec())[0]
    assert np.array_equal(np.asarray(plain.image), np.asarray(result.image))


def test_sdxl_attn1_by_pattern_and_unknown_pattern(tiny_xl_loaded):
    loaded = tiny_xl_loaded
    attn1 = [info for info in loaded.layers if info.name.endswith(".attn1")]
    attn2 = [info for info in loaded.layers if info.name.endswith(".attn2")]
    assert [i.layer_id for i in attn2] == list(range(11)) and [i.block_index for i in attn2] == list(range(11))
    assert [i.layer_id for i in attn1] == list(range(11, 22)) and all(i.block_index is None for i in attn1)
    mid = [i for i in attn1 if i.name.startswith("mid_block")]
    module = loaded.pipe.unet.get_submodule(mid[0].name)
    seen, handle = _capture(module)
    try:
        result = generate_group(loaded, PROMPT, 2, [ArmSpec(name="b")], GEN, RecordingSpec(layers=["mid_block.*.attn1"], topk=4))[0]
    finally:
        handle.remove()
    rows = result.sink_rows.to_pandas()
    assert sorted(set(zip(rows.layer, rows.layer_name))) == sorted((i.layer_id, i.name) for i in mid)
    assert {m for mods in rows.topk_modality for m in mods} == {"image"}
    _check_rows_against(rows[rows.layer == mid[0].layer_id], [_self_attention_mass(module, h) for h in seen], GEN.steps)
    with pytest.raises(ValueError, match="matches no attention module"):
        generate_group(loaded, PROMPT, 2, [ArmSpec(name="b")], GEN, RecordingSpec(layers=["down_blocks.*.attn3"]))
    with pytest.raises(ValueError, match="layer 11 is outside"):
        generate_group(loaded, PROMPT, 2, [ArmSpec(name="b")], GEN, RecordingSpec(layers=[11]))
