"""The rest of the intervention family: random_union, modality_random, value ops, score+value, eligibility."""

import pytest
import torch

from attention_reference import reference_attention, reference_mass, reference_selection, scope_rows
from manifests.interventions import Intervention
from test_workers_interventions import B, H, K, LAYOUT, NUM_IMAGE, _qkv, _run, _selected
from workers.identification import select_keys, selection_seed


def test_random_union_draws_k_times_heads_keys_shared_by_all_heads():
    iv = Intervention(selection="random_union", k=2, layers=[1], query_scope="all", score_op="bias", bias=-65000.0)
    q, k, v = _qkv(seed=1)
    picks = _selected(_run(q, k, v, [iv, iv], seeds=(5, 5))[2])
    for b in range(B):
        assert all(row == picks[b][0] for row in picks[b]) and len(set(picks[b][0])) == 2 * H
    assert picks == _selected(_run(q, k, v, [iv, iv], seeds=(5, 5))[2])
    assert picks != _selected(_run(q, k, v, [iv, iv], seeds=(6, 6))[2])
    # draws from all keys (paper M2 random), so with many draws both modalities appear
    draws = torch.cat([select_keys(iv, LAYOUT, None, H, s)[0] for s in range(50)])
    assert (draws < NUM_IMAGE).any() and (draws >= NUM_IMAGE).any()
    stock, out, _ = _run(q, k, v, [iv, iv], seeds=(5, 5))
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, NUM_IMAGE, [iv, iv], [picks[0], picks[1]]), atol=1e-5, rtol=1e-5)


def test_modality_random_matches_the_topk_modality_mix_per_head():
    q, k, v = _qkv(seed=2, dominant=True)  # top-2 of each head = image key 3 + CLIP BOS: one image, one text
    iv = Intervention(selection="modality_random", k=2, layers=[1], query_scope="image")
    topk = Intervention(selection="topk", k=2, layers=[1], query_scope="image")
    mass = reference_mass(q, k, scope_rows("image", NUM_IMAGE, K))
    for b in range(B):
        top = select_keys(topk, LAYOUT, mass[b].float(), H)
        counts = [(int((row < NUM_IMAGE).sum()), int((row >= NUM_IMAGE).sum())) for row in top]
        seen = set()
        for seed in range(30):
            picks = select_keys(iv, LAYOUT, mass[b].float(), H, seed)
            for head in range(H):
                row = picks[head]
                assert (int((row < NUM_IMAGE).sum()), int((row >= NUM_IMAGE).sum())) == counts[head]
                assert len(set(row.tolist())) == 2
                seen.update(row.tolist())
        assert len(seen) > 6  # uniform within modality, not the top keys themselves
    picks = _selected(_run(q, k, v, [iv, iv])[2])
    stock, out, _ = _run(q, k, v, [iv, iv])
    torch.testing.assert_close(out.double(), reference_attention(q, k, v, NUM_IMAGE, [iv, iv], [picks[0], picks[1]]), atol=1e-5, rtol=1e-5)


VALUE_CASES = [
    dict(score_op="none", value_op="zero"),
    dict(score_op="none", value_op="mean"),
    dict(score_op="none", value_op="lerp", alpha=0.3),
    dict(score_op="none", value_op="noise", sigma=0.5),
    dict(score_op="prob_scale", eta=0.0, value_op="zero"),  # paper M3 "both"
    dict(score_op="prob_scale", eta=0.2, value_op="mean"),
    dict(score_op="remove", value_op="lerp", alpha=0.5),
    dict(score_op="bias", bias=-1.5, value_op="noise", sigma=0.1),
]


@pytest.mark.parametrize("dominant", [False, True], ids=["random", "dominant-key"])
@pytest.mark.parametrize("scope", ["all", "image", "text"])
@pytest.mark.parametrize("case", VALUE_CASES, ids=lambda c: "-".join(f"{v}" for v in c.values()))
def test_value_ops_match_fp64_reference(case, scope, dominant):
    q, k, v = _qkv(seed=4, dominant=dominant)
    iv = Intervention(selection="topk", k=2, layers=[1], query_scope=scope, mass_queries="all", **case)
    stock, out, records = _run(q, k, v, [iv, iv], seeds=(9, 9))
    picks = _selected(records)
    noise = None
    if iv.value_op == "noise":  # the documented draw: N(0, σ²) from a CPU generator per element and call
        noise = [
            iv.sigma * torch.randn(H, 2, q.shape[-1], generator=torch.Generator().manual_seed(selection_seed(9, 0, 0, "transformer_blocks.1.attn", br, "value_noise")))
            for br in ("uncond", "cond")
        ]
    mass = reference_mass(q, k, scope_rows("all", NUM_IMAGE, K))
    assert [sorted(map(sorted, picks[b])) for b in range(B)] == [sorted(map(sorted, reference_selection(iv, mass[b], H))) for b in range(B)]
    ref = reference_attention(q, k, v, NUM_IMAGE, [iv, iv], [picks[0], picks[1]], noise=noise)
    torch.testing.assert_close(out.double(), ref, atol=1e-5, rtol=1e-5)
    outside = [r for r in range(K) if r not in scope_rows(scope, NUM_IMAGE, K)]
    assert torch.equal(out[:, :, outside], stock[:, :, outside])
    if iv.score_op == "none":  # value ops leave the attention mass on the selected keys unchanged
        p = torch.softmax(q.double() @ k.double().transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        rows = list(scope_rows(scope, NUM_IMAGE, K))
        for rec in records:
            for head in range(H):
                before = p[rec.element, head][rows][:, rec.selected[head]].sum(-1).mean()
                assert float(rec.removed_mass_after[head]) == pytest.approx(float(before), rel=1e-5)


def test_eligible_keys_restrict_every_selection():
    q, k, v = _qkv(seed=6, dominant=True)
    mass = reference_mass(q, k, scope_rows("image", NUM_IMAGE, K))[0].float()
    for selection in ("topk", "bottomk", "random", "modality_random"):
        for eligible, ok in (("image", lambda j: j < NUM_IMAGE), ("text", lambda j: j >= NUM_IMAGE)):
            iv = Intervention(selection=selection, k=2, layers=[1], eligible_keys=eligible)
            picks = select_keys(iv, LAYOUT, mass, H, 3)
            assert all(ok(j) for j in picks.flatten().tolist()), (selection, eligible)
    for selection in ("union_topk", "union_bottomk", "random_union"):
        iv = Intervention(selection=selection, k=2, layers=[1], eligible_keys="text")
        assert all(j >= NUM_IMAGE for j in select_keys(iv, LAYOUT, mass, H, 3).flatten().tolist())
    with pytest.raises(ValueError, match="not among the eligible"):
        select_keys(Intervention(selection="static", indices=[0], layers=[1], eligible_keys="text"), LAYOUT, None, H)
    with pytest.raises(ValueError, match="exceeds"):
        select_keys(Intervention(selection="union_topk", k=4, layers=[1], eligible_keys="text"), LAYOUT, mass, H)
