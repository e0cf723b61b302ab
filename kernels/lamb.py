"""LAMB update rule for the Triton engine: two passes over the tensors with a deterministic per-tensor reduction
between them, and an optional global-gradient-norm pass before them.

The math is the algorithm box of :class:`fused_optim.FusedLAMB`, operation for operation in the order and with
the roundings of the reference (``fused_optim/reference/lamb.py``):

    g   = grad / s                                  (GradScaler; the unscaled grad is written back, pass 1)
    g   = c · g,   c = min(1, max_grad_norm / G)     (max_grad_norm; c from the global-norm pass, on the device)
    m   = lerp(m, g, 1 − β1);  v = β2 v + (1 − β2) g²          (``adam_moments``, shared with Adam)
    m̂   = m / (1 − β1^t);  v̂ = v / (1 − β2^t)                   (bias_correction; ``bias_correction`` of Adam)
    u   = m̂ / (sqrt(v̂) + ε) + λ θ
    r   = ‖θ‖ / ‖u‖ if both > 0 else 1, clamped to trust_clip;  r = 1 without layer adaptation
    θ   = θ − γ r u

Passes, and bytes per element for fp32 params and grads (the DESIGN.md byte model: 40 B/param):

    [global norm]  only with max_grad_norm: read g -> per-block Σg² (float64)                         4 B
                   segment_sum -> one Σg² per bucket; FusedLAMB adds the buckets and forms c on the device
    pass 1 NORMS   read θ, g, m, v; write m, v; per-block Σθ², Σu² into float64 ``partials[2, n_blocks]``  24 B
                   segment_sum(partials, first_block) -> float64 ``sums[2, n_tensors]``: per-tensor ‖θ‖², ‖u‖²
                   (under FSDP2, ``hp["reduce_sums"]`` all-reduces ``sums`` over the shard groups here)
    pass 2 APPLY   read θ, m, v; recompute u (bitwise the u of pass 1: same code, same inputs); write θ   16 B
    A param group with ``layer_adaptation=False`` has r = 1 and needs no norm: one FUSED pass, 28 B, as Adam.

With bf16/fp16 params and fp32 master weights, θ is the master (read and written in fp32) and the param is
written once, rounded, in the last pass: pass 1 reads θ32, g16, m, v, writes m, v (22 B), pass 2 reads θ32, m, v
and writes θ32, θ16 (18 B). A GradScaler adds the write-back of the unscaled grad in pass 1 (+4 B, as Adam).

Per-tensor steps (kernels/engine.py, "Per-tensor step counters"): every pass reads ``step`` and uses ``step + 1``;
only the last pass of the step (APPLY or FUSED) writes it, through ``engine.last_block_of_tensor``. found_inf
skips every pass, so a skipped step leaves params, state and steps untouched.

Determinism: each block walks its elements in pieces of SUB (kernels/engine.py); each lane adds its squares in piece
order, then ``tl.sum`` (a fixed tree for a compiled kernel) writes the block's sum into its own slot of
``partials``; ``engine.segment_sum`` adds each tensor's slots in a fixed order. No float atomics: the same
inputs give bitwise the same norms, ratios and params on every run.

The sums of squares (Σθ², Σu², Σg²) are float64 from the square on: an fp32 value widened to float64 squares
exactly (24-bit significands, and 2^-298 <= x² <= 2^256 stays inside float64's range), and the partial sums, the
segment sums and the ratio stay float64 to the end, as the reference's ``vector_norm(dtype=float64)``. In fp32
the squares over- and underflow where the norms do not: one finite grad of 1e20 made Σg² = inf (c = 0, every
grad of the step dropped), params or directions of ~1e-24 squared to 0 (r = 1 instead of ‖θ‖ / ‖u‖).
Why it is cheap: the element math stays fp32, and per element pass 1 adds only 2 widenings, 2 float64 multiplies
and 2 float64 adds (the grad pass: 1 of each) to a pass that moves 24 bytes (the grad pass: 4): memory-bound, with
compute to spare. The GPUs we target (A100, H100: sm_80, sm_90) run float64 adds and multiplies at half their
fp32 rate (the CUDA C++ Programming Guide's table of arithmetic instruction throughput; consumer parts: 1/32 or
1/64): a few float64 ops per element at memory speed use a small part of it. Only the accumulators are float64
(2 x 4 per thread in pass 1: 16 registers instead of 8; ``python -m fused_optim.kernels.compile_check
--resources`` reports the kernels). Not yet timed on a GPU: the rows under README.md's Results predate this
change.

The scalars (bias corrections, trust ratio, γ r) are computed in fp64 from fp64 hyperparameters and rounded to
fp32 once, as the reference does on the host; the element math is fp32 with IEEE division and square root and
an explicit FMA exactly where torch uses one (kernels/adam.py). The native rule mirrors this file: same phases,
same partial-sum layout, same fp64 scalar path.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import engine
from .adam import adam_moments, bias_correction

# Which pass one launch of ``_lamb_kernel`` is (compile-time: each compiles to its own kernel).
NORMS = tl.constexpr(0)  # pass 1: moments, per-block partial sums of θ² and u²
APPLY = tl.constexpr(1)  # pass 2: θ -= γ r u, r from the per-tensor sums; advances step
FUSED = tl.constexpr(2)  # layer_adaptation=False: r = 1, moments and update in one pass; advances step


@triton.jit
def _direction(theta, m, v, bc1, bc2, eps, wd, BIAS_CORRECTION: tl.constexpr):
    """u = m̂ / (sqrt(v̂) + ε) + λ θ, rounded as the reference's ``m_hat / (v_hat.sqrt() + eps)`` and
    ``u.add(theta, alpha=wd)`` (one FMA in torch)."""
    if BIAS_CORRECTION:
        m = tl.div_rn(m, bc1)
        v = tl.div_rn(v, bc2)
    u = tl.div_rn(m, tl.sqrt_rn(v) + eps)
    if wd != 0.0:
        u = tl.fma(wd, theta, u)
    return u


@triton.jit
def _lamb_block(
    param, grad, exp_avg, exp_avg_sq, master, offs, mask,
    grad_scale_ptr, grad_clip, bc1, bc2, coef, wd, beta1, one_minus_beta1, beta2, one_minus_beta2, eps,
    MASKED: tl.constexpr, PHASE: tl.constexpr, BIAS_CORRECTION: tl.constexpr, MASTER: tl.constexpr,
    UNSCALE: tl.constexpr, GRAD_CLIP: tl.constexpr,
):
    """One piece of a block in one pass. NORMS returns the piece's θ² and u² per element in float64 (exact squares
    of the fp32 values; 0 in lanes past the tensor's end); what the other passes return is not used."""
    theta_ptr = master if MASTER else param
    theta = engine.load(theta_ptr, offs, mask, MASKED)
    if PHASE == APPLY:
        m = engine.load(exp_avg, offs, mask, MASKED)  # written by pass 1
        v = engine.load(exp_avg_sq, offs, mask, MASKED)
    else:
        g = engine.load(grad, offs, mask, MASKED)
        if UNSCALE:
            g = tl.div_rn(g, tl.load(grad_scale_ptr).to(tl.float32))
            engine.store(grad, offs, g, mask, MASKED)
        if GRAD_CLIP:
            g = g * grad_clip
        m = engine.load(exp_avg, offs, mask, MASKED)
        v = engine.load(exp_avg_sq, offs, mask, MASKED)
        m, v = adam_moments(g, m, v, beta1, one_minus_beta1, beta2, one_minus_beta2)
        engine.store(exp_avg, offs, m, mask, MASKED)
        engine.store(exp_avg_sq, offs, v, mask, MASKED)

    u = _direction(theta, m, v, bc1, bc2, eps, wd, BIAS_CORRECTION)

    if PHASE == NORMS:
        # Widened before squaring: exact, and no fp32 overflow or underflow (module docstring).
        theta64 = theta.to(tl.float64)
        u64 = u.to(tl.float64)
        tt = theta64 * theta64
        uu = u64 * u64
        if MASKED:  # lanes past the tensor's end hold no element
            tt = tl.where(mask, tt, 0.0)
            uu = tl.where(mask, uu, 0.0)
    else:
        tt = theta  # placeholders: only NORMS sums squares (PHASE is a compile-time constant)
        uu = theta
        theta = tl.fma(coef, u, theta)  # the reference's theta.add_(u, alpha=-γr): one FMA
        engine.store(theta_ptr, offs, theta, mask, MASKED)
        if MASTER:
            engine.store(param, offs, theta, mask, MASKED)  # the bf16/fp16 param, rounded once from the master
    return tt, uu


