"""Intervened attention (through the processors' per-call path) against an explicit float64 reference."""

import math

import pytest
import torch
import torch.nn.functional as F

from manifests.interventions import Intervention
from manifests.schema import RecordingSpec
from attention_reference import reference_attention, reference_mass, reference_selection, scope_rows
from workers.attention_ops import intervened_attention
from workers.identification import KeyLayout, select_keys
from workers.processors.common import apply_sinks
from workers.session import ElementPlan, LayerInfo, RunContext

B, H, NUM_IMAGE, NUM_CLIP, NUM_T5, D = 2, 3, 12, 5, 4, 8
K = NUM_IMAGE + NUM_CLIP + NUM_T5
LAYOUT = KeyLayout(NUM_IMAGE, NUM_CLIP, NUM_T5)


def _qkv(seed=0, dominant=False):
    g = torch.Generator().manual_seed(seed)
    q, k, v = (torch.randn(B, H, K, D, generator=g) for _ in range(3))
    if dominant:  # adversarial: key 3 (image) takes ≥ 99 % of every row, CLIP BOS most of the rest
        direction = torch.randn(D, generator=g)
        direction = direction / direction.norm()
        q = 0.3 * q + 2.0 * direction
        k[:, :, 3] = 17.0 * direction
        k[:, :, NUM_IMAGE] = 6.0 * direction
    return q, k, v


def _run(q, k, v, interventions, layer=1, record=True, step=0, seeds=(7, 7)):
    plans = [ElementPlan("arm", br, iv, seeds[i]) for i, (br, iv) in enumerate(zip(["uncond", "cond"], interventions))]
    rec = RecordingSpec(layers=[layer]) if record else None
    ctx = RunContext(elements=plans, recording=rec, num_clip_tokens=NUM_CLIP, max_chunk_bytes=2048)  # tiny chunks: exercise chunking
    ctx.step, ctx.timestep, ctx.sigma = step, 1000.0, 1.0
    ctx.active_steps = [None] * len(plans)
    stock = F.scaled_dot_product_attention(q, k, v)
    out = apply_sinks(ctx, LayerInfo(f"transformer_blocks.{layer}.attn", layer, layer), q, k, v, stock.clone(), LAYOUT)
    return stock, out, ctx.records


def _selected(records):
    return {r.element: r.selected.tolist() for r in records if r.selected is not None}


CASES = [
    dict(selection="topk", k=1, score_op="remove", query_scope="image"),
    dict(selection="topk", k=2, score_op="remove", query_scope="all"),
    dict(selection="topk", k=1, score_op="remove", query_scope="text"),
    dict(selection="topk", k=1, score_op="bias", bias=-1e4, query_scope="all"),
    dict(selection="topk", k=2, score_op="bias", bias=-2.5, query_scope="image", mass_queries="all"),
    dict(selection="union_topk", k=1, score_op="remove", query_scope="all"),
    dict(selection="union_topk", k=2, score_op="bias", bias=-65000.0, query_scope="image"),
    dict(selection="bottomk", k=2, score_op="remove", query_scope="image"),
    dict(selection="union_bottomk", k=1, score_op="remove", query_scope="all"),
    dict(selection="topk", k=1, score_op="prob_scale", eta=0.01, query_scope="all"),
    dict(selection="topk", k=2, score_op="prob_scale", eta=0.0, query_scope="image"),
    dict(selection="union_topk", k=1, score_op="prob_scale", eta=0.5, query_scope="text"),
    dict(selection="topk", k=1, score_op="remove", query_scope="image", eligible_keys="text"),
    dict(selection="topk", k=1, score_op="remove", query_scope="image", eligible_keys="image"),
]


