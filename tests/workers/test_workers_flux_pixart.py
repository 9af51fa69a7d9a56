"""Flux (dispatcher attention, joint + single blocks, RoPE) and PixArt-Σ (self + masked T5 cross-attention)."""

import numpy as np
import pytest
import torch
from diffusers.models.embeddings import apply_rotary_emb

from attention_reference import reference_attention, reference_mass, reference_selection, run_processor, scope_rows
from manifests import ArmSpec, GenerationSpec, ModelSpec, PromptSpec, RecordingSpec, Sweep, load_bundled_prompts
from manifests.interventions import Intervention
from workers import generate_group, load_pipeline
from workers.generate import initial_latents
from workers.session import ElementPlan, RunContext
from workers.tiny import build_tiny_pipeline
from workers.verify import verify_sweep

PROMPT = "a photo of a cat and a dog"
PROMPTS = load_bundled_prompts("geneval")[:1]


def _context(ivs, branches=("uncond", "cond"), layers=(0,), num_text=None):
    ctx = RunContext([ElementPlan("a", b, iv, 7) for b, iv in zip(branches, ivs)], RecordingSpec(layers=list(layers), topk=4), num_clip_tokens=0)
    ctx.step, ctx.timestep, ctx.sigma, ctx.num_text_tokens = 0, 1000.0, 1.0, num_text
    ctx.active_steps = [None] * len(ivs)
    return ctx


# --- Flux ---------------------------------------------------------------------------------------------


