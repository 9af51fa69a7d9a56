"""End to end on the tiny SD3: bit-exact no-op, pairing, determinism, recorder numbers, step bookkeeping."""

import numpy as np
import pyarrow as pa
import pytest
import torch

from manifests import ArmSpec, GenerationSpec, ModelSpec, RecordingSpec
from workers import SINK_STEP_SCHEMA, generate_group
from workers.generate import initial_latents
from workers.tiny import build_tiny_pipeline

PROMPT = "a photo of a red apple on a wooden table"
GEN = GenerationSpec(steps=3, guidance=5.0)
REC = RecordingSpec(layers=[0, 1], topk=4)


def test_noop_is_bit_identical_to_stock_diffusers_while_recording(tiny_loaded):
    stock = build_tiny_pipeline("tiny-sd3")  # stock JointAttnProcessor2_0 everywhere
    latents = initial_latents(tiny_loaded, 42, 64, 64)
    expected = stock(PROMPT, latents=latents.clone(), num_inference_steps=3, guidance_scale=5.0, output_type="pil").images[0]
    expected_latent = stock(PROMPT, latents=latents.clone(), num_inference_steps=3, guidance_scale=5.0, output_type="latent").images
    results = generate_group(tiny_loaded, PROMPT, 42, [ArmSpec(name="base")], GEN, REC)
    assert np.array_equal(np.asarray(results[0].image), np.asarray(expected))
    assert results[0].sink_rows.num_rows > 0  # recording was on
    # at float level too (uint8 images could hide small differences): run with an active recording context
    from workers.session import ElementPlan, RunContext

    ctx = RunContext([ElementPlan("base", "uncond", None, 42), ElementPlan("base", "cond", None, 42)], REC)
    tiny_loaded.session.context = ctx
    try:
        ours = tiny_loaded.pipe(PROMPT, latents=latents.clone(), num_inference_steps=3, guidance_scale=5.0, output_type="latent").images
    finally:
        tiny_loaded.session.context = None
    assert len(ctx.records) == 3 * 2 * 2
    assert torch.equal(ours, expected_latent)


def test_intervention_changes_the_image_and_removes_all_mass(tiny_loaded):
    arms = [
        ArmSpec(name="base"),
        ArmSpec(name="m1", intervention={"preset": "fixed.m1", "layers": [1]}),
        ArmSpec(name="m2", intervention={"preset": "paper.m2", "layers": [0]}),
    ]
    base, m1, m2 = generate_group(tiny_loaded, PROMPT, 7, arms, GEN, REC)
    assert not np.array_equal(np.asarray(base.image), np.asarray(m1.image))
    rows = m1.sink_rows.to_pandas()
    hit = rows[rows.intervened]
    assert set(hit.layer) == {1} and len(hit) == 3 * 2 * 4  # steps × branches × heads
    assert (hit.removed_mass_after == 0.0).all()
    # top-1 recorded mass (image queries) is the key that was removed
    assert all(sel[0] == idx[0] for sel, idx in zip(hit.selected_idx, hit.topk_idx))
    union = m2.sink_rows.to_pandas()
    union = union[union.intervened]
    assert all(len(s) == 4 for s in union.selected_idx)  # k·H = 1·4 keys, same in every head
    for (_, _), group in union.groupby(["step", "branch"]):
        assert len({tuple(s) for s in group.selected_idx}) == 1
    assert (union.removed_mass_after < 1e-20).all()  # -65000 bias: exp underflows to 0 in fp32


def test_pairing_and_determinism(tiny_loaded, monkeypatch):
    seen = []
    original = tiny_loaded.pipe.__class__.__call__

    def spy(self, *args, **kwargs):
        seen.append(kwargs["latents"].clone())
        return original(self, *args, **kwargs)

    monkeypatch.setattr(tiny_loaded.pipe.__class__, "__call__", spy)
    arms = [ArmSpec(name="a"), ArmSpec(name="b", intervention={"preset": "fixed.random", "layers": [0, 1]})]
    first = generate_group(tiny_loaded, PROMPT, 3, arms, GEN, REC)
    assert len(seen) == 2 and torch.equal(seen[0], seen[1])
    expected = torch.randn((1, 16, 8, 8), generator=torch.Generator("cpu").manual_seed(3), dtype=torch.float32)
    assert torch.equal(seen[0], expected)
    second = generate_group(tiny_loaded, PROMPT, 3, arms, GEN, REC)
    for x, y in zip(first, second):
        assert np.array_equal(np.asarray(x.image), np.asarray(y.image))
        assert x.sink_rows.equals(y.sink_rows)
    other_seed = generate_group(tiny_loaded, PROMPT, 4, arms[:1], GEN, REC)
    assert not np.array_equal(np.asarray(other_seed[0].image), np.asarray(first[0].image))


