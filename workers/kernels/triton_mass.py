"""Fused Triton kernels for sink statistics and key removal; no tokens^2 tensor anywhere.

* ``_colmass_kernel`` (key-major): each program owns a block of keys and streams the chosen
  queries past it, accumulating p = exp2(q.k scale log2e - lse log2e) elementwise in registers.
  Column sums (incoming mass) and the entropy sum_ij p ln p need one reduction at the end instead
  of a cross-warp reduction per tile. For top-5 it also writes each query's largest logit per
  group of 16 keys. Row masks are compiled out when the queries fill the tiles, and padded keys are
  masked only in the last key block (fewer instructions per pair).
* ``_top5_refine_kernel``: per query, the 5 groups with the largest maxima hold its 5 largest
  logits; it recomputes those 80 logits exactly and sums the top 5 probabilities (default, exact).
* ``_row_kernel`` (query-major): the lse when the caller has none, and the older top-5 by
  extraction over every key tile (modes 0-4; ~0.3 ms slower at SD3 size).
* ``_removal_cf_kernel`` / ``_guard_attn_kernel``: closed-form key removal and the exact masked
  attention for the rows where the closed form is ill-conditioned (no host sync).

The usual call passes ``lse`` from ``attention_with_lse`` (cuDNN attention returns it at no extra
cost), so mass + entropy cost one QK^T pass (0.35-0.39 ms per SD3-medium layer on an H200) and top-5
about 0.74 ms more (benchmarks/RESULTS.md, with the cost model and the variants that lost).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass

import torch

from .mass import KeyMassStats, _check_qk

try:  # triton is optional: the package must import on CPU-only machines without it
    import triton
    import triton.language as tl

    _TRITON_ERR = None
except Exception as exc:  # pragma: no cover - depends on the environment
    triton = None
    tl = None
    _TRITON_ERR = f"{type(exc).__name__}: {exc}"

__all__ = ["MassConfig", "DEFAULT_CONFIG", "supported", "key_mass_stats_triton", "top5_concentration", "removal_closed_form"]

LOG2E = 1.0 / math.log(2.0)
LN2 = math.log(2.0)


@dataclass(frozen=True)
class MassConfig:
    """Tile shapes and launch parameters of the two kernels (see benchmarks/RESULTS.md)."""

    col_block_m: int = 64
    col_block_n: int = 64
    col_warps: int = 4
    col_stages: int = 3
    row_block_m: int = 64
    row_block_n: int = 128
    row_warps: int = 4
    row_stages: int = 2
    # 0-4: extraction in _row_kernel (3, 4: 16-bit inputs only; fp32 falls back to mode 0);
    # 5: group maxima from the column kernel + _top5_refine_kernel (mode 6, a certified variant, was dropped:
    #    benchmarks/RESULTS.md, "Exact top-5 and the statistics kernels", 2026-12-02)
    topk_mode: int = 5
    group: int = 16
    refine_block_m: int = 16
    refine_warps: int = 2


DEFAULT_CONFIG = MassConfig()


def _interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "") == "1"


def supported(q: torch.Tensor) -> tuple[bool, str]:
    """Whether the Triton path can take this q (and why not)."""
    if triton is None:
        return False, f"triton is not importable ({_TRITON_ERR})"
    if not q.is_cuda and not _interpret():
        return False, "q is not on a CUDA device"
    if q.dtype not in (torch.float16, torch.bfloat16, torch.float32):
        return False, f"dtype {q.dtype} is not fp16/bf16/fp32"
    d = q.shape[-1]
    if d < 16 or d > 128 or d & (d - 1):
        return False, f"head dim {d} is not a power of two in [16, 128]"
    return True, ""


if triton is not None:

    @triton.jit
    def _insert5(t0, t1, t2, t3, t4, v):
        # insert v into the descending list t0 >= ... >= t4, keeping the 5 largest (v=-inf: no-op)
        n0 = tl.maximum(t0, v)
        n1 = tl.maximum(t1, tl.minimum(t0, v))
        n2 = tl.maximum(t2, tl.minimum(t1, v))
        n3 = tl.maximum(t3, tl.minimum(t2, v))
        n4 = tl.maximum(t4, tl.minimum(t3, v))
        return n0, n1, n2, n3, n4

    @triton.jit
    def _top5_block_sum(t0, t1, t2, t3, t4, lse2, mmask):
        # sum over the block's rows of their top-5 probabilities (logits and lse2 in log2 units)
        tot = (
            tl.math.exp2(t0 - lse2) + tl.math.exp2(t1 - lse2) + tl.math.exp2(t2 - lse2)
            + tl.math.exp2(t3 - lse2) + tl.math.exp2(t4 - lse2)
        )
        return tl.sum(tl.where(mmask, tot, 0.0), axis=0)

    @triton.jit
    def _colmass_loop(
        q_base, l_base, kt, acc, acc_e, GMAX, nmask,
        s_qm, s_qd, s_lm, n_q, n_kblocks, pid_n, pid_bh, qk_scale2,
        WANT_ENT: tl.constexpr, WANT_GMAX: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
        PREC: tl.constexpr, MASK_N: tl.constexpr, EVEN_M: tl.constexpr,
    ):
        # the query loop of _colmass_kernel; MASK_N (only the last key block) hides padded keys from the
        # group maxima, EVEN_M (n_q a multiple of BLOCK_M) drops the row masks: both save per-element work
        offs_d = tl.arange(0, HEAD_D)
        for start_m in range(0, n_q, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            if EVEN_M:
                q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd)
                lse2 = tl.load(l_base + offs_m * s_lm) * 1.4426950408889634
            else:
                mmask = offs_m < n_q
                q = tl.load(q_base + offs_m[:, None] * s_qm + offs_d[None, :] * s_qd, mask=mmask[:, None], other=0.0)
                # rows past the end get a huge lse: p = 0 and p * d = -0, never NaN
                lse2 = tl.load(l_base + offs_m * s_lm, mask=mmask, other=1.0e30) * 1.4426950408889634
            s = tl.dot(q, kt, input_precision=PREC)
            d = s * qk_scale2 - lse2[:, None]
            p = tl.math.exp2(d)
            acc += p
            if WANT_ENT:
                acc_e += p * d
            if WANT_GMAX:
                # per query, the largest logit of each group of GROUP keys (for the top-5 pass)
                NGB: tl.constexpr = BLOCK_N // GROUP
                if MASK_N:
                    s = tl.where(nmask[None, :], s, float("-inf"))
                g = tl.max(tl.reshape(s, [BLOCK_M, NGB, GROUP]), axis=2)
                gcol = pid_n * NGB + tl.arange(0, NGB)
                gptr = GMAX + pid_bh * (n_kblocks * NGB) * n_q + gcol[None, :] * n_q + offs_m[:, None]
                if EVEN_M:
                    tl.store(gptr, g)
                else:
                    tl.store(gptr, g, mask=mmask[:, None])
        return acc, acc_e

    @triton.jit
    def _colmass_kernel(
        Q, K, LSE, MASS, ENT, GMAX,
        s_qb, s_qh, s_qm, s_qd,
        s_kb, s_kh, s_kn, s_kd,
        s_lb, s_lh, s_lm,
        H, q_start, l_start, n_q, Lk, n_kblocks,
        qk_scale2, inv_nq,
        WANT_ENT: tl.constexpr, WANT_GMAX: tl.constexpr, GROUP: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
        PREC: tl.constexpr, EVEN_M: tl.constexpr,
    ):
        pid_n = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, HEAD_D)
        nmask = offs_n < Lk
        kt = tl.load(
            K + b * s_kb + h * s_kh + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
            mask=nmask[None, :], other=0.0,
        )
        q_base = Q + b * s_qb + h * s_qh + q_start * s_qm
        l_base = LSE + b * s_lb + h * s_lh + l_start * s_lm
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc_e = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        args = (q_base, l_base, kt, acc, acc_e, GMAX, nmask, s_qm, s_qd, s_lm, n_q, n_kblocks, pid_n, pid_bh, qk_scale2)
        if (not WANT_GMAX) or (pid_n + 1) * BLOCK_N <= Lk:
            acc, acc_e = _colmass_loop(*args, WANT_ENT, WANT_GMAX, GROUP, BLOCK_M, BLOCK_N, HEAD_D, PREC, False, EVEN_M)
        else:
            acc, acc_e = _colmass_loop(*args, WANT_ENT, WANT_GMAX, GROUP, BLOCK_M, BLOCK_N, HEAD_D, PREC, True, EVEN_M)
        col = tl.sum(acc, axis=0) * inv_nq
        tl.store(MASS + pid_bh * Lk + offs_n, col, mask=nmask)
        if WANT_ENT:
            # padded key columns (k = 0) must not enter the entropy
            e = tl.sum(tl.where(nmask[None, :], acc_e, 0.0), axis=1)
            tl.store(ENT + pid_bh * n_kblocks + pid_n, tl.sum(e, axis=0))

    @triton.jit
    def _row_kernel(
        Q, K, LSE_IN, LSE_OUT, TOP,
        s_qb, s_qh, s_qm, s_qd,
        s_kb, s_kh, s_kn, s_kd,
        s_lb, s_lh, s_lm,
        H, q_start, n_q, Lk, n_qblocks,
        qk_scale2,
        HAS_LSE: tl.constexpr, WANT_TOP5: tl.constexpr,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr,
        PREC: tl.constexpr, TOPK_MODE: tl.constexpr,
    ):
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < n_q
        offs_d = tl.arange(0, HEAD_D)
        q = tl.load(
            Q + b * s_qb + h * s_qh + (q_start + offs_m[:, None]) * s_qm + offs_d[None, :] * s_qd,
            mask=mmask[:, None], other=0.0,
        )
        k_base = K + b * s_kb + h * s_kh
        neg = float("-inf")
        m_i = tl.full([BLOCK_M], neg, dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        t0 = tl.full([BLOCK_M], neg, dtype=tl.float32)
        t1 = t0
        t2 = t0
        t3 = t0
        t4 = t0
        for start_n in range(0, Lk, BLOCK_N):
            offs_n = start_n + tl.arange(0, BLOCK_N)
            nmask = offs_n < Lk
            kt = tl.load(k_base + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd, mask=nmask[None, :], other=0.0)
            s_raw = tl.dot(q, kt, input_precision=PREC) * qk_scale2
            s = tl.where(nmask[None, :], s_raw, neg)
            if not HAS_LSE:
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                l_i = l_i * tl.math.exp2(m_i - m_new) + tl.sum(tl.math.exp2(s - m_new[:, None]), axis=1)
                m_i = m_new
            if WANT_TOP5:
                # Insert this tile's largest values (with multiplicity, so tied keys count) into the
                # running per-row top-5 t0 >= ... >= t4. Modes differ in how a tile's top values are
                # extracted: 0 = rounds while any row of the block still has a value above its t4
                # (block-wide test per round), 1 = always 5 rounds (no block-wide test), 2 = as many
                # rounds as the most-crowded row needs (one block-wide test per tile), 3 and 4 = 5
                # rounds over unique keys (no tie counting), 4 after a pairwise pre-sort.
                if TOPK_MODE >= 3:
                    # 16-bit inputs: make every value of the tile unique by writing the column index
                    # into its low log2(BLOCK_N) mantissa bits (<= BLOCK_N ulp change, far below the
                    # inputs' rounding), so one extraction round takes exactly one element and ties
                    # need no counting
                    bits = (s_raw.to(tl.int32, bitcast=True) & (-BLOCK_N)) | tl.arange(0, BLOCK_N)[None, :]
                    cand = tl.where(nmask[None, :], bits.to(tl.float32, bitcast=True), neg)
                    if TOPK_MODE == 3:
                        for e in tl.static_range(5):
                            tm = tl.max(cand, axis=1)
                            t0, t1, t2, t3, t4 = _insert5(t0, t1, t2, t3, t4, tm)
                            if e < 4:
                                cand = tl.where(cand == tm[:, None], neg, cand)
                    else:
                        # pair pre-sort: each adjacent pair (held by one thread) as (hi, lo); a round
                        # takes the largest hi and moves its partner up
                        ca, cb = tl.split(tl.reshape(cand, [BLOCK_M, BLOCK_N // 2, 2]))
                        hi = tl.maximum(ca, cb)
                        lo = tl.minimum(ca, cb)
                        for e in tl.static_range(5):
                            tm = tl.max(hi, axis=1)
                            t0, t1, t2, t3, t4 = _insert5(t0, t1, t2, t3, t4, tm)
                            if e < 4:
                                hit = hi == tm[:, None]
                                hi = tl.where(hit, lo, hi)
                                lo = tl.where(hit, neg, lo)
                else:
                    cand = s
                    tm = tl.max(cand, axis=1)
                    if TOPK_MODE == 0:
                        go = tl.max((tm > t4).to(tl.int32), axis=0)
                        it = 0
                        while (go > 0) & (it < 5):
                            hit = cand == tm[:, None]
                            cnt = tl.sum(hit.to(tl.int32), axis=1)
                            upd = tm > t4
                            cand = tl.where(hit, neg, cand)
                            for r in tl.static_range(5):
                                v = tl.where(upd & (cnt > r), tm, neg)
                                t0, t1, t2, t3, t4 = _insert5(t0, t1, t2, t3, t4, v)
                            tm = tl.max(cand, axis=1)
                            go = tl.max((tm > t4).to(tl.int32), axis=0)
                            it += 1
                    elif TOPK_MODE == 1:
                        for e in tl.static_range(5):
                            hit = cand == tm[:, None]
                            cnt = tl.sum(hit.to(tl.int32), axis=1)
                            upd = tm > t4
                            for r in tl.static_range(5):
                                v = tl.where(upd & (cnt > r), tm, neg)
                                t0, t1, t2, t3, t4 = _insert5(t0, t1, t2, t3, t4, v)
                            if e < 4:
                                cand = tl.where(hit, neg, cand)
                                tm = tl.max(cand, axis=1)
                    elif TOPK_MODE == 2:
                        n_it = tl.minimum(tl.max(tl.sum((cand > t4[:, None]).to(tl.int32), axis=1), axis=0), 5)
                        for e in range(n_it):
                            hit = cand == tm[:, None]
                            cnt = tl.sum(hit.to(tl.int32), axis=1)
                            upd = tm > t4
                            cand = tl.where(hit, neg, cand)
                            for r in tl.static_range(5):
                                v = tl.where(upd & (cnt > r), tm, neg)
                                t0, t1, t2, t3, t4 = _insert5(t0, t1, t2, t3, t4, v)
                            tm = tl.max(cand, axis=1)
        if HAS_LSE:
            lse2 = tl.load(
                LSE_IN + b * s_lb + h * s_lh + (q_start + offs_m) * s_lm, mask=mmask, other=0.0
            ) * 1.4426950408889634
        else:
            lse2 = m_i + tl.math.log2(l_i)
            tl.store(LSE_OUT + pid_bh * n_q + offs_m, lse2 * 0.6931471805599453, mask=mmask)
        if WANT_TOP5:
            tl.store(TOP + pid_bh * n_qblocks + pid_m, _top5_block_sum(t0, t1, t2, t3, t4, lse2, mmask))


    @triton.jit
    def _insert5_idx(t0, t1, t2, t3, t4, i0, i1, i2, i3, i4, v, vi):
        # like _insert5, carrying an index; a value equal to a kept one goes after it
        c0 = v > t0
        c1 = v > t1
        c2 = v > t2
        c3 = v > t3
        c4 = v > t4
        n4 = tl.where(c3, t3, tl.where(c4, v, t4))
        j4 = tl.where(c3, i3, tl.where(c4, vi, i4))
        n3 = tl.where(c2, t2, tl.where(c3, v, t3))
        j3 = tl.where(c2, i2, tl.where(c3, vi, i3))
        n2 = tl.where(c1, t1, tl.where(c2, v, t2))
        j2 = tl.where(c1, i1, tl.where(c2, vi, i2))
        n1 = tl.where(c0, t0, tl.where(c1, v, t1))
        j1 = tl.where(c0, i0, tl.where(c1, vi, i1))
        n0 = tl.where(c0, v, t0)
        j0 = tl.where(c0, vi, i0)
        return n0, n1, n2, n3, n4, j0, j1, j2, j3, j4

    @triton.jit
    def _top5_refine_kernel(
        Q, K, GMAX, LSE, TOP,
        s_qb, s_qh, s_qm, s_qd,
        s_kb, s_kh, s_kn, s_kd,
        s_lb, s_lh, s_lm,
        H, q_start, l_start, n_q, Lk, n_groups, n_qblocks, qk_scale2,
        GROUP: tl.constexpr, BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr,
    ):
        # Exact top-5 from group maxima: the 5 largest logits of a row all lie in the 5 groups with
        # the largest maxima (up to ties, which leave the sum unchanged). Pick those groups per row,
        # recompute their GROUP logits each in fp32 on CUDA cores, and extract the top 5.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < n_q
        neg = float("-inf")
        t0 = tl.full([BLOCK_M], neg, dtype=tl.float32)
        t1 = t0
        t2 = t0
        t3 = t0
        t4 = t0
        i0 = tl.full([BLOCK_M], -1, dtype=tl.int32)
        i1 = i0
        i2 = i0
        i3 = i0
        i4 = i0
        gbase = GMAX + pid_bh * n_groups * n_q + offs_m
        for g in range(n_groups):
            v = tl.load(gbase + g * n_q, mask=mmask, other=neg)
            t0, t1, t2, t3, t4, i0, i1, i2, i3, i4 = _insert5_idx(t0, t1, t2, t3, t4, i0, i1, i2, i3, i4, v, g)
        # refinement: the exact fp32 logit of every key of the chosen groups, inserted one by one
        # (so tied keys count), on CUDA cores; dynamic loops keep the kernel small to compile
        u0 = tl.full([BLOCK_M], neg, dtype=tl.float32)
        u1 = u0
        u2 = u0
        u3 = u0
        u4 = u0
        offs_d = tl.arange(0, HEAD_D)
        q = tl.load(Q + b * s_qb + h * s_qh + (q_start + offs_m)[:, None] * s_qm + offs_d[None, :] * s_qd,
                    mask=mmask[:, None], other=0.0).to(tl.float32)
        k_base = K + b * s_kb + h * s_kh
        for r in range(5):
            gi = tl.where(r == 0, i0, tl.where(r == 1, i1, tl.where(r == 2, i2, tl.where(r == 3, i3, i4))))
            for j in range(GROUP):
                key = gi * GROUP + j
                ok = (gi >= 0) & (key < Lk) & mmask
                kr = tl.load(k_base + key[:, None] * s_kn + offs_d[None, :] * s_kd, mask=ok[:, None], other=0.0)
                sj = tl.sum(q * kr.to(tl.float32), axis=1) * qk_scale2
                u0, u1, u2, u3, u4 = _insert5(u0, u1, u2, u3, u4, tl.where(ok, sj, neg))
        lse2 = tl.load(LSE + b * s_lb + h * s_lh + (l_start + offs_m) * s_lm, mask=mmask, other=0.0) * 1.4426950408889634
        tl.store(TOP + pid_bh * n_qblocks + pid_m, _top5_block_sum(u0, u1, u2, u3, u4, lse2, mmask))

    @triton.jit
    def _removal_cf_kernel(
        Q, KS, VS, OUT, LSE, DEST, PSEL, COND,
        s_qb, s_qh, s_qm, s_qd,
        s_ob, s_oh, s_om, s_od,
        s_db, s_dh, s_dm, s_dd,
        s_lb, s_lh, s_lm,
        H, q_start, n_q, n_sel, qk_scale2,
        BLOCK_M: tl.constexpr, HEAD_D: tl.constexpr,
    ):
        # one pass over the scoped rows: p_s = exp2(q.k_s scale log2e - lse log2e) for the few selected
        # keys on CUDA cores in fp32, then (out - sum p_s v_s) / (1 - sum p_s)
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        b = pid_bh // H
        h = pid_bh % H
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        mmask = offs_m < n_q
        rows = q_start + offs_m
        offs_d = tl.arange(0, HEAD_D)
        q = tl.load(Q + b * s_qb + h * s_qh + rows[:, None] * s_qm + offs_d[None, :] * s_qd,
                    mask=mmask[:, None], other=0.0).to(tl.float32)
        o = tl.load(OUT + b * s_ob + h * s_oh + rows[:, None] * s_om + offs_d[None, :] * s_od,
                    mask=mmask[:, None], other=0.0).to(tl.float32)
        lse2 = tl.load(LSE + b * s_lb + h * s_lh + rows * s_lm, mask=mmask, other=0.0) * 1.4426950408889634
        o_norm = tl.sqrt(tl.sum(o * o, axis=1))
        psum = tl.zeros([BLOCK_M], dtype=tl.float32)
        for j in range(n_sel):
            ks = tl.load(KS + (pid_bh * n_sel + j) * HEAD_D + offs_d).to(tl.float32)
            vs = tl.load(VS + (pid_bh * n_sel + j) * HEAD_D + offs_d).to(tl.float32)
            p = tl.math.exp2(tl.sum(q * ks[None, :], axis=1) * qk_scale2 - lse2)
            psum += p
            o -= p[:, None] * vs[None, :]
        # o is now out - sum p_s v_s. Relative error amplification of out's rounding:
        # |out| / |out - sum p_s v_s| (= |out| / ((1 - p_sel) |out'|)); infinite once p_sel >= 1
        d_norm = tl.sqrt(tl.sum(o * o, axis=1))
        cond = tl.where(psum < 1.0, o_norm / d_norm, float("inf"))
        new = o / tl.maximum(1.0 - psum, 1.0e-30)[:, None]
        tl.store(DEST + b * s_db + h * s_dh + offs_m[:, None] * s_dm + offs_d[None, :] * s_dd,
                 new.to(DEST.dtype.element_ty), mask=mmask[:, None])
        tl.store(PSEL + pid_bh * n_q + offs_m, psum, mask=mmask)
        tl.store(COND + pid_bh * n_q + offs_m, cond, mask=mmask)


    @triton.jit
    def _guard_attn_kernel(
        Q, K, V, SEL, ROWS, CNT, DEST,
        s_qb, s_qh, s_qm, s_qd,
        s_kb, s_kh, s_kn, s_kd,
        s_vb, s_vh, s_vn, s_vd,
        s_db, s_dh, s_dm, s_dd,
        H, q_start, n_q, Lk, n_sel, qk_scale2,
        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, HEAD_D: tl.constexpr, PREC: tl.constexpr,
    ):
        # Exact attention without the selected keys for the packed rows ROWS[bh, :CNT[bh]] (rows where
        # the closed form is ill-conditioned). Programs past CNT exit at once, so the launch needs no
        # host-side count.
        pid_m = tl.program_id(0)
        pid_bh = tl.program_id(1)
        cnt = tl.load(CNT + pid_bh)
        if pid_m * BLOCK_M < cnt:
            b = pid_bh // H
            h = pid_bh % H
            offs = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
            valid = offs < cnt
            rows = tl.load(ROWS + pid_bh * n_q + offs, mask=valid, other=0)
            offs_d = tl.arange(0, HEAD_D)
            q = tl.load(Q + b * s_qb + h * s_qh + (q_start + rows)[:, None] * s_qm + offs_d[None, :] * s_qd,
                        mask=valid[:, None], other=0.0)
            m_i = tl.full([BLOCK_M], -1.0e30, dtype=tl.float32)  # finite: a fully masked tile gives p = 0
            l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
            acc = tl.zeros([BLOCK_M, HEAD_D], dtype=tl.float32)
            for start_n in range(0, Lk, BLOCK_N):
                offs_n = start_n + tl.arange(0, BLOCK_N)
                keep = offs_n < Lk
                for j in range(n_sel):
                    keep = keep & (offs_n != tl.load(SEL + pid_bh * n_sel + j))
                kt = tl.load(K + b * s_kb + h * s_kh + offs_n[None, :] * s_kn + offs_d[:, None] * s_kd,
                             mask=(offs_n < Lk)[None, :], other=0.0)
                vv = tl.load(V + b * s_vb + h * s_vh + offs_n[:, None] * s_vn + offs_d[None, :] * s_vd,
                             mask=(offs_n < Lk)[:, None], other=0.0)
                s = tl.dot(q, kt, input_precision=PREC) * qk_scale2
                s = tl.where(keep[None, :], s, float("-inf"))
                m_new = tl.maximum(m_i, tl.max(s, axis=1))
                alpha = tl.math.exp2(m_i - m_new)
                p = tl.math.exp2(s - m_new[:, None])
                l_i = l_i * alpha + tl.sum(p, axis=1)
                acc = acc * alpha[:, None] + tl.dot(p.to(vv.dtype), vv, input_precision=PREC)
                m_i = m_new
            o = acc / l_i[:, None]
            tl.store(DEST + b * s_db + h * s_dh + rows[:, None] * s_dm + offs_d[None, :] * s_dd,
                     o.to(DEST.dtype.element_ty), mask=valid[:, None])


def guard_recompute(q, k, v, selected_idx, rows, cnt, a, scale, dest, block_m: int = 16, block_n: int = 64) -> None:
    """Exact attention without ``selected_idx`` keys for rows ``rows[b,h,:cnt[b,h]]`` (relative to ``a``),
    written into ``dest`` (the [B,H,n,D] scope view). No host sync: the grid covers every row."""
    B, H, _, D = q.shape
    n, n_sel = rows.shape[2], selected_idx.shape[2]
    sel = selected_idx.to(torch.int32).contiguous()
    rows = rows.to(torch.int32).contiguous()
    cnt = cnt.to(torch.int32).contiguous()
    sq, sk, sv, sd = q.stride(), k.stride(), v.stride(), dest.stride()
    _guard_attn_kernel[(triton.cdiv(n, block_m), B * H)](
        q, k, v, sel, rows, cnt, dest,
        sq[0], sq[1], sq[2], sq[3], sk[0], sk[1], sk[2], sk[3], sv[0], sv[1], sv[2], sv[3], sd[0], sd[1], sd[2], sd[3],
        H, a, n, k.shape[2], n_sel, float(scale) * LOG2E,
        BLOCK_M=block_m, BLOCK_N=block_n, HEAD_D=D, PREC=_prec(q), num_warps=4, num_stages=2,
    )


def removal_closed_form(q, ksel, vsel, out, lse, a, b_, scale, dest, block_m: int = 64):
    """Closed-form key removal for rows [a, b_) into ``dest`` (a [B,H,b_-a,D] view); returns
    (sum_sel p, cond), both [B,H,n] fp32 (see mass.remove_keys)."""
    B, H, _, D = q.shape
    n, n_sel = b_ - a, ksel.shape[2]
    ksel, vsel = ksel.contiguous(), vsel.contiguous()
    psel = torch.empty(B, H, n, dtype=torch.float32, device=q.device)
    cond = torch.empty_like(psel)
    sq, so, sd, sl = q.stride(), out.stride(), dest.stride(), lse.stride()
    _removal_cf_kernel[(triton.cdiv(n, block_m), B * H)](
        q, ksel, vsel, out, lse, dest, psel, cond,
        sq[0], sq[1], sq[2], sq[3], so[0], so[1], so[2], so[3], sd[0], sd[1], sd[2], sd[3], sl[0], sl[1], sl[2],
        H, a, n, n_sel, float(scale) * LOG2E,
        BLOCK_M=block_m, HEAD_D=D, num_warps=4,
    )
    return psel, cond


def _launch_row(q, k, lse, query_start, nq, scale, want_top5, cfg):
    """Row kernel: top-5 partial sums [BH, n_qblocks] and, without ``lse``, the lse [BH, nq]."""
    B, H, _, D = q.shape
    BH, Lk, dev = B * H, k.shape[2], q.device
    dummy = torch.empty(1, dtype=torch.float32, device=dev)
    n_qb = triton.cdiv(nq, cfg.row_block_m)
    lse_out = torch.empty(BH, nq, dtype=torch.float32, device=dev) if lse is None else dummy
    top = torch.empty(BH, n_qb, dtype=torch.float32, device=dev) if want_top5 else dummy
    sq, sk = q.stride(), k.stride()
    sl = lse.stride() if lse is not None else (0, 0, 0)
    _row_kernel[(n_qb, BH)](
        q, k, lse if lse is not None else dummy, lse_out, top,
        sq[0], sq[1], sq[2], sq[3], sk[0], sk[1], sk[2], sk[3], sl[0], sl[1], sl[2],
        H, query_start, nq, Lk, n_qb, float(scale) * LOG2E,
        HAS_LSE=lse is not None, WANT_TOP5=want_top5,
        BLOCK_M=cfg.row_block_m, BLOCK_N=cfg.row_block_n, HEAD_D=D, PREC=_prec(q), TOPK_MODE=_topk_mode(q, cfg),
        num_warps=cfg.row_warps, num_stages=cfg.row_stages,
    )
    return (lse_out if lse is None else None), (top if want_top5 else None)


def _launch_col(q, k, lse, lse_strides, l_start, query_start, nq, scale, want_entropy, cfg, want_gmax=False, inv_nq=None):
    """Column kernel: mass [BH, Lk] (already divided by nq), entropy partials [BH, n_kblocks] and,
    with ``want_gmax``, per-query group maxima [BH, n_groups, nq] for the top-5 refinement."""
    B, H, _, D = q.shape
    BH, Lk, dev = B * H, k.shape[2], q.device
    n_kb = triton.cdiv(Lk, cfg.col_block_n)
    mass = torch.empty(BH, Lk, dtype=torch.float32, device=dev)
    ent = torch.empty(BH, n_kb, dtype=torch.float32, device=dev) if want_entropy else mass
    group = min(cfg.group, cfg.col_block_n)
    gmax = torch.empty(BH, n_kb * (cfg.col_block_n // group), nq, dtype=torch.float32, device=dev) if want_gmax else mass
    sq, sk, sl = q.stride(), k.stride(), lse_strides
    _colmass_kernel[(n_kb, BH)](
        q, k, lse, mass, ent, gmax,
        sq[0], sq[1], sq[2], sq[3], sk[0], sk[1], sk[2], sk[3], sl[0], sl[1], sl[2],
        H, query_start, l_start, nq, Lk, n_kb, float(scale) * LOG2E, 1.0 / nq if inv_nq is None else inv_nq,
        WANT_ENT=want_entropy, WANT_GMAX=want_gmax, GROUP=group,
        BLOCK_M=cfg.col_block_m, BLOCK_N=cfg.col_block_n, HEAD_D=D, PREC=_prec(q), EVEN_M=nq % cfg.col_block_m == 0,
        num_warps=cfg.col_warps, num_stages=cfg.col_stages,
    )
    return mass, (ent if want_entropy else None), (gmax if want_gmax else None)


def _launch_refine(q, k, gmax, lse, lse_strides, l_start, query_start, nq, scale, cfg):
    """Top-5 partial sums [BH, n_qblocks] from the group maxima of ``_launch_col``."""
    B, H, _, D = q.shape
    BH, Lk = B * H, k.shape[2]
    bm = cfg.refine_block_m
    n_qb = triton.cdiv(nq, bm)
    top = torch.empty(BH, n_qb, dtype=torch.float32, device=q.device)
    sq, sk, sl = q.stride(), k.stride(), lse_strides
    _top5_refine_kernel[(n_qb, BH)](
        q, k, gmax, lse, top,
        sq[0], sq[1], sq[2], sq[3], sk[0], sk[1], sk[2], sk[3], sl[0], sl[1], sl[2],
        H, query_start, l_start, nq, Lk, gmax.shape[1], n_qb, float(scale) * LOG2E,
        GROUP=min(cfg.group, cfg.col_block_n), BLOCK_M=bm, HEAD_D=D,
        num_warps=cfg.refine_warps, num_stages=1,
    )
    return top


def _topk_mode(q: torch.Tensor, cfg: MassConfig) -> int:
    # the unique-key modes (3, 4) perturb the top-5 logits by <= BLOCK_N ulp: fine for 16-bit inputs,
    # not for fp32, which gets the exact static mode
    if cfg.topk_mode == 5:
        return 4 if q.dtype != torch.float32 else 0  # the row kernel serves top5_concentration only
    if cfg.topk_mode >= 3 and q.dtype == torch.float32:
        return 0  # measured faster than the static exact mode 1 (H200, benchmarks/RESULTS.md)
    return cfg.topk_mode


def _prec(q: torch.Tensor) -> str:
    return "ieee" if q.dtype == torch.float32 else "tf32"  # fp32 inputs: no tf32 rounding


def key_mass_stats_triton(
    q: torch.Tensor,
    k: torch.Tensor,
    scale: float,
    query_start: int,
    query_end: int,
    *,
    want_entropy: bool = True,
    want_top5: bool = True,
    lse: torch.Tensor | None = None,
    config: MassConfig | None = None,
    max_group_bytes: int = 256 << 20,
) -> KeyMassStats:
    """Triton version of ``mass.key_mass_stats``; ``lse`` [B,H,Lq] (natural log) skips a pass.
    ``max_group_bytes`` bounds the top-5 group-maxima buffer, the only one that grows with queries x keys
    (218 MB at SD3-medium 1024²: one chunk; every chunk more cost ~0.08 ms on an H200)."""
    ok, why = supported(q)
    if not ok:
        raise RuntimeError(f"Triton sink statistics unavailable: {why}")
    nq = _check_qk(q, k, query_start, query_end)
    if k.dtype != q.dtype:
        raise ValueError(f"q and k dtypes differ ({q.dtype}, {k.dtype})")
    cfg = config or DEFAULT_CONFIG
    B, H, Lq, _ = q.shape
    Lk = k.shape[2]
    if lse is not None:
        if tuple(lse.shape) != (B, H, Lq):
            raise ValueError(f"lse must be [B,H,Lq]={B, H, Lq}; got {tuple(lse.shape)}")
        lse = lse.to(device=q.device, dtype=torch.float32)
        sl, l_start = lse.stride(), query_start

    top = None
    refine = want_top5 and cfg.topk_mode == 5
    if lse is None or (want_top5 and not refine):
        own_lse, top = _launch_row(q, k, lse, query_start, nq, scale, want_top5 and not refine, cfg)
        if lse is None:
            lse, sl, l_start = own_lse, (H * nq, nq, 1), 0
    if not refine:
        mass, ent, _ = _launch_col(q, k, lse, sl, l_start, query_start, nq, scale, want_entropy, cfg)
    else:
        # The group maxima take B*H*(Lk/group)*queries fp32, which grows with tokens^2: the queries go
        # through in chunks so that this buffer stays under max_group_bytes and extra memory stays linear.
        groups = triton.cdiv(Lk, cfg.col_block_n) * (cfg.col_block_n // min(cfg.group, cfg.col_block_n))
        per_query = B * H * groups * 4
        chunk = max(cfg.col_block_m, (max_group_bytes // per_query) // cfg.col_block_m * cfg.col_block_m)
        masses, ents, tops = [], [], []
        for c0 in range(0, nq, chunk):
            n_c = min(chunk, nq - c0)
            at = (sl, l_start + c0, query_start + c0, n_c, scale)
            m_c, e_c, gmax = _launch_col(q, k, lse, *at, want_entropy, cfg, want_gmax=True, inv_nq=1.0 / nq)
            tops.append(_launch_refine(q, k, gmax, lse, *at, cfg))
            masses.append(m_c)
            ents.append(e_c)
            del gmax
        mass = masses[0] if len(masses) == 1 else torch.stack(masses).sum(dim=0)
        ent = None if not want_entropy else torch.cat(ents, dim=1)
        top = torch.cat(tops, dim=1)
    return KeyMassStats(
        mass=mass.view(B, H, Lk),
        entropy=(ent.sum(dim=1) * (-LN2 / nq)).view(B, H) if want_entropy else None,
        top5=(top.sum(dim=1) / nq).view(B, H) if want_top5 else None,
    )


def top5_concentration(
    q: torch.Tensor, k: torch.Tensor, scale: float, query_start: int, query_end: int, lse: torch.Tensor | None = None,
    config: MassConfig | None = None,
) -> torch.Tensor:
    """[B,H] top-5 concentration alone (row kernel only): for a strided query subsample
    (``mass.key_mass_stats(top5_query_stride=n)``) or a side stream. Without ``lse`` the kernel
    computes its own in the same pass."""
    nq = _check_qk(q, k, query_start, query_end)
    B, H, Lq, _ = q.shape
    if lse is not None and tuple(lse.shape) != (B, H, Lq):
        raise ValueError(f"lse must be [B,H,Lq]={B, H, Lq}; got {tuple(lse.shape)}")
    lse = None if lse is None else lse.float()
    _, top = _launch_row(q, k, lse, query_start, nq, scale, True, config or DEFAULT_CONFIG)
    return (top.sum(dim=1) / nq).view(B, H)
