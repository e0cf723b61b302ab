"""Tolerances of the parity tests (fused backend vs the reference), derived here once.

Why fused may differ from the reference at all
----------------------------------------------
Both compute the same sequence of fp32 operations on the same fp32 inputs (a bf16/fp16 value widens to fp32
exactly). The kernels use IEEE-rounded division and square root, no FMA contraction by the compiler, an explicit
FMA exactly where torch's kernels use one (``lerp``, ``addcmul``, ``add(alpha=)``; measured on torch 2.13 CPU:
those three match a single-rounding FMA on 100% of 10^5 inputs, ``addcdiv`` matches two roundings), and compute
the scalar coefficients (bias corrections, step size, decay factor) in fp64 rounded once to fp32, as torch does
on the host. Remaining differences come from torch's side: its CPU ``sqrt`` is not correctly rounded (one ulp off
IEEE on ~17% of fp32 inputs in torch 2.13, measured), and CUDA divides by a host scalar as a multiplication by
its reciprocal. Each changes one operation's result by at most 1 ulp (eps32 = 2^-24 relative). Measured: after
20 steps, fp32 states agree bitwise and params within 2 ulps.

Matching torch's FMAs is not cosmetic. Where g ~ -lambda*theta the L2 gradient cancels to |g + lambda*theta| ~ eps
and the update's sensitivity d u / d g = lr * eps / (|g| + eps)^2 reaches lr / eps = 10^6 lr: one ulp of
difference in that sum moves the param by up to lr. The bf16/fp16 parity tests hit such elements.

fp32 params (and fp32 master weights)
-------------------------------------
Per step, the moments m and v pass through ~3 rounded operations each, so they can differ by ~3 eps32 |m|,
|v| per step, errors of earlier steps decaying by beta < 1 (bounded here by not decaying: a factor N). The update
u = step_size * m / (sqrt(v) / c + eps) passes through ~5 more operations, and Adam's update is bounded by
|u| <= lr * (1 - beta1) / sqrt(1 - beta2) when 1 - beta1 > sqrt(1 - beta2), and by lr otherwise (Kingma & Ba
2015, section 2.1); we use lr * 10 as the bound for every beta of the test table. The param sum theta + u rounds
once more (ulp(theta) / 2 <= eps32 |theta|). Over N steps, with errors adding up in the worst case:

    |d theta| <= sum over steps of (8 eps32 * 10 lr_t + eps32 * max|theta|)   (+ the L2 term below)
    |d m|     <= N * 3 eps32 * max|m|,   |d v| <= N * 3 eps32 * max|v|

An L2 weight decay (Adam) adds lambda * d theta to the gradient, i.e. to m: +N * lambda * max|d theta|.

bf16 / fp16 params without master weights
-----------------------------------------
The param is rounded to its storage dtype every step. Fused and reference round the same fp32 value unless
their fp32 values (a few eps32 apart) straddle a rounding boundary of the storage dtype: probability about
2^-24 * 8 / 2^-8 = 2^-13 (bf16) per element and step. Once apart by one ulp of the storage dtype, both keep
adding nearly the same update, so the gap persists but does not grow; a second straddle on the same element in
20 steps has probability ~20 * 2^-13 = 2^-8.6, so for the few hundred elements that straddle once we allow it:
2 ulps of the storage dtype. The fp32 states do not depend on theta except through the L2 term.

bf16 / fp16 params with fp32 master weights
--------------------------------------------
The master follows the fp32 bound; the param is the master rounded once: 1 ulp of the storage dtype.
"""
from __future__ import annotations

import torch

EPS32 = 2.0 ** -24
UPDATE_BOUND = 10.0  # |u| <= UPDATE_BOUND * lr, see above


def ulp(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Spacing of ``dtype`` numbers at |x| (fp32 tensor), with subnormal spacing at the bottom."""
    info = torch.finfo(dtype)
    mant = {torch.float32: 23, torch.bfloat16: 7, torch.float16: 10, torch.float64: 52}[dtype]
    ax = x.abs().float().clamp_min(info.smallest_normal)
    return torch.exp2(torch.floor(torch.log2(ax)) - mant)


def theta_atol(lrs, max_abs_theta: float) -> float:
    """The fp32 param bound over steps with learning rates ``lrs`` (the sum of the per-step bounds)."""
    return sum(8 * EPS32 * UPDATE_BOUND * lr + EPS32 * max_abs_theta for lr in lrs)


def state_atol(steps: int, max_abs: float) -> float:
    return steps * 3 * EPS32 * max_abs


def assert_close_atol(actual: torch.Tensor, expected: torch.Tensor, atol: float, what: str) -> None:
    torch.testing.assert_close(actual.double(), expected.double(), rtol=0.0, atol=atol,
                               msg=lambda m: f"{what}: {m}")


def assert_within_ulps(actual: torch.Tensor, expected: torch.Tensor, max_ulps: int, what: str) -> None:
    """|actual - expected| <= max_ulps ulps of the stored dtype at |expected|, elementwise."""
    assert actual.dtype == expected.dtype, (actual.dtype, expected.dtype)
    a, e = actual.float(), expected.float()
    gap = (a - e).abs() / ulp(torch.maximum(a.abs(), e.abs()), actual.dtype)
    worst = gap.max().item() if gap.numel() else 0.0
    assert worst <= max_ulps, f"{what}: {worst:.0f} ulps of {actual.dtype} apart (allowed {max_ulps})"


def param_ulps(dtype: torch.dtype, master: bool) -> int:
    """Allowed gap of a bf16/fp16 param, in ulps of its dtype (see the module docstring)."""
    return 1 if master else 2
