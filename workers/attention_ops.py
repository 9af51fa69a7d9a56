"""The intervened attention for a set of query rows: score ops on the selected keys' logits, value ops on
their value rows. Pure tensor functions, so each op can be checked against an explicit fp32 softmax.

Shapes: q [b,H,Lq,D] (only the in-scope query rows), k / v [b,H,K,D], selected [b,H,n] int64 key indices
(per head). The softmax scale is SDPA's default 1/sqrt(D), the scale of diffusers' joint processor.

Every score op (remove, bias, prob_scale = paper M3's p_sel ← η·p_sel with the rest × (1 − η·P)/(1 − P),
and none for value-only ops) is computed from one fused attention over the kept keys plus the selected keys'
own logits (see `intervened_attention`): exact when the selected keys hold ≥ 99.99 % of a row.
"""

from __future__ import annotations

import torch

from workers.kernels import attention_with_lse  # fused attention that also returns the log-sum-exp


def selection_mask(selected: torch.Tensor, num_keys: int) -> torch.Tensor:
    """[b,H,n] indices → [b,H,K] boolean mask."""
    mask = torch.zeros(*selected.shape[:-1], num_keys, dtype=torch.bool, device=selected.device)
    return mask.scatter_(-1, selected, True)


def apply_value_op(
    v: torch.Tensor, selected: torch.Tensor, op: str, *, sigma: float = 0.1, alpha: float = 0.5, noise_seeds: list[int] | None = None
) -> torch.Tensor:
    """A copy of v with the selected keys' value rows replaced (zero / mean / noise / lerp), per (b, h).

    noise: N(0, σ²) replacement drawn from a CPU generator per batch element (`noise_seeds`), so it is
    device-independent. mean: the mean over all keys of the original v (paper M3).
    """
    if op == "none":
        return v
    b, heads, _, dim = v.shape
    index = selected.unsqueeze(-1).expand(-1, -1, -1, dim)
    if op == "zero":
        replacement = torch.zeros(index.shape, dtype=v.dtype, device=v.device)
    elif op in ("mean", "lerp"):
        mean = v.float().mean(dim=2, keepdim=True).expand(-1, -1, selected.shape[-1], -1)
        if op == "mean":
            replacement = mean.to(v.dtype)
        else:
            original = torch.gather(v, 2, index).float()
            replacement = (alpha * original + (1.0 - alpha) * mean).to(v.dtype)
    elif op == "noise":
        if noise_seeds is None or len(noise_seeds) != b:
            raise ValueError("value_op=noise needs one noise seed per batch element")
        draws = [
            torch.randn(heads, selected.shape[-1], dim, generator=torch.Generator("cpu").manual_seed(seed)) for seed in noise_seeds
        ]
        replacement = (torch.stack(draws) * sigma).to(v.dtype)
        # pinned staging: a non-blocking copy, no host sync on CUDA
        replacement = replacement.pin_memory().to(v.device, non_blocking=True) if v.is_cuda else replacement.to(v.device)
    else:
        raise ValueError(f"unknown value_op {op!r}")
    return v.scatter(2, index, replacement)


def _gather_keys(x: torch.Tensor, index: torch.Tensor) -> torch.Tensor:
    """x [b,H,K,D], index [b,H,n] → [b,H,n,D]."""
    return torch.gather(x, 2, index.unsqueeze(-1).expand(-1, -1, -1, x.shape[-1]))


def intervened_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    score_op: str,
    *,
    bias: float | None = None,
    eta: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """(output [b,H,Lq,D] in q's dtype, mass left on the selected keys [b,H] fp32, averaged over the rows).

    One fused attention over the kept keys gives attn_rest and its log-sum-exp lse_rest; the n selected
    keys' logits s_j are computed directly. Every score op is then an exact mix
        out = w_rest · attn_rest + Σ_j w_j · v_j
    none: softmax weights; bias: s_j + bias; remove: w_rest = 1, w_j = 0; prob_scale: w_j = η·p_j and
    w_rest = (1 − P) + (1 − η)·P. No full queries × keys matrix, no division by 1 − P, and the mass left
    on the selected keys is Σ_j w_j (exactly 0.0 for remove).
    """
    num_keys = k.shape[2]
    if selected.shape[-1] >= num_keys:
        raise ValueError(f"cannot act on {selected.shape[-1]} of {num_keys} keys: at least one key must stay")
    scale = q.shape[-1] ** -0.5
    # kept keys in ascending order, via a stable sort (no host sync, unlike nonzero); needs distinct indices
    mask = selection_mask(selected, num_keys).to(torch.int8)
    keep = torch.sort(mask, dim=-1, stable=True).indices[..., : num_keys - selected.shape[-1]]
    attn_rest, lse_rest = attention_with_lse(q, _gather_keys(k, keep), _gather_keys(v, keep), scale)
    if score_op == "remove":
        return attn_rest.to(q.dtype), torch.zeros(q.shape[:2], dtype=torch.float32, device=q.device)
    logits = torch.matmul(q.float(), _gather_keys(k, selected).float().transpose(-1, -2)) * scale  # [b,H,Lq,n]
    lse_rest = lse_rest.float().unsqueeze(-1)
    if score_op in ("none", "bias"):
        if score_op == "bias":
            logits = logits + float(bias)
        lse = torch.logaddexp(lse_rest, torch.logsumexp(logits, dim=-1, keepdim=True))
        w_sel = torch.exp(logits - lse)
        w_rest = torch.exp(lse_rest - lse)
    elif score_op == "prob_scale":
        lse_sel = torch.logsumexp(logits, dim=-1, keepdim=True)
        lse = torch.logaddexp(lse_rest, lse_sel)
        w_sel = float(eta) * torch.exp(logits - lse)
        w_rest = torch.exp(lse_rest - lse) + (1.0 - float(eta)) * torch.exp(lse_sel - lse)
    else:
        raise ValueError(f"unknown score_op {score_op!r}")
    out = w_rest * attn_rest.float() + torch.matmul(w_sel, _gather_keys(v, selected).float())
    return out.to(q.dtype), w_sel.sum(dim=-1).mean(dim=-1)
