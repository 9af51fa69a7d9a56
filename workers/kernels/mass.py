"""Reference (PyTorch) sink statistics, attention with log-sum-exp, and exact key removal.

Everything here runs on any device and never materialises the full queries x keys matrix:
queries are processed in chunks whose fp32 temporaries stay under ``max_chunk_bytes``.
The Triton kernels in ``triton_mass`` compute the same quantities on CUDA; this module is
their reference and the CPU path.

Shapes: q [B,H,Lq,D], k/v [B,H,Lk,D]; lse [B,H,Lq] is the natural-log log-sum-exp of
``q @ k^T * scale`` over all Lk keys (what flash attention returns).
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch
import torch.nn.functional as F

__all__ = [
    "KeyMassStats",
    "key_mass_stats",
    "key_mass_stats_torch",
    "attention_with_lse",
    "remove_keys",
    "removed_mass",
    "kernel_choice",
]

TOP_N = 5  # the paper's "top-5 outgoing concentration"


class KeyMassStats(NamedTuple):
    """Per-(b,h) sink statistics over the chosen queries (all fp32).

    mass [B,H,Lk]: mean over chosen queries of softmax(q k^T scale) per key (incoming mass).
    entropy [B,H] or None: mean over chosen queries of -sum_j p_ij ln p_ij (nats).
    top5 [B,H] or None: mean over chosen queries of the sum of the 5 largest p_ij.
    """

    mass: torch.Tensor
    entropy: torch.Tensor | None
    top5: torch.Tensor | None


# --------------------------------------------------------------------------------------
# validation helpers


def _check_qk(q: torch.Tensor, k: torch.Tensor, query_start: int, query_end: int) -> int:
    if q.dim() != 4 or k.dim() != 4:
        raise ValueError(f"q and k must be [B,H,L,D]; got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.shape[:2] != k.shape[:2] or q.shape[-1] != k.shape[-1]:
        raise ValueError(f"q {tuple(q.shape)} and k {tuple(k.shape)} disagree on B, H or D")
    if q.device != k.device:
        raise ValueError("q and k must be on the same device")
    if not (0 <= query_start < query_end <= q.shape[2]):
        raise ValueError(f"need 0 <= query_start < query_end <= Lq={q.shape[2]}; got [{query_start}, {query_end})")
    if k.shape[2] < 1:
        raise ValueError("need at least one key")
    return query_end - query_start


def _compute_dtype(t: torch.Tensor) -> torch.dtype:
    return torch.float64 if t.dtype == torch.float64 else torch.float32


def _rows_per_chunk(bh: int, lk: int, itemsize: int, max_chunk_bytes: int) -> int:
    return max(1, int(max_chunk_bytes) // max(1, bh * lk * itemsize))


# --------------------------------------------------------------------------------------
# statistics


def key_mass_stats_torch(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_start: int,
    query_end: int,
    *,
    want_entropy: bool = True,
    want_top5: bool = True,
    max_chunk_bytes: int = 64 << 20,
) -> KeyMassStats:
    """Chunked fp32 (fp64 for fp64 inputs) reference; exact softmax per chunk, so it needs no lse.

    Memory: a few fp32 temporaries of at most ``max_chunk_bytes`` each, never [Lq, Lk] at once.
    """
    nq = _check_qk(q, k, query_start, query_end)
    B, H, _, _ = q.shape
    Lk = k.shape[2]
    cdt = _compute_dtype(q)
    kf = k.to(cdt)
    itemsize = torch.tensor([], dtype=cdt).element_size()
    rows = _rows_per_chunk(B * H, Lk, itemsize, max_chunk_bytes)
    ntop = min(TOP_N, Lk)

    col = torch.zeros(B, H, Lk, dtype=cdt, device=q.device)
    ent = torch.zeros(B, H, dtype=cdt, device=q.device) if want_entropy else None
    top = torch.zeros(B, H, dtype=cdt, device=q.device) if want_top5 else None
    for a in range(query_start, query_end, rows):
        b_ = min(a + rows, query_end)
        logits = torch.matmul(q[:, :, a:b_].to(cdt), kf.transpose(-1, -2))
        logits.mul_(scale)
        # log_softmax subtracts the row max first, so ln p of a dominant key stays accurate
        logp = torch.log_softmax(logits, dim=-1)
        del logits
        p = logp.exp()
        col += p.sum(dim=2)
        if want_top5:
            top += p.topk(ntop, dim=-1, sorted=False).values.sum(dim=-1).sum(dim=-1)
        if want_entropy:
            # p ln p with p == 0 gives 0 * -inf; those terms contribute nothing
            ent -= torch.where(p > 0, p * logp, torch.zeros((), dtype=cdt, device=q.device)).sum(dim=-1).sum(dim=-1)
        del p, logp
    inv = 1.0 / nq
    return KeyMassStats(
        mass=(col * inv).float(),
        entropy=(ent * inv).float() if want_entropy else None,
        top5=(top * inv).float() if want_top5 else None,
    )


def kernel_choice(q: torch.Tensor) -> str:
    """'triton' or 'torch' for this input; env SINKSCOPE_KERNEL=torch|triton forces one."""
    forced = os.environ.get("SINKSCOPE_KERNEL", "").strip().lower()
    if forced not in ("", "auto", "torch", "triton"):
        raise ValueError(f"SINKSCOPE_KERNEL must be torch, triton or auto; got {forced!r}")
    if forced == "torch":
        return "torch"
    from . import triton_mass

    ok, why = triton_mass.supported(q)
    if forced == "triton":
        if not ok:
            raise RuntimeError(f"SINKSCOPE_KERNEL=triton but the Triton kernel cannot run here: {why}")
        return "triton"
    return "triton" if ok else "torch"


def key_mass_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_start: int,
    query_end: int,
    *,
    want_entropy: bool = True,
    want_top5: bool = True,
    max_chunk_bytes: int = 64 << 20,
    lse: torch.Tensor | None = None,
    top5_query_stride: int = 1,
) -> KeyMassStats:
    """Incoming mass per key, and entropy / top-5 concentration, over queries [query_start, query_end).

    Dispatches to the fused Triton kernel on CUDA (no tokens^2 tensor) and to the chunked
    PyTorch path elsewhere (``SINKSCOPE_KERNEL`` forces one). ``lse`` [B,H,Lq] (natural log, from
    ``attention_with_lse`` on the same q, k) lets the Triton path skip its own log-sum-exp pass;
    the PyTorch path ignores it and normalises each row exactly. ``max_chunk_bytes`` bounds the
    PyTorch path's temporaries. ``top5_query_stride`` n > 1 computes the top-5 concentration over
    queries query_start, query_start + n, ... only (exactly, for that subsample): top-5 is an order
    statistic per query and costs 2-3x the mass + entropy pass, which a subsample divides by n.
    """
    if top5_query_stride < 1:
        raise ValueError(f"top5_query_stride must be >= 1, got {top5_query_stride}")
    subsample = want_top5 and top5_query_stride > 1
    backend = kernel_choice(q)
    if backend == "triton":
        from . import triton_mass

        stats = triton_mass.key_mass_stats_triton(
            q, k, scale, query_start, query_end, want_entropy=want_entropy, want_top5=want_top5 and not subsample, lse=lse
        )
    else:
        stats = key_mass_stats_torch(
            q, k, scale, query_start, query_end,
            want_entropy=want_entropy, want_top5=want_top5 and not subsample, max_chunk_bytes=max_chunk_bytes,
        )
    if subsample:
        top5 = _top5_on_subsample(backend, q, k, scale, query_start, query_end, top5_query_stride, lse, max_chunk_bytes)
        stats = stats._replace(top5=top5)
    return stats


def _top5_on_subsample(backend, q, k, scale, query_start, query_end, stride, lse, max_chunk_bytes) -> torch.Tensor:
    """[B,H] top-5 concentration over every ``stride``-th query of the range (strided views, no copies)."""
    q_sub = q[:, :, query_start:query_end:stride]
    n_sub = q_sub.shape[2]
    if backend == "triton":
        from . import triton_mass

        lse_sub = None if lse is None else lse[:, :, query_start:query_end:stride]
        return triton_mass.top5_concentration(q_sub, k, scale, 0, n_sub, lse_sub)
    return key_mass_stats_torch(q_sub, k, scale, 0, n_sub, want_entropy=False, want_top5=True, max_chunk_bytes=max_chunk_bytes).top5


# --------------------------------------------------------------------------------------
# attention with log-sum-exp

_LSE_BACKENDS = ("cudnn", "flash", "efficient", "math")


def _lse_3d(lse: torch.Tensor, lq: int) -> torch.Tensor:
    # cuDNN returns [B,H,Lq,1]; memory-efficient attention pads Lq to a multiple of 32
    if lse.dim() == 4:
        lse = lse[..., 0]
    return lse[..., :lq]


def _attention_with_lse_math(q, k, v, scale, max_chunk_bytes: int = 64 << 20):
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    cdt = _compute_dtype(q)
    kf, vf = k.to(cdt), v.to(cdt)
    itemsize = torch.tensor([], dtype=cdt).element_size()
    rows = _rows_per_chunk(B * H, Lk, itemsize, max_chunk_bytes)
    out = torch.empty(B, H, Lq, v.shape[-1], dtype=q.dtype, device=q.device)
    lse = torch.empty(B, H, Lq, dtype=torch.float32, device=q.device)
    for a in range(0, Lq, rows):
        b_ = min(a + rows, Lq)
        logits = torch.matmul(q[:, :, a:b_].to(cdt), kf.transpose(-1, -2)).mul_(scale)
        l_ = torch.logsumexp(logits, dim=-1)
        p = torch.exp(logits - l_[..., None])
        del logits
        out[:, :, a:b_] = torch.matmul(p, vf).to(q.dtype)
        lse[:, :, a:b_] = l_.float()
    return out, lse


def attention_with_lse(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, *, backend: str | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(q k^T scale) v and its natural-log log-sum-exp [B,H,Lq] (fp32), in one attention.

    On CUDA the lse comes from a fused attention op, so sink statistics cost no extra row pass.
    ``backend`` (or env SINKSCOPE_LSE_BACKEND): cudnn | flash | efficient | math; by default the
    first that accepts the input, in the order measured cheapest (benchmarks/RESULTS.md).
    Elsewhere (CPU) a chunked exact computation in fp32.
    """
    if q.dim() != 4 or k.shape != v.shape[:-1] + (k.shape[-1],) or q.shape[:2] != k.shape[:2]:
        raise ValueError(f"bad shapes q {tuple(q.shape)} k {tuple(k.shape)} v {tuple(v.shape)}")
    Lq = q.shape[2]
    backend = backend or os.environ.get("SINKSCOPE_LSE_BACKEND") or None
    if backend is not None and backend not in _LSE_BACKENDS:
        raise ValueError(f"backend must be one of {_LSE_BACKENDS}; got {backend!r}")
    if not q.is_cuda or backend == "math":
        return _attention_with_lse_math(q, k, v, scale)
    half = q.dtype in (torch.float16, torch.bfloat16)
    if backend in ("cudnn", "flash") and not half:
        # the private cuDNN op does not refuse fp32: it returned NaN/garbage on an H200 (torch 2.11)
        raise ValueError(f"backend {backend!r} needs fp16/bf16 inputs; got {q.dtype}")
    aligned = q.shape[-1] % 8 == 0 and v.shape[-1] % 8 == 0
    if backend in ("cudnn", "flash") and not aligned:
        # nor does it refuse a head size that is not a multiple of 8: it crashed the process (segfault) on an
        # H200 with head size 12 (torch 2.11), so such shapes never reach it
        raise ValueError(f"backend {backend!r} needs head sizes that are multiples of 8; got q {q.shape[-1]}, v {v.shape[-1]}")
    order = [backend] if backend else list(_DEFAULT_CUDA_ORDER if half and aligned else ("efficient",))
    errors = []
    for name in order:
        try:
            if name == "cudnn":
                res = torch.ops.aten._scaled_dot_product_cudnn_attention(q, k, v, None, True, 0.0, False, False, scale=scale)
            elif name == "flash":
                res = torch.ops.aten._scaled_dot_product_flash_attention(q, k, v, 0.0, False, False, scale=scale)
            elif name == "efficient":
                res = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, None, True, 0.0, False, scale=scale)
            else:
                return _attention_with_lse_math(q, k, v, scale)
            return res[0], _lse_3d(res[1], Lq)
        except RuntimeError as exc:  # backend refuses this dtype/shape/card: try the next
            errors.append(f"{name}: {exc}".splitlines()[0])
            if backend:
                raise
    return _attention_with_lse_math(q, k, v, scale)


