"""The tolerances of the parity tests are derived in fused_optim/testing.py (shared with
``python -m fused_optim check``); this module re-exports them for the tests."""
from fused_optim.testing import *  # noqa: F401,F403
from fused_optim.testing import EPS32, UPDATE_BOUND, ulp  # noqa: F401

import torch  # noqa: E402


# ----------------------------------------------------------------------------------------------------------------
# LAMB (tests/test_lamb.py)
# ----------------------------------------------------------------------------------------------------------------
# LAMB's update is Adam's element math times a per-tensor ratio of norms: r = ||theta|| / ||u||. The element
# math of the kernel and the reference is the same sequence of fp32 operations (as Adam's, see
# fused_optim/testing.py); the norms are not: the reference sums squares in float64 (exact to ~2^-53, an
# order-free value) and the kernel sums fp32 squares in a fixed tree of its own. So the parity tests bound each
# norm's summation error and propagate it.
#
# Summation. Each block of BLOCK = 4096 elements is reduced by ``tl.sum``: on the GPU each of the 128 threads adds
# its 32 elements in sequence, then a butterfly over the 32 lanes of a warp and a tree over the 4 warps (5 + 2
# levels): a depth of 32 + 7 = 39 additions (the interpreter's numpy pairwise sum is shallower). ``segment_sum``
# adds a tensor's n_b block partials: ceil(n_b / 1024) additions per lane of its 1024-wide accumulator, then a
# tl.sum over 1024 lanes (8 + 7). Squaring rounds once more. For a sum of non-negative terms, every path of
# depth d gives |S~ - S| <= d eps32 S (first order), so with d = 1 + 39 + ceil(n_b / 1024) + 15:
#     ||x||~  = ||x|| (1 + delta),  |delta| <= d eps32 / 2          (sqrt halves a relative error)
#
# Direction. Kernel and reference compute u_i = a_i + lambda theta_i, a = m^ / (sqrt(v^) + eps), from the same
# fp32 m, v, theta. Counting the largest difference per operation (torch's CPU sqrt may be 1 ulp off, CUDA divides
# by a host scalar through its reciprocal; 1 ulp = 2 eps32 relative), a differs by <= 11.5 eps32 |a| and the fused
# u_i = fma(lambda, theta_i, a_i) by <= K_U eps32 (|a_i| + lambda |theta_i|), K_U = 14: relative to |a| + lambda|theta|
# and not to |u|, because u may cancel.
#
# Ratio. r~ / r - 1 <= rho = d_theta eps32 / 2 + d_u eps32 / 2 + K_U eps32 || |a| + lambda |theta| || / ||u||
# (first order; the ratio itself, a square root and a division, is computed in fp64 from the fp32 sums on both
# sides). A trust_clip clamp is 1-Lipschitz, and r = 1 (no adaptation, or a zero norm) is exact on both sides.
#
# Update. theta' = fma(-(gamma r) rounded to fp32, u_i, theta_i) on both sides, so one step from the same state:
#     |theta'~_i - theta'_i| <= gamma r K_U eps32 (|a_i| + lambda |theta_i|) + gamma r |u_i| (rho + 2 eps32)
#                               + 2 eps32 |theta'_i|
# (the coefficient's fp32 rounding: 2 eps32; each side's final rounding: eps32 |theta'|). The moments do not depend
# on theta and agree as Adam's do: 3 eps32 max|m| per step. The parity tests check this one-step bound at every
# step, starting each step from the same state (the fused one copied into the reference), so no model of how
# earlier differences propagate is needed; 20 steps of it are still 20 steps of evolving moments. A bf16/fp16
# param (or a master rounded to one) adds one ulp of its dtype: both sides round values within the bound above.
#
# Global norm (max_grad_norm). G^2 is one segment over every block of a bucket: d = 1 + 39 + ceil(n_blocks / 1024)
# + 15, |G~^2 / G^2 - 1| <= d eps32, tested directly. Parity runs with max_grad_norm use grads whose squares sum
# exactly in fp32 in any order (small integers times one power of two), so that both sides get the same c and
# the one-step bound above applies unchanged.
LAMB_THREADS = 32 * 4  # kernels/engine.NUM_WARPS warps of 32 threads
LAMB_K_U = 14


def reduction_depth(lanes: int, threads: int = LAMB_THREADS) -> int:
    """Longest chain of additions of a GPU ``tl.sum`` over ``lanes`` values: sequential per thread, then a tree."""
    per_thread = max(1, lanes // threads)
    return per_thread + (min(lanes, threads) - 1).bit_length()


def sum_sq_rel(n_blocks: int, block: int = 4096, chunk: int = 1024) -> float:
    """Relative error bound of a kernel's sum of squares over ``n_blocks`` blocks (per-block tl.sum, then one
    segment of engine.segment_sum)."""
    depth = 1 + reduction_depth(block) + -(-max(n_blocks, 1) // chunk) + reduction_depth(chunk)
    return depth * EPS32


def lamb_theta_tol(*, gamma: float, r: float, adapted: bool, a, theta, u, theta_new, wd: float,
                   n_blocks: int) -> torch.Tensor:
    """Elementwise one-step bound on |fused theta' - reference theta'| (float64 tensors in; see above).
    ``r``: the reference's final ratio; ``adapted``: r came from the norms (not 1 by rule or by a zero norm)."""
    spread = a.abs() + wd * theta.abs()
    rho = 0.0
    if adapted:
        u_norm = float(torch.linalg.vector_norm(u))
        rho = sum_sq_rel(n_blocks) + LAMB_K_U * EPS32 * float(torch.linalg.vector_norm(spread)) / u_norm
        rho *= 1.0 + rho  # a clamp can move one side's ratio past the bound by rho r at most
    return (gamma * r * LAMB_K_U * EPS32 * spread + gamma * r * u.abs() * (rho + 2 * EPS32)
            + 2 * EPS32 * theta_new.abs())


def assert_within(actual: torch.Tensor, expected: torch.Tensor, tol: torch.Tensor, what: str) -> None:
    """|actual - expected| <= tol elementwise (float64); reports the worst element relative to its bound."""
    gap = (actual.double() - expected.double()).abs()
    over = gap - tol
    if gap.numel() and bool((over > 0).any()):
        i = int(over.argmax())
        raise AssertionError(f"{what}: element {i} off by {gap.flatten()[i].item():.3e}, bound "
                             f"{tol.flatten()[i].item():.3e} ({int((over > 0).sum())} of {gap.numel()} over)")
