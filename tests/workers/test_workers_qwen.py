"""Qwen-Image (double-stream joint attention [text | image], Qwen RoPE, true CFG in two denoiser calls per step).

`orchestrate verify` of manifests/examples/qwen_image_tiny.yaml (tests/manifests/test_examples.py) checks its arms.
"""

import numpy as np
import pytest
import torch

from attention_reference import reference_attention, reference_mass, reference_selection, run_processor, scope_rows
from manifests import ArmSpec, GenerationSpec, RecordingSpec, Sweep
from manifests.interventions import Intervention, PromptEdit
from manifests.keys import ImageGrid, key_region
from workers import generate_group
from workers.generate import encode_prompt, initial_latents
from workers.session import ElementPlan, RunContext
from workers.tiny import build_tiny_pipeline

PROMPT = "a photo of a cat and a dog"
GEN = GenerationSpec(steps=2, guidance=4.0, height=64, width=64)
NAME = "transformer_blocks.1.attn"


def _inputs(loaded, num_text=9, batch=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    tf = loaded.pipe.transformer
    image = torch.randn(batch, 16, tf.inner_dim, generator=g)
    text = torch.randn(batch, num_text, tf.inner_dim, generator=g)
    return image, text, tf.pos_embed([(1, 4, 4)], max_txt_seq_len=num_text, device=torch.device("cpu"))


def _qkv_fp64(attn, image, text, rotary):
    """q / k / v after QK-norm and RoPE, canonical order [image | text], [B, H, S, D] float64."""
    from diffusers.models.transformers.transformer_qwenimage import apply_rotary_emb_qwen

    def heads(x):
        return x.unflatten(-1, (-1, attn.inner_dim // attn.heads))

    img_f, txt_f = rotary
    q = torch.cat([apply_rotary_emb_qwen(attn.norm_q(heads(attn.to_q(image))), img_f, use_real=False),
                   apply_rotary_emb_qwen(attn.norm_added_q(heads(attn.add_q_proj(text))), txt_f, use_real=False)], 1)
    k = torch.cat([apply_rotary_emb_qwen(attn.norm_k(heads(attn.to_k(image))), img_f, use_real=False),
                   apply_rotary_emb_qwen(attn.norm_added_k(heads(attn.add_k_proj(text))), txt_f, use_real=False)], 1)
    v = torch.cat([heads(attn.to_v(image)), heads(attn.add_v_proj(text))], 1)
    return q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double()


def _context(ivs, branches):
    ctx = RunContext([ElementPlan("a", b, iv, 7) for b, iv in zip(branches, ivs)], RecordingSpec(layers=[1], topk=4), num_clip_tokens=0)
    ctx.step, ctx.timestep, ctx.sigma = 0, 1000.0, 1.0
    ctx.active_steps = [None] * len(ivs)
    return ctx


@pytest.mark.parametrize("masked", [False, True], ids=["unmasked", "text-mask"])
def test_qwen_image_processor_noop_is_bit_exact_and_matches_fp64(tiny_qwen_image_loaded, masked):
    loaded = tiny_qwen_image_loaded
    image, text, rotary = _inputs(loaded)
    valid = [9, 5, 2] if masked else [9, 9, 9]  # attended text tokens per element (a mask: prompts of different lengths)
    mask = torch.tensor([[j < n for j in range(9)] for n in valid]) if masked else None
    with torch.no_grad():  # recorded, not intervened: the stock bits
        _, stock, ours = run_processor(loaded, NAME, _context([None] * 3, ("cond",) * 3), image, text, mask, None, rotary)
    assert all(torch.equal(a, b) for a, b in zip(ours, stock))
    iv = Intervention(selection="topk", k=2, layers=[1], score_op="remove", query_scope="all", mass_queries="all")
    ctx = _context([iv] * 3, ("cond",) * 3)
    with torch.no_grad():
        attn, stock, ours = run_processor(loaded, NAME, ctx, image, text, mask, None, rotary)
        q, k, v = _qkv_fp64(attn, image, text, rotary)
    records = {r.element: r for r in ctx.records}
    for b, n in enumerate(valid):
        keep = list(range(16 + n))  # image keys, then the attended text keys; padded text queries are out of scope
        qb, kb, vb = q[b : b + 1, :, keep], k[b : b + 1, :, keep], v[b : b + 1, :, keep]
        mass = reference_mass(qb, kb, scope_rows("all", 16, 16 + n))[0]
        selected = records[b].selected.tolist()
        assert sorted(map(sorted, selected)) == sorted(map(sorted, reference_selection(iv, mass, 4)))
        assert all(j < 16 + n for row in records[b].topk_idx.tolist() for j in row)  # masked text keys never recorded
        ref = reference_attention(qb, kb, vb, 16, [iv], [selected])
        ref = ref.transpose(1, 2).flatten(2, 3).float()[0]  # [16 + n, H·D]: image rows, then the real text rows
        with torch.no_grad():
            torch.testing.assert_close(ours[0][b], attn.to_out[0](ref[:16]), atol=2e-5, rtol=1e-4)
            torch.testing.assert_close(ours[1][b, :n], attn.to_add_out(ref[16:]), atol=2e-5, rtol=1e-4)
        assert torch.equal(ours[1][b, n:], stock[1][b, n:])  # padded text rows: stock


def test_qwen_image_run_records_both_cfg_calls_and_interventions_change_output(tiny_qwen_image_loaded):
    loaded = tiny_qwen_image_loaded
    assert loaded.family == "qwen_image" and [(i.name, i.layer_id) for i in loaded.layers] == [
        ("transformer_blocks.0.attn", 0), ("transformer_blocks.1.attn", 1)]
    stock = build_tiny_pipeline("tiny-qwen-image")
    latents = initial_latents(loaded, 5, 64, 64)
    expected = stock(PROMPT, negative_prompt=" ", true_cfg_scale=4.0, latents=latents.clone(), num_inference_steps=2,
                     height=64, width=64).images[0]
    rec = RecordingSpec(layers=[0, 1], topk=2, branches=["cond", "uncond"], stats=["mass", "ratio"])
    arms = [ArmSpec(name="base"), ArmSpec(name="cut", intervention={"selection": "topk", "k": 4, "layers": [0, 1],
                                                                     "query_scope": "all", "score_op": "remove"})]
    base, cut = generate_group(loaded, PROMPT, 5, arms, GEN.model_copy(update={"arms_per_batch": 2}), rec)
    assert np.array_equal(np.asarray(base.image), np.asarray(expected))  # no-op: the stock pipeline's image, bit for bit
    assert np.abs(np.asarray(base.image, dtype=int) - np.asarray(cut.image, dtype=int)).max() > 0
    rows = base.sink_rows.to_pandas()
    assert sorted(rows.groupby("branch").size().items()) == [("cond", 2 * 2 * 4), ("uncond", 2 * 2 * 4)]  # steps × layers × heads
    encoded = encode_prompt(loaded, PROMPT, GEN)
    texts = {"cond": encoded.text_cond, "uncond": encoded.text_uncond}
    assert [k.token for k in encoded.text_cond][-5:] == ["<|im_end|>", "Ċ", "<|im_start|>", "assistant", "Ċ"]
    assert [k.kind for k in encoded.text_uncond] == ["content", "special", "content", "special", "content", "content"]  # " " turn
    grid = ImageGrid(4, 4)
    for row in rows.itertuples():  # every recorded sink's region is the key's place: patch grid or chat-turn token
        region = key_region(int(row.sink_idx), 16, grid, texts[row.branch])
        assert (row.sink_region, row.sink_segment if region.modality == "text" else None) == (region.label, region.segment)
        assert (row.sink_token if region.modality == "text" else None) == region.token
        assert row.sink_ratio >= 1.0


def test_qwen_image_prompt_edits_truncate_or_are_refused(tiny_qwen_image_loaded):
    loaded = tiny_qwen_image_loaded
    stock, cut = encode_prompt(loaded, PROMPT, GEN), encode_prompt(loaded, PROMPT, GEN, PromptEdit(max_length=5))
    assert cut.text_cond == stock.text_cond[:5] and cut.text_uncond == stock.text_uncond[:5]
    assert cut.embeds["prompt_embeds"].shape[1] == 5
    arm = ArmSpec(name="commas", intervention={"preset": "prompt.comma_padding"})
    with pytest.raises(ValueError, match="arm .commas.*without padding slots.*tiny-qwen-image"):
        generate_group(loaded, PROMPT, 5, [ArmSpec(name="b"), arm], GEN, RecordingSpec())
    with pytest.raises(ValueError, match=r"arms\[0\] \(commas\).intervention.prompt.*tiny-qwen-image"):
        Sweep(name="q", model={"preset": "tiny-qwen-image"}, prompts={"set": "geneval", "limit": 1}, arms=[arm.model_dump()])


def test_qwen_families_load_from_a_local_folder(tiny_qwen_image_loaded, tiny_z_image_loaded, tmp_path):
    """Real loading (model.path / hub id → the pipeline class → family, geometry from transformer/config.json)."""
    from manifests import ModelSpec
    from workers import load_pipeline

    for preset, tiny in (("tiny-qwen-image", tiny_qwen_image_loaded), ("tiny-z-image", tiny_z_image_loaded)):
        folder = tmp_path / preset
        pipe = build_tiny_pipeline(preset)
        pipe.save_pretrained(folder)
        spec = ModelSpec(path=str(folder))
        assert (spec.geometry().family, spec.geometry().num_layers) == (tiny.family, 2)
        loaded = load_pipeline(spec, device="cpu")
        assert loaded.family == tiny.family and not loaded.random_weights
        loaded.pipe.prompt_template_encode_start_idx = getattr(pipe, "prompt_template_encode_start_idx", None)
        gen = GEN.model_copy(update={"max_sequence_length": 64})  # 2 steps: Qwen-Image's shift_terminal gives NaN sigmas at 1
        ours = generate_group(loaded, PROMPT, 6, [ArmSpec(name="b")], gen, RecordingSpec())[0]
        want = generate_group(tiny, PROMPT, 6, [ArmSpec(name="b")], gen, RecordingSpec())[0]
        assert np.array_equal(np.asarray(ours.image), np.asarray(want.image)), preset
