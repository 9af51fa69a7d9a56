"""Extra GPU memory of the sink path against the number of tokens (issue #6: "linear, not quadratic").

    python benchmarks/bench_memory.py [--json out.json] [--small --device cpu]

One joint-attention layer as in bench_identification.py (B=2, H=24, D=64, bf16, 333 text tokens, a planted text
sink), at several image-token counts (SD3 at 512² … 1536²). For each operation: the peak memory it allocates
beyond its inputs (MiB), its time (ms), and the log-log slope of memory against tokens between the smallest and
the largest size (1 = linear, 2 = quadratic). The paper-style identification (fp32 softmax materialised) is the
quadratic contrast. Numbers only; no assertions.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from bench_identification import bench, paper_style, peak_extra_mib  # noqa: E402
from workers.kernels import attention_with_lse, key_mass_stats, remove_keys  # noqa: E402


def layer_inputs(B, H, D, n_img, n_txt, device, dtype):
    torch.manual_seed(0)
    L = n_img + n_txt
    q, k, v = (torch.randn(B, H, L, D, device=device, dtype=dtype) for _ in range(3))
    u = F.normalize(torch.randn(B, H, 1, D, device=device), dim=-1)
    q[:, :, :n_img] += (1.5 * u).to(dtype)
    k[:, :, n_img + 3] = (u[:, :, 0] * 4.0 * D**0.5 / 1.5).to(dtype)
    return q, k, v


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--small", action="store_true", help="tiny shapes (CPU smoke test)")
    ap.add_argument("--sizes", default="1024,2304,4096,6400,9216", help="image tokens (SD3: 512², 768², 1024², 1280², 1536²)")
    ap.add_argument("--paper-max", type=int, default=9216, help="largest size for the paper-style contrast")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    dev, dtype = args.device, torch.bfloat16 if args.device == "cuda" else torch.float32
    B, H, D, n_txt = (2, 24, 64, 333) if not args.small else (1, 2, 64, 17)
    sizes = [int(s) for s in args.sizes.split(",")] if not args.small else [64, 144]
    scale = D**-0.5
    info = dict(device=torch.cuda.get_device_name() if dev == "cuda" else "cpu", torch=torch.__version__,
                date=time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), B=B, H=H, D=D, n_txt=n_txt, dtype=str(dtype))
    print(json.dumps(info))

    ops = {
        "attention + lse (cuDNN)": lambda q, k, v, n, lse, out: attention_with_lse(q, k, v, scale),
        "mass + entropy (lse given)": lambda q, k, v, n, lse, out: key_mass_stats(q, k, scale, 0, n, want_top5=False, lse=lse),
        "mass + entropy + top-5 (lse given)": lambda q, k, v, n, lse, out: key_mass_stats(q, k, scale, 0, n, lse=lse),
        "mass + entropy + top-5, stride 4": lambda q, k, v, n, lse, out: key_mass_stats(q, k, scale, 0, n, lse=lse, top5_query_stride=4),
        "remove top-1 per head (auto)": lambda q, k, v, n, lse, out: remove_keys(
            q, k, v, out, lse, key_mass_stats(q, k, scale, 0, n, want_entropy=False, want_top5=False, lse=lse).mass.topk(1, -1).indices,
            0, n, scale, check=False),
        "paper-style identification (fp32 softmax)": lambda q, k, v, n, lse, out: paper_style(q, k, v, scale, n),
    }
    rows = []
    for n_img in sizes:
        q, k, v = layer_inputs(B, H, D, n_img, n_txt, dev, dtype)
        out, lse = attention_with_lse(q, k, v, scale)
        for name, op in ops.items():
            if name.startswith("paper") and n_img > args.paper_max:
                continue
            fn = (lambda op=op: op(q, k, v, n_img, lse, out))
            try:
                mib, ms = peak_extra_mib(fn, dev), bench(fn, dev, 100)
            except torch.OutOfMemoryError:
                mib, ms = float("nan"), float("nan")
            rows.append(dict(op=name, tokens=n_img + n_txt, image_tokens=n_img, extra_mib=mib, ms=ms))
            print(f"  {n_img + n_txt:6d} tokens  {name:44s} {mib:10.1f} MiB {ms:9.3f} ms", flush=True)
        del q, k, v, out, lse
        if dev == "cuda":
            torch.cuda.empty_cache()

    print(f"\n{'operation':44s} " + " ".join(f"{s + n_txt:>9d}" for s in sizes) + "   slope (MiB vs tokens)")
    for name in ops:
        mine = [r for r in rows if r["op"] == name]
        cells = {r["image_tokens"]: r["extra_mib"] for r in mine}
        line = " ".join(f"{cells[s]:9.1f}" if s in cells else f"{'':>9s}" for s in sizes)
        slope = ""
        if len(mine) >= 2 and all(r["extra_mib"] > 0 for r in (mine[0], mine[-1])):
            slope = f"{math.log(mine[-1]['extra_mib'] / mine[0]['extra_mib']) / math.log(mine[-1]['tokens'] / mine[0]['tokens']):.2f}"
        print(f"{name:44s} {line}   {slope}")
    if args.json:
        Path(args.json).write_text(json.dumps(dict(info=info, rows=rows), indent=1))


if __name__ == "__main__":
    main()
