"""Adafactor for the Triton engine: three passes over the grads on the 2-D tile map, reductions on the device.

The math is the algorithm box of :class:`fused_optim.FusedAdafactor`, in the order of the reference
(``fused_optim/reference/adafactor.py``), which follows transformers' ``Adafactor``. One step of a bucket (all
its tensors at once, whatever their number) is seven launches, each a visible step:

    1. pass 1 (tiles)   per tile: row and column partial sums of g² + ε1 (matrices); Σθ² (every tensor)
    2. reduction        row sums, column sums, Σθ² per tensor        (segment_sums over stat_seg)
    3. statistics       R_t = β̂ R + (1 - β̂) rowsum / m, C_t likewise, in the state and the stats buffer
    4. reduction        ΣR_t per matrix: mean(R_t)                     (segment_sums over batch_seg)
    5. pass 2 (tiles)   U = g / sqrt(V̂) in registers; ΣU² per tile; flat tensors: V_t = β̂ V + (1 - β̂)(g² + ε1)
    6. reduction        ΣU² per tensor: RMS(U)                          (segment_sums over tile_seg)
    7. pass 3 (tiles)   U again, scaled by α / max(1, RMS(U)/d); momentum; weight decay; θ -= update; step += 1

Under FSDP (row-sharded matrices) steps 2, 4 and 6 are where an all-reduce over the sharded mesh dimensions goes
(column sums, Σθ², ΣU²; ΣR and row sums when rows are sharded): each is a launch of its own, reading and writing
small buffers. For matrices, V̂ = R Cᵀ / mean(R) and U are never stored: each tile of pass 2 and 3 loads its
TILE_R entries of R and TILE_C of C and forms U = (rsqrt(R / mean R) ⊗ rsqrt(C)) · g in registers. Row and column
sums are partial sums per tile finished in a fixed order: reruns are bitwise equal (no float atomics).

Scalars come from the step tensors and the reductions, on the device, in fp64, rounded to fp32 once, exactly as
the reference forms them: ρ_t, RMS(θ) = sqrt(Σθ² / n), α_t, β̂2_t = 1 - t^c (as exp2(c·log2 t)), the clipped
scale α / max(1, RMS(U)/d), the decay coefficient -λα. No value is read back to the host, so a step can be
captured in a CUDA graph. The element math is fp32 with IEEE division and square root (``div_rn``, ``sqrt_rn``),
no FMA contraction, and an explicit FMA where torch's ``add(alpha=)`` uses one (the EMAs, momentum, decay).
The backends then differ from the reference only in the order of their fp32 sums (tests/tolerances.py).

Byte model (bytes per parameter element, fp32 param and grad, no momentum):
    matrices:  pass 1 reads g, θ (8); pass 2 reads g (4); pass 3 reads g, θ and writes θ (12)      = 24
               (+ R and C: n + m floats read per tile row/column, and the partial sums: about
               4 · (1/TILE_C + 1/TILE_R) = 0.16 B/element written and read back with the default 32 x 128 tile)
    rank 0/1:  pass 1 reads θ (4); pass 2 reads g, V, writes V (12); pass 3 reads g, V, θ, writes θ (16) = 32
    with β1:   + read and write m in pass 3: +8
    bf16 param and grad, fp32 master (matrices): g 3 x 2, master 4 + 4 + 4, param write 2               = 20
    bf16 param and grad, no master (matrices): g 3 x 2, param 2 + 2 + 2                                 = 12
    GradScaler: the unscaled grad is written back in pass 3: + 4 (fp32 grads)
transformers' Adafactor, for comparison, makes four full-size temporaries per matrix (g², g² + ε1, the outer
product of the row and column factors, -update) and passes over full-size tensors 21 times: RMS(θ) 4, g² 8,
+ε1 8, the two means 8, the outer product 4, ·g 12, RMS(U) 4, /clip 8, ·α 8, negation 8, θ + (-update) 12
= 84 B/element (fp32), plus a launch per operation per tensor and a host sync per tensor (``max(eps2, RMS)``
is taken in Python; one more with weight decay, whose alpha is a tensor).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from fused_optim.tables import TileTable

from . import engine


# ----------------------------------------------------------------------------------------------------------------
# Element math, shared by the passes. (Few nested jit calls: under TRITON_INTERPRET, how CI runs these kernels,
# each one costs about a millisecond per program; one-line helpers are written inline.)
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _beta2(step, decay_rate):
    """β̂2_t = 1 - t^c and 1 - β̂2_t, formed in fp64 as the reference does (``1.0 - t ** decay_rate``) and rounded
    to fp32 once; t = step (fp32 scalar or block), c = decay_rate (fp64)."""
    beta2 = 1.0 - tl.exp2(decay_rate * tl.log2(step.to(tl.float64)))
    return beta2.to(tl.float32), (1.0 - beta2).to(tl.float32)


@triton.jit
def _factored_u(g, stats, batch_sums, tm, b, r, c, n, m):
    """U = (rsqrt(R / mean R) ⊗ rsqrt(C)) · g for one tile of matrix ``b``: R_t and C_t are read from the
    statistics buffer (TILE_R and TILE_C entries), V̂ is never formed. The same operations in the same order as
    the reference (and transformers' ``_approx_sq_grad``). rsqrt is 1 / sqrt, both IEEE-rounded (at most 2u from
    exact); torch's CPU ``rsqrt`` is a different rounding (measured: 1.5u from exact, unequal on 13% of inputs),
    which the parity bounds account for (tests/tolerances.py, ADAFACTOR_NOTES)."""
    R = tl.load(stats + tl.load(tm + engine.TM_ROW_BASE) + b * n + r, mask=r < n, other=1.0)
    C = tl.load(stats + tl.load(tm + engine.TM_COL_BASE) + b * m + c, mask=c < m, other=1.0)
    mean_r = tl.div_rn(tl.load(batch_sums + tl.load(tm + engine.TM_BATCH_BASE) + b), n.to(tl.float32))
    ones_r = tl.full(R.shape, 1.0, tl.float32)
    r_factor = tl.div_rn(ones_r, tl.sqrt_rn(tl.div_rn(R, ones_r * mean_r)))
    c_factor = tl.div_rn(tl.full(C.shape, 1.0, tl.float32), tl.sqrt_rn(C))
    return (r_factor[:, None] * c_factor[None, :]) * g


# ----------------------------------------------------------------------------------------------------------------
# Pass 1: row/column partial sums of g² + ε1 and Σθ² per tile.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _pass1_tile(theta_ptr, grad, partials, tm, b, rt, ct, r, c, n, m, offs, mask, grad_scale_ptr, eps1, matrix,
                MASKED: tl.constexpr, UNSCALE: tl.constexpr):
    theta = engine.load(theta_ptr, offs, mask, MASKED)
    theta_sq = theta * theta
    if MASKED:
        theta_sq = tl.where(mask, theta_sq, 0.0)
    if matrix != 0:
        g = engine.load(grad, offs, mask, MASKED)
        if UNSCALE:
            g = tl.div_rn(g, tl.load(grad_scale_ptr).to(tl.float32))
        sq = g * g + eps1
        if MASKED:
            sq = tl.where(mask, sq, 0.0)
        engine.store_tile_partials(partials, tm, b, rt, ct, r, c, n, m, tl.sum(sq, axis=1), tl.sum(sq, axis=0))
    return tl.sum(tl.sum(theta_sq, axis=1), axis=0)


@triton.jit
def _pass1_kernel(
    param_ptrs, grad_ptrs, master_ptrs, grad_scale_ptr, found_inf_ptr, partials, n_partials, eps1: tl.float64,
    tile_tensor, meta, arrivals,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr, ALIGNED: tl.constexpr, COL_MULTIPLE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MASTER: tl.constexpr, UNSCALE: tl.constexpr,
    SKIP_IF_INF: tl.constexpr,
):
    skip = 0.0
    if SKIP_IF_INF:  # GradScaler found an inf/NaN: every launch of the step does nothing
        skip = tl.load(found_inf_ptr).to(tl.float32)
    if skip == 0.0:
        t, tm, b, rt, ct, r, c, n, m, offs, mask, full = engine.tile_of(tile_tensor, meta, TILE_R, TILE_C,
                                                                         COL_MULTIPLE)
        matrix = tl.load(tm + engine.TM_MATRIX)
        if MASTER:
            theta_ptr = engine.operand(master_ptrs, t, tl.float32, ALIGNED)
        else:
            theta_ptr = engine.operand(param_ptrs, t, PARAM_DTYPE, ALIGNED)
        grad = engine.operand(grad_ptrs, t, GRAD_DTYPE, ALIGNED)
        eps1_32 = tl.full([], eps1, tl.float64).to(tl.float32)
        if full:
            theta_sq = _pass1_tile(theta_ptr, grad, partials, tm, b, rt, ct, r, c, n, m, offs, mask, grad_scale_ptr,
                                   eps1_32, matrix, False, UNSCALE)
        else:
            theta_sq = _pass1_tile(theta_ptr, grad, partials, tm, b, rt, ct, r, c, n, m, offs, mask, grad_scale_ptr,
                                   eps1_32, matrix, True, UNSCALE)
        tl.store(partials + n_partials + tl.program_id(0), theta_sq)  # per-tile Σθ², after the row/col partials


# ----------------------------------------------------------------------------------------------------------------
# Step 3: R_t and C_t from the finished row and column sums (elementwise on the statistics vector).
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _statistics_kernel(
    row_ptrs, col_ptrs, step_ptrs, stats, decay_rate: tl.float64, found_inf_ptr,
    stat_tensor, meta, n_rows, n_stats,
    BLOCK: tl.constexpr, SKIP_IF_INF: tl.constexpr,
):
    skip = 0.0
    if SKIP_IF_INF:
        skip = tl.load(found_inf_ptr).to(tl.float32)
    if skip == 0.0:
        i, mask, t, is_row, j = engine.stat_of(stat_tensor, meta, n_rows, n_stats, BLOCK)
        # The state entry: exp_avg_sq_row[j] or exp_avg_sq_col[j] of tensor t (a gathered pointer per entry).
        address = tl.where(is_row, tl.load(row_ptrs + t, mask=mask, other=0),
                           tl.load(col_ptrs + t, mask=mask, other=0))
        state = address.to(tl.pointer_type(tl.float32)) + j
        # A row mean is over the matrix's m columns, a column mean over its n rows.
        count = tl.where(is_row, tl.load(meta + t * engine.TM_WIDTH + engine.TM_COLS, mask=mask, other=1),
                         tl.load(meta + t * engine.TM_WIDTH + engine.TM_ROWS, mask=mask, other=1))
        step_ptr = tl.load(step_ptrs + t, mask=mask, other=0).to(tl.pointer_type(tl.float32))
        step = tl.load(step_ptr, mask=mask, other=0.0) + 1.0
        beta2, one_minus_beta2 = _beta2(step, tl.full([], decay_rate, tl.float64))
        mean = tl.div_rn(tl.load(stats + i, mask=mask, other=0.0), count.to(tl.float32))
        x = tl.load(state, mask=mask, other=0.0)
        x = tl.fma(one_minus_beta2, mean, x * beta2)  # torch: x.mul_(β̂).add_(mean, alpha=1 - β̂), one FMA
        tl.store(state, x, mask=mask)
        tl.store(stats + i, x, mask=mask)  # passes 2 and 3 read R_t and C_t here; step 4 sums R_t


# ----------------------------------------------------------------------------------------------------------------
# Pass 2: ΣU² per tile (and V_t of flat tensors).
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _pass2_tile(grad, exp_avg_sq_ptrs, stats, batch_sums, t, tm, b, r, c, n, m, offs, mask, grad_scale_ptr, eps1,
                beta2, one_minus_beta2, matrix, ALIGNED: tl.constexpr, MASKED: tl.constexpr,
                UNSCALE: tl.constexpr):
    g = engine.load(grad, offs, mask, MASKED)
    if UNSCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr).to(tl.float32))
    if matrix != 0:
        U = _factored_u(g, stats, batch_sums, tm, b, r, c, n, m)
    else:
        exp_avg_sq = engine.operand(exp_avg_sq_ptrs, t, tl.float32, ALIGNED)
        V = engine.load(exp_avg_sq, offs, mask, MASKED)
        V = tl.fma(one_minus_beta2, g * g + eps1, V * beta2)  # torch: V.mul_(β̂).add_(g² + ε1, alpha=1 - β̂)
        engine.store(exp_avg_sq, offs, V, mask, MASKED)
        if MASKED:  # lanes past the tensor's end: keep them finite (no 1/0 in the interpreter's numpy)
            V = tl.where(mask, V, 1.0)
        U = tl.div_rn(tl.full(V.shape, 1.0, tl.float32), tl.sqrt_rn(V)) * g
    u_sq = U * U
    if MASKED:
        u_sq = tl.where(mask, u_sq, 0.0)
    return tl.sum(tl.sum(u_sq, axis=1), axis=0)


@triton.jit
def _pass2_kernel(
    grad_ptrs, exp_avg_sq_ptrs, step_ptrs, grad_scale_ptr, found_inf_ptr, stats, batch_sums, usq_partials,
    eps1: tl.float64, decay_rate: tl.float64,
    tile_tensor, meta, arrivals,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr, ALIGNED: tl.constexpr, COL_MULTIPLE: tl.constexpr,
    GRAD_DTYPE: tl.constexpr, UNSCALE: tl.constexpr, SKIP_IF_INF: tl.constexpr,
):
    skip = 0.0
    if SKIP_IF_INF:
        skip = tl.load(found_inf_ptr).to(tl.float32)
    if skip == 0.0:
        t, tm, b, rt, ct, r, c, n, m, offs, mask, full = engine.tile_of(tile_tensor, meta, TILE_R, TILE_C,
                                                                         COL_MULTIPLE)
        matrix = tl.load(tm + engine.TM_MATRIX)
        step = tl.load(tl.load(step_ptrs + t).to(tl.pointer_type(tl.float32))) + 1.0
        beta2, one_minus_beta2 = _beta2(step, tl.full([], decay_rate, tl.float64))
        eps1_32 = tl.full([], eps1, tl.float64).to(tl.float32)
        grad = engine.operand(grad_ptrs, t, GRAD_DTYPE, ALIGNED)
        if full:
            u_sq = _pass2_tile(grad, exp_avg_sq_ptrs, stats, batch_sums, t, tm, b, r, c, n, m, offs, mask,
                               grad_scale_ptr, eps1_32, beta2, one_minus_beta2, matrix, ALIGNED, False, UNSCALE)
        else:
            u_sq = _pass2_tile(grad, exp_avg_sq_ptrs, stats, batch_sums, t, tm, b, r, c, n, m, offs, mask,
                               grad_scale_ptr, eps1_32, beta2, one_minus_beta2, matrix, ALIGNED, True, UNSCALE)
        tl.store(usq_partials + tl.program_id(0), u_sq)


# ----------------------------------------------------------------------------------------------------------------
# Pass 3: the update.
# ----------------------------------------------------------------------------------------------------------------
@triton.jit
def _pass3_tile(param, grad, exp_avg_sq_ptrs, exp_avg_ptrs, master_ptrs, stats, batch_sums, t, tm, b, r, c, n, m,
                offs, mask, grad_scale_ptr, scale, weight_decay, decay_coef, beta1, one_minus_beta1, matrix,
                ALIGNED: tl.constexpr, MASKED: tl.constexpr, UNSCALE: tl.constexpr, MOMENTUM: tl.constexpr,
                MASTER: tl.constexpr):
    g = engine.load(grad, offs, mask, MASKED)
    if UNSCALE:
        g = tl.div_rn(g, tl.load(grad_scale_ptr).to(tl.float32))
        engine.store(grad, offs, g, mask, MASKED)  # the unscaled grad, written back once, in the last pass
    if matrix != 0:
        U = _factored_u(g, stats, batch_sums, tm, b, r, c, n, m)
    else:
        V = engine.load(engine.operand(exp_avg_sq_ptrs, t, tl.float32, ALIGNED), offs, mask, MASKED)
        if MASKED:
            V = tl.where(mask, V, 1.0)
        U = tl.div_rn(tl.full(V.shape, 1.0, tl.float32), tl.sqrt_rn(V)) * g
    update = U * scale  # α / max(1, RMS(U)/d), one fp32 coefficient
    if MOMENTUM:
        exp_avg = engine.operand(exp_avg_ptrs, t, tl.float32, ALIGNED)
        mom = tl.fma(one_minus_beta1, update, engine.load(exp_avg, offs, mask, MASKED) * beta1)  # m.mul_(β1).add_
        engine.store(exp_avg, offs, mom, mask, MASKED)
        update = mom
    if MASTER:
        theta_ptr = engine.operand(master_ptrs, t, tl.float32, ALIGNED)
    else:
        theta_ptr = param
    theta = engine.load(theta_ptr, offs, mask, MASKED)
    # Decay when λ != 0, as the reference tests it: with λ = 0 and α = inf (an fp16 param that overflowed, scaled
    # by RMS(θ) = inf) the coefficient -λα is NaN, and decaying would turn every element NaN.
    if weight_decay != 0.0:
        theta = tl.fma(decay_coef, theta, theta)  # torch: θ.add_(θ, alpha=-λα), θ before the update
    theta = theta - update
    engine.store(theta_ptr, offs, theta, mask, MASKED)
    if MASTER:
        engine.store(param, offs, theta, mask, MASKED)  # the bf16/fp16 param, rounded once from the master


@triton.jit
def _pass3_kernel(
    param_ptrs, grad_ptrs, exp_avg_sq_ptrs, exp_avg_ptrs, master_ptrs, step_ptrs, grad_scale_ptr, found_inf_ptr,
    stats, n_stats, batch_sums, usq_sums,
    lr: tl.float64, lr_ptr, eps2: tl.float64, clip_threshold: tl.float64, beta1: tl.float64,
    weight_decay: tl.float64,
    tile_tensor, meta, arrivals,
    TILE_R: tl.constexpr, TILE_C: tl.constexpr, ALIGNED: tl.constexpr, COL_MULTIPLE: tl.constexpr,
    PARAM_DTYPE: tl.constexpr, GRAD_DTYPE: tl.constexpr, MASTER: tl.constexpr, MOMENTUM: tl.constexpr,
    RELATIVE_STEP: tl.constexpr, WARMUP_INIT: tl.constexpr, SCALE_PARAMETER: tl.constexpr,
    LR_ON_DEVICE: tl.constexpr, UNSCALE: tl.constexpr, SKIP_IF_INF: tl.constexpr,
):
    skip = 0.0
    if SKIP_IF_INF:
        skip = tl.load(found_inf_ptr).to(tl.float32)
    if skip == 0.0:
        t, tm, b, rt, ct, r, c, n, m, offs, mask, full = engine.tile_of(tile_tensor, meta, TILE_R, TILE_C,
                                                                         COL_MULTIPLE)
        step_ptr = tl.load(step_ptrs + t).to(tl.pointer_type(tl.float32))
        step = tl.load(step_ptr) + 1.0
        numel = tl.load(tm + engine.TM_NUMEL)
        if numel > 0:
            steps = step.to(tl.float64)
            # ρ_t and α_t, in fp64 from fp64 hyperparameters (tl.full: Python floats become fp64 directly).
            if RELATIVE_STEP:
                if WARMUP_INIT:
                    cap = tl.full([], 1e-6, tl.float64) * steps
                else:
                    cap = tl.full([], 1e-2, tl.float64)
                rho = tl.minimum(cap, 1.0 / tl.sqrt(steps))
            elif LR_ON_DEVICE:
                rho = tl.load(lr_ptr).to(tl.float64)
            else:
                rho = tl.full([], lr, tl.float64)
            count = numel.to(tl.float64)
            if SCALE_PARAMETER:
                rms_theta = tl.sqrt(tl.load(stats + n_stats + t).to(tl.float64) / count)
                alpha = rho * tl.maximum(tl.full([], eps2, tl.float64), rms_theta)
            else:
                alpha = rho
            rms_u = tl.sqrt(tl.load(usq_sums + t).to(tl.float64) / count)
            scale = (alpha / tl.maximum(1.0, rms_u / tl.full([], clip_threshold, tl.float64))).to(tl.float32)
            decay_coef = (-tl.full([], weight_decay, tl.float64) * alpha).to(tl.float32)
            beta1_64 = tl.full([], beta1, tl.float64)
            one_minus_beta1 = (1.0 - beta1_64).to(tl.float32)
            beta1_32 = beta1_64.to(tl.float32)

            param = engine.operand(param_ptrs, t, PARAM_DTYPE, ALIGNED)
            grad = engine.operand(grad_ptrs, t, GRAD_DTYPE, ALIGNED)
            matrix = tl.load(tm + engine.TM_MATRIX)
            if full:
                _pass3_tile(param, grad, exp_avg_sq_ptrs, exp_avg_ptrs, master_ptrs, stats, batch_sums, t, tm, b, r,
                            c, n, m, offs, mask, grad_scale_ptr, scale, weight_decay, decay_coef, beta1_32,
                            one_minus_beta1, matrix, ALIGNED, False, UNSCALE, MOMENTUM, MASTER)
            else:
                _pass3_tile(param, grad, exp_avg_sq_ptrs, exp_avg_ptrs, master_ptrs, stats, batch_sums, t, tm, b, r,
                            c, n, m, offs, mask, grad_scale_ptr, scale, weight_decay, decay_coef, beta1_32,
                            one_minus_beta1, matrix, ALIGNED, True, UNSCALE, MOMENTUM, MASTER)
        if engine.last_tile_of_tensor(arrivals, t, tm):
            tl.store(step_ptr, step)


# ----------------------------------------------------------------------------------------------------------------
# Host side.
# ----------------------------------------------------------------------------------------------------------------
OPERANDS = ("param", "grad", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg", "master_param", "step")


def adafactor(table: TileTable, hp: dict, *, param_dtype, grad_dtype, master: bool, grad_scale=None,
              found_inf=None):
    """One Adafactor step over every tensor of ``table`` (operands in the order of ``OPERANDS``): seven launches,
    whatever the number of tensors; see the module docstring.

    ``hp``: lr (None with relative_step; else a float or a 1-element tensor on the params' device), eps1, eps2,
    clip_threshold, decay_rate, beta1 (None: no momentum), weight_decay, scale_parameter, relative_step,
    warmup_init. ``master``: the ``master_param`` operand holds fp32 master weights.
    """
    work = table.scratch()
    p = table.ptrs
    lr = hp["lr"]
    lr_on_device = isinstance(lr, torch.Tensor) and not hp["relative_step"]
    lr_value = 0.0 if lr is None or lr_on_device else float(lr)
    momentum = hp["beta1"] is not None
    scaler = dict(UNSCALE=grad_scale is not None, SKIP_IF_INF=found_inf is not None)
    param_tl, grad_tl = engine.tl_dtype(param_dtype), engine.tl_dtype(grad_dtype)
    stats = work["stats"]

    # 1. Row/column partial sums of g² + ε1, Σθ² per tile.
    engine.launch_tiles(_pass1_kernel, table, p["param"], p["grad"], p["master_param"], grad_scale, found_inf,
                        work["partials"], table.n_partials, float(hp["eps1"]),
                        PARAM_DTYPE=param_tl, GRAD_DTYPE=grad_tl, MASTER=master, **scaler)
    # 2. Reduction: row sums, column sums (-> stats[:n_stats]) and Σθ² per tensor (-> stats[n_stats:]).
    engine.segment_sums(work["partials"], table.stat_seg, stats, table.longest["stat_seg"])
    if table.n_stats:
        # 3. R_t, C_t (EMA of the row and column means), written to the state and to stats.
        engine.launch_stats(_statistics_kernel, table, p["exp_avg_sq_row"], p["exp_avg_sq_col"], p["step"], stats,
                            float(hp["decay_rate"]), found_inf, SKIP_IF_INF=found_inf is not None)
        # 4. Reduction: ΣR_t per matrix, for mean(R_t).
        engine.segment_sums(stats[: table.n_rows], table.batch_seg, work["batch_sums"], table.longest["batch_seg"],
                            max_chunk=1024)
    # 5. ΣU² per tile (flat tensors: V_t first).
    engine.launch_tiles(_pass2_kernel, table, p["grad"], p["exp_avg_sq"], p["step"], grad_scale, found_inf, stats,
                        work["batch_sums"], work["usq_partials"], float(hp["eps1"]), float(hp["decay_rate"]),
                        GRAD_DTYPE=grad_tl, **scaler)
    # 6. Reduction: ΣU² per tensor, for RMS(U).
    engine.segment_sums(work["usq_partials"], table.tile_seg, work["usq_sums"], table.longest["tile_seg"])
    # 7. The update, and step += 1.
    engine.launch_tiles(_pass3_kernel, table, p["param"], p["grad"], p["exp_avg_sq"], p["exp_avg"],
                        p["master_param"], p["step"], grad_scale, found_inf, stats, table.n_stats,
                        work["batch_sums"], work["usq_sums"], lr_value, lr if lr_on_device else None,
                        float(hp["eps2"]), float(hp["clip_threshold"]), float(hp["beta1"] or 0.0),
                        float(hp["weight_decay"]),
                        PARAM_DTYPE=param_tl, GRAD_DTYPE=grad_tl, MASTER=master, MOMENTUM=momentum,
                        RELATIVE_STEP=bool(hp["relative_step"]), WARMUP_INIT=bool(hp["warmup_init"]),
                        SCALE_PARAMETER=bool(hp["scale_parameter"]), LR_ON_DEVICE=lr_on_device, **scaler)


adafactor.OPERANDS = OPERANDS
adafactor.build_table = TileTable.factored


def compile_variants():
    """Variants compiled by kernels/compile_check.py: every flag and dtype path at least once (each variant runs
    the whole launcher, so all seven launches of a step compile)."""
    def make(param_dtype, grad_dtype, master, lr_tensor=False, scaler=False, **flags):
        def run():
            shapes = [(3, 5), (2, 3, 4), (7,), ()]
            ops = {name: [None] * len(shapes) for name in OPERANDS}
            ops["param"] = [torch.zeros(s, dtype=param_dtype) for s in shapes]
            ops["grad"] = [torch.zeros(s, dtype=grad_dtype) for s in shapes]
            ops["step"] = [torch.zeros(()) for _ in shapes]
            ops["exp_avg_sq_row"] = [torch.zeros(s[:-1]) if len(s) >= 2 else None for s in shapes]
            ops["exp_avg_sq_col"] = [torch.zeros(s[:-2] + s[-1:]) if len(s) >= 2 else None for s in shapes]
            ops["exp_avg_sq"] = [None if len(s) >= 2 else torch.zeros(s) for s in shapes]
            ops["exp_avg"] = [torch.zeros(s) for s in shapes]
            ops["master_param"] = [torch.zeros(s) for s in shapes]
            hp = dict(lr=None, eps1=1e-30, eps2=1e-3, clip_threshold=1.0, decay_rate=-0.8, beta1=None,
                      weight_decay=0.0, scale_parameter=True, relative_step=True, warmup_init=False)
            if lr_tensor:
                hp.update(lr=torch.tensor(1e-3), relative_step=False)
            hp.update(flags)
            adafactor(TileTable.factored(ops, torch.device("cpu")), hp, param_dtype=param_dtype, grad_dtype=grad_dtype,
                      master=master, grad_scale=torch.ones(()) if scaler else None,
                      found_inf=torch.zeros(()) if scaler else None)
        return run
    # Three variants cover every constexpr of the rule (dtype conversions are the engine's, compiled for fp16 by
    # Adam's variants); each costs ~10-30 s of compilation for two architectures.
    return [
        ("fp32", make(torch.float32, torch.float32, False)),
        ("bf16-master-fp32_grad-scaler-beta1-wd-warmup",
         make(torch.bfloat16, torch.float32, True, scaler=True, beta1=0.9, weight_decay=0.1, warmup_init=True)),
        ("fp32-lr_tensor-unscaled", make(torch.float32, torch.float32, False, lr_tensor=True,
                                         scale_parameter=False)),
    ]
