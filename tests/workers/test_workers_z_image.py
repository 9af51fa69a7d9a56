"""Z-Image (single-stream [image | caption] blocks, caption pad tokens, refiners, CFG batch [cond, uncond]).

`orchestrate verify` of manifests/examples/z_image_tiny.yaml (tests/manifests/test_examples.py) checks its arms.
"""

import numpy as np
import pytest
import torch

from attention_reference import reference_attention, reference_mass, reference_selection, scope_rows
from manifests import ArmSpec, GenerationSpec, RecordingSpec
from manifests.interventions import Intervention, PromptEdit
from manifests.keys import ImageGrid, key_region
from workers import generate_group
from workers.generate import encode_prompt, initial_latents
from workers.session import ElementPlan, RunContext
from workers.tiny import build_tiny_pipeline

# long enough that the cond caption (template + prompt) pads to 64 while the uncond "" pads to 32: a masked batch
PROMPT = "a photo of a cat and a dog sitting on a red sofa next to a blue lamp in a bright living room with two green plants"
GEN = GenerationSpec(steps=2, guidance=3.0, height=64, width=64, max_sequence_length=64)
NAME = "layers.1.attention"


def _context(ivs, branches):
    ctx = RunContext([ElementPlan("a", b, iv, 7) for b, iv in zip(branches, ivs)], RecordingSpec(layers=[1], topk=4), num_clip_tokens=0)
    ctx.step, ctx.timestep, ctx.sigma = 0, 1000.0, 1.0
    ctx.active_steps = [None] * len(ivs)
    return ctx


def _qkv_fp64(attn, hidden, freqs):
    def rope(x):
        x = torch.view_as_complex(x.float().reshape(*x.shape[:-1], -1, 2))
        return torch.view_as_real(x * freqs.unsqueeze(2)).flatten(3)

    def heads(x):
        return x.unflatten(-1, (attn.heads, -1))

    q, k, v = rope(attn.norm_q(heads(attn.to_q(hidden)))), rope(attn.norm_k(heads(attn.to_k(hidden)))), heads(attn.to_v(hidden))
    return q.transpose(1, 2).double(), k.transpose(1, 2).double(), v.transpose(1, 2).double()


def test_z_image_processor_noop_is_bit_exact_and_matches_fp64_with_a_batch_mask(tiny_z_image_loaded):
    loaded = tiny_z_image_loaded
    attn = loaded.denoiser.get_submodule(NAME)
    g = torch.Generator().manual_seed(0)
    captions = [32, 64]  # padded caption lengths: element 0's sequence (64 image + 32) is padded to 128 and masked
    hidden = torch.randn(2, 128, 32, generator=g)
    freqs = torch.polar(torch.ones(2, 128, 4), torch.rand(2, 128, 4, generator=g) * 6.28)
    mask = torch.tensor([[j < 64 + n for j in range(128)] for n in captions])
    attn.processor.shape.image, attn.processor.shape.captions = 64, captions
    stock_proc = loaded.stock_processors[f"{NAME}.processor"]

    def run(ctx):
        with torch.no_grad():
            stock = stock_proc(attn, hidden, None, mask, freqs)
            loaded.session.context = ctx
            try:
                return stock, attn.processor(attn, hidden, None, mask, freqs)
            finally:
                loaded.session.context = None

    stock, ours = run(_context([None, None], ("cond", "uncond")))
    assert torch.equal(ours, stock)  # recorded, not intervened: the stock bits
    iv = Intervention(selection="topk", k=2, layers=[1], score_op="remove", query_scope="all", mass_queries="all")
    ctx = _context([iv, iv], ("cond", "uncond"))
    stock, ours = run(ctx)
    with torch.no_grad():
        q, k, v = _qkv_fp64(attn, hidden, freqs)
    records = {r.element: r for r in ctx.records}
    for b, n in enumerate(captions):
        keep = list(range(64 + n))
        qb, kb, vb = q[b : b + 1, :, keep], k[b : b + 1, :, keep], v[b : b + 1, :, keep]
        mass = reference_mass(qb, kb, scope_rows("all", 64, 64 + n))[0]
        selected = records[b].selected.tolist()
        assert sorted(map(sorted, selected)) == sorted(map(sorted, reference_selection(iv, mass, 4)))
        assert all(j < 64 + n for row in records[b].topk_idx.tolist() for j in row)  # batch padding never recorded
        ref = reference_attention(qb, kb, vb, 64, [iv], [selected]).transpose(1, 2).flatten(2, 3).float()[0]
        with torch.no_grad():
            torch.testing.assert_close(ours[b, : 64 + n], attn.to_out[0](ref), atol=2e-5, rtol=1e-4)
        assert torch.equal(ours[b, 64 + n :], stock[b, 64 + n :])  # padded rows: stock