@pytest.mark.parametrize("dominant", [False, True], ids=["random", "dominant-key"])
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_mass_based_interventions_match_fp64_reference(case, dominant):
    q, k, v = _qkv(seed=len(str(case)), dominant=dominant)
    iv = Intervention(layers=[1], **case)
    stock, out, records = _run(q, k, v, [iv, iv])
    mass = reference_mass(q, k, scope_rows(iv.mass_queries, NUM_IMAGE, K))
    eligible = LAYOUT.eligible(iv.eligible_keys)
    fill = float("-inf") if "top" in iv.selection else float("inf")
    selections = [reference_selection(iv, mass[b].masked_fill(~eligible, fill), H) for b in range(B)]
    got = _selected(records)
    for b in range(B):
        assert [sorted(x) for x in got[b]] == [sorted(x) for x in selections[b]]
    ref = reference_attention(q, k, v, NUM_IMAGE, [iv, iv], selections)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    # rows outside the query scope are the stock SDPA values, bit for bit
    outside = [r for r in range(K) if r not in scope_rows(iv.query_scope, NUM_IMAGE, K)]
    assert torch.equal(out[:, :, outside], stock[:, :, outside])


def test_dominant_key_really_dominates():
    q, k, v = _qkv(dominant=True)
    p = torch.softmax(q @ k.transpose(-1, -2) * D**-0.5, dim=-1)
    assert (p[..., 3] >= 0.99).float().mean() > 0.8


def test_removed_keys_get_exactly_zero_mass_and_bias_matches_reference():
    q, k, v = _qkv(dominant=True)
    sel = torch.tensor([3, NUM_IMAGE]).expand(B, H, 2).contiguous()
    removed = intervened_attention(q, k, v, sel, "remove")[1]
    assert torch.equal(removed, torch.zeros(B, H))
    s = (q.double() @ k.double().transpose(-1, -2)) * D**-0.5
    s[..., [3, NUM_IMAGE]] += -3.0
    expected = torch.softmax(s, dim=-1)[..., [3, NUM_IMAGE]].sum(-1).mean(-1)
    torch.testing.assert_close(intervened_attention(q, k, v, sel, "bias", bias=-3.0)[1].double(), expected, atol=1e-6, rtol=1e-5)
    p = torch.softmax((q.double() @ k.double().transpose(-1, -2)) * D**-0.5, dim=-1)
    before = p[..., [3, NUM_IMAGE]].sum(-1).mean(-1)
    torch.testing.assert_close(intervened_attention(q, k, v, sel, "prob_scale", eta=0.25)[1].double(), 0.25 * before, atol=1e-6, rtol=1e-5)
    # and the output of a removal has no contribution from the removed keys: same as dropping them
    out = intervened_attention(q, k, v, sel, "remove")[0]
    keep = [j for j in range(K) if j not in (3, NUM_IMAGE)]
    torch.testing.assert_close(out, F.scaled_dot_product_attention(q, k[:, :, keep], v[:, :, keep]), atol=1e-6, rtol=1e-5)


def test_prob_scale_eta_one_is_identity_and_eta_zero_is_removal():
    q, k, v = _qkv(dominant=True)
    sel = torch.tensor([3]).expand(B, H, 1).contiguous()
    torch.testing.assert_close(intervened_attention(q, k, v, sel, "prob_scale", eta=1.0)[0], F.scaled_dot_product_attention(q, k, v), atol=1e-5, rtol=1e-4)
    torch.testing.assert_close(intervened_attention(q, k, v, sel, "prob_scale", eta=0.0)[0], intervened_attention(q, k, v, sel, "remove")[0], atol=1e-6, rtol=1e-5)


def test_per_element_plans_branch_and_baseline_elements_untouched():
    q, k, v = _qkv(seed=3)
    cond_only = Intervention(selection="topk", k=1, layers=[1], query_scope="all", cfg_branch="cond")
    stock, out, records = _run(q, k, v, [cond_only, cond_only])
    assert torch.equal(out[0], stock[0])  # uncond element: branch not selected
    assert not torch.equal(out[1], stock[1])
    stock, out, _ = _run(q, k, v, [None, Intervention(selection="topk", k=1, layers=[1], query_scope="all")])
    assert torch.equal(out[0], stock[0])
    other_layer = Intervention(selection="topk", k=1, layers=[0], query_scope="all")
    stock, out, records = _run(q, k, v, [other_layer, other_layer])
    assert torch.equal(out, stock) and not _selected(records)


