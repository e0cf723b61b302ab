"""Adam / AdamW update rule for the Triton engine, and its launcher.

The math is the algorithm box of :class:`fused_optim.FusedAdam`, in the order of the reference
(``fused_optim/reference/adam.py``), which follows torch.optim's single-tensor Adam:

    g   = grad / grad_scale                                (GradScaler; the unscaled grad is written back)
    g   = -g                                               (maximize)
    θ   = θ · (1 - γλ)      or   g = g + λθ                (decoupled (AdamW) or L2 (Adam) weight decay)
    m   = lerp(m, g, 1 - β1)
    v   = β2·v + (1 - β2)·g·g
    v̂max = max(v̂max, v)                                    (amsgrad)
    θ   = θ - (γ / (1 - β1^t)) · m / (sqrt(v) / sqrt(1 - β2^t) + ε)

Variants are compile-time flags; hyperparameters that change during training (lr, step, grad scale) are runtime
values, so a scheduler never triggers a recompile. Scalar coefficients (bias corrections, step size, decay
factor) are computed in fp64 from fp64 hyperparameters, as torch does on the host, and rounded to fp32 once;
the element math is fp32 with IEEE division and square root (``div_rn``, ``sqrt_rn``), no FMA contraction by the
compiler, and an explicit FMA exactly where torch's kernels use one (lerp, addcmul, add with alpha). That last
point matters: where g ≈ -λθ the L2 gradient cancels to |g + λθ| ~ eps and the update amplifies a one-ulp
difference in it by up to lr/eps (tests/tolerances.py).

Bytes per element (fp32 param and grad): read θ, g, m, v and write θ, m, v = 28; with master weights and a bf16
param: read θ32, g16, m, v and write θ32, θ16, m, v = 28; unscaling with a GradScaler writes g back: +4.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import engine


@triton.jit
def _lerp(start, end, weight):
    # torch's lerp: the formula switches at weight 0.5 so that both ends are exact; torch evaluates each branch
    # as one FMA (vectorized fmadd on CPU, contracted by nvcc on CUDA), and so do we.
    # One structured if with a single return: an early `return` in each branch of a run-time condition becomes
    # unstructured control flow (cf.cond_br), which Triton 3.6 cannot inline into the callers' scf.if regions
    # ("failed to legalize unresolved materialization" at ConvertTritonToTritonGPU).
    if weight < 0.5:
        out = tl.fma(weight, end - start, start)
    else:
        out = tl.fma(-(end - start), 1.0 - weight, end)
    return out


@triton.jit
def adam_moments(g, m, v, beta1_c, one_minus_beta1, beta2_c, one_minus_beta2):
    """The Adam moment update, shared with LAMB: m = lerp(m, g, 1 - β1); v = β2 v + (1 - β2) g².

    Rounded as torch rounds ``exp_avg.lerp_(g, 1 - β1)`` and ``exp_avg_sq.mul_(β2).addcmul_(g, g, 1 - β2)`` on the
    device the kernel runs for (``engine.CUDA_ROUNDING``): torch's CUDA addcmul is fma(1 - β2, g g, β2 v) (ATen's
    pointwise_op_impl rounds the product of the two tensors first), its CPU addcmul fma((1 - β2) g, g, β2 v).
    """
    m = _lerp(m, g, one_minus_beta1)
    if engine.CUDA_ROUNDING:
        v = tl.fma(one_minus_beta2, g * g, v * beta2_c)
    else:
        v = tl.fma(one_minus_beta2 * g, g, v * beta2_c)
    return m, v


@triton.jit
def bias_correction(beta, step):
    """1 - beta**step in fp64 (beta fp64, step fp32 scalar); beta = 0 gives 1."""
    return 1.0 - tl.exp2(step.to(tl.float64) * tl.log2(beta))


@triton.jit
def _adam_elements(
    param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, offs, mask,
    grad_scale_ptr, step_size, bc2_sqrt, decay, wd, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    MASKED: tl.constexpr, AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr,
    MASTER: tl.constexpr, UNSCALE: tl.constexpr,
):
    """The per-element Adam update of one piece of a block (all fp32 in registers)."""
    g = engine.load(grad, offs, mask, MASKED)
    if UNSCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr).to(tl.float32))
        engine.store(grad, offs, g, mask, MASKED)
    if MAXIMIZE:
        g = -g

    theta_ptr = master if MASTER else param
    theta = engine.load(theta_ptr, offs, mask, MASKED)
    if wd != 0.0:
        if DECOUPLED:
            theta = theta * decay
        else:
            g = tl.fma(wd, theta, g)  # torch's grad.add(param, alpha=wd) is one FMA

    m = engine.load(exp_avg, offs, mask, MASKED)
    v = engine.load(exp_avg_sq, offs, mask, MASKED)
    m, v = adam_moments(g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2)
    engine.store(exp_avg, offs, m, mask, MASKED)
    engine.store(exp_avg_sq, offs, v, mask, MASKED)
    if AMSGRAD:
        # torch.maximum propagates a NaN from either side (so does the native rule's max_nan); tl.maximum's
        # default (maxnumf) returns the other operand, which would drop a NaN grad from v̂max
        v = tl.maximum(engine.load(max_exp_avg_sq, offs, mask, MASKED), v, propagate_nan=tl.PropagateNan.ALL)
        engine.store(max_exp_avg_sq, offs, v, mask, MASKED)

    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    theta = theta + tl.div_rn(-step_size * m, denom)

    engine.store(theta_ptr, offs, theta, mask, MASKED)
    if MASTER:
        engine.store(param, offs, theta, mask, MASKED)  # the bf16/fp16 param, rounded once from the master


@triton.jit
def _adam_kernel(
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, max_exp_avg_sq_ptrs, master_ptrs, step_ptrs,
    lr: tl.float64, lr_ptr, beta1: tl.float64, beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
    grad_scale_ptr, found_inf_ptr,
    numels, block_tensor, block_start, arrivals,
    BLOCK: tl.constexpr, SUB: tl.constexpr, ALIGNED: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr,
    AMSGRAD: tl.constexpr, MAXIMIZE: tl.constexpr, DECOUPLED: tl.constexpr, MASTER: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr, UNSCALE: tl.constexpr, SKIP_IF_INF: tl.constexpr,
):
    # Promote the hyperparameters to fp64 scalars. (Compiled, they already are: see the annotations; the
    # interpreter passes Python floats, which tl.full turns into fp64 without a detour through fp32.)
    lr = tl.full([], lr, tl.float64)
    beta1 = tl.full([], beta1, tl.float64)
    beta2 = tl.full([], beta2, tl.float64)
    eps = tl.full([], eps, tl.float64)
    weight_decay = tl.full([], weight_decay, tl.float64)
    skip = 0.0
    if SKIP_IF_INF:  # GradScaler found an inf/NaN: the whole step is skipped, step counts included
        skip = tl.load(found_inf_ptr).to(tl.float32)
    if skip == 0.0:
        t, start, n, full = engine.block_of(block_tensor, block_start, numels, BLOCK)
        step_ptr = engine.operand(step_ptrs, t, tl.float32, False)
        step = tl.load(step_ptr) + 1.0
        if LR_ON_DEVICE:
            lr = tl.load(lr_ptr).to(tl.float64)

        bc1 = bias_correction(beta1, step)
        bc2 = bias_correction(beta2, step)
        step_size = (lr / bc1).to(tl.float32)
        bc2_sqrt = tl.sqrt(bc2).to(tl.float32)  # fp64 sqrt is IEEE-rounded
        decay = (1.0 - lr * weight_decay).to(tl.float32)

        param = engine.operand(param_ptrs, t, PARAM_DTYPE, ALIGNED)
        grad = engine.operand(grad_ptrs, t, GRAD_DTYPE, ALIGNED)
        exp_avg = engine.operand(exp_avg_ptrs, t, tl.float32, ALIGNED)
        exp_avg_sq = engine.operand(exp_avg_sq_ptrs, t, tl.float32, ALIGNED)
        max_exp_avg_sq = engine.operand(max_exp_avg_sq_ptrs, t, tl.float32, ALIGNED)
        master = engine.operand(master_ptrs, t, tl.float32, ALIGNED)
        scalars = (grad_scale_ptr, step_size, bc2_sqrt, decay, weight_decay.to(tl.float32),
                   beta1.to(tl.float32), (1.0 - beta1).to(tl.float32),
                   beta2.to(tl.float32), (1.0 - beta2).to(tl.float32), eps.to(tl.float32))
        if full:
            for k in range(0, BLOCK, SUB):
                offs, mask = engine.piece(start, k, n, SUB)
                _adam_elements(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, offs, mask, *scalars,
                               False, AMSGRAD, MAXIMIZE, DECOUPLED, MASTER, UNSCALE)
        else:
            for k in range(0, (n - start).to(tl.int32), SUB):
                offs, mask = engine.piece(start, k, n, SUB)
                _adam_elements(param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master, offs, mask, *scalars,
                               True, AMSGRAD, MAXIMIZE, DECOUPLED, MASTER, UNSCALE)

        if engine.last_block_of_tensor(arrivals, t, numels, BLOCK):
            tl.store(step_ptr, step)


OPERANDS = ("param", "grad", "exp_avg", "exp_avg_sq", "max_exp_avg_sq", "master_param", "step")


def adam(table: engine.TensorTable, hp: dict, *, param_dtype, grad_dtype, master: bool,
         grad_scale=None, found_inf=None):
    """One launch of the Adam rule over every tensor of ``table`` (operands in the order of ``OPERANDS``).

    ``hp``: lr (float or a 1-element tensor on the params' device), beta1, beta2, eps, weight_decay, amsgrad,
    maximize, decoupled_weight_decay. ``master``: the table's ``master_param`` operand holds fp32 master weights.
    ``grad_scale``/``found_inf``: device tensors from a GradScaler, or None.
    """
    lr = hp["lr"]
    lr_on_device = isinstance(lr, torch.Tensor)
    p = table.ptrs
    engine.launch(
        _adam_kernel, table,
        p["param"], p["grad"], p["exp_avg"], p["exp_avg_sq"], p["max_exp_avg_sq"], p["master_param"], p["step"],
        0.0 if lr_on_device else float(lr), lr if lr_on_device else None,
        float(hp["beta1"]), float(hp["beta2"]), float(hp["eps"]), float(hp["weight_decay"]),
        grad_scale, found_inf,
        PARAM_DTYPE=engine.tl_dtype(param_dtype), GRAD_DTYPE=engine.tl_dtype(grad_dtype),
        AMSGRAD=bool(hp["amsgrad"]), MAXIMIZE=bool(hp["maximize"]),
        DECOUPLED=bool(hp["decoupled_weight_decay"]), MASTER=master,
        LR_ON_DEVICE=lr_on_device, UNSCALE=grad_scale is not None, SKIP_IF_INF=found_inf is not None,
    )


adam.OPERANDS = OPERANDS


def compile_variants():
    """Variants compiled by kernels/compile_check.py: every flag and dtype path at least once."""
    def make(param_dtype, grad_dtype, master, lr_tensor=False, scaler=False, **flags):
        def run():
            from fused_optim.tables import TensorTable
            n = 3
            ops = {name: [torch.zeros(8) for _ in range(n)] for name in OPERANDS}
            ops["param"] = [torch.zeros(8, dtype=param_dtype) for _ in range(n)]
            ops["grad"] = [torch.zeros(8, dtype=grad_dtype) for _ in range(n)]
            ops["step"] = [torch.zeros(()) for _ in range(n)]
            hp = dict(lr=torch.tensor(1e-3) if lr_tensor else 1e-3, beta1=0.9, beta2=0.999, eps=1e-8,
                      weight_decay=0.1, amsgrad=False, maximize=False, decoupled_weight_decay=True)
            hp.update(flags)
            adam(TensorTable.build(ops, torch.device("cpu")), hp, param_dtype=param_dtype, grad_dtype=grad_dtype,
                 master=master, grad_scale=torch.ones(()) if scaler else None,
                 found_inf=torch.zeros(()) if scaler else None)
        return run
    return [
        ("fp32", make(torch.float32, torch.float32, False)),
        ("fp32-amsgrad-maximize-l2-lr_tensor-scaler",
         make(torch.float32, torch.float32, False, lr_tensor=True, scaler=True, amsgrad=True, maximize=True,
              decoupled_weight_decay=False)),
        ("bf16-master-scaler", make(torch.bfloat16, torch.bfloat16, True, scaler=True)),
        ("fp16", make(torch.float16, torch.float16, False)),
        ("bf16-param-fp32-grad", make(torch.bfloat16, torch.float32, False)),
    ]