def _flux_inputs(loaded, num_text=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    tf = loaded.pipe.transformer
    dim = tf.inner_dim
    image = torch.randn(2, 16, dim, generator=g)
    text = torch.randn(2, num_text, dim, generator=g)
    ids = torch.cat([torch.zeros(num_text, 3), loaded.pipe._prepare_latent_image_ids(1, 4, 4, "cpu", torch.float32)])
    return image, text, tf.pos_embed(ids)


def _flux_qkv_fp64(attn, image, text, rotary, joint: bool):
    """q / k / v after QK-norm and RoPE, in the canonical [image | text] order, [B, H, S, D] float64."""
    def heads(x):
        return x.unflatten(-1, (-1, attn.head_dim))

    if joint:
        q = torch.cat([attn.norm_added_q(heads(attn.add_q_proj(text))), attn.norm_q(heads(attn.to_q(image)))], 1)
        k = torch.cat([attn.norm_added_k(heads(attn.add_k_proj(text))), attn.norm_k(heads(attn.to_k(image)))], 1)
        v = torch.cat([heads(attn.add_v_proj(text)), heads(attn.to_v(image))], 1)
    else:
        seq = torch.cat([text, image], 1)
        q, k, v = attn.norm_q(heads(attn.to_q(seq))), attn.norm_k(heads(attn.to_k(seq))), heads(attn.to_v(seq))
    q, k = apply_rotary_emb(q, rotary, sequence_dim=1), apply_rotary_emb(k, rotary, sequence_dim=1)
    t = text.shape[1]

    def canonical(x):
        return torch.cat([x[:, t:], x[:, :t]], 1).transpose(1, 2).double()

    return canonical(q), canonical(k), canonical(v)


@pytest.mark.parametrize("module_name, block", [("transformer_blocks.1.attn", 1), ("single_transformer_blocks.0.attn", 2)])
@pytest.mark.parametrize(
    "case",
    [dict(selection="topk", k=2, score_op="remove", query_scope="all"),
     dict(selection="union_topk", k=1, score_op="bias", bias=-2.0, query_scope="image", mass_queries="all"),
     dict(selection="static", indices=[0], key_order="text_image", score_op="prob_scale", eta=0.1, value_op="mean", query_scope="text")],
    ids=["topk-remove", "union-bias", "static-first-text-token"],
)
def test_flux_processor_matches_fp64_reference(tiny_flux_loaded, module_name, block, case):
    loaded = tiny_flux_loaded
    iv = Intervention(layers=[block], **case)
    image, text, rotary = _flux_inputs(loaded)
    joint = module_name.startswith("transformer_blocks")
    args = (image, text, None, rotary) if joint else (torch.cat([text, image], 1), None, None, rotary)
    ctx = _context([iv, iv], layers=[block], num_text=text.shape[1])
    with torch.no_grad():
        attn, stock, ours = run_processor(loaded, module_name, ctx, *args)
        q, k, v = _flux_qkv_fp64(attn, image, text, rotary, joint)
    num_image, keys = image.shape[1], q.shape[2]
    selected = {r.element: r.selected.tolist() for r in ctx.records}
    if iv.selection == "static":
        assert selected[0] == [[num_image]] * 4  # text-first index 0 = the first T5 token, in canonical order
    else:
        mass = reference_mass(q, k, scope_rows(iv.mass_queries, num_image, keys))
        assert [sorted(map(sorted, selected[b])) for b in range(2)] == [sorted(map(sorted, reference_selection(iv, mass[b], 4))) for b in range(2)]
    ref = reference_attention(q, k, v, num_image, [iv, iv], [selected[0], selected[1]])  # canonical order
    t = text.shape[1]
    ref = torch.cat([ref[:, :, num_image:], ref[:, :, :num_image]], 2).transpose(1, 2).flatten(2, 3).float()  # Flux order
    with torch.no_grad():
        if joint:
            expected = (attn.to_out[0](ref[:, t:]), attn.to_add_out(ref[:, :t]))
        else:
            expected = (ref,)
    ours = ours if isinstance(ours, tuple) else (ours,)
    stock = stock if isinstance(stock, tuple) else (stock,)
    for got, want, base in zip(ours, expected, stock):
        torch.testing.assert_close(got, want, atol=2e-5, rtol=1e-4)
    if iv.query_scope == "text" and joint:  # image rows untouched, bit for bit
        assert torch.equal(ours[0], stock[0])
    # recorded mass (image queries) against the float64 softmax of the same q / k (RoPE applied)
    mass = reference_mass(q, k, range(num_image))
    for r in ctx.records:
        np.testing.assert_allclose(r.topk_mass.numpy(), torch.gather(mass[r.element], -1, r.topk_idx).numpy(), rtol=1e-4, atol=1e-8)


def test_flux_noop_modalities_batching_and_verify(tiny_flux_loaded):
    loaded = tiny_flux_loaded
    assert loaded.family == "flux" and (loaded.geometry.num_layers, loaded.geometry.heads) == (4, 4)
    assert [(i.name, i.layer_id) for i in loaded.layers] == [
        ("transformer_blocks.0.attn", 0), ("transformer_blocks.1.attn", 1),
        ("single_transformer_blocks.0.attn", 2), ("single_transformer_blocks.1.attn", 3),
    ]
    gen = GenerationSpec(steps=2, guidance=3.5, max_sequence_length=24)
    stock = build_tiny_pipeline("tiny-flux")
    latents = initial_latents(loaded, 5, 64, 64)
    expected = stock(PROMPT, latents=latents.clone(), num_inference_steps=2, guidance_scale=3.5, max_sequence_length=24).images[0]
    rec = RecordingSpec(layers=[0, 1, 2, 3], topk=40)  # 16 image + 24 T5 keys: every key is recorded
    base = generate_group(loaded, PROMPT, 5, [ArmSpec(name="base")], gen, rec)[0]
    assert np.array_equal(np.asarray(base.image), np.asarray(expected))
    rows = base.sink_rows.to_pandas()
    assert set(rows.branch) == {"cond"} and len(rows) == 2 * 4 * 4  # guidance-distilled: no CFG batch
    real = sum(loaded.pipe.tokenizer_2(PROMPT, max_length=24, padding="max_length", truncation=True).attention_mask)
    assert 0 < real < 24
    for idx, mods in zip(rows.topk_idx, rows.topk_modality):
        assert list(mods) == ["image" if j < 16 else "t5" if j - 16 < real else "t5_pad" for j in idx]
    arms = [ArmSpec(name="base"), ArmSpec(name="m1", intervention={"preset": "fixed.m1", "layers": [0]}),
            ArmSpec(name="rnd", intervention={"preset": "fixed.random", "layers": [3], "k": 2})]
    one = generate_group(loaded, PROMPT, 5, arms, gen, rec)
    two = generate_group(loaded, PROMPT, 5, arms, gen.model_copy(update={"arms_per_batch": 3}), rec)
    for x, y in zip(one, two):
        assert np.abs(np.asarray(x.image, dtype=int) - np.asarray(y.image, dtype=int)).max() <= 1
        sel_x = [s for s in x.sink_rows.column("selected_idx").to_pylist() if s is not None]
        if x.arm == "rnd":
            assert sel_x == [s for s in y.sink_rows.column("selected_idx").to_pylist() if s is not None]
    sweep_arms = arms + [
        ArmSpec(name="m2_single", intervention={"preset": "paper.m2", "layers": [2]}),
        ArmSpec(name="m3", intervention={"preset": "paper.m3", "layers": [1]}),
        ArmSpec(name="noise", intervention={"selection": "modality_random", "k": 3, "layers": [3], "query_scope": "all",
                                            "score_op": "none", "value_op": "noise", "sigma": 0.3}),
    ]
    sweep = Sweep.model_construct(name="v", model=ModelSpec.model_construct(preset="tiny-flux"), prompts=PromptSpec(set="geneval", limit=1),
                                  seeds=Sweep.model_fields["seeds"].default, generation=gen.model_copy(update={"arms_per_batch": 3}),
                                  arms=sweep_arms, recording=RecordingSpec(layers=[0]))
    results = verify_sweep(loaded, sweep, PROMPTS, max_prompts=1)
    assert all(r["passed"] for r in results), [r for r in results if not r["passed"]]


# --- PixArt-Σ -----------------------------------------------------------------------------------------


def test_pixart_masked_cross_attention_matches_fp64_reference(tiny_pixart_loaded):
    loaded = tiny_pixart_loaded
    name = "transformer_blocks.0.attn2"
    g = torch.Generator().manual_seed(3)
    hidden, context = torch.randn(3, 16, 32, generator=g), torch.randn(3, 12, 32, generator=g)
    valid = [12, 5, 1]  # attended T5 tokens per element; the last has only its EOS (like the "" prompt)
    keep = torch.tensor([[j < n for j in range(12)] for n in valid])
    bias = ((~keep).float() * -10000.0)[:, None, :]  # what PixArtTransformer2DModel passes
    iv = Intervention(selection="topk", k=2, layers=[0], mass_queries="all", query_scope="all", score_op="remove", value_op="zero")
    ctx = _context([iv, iv, iv], branches=("cond", "cond", "uncond"))
    with torch.no_grad():
        attn, stock, ours = run_processor(loaded, name, ctx, hidden, context, bias)

        def split(x):
            return x.view(3, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2).double()

        q, k, v = split(attn.to_q(hidden)), split(attn.to_k(context)), split(attn.to_v(context))
    records = {r.element: r for r in ctx.records}
    assert [records[b].selected is not None for b in range(3)] == [True, True, False]  # 1 key left: stays stock
    assert torch.equal(ours[2], stock[2])
    for b in (0, 1):
        n = valid[b]
        p = torch.softmax(q[b] @ k[b, :, :n].transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # masked keys excluded
        top = torch.argsort(p.mean(1), dim=-1, descending=True, stable=True)[:, :2]
        assert sorted(map(sorted, records[b].selected.tolist())) == sorted(map(sorted, top.tolist()))
        assert all(j < n for row in records[b].topk_idx.tolist() for j in row)  # padding never recorded
        np.testing.assert_allclose(records[b].topk_mass.numpy(), torch.gather(p.mean(1), -1, records[b].topk_idx).numpy(), rtol=1e-4)
        out = torch.zeros(attn.heads, 16, q.shape[-1], dtype=torch.float64)
        for h in range(attn.heads):
            logits = q[b, h] @ k[b, h, :n].T / q.shape[-1] ** 0.5
            logits[:, records[b].selected[h]] = float("-inf")
            out[h] = torch.softmax(logits, dim=-1) @ v[b, h, :n]  # zeroed rows have weight 0 anyway
        with torch.no_grad():
            want = attn.to_out[0](out.transpose(0, 1).reshape(16, -1).float())
        torch.testing.assert_close(ours[b], want, atol=2e-5, rtol=1e-4)


def test_pixart_noop_records_and_verify(tiny_pixart_loaded):
    loaded = tiny_pixart_loaded
    assert loaded.family == "pixart" and [(i.name, i.layer_id) for i in loaded.layers] == [
        ("transformer_blocks.0.attn1", 2), ("transformer_blocks.0.attn2", 0), ("transformer_blocks.1.attn1", 3), ("transformer_blocks.1.attn2", 1),
    ]
    gen = GenerationSpec(steps=2, guidance=4.5, max_sequence_length=32)
    stock = build_tiny_pipeline("tiny-pixart")
    latents = initial_latents(loaded, 5, 64, 64)
    expected = stock(PROMPT, latents=latents.clone(), num_inference_steps=2, guidance_scale=4.5, max_sequence_length=32,
                     use_resolution_binning=False, clean_caption=False).images[0]
    base = generate_group(loaded, PROMPT, 5, [ArmSpec(name="base")], gen, RecordingSpec(layers=[0, "*.attn1"], topk=8))[0]
    assert np.array_equal(np.asarray(base.image), np.asarray(expected))
    rows = base.sink_rows.to_pandas()
    cross = rows[rows.layer == 0]
    real = sum(loaded.pipe.tokenizer(PROMPT, max_length=32, padding="max_length", truncation=True).attention_mask)
    assert {m for mods in cross.topk_modality for m in mods} == {"t5"}
    assert all(len(idx) == min(8, real) for idx in cross[cross.branch == "cond"].topk_idx)
    assert all(list(idx) == [0] for idx in cross[cross.branch == "uncond"].topk_idx)  # "" = EOS only
    assert {m for mods in rows[rows.layer == 2].topk_modality for m in mods} == {"image"}
    arms = [
        ArmSpec(name="base"),
        ArmSpec(name="m1", intervention={"preset": "fixed.m1", "layers": [0]}),
        ArmSpec(name="union", intervention={"preset": "paper.m2", "layers": [1], "mass_queries": "all"}),
        ArmSpec(name="self", intervention={"selection": "topk", "k": 1, "layers": ["transformer_blocks.*.attn1"], "query_scope": "all",
                                           "score_op": "prob_scale", "eta": 0.2}),
        ArmSpec(name="static", intervention={"selection": "static", "indices": [1], "layers": [0], "query_scope": "all",
                                             "score_op": "bias", "bias": -2.0, "value_op": "mean", "cfg_branch": "cond"}),
    ]
    sweep = Sweep.model_construct(name="v", model=ModelSpec.model_construct(preset="tiny-pixart"), prompts=PromptSpec(set="geneval", limit=1),
                                  seeds=Sweep.model_fields["seeds"].default, generation=gen.model_copy(update={"arms_per_batch": 3}),
                                  arms=arms, recording=RecordingSpec(layers=[0]))
    results = verify_sweep(loaded, sweep, PROMPTS, max_prompts=1)
    assert all(r["passed"] for r in results), [r for r in results if not r["passed"]]


def test_flux_and_pixart_load_from_a_local_folder(tiny_flux_loaded, tiny_pixart_loaded, tmp_path):
    gen = GenerationSpec(steps=1, guidance=3.5, max_sequence_length=16)
    for preset, tiny in (("tiny-flux", tiny_flux_loaded), ("tiny-pixart", tiny_pixart_loaded)):
        folder = tmp_path / preset
        build_tiny_pipeline(preset).save_pretrained(folder)
        loaded = load_pipeline(ModelSpec(path=str(folder)), device="cpu")
        assert loaded.family == tiny.family and not loaded.random_weights
        if preset == "tiny-flux":
            loaded.pipe.default_sample_size = 8  # FluxPipeline hard-codes 128 (1024 px); the tiny preset is 64 px
            loaded.geometry = tiny.geometry
        ours = generate_group(loaded, PROMPT, 6, [ArmSpec(name="b")], gen, RecordingSpec())[0]
        want = generate_group(tiny, PROMPT, 6, [ArmSpec(name="b")], gen, RecordingSpec())[0]
        assert np.array_equal(np.asarray(ours.image), np.asarray(want.image)), preset
    with pytest.raises(Exception, match="load_t5=false is only possible for SD3"):
        load_pipeline(ModelSpec(path=str(tmp_path / "tiny-pixart"), load_t5=False), device="cpu")
