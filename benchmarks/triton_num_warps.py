#!/usr/bin/env python3
"""Triton AdamW, LAMB and Adafactor step time on the GPT-2-small list against the shape of a program (a probe).

    python benchmarks/triton_num_warps.py [--shapes 8x1024 4x1024 4x4096 8x4096 16x4096]

A shape WxS is W warps per program walking its 4096-element block in pieces of S elements
(kernels/engine.BLOCK_WARPS and SUB_BLOCK; the default is 8x1024, the native CUDA engine's 256 threads x 4
elements). On the H100 (2026-11-23) the triton backend, then 4x4096 (254-255 registers per thread: two programs per
SM), reached 0.918 of copy bandwidth for AdamW and 0.810 for LAMB, where the native CUDA kernels reached 0.975 and
0.978 with the same block map. This probe times the Triton kernels at each shape in one process, with torch's fused
AdamW and the native backend as references, each as the median of ``triton.testing.do_bench``. Not part of the
sweep: it changes globals of the engine. A shape sums LAMB's norms in a chain of (4096 / S - 1) + S / (32 W) +
log2(min(S, 32 W)) additions per block at most (the first piece adds to zero), within the 39 that
fused_optim/testing.py's bounds assume for every shape listed here (4x4096: 0 + 32 + 7). ``--tile-warps`` times
the Adafactor tile passes at other warps per 32 x 128 tile (kernels/engine.TILE_WARPS; 4 spilled registers with odd
column counts on sm_90, 8 does not); Adafactor's bounds do not depend on the order of its sums.
"""
from __future__ import annotations

import argparse

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", nargs="+", default=["8x1024", "4x1024", "4x4096", "8x4096", "16x4096"],
                    help="WARPSxSUB program shapes")
    ap.add_argument("--tile-warps", type=int, nargs="+", default=[8, 4],
                    help="warps per Adafactor tile program (kernels/engine.TILE_WARPS)")
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    import triton

    import fused_optim
    from fused_optim.bench import OPTIMIZERS
    from fused_optim.bench.harness import DTYPES, gpt2_small_shapes, workload_bytes
    from fused_optim.kernels import engine

    dev = torch.device("cuda")
    shapes = gpt2_small_shapes()

    def make():
        ps = [torch.randn(s, device=dev).requires_grad_() for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    n = sum(torch.Size(s).numel() for s in shapes)
    adamw_bytes, lamb_bytes, adafactor_bytes = (workload_bytes(OPTIMIZERS[name], DTYPES["fp32"], shapes)[0]
                                                for name in ("adamw", "lamb", "adafactor"))
    x = torch.empty(512 * 2**20 // 4, device=dev)
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    copy_gbps = 2 * x.numel() * 4 / copy_ms / 1e6
    print(f"device {torch.cuda.get_device_name()}; copy {copy_gbps:.0f} GB/s; {n / 1e6:.1f}M params")

    def report(name, opt, bytes_per_param):
        ms = triton.testing.do_bench(opt.step, warmup=50, rep=400, return_mode="median")
        print(f"{name:<24s} {ms:8.3f} ms  bw_fraction {bytes_per_param * n / ms / 1e6 / copy_gbps:.3f}", flush=True)

    report("torch fused adamw", torch.optim.AdamW(make(), lr=1e-3, fused=True), adamw_bytes)
    report("native adamw", fused_optim.FusedAdamW(make(), lr=1e-3, backend="native"), adamw_bytes)
    report("native lamb", fused_optim.FusedLAMB(make(), lr=1e-3, backend="native"), lamb_bytes)
    default = engine.BLOCK_WARPS, engine.SUB_BLOCK
    try:
        for shape in args.shapes:
            warps, sub = (int(x) for x in shape.split("x"))
            engine.BLOCK_WARPS, engine.SUB_BLOCK = warps, sub
            report(f"triton adamw {shape}", fused_optim.FusedAdamW(make(), lr=1e-3, backend="triton"), adamw_bytes)
            report(f"triton lamb {shape}", fused_optim.FusedLAMB(make(), lr=1e-3, backend="triton"), lamb_bytes)
    finally:
        engine.BLOCK_WARPS, engine.SUB_BLOCK = default
    report("native adafactor", fused_optim.FusedAdafactor(make(), backend="native"), adafactor_bytes)
    default_tile = engine.TILE_WARPS
    try:
        for warps in args.tile_warps:
            engine.TILE_WARPS = warps
            report(f"triton adafactor {warps}w", fused_optim.FusedAdafactor(make(), backend="triton"), adafactor_bytes)
    finally:
        engine.TILE_WARPS = default_tile
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