def test_random_selection_is_seeded_and_has_the_requested_count():
    iv = Intervention(selection="random", k=3, layers=[1], query_scope="all")
    q, k, v = _qkv(seed=5)
    a = _selected(_run(q, k, v, [iv, iv], seeds=(11, 11))[2])
    b = _selected(_run(q, k, v, [iv, iv], seeds=(11, 11))[2])
    c = _selected(_run(q, k, v, [iv, iv], seeds=(12, 12))[2])
    d = _selected(_run(q, k, v, [iv, iv], seeds=(11, 11), step=1)[2])
    assert a == b and a != c and a != d
    for picks in a.values():
        assert len(picks) == H and all(len(set(row)) == 3 for row in picks)
    assert a[0] != a[1]  # the two CFG branches draw independently
    heads_differ = any(a[0][h] != a[0][0] for h in range(H))
    assert heads_differ  # per (b, h) draws
    # seeds do not depend on the device or on q/k: select_keys alone reproduces them
    offset = Intervention(selection="random", k=3, layers=[1], random_seed_offset=1)
    assert select_keys(offset, LAYOUT, None, H, 5).tolist() != select_keys(iv, LAYOUT, None, H, 4).tolist()
    # the intervention itself matches the reference for those keys
    stock, out, records = _run(q, k, v, [iv, iv], seeds=(11, 11))
    ref = reference_attention(q, k, v, NUM_IMAGE, [iv, iv], [a[0], a[1]])
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


def test_static_selection_and_key_order():
    layout = LAYOUT
    m3 = Intervention(selection="static", indices=[0], key_order="text_image", layers=[1], score_op="prob_scale", eta=0.0)
    assert select_keys(m3, layout, None, H).tolist() == [[NUM_IMAGE]] * H  # text-first index 0 = CLIP BOS
    last_image = Intervention(selection="static", indices=[K - 1], key_order="text_image", layers=[1])
    assert select_keys(last_image, layout, None, H).tolist() == [[NUM_IMAGE - 1]] * H
    joint = Intervention(selection="static", indices=[0, 2], layers=[1])
    assert select_keys(joint, layout, None, H).tolist() == [[0, 2]] * H
    with pytest.raises(ValueError, match="same key twice"):
        select_keys(Intervention(selection="static", indices=[2, 2], key_order="text_image", layers=[1]), layout, None, H)
    with pytest.raises(ValueError, match="outside"):
        select_keys(Intervention(selection="static", indices=[K], layers=[1]), layout, None, H)
    q, k, v = _qkv(seed=9, dominant=True)
    stock, out, _ = _run(q, k, v, [m3, m3])
    ref = reference_attention(q, k, v, NUM_IMAGE, [m3, m3], [[[NUM_IMAGE]] * H] * B)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("largest", [True, False])
def test_rank_keys_orders_exactly_as_a_stable_sort(largest):
    """rank_keys packs values and indices into one top-k; it must equal the stable sort it replaces,
    ties (to the lower index), infinities and -0.0 included."""
    from workers.identification import rank_keys

    g = torch.Generator().manual_seed(7)
    for trial in range(60):
        n = int(torch.randint(1, 500, (1,), generator=g))
        x = torch.randint(-3, 4, (3, n), generator=g).float() * 0.37 if trial % 2 else torch.randn(3, n, generator=g)
        x[..., ::7] = float("inf")
        x[..., ::11] = float("-inf")
        x[..., ::13] = -0.0
        for dtype in (torch.float32, torch.bfloat16, torch.float64):
            v = x.to(dtype)
            k = int(torch.randint(1, n + 1, (1,), generator=g))
            ref = torch.sort(v, dim=-1, descending=largest, stable=True).indices[..., :k]
            assert torch.equal(rank_keys(v, k, largest), ref), (trial, dtype)
