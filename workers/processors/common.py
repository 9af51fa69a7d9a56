"""The per-call sink logic shared by the attention processors: identify, select, intervene, record.

`apply_sinks` takes the q / k / v that the stock attention used and the stock SDPA output, and returns
that output with the in-scope query rows of the intervened batch elements replaced. Rows and elements
that are not intervened keep the stock values bit for bit; identification never touches the output.
"""

from __future__ import annotations

import torch

from workers.attention_ops import apply_value_op, intervened_attention
from workers.identification import KeyLayout, key_mass_stats, rank_keys, select_keys, selection_seed
from workers.session import CallRecord, RunContext

_MASS_SELECTIONS = ("topk", "bottomk", "union_topk", "union_bottomk", "modality_random")


def apply_sinks(
    ctx: RunContext,
    layer_name: str,
    block_index: int | None,
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    attn_out: torch.Tensor,
    layout: KeyLayout,
) -> torch.Tensor:
    batch, heads = q.shape[:2]
    if batch != len(ctx.elements):
        raise RuntimeError(f"{layer_name}: batch of {batch} but the run plans {len(ctx.elements)} elements")
    active = {e: ctx.intervention_active(e, layer_name, block_index) for e in range(batch)}
    active = {e: iv for e, iv in active.items() if iv is not None}
    recorded = [e for e in range(batch) if ctx.records_layer(e, block_index)]
    if not active and not recorded:
        return attn_out
    scale = q.shape[-1] ** -0.5  # SDPA's default, which the stock joint processor uses

    # 1. identification: one key_mass_stats pass per distinct query range that someone needs
    rec = ctx.recording
    wants: dict[str, set[int]] = {}
    for e, iv in active.items():
        if iv.selection in _MASS_SELECTIONS:
            wants.setdefault(iv.mass_queries, set()).add(e)
    if recorded and rec.stats:
        wants.setdefault(rec.mass_queries, set()).update(recorded)
    stats = {}
    for scope, elements in wants.items():
        idx = sorted(elements)
        start, end = layout.query_range(scope)
        need_extra = rec is not None and scope == rec.mass_queries and any(e in recorded for e in idx)
        result = key_mass_stats(
            q[idx], k[idx], scale, start, end,
            want_entropy=need_extra and "entropy" in rec.stats,
            want_top5=need_extra and "top5" in rec.stats,
            max_chunk_bytes=ctx.max_chunk_bytes,
        )
        for pos, e in enumerate(idx):
            stats[(scope, e)] = (
                result.mass[pos],
                None if result.entropy is None else result.entropy[pos],
                None if result.top5 is None else result.top5[pos],
            )

    # 2. selection and intervention, grouped by identical op so each group is one batched call
    selected: dict[int, torch.Tensor] = {}
    for e, iv in active.items():
        plan = ctx.elements[e]
        mass = stats[(iv.mass_queries, e)][0] if iv.selection in _MASS_SELECTIONS else None
        seed = selection_seed(plan.unit_seed, iv.random_seed_offset, ctx.step, layer_name, plan.branch)
        selected[e] = select_keys(iv, layout, mass, heads, seed).to(q.device)
    groups: dict[tuple, list[int]] = {}
    for e, iv in list(active.items()):
        start, end = layout.query_range(iv.query_scope)
        if end <= start:  # e.g. text queries in a self-attention layer (SD3.5 .attn2): nothing to change
            del active[e]
            del selected[e]
            continue
        key = (iv.query_scope, iv.score_op, iv.bias, iv.eta, iv.value_op, iv.sigma, iv.alpha, selected[e].shape[-1])
        groups.setdefault(key, []).append(e)
    removed_after: dict[int, torch.Tensor] = {}
    for (scope, score_op, bias, eta, value_op, sigma, alpha, _), elements in groups.items():
        idx = torch.tensor(elements, device=q.device)
        start, end = layout.query_range(scope)
        sel = torch.stack([selected[e] for e in elements])
        noise_seeds = [
            selection_seed(ctx.elements[e].unit_seed, active[e].random_seed_offset, ctx.step, layer_name, ctx.elements[e].branch, "value_noise")
            for e in elements
        ]
        q_rows, k_g = q[idx, :, start:end], k[idx]
        v_g = apply_value_op(v[idx], sel, value_op, sigma=sigma, alpha=alpha, noise_seeds=noise_seeds)
        out, after = intervened_attention(q_rows, k_g, v_g, sel, score_op, bias=bias, eta=eta)
        attn_out[idx, :, start:end] = out
        for pos, e in enumerate(elements):
            removed_after[e] = after[pos]

    # 3. records (device tensors; converted to a table when the run ends)
    for e in recorded:
        plan = ctx.elements[e]
        mass, entropy, top5 = stats.get((rec.mass_queries, e), (None, None, None))
        topk_idx = topk_mass = max_mass = None
        if mass is not None and "mass" in rec.stats:
            topk_idx = rank_keys(mass, min(rec.topk, mass.shape[-1]))
            topk_mass = torch.gather(mass, -1, topk_idx)
            max_mass = topk_mass[:, 0]
        ctx.records.append(
            CallRecord(
                arm=plan.arm, branch=plan.branch, element=e, step=ctx.step, timestep=ctx.timestep, sigma=ctx.sigma,
                layer=block_index, heads=heads, num_image=layout.num_image, num_clip=layout.num_clip, t5_valid=plan.t5_valid,
                topk_idx=topk_idx, topk_mass=topk_mass, max_mass=max_mass, entropy=entropy, top5=top5,
                selected=selected.get(e), removed_mass_after=removed_after.get(e),
            )
        )
    return attn_out