def _naive_layer_stats(attn, hidden, context, num_image):
    """Full float64 softmax from the module's own projections (no chunking, no shared code)."""
    b, heads = hidden.shape[0], attn.heads

    def split(x):
        return x.double().view(b, -1, heads, x.shape[-1] // heads).transpose(1, 2)

    q = torch.cat([split(attn.to_q(hidden)), split(attn.add_q_proj(context))], 2)
    k = torch.cat([split(attn.to_k(hidden)), split(attn.add_k_proj(context))], 2)
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)[:, :, :num_image]
    mass = p.mean(dim=2)
    entropy = -(p * torch.log(p)).sum(-1).mean(-1)
    top5 = p.topk(5, dim=-1).values.sum(-1).mean(-1)
    return mass, entropy, top5


def test_recorder_matches_naive_full_softmax(tiny_loaded):
    captured = []
    attn = tiny_loaded.pipe.transformer.transformer_blocks[1].attn
    handle = attn.register_forward_pre_hook(
        lambda m, args, kwargs: captured.append((kwargs["hidden_states"].clone(), kwargs["encoder_hidden_states"].clone())), with_kwargs=True
    )
    try:
        result = generate_group(tiny_loaded, PROMPT, 11, [ArmSpec(name="base")], GEN, RecordingSpec(layers=[1], topk=6))[0]
    finally:
        handle.remove()
    table = result.sink_rows
    assert table.schema.equals(SINK_STEP_SCHEMA)
    assert table.num_rows == 3 * 4 * 2
    rows = table.to_pandas()
    sched = tiny_loaded.pipe.scheduler
    assert len(captured) == 3, (len(captured), sorted(set(rows.step)), sorted(set(rows.branch)))
    for step, (hidden, context) in enumerate(captured):
        with torch.no_grad():
            mass, entropy, top5 = _naive_layer_stats(attn, hidden, context, hidden.shape[1])
        np.testing.assert_allclose(rows[rows.step == step].timestep, float(sched.timesteps[step]), rtol=1e-6)
        np.testing.assert_allclose(rows[rows.step == step].sigma, float(sched.sigmas[step]), rtol=1e-6)
        for b, branch in enumerate(["uncond", "cond"]):
            for head in range(4):
                row = rows[(rows.step == step) & (rows.branch == branch) & (rows["head"] == head)].iloc[0]
                # exact ties (identical zero-T5 keys) may be broken by GEMM rounding: check values, not order among equals
                idx = list(row.topk_idx)
                np.testing.assert_allclose(row.topk_mass, mass[b, head, idx].numpy(), rtol=1e-4, atol=1e-8)
                sixth = float(mass[b, head].sort(descending=True).values[5])
                assert float(mass[b, head, idx].min()) >= sixth * (1 - 1e-4) and len(set(idx)) == 6
                assert list(row.topk_mass) == sorted(row.topk_mass, reverse=True)
                assert row.max_mass == pytest.approx(float(mass[b, head].max()), rel=1e-4)
                assert row.entropy == pytest.approx(float(entropy[b, head]), rel=1e-5)
                assert row.top5_conc == pytest.approx(float(top5[b, head]), rel=1e-4)
                expect_modality = ["image" if j < 16 else "clip" if j < 16 + 77 else "t5_pad" for j in row.topk_idx]
                assert list(row.topk_modality) == expect_modality
                assert not row.intervened and row.selected_idx is None and np.isnan(row.removed_mass_after)


def test_only_requested_stats_are_computed(tiny_loaded):
    rec = RecordingSpec(layers=[0], stats=["entropy"], branches=["cond"])
    table = generate_group(tiny_loaded, PROMPT, 1, [ArmSpec(name="base")], GenerationSpec(steps=2, guidance=5.0), rec)[0].sink_rows
    assert table.num_rows == 2 * 4 and set(table.column("branch").to_pylist()) == {"cond"}
    assert table.column("topk_idx").null_count == table.num_rows and table.column("top5_conc").null_count == table.num_rows
    assert table.column("entropy").null_count == 0
    none = generate_group(tiny_loaded, PROMPT, 1, [ArmSpec(name="base")], GenerationSpec(steps=2, guidance=5.0), RecordingSpec())[0]
    assert none.sink_rows.num_rows == 0 and none.sink_rows.schema.equals(SINK_STEP_SCHEMA)


