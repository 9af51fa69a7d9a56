"""One attention layer at SD3-medium scale: attention alone vs sink identification and removal variants.

    python benchmarks/bench_identification.py [--json out.json] [--sweep] [--small --device cpu]

Shapes (default): B=2, H=24, D=64, 4096 image + 333 text tokens, bf16, joint sequence [image | text];
statistics over the image queries. Prints one table: median time (ms), ratio to one default SDPA,
extra peak memory (MiB) and the relative error of the layer's statistics / output against an
fp32 reference. ``--sweep`` also times the two Triton kernels over a few tile configurations.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.kernels import attention_with_lse, key_mass_stats_torch, remove_keys  # noqa: E402
from workers.kernels.mass import KeyMassStats  # noqa: E402

try:
    from workers.kernels import triton_mass as tm
except Exception:  # pragma: no cover
    tm = None


def bench(fn, device, reps_ms=200):
    """Median milliseconds; device events via triton.testing.do_bench on CUDA."""
    if device == "cuda":
        import triton.testing

        return float(triton.testing.do_bench(fn, warmup=50, rep=reps_ms, return_mode="median"))
    fn()
    ts = []
    for _ in range(5):
        t = time.perf_counter()
        fn()
        ts.append((time.perf_counter() - t) * 1e3)
    return statistics.median(ts)


def peak_extra_mib(fn, device):
    if device != "cuda":
        return float("nan")
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


def rel(x, ref):
    x, ref = x.double(), ref.double()
    if not torch.isfinite(x).all():
        return float("inf")
    return float((x - ref).norm() / ref.norm())


def stats_err(st: KeyMassStats, ref: KeyMassStats) -> float:
    errs = [rel(st.mass, ref.mass)]
    if st.entropy is not None:
        errs.append(rel(st.entropy, ref.entropy))
    if st.top5 is not None:
        errs.append(rel(st.top5, ref.top5))
    return max(errs)


def paper_style(q, k, v, scale, n_img, remove_top=0):
    """The released code's way: fp32 logits and softmax of the image queries materialised."""
    logits = torch.matmul(q[:, :, :n_img].float(), k.float().transpose(-1, -2)) * scale
    a = torch.softmax(logits, dim=-1)
    mass = a.mean(dim=2)
    ent = -(a * torch.log(a + 1e-10)).sum(-1).mean(-1)
    top5 = a.topk(5, dim=-1).values.sum(-1).mean(-1)
    out = None
    if remove_top:
        idx = mass.topk(remove_top, dim=-1).indices
        mask = torch.zeros_like(mass).scatter_(-1, idx, 1.0)
        a = torch.softmax(logits - 1e4 * mask[:, :, None, :], dim=-1)
        out = torch.matmul(a.to(v.dtype), v)
    return KeyMassStats(mass, ent, top5), out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--sweep", action="store_true", help="time the Triton kernels over tile configurations")
    ap.add_argument("--json", default=None)
    ap.add_argument("--only-stats", action="store_true", help="only SDPA and the Triton statistics rows (a short GPU call)")
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args()
    dev = args.device
    dtype = getattr(torch, args.dtype)
    B, H, D, n_img, n_txt = (2, 24, 64, 4096, 333) if not args.small else (1, 2, 64, 120, 17)
    L = n_img + n_txt
    scale = D**-0.5
    torch.manual_seed(0)
    q = torch.randn(B, H, L, D, device=dev, dtype=dtype)
    k = torch.randn(B, H, L, D, device=dev, dtype=dtype)
    v = torch.randn(B, H, L, D, device=dev, dtype=dtype)
    # a text key every image query leans on (like SD3's text sinks), so top-k and removal see one
    u = F.normalize(torch.randn(B, H, 1, D, device=dev), dim=-1)
    q[:, :, :n_img] += (1.5 * u).to(dtype)
    k[:, :, n_img + 3] = (u[:, :, 0] * 4.0 * D**0.5 / 1.5).to(dtype)

    use_triton = tm is not None and tm.supported(q)[0]  # CPU only under TRITON_INTERPRET=1 (smoke test)
    info = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": getattr(getattr(tm, "triton", None), "__version__", None),
        "date": time.strftime("%Y-%m-%d"),
        "shape": dict(B=B, H=H, D=D, n_img=n_img, n_txt=n_txt, dtype=str(dtype)),
    }
    print(json.dumps(info))
    rows = []

    def add(name, fn, err=None, note=""):
        try:
            ms = bench(fn, dev)
            mem = peak_extra_mib(fn, dev)
        except Exception as exc:  # a backend this card/torch refuses: say so, keep going
            print(f"  {name}: FAILED {type(exc).__name__}: {str(exc).splitlines()[0][:160]}")
            rows.append(dict(name=name, ms=None, mem=None, err=None, note=f"failed: {type(exc).__name__}"))
            return None
        rows.append(dict(name=name, ms=ms, mem=mem, err=err, note=note))
        print(f"  {name}: {ms:.3f} ms")
        return ms

    # reference statistics: chunked fp32 on the upcast inputs (the CPU path is the reference)
    ref = key_mass_stats_torch(q, k, scale, 0, n_img)
    out_ref, lse_ref = attention_with_lse(q.float(), k.float(), v.float(), scale, backend="math" if dev != "cuda" else None)

    # ---- attention alone
    add("sdpa default", lambda: F.scaled_dot_product_attention(q, k, v, scale=scale))
    if dev == "cuda" and not args.only_stats:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        for be in ("CUDNN_ATTENTION", "FLASH_ATTENTION", "EFFICIENT_ATTENTION"):

            def f(be=be):
                with sdpa_kernel(getattr(SDPBackend, be)):
                    return F.scaled_dot_product_attention(q, k, v, scale=scale)

            add(f"sdpa [{be.split('_')[0].lower()}]", f)
    backends = ("cudnn", "flash", "efficient") if dev == "cuda" else ("math",)
    if args.only_stats:
        backends = backends[:1]
    lse_ok = {}
    for be in backends:
        try:
            o, l_ = attention_with_lse(q, k, v, scale, backend=be)
            e = max(rel(o, out_ref), float((l_.double() - lse_ref.double()).abs().max()))
            lse_ok[be] = l_
        except Exception as exc:
            print(f"  attention_with_lse[{be}] unavailable: {exc}".splitlines()[0][:200])
            rows.append(dict(name=f"attn+lse [{be}]", ms=None, mem=None, err=None, note="unavailable"))
            continue
        add(f"attn+lse [{be}]", lambda be=be: attention_with_lse(q, k, v, scale, backend=be), e, "err: max(rel out, max|dlse|)")
    _, lse = attention_with_lse(q, k, v, scale)

    # ---- identification
    if use_triton:
        variants = [
            ("triton mass (lse given)", dict(want_entropy=False, want_top5=False, lse=lse)),
            ("triton mass+entropy (lse given)", dict(want_entropy=True, want_top5=False, lse=lse)),
            ("triton mass+entropy+top5 (lse given)", dict(want_entropy=True, want_top5=True, lse=lse)),
            ("triton mass+entropy+top5 (own lse)", dict(want_entropy=True, want_top5=True, lse=None)),
            ("triton mass+entropy+top5 [row-kernel top-5, mode 4] (lse given)",
             dict(want_entropy=True, want_top5=True, lse=lse, config=tm.MassConfig(topk_mode=4))),
            ("triton mass+entropy+top5 [group-max refine, mode 5] (lse given)",
             dict(want_entropy=True, want_top5=True, lse=lse, config=tm.MassConfig(topk_mode=5))),
        ]
        for name, kw in variants:
            st = tm.key_mass_stats_triton(q, k, scale, 0, n_img, **kw)
            add(name, lambda kw=kw: tm.key_mass_stats_triton(q, k, scale, 0, n_img, **kw), stats_err(st, ref))
        # the default top-5 (mode 5) kernel by kernel: column kernel with group maxima, then the refinement
        cfg5 = tm.MassConfig(topk_mode=5)
        at = (lse.stride(), 0, 0, n_img, scale)
        _, _, gmax = tm._launch_col(q, k, lse, *at, True, cfg5, want_gmax=True)
        add("  column kernel: mass+entropy+group maxima", lambda: tm._launch_col(q, k, lse, *at, True, cfg5, want_gmax=True))
        add("  refinement of every query (mode 5)", lambda: tm._launch_refine(q, k, gmax, lse, *at, cfg5))
        del gmax
        for be, l_ in lse_ok.items():
            st = tm.key_mass_stats_triton(q, k, scale, 0, n_img, lse=l_)
            rows.append(dict(name=f"  (stats error with lse from {be})", ms=None, mem=None, err=stats_err(st, ref), note=""))
    if not args.only_stats:  # the slow reference rows
        st = key_mass_stats_torch(q, k, scale, 0, n_img)
        add("torch chunked mass+entropy+top5 (64 MiB)", lambda: key_mass_stats_torch(q, k, scale, 0, n_img), stats_err(st, ref))
        st, _ = paper_style(q, k, v, scale, n_img)
        add("paper-style fp32 softmax identification", lambda: paper_style(q, k, v, scale, n_img), stats_err(st, ref))

        # ---- removal of the top-1 / top-5 keys per head for the image queries
        for kk in (1, 5):
            idx = ref.mass.topk(kk, dim=-1).indices
            out, lse = attention_with_lse(q, k, v, scale)
            exact = remove_keys(q.float(), k.float(), v.float(), out_ref, lse_ref, idx, 0, n_img, scale, method="recompute")
            from workers.kernels.mass import removed_mass

            guarded = int((removed_mass(q, k, lse, idx, 0, n_img, scale) >= 0.5).sum(-1).max())
            rows.append(dict(name=f"  (top-{kk}: max rows/(b,h) with removed mass >= 0.5: {guarded})", ms=None, mem=None, err=None, note=""))
            for method in ("auto", "closed_form", "recompute"):
                new = remove_keys(q, k, v, out, lse, idx, 0, n_img, scale, method=method, check=False)
                add(
                    f"remove top-{kk} [{method}] (after attn+lse)",
                    lambda method=method, idx=idx: remove_keys(q, k, v, out, lse, idx, 0, n_img, scale, method=method, check=False),
                    rel(new[:, :, :n_img], exact[:, :, :n_img]),
                )
            _, pout = paper_style(q, k, v, scale, n_img, remove_top=kk)
            add(f"paper-style identification + remove top-{kk}", lambda kk=kk: paper_style(q, k, v, scale, n_img, remove_top=kk),
                rel(pout, exact[:, :, :n_img]))

    # ---- the whole fast layer: attention+lse, all statistics, top-1 removal
    if use_triton:

        def fast_layer():
            o, l_ = attention_with_lse(q, k, v, scale)
            s_ = tm.key_mass_stats_triton(q, k, scale, 0, n_img, lse=l_)
            idx = s_.mass.topk(1, dim=-1).indices
            return remove_keys(q, k, v, o, l_, idx, 0, n_img, scale, check=False)

        add("FAST LAYER: attn+lse, stats, remove top-1", fast_layer)

    # ---- sweep: whole statistics call (mass+entropy+top-5, lse given) over kernel configurations
    sweep = []
    if args.sweep and use_triton:
        import dataclasses

        cands = [tm.MassConfig()]
        for col in ((64, 64, 4, 3), (128, 64, 8, 3)):
            for group in (8, 16):
                for rbm, rw in ((32, 4), (32, 2), (16, 2)):
                    cands.append(tm.MassConfig(*col, topk_mode=5, group=group, refine_block_m=rbm, refine_warps=rw))
        for cfg in cands:
            try:
                st = tm.key_mass_stats_triton(q, k, scale, 0, n_img, lse=lse, config=cfg)
                err = stats_err(st, ref)
                ms = bench(lambda cfg=cfg: tm.key_mass_stats_triton(q, k, scale, 0, n_img, lse=lse, config=cfg), dev, 100)
            except Exception as exc:
                ms, err = None, None
                print("config", cfg, "failed:", str(exc).splitlines()[0][:200])
            sweep.append(dict(kernel="full", cfg=list(dataclasses.astuple(cfg)), ms=ms, err=err))

    base = next((r["ms"] for r in rows if r["name"] == "sdpa default"), None)
    print()
    print(f"{'variant':48s} {'ms':>9s} {'x sdpa':>7s} {'+MiB':>8s} {'rel err':>9s}")
    for r in rows:
        ms = "" if r["ms"] is None else f"{r['ms']:.3f}"
        ratio = "" if (r["ms"] is None or not base) else f"{r['ms'] / base:.2f}"
        mem = "" if r["mem"] is None or math.isnan(r["mem"]) else f"{r['mem']:.0f}"
        err = "" if r["err"] is None else f"{r['err']:.1e}"
        print(f"{r['name']:48s} {ms:>9s} {ratio:>7s} {mem:>8s} {err:>9s} {r['note']}")
    if sweep:
        print("\nstatistics (mass+entropy+top-5, lse given) per MassConfig: ms, rel err")
        for s in sweep:
            ms = None if s["ms"] is None else round(s["ms"], 4)
            err = None if s["err"] is None else f"{s['err']:.1e}"
            print(f"  {str(s['cfg']):50s} {ms} {err}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(info=info, rows=rows, sweep=sweep), indent=1))


if __name__ == "__main__":
    main()