# cheapest first, measured (benchmarks/RESULTS.md): cuDNN attention returns the lse at no extra
# cost over plain SDPA; flash costs ~1.5x; memory-efficient ~3.2x (but is the only fp32 one)
_DEFAULT_CUDA_ORDER = ("cudnn", "flash", "efficient")


# --------------------------------------------------------------------------------------
# exact removal of selected keys


def _check_idx(selected_idx: torch.Tensor, B: int, H: int, Lk: int) -> None:
    if selected_idx.dim() != 3 or tuple(selected_idx.shape[:2]) != (B, H) or selected_idx.shape[2] < 1:
        raise ValueError(f"selected_idx must be [B={B},H={H},k>=1]; got {tuple(selected_idx.shape)}")
    if selected_idx.dtype not in (torch.int64, torch.int32, torch.int16):
        raise ValueError("selected_idx must be an integer tensor")


def _keep_index(selected_idx: torch.Tensor, Lk: int, check: bool = True) -> torch.Tensor:
    """[B,H,Lk-k] indices of the keys that stay; needs k distinct in-range indices per (b,h)."""
    B, H, kk = selected_idx.shape
    idx = selected_idx.long()
    if kk >= Lk:
        raise ValueError(f"cannot remove {kk} of {Lk} keys")
    if check:
        bad = (idx < 0) | (idx >= Lk)
        srt = idx.sort(dim=-1).values
        dup = (srt[..., 1:] == srt[..., :-1]) if kk > 1 else torch.zeros(1, dtype=torch.bool, device=idx.device)
        if bool(bad.any() | dup.any()):  # one host sync
            raise ValueError("selected_idx needs distinct indices in [0, Lk) per (b,h)")
    keep = torch.ones(B, H, Lk, dtype=torch.bool, device=idx.device)
    keep.scatter_(-1, idx, False)
    # stable sort of the boolean keeps key order: True (kept) first
    order = torch.argsort(keep.to(torch.int8), dim=-1, descending=True, stable=True)
    return order[..., : Lk - kk]