def test_layer_checks_and_fault_injection(tiny_loaded, monkeypatch):
    with pytest.raises(ValueError, match="layer 5 is outside"):
        generate_group(tiny_loaded, PROMPT, 1, [ArmSpec(name="x", intervention={"preset": "fixed.m1", "layers": [5]})], GEN, RecordingSpec())
    with pytest.raises(ValueError, match="matches no attention module"):
        generate_group(tiny_loaded, PROMPT, 1, [ArmSpec(name="x", intervention={"preset": "paper.m4_cross"})], GEN, RecordingSpec())
    monkeypatch.setenv("SINKSCOPE_FAULT_INJECT", "kill_after_groups:3,raise_on_prompt:apple")
    with pytest.raises(RuntimeError, match="injected failure"):
        generate_group(tiny_loaded, PROMPT, 1, [ArmSpec(name="base")], GEN, RecordingSpec())
    monkeypatch.setenv("SINKSCOPE_FAULT_INJECT", "raise_on_prompt:zebra")
    assert len(generate_group(tiny_loaded, PROMPT, 1, [ArmSpec(name="base")], GenerationSpec(steps=1, guidance=5.0), RecordingSpec())) == 1


def test_load_pipeline_metadata_and_missing_model(tiny_loaded):
    from workers import load_pipeline
    from workers.loading import ModelNotAvailableError

    assert tiny_loaded.family == "sd3" and tiny_loaded.random_weights
    assert (tiny_loaded.geometry.num_layers, tiny_loaded.geometry.heads) == (2, 4)
    assert tiny_loaded.attention_layers == ["transformer_blocks.0.attn", "transformer_blocks.1.attn"]
    assert tiny_loaded.pipe.transformer.attn_processors["transformer_blocks.0.attn.processor"].__class__.__name__ == "SD3SinkAttnProcessor"
    with pytest.raises(ModelNotAvailableError, match="huggingface-cli download sinkscope-test/not-a-model"):
        load_pipeline(ModelSpec(hub_id="sinkscope-test/not-a-model"), device="cpu")


def test_without_cfg_only_the_cond_branch_exists(tiny_loaded):
    arm = ArmSpec(name="m1b", intervention={"preset": "paper.m1b", "layers": [0], "cfg_branch": "uncond"})
    both = ArmSpec(name="m1", intervention={"preset": "paper.m1b", "layers": [0]})
    gen = GenerationSpec(steps=2, guidance=1.0)
    uncond_only, on_cond = generate_group(tiny_loaded, PROMPT, 2, [arm, both], gen, RecordingSpec(layers=[0]))
    assert set(uncond_only.sink_rows.column("branch").to_pylist()) == {"cond"}
    assert not any(uncond_only.sink_rows.column("intervened").to_pylist())  # its only target branch is absent
    assert all(on_cond.sink_rows.column("intervened").to_pylist())


def test_local_folder_loads_through_from_pretrained(tiny_loaded, tmp_path):
    from workers import load_pipeline

    folder = tmp_path / "tiny-sd3-folder"
    build_tiny_pipeline("tiny-sd3").save_pretrained(folder)
    loaded = load_pipeline(ModelSpec(path=str(folder), load_t5=False), device="cpu")
    assert not loaded.random_weights and loaded.family == "sd3" and "no T5" in loaded.description
    arms = [ArmSpec(name="base")]
    ours = generate_group(loaded, PROMPT, 6, arms, GenerationSpec(steps=2, guidance=5.0), RecordingSpec())[0]
    tiny = generate_group(tiny_loaded, PROMPT, 6, arms, GenerationSpec(steps=2, guidance=5.0), RecordingSpec())[0]
    assert np.array_equal(np.asarray(ours.image), np.asarray(tiny.image))  # same weights, same pixels
    with pytest.raises(Exception, match="not a diffusers folder"):
        load_pipeline(ModelSpec(path=str(tmp_path)), device="cpu")
