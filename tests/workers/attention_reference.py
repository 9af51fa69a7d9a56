"""Explicit float64 reference for intervened joint attention: full softmax matrices, written for clarity."""

from __future__ import annotations

import torch


def scope_rows(scope: str, num_image: int, num_keys: int) -> range:
    return {"image": range(0, num_image), "text": range(num_image, num_keys), "all": range(0, num_keys)}[scope]


def reference_mass(q, k, rows) -> torch.Tensor:
    """[B,H,K] mean over `rows` of the full float64 softmax."""
    s = (q.double() @ k.double().transpose(-1, -2)) * q.shape[-1] ** -0.5
    return torch.softmax(s, dim=-1)[:, :, list(rows)].mean(dim=2)


def reference_selection(iv, mass_bh: torch.Tensor, heads: int) -> list[list[int]]:
    """Per head, the reference's own choice of keys for the mass-based selections."""
    if iv.selection == "topk":
        return [torch.argsort(mass_bh[h], descending=True, stable=True)[: iv.k].tolist() for h in range(heads)]
    if iv.selection == "bottomk":
        return [torch.argsort(mass_bh[h], stable=True)[: iv.k].tolist() for h in range(heads)]
    if iv.selection in ("union_topk", "union_bottomk"):
        mean = mass_bh.mean(dim=0)
        order = torch.argsort(mean, descending=iv.selection == "union_topk", stable=True)
        return [order[: iv.k * heads].tolist()] * heads
    raise ValueError(iv.selection)


def reference_attention(q, k, v, num_image, interventions, selections, noise=None) -> torch.Tensor:
    """out [B,H,L,D] float64; interventions[b] None or an Intervention; selections[b][h] = list of key indices."""
    B, H, L, D = q.shape
    K = k.shape[2]
    q, k, v = q.double(), k.double(), v.double()
    s = (q @ k.transpose(-1, -2)) * D**-0.5
    out = torch.softmax(s, dim=-1) @ v
    for b, iv in enumerate(interventions):
        if iv is None:
            continue
        rows = list(scope_rows(iv.query_scope, num_image, K))
        for h in range(H):
            sel = selections[b][h]
            vm = v[b, h].clone()
            if iv.value_op == "zero":
                vm[sel] = 0
            elif iv.value_op == "mean":
                vm[sel] = v[b, h].mean(dim=0)
            elif iv.value_op == "lerp":
                vm[sel] = iv.alpha * v[b, h][sel] + (1 - iv.alpha) * v[b, h].mean(dim=0)
            elif iv.value_op == "noise":
                vm[sel] = noise[b][h].double()
            logits = s[b, h][rows].clone()
            if iv.score_op == "remove":
                logits[:, sel] = float("-inf")
                p = torch.softmax(logits, dim=-1)
            elif iv.score_op == "bias":
                logits[:, sel] += iv.bias
                p = torch.softmax(logits, dim=-1)
            elif iv.score_op == "prob_scale":
                p0 = torch.softmax(logits, dim=-1)
                P = p0[:, sel].sum(dim=-1, keepdim=True)
                p = p0 * (1 - iv.eta * P) / (1 - P)
                p[:, sel] = iv.eta * p0[:, sel]
            else:
                p = torch.softmax(logits, dim=-1)
            out[b, h, rows] = p @ vm
    return out


def run_processor(loaded, module_name, ctx, *args):
    """(module, stock processor's output, ours under `ctx`) of one attention module called with `args`."""
    attn = loaded.denoiser.get_submodule(module_name)
    stock = loaded.stock_processors[f"{module_name}.processor"](attn, *args)
    loaded.session.context = ctx
    try:
        ours = attn.processor(attn, *args)
    finally:
        loaded.session.context = None
    return attn, stock, ours
