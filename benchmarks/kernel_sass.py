"""Instruction counts of the statistics kernels' inner loops, without a GPU (the cost model in RESULTS.md).

    python benchmarks/kernel_sass.py [--arch 90]

Compiles `_colmass_kernel` (mass + entropy, with and without the top-5 group maxima) for sm_<arch> with the installed Triton, specialised as
the SD3-medium 1024² launch specialises them (bf16, unit inner strides, 16-divisible sizes), then disassembles the
cubin with the `cuobjdump` that Triton ships and prints registers and, per loop, the SASS instruction histogram.
Counts depend on the Triton version: the GPU machine has 3.6 (`pip install --target DIR triton==3.6.0` and put DIR
first on PYTHONPATH to match it).
"""

from __future__ import annotations

import argparse
import collections
import re
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource  # noqa: E402

from workers.kernels import triton_mass as tm  # noqa: E402

CUOBJDUMP = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / "cuobjdump"
_ADDR = re.compile(r"\s*/\*([0-9a-f]{4,})\*/")


def compile_sm(kernel, args: dict, constexprs: dict, arch: int, num_warps: int, num_stages: int):
    """Compile like a launch would: pointers as '*dtype' strings (16-byte aligned), ints equal to 1 become
    constants, ints divisible by 16 get the divisibility hint."""
    sig, consts, attrs = {}, dict(constexprs), {}
    for i, name in enumerate(kernel.arg_names):
        if name in constexprs:
            sig[name] = "constexpr"
            continue
        v = args[name]
        if isinstance(v, str):
            sig[name], attrs[(i,)] = v, [["tt.divisibility", 16]]
        elif isinstance(v, float):
            sig[name] = "fp32"
        elif v == 1:
            sig[name], consts[name] = "constexpr", 1
        else:
            sig[name] = "i32"
            if v % 16 == 0:
                attrs[(i,)] = [["tt.divisibility", 16]]
    target = GPUTarget("cuda", arch, 32)
    opts = triton.compiler.make_backend(target).parse_options(dict(num_warps=num_warps, num_stages=num_stages))
    return triton.compile(ASTSource(fn=kernel, signature=sig, constexprs=consts, attrs=attrs), target=target, options=opts.__dict__)


def loop_histograms(cubin: bytes) -> tuple[str, list[tuple[int, collections.Counter]]]:
    """Registers line and, per backward branch (a loop), its instruction count and opcode histogram."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        res = subprocess.run([str(CUOBJDUMP), "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
        sass = subprocess.run([str(CUOBJDUMP), "-sass", f.name], capture_output=True, text=True).stdout
    regs = re.search(r"REG:\d+.*?LOCAL:\d+", res)
    lines = [(int(m.group(1), 16), line) for line in sass.splitlines() if (m := _ADDR.match(line))]
    loops = []
    for addr, line in lines:
        b = re.search(r"BRA (?:0x)?([0-9a-f]+)", line)
        if b and int(b.group(1), 16) < addr:
            start = int(b.group(1), 16)
            ops = collections.Counter(
                re.sub(r"^\s*/\*[0-9a-f]+\*/\s*(@!?U?P\w+\s+)?", "", l).split()[0].split(".")[0]
                for a, l in lines if start <= a <= addr)
            loops.append((sum(ops.values()), ops))
    return (regs.group(0) if regs else "?"), loops


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--arch", type=int, default=90)
    args = ap.parse_args()
    H, nq, lk, d = 24, 4096, 4429, 64
    strides = dict(s_qb=lk * H * d, s_qh=d, s_qm=H * d, s_qd=1, s_kb=lk * H * d, s_kh=d, s_kn=H * d, s_kd=1,
                   s_lb=H * lk, s_lh=lk, s_lm=1, H=H, q_start=0, l_start=0, n_q=nq, Lk=lk, qk_scale2=0.18)
    col = dict(strides, Q="*bf16", K="*bf16", LSE="*fp32", MASS="*fp32", ENT="*fp32", GMAX="*fp32",
               n_kblocks=70, inv_nq=1.0 / nq)
    print(f"triton {triton.__version__}, sm_{args.arch}; SD3-medium 1024² layer, bf16; per loop: SASS instructions (top opcodes)")
    for gmax in (False, True):
        cfg = tm.MassConfig()
        c = compile_sm(tm._colmass_kernel, col, dict(WANT_ENT=True, WANT_GMAX=gmax, GROUP=cfg.group, BLOCK_M=cfg.col_block_m,
                                                      BLOCK_N=cfg.col_block_n, HEAD_D=d, PREC="tf32", EVEN_M=True),
                       args.arch, cfg.col_warps, cfg.col_stages)
        regs, loops = loop_histograms(c.asm["cubin"])
        pairs = cfg.col_block_m * cfg.col_block_n // (32 * cfg.col_warps)
        print(f"_colmass_kernel mass+entropy{' + group maxima' if gmax else ''} [{cfg.col_block_m}x{cfg.col_block_n}, "
              f"{cfg.col_warps} warps]: {regs}; {pairs} pairs per thread per iteration")
        for n, ops in loops:
            print(f"  loop: {n} instr: " + " ".join(f"{k}:{v}" for k, v in ops.most_common(10)))


if __name__ == "__main__":
    main()