def test_z_image_run_is_stock_records_cond_first_batch_and_interventions_change_output(tiny_z_image_loaded):
    loaded = tiny_z_image_loaded
    assert loaded.family == "z_image" and [(i.name, i.layer_id) for i in loaded.layers] == [
        ("noise_refiner.0.attention", 2), ("context_refiner.0.attention", 3), ("layers.0.attention", 0), ("layers.1.attention", 1)]
    stock = build_tiny_pipeline("tiny-z-image")
    latents = initial_latents(loaded, 5, 64, 64)
    assert latents.dtype == torch.float32 and latents.shape == (1, 16, 16, 16)
    expected = stock(PROMPT, guidance_scale=3.0, latents=latents.clone(), num_inference_steps=2, height=64, width=64,
                     max_sequence_length=64).images[0]
    rec = RecordingSpec(layers=[0, 1, "noise_refiner.*"], topk=2, branches=["cond", "uncond"], stats=["mass", "ratio"])
    arms = [ArmSpec(name="base"), ArmSpec(name="cut", intervention={"selection": "topk", "k": 4, "layers": [0, 1],
                                                                     "query_scope": "all", "score_op": "remove"})]
    base, cut = generate_group(loaded, PROMPT, 5, arms, GEN.model_copy(update={"arms_per_batch": 2}), rec)
    assert np.array_equal(np.asarray(base.image), np.asarray(expected))  # no-op: the stock pipeline's image, bit for bit
    assert np.abs(np.asarray(base.image, dtype=int) - np.asarray(cut.image, dtype=int)).max() > 0
    encoded = encode_prompt(loaded, PROMPT, GEN)
    texts = {"cond": encoded.text_cond, "uncond": encoded.text_uncond}
    assert (len(texts["cond"]), len(texts["uncond"])) == (64, 32)  # captions padded to 32s by the transformer
    assert texts["uncond"][8].kind == "padding" and texts["uncond"][8].token is None
    rows = base.sink_rows.to_pandas()
    assert sorted(rows.groupby("branch").size().items()) == [("cond", 2 * 3 * 4), ("uncond", 2 * 3 * 4)]
    grid = ImageGrid(8, 8)
    main = rows[rows.layer.isin([0, 1])]
    for row in base.sink_rows.to_pylist():  # each branch's keys are its own caption's (the cond-first batch is mapped right)
        if row["layer"] in (0, 1):
            region = key_region(row["sink_idx"], 64, grid, texts[row["branch"]])
            assert (row["sink_region"], row["sink_token"], row["sink_row"]) == (region.label, region.token, region.row)
    assert all(j < 64 + 32 for idx in main[main.branch == "uncond"].topk_idx for j in idx)
    assert {m for mods in rows[rows.layer == 2].topk_modality for m in mods} == {"image"}  # the noise refiner


def test_z_image_prompt_edits_truncate_or_are_refused(tiny_z_image_loaded):
    loaded = tiny_z_image_loaded
    stock, cut = encode_prompt(loaded, PROMPT, GEN), encode_prompt(loaded, PROMPT, GEN, PromptEdit(max_length=6))
    assert [k.token for k in cut.text_cond if k.kind != "padding"] == [k.token for k in stock.text_cond][:6]
    assert len(cut.text_cond) == 32 and cut.embeds["prompt_embeds"][0].shape[0] == 6
    arm = ArmSpec(name="drop", intervention={"preset": "prompt.drop_padding"})
    with pytest.raises(ValueError, match="arm 'drop'.*without padding slots.*tiny-z-image"):
        generate_group(loaded, PROMPT, 5, [ArmSpec(name="b"), arm], GEN, RecordingSpec())
    with pytest.raises(ValueError, match="64×48 gives 48 image patches on Z-Image, not a multiple of 32"):
        encode_prompt(loaded, PROMPT, GEN.model_copy(update={"width": 48}))


def test_z_image_refuses_image_mass_on_the_caption_refiner_before_any_work(tiny_z_image_loaded):
    refiner = ArmSpec(name="cap", intervention={"selection": "topk", "k": 1, "layers": ["context_refiner.*"], "query_scope": "all"})
    with pytest.raises(ValueError, match="arm 'cap'.*context_refiner.0.attention.*text queries only"):
        generate_group(tiny_z_image_loaded, PROMPT, 5, [refiner], GEN, RecordingSpec())
    with pytest.raises(ValueError, match="recording.layers reach context_refiner.0.attention.*mass_queries"):
        generate_group(tiny_z_image_loaded, PROMPT, 5, [ArmSpec(name="b")], GEN, RecordingSpec(layers=["*"]))
    ok = refiner.model_copy(update={"intervention": refiner.intervention.model_copy(update={"mass_queries": "all"})})
    generate_group(tiny_z_image_loaded, PROMPT, 5, [ok], GEN.model_copy(update={"steps": 1}), RecordingSpec(layers=["*"], mass_queries="all"))
