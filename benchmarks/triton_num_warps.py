#!/usr/bin/env python3
"""Triton AdamW and LAMB step time on the GPT-2-small list against the warps per program (a tuning probe).

    python benchmarks/triton_num_warps.py [--warps 4 8 16]

On the H100 (2026-11-23) the triton backend reached 0.918 of copy bandwidth for AdamW and 0.810 for LAMB, where
the native CUDA kernels reached 0.975 and 0.978 with the same block map: this probe times the Triton kernels at
other ``num_warps`` (kernels/engine.NUM_WARPS) in one process, with torch's fused AdamW and the native backend as
references, each as the median of ``triton.testing.do_bench``. Not part of the sweep: it changes a global of the
engine. LAMB's per-block sums are reduced in an order that depends on the warps per program; the tests' LAMB bounds
assume 4 warps (fused_optim/testing.py LAMB_THREADS), so a change of NUM_WARPS goes with that constant.
"""
from __future__ import annotations

import argparse

import torch


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--warps", type=int, nargs="+", default=[4, 8, 16])
    args = ap.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA device")
        return 2
    import triton

    import fused_optim
    from fused_optim.bench.harness import gpt2_small_shapes
    from fused_optim.kernels import engine

    dev = torch.device("cuda")
    shapes = gpt2_small_shapes()

    def make():
        ps = [torch.randn(s, device=dev).requires_grad_() for s in shapes]
        for p in ps:
            p.grad = torch.randn_like(p)
        return ps

    n = sum(torch.Size(s).numel() for s in shapes)
    x = torch.empty(512 * 2**20 // 4, device=dev)
    y = torch.empty_like(x)
    copy_ms = triton.testing.do_bench(lambda: y.copy_(x), warmup=50, rep=300, return_mode="median")
    copy_gbps = 2 * x.numel() * 4 / copy_ms / 1e6
    print(f"device {torch.cuda.get_device_name()}; copy {copy_gbps:.0f} GB/s; {n / 1e6:.1f}M params")

    def report(name, opt, bytes_per_param):
        ms = triton.testing.do_bench(opt.step, warmup=50, rep=400, return_mode="median")
        print(f"{name:<24s} {ms:8.3f} ms  bw_fraction {bytes_per_param * n / ms / 1e6 / copy_gbps:.3f}", flush=True)

    report("torch fused adamw", torch.optim.AdamW(make(), lr=1e-3, fused=True), 28)
    report("native adamw", fused_optim.FusedAdamW(make(), lr=1e-3, backend="native"), 28)
    report("native lamb", fused_optim.FusedLAMB(make(), lr=1e-3, backend="native"), 40)
    default = engine.NUM_WARPS
    try:
        for warps in args.warps:
            engine.NUM_WARPS = warps
            report(f"triton adamw warps={warps}", fused_optim.FusedAdamW(make(), lr=1e-3, backend="triton"), 28)
            report(f"triton lamb warps={warps}", fused_optim.FusedLAMB(make(), lr=1e-3, backend="triton"), 40)
    finally:
        engine.NUM_WARPS = default
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