@triton.jit
def _lamb_kernel(
    param_ptrs, grad_ptrs, exp_avg_ptrs, exp_avg_sq_ptrs, master_ptrs, step_ptrs,
    partial_theta, partial_u, sum_theta, sum_u,
    lr: tl.float64, lr_ptr, beta1: tl.float64, beta2: tl.float64, eps: tl.float64, weight_decay: tl.float64,
    clip_lo: tl.float64, clip_hi: tl.float64,
    grad_scale_ptr, found_inf_ptr, grad_clip_ptr,
    numels, block_tensor, block_start, arrivals,
    BLOCK: tl.constexpr, SUB: tl.constexpr, ALIGNED: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, PHASE: tl.constexpr,
    BIAS_CORRECTION: tl.constexpr, MASTER: tl.constexpr, LR_ON_DEVICE: tl.constexpr, UNSCALE: tl.constexpr,
    SKIP_IF_INF: tl.constexpr, GRAD_CLIP: tl.constexpr, TRUST_CLIP: tl.constexpr,
):
    # fp64 scalars (the interpreter passes Python floats; see kernels/adam.py).
    lr = tl.full([], lr, tl.float64)
    beta1 = tl.full([], beta1, tl.float64)
    beta2 = tl.full([], beta2, tl.float64)
    eps = tl.full([], eps, tl.float64)
    weight_decay = tl.full([], weight_decay, tl.float64)
    clip_lo = tl.full([], clip_lo, tl.float64)
    clip_hi = tl.full([], clip_hi, tl.float64)
    skip = 0.0
    if SKIP_IF_INF:  # GradScaler found an inf/NaN: every pass is skipped, step counts included
        skip = tl.load(found_inf_ptr).to(tl.float32)
    if skip == 0.0:
        t, start, n, full = engine.block_of(block_tensor, block_start, numels, BLOCK)
        step_ptr = engine.operand(step_ptrs, t, tl.float32, False)
        step = tl.load(step_ptr) + 1.0  # every pass uses step + 1; only the last pass writes it

        bc1 = tl.full([], 1.0, tl.float32)
        bc2 = tl.full([], 1.0, tl.float32)
        if BIAS_CORRECTION:
            bc1 = bias_correction(beta1, step).to(tl.float32)
            bc2 = bias_correction(beta2, step).to(tl.float32)

        coef = tl.full([], 0.0, tl.float32)  # -γ r, used by APPLY and FUSED
        if PHASE != NORMS:
            if LR_ON_DEVICE:
                lr = tl.load(lr_ptr).to(tl.float64)
            r = tl.full([], 1.0, tl.float64)
            if PHASE == APPLY:
                # The trust ratio of tensor t from its float64 sums of squares, in fp64 as the reference's.
                w_norm = tl.sqrt(tl.load(sum_theta + t))
                u_norm = tl.sqrt(tl.load(sum_u + t))
                both = (w_norm > 0.0) & (u_norm > 0.0)
                r = tl.where(both, w_norm / tl.where(both, u_norm, 1.0), 1.0)
                if TRUST_CLIP:  # a NaN ratio (‖θ‖ = ‖u‖ = inf) stays NaN, as in the reference
                    r = tl.maximum(r, clip_lo, propagate_nan=tl.PropagateNan.ALL)
                    r = tl.minimum(r, clip_hi, propagate_nan=tl.PropagateNan.ALL)
            coef = (-(lr * r)).to(tl.float32)

        grad_clip = tl.full([], 1.0, tl.float32)
        if GRAD_CLIP:
            grad_clip = tl.load(grad_clip_ptr).to(tl.float32)

        param = engine.operand(param_ptrs, t, PARAM_DTYPE, ALIGNED)
        exp_avg = engine.operand(exp_avg_ptrs, t, tl.float32, ALIGNED)
        exp_avg_sq = engine.operand(exp_avg_sq_ptrs, t, tl.float32, ALIGNED)
        grad = param  # not read by APPLY
        if PHASE != APPLY:
            grad = engine.operand(grad_ptrs, t, GRAD_DTYPE, ALIGNED)
        master = param  # not read without master weights
        if MASTER:
            master = engine.operand(master_ptrs, t, tl.float32, ALIGNED)
        scalars = (grad_scale_ptr, grad_clip, bc1, bc2, coef, weight_decay.to(tl.float32),
                   beta1.to(tl.float32), (1.0 - beta1).to(tl.float32),
                   beta2.to(tl.float32), (1.0 - beta2).to(tl.float32), eps.to(tl.float32))
        # NORMS: each lane of the piece adds its element's squares in piece order, then one tl.sum per quantity;
        # float64 accumulators (module docstring), the only float64 values of the element loop.
        acc_theta = tl.zeros([SUB], tl.float64)
        acc_u = tl.zeros([SUB], tl.float64)
        if full:
            for k in range(0, BLOCK, SUB):
                offs, mask = engine.piece(start, k, n, SUB)
                tt, uu = _lamb_block(param, grad, exp_avg, exp_avg_sq, master, offs, mask, *scalars,
                                     False, PHASE, BIAS_CORRECTION, MASTER, UNSCALE, GRAD_CLIP)
                if PHASE == NORMS:
                    acc_theta += tt
                    acc_u += uu
        else:
            for k in range(0, (n - start).to(tl.int32), SUB):
                offs, mask = engine.piece(start, k, n, SUB)
                tt, uu = _lamb_block(param, grad, exp_avg, exp_avg_sq, master, offs, mask, *scalars,
                                     True, PHASE, BIAS_CORRECTION, MASTER, UNSCALE, GRAD_CLIP)
                if PHASE == NORMS:
                    acc_theta += tt
                    acc_u += uu

        if PHASE == NORMS:
            pid = tl.program_id(0)
            tl.store(partial_theta + pid, tl.sum(acc_theta, axis=0))
            tl.store(partial_u + pid, tl.sum(acc_u, axis=0))
        else:
            if engine.last_block_of_tensor(arrivals, t, numels, BLOCK):
                tl.store(step_ptr, step)


