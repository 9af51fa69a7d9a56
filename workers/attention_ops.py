"""The intervened attention for a set of query rows: score ops on the selected keys' logits, value ops on
their value rows. Pure tensor functions, so each op can be checked against an explicit fp32 softmax.

Shapes: q [b,H,Lq,D] (only the in-scope query rows), k / v [b,H,K,D], selected [b,H,n] int64 key indices
(per head). The softmax scale is SDPA's default 1/sqrt(D), the scale of diffusers' joint processor.

- remove / bias: one SDPA call with an additive [b,H,1,K] mask (−inf or `bias` on the selected keys).
- prob_scale (paper M3: p_sel ← η·p_sel, the rest × (1 − η·P)/(1 − P)): computed as
  η·Σ_sel p_j v_j + (1 − η·P)·attn_rest, where attn_rest is attention with the selected keys removed
  (SDPA). P and 1 − P come from separate log-sum-exps over selected / other keys, so the result stays
  exact when the selected keys hold ≥ 99.99 % of a row (no division by 1 − P).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


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
        replacement = (torch.stack(draws) * sigma).to(device=v.device, dtype=v.dtype)
    else:
        raise ValueError(f"unknown value_op {op!r}")
    return v.scatter(2, index, replacement)


def split_logsumexp(
    q: torch.Tensor, k: torch.Tensor, selected_mask: torch.Tensor, *, max_chunk_bytes: int = 64 << 20
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per query row, fp32 log-sum-exp of the scaled logits over the selected keys and over the others.

    Returns (lse_selected, lse_rest), each [b,H,Lq]. Query chunks keep fp32 temporaries under max_chunk_bytes.
    """
    b, heads, num_q, dim = q.shape
    num_keys = k.shape[2]
    scale = dim**-0.5
    kf = k.float().transpose(-1, -2)
    keep = selected_mask[:, :, None, :]
    rows = max(1, max_chunk_bytes // (3 * b * heads * num_keys * 4))
    lse_sel, lse_rest = [], []
    for start in range(0, num_q, rows):
        logits = torch.matmul(q[:, :, start : start + rows].float(), kf) * scale
        lse_sel.append(torch.logsumexp(logits.masked_fill(~keep, float("-inf")), dim=-1))
        lse_rest.append(torch.logsumexp(logits.masked_fill(keep, float("-inf")), dim=-1))
    return torch.cat(lse_sel, dim=2), torch.cat(lse_rest, dim=2)


def attention_with_score_op(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    selected: torch.Tensor,
    score_op: str,
    *,
    bias: float | None = None,
    eta: float | None = None,
    max_chunk_bytes: int = 64 << 20,
) -> torch.Tensor:
    """Attention output [b,H,Lq,D] (dtype of q) with `score_op` applied to the selected keys of every row."""
    if score_op == "none":
        return F.scaled_dot_product_attention(q, k, v, dropout_p=0.0, is_causal=False)
    num_keys = k.shape[2]
    sel_mask = selection_mask(selected, num_keys)
    if score_op in ("remove", "bias"):
        fill = float("-inf") if score_op == "remove" else float(bias)
        additive = torch.zeros(sel_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(sel_mask, fill)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=additive[:, :, None, :], dropout_p=0.0, is_causal=False)
    if score_op != "prob_scale":
        raise ValueError(f"unknown score_op {score_op!r}")
    eta = float(eta)
    removed = torch.zeros(sel_mask.shape, dtype=q.dtype, device=q.device).masked_fill_(sel_mask, float("-inf"))
    attn_rest = F.scaled_dot_product_attention(q, k, v, attn_mask=removed[:, :, None, :], dropout_p=0.0, is_causal=False)
    lse_sel, lse_rest = split_logsumexp(q, k, sel_mask, max_chunk_bytes=max_chunk_bytes)
    lse = torch.logaddexp(lse_sel, lse_rest)
    p_total = torch.exp(lse_sel - lse)  # P: mass on the selected keys
    rest_total = torch.exp(lse_rest - lse)  # 1 − P, without cancellation
    index = selected.unsqueeze(-1).expand(-1, -1, -1, k.shape[-1])
    k_sel = torch.gather(k, 2, index).float()
    v_sel = torch.gather(v, 2, index).float()
    p_sel = torch.exp(torch.matmul(q.float(), k_sel.transpose(-1, -2)) * q.shape[-1] ** -0.5 - lse.unsqueeze(-1))
    out = eta * torch.matmul(p_sel, v_sel) + (rest_total + (1.0 - eta) * p_total).unsqueeze(-1) * attn_rest.float()
    return out.to(q.dtype)


def selected_mass_after(
    q: torch.Tensor,
    k: torch.Tensor,
    selected: torch.Tensor,
    score_op: str,
    *,
    bias: float | None = None,
    eta: float | None = None,
    max_chunk_bytes: int = 64 << 20,
) -> torch.Tensor:
    """[b,H] fp32: attention mass on the selected keys after the score op, summed over those keys and
    averaged over the query rows of q. Exactly 0.0 for `remove` (exp(−inf) = 0; no ε anywhere)."""
    sel_mask = selection_mask(selected, k.shape[2])
    lse_sel, lse_rest = split_logsumexp(q, k, sel_mask, max_chunk_bytes=max_chunk_bytes)
    if score_op in ("remove", "bias"):
        shifted = lse_sel + (float("-inf") if score_op == "remove" else float(bias))
        after = torch.exp(shifted - torch.logaddexp(shifted, lse_rest))
    else:
        after = torch.exp(lse_sel - torch.logaddexp(lse_sel, lse_rest))
        if score_op == "prob_scale":
            after = float(eta) * after
        elif score_op != "none":
            raise ValueError(f"unknown score_op {score_op!r}")
    return after.mean(dim=-1)
