"""One SD3-medium denoising step (transformer forward, random weights, 1024², CFG batch 2): cost of sink recording.

    python benchmarks/bench_sd3_step.py [--json out.json] [--small --device cpu] [--mass-config 64,64,4,3,128,64,8,2]

Variants: stock diffusers processors; a minimal joint-attention processor (defined here; the project's
real one lives in workers/processors) that takes the attention's log-sum-exp and runs the Triton
statistics at layers 6/12/18 and removes the top-1 key per head at layer 12 for the image queries
("paper config"); the same on all 24 layers; and a paper-style processor that materialises the fp32
softmax at the same layers. Prints step time (median), peak memory and ratios to stock.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from workers.kernels import attention_with_lse, key_mass_stats, remove_keys  # noqa: E402

# = workers.scale_presets.SD3_MEDIUM_TRANSFORMER (the sd3-medium-random preset), kept as a copy because
# run_device.sh runs this script from a kernels-only copy of `workers`; a test checks the two are equal.
SD3_MEDIUM = dict(
    sample_size=128, patch_size=2, in_channels=16, num_layers=24, attention_head_dim=64, num_attention_heads=24,
    joint_attention_dim=4096, caption_projection_dim=1536, pooled_projection_dim=2048, out_channels=16,
    pos_embed_max_size=192,
)
SMALL = dict(
    sample_size=16, patch_size=2, in_channels=4, num_layers=4, attention_head_dim=16, num_attention_heads=2,
    joint_attention_dim=32, caption_projection_dim=32, pooled_projection_dim=16, out_channels=4, pos_embed_max_size=16,
)


def _heads(x, b, h):
    return x.view(b, -1, h, x.shape[-1] // h).transpose(1, 2)


def _project(attn, hidden_states, encoder_hidden_states):
    """q, k, v [B,H,L,D] of the joint sequence [image | text], as diffusers' joint processor builds them."""
    b, h = hidden_states.shape[0], attn.heads
    q, k, v = (_heads(f(hidden_states), b, h) for f in (attn.to_q, attn.to_k, attn.to_v))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k = attn.norm_k(k)
    if encoder_hidden_states is not None:
        eq, ek, ev = (_heads(f(encoder_hidden_states), b, h) for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_added_q is not None:
            eq = attn.norm_added_q(eq)
        if attn.norm_added_k is not None:
            ek = attn.norm_added_k(ek)
        q, k, v = torch.cat([q, eq], 2), torch.cat([k, ek], 2), torch.cat([v, ev], 2)
    return q, k, v


def _finish(attn, out, hidden_states, encoder_hidden_states):
    b = hidden_states.shape[0]
    out = out.transpose(1, 2).reshape(b, -1, out.shape[1] * out.shape[-1]).to(hidden_states.dtype)
    n_img = hidden_states.shape[1]
    img, txt = out[:, :n_img], out[:, n_img:]
    img = attn.to_out[1](attn.to_out[0](img))
    if encoder_hidden_states is None:
        return img
    if not attn.context_pre_only:
        txt = attn.to_add_out(txt)
    return img, txt


class FastSinkProcessor:
    """Attention with lse, Triton sink statistics over the image queries, optional exact top-k removal.

    With ``side`` (a CUDA stream), statistics nobody needs inside this layer (all of them on record-only
    layers; entropy and top-5 on a removal layer) run on that stream, overlapping the rest of the step.
    """

    def __init__(self, log: list, layer: int, remove_top: int = 0, entropy=True, top5=True, config=None, side=None):
        self.log, self.layer, self.remove_top = log, layer, remove_top
        self.entropy, self.top5, self.config, self.side = entropy, top5, config, side

    def _stats(self, q, k, scale, n_img, lse, entropy, top5):
        if self.config is not None and q.is_cuda:
            from workers.kernels import triton_mass as tm

            return tm.key_mass_stats_triton(q, k, scale, 0, n_img, want_entropy=entropy, want_top5=top5, lse=lse,
                                            config=self.config)
        return key_mass_stats(q, k, scale, 0, n_img, want_entropy=entropy, want_top5=top5, lse=lse)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        n_img = hidden_states.shape[1]
        out, lse = attention_with_lse(q, k, v, attn.scale)
        side = self.side if q.is_cuda else None
        if side is not None:
            side.wait_stream(torch.cuda.current_stream())
            for t in (q, k, lse):
                t.record_stream(side)  # keep them alive until the side stream is done with them
        if self.remove_top:
            # the mass is needed now; entropy (same kernel, free) too; top-5 can go to the side
            st = self._stats(q, k, attn.scale, n_img, lse, self.entropy, self.top5 and side is None)
            if side is not None and self.top5:
                from workers.kernels import triton_mass as tm

                with torch.cuda.stream(side):
                    t5 = tm.top5_concentration(q, k, attn.scale, 0, n_img, lse, config=self.config)
                st = st._replace(top5=t5)
            idx = st.mass.topk(self.remove_top, dim=-1).indices
            out = remove_keys(q, k, v, out, lse, idx, 0, n_img, attn.scale, check=False)
        elif side is not None:
            with torch.cuda.stream(side):
                st = self._stats(q, k, attn.scale, n_img, lse, self.entropy, self.top5)
        else:
            st = self._stats(q, k, attn.scale, n_img, lse, self.entropy, self.top5)
        self.log.append((self.layer, st))  # stays on the device: no host sync per layer
        return _finish(attn, out, hidden_states, encoder_hidden_states)


class LseOnlyProcessor:
    """Attention through the lse-returning op and nothing else: the price of getting the lse."""

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        q, k, v = _project(attn, hidden_states, encoder_hidden_states)
        out, _ = attention_with_lse(q, k, v, attn.scale)
        return _finish(attn, out, hidden_states, encoder_hidden_states)


def paper_style_attention(attn, hidden_states, encoder_hidden_states, pick=None):
    """The released code's approach: fp32 logits and softmax of every query materialised, fp32 stats of the image
    rows, and the keys ``pick(mass, num_keys)`` returns ([B,H,n] indices, or nothing) removed from the image rows
    by a -1e4 logit bias and a second fp32 softmax. Returns the processor output and (mass, entropy, top5)."""
    q, k, v = _project(attn, hidden_states, encoder_hidden_states)
    n_img = hidden_states.shape[1]
    logits = torch.matmul(q.float(), k.float().transpose(-1, -2)) * attn.scale
    a = torch.softmax(logits, dim=-1)
    img = a[:, :, :n_img]
    mass = img.mean(dim=2)
    ent = -(img * torch.log(img + 1e-10)).sum(-1).mean(-1)
    top5 = img.topk(5, dim=-1).values.sum(-1).mean(-1)
    idx = pick(mass, k.shape[2]) if pick is not None else None
    if idx is not None:
        mask = torch.zeros_like(mass).scatter_(-1, idx, 1.0)
        logits[:, :, :n_img] -= 1e4 * mask[:, :, None, :]
        a = torch.softmax(logits, dim=-1)
    out = torch.matmul(a.to(v.dtype), v)
    return _finish(attn, out, hidden_states, encoder_hidden_states), (mass, ent, top5)


class PaperStyleProcessor:
    """`paper_style_attention` with the top `remove_top` keys per head removed (none for 0)."""

    def __init__(self, log: list, layer: int, remove_top: int = 0):
        self.log, self.layer, self.remove_top = log, layer, remove_top

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        pick = (lambda mass, _: mass.topk(self.remove_top, dim=-1).indices) if self.remove_top else None
        out, stats = paper_style_attention(attn, hidden_states, encoder_hidden_states, pick)
        self.log.append((self.layer, stats))
        return out


def build(cfg, device, dtype):
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(0)
    with torch.device(device):
        model = SD3Transformer2DModel(**cfg)
    return model.to(dtype).eval()


def set_processors(model, make):
    """make(layer) -> processor or None (stock)."""
    from diffusers.models.attention_processor import JointAttnProcessor2_0

    for i, block in enumerate(model.transformer_blocks):
        p = make(i)
        block.attn.set_processor(p if p is not None else JointAttnProcessor2_0())


def time_step(model, inputs, device, iters, warmup=2, side=None):
    with torch.inference_mode():
        for _ in range(warmup):
            out = model(**inputs).sample
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            ts = []
            for _ in range(iters):
                a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                a.record()
                out = model(**inputs).sample
                if side is not None:  # the step ends when its side-stream statistics are done too
                    torch.cuda.current_stream().wait_stream(side)
                b.record()
                torch.cuda.synchronize()
                ts.append(a.elapsed_time(b))
            peak = torch.cuda.max_memory_allocated() / 2**30
        else:
            ts = []
            for _ in range(iters):
                t = time.perf_counter()
                out = model(**inputs).sample
                ts.append((time.perf_counter() - t) * 1e3)
            peak = float("nan")
    return statistics.median(ts), min(ts), peak, out


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--iters", type=int, default=10)
    ap.add_argument("--mass-config", default=None, help="the fields of workers.kernels.triton_mass.MassConfig, in order")
    ap.add_argument("--mass-config-from", default=None, help="bench_identification --sweep JSON: take its fastest tiles")
    ap.add_argument("--skip-paper-all", action="store_true", help="skip the slow paper-style all-layer variant")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev = args.device
    dtype = torch.bfloat16 if dev == "cuda" else torch.float32
    cfg = SMALL if args.small else SD3_MEDIUM
    config = None
    if args.mass_config_from and Path(args.mass_config_from).exists():
        sw = json.loads(Path(args.mass_config_from).read_text()).get("sweep", [])
        ok = [s for s in sw if s.get("kernel") == "full" and s["ms"] and s["err"] is not None and s["err"] <= 1e-3]
        if ok:
            args.mass_config = ",".join(str(x) for x in min(ok, key=lambda s: s["ms"])["cfg"])
    if args.mass_config:
        from workers.kernels import triton_mass as tm

        config = tm.MassConfig(*[int(x) for x in args.mass_config.split(",")])
    t0 = time.time()
    model = build(cfg, dev, dtype)
    n_layers = cfg["num_layers"]
    rec_layers = [6, 12, 18] if n_layers == 24 else [1, 2, 3]
    rm_layer = 12 if n_layers == 24 else 2
    side = cfg["sample_size"]
    g = torch.Generator("cpu").manual_seed(1)
    n_txt = 333 if not args.small else 9
    inputs = dict(
        hidden_states=torch.randn(2, cfg["in_channels"], side, side, generator=g).to(dev, dtype),
        encoder_hidden_states=torch.randn(2, n_txt, cfg["joint_attention_dim"], generator=g).to(dev, dtype),
        pooled_projections=torch.randn(2, cfg["pooled_projection_dim"], generator=g).to(dev, dtype),
        timestep=torch.tensor([500.0, 500.0], device=dev),
    )
    info = {
        "device": torch.cuda.get_device_name() if dev == "cuda" else "cpu",
        "torch": torch.__version__,
        "triton": getattr(__import__("importlib").util.find_spec("triton"), "name", None) and __import__("triton").__version__,
        "diffusers": __import__("diffusers").__version__,
        "date": time.strftime("%Y-%m-%d"),
        "build_s": round(time.time() - t0, 1),
        "mass_config": args.mass_config,
        "params_M": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
    }
    print(json.dumps(info), flush=True)

    log: list = []
    side = torch.cuda.Stream() if dev == "cuda" else None
    variants = [
        ("stock diffusers (JointAttnProcessor2_0)", lambda i: None, args.iters),
        ("attention via lse op, no stats (all layers)", lambda i: LseOnlyProcessor(), args.iters),
        (f"fast: stats at {rec_layers} + remove top-1 at {rm_layer}",
         lambda i: FastSinkProcessor(log, i, 1 if i == rm_layer else 0, config=config) if i in rec_layers else None, args.iters),
        (f"fast: stats at {rec_layers}, no removal",
         lambda i: FastSinkProcessor(log, i, 0, config=config) if i in rec_layers else None, args.iters),
        (f"fast: stats all {n_layers} + remove top-1 at {rm_layer}",
         lambda i: FastSinkProcessor(log, i, 1 if i == rm_layer else 0, config=config), args.iters),
        (f"fast: mass+entropy all {n_layers}, top-5 at {rec_layers}, remove top-1 at {rm_layer}",
         lambda i: FastSinkProcessor(log, i, 1 if i == rm_layer else 0, top5=i in rec_layers, config=config), args.iters),
        (f"fast+side stream: stats at {rec_layers} + remove top-1 at {rm_layer}",
         lambda i: FastSinkProcessor(log, i, 1 if i == rm_layer else 0, config=config, side=side) if i in rec_layers else None,
         args.iters),
        (f"fast+side stream: stats all {n_layers} + remove top-1 at {rm_layer}",
         lambda i: FastSinkProcessor(log, i, 1 if i == rm_layer else 0, config=config, side=side), args.iters),
        (f"fast+side stream: mass+entropy all {n_layers}, top-5 at {rec_layers}, remove top-1 at {rm_layer}",
         lambda i: FastSinkProcessor(log, i, 1 if i == rm_layer else 0, top5=i in rec_layers, config=config, side=side),
         args.iters),
        (f"fast: mass only, all {n_layers}",
         lambda i: FastSinkProcessor(log, i, 0, entropy=False, top5=False, config=config), args.iters),
        (f"fast: mass+entropy (no top-5), all {n_layers}",
         lambda i: FastSinkProcessor(log, i, 0, entropy=True, top5=False, config=config), args.iters),
        (f"paper-style: stats at {rec_layers} + remove top-1 at {rm_layer}",
         lambda i: PaperStyleProcessor(log, i, 1 if i == rm_layer else 0) if i in rec_layers else None, max(3, args.iters // 2)),
    ]
    if not args.skip_paper_all:
        variants.append((f"paper-style: all {n_layers} + remove top-1 at {rm_layer}",
                         lambda i: PaperStyleProcessor(log, i, 1 if i == rm_layer else 0), 3))
    rows = []
    ref_out = None
    for name, make, iters in variants:
        set_processors(model, make)
        log.clear()
        try:
            med, best, peak, out = time_step(model, inputs, dev, iters, side=side)
        except Exception as exc:
            print(f"{name}: FAILED {type(exc).__name__}: {exc}", flush=True)
            rows.append(dict(name=name, ms=None))
            continue
        if ref_out is None:
            ref_out = out.float()
        diff = float((out.float() - ref_out).abs().max())
        rows.append(dict(name=name, ms=med, best=best, peak_gib=peak, max_abs_diff_vs_stock=diff, finite=bool(torch.isfinite(out).all())))
        print(f"{name}: {med:.2f} ms (min {best:.2f}), peak {peak:.2f} GiB, max|out-stock| {diff:.3g}", flush=True)
        # sanity: the statistics of the last step are distributions over keys
        for layer, st in log[-len(rec_layers):]:
            m = st[0] if isinstance(st, tuple) else st.mass
            assert torch.allclose(m.sum(-1), torch.ones_like(m.sum(-1)), atol=1e-2), (name, layer, m.sum(-1))
    base = rows[0]["ms"]
    print()
    print(f"{'variant':58s} {'ms':>9s} {'x stock':>8s} {'peak GiB':>9s} {'max|d out|':>10s}")
    for r in rows:
        if r["ms"] is None:
            print(f"{r['name']:58s} {'failed':>9s}")
            continue
        r["ratio"] = r["ms"] / base
        print(f"{r['name']:58s} {r['ms']:9.2f} {r['ratio']:8.3f} {r['peak_gib']:9.2f} {r['max_abs_diff_vs_stock']:10.3g}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(info=info, rows=rows), indent=1))


if __name__ == "__main__":
    main()