OPERANDS = ("param", "grad", "exp_avg", "exp_avg_sq", "master_param", "step")


def lamb(table: engine.TensorTable, hp: dict, *, param_dtype, grad_dtype, master: bool,
         grad_scale=None, found_inf=None):
    """One LAMB step over every tensor of ``table`` (operands in the order of ``OPERANDS``): NORMS,
    segment_sum, APPLY; or one FUSED launch for a group without layer adaptation. Launches: 3 (or 1), whatever
    the number of tensors.

    ``hp``: lr (float or a 1-element tensor on the params' device), beta1, beta2, eps, weight_decay,
    bias_correction, trust_clip (None or (lo, hi)), layer_adaptation, grad_clip (None, or c = min(1,
    max_grad_norm / G) as a 0-d float64 or float32 device tensor; the kernel rounds it to fp32). ``master``: the
    ``master_param`` operand holds fp32 master weights. ``grad_scale``/``found_inf``: device tensors from a
    GradScaler, or None. ``hp["reduce_sums"]`` (optional): a function that adds the per-tensor sums of squares
    (float64 ``[2, n_tensors]``, in place) over the ranks holding the other shards of each tensor (FSDP2).
    """
    lr = hp["lr"]
    lr_on_device = isinstance(lr, torch.Tensor)
    grad_clip = hp.get("grad_clip")
    trust_clip = hp["trust_clip"]
    lo, hi = (0.0, 0.0) if trust_clip is None else (float(trust_clip[0]), float(trust_clip[1]))
    p = table.ptrs
    operands = (p["param"], p["grad"], p["exp_avg"], p["exp_avg_sq"], p["master_param"], p["step"])
    scalars = (0.0 if lr_on_device else float(lr), lr if lr_on_device else None,
               float(hp["beta1"]), float(hp["beta2"]), float(hp["eps"]), float(hp["weight_decay"]), lo, hi,
               grad_scale, found_inf, grad_clip)
    flags = dict(
        PARAM_DTYPE=engine.tl_dtype(param_dtype), GRAD_DTYPE=engine.tl_dtype(grad_dtype),
        BIAS_CORRECTION=bool(hp["bias_correction"]), MASTER=master, LR_ON_DEVICE=lr_on_device,
        UNSCALE=grad_scale is not None, SKIP_IF_INF=found_inf is not None, GRAD_CLIP=grad_clip is not None,
        TRUST_CLIP=trust_clip is not None,
    )
    if not hp["layer_adaptation"]:
        engine.launch(_lamb_kernel, table, *operands, None, None, None, None, *scalars, PHASE=FUSED.value, **flags)
        return

    # Pass 1: moments, and each block's Σθ², Σu² in its own slot (row 0: θ, row 1: u), float64.
    partials = torch.empty((2, table.n_blocks), dtype=torch.float64, device=table.numels.device)
    engine.launch(_lamb_kernel, table, *operands, partials[0], partials[1], None, None, *scalars,
                  PHASE=NORMS.value, **flags)
    # The per-tensor reduction, a visible step: sums[0, i] = ‖θ_i‖², sums[1, i] = ‖u_i‖² (float64). Sums of squares add
    # across shards, so under FSDP2 an all-reduce(SUM) of ``sums`` over the shard groups is all LAMB needs here.
    sums = engine.segment_sum(partials, table.first_block)
    if hp.get("reduce_sums") is not None:
        hp["reduce_sums"](sums)
    # Pass 2: the update with the trust ratio.
    engine.launch(_lamb_kernel, table, *operands, None, None, sums[0], sums[1], *scalars,
                  PHASE=APPLY.value, **flags)


