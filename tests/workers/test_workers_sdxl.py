"""Tiny SDXL: stock-exact processors on attn1/attn2, M4 interventions by glob, cross-attention records."""

import numpy as np
import pytest
import torch

from manifests import ArmSpec, GenerationSpec, RecordingSpec
from workers import generate_group
from workers.generate import initial_latents
from workers.tiny import build_tiny_pipeline

PROMPT = "a green vase with three sunflowers"
GEN = GenerationSpec(steps=3, guidance=5.0)


@pytest.fixture(scope="module")
def tiny_xl(tiny_xl_loaded):
    return tiny_xl_loaded


def test_sdxl_geometry_and_layer_names(tiny_xl):
    assert tiny_xl.family == "sdxl" and (tiny_xl.geometry.num_layers, tiny_xl.geometry.heads) == (11, 4)
    cross = [name for name in tiny_xl.attention_layers if name.endswith("attn2")]
    assert len(cross) == 11 and sum(name.startswith("mid_block") for name in cross) == 2
    with pytest.raises(ValueError, match="flow-matching"):
        generate_group(tiny_xl, PROMPT, 1, [ArmSpec(name="b")], GenerationSpec(steps=2, scheduler="flow_euler"), RecordingSpec())


def test_sdxl_noop_bit_identical_and_m4_interventions(tiny_xl):
    stock = build_tiny_pipeline("tiny-sdxl")
    latents = initial_latents(tiny_xl, 9, 64, 64)
    expected = stock(PROMPT, latents=latents.clone(), num_inference_steps=3, guidance_scale=5.0).images[0]
    arms = [ArmSpec(name="base"), ArmSpec(name="cross", intervention="paper.m4_cross"), ArmSpec(name="self", intervention="paper.m4_self")]
    base, cross, self_attn = generate_group(tiny_xl, PROMPT, 9, arms, GEN, RecordingSpec(layers=[0, 9, 10], topk=3))
    assert np.array_equal(np.asarray(base.image), np.asarray(expected))
    assert not np.array_equal(np.asarray(cross.image), np.asarray(base.image))
    assert not np.array_equal(np.asarray(self_attn.image), np.asarray(base.image))
    rows = cross.sink_rows.to_pandas()
    hit = rows[rows.intervened]
    mid = [i for i, n in enumerate([n for n in tiny_xl.attention_layers if n.endswith("attn2")]) if n.startswith("mid_block")]
    assert set(hit.layer) == set(mid) and (hit.removed_mass_after == 0.0).all()
    assert all(s[0] == t[0] for s, t in zip(hit.selected_idx, hit.topk_idx))  # M4: top-1 over all queries = image queries here
    assert set(m for mods in rows.topk_modality for m in mods) == {"clip"}  # cross-attention keys are the 77 CLIP tokens
    assert not self_attn.sink_rows.column("intervened").to_pylist().count(True)  # attn1 is not an integer layer


def test_sdxl_cross_attention_records_match_naive(tiny_xl):
    attn = tiny_xl.pipe.unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2  # integer layer 0
    captured = []
    handle = attn.register_forward_pre_hook(lambda m, a, kw: captured.append((a[0] if a else kw["hidden_states"], kw["encoder_hidden_states"])), with_kwargs=True)
    try:
        result = generate_group(tiny_xl, PROMPT, 2, [ArmSpec(name="b")], GenerationSpec(steps=1, guidance=5.0), RecordingSpec(layers=[0], topk=4))[0]
    finally:
        handle.remove()
    hidden, context = captured[0]
    b, heads = hidden.shape[0], attn.heads

    def split(x):
        return x.double().view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    with torch.no_grad():
        q, k = split(attn.to_q(hidden)), split(attn.to_k(context))
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
    mass, entropy = p.mean(2), -(p * p.log()).sum(-1).mean(-1)
    rows = result.sink_rows.to_pandas()
    for _, row in rows.iterrows():
        e = 0 if row.branch == "uncond" else 1
        np.testing.assert_allclose(row.topk_mass, mass[e, row["head"], list(row.topk_idx)].numpy(), rtol=1e-4, atol=1e-8)
        assert row.max_mass == pytest.approx(float(mass[e, row["head"]].max()), rel=1e-4)
        assert row.entropy == pytest.approx(float(entropy[e, row["head"]]), rel=1e-5)
