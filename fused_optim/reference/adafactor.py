"""Reference Adafactor: one step on one tensor, in the symbols of :class:`fused_optim.FusedAdafactor`.

Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost" (ICML 2018), Algorithms 4 and 5
with relative step sizes, update clipping and optional momentum, as implemented by Hugging Face transformers'
``transformers.optimization.Adafactor`` (itself from fairseq): the same keywords, defaults, state keys and order
of operations. Tensors of rank >= 2 are factored over their last two dims (leading dims are a batch of
matrices); rank 0 and 1 keep a full second moment.

Where this spec follows transformers, and where it deliberately differs
-----------------------------------------------------------------------
Follows:
* eps1 (``eps[0]``, 1e-30) is added to g² *before* the row/column means, a fixed constant whatever the dtype (the
  paper's Algorithm 4). torch.optim.Adafactor instead defaults eps1 to ``finfo(param.dtype).eps`` and clamps the
  variance estimate at eps1²: for bf16 params that floor is 6e-5, far above typical g², which is the "breaks bf16"
  of issue 5.
* RMS(θ) is taken *before* this step's update and weight decay; ``α = ρ · max(eps2, RMS(θ))``.
* weight decay ``θ ← θ − λ·α·θ`` uses α (lr times the parameter scale), before the update is subtracted.
* with β1 the momentum averages the already-scaled update (``m`` is in parameter units), as transformers does.
* R and C are EMAs of row and column *means* (not sums): V̂ = R Cᵀ / mean(R), which is the paper's
  R Cᵀ / (1ᵀ R) with sums.
* bf16/fp16 params: the math is fp32 and the param is written back rounded once.

Differs (each difference is a few fp32 ulps of a scalar, or a choice about an edge transformers leaves undefined):
* Scalars are fp64 from fp32 sums: RMS(θ) = sqrt(Σθ² / n) and RMS(U) = sqrt(ΣU² / n) with the sums in fp32;
  transformers uses ``norm(2) / sqrt(n)`` in fp32. α and the clipped scale ``α / max(1, RMS(U)/d)`` are formed in
  fp64 and rounded to fp32 once; transformers rounds α to fp32 (a tensor) and applies ``U / max(1, RMS(U)/d)``
  and ``· α`` as two fp32 operations. The fused kernels compute these scalars on the device the same way as
  here, so the backends differ from this spec only in the order of their fp32 sums.
* Means are written ``sum / count`` (what torch's ``mean`` does on CPU; on CUDA it multiplies by 1/count).
* A zero-size param only advances ``step``; transformers would compute NaN row/column means for it.
* ``step`` is a float32 scalar tensor (as torch.optim), transformers keeps a Python int and an extra ``RMS``
  state entry (not kept here: it is recomputed every step). A transformers state_dict loads as it is.
* With ``master_weights`` a bf16/fp16 param keeps an fp32 copy; transformers re-reads the rounded param every
  step, so updates smaller than half an ulp of the param are lost there.
* GradScaler: the grad is unscaled here (``g / s``, written back to ``param.grad``), as for Adam.
"""
from __future__ import annotations

import math

from torch import Tensor

from .adam import working_copies


def relative_step_size(t: float, *, lr, relative_step: bool, warmup_init: bool) -> float:
    """ρ_t: ``min(1e-6·t if warmup_init else 1e-2, 1/sqrt(t))`` with relative steps, else the lr (fp64)."""
    if relative_step:
        return min(1e-6 * t if warmup_init else 1e-2, 1.0 / math.sqrt(t))
    return float(lr)


def rms(sum_of_squares: Tensor, numel: int) -> float:
    """RMS from an fp32 sum of squares: the square root in fp64, as the kernels do."""
    return math.sqrt(float(sum_of_squares) / numel)


def adafactor(
    param: Tensor,
    grad: Tensor,
    exp_avg_sq_row: Tensor | None,
    exp_avg_sq_col: Tensor | None,
    exp_avg_sq: Tensor | None,
    exp_avg: Tensor | None,
    step: Tensor,
    *,
    lr,
    eps1: float,
    eps2: float,
    clip_threshold: float,
    decay_rate: float,
    beta1: float | None,
    weight_decay: float,
    scale_parameter: bool,
    relative_step: bool,
    warmup_init: bool,
    master_param: Tensor | None = None,
    grad_scale: Tensor | None = None,
) -> None:
    """One Adafactor step on one parameter, in place on ``param``, its state and ``step``.

    Factored (rank >= 2, ``exp_avg_sq_row``/``exp_avg_sq_col`` given) or not (``exp_avg_sq`` given); ``exp_avg``
    when ``beta1`` is set. ``master_param``: fp32 master copy of a bf16/fp16 param. ``grad_scale``: GradScaler's
    scale; the grad is divided by it and written back unscaled.
    """
    theta, g = working_copies(param, grad, master_param, grad_scale)

    step.add_(1)
    t = float(step)
    n = param.numel()
    if n == 0:
        return

    # Step size: ρ_t, then α_t = ρ_t · max(eps2, RMS(θ_{t-1})) (RMS before weight decay and update).
    rho = relative_step_size(t, lr=lr, relative_step=relative_step, warmup_init=warmup_init)
    alpha = rho * max(eps2, rms(theta.square().sum(), n)) if scale_parameter else rho
    beta2_t = 1.0 - t ** decay_rate  # β̂2_t; 0 at t = 1, so the first step takes g² + eps1 as it is

    # Second-moment statistics of g² + eps1.
    sq = g * g + eps1
    if exp_avg_sq_row is not None:
        rows, cols = g.shape[-2], g.shape[-1]
        R, C = exp_avg_sq_row, exp_avg_sq_col
        R.mul_(beta2_t).add_(sq.sum(dim=-1) / cols, alpha=1.0 - beta2_t)  # EMA of row means    [..., n]
        C.mul_(beta2_t).add_(sq.sum(dim=-2) / rows, alpha=1.0 - beta2_t)  # EMA of column means [..., m]
        mean_R = R.sum(dim=-1, keepdim=True) / rows
        # U = g / sqrt(V̂), V̂ = R Cᵀ / mean(R), as rsqrt(R / mean(R)) ⊗ rsqrt(C) times g: never an n×m V̂ here
        # either in the kernels; transformers' _approx_sq_grad has the same form.
        U = ((R / mean_R).rsqrt().unsqueeze(-1) * C.rsqrt().unsqueeze(-2)) * g
    else:
        V = exp_avg_sq
        V.mul_(beta2_t).add_(sq, alpha=1.0 - beta2_t)
        U = V.rsqrt() * g

    # Update clipping: U / max(1, RMS(U)/d), then scaled by α (one fp32 coefficient).
    scale = alpha / max(1.0, rms(U.square().sum(), n) / clip_threshold)
    update = U * scale

    if beta1 is not None:
        exp_avg.mul_(beta1).add_(update, alpha=1.0 - beta1)
        update = exp_avg

    if weight_decay != 0:
        theta.add_(theta, alpha=-weight_decay * alpha)  # θ − λ·α·θ, with θ before the update
    theta.sub_(update)

    if theta is not param:
        param.copy_(theta)


# The state tensors ``adafactor`` takes after (param, grad), by state key; the dispatcher passes them by name.
adafactor.OPERANDS = ("exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg", "step")