lamb.OPERANDS = OPERANDS


# ----------------------------------------------------------------------------------------------------------------
# The global gradient norm (max_grad_norm): one read of every grad, per-block partial sums, one segment sum.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _grad_sq_piece(grad, offs, mask, grad_scale_ptr, MASKED: tl.constexpr, UNSCALE: tl.constexpr):
    g = engine.load(grad, offs, mask, MASKED)
    if UNSCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr).to(tl.float32))  # the g of pass 1, bitwise
    g = g.to(tl.float64)  # squared exactly, summed in float64: one grad of 1e20 must not make Σg² inf
    gg = g * g
    if MASKED:
        gg = tl.where(mask, gg, 0.0)
    return gg


@triton.jit
def _grad_sq_kernel(
    grad_ptrs, partials, grad_scale_ptr, found_inf_ptr,
    numels, block_tensor, block_start, arrivals,
    BLOCK: tl.constexpr, SUB: tl.constexpr, ALIGNED: tl.constexpr, GRAD_DTYPE: tl.constexpr,
    UNSCALE: tl.constexpr, SKIP_IF_INF: tl.constexpr,
):
    acc = tl.zeros([SUB], tl.float64)  # summed as pass 1 sums θ²: lane-wise over the pieces, then one tl.sum
    skip = 0.0
    if SKIP_IF_INF:  # the step is skipped: read nothing, contribute 0
        skip = tl.load(found_inf_ptr).to(tl.float32)
    if skip == 0.0:
        t, start, n, full = engine.block_of(block_tensor, block_start, numels, BLOCK)
        grad = engine.operand(grad_ptrs, t, GRAD_DTYPE, ALIGNED)
        if full:
            for k in range(0, BLOCK, SUB):
                offs, mask = engine.piece(start, k, n, SUB)
                acc += _grad_sq_piece(grad, offs, mask, grad_scale_ptr, False, UNSCALE)
        else:
            for k in range(0, (n - start).to(tl.int32), SUB):
                offs, mask = engine.piece(start, k, n, SUB)
                acc += _grad_sq_piece(grad, offs, mask, grad_scale_ptr, True, UNSCALE)
    tl.store(partials + tl.program_id(0), tl.sum(acc, axis=0))


