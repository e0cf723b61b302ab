"""Reference LAMB: one step on one tensor, in the symbols of :class:`fused_optim.FusedLAMB`'s algorithm box.

LAMB is You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 Minutes" (ICLR 2020,
arXiv:1904.00962 v3, Algorithm 2): Adam's moments, an Adam direction plus decoupled weight decay, and a
per-tensor trust ratio ‖θ‖ / ‖u‖ that scales the step of each layer. With ``bias_correction=False`` the update
below is, line for line, the ``LAMBOptimizer`` that the paper's authors derived in TensorFlow from BERT's
``AdamWeightDecayOptimizer`` (google-research/bert ``optimization.py``): no bias correction, ``update = m /
(sqrt(v) + eps) + weight_decay * param``, ``ratio = w_norm / g_norm`` when both norms are > 0 else 1, and
``param - ratio * learning_rate * update``. The bias correction is the paper's (v3, Algorithm 2) and apex's
default; the optional clamp of the ratio is the paper's scaling function φ (v3, section 3: "φ(z) = min(max(z,
γ_l), γ_u)").

Roundings follow the Adam reference (``exp_avg.lerp_``, ``addcmul_``, ``add(alpha=)``) so that a kernel can
match them operation for operation (tests/tolerances.py). The norms are the one place where this reference
computes in float64: fp32 (and bf16/fp16) values are squared in float64, exactly, where an fp32 square overflows
for |x| >= 2^64 ~ 1.8e19, loses bits below 2^-63 ~ 1.1e-19 and vanishes below 2^-75 ~ 2.6e-23; the squares are
summed in float64. The kernels do the same in an order of their own; two float64 sums of the same n squares agree
to about n 2^-53 relative whatever their orders, which is what the parity tolerances bound (fused_optim/testing.py,
LAMB).

A NaN trust ratio (‖θ‖ = ‖u‖ = inf: inf / inf) stays NaN through the trust clip, explicitly: Python's ``max(r, lo)``
keeps a NaN only when it is the first argument, so the clamp is written NaN in, NaN out rather than left to the
argument order. The step then makes the whole tensor NaN, as it does without a trust clip.
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

from .adam import compute_dtype, working_copies


def grad_sq_norm(grads: list, grad_scale: Tensor | None = None, per_tensor: bool = False) -> Tensor:
    """Σ g² over every element of ``grads`` (each divided by ``grad_scale`` in its compute dtype first), a 0-d
    float64 tensor: one bucket's share of the global gradient norm G of ``max_grad_norm``; with ``per_tensor`` the
    sum of each grad, float64 ``[len(grads)]``."""
    total = torch.zeros((), dtype=torch.float64, device=grads[0].device if grads else None)
    each = []
    for grad in grads:
        g = grad.to(compute_dtype(grad))
        if grad_scale is not None:
            g = g / grad_scale.to(g.dtype)
        each.append(g.double().square().sum())
        total = total + each[-1]
    return torch.stack(each) if per_tensor else total


def clip_coefficient(max_grad_norm: float, total_sq: Tensor) -> Tensor:
    """c = min(1, max_grad_norm / G) with G = sqrt(total_sq), in float64 (G = 0 gives c = 1; NaN propagates)."""
    G = total_sq.double().sqrt()
    return torch.clamp(torch.full_like(G, max_grad_norm) / G, max=1.0)


def lamb(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    step: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    bias_correction: bool,
    trust_clip: tuple | None,
    layer_adaptation: bool,
    grad_clip: Tensor | float | None = None,
    master_param: Tensor | None = None,
    grad_scale: Tensor | None = None,
    reduce_sums=None,
) -> None:
    """One LAMB step on one parameter, in place on ``param``, its state and ``step``.

    ``grad_clip``: the coefficient c = min(1, max_grad_norm / G) of the global gradient norm (computed over
    every grad of the optimizer by the caller; see :func:`grad_sq_norm`), or None. ``master_param``: the fp32
    master copy of a bf16/fp16 param; the update happens there and the param gets the rounded result.
    ``grad_scale``: GradScaler's scale; the grad is divided by it and written back unscaled (not clipped).
    ``reduce_sums``: for a shard of a tensor (FSDP2), a function that adds ``[‖θ‖², ‖u‖²]`` (float64, of this
    shard) over the ranks holding the other shards, so that the ratio is the whole tensor's.
    """
    theta, g = working_copies(param, grad, master_param, grad_scale)
    if grad_clip is not None:
        g = g * float(grad_clip)

    step.add_(1)
    t = float(step)
    gamma, lam = float(lr), weight_decay

    # Adam's moments (as the Adam reference rounds them).
    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    if bias_correction:
        m_hat = exp_avg / (1 - beta1**t)
        v_hat = exp_avg_sq / (1 - beta2**t)
    else:
        m_hat, v_hat = exp_avg, exp_avg_sq

    # The direction: Adam's plus decoupled weight decay.
    u = m_hat / (v_hat.sqrt() + eps)
    if lam != 0:
        u = u.add(theta, alpha=lam)

    # The trust ratio of this tensor (float64 norms, see the module docstring).
    if layer_adaptation:
        w_norm = torch.linalg.vector_norm(theta, dtype=torch.float64)
        u_norm = torch.linalg.vector_norm(u, dtype=torch.float64)
        if reduce_sums is not None:  # ‖θ‖² and ‖u‖² of every shard, added: the norms of the whole tensor
            w_norm, u_norm = reduce_sums(torch.stack([w_norm, u_norm]).square()).sqrt()
        w_norm, u_norm = float(w_norm), float(u_norm)
        r = w_norm / u_norm if w_norm > 0 and u_norm > 0 else 1.0
        if trust_clip is not None and not math.isnan(r):  # NaN in, NaN out (module docstring)
            r = min(max(r, trust_clip[0]), trust_clip[1])
    else:
        r = 1.0

    theta.add_(u, alpha=-(gamma * r))

    if theta is not param:
        param.copy_(theta)


# The state tensors ``lamb`` takes after (param, grad), by state key; the dispatcher passes them by name.
lamb.OPERANDS = ("exp_avg", "exp_avg_sq", "step")
