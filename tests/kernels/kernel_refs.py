"""Explicit float64 references for the kernel tests (the paper's materialised softmax)."""

import torch


def ref_probs(q, k, scale, a, b):
    """Full [B,H,n,Lk] float64 softmax of the chosen queries: the paper's materialised matrix."""
    logits = torch.matmul(q[:, :, a:b].double(), k.double().transpose(-1, -2)) * scale
    return torch.softmax(logits, dim=-1)


def ref_stats(q, k, scale, a, b):
    p = ref_probs(q, k, scale, a, b)
    mass = p.mean(dim=2)
    plogp = torch.where(p > 0, p * torch.log(p), torch.zeros((), dtype=p.dtype, device=p.device))
    entropy = (-plogp.sum(-1)).mean(-1)
    top5 = p.topk(min(5, p.shape[-1]), dim=-1).values.sum(-1).mean(-1)
    return mass, entropy, top5


def ref_attention(q, k, v, scale, removed=None, a=0, b=None):
    """float64 attention output; keys in removed [B,H,k] get -inf logits for query rows [a, b)."""
    logits = torch.matmul(q.double(), k.double().transpose(-1, -2)) * scale
    lse = torch.logsumexp(logits, dim=-1)
    if removed is not None:
        b = q.shape[2] if b is None else b
        bias = torch.zeros_like(logits[:, :, :1, :])
        bias.scatter_(-1, removed.long()[:, :, None, :], float("-inf"))
        logits[:, :, a:b] = logits[:, :, a:b] + bias
    return torch.matmul(torch.softmax(logits, -1), v.double()), lse


def rel(x, ref):
    x, ref = x.double(), ref.double()
    assert torch.isfinite(x).all(), "non-finite values"
    return float((x - ref).norm() / ref.norm().clamp_min(1e-300))


def sink_inputs(B, H, Lq, Lk, D, sink=3, strength=12.0, frac_rows=0.5, dtype=torch.float32, device="cpu", seed=0):
    """Random q,k,v where key `sink` takes >=99% of the mass of about `frac_rows` of the queries."""
    g = torch.Generator(device="cpu").manual_seed(seed)
    q = torch.randn(B, H, Lq, D, generator=g)
    k = torch.randn(B, H, Lk, D, generator=g)
    v = torch.randn(B, H, Lk, D, generator=g)
    u = torch.randn(B, H, 1, D, generator=g)
    u = u / u.norm(dim=-1, keepdim=True)
    # half of the queries point along u; the sink key is a long vector along u
    rows = torch.rand(B, H, Lq, 1, generator=g) < frac_rows
    q = torch.where(rows, q * 0.2 + u * 4.0, q)
    k[:, :, sink] = u[:, :, 0] * strength * D**0.5 / 4.0
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype)

