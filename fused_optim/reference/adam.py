"""Reference Adam / AdamW: one step on one tensor, in the symbols of :class:`fused_optim.FusedAdam`.

Follows torch.optim's ``_single_tensor_adam`` (non-capturable branch) operation for operation, so that in
float64 it equals ``torch.optim.Adam``/``AdamW`` to rounding (tests/test_reference.py). Kingma & Ba, "Adam: A
Method for Stochastic Optimization" (2015); decoupled weight decay from Loshchilov & Hutter, "Decoupled Weight
Decay Regularization" (2019); amsgrad from Reddi et al., "On the Convergence of Adam and Beyond" (2018).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor


def compute_dtype(param: Tensor) -> torch.dtype:
    """The dtype the math runs in: fp64 for fp64 params, fp32 otherwise (bf16/fp16 are stored, not computed)."""
    return torch.float64 if param.dtype == torch.float64 else torch.float32


def working_copies(param: Tensor, grad: Tensor, master_param: Tensor | None, grad_scale: Tensor | None):
    """(theta, g) in the compute dtype, shared by every reference rule: theta is the fp32 master copy when there is
    one, else the param itself (fp32/fp64) or an fp32 copy of it (bf16/fp16; the rule writes the rounded result
    back with ``param.copy_(theta)``). With a GradScaler the grad is divided by its scale and written back
    unscaled, as torch's fused optimizers do."""
    dtype = compute_dtype(param)
    theta = master_param if master_param is not None else param.to(dtype)
    g = grad.to(dtype)
    if grad_scale is not None:
        g = g / grad_scale.to(dtype)
        grad.copy_(g)
    return theta, g


def adam(
    param: Tensor,
    grad: Tensor,
    exp_avg: Tensor,
    exp_avg_sq: Tensor,
    max_exp_avg_sq: Tensor | None,
    step: Tensor,
    *,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    amsgrad: bool,
    maximize: bool,
    decoupled_weight_decay: bool,
    master_param: Tensor | None = None,
    grad_scale: Tensor | None = None,
) -> None:
    """One Adam step on one parameter, in place on ``param``, its state and ``step``.

    ``master_param``: the fp32 master copy of a bf16/fp16 param; the update happens there and the param gets the
    rounded result. ``grad_scale``: GradScaler's scale; the grad is divided by it and written back unscaled.
    """
    theta, g = working_copies(param, grad, master_param, grad_scale)
    if maximize:
        g = -g

    step.add_(1)
    t = float(step)
    gamma, lam = float(lr), weight_decay

    if lam != 0:
        if decoupled_weight_decay:
            theta.mul_(1 - gamma * lam)
        else:
            g = g.add(theta, alpha=lam)

    exp_avg.lerp_(g, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)

    bias_correction1 = 1 - beta1**t
    bias_correction2 = 1 - beta2**t
    step_size = gamma / bias_correction1
    bias_correction2_sqrt = math.sqrt(bias_correction2)

    if amsgrad:
        torch.maximum(max_exp_avg_sq, exp_avg_sq, out=max_exp_avg_sq)
        v_hat = max_exp_avg_sq
    else:
        v_hat = exp_avg_sq
    denom = (v_hat.sqrt() / bias_correction2_sqrt).add_(eps)
    theta.addcdiv_(exp_avg, denom, value=-step_size)

    if theta is not param:
        param.copy_(theta)


# The state tensors ``adam`` takes after (param, grad), by state key; the dispatcher passes them by name.
adam.OPERANDS = ("exp_avg", "exp_avg_sq", "max_exp_avg_sq", "step")
