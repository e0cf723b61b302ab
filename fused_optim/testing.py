"""Comparing a fused backend with the reference path: the tolerances, derived here once.

Used by the test suite (tests/tolerances.py re-exports this module) and by ``python -m fused_optim check``; users
checking fused results against the reference can use the same functions.

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
their fp32 values (an ulp or so of fp32 apart) straddle a rounding boundary of the storage dtype: probability
p ~ 2^-24 / 2^-8 = 2^-16 (bf16) per element and step. Once apart by one ulp u of the storage dtype, both keep
adding the same update; the grid is translation invariant within a binade, so the gap stays exactly u in absolute
terms (the decay factor 1 - lr*lambda can shrink it to 0). It does not stay one ulp when the value moves to a
smaller binade, where ulps are finer: so the gap is measured in ulps at the element's largest magnitude over the
run, max_t |theta_t| (the reference's trajectory, tracked by ``run_parity``). Two straddles of one element in 20
steps: expected 190 p^2 n ~ 3e-9 n elements, i.e. a few in a 10^9-param model, none in the test sizes; three:
~ 1140 p^3 n, never. Bound: 2 ulps at max_t |theta_t|. The fp32 states do not depend on theta except through the
L2 term.

bf16 / fp16 params with fp32 master weights
--------------------------------------------
The master follows the fp32 bound; the param is the master rounded once: 1 ulp of the storage dtype (at the
current magnitude, hence also at max_t |theta_t|).
"""
from __future__ import annotations

import math
from typing import NamedTuple

import numpy as np
import torch

__all__ = ["ulp", "theta_atol", "state_atol", "assert_close_atol", "assert_within_ulps", "param_ulps",
           "assert_same_nonfinite", "run_parity",
           "adam_parity_checks", "BIG_LR_STEPS", "ParityRun",
           "ADAFACTOR_NOTES", "sum_gap", "adafactor_gaps", "adafactor_parity",
           "LAMB_THREADS", "LAMB_K_U", "reduction_depth", "sum_sq_rel", "n_blocks", "lamb_clip_gap", "norm_f64",
           "global_clip_f64", "lamb_step_f64", "lamb_moment_bounds", "lamb_theta_bound", "worst_row", "lamb_parity"]

EPS32 = 2.0 ** -24
EPS64 = 2.0 ** -53
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


def assert_same_nonfinite(actual: torch.Tensor, expected: torch.Tensor, what: str) -> torch.Tensor:
    """NaN, +inf and -inf at exactly the elements where ``expected`` has them: no tolerance applies to these. Returns
    the mask of the finite elements, for the caller's tolerance on the rest."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)}, expected {tuple(expected.shape)}"
    for name, test in (("NaN", torch.isnan), ("+inf", torch.isposinf), ("-inf", torch.isneginf)):
        a, e = test(actual), test(expected)
        assert torch.equal(a, e), f"{what}: {name} at {a.nonzero().tolist()}, expected at {e.nonzero().tolist()}"
    return torch.isfinite(expected)



# ================================================================================================================
# Adafactor (tests/test_adafactor.py)
# ================================================================================================================
ADAFACTOR_NOTES = """Adafactor: why fused and reference differ, and by how much (fp32 math; u = EPS32 = 2^-24).

The kernels (kernels/adafactor.py) perform the reference's fp32 operations in the reference's order, with its
FMAs, and form every scalar (ρ, α, β̂2, the clipped scale, the decay coefficient) in fp64 from the same fp32
inputs, as the reference does. What differs is the order of five sums of *positive* terms: the row sums and
column sums of g² + ε1, ΣR (for mean R), Σθ² (RMS θ) and ΣU² (RMS U). The kernel adds per-tile tree sums in a
fixed order, torch adds in its own vectorized order. In any order, a sum of k positive terms carries a relative
error of at most (k - 1) u, so the two results differ by at most

    sum_gap(k) = 2 (k - 1) u                                                    (relative)

