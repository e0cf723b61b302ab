"""CPU speed of the native backend: FusedAdamW(backend="native") against torch.optim.AdamW, same run.

    python benchmarks/native_cpu.py                       # ~20M fp32 params in 60 tensors, all CPU threads
    python benchmarks/native_cpu.py --params 5e6 --tensors 1000 --steps 20

Providers: torch.optim.AdamW(foreach=True), torch.optim.AdamW(fused=True), FusedAdamW(backend="native") with the
CPU engine's runtime-selected ISA, and the same forced to the baseline ISA (FUSED_OPTIM_CPU_ISA=baseline: no FMA
instruction on x86-64, so every FMA is a libm call). Each provider gets its own copy of the same params and grads;
the providers take turns, one step each per round, and the time is the median of --steps rounds after --warmup
(time.perf_counter around step()).

Byte model (fp32 params and grads): read p, g, m, v and write p, m, v = 28 bytes per param per step; the GB/s
column is 28 * params / time. The denominator measured in the same run is torch.add(a, b, out=c) over as many
fp32 elements (12 bytes per element): what this machine's memory gives a simple streaming kernel.
The issue's goal: native >= 3x torch's foreach AdamW on ~20M params in ~60 tensors.
"""
from __future__ import annotations

import argparse
import os
import platform
import statistics
import time

import torch

import fused_optim
from fused_optim import native

BYTES_PER_PARAM = 28


def shapes(total: int, count: int) -> list:
    """`count` tensor sizes summing to about `total`, spread over two orders of magnitude like a model's layers."""
    g = torch.Generator().manual_seed(0)
    weights = torch.exp(torch.empty(count).uniform_(0, 4.6, generator=g))  # e^0 .. e^4.6: 1x .. 100x
    sizes = (weights / weights.sum() * total).round().long().clamp_min(1)
    return [int(s) for s in sizes]


def make(sizes, seed=0):
    g = torch.Generator().manual_seed(seed)
    params = [torch.randn(n, generator=g).requires_grad_() for n in sizes]
    for p in params:
        p.grad = torch.randn(p.shape, generator=g)
    return params


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--params", type=float, default=20e6)
    ap.add_argument("--tensors", type=int, default=60)
    ap.add_argument("--steps", type=int, default=15)
    ap.add_argument("--warmup", type=int, default=3)
    args = ap.parse_args()

    sizes = shapes(int(args.params), args.tensors)
    n = sum(sizes)
    kw = dict(lr=1e-3, weight_decay=0.01)
    makers = {
        "torch AdamW foreach": lambda ps: torch.optim.AdamW(ps, foreach=True, **kw),
        "torch AdamW fused": lambda ps: torch.optim.AdamW(ps, fused=True, **kw),
        "native": lambda ps: fused_optim.FusedAdamW(ps, backend="native", **kw),
        "native (baseline ISA)": lambda ps: fused_optim.FusedAdamW(ps, backend="native", **kw),
    }
    print(f"{len(sizes)} tensors, {n / 1e6:.1f}M fp32 params; torch {torch.__version__}, "
          f"{torch.get_num_threads()} threads, {platform.processor() or platform.machine()}; "
          f"native: {native.info()}")

    def isa(name):
        if "ISA)" in name:
            os.environ["FUSED_OPTIM_CPU_ISA"] = name.split("(")[1].split()[0]
        else:
            os.environ.pop("FUSED_OPTIM_CPU_ISA", None)

    steps = {}
    for name, make_opt in makers.items():
        params = make(sizes)
        steps[name] = make_opt(params).step
    a, b, c = torch.randn(n), torch.randn(n), torch.empty(n)
    steps["torch.add (bandwidth)"] = lambda: torch.add(a, b, out=c)
    # Round-robin: one timed call of each provider per round, so that load from other processes on a shared
    # machine falls on all of them alike; the median over rounds is reported.
    times = {name: [] for name in steps}
    for r in range(args.warmup + args.steps):
        for name, step in steps.items():
            isa(name)
            t0 = time.perf_counter()
            step()
            if r >= args.warmup:
                times[name].append(time.perf_counter() - t0)
    os.environ.pop("FUSED_OPTIM_CPU_ISA", None)

    med = {name: statistics.median(ts) for name, ts in times.items()}
    stream = 12 * n / med.pop("torch.add (bandwidth)") / 1e9
    base = med["torch AdamW foreach"]
    print(f"{'provider':<24} {'ms/step':>9} {'GB/s':>7} {'% of add':>9} {'vs foreach':>11}")
    for name, t in med.items():
        gbs = BYTES_PER_PARAM * n / t / 1e9
        print(f"{name:<24} {t * 1e3:9.1f} {gbs:7.2f} {100 * gbs / stream:8.0f}% {base / t:10.2f}x")
    print(f"(torch.add streams {stream:.2f} GB/s on {n / 1e6:.1f}M fp32 elements, 12 B each; medians of "
          f"{args.steps} round-robin rounds after {args.warmup})")


if __name__ == "__main__":
    main()