def _gather_rows(x: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    return torch.gather(x, 2, idx[..., None].expand(*idx.shape, x.shape[-1]))


def _attend(q, k, v, scale):
    if q.is_cuda:
        return F.scaled_dot_product_attention(q, k, v, scale=scale)
    return _attention_with_lse_math(q, k, v, scale)[0]


def remove_keys(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    out: torch.Tensor,
    lse: torch.Tensor,
    selected_idx: torch.Tensor,
    query_start: int,
    query_end: int,
    scale: float,
    *,
    method: str = "auto",
    guard: float | None = None,
    check: bool = True,
) -> torch.Tensor:
    """Attention output with the selected keys removed (exactly) for queries [query_start, query_end).

    ``out``/``lse`` are the unmodified attention output and natural-log lse (``attention_with_lse``);
    ``selected_idx`` [B,H,k] holds distinct key indices per (b,h). Rows outside the scope are
    returned unchanged. A new tensor is returned; ``out`` is not modified.

    method="auto": closed form out' = (out - sum_sel p v) / (1 - sum_sel p), p = exp(q.k scale - lse),
    costing O(Lq k D). ``out`` is stored rounded, and the division amplifies that rounding error by
    about cond = |out| / ((1 - sum_sel p) |out'|) per row; rows with cond > ``guard`` (or a non-finite
    result, e.g. sum_sel p >= 1) are recomputed exactly by attention over the remaining keys. ``guard``
    defaults to 2 for 16-bit ``out`` (closed-form rows stay within ~2 roundings of bf16) and 20 for
    fp32/fp64. (A plain sum_sel p >= 0.99 test let 2e-4 errors through in fp32 and ~1e-2 in bf16 on an
    H200.) method="closed_form": no guard. method="recompute": attention over the remaining keys for
    the whole scope.
    ``check=False`` skips the distinct/in-range test of ``selected_idx`` (a host sync); pass it only
    for indices distinct by construction (topk). On CUDA with Triton, "auto" is then sync-free (the
    guarded rows go through a fused masked attention); elsewhere it syncs once to size the recompute.
    """
    if method not in ("auto", "closed_form", "recompute"):
        raise ValueError(f"method must be auto, closed_form or recompute; got {method!r}")
    B, H, Lq, D = q.shape
    Lk = k.shape[2]
    if not (0 <= query_start < query_end <= Lq):
        raise ValueError(f"need 0 <= query_start < query_end <= Lq={Lq}")
    if out.shape[:3] != (B, H, Lq) or lse.shape != (B, H, Lq):
        raise ValueError(f"out {tuple(out.shape)} / lse {tuple(lse.shape)} do not match q {tuple(q.shape)}")
    _check_idx(selected_idx, B, H, Lk)
    if check:
        _keep_index(selected_idx, Lk, check=True)  # validates before anything is written
    a, b_ = query_start, query_end
    result = out.clone()

    def exact(qrows: torch.Tensor) -> torch.Tensor:
        keep = _keep_index(selected_idx, Lk, check=False)
        kc, vc = _gather_rows(k, keep), _gather_rows(v, keep)
        return _attend(qrows, kc, vc, scale)

    if method == "recompute":
        result[:, :, a:b_] = exact(q[:, :, a:b_]).to(out.dtype)
        return result

    if guard is None:
        guard = 20.0 if out.dtype in (torch.float32, torch.float64) else 2.0
    scope = result[:, :, a:b_]  # a view: the closed form and the guard write into result
    _, cond = _closed_form(q, k, v, out, lse, selected_idx.long(), a, b_, scale, scope)
    if method == "auto":
        bad = ~(cond <= guard)  # NaN counts as bad
        cnt = bad.sum(dim=-1)  # [B,H]
        # each (b,h)'s guarded rows first, in row order
        order = torch.argsort(bad.to(torch.int8), dim=-1, descending=True, stable=True)
        if q.is_cuda and kernel_choice(q) == "triton":
            from . import triton_mass

            # fused masked attention over the packed rows; no host sync
            triton_mass.guard_recompute(q, k, v, selected_idx, order, cnt, a, scale, scope)
            return result
        nmax = int(cnt.max())  # host sync: size of the packed recompute
        if nmax > 0:
            # recompute the packed rows against the remaining keys
            order = order[..., :nmax]
            valid = torch.arange(nmax, device=q.device)[None, None, :] < cnt[..., None]
            fixed = exact(_gather_rows(q[:, :, a:b_], order)).to(out.dtype)
            cur = _gather_rows(scope, order)
            scope.scatter_(2, order[..., None].expand(-1, -1, -1, D), torch.where(valid[..., None], fixed, cur))
    return result


def _closed_form(q, k, v, out, lse, idx, a, b_, scale, dest) -> tuple[torch.Tensor, torch.Tensor]:
    """Write (out - sum_sel p v) / (1 - sum_sel p) for rows [a, b_) into ``dest``; return
    (sum_sel p, cond = |out| / |out - sum_sel p v|), both [B,H,n] fp32.

    Fused Triton kernel on CUDA (reads q, out once); fp32/fp64 torch elsewhere.
    """
    ksel, vsel = _gather_rows(k, idx), _gather_rows(v, idx)  # [B,H,k,D]
    if q.is_cuda and kernel_choice(q) == "triton":
        from . import triton_mass

        return triton_mass.removal_closed_form(q, ksel, vsel, out, lse, a, b_, scale, dest)
    cdt = _compute_dtype(q)
    logits = torch.matmul(q[:, :, a:b_].to(cdt), ksel.to(cdt).transpose(-1, -2)) * scale  # [B,H,n,k]
    p = torch.exp(logits - lse[:, :, a:b_, None].to(cdt))
    psel = p.sum(dim=-1)
    denom = (1.0 - psel).clamp_min(torch.finfo(cdt).tiny)
    o = out[:, :, a:b_].to(cdt)
    d = o - torch.matmul(p, vsel.to(cdt))
    # relative error amplification of out's rounding; infinite once p_sel >= 1
    cond = torch.where(psel < 1, o.norm(dim=-1) / d.norm(dim=-1), torch.full_like(psel, float("inf")))
    dest.copy_((d / denom[..., None]).to(dest.dtype))
    return psel.float(), cond.float()


def removed_mass(
    q: torch.Tensor, k: torch.Tensor, lse: torch.Tensor, selected_idx: torch.Tensor, query_start: int, query_end: int, scale: float
) -> torch.Tensor:
    """[B,H,n] total probability the scoped queries gave the selected keys (before removal)."""
    cdt = _compute_dtype(q)
    ksel = _gather_rows(k, selected_idx.long()).to(cdt)
    logits = torch.matmul(q[:, :, query_start:query_end].to(cdt), ksel.transpose(-1, -2)) * scale
    return torch.exp(logits - lse[:, :, query_start:query_end, None].to(cdt)).sum(-1).float()