Each later fp32 operation rounds both sides once: +2u relative per operation on positive values (its two
results are each within u of exact values that differ by the propagated relative gap). torch's CPU sqrt is not
always correctly rounded (module docstring: one ulp on ~17% of inputs) and its rsqrt is not 1 / sqrt (measured
on torch 2.13: 1.5u from exact, unequal on 13% of inputs; the kernels' 1 / sqrt: 2u): +2u more for each square
root. With t the step and a factored tensor of n x m matrices (row means over m columns, column means over n
rows):

    mean of a row:           δ = sum_gap(m) + 2u            (a column: n)
    R_t = β̂R + (1-β̂)·mean:   δR_t ≤ max(δR_{t-1}, δmean) + 4u      ->  δR_t ≤ δmean + 4u·t
    mean(R_t) = ΣR / n:       δ ≤ δR_t + sum_gap(n) + 2u
    rsqrt(R / mean R):        δ ≤ ½(δR_t + δmean(R) + 2u) + 6u     (divide, sqrt, 1/x; ½: the square root)
    rsqrt(C):                 δ ≤ ½ δC_t + 6u
    U = (r ⊗ c)·g:            δU ≤ δr + δc + 4u
    flat (rank 0/1) tensors:  δV_t ≤ 4u·t (identical operations on identical inputs; the 4u·t only covers
                              torch's add(alpha=) not being one FMA on another CPU), δU ≤ ½δV_t + 8u
    RMS(U) = sqrt(ΣU² / N):   δ ≤ ½(2δU + sum_gap(N) + 2u) + 2u
    RMS(θ):                   δ ≤ ½(sum_gap(N) + gap(Σθ²)) + 2u     (gap(Σθ²): of the params themselves, measured)
    α = ρ·max(ε2, RMS θ):     δα ≤ δRMS(θ) + 2u                         (0 without scale_parameter)
    scale = α / max(1, RMS(U)/d):  δ ≤ δα + δRMS(U) + 2u
    update = U·scale:         δu ≤ δU + δscale + 2u

Relative bounds turn absolute with the reference's own magnitudes at that step (a property of the trajectory,
recorded by the test, not of the result under test): |u_t| ≤ max|θ_t - θ_{t-1}| + λα_t max|θ_{t-1}|
without momentum, |u_t| ≤ (max|m_t| + β1 max|m_{t-1}|) / (1 - β1) with it. Per step, the gaps may grow by

    momentum:  gap(m_t) ≤ β1 gap(m_{t-1}) + (1 - β1) δu |u_t| + 4u max|m_t|
    param:     gap(θ_t) ≤ (1 + λα_t) gap(θ_{t-1}) + λα_t δα max|θ_{t-1}| + gap(update_t) + 4u max|θ|

(the last terms: two roundings, β1·m and the FMA, or the decay FMA and θ - update; rounding two different
inputs adds at most one ulp, ≤ 2u |x|, to their gap, per operation)

and the test checks these increments at every step, on fp32 params and master weights (bf16/fp16 params are
compared in ulps of their dtype, as for Adam: param_ulps). A formula error moves a param by a sizeable fraction
of |u_t| per step; the worst-case sum gaps above are ~2·4096 u ≈ 5e-4 of |u_t| for the largest test tensor.
"""


def sum_gap(k: int) -> float:
    """Relative gap between two fp32 sums of the same k positive terms in different orders."""
    return 2.0 * max(k - 1, 0) * EPS32


def adafactor_gaps(shape, t: int, *, theta_sq_gap: float = 0.0, scale_parameter: bool = True) -> dict:
    """Relative gaps (fused vs reference) at step ``t`` of one tensor of ``shape``: ``row``/``col`` (R_t, C_t),
    ``V`` (V_t), ``alpha``, ``update`` (the scaled update before momentum). ``theta_sq_gap``: the relative gap
    between Σθ² of the two params before this step, measured exactly (fp64) by the test: 0 while they agree
    bitwise; a bf16 param one ulp apart on a few elements moves it by about that few ulps over N."""
    u = EPS32
    numel = 1
    for d in shape:
        numel *= d
    out = {}
    if len(shape) >= 2:
        n, m = shape[-2], shape[-1]
        out["row"] = sum_gap(m) + 2 * u + 4 * u * t
        out["col"] = sum_gap(n) + 2 * u + 4 * u * t
        mean_r = out["row"] + sum_gap(n) + 2 * u
        d_u = (0.5 * (out["row"] + mean_r + 2 * u) + 6 * u) + (0.5 * out["col"] + 6 * u) + 4 * u
    else:
        out["V"] = 4 * u * t
        d_u = 0.5 * out["V"] + 8 * u
    rms_u = 0.5 * (2 * d_u + sum_gap(numel) + 2 * u) + 2 * u
    out["alpha"] = (0.5 * (sum_gap(numel) + theta_sq_gap) + 4 * u) if scale_parameter else 0.0
    out["update"] = d_u + out["alpha"] + rms_u + 4 * u
    return out


# ----------------------------------------------------------------------------------------------------------------
# LAMB (tests/test_lamb.py; ``python -m fused_optim check``)
# ----------------------------------------------------------------------------------------------------------------
# LAMB's update is Adam's element math times a per-tensor ratio of norms: r = ||theta|| / ||u||. The element
# math of the kernel and the reference is the same sequence of fp32 operations (as Adam's, see
# fused_optim/testing.py); the norms are float64 sums of squares on both sides, added in different orders: the
# reference in torch's (vector_norm(dtype=float64), sum), the kernel in a fixed tree of its own. So the parity
# tests bound each norm's summation error and propagate it.
#
# Summation. Both sides widen each fp32 value to float64 and square it there, exactly: a 24-bit significand
# squared fits in float64's 53 bits, and 2^-298 <= x^2 <= 2^256 for every non-zero finite fp32 x, inside float64's
# normal range (an fp32 square overflows from |x| ~ 1.8e19 and vanishes below ~2.6e-23: why the kernels no longer
# square in fp32). Only the additions round, each by at most eps64 = 2^-53 relative. For a sum of non-negative
# terms in which no term passes through more than d additions, |S~ - S| <= d eps64 S to first order (Higham,
# "Accuracy and Stability of Numerical Algorithms", 2nd ed., section 4.2). The kernel's d: each block of
# BLOCK = 4096 elements is summed in an order fixed by its engine (csrc/engine.h, kernels/engine.py); the deepest
# is the native CPU engine's: 128 lanes, each adding its 32 elements in sequence, then a 7-level tree over the
# lanes, a depth of 32 + 7 = 39 additions. The others are shallower: the Triton kernels walk a block in 4 pieces of
# 1,024 elements, each lane adding its element of every piece (3 roundings: the first adds to zero), then
# ``tl.sum`` over the 1,024 lanes in 256 threads (4 per thread, then 5 + 3 levels of warp butterfly and cross-warp
# tree): 15 (the interpreter's numpy pairwise sum is shallower still); the native CUDA engine, 256 threads of 16
# elements (17 with a tensor's tail) then an 8-level tree: at most 25. ``segment_sum`` adds a tensor's n_b block
# partials: ceil(n_b / 1024) additions per lane of its 1024-wide accumulator, then a tree over 1024 lanes (at most
# 8 + 7 in Triton's tl.sum, 10 in the native one): d_k = 39 + ceil(n_b / 1024) + 15 for every backend. The
# reference's d: torch's order is its own, but no term of a sum of n terms passes through more than n - 1
# additions, and n <= 4096 n_b; the global Σg² adds each grad's sum, then the buckets' (at most n_b each): d_r <=
# 4098 n_b. So the kernel's and the reference's sums of the same squares differ by at most (d_k + d_r) eps64
# relative, each norm by half that (sqrt halves a relative error), and a ratio of two norms by the sum of the two
# halves plus the roundings of its fp64 square roots and division (3 on each side; c = kappa / G has 2):
#     |S~ / S~_ref - 1|,  |r~ / r~_ref - 1|  <=  sum_sq_rel(n_b) = (d_k + d_r + 6) eps64
# 5.0e-10 for 1,101 blocks (4.5M elements, the GPU test), 4.6e-13 for one block, against 6e-8 for one fp32
# rounding: the norms hardly count next to the element math. (While the kernels summed fp32 squares, the bound was
# (1 + d_k) eps32, 3.3e-6 for one block.)
#
# Direction. Kernel and reference compute u_i = a_i + lambda theta_i, a = m^ / (sqrt(v^) + eps), from the same
# fp32 m, v, theta. Counting the largest difference per operation (torch's CPU sqrt may be 1 ulp off, CUDA divides
# by a host scalar through its reciprocal; 1 ulp = 2 eps32 relative), a differs by <= 11.5 eps32 |a| and the fused
# u_i = fma(lambda, theta_i, a_i) by <= K_U eps32 (|a_i| + lambda |theta_i|), K_U = 14: relative to |a| + lambda|theta|
# and not to |u|, because u may cancel.
#
# Ratio. r~ / r - 1 <= rho = sum_sq_rel(n_b) + K_U eps32 || |a| + lambda |theta| || / ||u||  (the two norms'
# summation gaps and the fp64 roundings of the ratio, from the float64 sums on both sides; first order). A
# trust_clip clamp is 1-Lipschitz, and r = 1 (no adaptation, or a zero norm) is exact on both sides.
#
# Update. theta' = fma(-(gamma r) rounded to fp32, u_i, theta_i) on both sides, so one step from the same state:
#     |theta'~_i - theta'_i| <= gamma r K_U eps32 (|a_i| + lambda |theta_i|) + gamma r |u_i| (rho + 2 eps32)
#                               + 2 eps32 |theta'_i|
# (the coefficient's fp32 rounding: 2 eps32; each side's final rounding: eps32 |theta'|). The moments do not depend
# on theta and agree as Adam's do: 3 eps32 max|m| per step. ``lamb_parity(resync=True)`` checks this one-step bound
# at every step, starting each step from the same state (the fused one copied into the reference); 20 steps of it
# are still 20 steps of evolving moments. A bf16/fp16 param (or a master rounded to one) adds one ulp of its dtype:
# both sides round values within the bound above. All bounds are first order, evaluated at float64 magnitudes
# (``lamb_step_f64`` of the state before the step), times 1 + 1e-3 for the neglected products of two gaps (each
# gap is < 1e-4 relative).
#
# Global norm (max_grad_norm). G^2 is one segment over every block of a bucket, in float64 on both sides as
# above: |G~^2 / G^2 - 1| <= sum_sq_rel(n_blocks), tested directly. With grads whose squares sum exactly in float64
# in any order (small integers times one power of two, ``exact_grads``, while the integer total stays below 2^53)
# both sides get the same c and nothing is added. Otherwise the fused c differs from the reference's: G =
# sqrt(G^2) halves the relative error, c = min(1, kappa / G) keeps it (min is 1-Lipschitz), and each side rounds c
# to fp32 and then g c (2 eps32 each): every clipped grad differs by
#     delta_c = sum_sq_rel(n_blocks of the optimizer) / 2 + 4 eps32      (relative, ``lamb_clip_gap``)
# Its effect goes through the moments: |dm| <= (1 - beta1) |g c| delta_c, |dv| <= (1 - beta2) (gc)^2 (2 delta_c +
# delta_c^2), and from them through a (the "moment channel" below).
#
# End to end (``lamb_parity(resync=False)``). Both optimizers start from the same state, get the same grads, and are
# never re-aligned: a gap (fused minus reference) entering a step comes out changed. Write D >= |d theta| for the
# gap entering the step, dm, dv for the moment gaps after it. To first order in the gaps:
#     d u     = d a + lambda d theta
#     d r / r = d||theta|| / ||theta|| - d||u|| / ||u||,   |d||theta||| <= ||d theta||,  |d||u||| <= ||d u||
#     d theta' = d theta - gamma (r d u + d r u) = (1 - gamma r lambda) d theta - gamma r d a - gamma d r u
# and with the one-step rounding terms above (which are what a step adds when it starts from the same state):
#     |d theta'_i| <= |1 - gamma r lambda| D_i + gamma r (Da_i + K_U eps32 s_i) + gamma r |u_i| (rho + 2 eps32)
#                     + 2 eps32 |theta'_i|
#     rho = sum_sq_rel(n_b) + ||D|| / ||theta|| + ||Du|| / ||u||,   Du = Da + lambda D + K_U eps32 s
# (s = |a| + lambda |theta|). With D = 0 and Da = 0 this is the one-step bound, term for term
# (``lamb_theta_bound`` computes both). How D itself propagates: its terms, in norm, are
#     (|1 - gamma r lambda| + gamma r lambda + gamma r ||u|| / ||theta||) ||D||
# (the decay term lambda theta inside u, then the two norms in r: lambda d theta in ||u||, and ||theta||); for
# gamma r lambda <= 1 the decay's -gamma r lambda cancels the +gamma r lambda of ||u||, and
#     ||D'|| <= (1 + gamma_t r_t ||u_t|| / ||theta_t||) ||D|| + (what step t adds)
#            =  (1 + gamma_t) ||D|| + ...      when r = ||theta|| / ||u|| (not clamped by trust_clip)
# i.e. c = 1 in a factor (1 + c gamma r ||u|| / ||theta||): the step moves theta by gamma ||theta|| in norm, so a
# relative gap in ||theta|| moves it by gamma times that gap. Over the test schedule (gamma = 1e-2, 20x on two
# steps): prod (1 + gamma_t) = 1.01^18 1.2^2 = 1.72. The moment channel: m and v depend on nothing but g (and c),
# not on theta, so their gaps carry over only through the momentum, decaying:
#     Bm_t = beta1 Bm_{t-1} + (1 - beta1) |g c| delta_c + 3 eps32 max|m_t|     (v: beta2, (gc)^2 (2 delta_c + ...))
# and since theta cannot feed back into them, the theta bound may take their *measured* gaps after the step (each
# checked against its own bound) without circularity; a = m^ / (sqrt(v^) + eps) moves by
#     Da_i = |dm_i| / (bc1 (s^_i + eps)) + |a_i| Ds_i / (s^_i + eps),
#     Ds_i = min(|dv_i| / (2 bc2 s^_i), sqrt(|dv_i| / bc2))
# (s^ = sqrt(v^); the square root moves by dv^ / (2 s^) to first order and never by more than sqrt(dv^)). Without
# clipping (or with exact grads) the moments agree bitwise and Da = 0. Every magnitude is the reference
# trajectory's own (its state before the step, recomputed in float64 by ``lamb_step_f64``), as in the Adafactor
# section.
#
# Two checks use this map, at every step. Per step: D (and the moments' Bm_{t-1}, Bv_{t-1}) is the gap measured
# before the step, exact since both states are known; this is as tight as the one-step bound and checks how a
# real gap propagates. Accumulated: D is the bound carried from the previous step, from D = 0 at the start: the
# closed form of how far the two trajectories may drift in t steps. Every coefficient of D is >= 0, so passing the
# first at every step implies passing the second; the second says how much room the accumulation leaves.
# Measured on the test configurations (tests/test_lamb.py::test_parity_end_to_end, seeds 0-2, triton and native
# alike, float64 norms): the per-step ratio gap / bound reaches 0.66-0.87 on fp32 values (a one-ulp rounding
# difference against a bound of about an ulp), the accumulated one at most 0.49 at the first step (where it is
# the one-step bound) and 0.03-0.05 after 20 steps: the bound adds every step's worst-case rounding, while the
# measured gap stays at about an ulp; the moments agree bitwise (the same clip coefficient on both sides). With
# the fp32 norms of before, and their bound: 0.96-0.99, 0.55-0.78 and 0.05-0.08. An lr off by 1e-6 relative fails
# both at the first step (1e-7 does not).
#
# bf16/fp16 params: with master weights the master carries D and the param is its rounding (+1 ulp of the dtype,
# as above). Without master weights the param is rounded to its dtype every step: the per-step check adds that
# ulp to the bound (from the measured gap, so a straddle is not counted twice); the accumulated one would add an
# ulp per step and is replaced by Adam's check, param_ulps = 2 ulps at max_t |theta_t| (module docstring: a
# straddle, p ~ gamma r |u| rho / ulp ~ 1e-6 per element and step, leaves a gap of one ulp that persists; one ulp
# of theta changes u by lambda ulp and r by ~ulp |theta_i| / ||theta|| relative, far below an ulp of the update).
LAMB_THREADS = 128  # lanes of the deepest per-block order: the native CPU engine's (csrc/engine.h kCpuLanes)
LAMB_K_U = 14
FIRST_ORDER_SLACK = 1e-3  # the neglected products of two gaps, relative


def reduction_depth(lanes: int, threads: int = LAMB_THREADS) -> int:
    """Longest chain of additions of a sum of ``lanes`` values in ``threads`` accumulators (sequential in each,
    then a tree over them): the deepest per-block order of the engines, and Triton's segment_sum (see above)."""
    per_thread = max(1, lanes // threads)
    return per_thread + (min(lanes, threads) - 1).bit_length()


def sum_sq_rel(n_blocks: int, block: int = 4096, chunk: int = 1024) -> float:
    """Bound on the relative gap between a kernel's float64 sum of squares over ``n_blocks`` blocks (per-block sums,
    then one segment of segment_sum) and the reference's float64 sum of the same squares, the fp64 roundings of
    the ratio (or clip coefficient) formed from them included, for every backend (see above)."""
    n_blocks = max(n_blocks, 1)
    kernel = reduction_depth(block) + -(-n_blocks // chunk) + reduction_depth(chunk)
    reference = (block + 2) * n_blocks
    return (kernel + reference + 6) * EPS64


def n_blocks(numel: int, block: int = 4096) -> int:
    """Blocks of a tensor in the engine's block map (a zero-size tensor still has one)."""
    return max(1, -(-numel // block))


def lamb_clip_gap(n_blocks_total: int) -> float:
    """delta_c: the relative gap of every clipped grad between fused and reference (see above)."""
    return sum_sq_rel(n_blocks_total) / 2 + 4 * EPS32


def norm_f64(x) -> float:
    """||x|| from the exact sum of the float64 squares (math.fsum)."""
    return math.sqrt(math.fsum(e * e for e in np.asarray(x, dtype=np.float64).ravel().tolist()))


def global_clip_f64(grads, max_grad_norm) -> float:
    """c = min(1, max_grad_norm / G), G the L2 norm over every element of every grad (exact sums); 1 without
    max_grad_norm."""
    if max_grad_norm is None:
        return 1.0
    G = math.sqrt(math.fsum(e * e for g in grads for e in np.asarray(g, dtype=np.float64).ravel().tolist()))
    return min(1.0, max_grad_norm / G) if G > 0 else 1.0


def lamb_step_f64(theta, g, m, v, step, hp) -> dict:
    """One LAMB step on one tensor in float64 (numpy), written from issue 4's formula independently of the
    reference. ``g``: the grad after clipping; ``hp``: lr, betas, eps, weight_decay, bias_correction, trust_clip,
    layer_adaptation (a param group). Returns the new theta, m, v, the intermediates a, u, r, s = sqrt(v^), the
    bias corrections bc1, bc2, and whether r came from the norms (``adapted``)."""
    beta1, beta2 = hp["betas"]
    t = step + 1
    m = beta1 * m + (1 - beta1) * g
    v = beta2 * v + (1 - beta2) * g * g
    bc1, bc2 = (1 - beta1 ** t, 1 - beta2 ** t) if hp["bias_correction"] else (1.0, 1.0)
    s = np.sqrt(v / bc2)
    a = (m / bc1) / (s + hp["eps"])
    u = a + hp["weight_decay"] * theta
    r, adapted = 1.0, False
    if hp["layer_adaptation"]:
        w_norm, u_norm = norm_f64(theta), norm_f64(u)
        if w_norm > 0 and u_norm > 0:
            r, adapted = w_norm / u_norm, True
        if hp["trust_clip"] is not None:
            r = min(max(r, hp["trust_clip"][0]), hp["trust_clip"][1])
    return dict(theta=theta - float(hp["lr"]) * r * u, m=m, v=v, a=a, u=u, r=r, s=s, bc1=bc1, bc2=bc2,
                adapted=adapted)


def lamb_moment_bounds(hp, g, max_m: float, max_v: float, *, b_m=0.0, b_v=0.0, delta_c: float = 0.0):
    """Bounds (elementwise, float64) on the fused-vs-reference gaps of exp_avg and exp_avg_sq after a step: the
    bounds ``b_m``, ``b_v`` entering it decay by beta, the clip gap ``delta_c`` of the (clipped) grad ``g`` enters
    through (1 - beta), and the step's roundings add 3 eps32 max|m|, max|v| (the reference's, after the step)."""
    beta1, beta2 = hp["betas"]
    gc = np.abs(g)
    return (beta1 * b_m + (1 - beta1) * gc * delta_c + 3 * EPS32 * max_m,
            beta2 * b_v + (1 - beta2) * gc * gc * (2 * delta_c + delta_c ** 2) + 3 * EPS32 * max_v)


def lamb_theta_bound(e: dict, hp, theta, *, n_blocks: int, d_theta=0.0, d_m=0.0, d_v=0.0) -> np.ndarray:
    """Elementwise bound on |fused theta' - reference theta'| after one step (float64; see above). ``e``:
    ``lamb_step_f64`` of the reference's state before the step, whose theta is ``theta``; ``n_blocks``: the
    tensor's blocks; ``d_theta``: a bound on the theta gap entering the step (the measured gap, or the bound
    carried from the step before; 0 when both start from the same state); ``d_m``, ``d_v``: the moments' gaps
    after the step (measured; 0 when they agree bitwise)."""
    gamma, lam, eps, r = float(hp["lr"]), hp["weight_decay"], hp["eps"], e["r"]
    a, u, s = e["a"], e["u"], e["s"]
    spread = np.abs(a) + lam * np.abs(theta)
    d_vhat = np.asarray(d_v, dtype=np.float64) / e["bc2"]
    with np.errstate(divide="ignore", invalid="ignore"):
        d_s = np.where(s > 0, np.minimum(d_vhat / (2 * s), np.sqrt(d_vhat)), np.sqrt(d_vhat))
        d_a = (np.asarray(d_m, dtype=np.float64) / e["bc1"] + np.abs(a) * d_s) / (s + eps)
    d_theta = np.broadcast_to(np.asarray(d_theta, dtype=np.float64), np.shape(theta))
    own = LAMB_K_U * EPS32 * spread  # this step's roundings of u
    rho = 0.0
    if e["adapted"]:
        d_u = d_a + lam * d_theta + own
        rho = (sum_sq_rel(n_blocks) + float(np.linalg.norm(d_theta)) / norm_f64(theta)
               + float(np.linalg.norm(d_u)) / norm_f64(u))
        rho *= 1.0 + rho  # a clamp can move one side's ratio past the bound by rho r at most
    bound = (abs(1.0 - gamma * r * lam) * d_theta + gamma * r * (d_a + own)
             + gamma * r * np.abs(u) * (rho + 2 * EPS32) + 2 * EPS32 * np.abs(e["theta"]))
    return bound * (1.0 + FIRST_ORDER_SLACK)


def worst_row(what: str, gap, bound) -> tuple:
    """(what, error, bound) for an elementwise bound: the element with the largest gap / bound (a gap where the
    bound is 0 counts as infinitely over)."""
    gap = np.abs(np.asarray(gap, dtype=np.float64))
    gap, bound = np.broadcast_arrays(gap, np.asarray(bound, dtype=np.float64))
    if gap.size == 0:
        return (what, 0.0, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(bound > 0, gap / bound, np.where(gap > 0, np.inf, 0.0))
    j = int(np.argmax(ratio))
    return (f"{what} [element {j}]", float(gap.flat[j]), float(bound.flat[j]))


# ----------------------------------------------------------------------------------------------------------------
# Running a fused backend and the reference side by side (tests/test_parity.py and ``python -m fused_optim check``)
# ----------------------------------------------------------------------------------------------------------------
BIG_LR_STEPS = (9, 10)  # steps run at 20x the learning rate


class ParityRun(NamedTuple):
    fused: torch.optim.Optimizer
    ref: torch.optim.Optimizer
    fused_params: list
    ref_params: list
    lrs: list  # the learning rate of each step
    ref_max_abs: list  # per param, elementwise max over the run of |theta| of the reference (fp32)


def _as_is(t: torch.Tensor) -> torch.Tensor:
    return t


def run_parity(cls, backend: str, dtype: torch.dtype, kwargs: dict, *, shapes, grad_scales, device,
               steps: int = 20, lr=1e-2, master: bool = False, seed: int = 0, layout=None) -> ParityRun:
    """Step ``cls(..., backend=backend)`` and ``cls(..., backend="reference")`` side by side on identical grads.

    Params are random in ``dtype`` with ``shapes``; the grads of tensor i are N(0, grad_scales[i]^2); steps in
    ``BIG_LR_STEPS`` use 20x the learning rate. ``lr`` may be a 1-element tensor (given to the fused optimizer as
    a tensor on ``device``). ``layout``: a function giving a tensor's values in the memory layout to test (e.g.
    ``torch.channels_last``), applied to every param and grad; the same values as without it.
    """
    gen = torch.Generator().manual_seed(seed)
    layout = layout or _as_is
    fused_params = [layout(torch.randn(s, generator=gen).to(device=device, dtype=dtype)).requires_grad_()
                    for s in shapes]
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    lr_f = lr.detach().clone().to(device) if isinstance(lr, torch.Tensor) else lr
    fused = cls(fused_params, lr=lr_f, backend=backend, master_weights=master, **kwargs)
    ref = cls(ref_params, lr=float(lr), backend="reference", master_weights=master, **kwargs)
    lrs = []
    max_abs = [p.detach().float().abs() for p in ref_params]
    for k in range(steps):
        step_lr = float(lr) * (20.0 if k in BIG_LR_STEPS else 1.0)
        lrs.append(step_lr)
        for opt in (fused, ref):
            group = opt.param_groups[0]
            if isinstance(group["lr"], torch.Tensor):
                group["lr"].fill_(step_lr)
            else:
                group["lr"] = step_lr
        for pf, pr, scale in zip(fused_params, ref_params, grad_scales):
            g = layout((torch.randn(pf.shape, generator=gen) * scale).to(device=device, dtype=dtype))
            pf.grad = g.clone()
            pr.grad = g.clone()
        fused.step()
        ref.step()
        for m, p in zip(max_abs, ref_params):
            torch.maximum(m, p.detach().float().abs(), out=m)
    return ParityRun(fused, ref, fused_params, ref_params, lrs, max_abs)


def adam_parity_checks(run: ParityRun, dtype, state_keys, l2: float, master: bool):
    """(what, error, bound) for every param, master copy and state tensor of an Adam-family run, with the bounds
    derived above. ``l2``: the L2 (coupled) weight decay, 0 for AdamW. Also raises AssertionError on a broken
    invariant that has no tolerance (state keys, step counts, state dtype)."""
    fused, ref, fused_params, ref_params, lrs, ref_max_abs = run
    steps = len(lrs)
    out = []
    for i, (pf, pr) in enumerate(zip(fused_params, ref_params)):
        sf, sr = fused.state[pf], ref.state[pr]
        if set(sf) != set(sr):
            raise AssertionError(f"param {i}: state keys {sorted(sf)} != reference {sorted(sr)}")
        if not (sf["step"].dtype == torch.float32 and sf["step"].dim() == 0):
            raise AssertionError(f"param {i}: step must be a float32 scalar tensor, got {sf['step']!r}")
        if not float(sf["step"]) == float(sr["step"]) == steps:
            raise AssertionError(f"param {i}: step {float(sf['step'])}, reference {float(sr['step'])}, want {steps}")
        if pr.numel() == 0:
            continue
        max_theta = pr.detach().abs().max().item()
        atol = theta_atol(lrs, max_theta)
        a, e = pf.detach(), pr.detach()
        if dtype == torch.float32:
            out.append((f"param {i}", (a - e).abs().max().item(), atol))
            d_theta = atol
        else:
            at = torch.maximum(ref_max_abs[i], torch.maximum(a.float().abs(), e.float().abs()))
            gap = (a.float() - e.float()).abs() / ulp(at, dtype)
            out.append((f"param {i} (ulps of {dtype})", gap.max().item(), float(param_ulps(dtype, master))))
            d_theta = param_ulps(dtype, master) * ulp(at.max(), dtype).item()
        if master:
            out.append((f"param {i} master_param", (sf["master_param"] - sr["master_param"]).abs().max().item(), atol))
            d_theta = atol
        for key in state_keys:
            if key not in sr:
                continue
            if sf[key].dtype != torch.float32:
                raise AssertionError(f"param {i} {key} is {sf[key].dtype}: states are fp32")
            bound = state_atol(steps, sr[key].abs().max().item()) + steps * l2 * d_theta
            out.append((f"param {i} {key}", (sf[key].double() - sr[key].double()).abs().max().item(), bound))
    return out


def _max_abs(x) -> float:
    return x.abs().max().item() if x is not None and x.numel() else 0.0  # None: a state not created yet


def _theta(opt, p):
    st = opt.state[p]
    return st["master_param"] if "master_param" in st else p.detach()


def adafactor_parity(cls, backend: str, dtype: torch.dtype, variant: dict, *, shapes, grad_scales, device,
                     steps: int = 20, master: bool = False, lr_tensor: bool = False, seed: int = 0,
                     param_scales=None, late_step: int | None = None):
    """Step ``cls(..., backend=backend)`` (FusedAdafactor) and a reference one side by side on identical grads and,
    after every step, bound the gaps of params and state with ``ADAFACTOR_NOTES`` (the bounds grow per step from
    the reference's own trajectory, so they are checked step by step). ``variant`` may hold ``lr``; steps in
    ``BIG_LR_STEPS`` then use 20x of it. ``param_scales``: a factor per tensor on its N(0, 1) initial values (0: a
    zero param; small ones put RMS(θ) under eps2). ``late_step``: after the first step both optimizers' step counts
    jump to ``late_step``, so the later steps are steps late_step + 1, ... (relative_step's 1/sqrt(t) cap is
    reached after t = 10^4); the bounds, which grow with t, are then those of step t: looser than the steps taken
    need, and still valid. Returns (ParityRun, checks) with checks as (what, error, bound); raises AssertionError
    on a broken invariant that has no tolerance (state keys, step counts, state dtype/shape)."""
    from .reference.adafactor import relative_step_size
    gen = torch.Generator().manual_seed(seed)
    scales = [1.0] * len(shapes) if param_scales is None else list(param_scales)
    fused_params = [(torch.randn(s, generator=gen) * c).to(device=device, dtype=dtype).requires_grad_()
                    for s, c in zip(shapes, scales)]
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    kw = dict(variant)
    base_lr = kw.pop("lr", None)
    lr_f = torch.tensor(base_lr, device=device) if lr_tensor else base_lr
    fused = cls(fused_params, lr=lr_f, backend=backend, master_weights=master, **kw)
    ref = cls(ref_params, lr=base_lr, backend="reference", master_weights=master, **kw)
    group = ref.param_groups[0]
    beta1, lam = group["beta1"], group["weight_decay"]
    exact = dtype == torch.float32 or master  # fp32 values to compare with the derived bounds
    gap_m = [0.0] * len(shapes)
    checks, lrs = [], []
    max_abs = [p.detach().float().abs() for p in ref_params]
    for k in range(1, steps + 1):
        t = k if late_step is None or k == 1 else late_step + k - 1
        if k == 2 and late_step is not None:
            with torch.no_grad():
                for opt in (fused, ref):
                    for st in opt.state.values():
                        st["step"].fill_(late_step)
        if base_lr is not None:
            step_lr = base_lr * (20.0 if k - 1 in BIG_LR_STEPS else 1.0)
            group["lr"] = step_lr
            if lr_tensor:
                fused.param_groups[0]["lr"].fill_(step_lr)
            else:
                fused.param_groups[0]["lr"] = step_lr
        lrs.append(group["lr"])
        before = []
        for pf, pr in zip(fused_params, ref_params):
            th_f, th_r = _theta(fused, pf).double(), _theta(ref, pr).double()
            m_r = ref.state[pr]["exp_avg"].clone() if beta1 is not None and "exp_avg" in ref.state[pr] else None
            sq_r = th_r.square().sum().item()
            before.append(dict(theta=th_r.clone(), gap=_max_abs(th_f - th_r), m=m_r,
                               sq_gap=abs(th_f.square().sum().item() - sq_r) / sq_r if sq_r else 0.0,
                               rms=math.sqrt(sq_r / th_r.numel()) if th_r.numel() else 0.0))
        for pf, pr, scale in zip(fused_params, ref_params, grad_scales):
            g = (torch.randn(pf.shape, generator=gen) * scale).to(device=device, dtype=dtype)
            pf.grad, pr.grad = g.clone(), g.clone()
        fused.step()
        ref.step()
        for m, p in zip(max_abs, ref_params):
            torch.maximum(m, p.detach().float().abs(), out=m)

        for i, (pf, pr, b) in enumerate(zip(fused_params, ref_params, before)):
            sf, sr = fused.state[pf], ref.state[pr]
            where = f"param {i} {tuple(pr.shape)} step {t}"
            if set(sf) != set(sr):
                raise AssertionError(f"{where}: state keys {sorted(sf)} != {sorted(sr)}")
            if not (sf["step"].dtype == torch.float32 and float(sf["step"]) == float(sr["step"]) == t):
                raise AssertionError(f"{where}: step {float(sf['step'])}, reference {float(sr['step'])}")
            if pr.numel() == 0:
                continue
            gaps = adafactor_gaps(tuple(pr.shape), t, theta_sq_gap=b["sq_gap"],
                                  scale_parameter=group["scale_parameter"])
            for key, rel in (("exp_avg_sq_row", gaps.get("row")), ("exp_avg_sq_col", gaps.get("col")),
                             ("exp_avg_sq", gaps.get("V"))):
                if key in sr:
                    if not (sf[key].dtype == torch.float32 and sf[key].shape == sr[key].shape):
                        raise AssertionError(f"{where} {key}: {sf[key].dtype} {tuple(sf[key].shape)}")
                    ratio = ((sf[key].double() - sr[key].double()).abs() / (rel * sr[key].double().abs())).max()
                    checks.append((f"{where} {key} (gap / relative bound)", ratio.item(), 1.0))
            rho = relative_step_size(t, lr=group["lr"], relative_step=group["relative_step"],
                                     warmup_init=group["warmup_init"])
            alpha = rho * max(group["eps"][1], b["rms"]) if group["scale_parameter"] else rho
            theta_r = _theta(ref, pr).double()
            if beta1 is None:
                u_max = _max_abs(theta_r - b["theta"]) + lam * alpha * _max_abs(b["theta"])
                update_gap = gaps["update"] * u_max
            else:  # the update is m_t: its gap is measured, and bounded here
                m_f, m_r = sf["exp_avg"].double(), sr["exp_avg"].double()
                u_max = (_max_abs(m_r) + beta1 * _max_abs(b["m"])) / (1 - beta1)
                allowed = beta1 * gap_m[i] + (1 - beta1) * gaps["update"] * u_max + 4 * EPS32 * _max_abs(m_r)
                gap_m[i] = _max_abs(m_f - m_r)
                checks.append((f"{where} exp_avg", gap_m[i], allowed))
                update_gap = gap_m[i]
            if exact:
                allowed = ((1 + lam * alpha) * b["gap"] + lam * alpha * gaps["alpha"] * _max_abs(b["theta"])
                           + update_gap + 4 * EPS32 * max(_max_abs(theta_r), _max_abs(b["theta"])))
                checks.append((f"{where} {'master_param' if master else 'param'} (fp32 bound)",
                               _max_abs(_theta(fused, pf).double() - theta_r), allowed))
            if dtype != torch.float32:
                a, e = pf.detach().float(), pr.detach().float()
                at = torch.maximum(max_abs[i], torch.maximum(a.abs(), e.abs()))
                checks.append((f"{where} (ulps of {dtype})", ((a - e).abs() / ulp(at, dtype)).max().item(),
                               float(param_ulps(dtype, master))))
    return ParityRun(fused, ref, fused_params, ref_params, lrs, max_abs), checks


def _set_lr(opt, lr: float) -> None:
    for group in opt.param_groups:
        if isinstance(group["lr"], torch.Tensor):
            group["lr"].fill_(lr)
        else:
            group["lr"] = lr


def _lamb_snapshot(opt, params) -> list:
    """(theta, m, v, step) of each param in float64 numpy, before a step (theta: the master when there is one)."""
    out = []
    for p in params:
        st = opt.state[p]
        zeros = np.zeros(tuple(p.shape))
        m = st["exp_avg"].double().cpu().numpy() if "exp_avg" in st else zeros
        v = st["exp_avg_sq"].double().cpu().numpy() if "exp_avg_sq" in st else zeros
        out.append((_theta(opt, p).double().cpu().numpy(), m, v, float(st["step"]) if "step" in st else 0.0))
    return out


def _lamb_resync(fused, ref, fused_params, ref_params) -> None:
    """Copy the fused params and state into the reference, so that the next step starts from the same state."""
    with torch.no_grad():
        for pf, pr in zip(fused_params, ref_params):
            pr.copy_(pf)
            for key, value in fused.state[pf].items():
                ref.state[pr][key].copy_(value)


def lamb_parity(cls, backend: str, dtype: torch.dtype, group_kwargs, *, shapes, grad_scales, device,
                steps: int = 20, master: bool = False, max_grad_norm=None, seed: int = 0, resync: bool = True,
                lr: float = 1e-2, lr_tensor: bool = False, zero=(), exact_grads: bool = False, layout=None):
    """Step ``cls(..., backend=backend)`` (FusedLAMB) and a reference one side by side on identical grads and check,
    after every step, params (and master weights) and moments against the bounds of the LAMB section above.

    ``group_kwargs``: one param group's options (a dict), or a sequence of them (param i goes to group
    ``i % len``). Params are random in ``dtype`` (those listed in ``zero`` start at 0); the grads of tensor i are
    N(0, grad_scales[i]^2), or with ``exact_grads`` small integers times 2^-4 (their squares sum exactly: the
    same clip coefficient on both sides). Steps in ``BIG_LR_STEPS`` use 20x ``lr``; ``lr_tensor`` gives the
    fused optimizer its lr as a device tensor; ``layout`` as in :func:`run_parity`.

    Every step is checked from the gaps that entered it (measured exactly: both states are known) with
    ``lamb_theta_bound`` and ``lamb_moment_bounds``. ``resync=True``: before every step the fused params and state
    are copied into the reference, so those gaps are 0 and this is the one-step bound. ``resync=False``: end to
    end, never re-aligned; each step's check then includes how the gaps that entered it propagate, and the
    accumulated bound (the same map applied to bounds, from 0 at the start) is carried along and checked too,
    rows marked "accumulated" (fp32 params and master weights; bf16/fp16 params without master weights get
    Adam's check in ulps of their dtype instead, param_ulps).

    Returns (ParityRun, checks) with checks as (what, error, bound); raises AssertionError on a broken invariant
    that has no tolerance (state keys, step counts, state dtype)."""
    gen = torch.Generator().manual_seed(seed)
    layout = layout or _as_is
    fused_params = [layout(torch.randn(s, generator=gen).to(device=device, dtype=dtype)).requires_grad_()
                    for s in shapes]
    with torch.no_grad():
        for i in zero:
            fused_params[i].zero_()
    ref_params = [p.detach().clone().requires_grad_() for p in fused_params]
    specs = [group_kwargs] if isinstance(group_kwargs, dict) else list(group_kwargs)

    def groups(params, tensor_lr):
        out = []
        for j, spec in enumerate(specs):
            spec = dict(spec, params=params[j::len(specs)])
            if tensor_lr:
                spec["lr"] = torch.tensor(float(spec.get("lr", lr)), device=device)
            out.append(spec)
        return out

    fused = cls(groups(fused_params, lr_tensor), lr=lr, backend=backend, master_weights=master,
                max_grad_norm=max_grad_norm)
    ref = cls(groups(ref_params, False), lr=lr, backend="reference", master_weights=master,
              max_grad_norm=max_grad_norm)
    group_of = {id(p): g for g in ref.param_groups for p in g["params"]}
    fp32_theta = dtype == torch.float32 or master  # theta is fp32: the accumulated bound applies to it
    blocks_total = sum(n_blocks(p.numel()) for p in fused_params)
    carried = [dict(theta=0.0, m=0.0, v=0.0) for _ in shapes]  # accumulated bounds (resync=False)
    checks, lrs = [], []
    max_abs = [p.detach().float().abs() for p in ref_params]
    for k in range(steps):
        step_lr = lr * (20.0 if k in BIG_LR_STEPS else 1.0)
        lrs.append(step_lr)
        _set_lr(fused, step_lr)
        _set_lr(ref, step_lr)
        for pf, pr, scale in zip(fused_params, ref_params, grad_scales):
            if exact_grads:
                g = torch.randint(-8, 9, pf.shape, generator=gen).float() * 2.0 ** -4
            else:
                g = torch.randn(pf.shape, generator=gen) * scale
            g = layout(g.to(device=device, dtype=dtype))
            pf.grad, pr.grad = g.clone(), g.clone()
        g64 = [p.grad.double().cpu().numpy() for p in ref_params]
        c = global_clip_f64(g64, max_grad_norm)
        # The clip gap: 0 without clipping, or when every partial sum of Σg² is an exact float64 number (integers
        # times 2^-8, at most 2^53 of them); else lamb_clip_gap.
        exact_sum = exact_grads and sum(float(np.square(g * 16).sum()) for g in g64) <= 2.0 ** 53
        delta_c = 0.0 if max_grad_norm is None or exact_sum else lamb_clip_gap(blocks_total)
        before_f, before = _lamb_snapshot(fused, fused_params), _lamb_snapshot(ref, ref_params)
        fused.step()
        ref.step()
        for m, p in zip(max_abs, ref_params):
            torch.maximum(m, p.detach().float().abs(), out=m)

        for i, (pf, pr) in enumerate(zip(fused_params, ref_params)):
            sf, sr = fused.state[pf], ref.state[pr]
            where = f"step {k} param {i} {tuple(pr.shape)}"
            if set(sf) != set(sr):
                raise AssertionError(f"{where}: state keys {sorted(sf)} != reference {sorted(sr)}")
            if not (sf["step"].dtype == torch.float32 and sf["step"].dim() == 0):
                raise AssertionError(f"{where}: step must be a float32 scalar tensor, got {sf['step']!r}")
            if not float(sf["step"]) == float(sr["step"]) == before[i][3] + 1:
                raise AssertionError(f"{where}: step {float(sf['step'])}, reference {float(sr['step'])}, "
                                     f"want {before[i][3] + 1}")
            for key in ("exp_avg", "exp_avg_sq"):
                if sf[key].dtype != torch.float32:
                    raise AssertionError(f"{where} {key} is {sf[key].dtype}: states are fp32")
            if pr.numel() == 0:
                continue
            hp = dict(group_of[id(pr)])
            theta, m, v, step = before[i]
            g = g64[i] * c
            e = lamb_step_f64(theta, g, m, v, step, hp)
            # The gaps that entered this step (0 after a resync), and the bounds carried to it.
            entered = dict(theta=np.abs(before_f[i][0] - theta), m=np.abs(before_f[i][1] - m),
                           v=np.abs(before_f[i][2] - v))
            accumulated = [] if resync else [(" (accumulated)", carried[i])]

            gap_m = (sf["exp_avg"].double() - sr["exp_avg"].double()).abs().cpu().numpy()
            gap_v = (sf["exp_avg_sq"].double() - sr["exp_avg_sq"].double()).abs().cpu().numpy()
            gap_master = None
            if "master_param" in sr:
                gap_master = (sf["master_param"].double() - sr["master_param"].double()).abs().cpu().numpy()
            gap_param = (pf.detach().double() - pr.detach().double()).abs().cpu().numpy()
            rounding = 0.0 if dtype == torch.float32 else ulp(pr.detach().cpu(), dtype).double().numpy()
            max_m, max_v = _max_abs(sr["exp_avg"]), _max_abs(sr["exp_avg_sq"])
            new_carried = {}
            for label, into in [("", entered)] + accumulated:
                b_m, b_v = lamb_moment_bounds(hp, g, max_m, max_v, b_m=into["m"], b_v=into["v"], delta_c=delta_c)
                checks.append(worst_row(f"{where} exp_avg{label}", gap_m, b_m))
                checks.append(worst_row(f"{where} exp_avg_sq{label}", gap_v, b_v))
                if label and not fp32_theta:
                    new_carried = dict(theta=0.0, m=b_m, v=b_v)
                    continue
                b_theta = lamb_theta_bound(e, hp, theta, n_blocks=n_blocks(pr.numel()), d_theta=into["theta"],
                                           d_m=gap_m, d_v=gap_v)
                if gap_master is not None:
                    checks.append(worst_row(f"{where} master_param{label}", gap_master, b_theta))
                checks.append(worst_row(f"{where} param{label}", gap_param, b_theta + rounding))
                new_carried = dict(theta=b_theta, m=b_m, v=b_v)
            if not resync:
                carried[i] = new_carried
                if not fp32_theta:  # Adam's end-to-end check of a param rounded every step (module docstring)
                    a, r = pf.detach().float().cpu(), pr.detach().float().cpu()
                    at = torch.maximum(max_abs[i].cpu(), torch.maximum(a.abs(), r.abs()))
                    checks.append((f"{where} param (ulps of {dtype} at max_t |theta_t|)",
                                   ((a - r).abs() / ulp(at, dtype)).max().item(), float(param_ulps(dtype, False))))
        if resync:
            _lamb_resync(fused, ref, fused_params, ref_params)
    return ParityRun(fused, ref, fused_params, ref_params, lrs, max_abs), checks