def grad_sq_norm(table: engine.TensorTable, *, grad_dtype, grad_scale=None, found_inf=None,
                 per_tensor: bool = False) -> torch.Tensor:
    """Σ g² over every grad of ``table`` (g divided by ``grad_scale`` first, as pass 1 divides it), a 0-d float64
    device tensor (squares and sums in float64); with ``per_tensor`` one sum per tensor, float64 ``[n_tensors]``.
    Two launches (the grad pass and one segment sum), no host synchronization, deterministic."""
    partials = torch.empty((1, table.n_blocks), dtype=torch.float64, device=table.numels.device)
    engine.launch(_grad_sq_kernel, table, table.ptrs["grad"], partials, grad_scale, found_inf,
                  GRAD_DTYPE=engine.tl_dtype(grad_dtype), UNSCALE=grad_scale is not None,
                  SKIP_IF_INF=found_inf is not None)
    if per_tensor:
        return engine.segment_sum(partials, table.first_block)[0]
    # One segment over every block: first_block[0] = 0 and first_block[n_tensors] = n_blocks, on the device.
    whole = table.first_block[:: table.n_tensors].contiguous()
    return engine.segment_sum(partials, whole)[0, 0]


def compile_variants():
    """Variants compiled by kernels/compile_check.py: every pass, flag and dtype path at least once."""
    def make(param_dtype, grad_dtype, master, lr_tensor=False, scaler=False, grad_clip=False, **flags):
        def run():
            from fused_optim.tables import TensorTable
            n = 3
            ops = {name: [torch.zeros(8) for _ in range(n)] for name in OPERANDS}
            ops["param"] = [torch.zeros(8, dtype=param_dtype) for _ in range(n)]
            ops["grad"] = [torch.zeros(8, dtype=grad_dtype) for _ in range(n)]
            ops["step"] = [torch.zeros(()) for _ in range(n)]
            table = TensorTable.build(ops, torch.device("cpu"))
            hp = dict(lr=torch.tensor(1e-3) if lr_tensor else 1e-3, beta1=0.9, beta2=0.999, eps=1e-6,
                      weight_decay=0.01, bias_correction=True, trust_clip=None, layer_adaptation=True,
                      grad_clip=torch.ones((), dtype=torch.float64) if grad_clip else None)
            hp.update(flags)
            scale = torch.ones(()) if scaler else None
            found_inf = torch.zeros(()) if scaler else None
            lamb(table, hp, param_dtype=param_dtype, grad_dtype=grad_dtype, master=master, grad_scale=scale,
                 found_inf=found_inf)
            if grad_clip:
                grad_sq_norm(table, grad_dtype=grad_dtype, grad_scale=scale, found_inf=found_inf)
        return run
    return [
        ("fp32", make(torch.float32, torch.float32, False)),
        ("fp32-fused-no_bias_correction-lr_tensor-scaler-grad_clip",
         make(torch.float32, torch.float32, False, lr_tensor=True, scaler=True, grad_clip=True,
              layer_adaptation=False, bias_correction=False)),
        ("bf16-master-scaler-grad_clip-trust_clip",
         make(torch.bfloat16, torch.bfloat16, True, scaler=True, grad_clip=True, trust_clip=(0.0, 10.0))),
        ("fp16-param-fp32-grad-grad_clip", make(torch.float16, torch.float32, False, grad_clip=True)),
    ]
