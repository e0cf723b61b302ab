// Adafactor: the rule of the native backend, for the CUDA tile engine and the CPU tile engine alike.
//
// Shazeer & Stern, "Adafactor: Adaptive Learning Rates with Sublinear Memory Cost" (ICML 2018), Algorithms 4 and 5
// (factored second moments, relative step size, update clipping, optional momentum), with the semantics and the
// order of operations of fused_optim/reference/adafactor.py (the spec, which follows transformers' Adafactor) and
// of the Triton rule kernels/adafactor.py, whose pass structure this mirrors launch for launch:
//
//     1. pass 1 (tiles)   per tile: row and column partial sums of g² + ε1 (matrices); Σθ² (every tensor)
//     2. segment_sums     row sums, column sums, Σθ² per tensor
//     3. statistics       R_t = β̂ R + (1 - β̂) rowsum / m, C_t likewise, in the state and the stats buffer
//     4. segment_sums     ΣR_t per matrix: mean(R_t)
//     5. pass 2 (tiles)   U = g / sqrt(V̂); ΣU² per tile; flat tensors: V_t = β̂ V + (1 - β̂)(g² + ε1)
//     6. segment_sums     ΣU² per tensor: RMS(U)
//     7. pass 3 (tiles)   U again, times α / max(1, RMS(U)/d); momentum; weight decay; θ -= update; step += 1
//
// The reductions are separate launches (the tile engines write per-tile partials, tile_map.h): under FSDP an
// all-reduce over the sharded mesh dimensions goes after steps 2, 4 and 6. V̂ = R Cᵀ / mean(R) and U are never
// stored: a tile of pass 2 and 3 forms rsqrt(R / mean R) for its rows and rsqrt(C) for its columns once
// (row_coef/col_coef) and U = (rsqrt(R / mean R) ⊗ rsqrt(C)) · g per element.
//
// Scalars (β̂2_t = 1 - t^c, ρ_t, RMS(θ), α_t, the clipped scale α / max(1, RMS(U)/d), the decay coefficient -λα)
// are formed in fp64 from the step tensor, the fp32 sums and fp64 hyperparameters, as the reference forms them,
// and rounded to fp32 once; nothing is read back to the host. The element math is fp32 with IEEE division and
// square root, no contraction, and an FMA exactly where torch's add(alpha=) uses one (numerics.h). rsqrt is
// 1 / sqrt (both correctly rounded), as in the Triton rule; torch's CPU rsqrt rounds differently, which the parity
// bounds account for (fused_optim/testing.py, ADAFACTOR_NOTES). bf16/fp16 params: fp32 math, the param rounded once.
//
// Bytes per element (fp32 param and grad, matrices, no momentum): pass 1 reads g, θ; pass 2 reads g; pass 3 reads
// g, θ and writes θ = 24 (kernels/adafactor.py has the full byte model).
#pragma once

#include <cmath>
#include <cstdint>
#include <type_traits>

#include "engine.h"
#include "tile_map.h"

namespace fused_optim {

// ---------------------------------------------------------------------------------------------------------------
// The element math, shared by the passes.
// ---------------------------------------------------------------------------------------------------------------
struct Beta2 {
  float beta2, one_minus_beta2;
};

// β̂2_t = 1 - t^c and 1 - β̂2_t, in fp64 as the reference (`1.0 - t ** decay_rate`), rounded to fp32 once.
FO_HD FO_INLINE Beta2 beta2_of(float step, double decay_rate) {
  const double beta2 = 1.0 - pow(static_cast<double>(step), decay_rate);
  return Beta2{static_cast<float>(beta2), static_cast<float>(1.0 - beta2)};
}

// g² + ε1, the quantity whose row and column means R and C average (Algorithm 4).
FO_HD FO_INLINE float sq_plus_eps(float g, float eps1) { return add_rn(mul_rn(g, g), eps1); }

// x·β̂ + (1 - β̂)·value as torch's x.mul_(β̂).add_(value, alpha=1 - β̂): one FMA.
FO_HD FO_INLINE float ema(float x, float value, const Beta2& b) {
  return fma_rn(b.one_minus_beta2, value, mul_rn(x, b.beta2));
}

// 1 / sqrt(x), each correctly rounded.
FO_HD FO_INLINE float rsqrt_rn(float x) { return div_rn(1.0f, sqrt_rn(x)); }

// U = (rsqrt(R / mean R) ⊗ rsqrt(C)) · g: the row factor of element (r, c) times its column factor, times g.
FO_HD FO_INLINE float factored_u(float g, float row_factor, float col_factor) {
  return mul_rn(mul_rn(row_factor, col_factor), g);
}

// The fp32 coefficients of pass 3 for one tensor.
struct UpdateScalars {
  float scale;       // α / max(1, RMS(U) / d)
  float decay_coef;  // -λα
  bool decay;        // λ != 0, the reference's test: with λ = 0 and α = inf, -λα is NaN and is not applied
  float beta1, one_minus_beta1;
};

// ρ_t, α_t and the clipped scale, in fp64 (reference: relative_step_size, rms, and the `max`/`min` of Python
// floats, whose NaN behaviour the comparisons below keep: max(a, b) is a unless b > a).
FO_HD FO_INLINE UpdateScalars update_scalars(double lr, double eps2, double clip_threshold, double beta1,
                                             double weight_decay, bool relative_step, bool warmup_init,
                                             bool scale_parameter, float step, int64_t numel, float theta_sq,
                                             float u_sq) {
  const double t = static_cast<double>(step);
  const double count = static_cast<double>(numel);
  double rho = lr;
  if (relative_step) {
    const double cap = warmup_init ? 1e-6 * t : 1e-2;
    const double inv_sqrt = 1.0 / sqrt(t);
    rho = inv_sqrt < cap ? inv_sqrt : cap;  // min(cap, 1/sqrt(t))
  }
  double alpha = rho;
  if (scale_parameter) {
    const double rms_theta = sqrt(static_cast<double>(theta_sq) / count);
    alpha = rho * (rms_theta > eps2 ? rms_theta : eps2);  // ρ · max(ε2, RMS(θ))
  }
  const double clip = sqrt(static_cast<double>(u_sq) / count) / clip_threshold;  // RMS(U) / d
  UpdateScalars s;
  s.scale = static_cast<float>(alpha / (clip > 1.0 ? clip : 1.0));
  s.decay_coef = static_cast<float>(-weight_decay * alpha);
  s.decay = weight_decay != 0.0;
  s.beta1 = static_cast<float>(beta1);
  s.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  return s;
}

// ---------------------------------------------------------------------------------------------------------------
// Kernel arguments, one struct for every launch of a step (each pass reads what it needs). Operand tables in the
// order of fused_optim.native.ADAFACTOR_OPERANDS; the tile map and statistics layout are fused_optim.tables.TileTable.
// ---------------------------------------------------------------------------------------------------------------
struct AdafactorArgs {
  const int64_t* param;
  const int64_t* grad;
  const int64_t* exp_avg_sq_row;  // matrices: R, [B, n]
  const int64_t* exp_avg_sq_col;  // matrices: C, [B, m]
  const int64_t* exp_avg_sq;      // flat tensors: V
  const int64_t* exp_avg;         // MOMENTUM only
  const int64_t* master_param;    // MASTER only
  const int64_t* step;            // fp32 scalars, one per tensor
  const int64_t* meta;            // TileTable.meta
  const int32_t* stat_tensor;     // statistics: the tensor of each entry of the statistics vector
  int64_t n_rows;                 // row statistics of all matrices (then the column statistics)
  int64_t n_stats;                // row + column statistics (then Σθ² per tensor)
  float* row_col_out;             // pass 1: row and column partials (TileTable layout)
  float* total_out;               // pass 1: Σθ² per tile; pass 2: ΣU² per tile
  float* stats;                   // rows | columns | Σθ² per tensor: sums after step 2, R_t and C_t after step 3
  const float* batch_sums;        // ΣR_t per matrix (step 4)
  const float* usq_sums;          // ΣU² per tensor (step 6)
  double lr;                      // used when lr_ptr is null and relative_step is false
  const void* lr_ptr;             // lr read from memory: a 1-element fp32 or fp64 tensor
  bool lr_is_double;
  double eps1, eps2, clip_threshold, decay_rate, beta1, weight_decay;
  bool relative_step, warmup_init, scale_parameter;
  const float* grad_scale;  // UNSCALE only: GradScaler's scale (fp32, 1 element)
  const float* found_inf;   // null, or GradScaler's found_inf: nonzero skips every launch of the step
};

FO_HD FO_INLINE bool adafactor_skip(const AdafactorArgs& a) { return a.found_inf != nullptr && *a.found_inf != 0.0f; }

// Per-row and per-column factors of a matrix tile, from R_t and C_t in the statistics buffer (steps 3-4):
// rsqrt(R / mean R) and rsqrt(C). The same operations in the same order as the reference.
struct FactoredCoefs {
  static constexpr bool kCoefs = true;
  static FO_HD FO_INLINE float row_coef(const AdafactorArgs& a, const Tile& x, int64_t r) {
    const float R = a.stats[x.tm[kMetaRowBase] + x.b * x.n + r];
    const float mean_r = div_rn(a.batch_sums[x.tm[kMetaBatchBase] + x.b], static_cast<float>(x.n));
    return rsqrt_rn(div_rn(R, mean_r));
  }
  static FO_HD FO_INLINE float col_coef(const AdafactorArgs& a, const Tile& x, int64_t c) {
    return rsqrt_rn(a.stats[x.tm[kMetaColBase] + x.b * x.m + c]);
  }
};

struct NoCoefs {
  static constexpr bool kCoefs = false;
  static FO_HD FO_INLINE float row_coef(const AdafactorArgs&, const Tile&, int64_t) { return 1.0f; }
  static FO_HD FO_INLINE float col_coef(const AdafactorArgs&, const Tile&, int64_t) { return 1.0f; }
};

template <bool UNSCALE>
FO_HD FO_INLINE float unscaled(float g, float grad_scale) {
  return UNSCALE ? div_rn(g, grad_scale) : g;
}

// ---------------------------------------------------------------------------------------------------------------
// Pass 1 (tiles): row/column contributions g² + ε1 of matrices, θ² of every tensor.
// ---------------------------------------------------------------------------------------------------------------
template <typename P, typename G, bool MASTER, bool UNSCALE>
struct AdafactorPass1 : NoCoefs {
  static_assert(!MASTER || !std::is_same_v<P, float>, "master weights exist for bf16/fp16 params only");
  using Args = AdafactorArgs;
  static constexpr bool kRowCol = true, kTotal = true, kStep = false;

  struct Tensor {
    const P* param;
    const G* grad;
    const float* master_param;
    float grad_scale, eps1;
  };

  static FO_HD FO_INLINE bool skip(const Args& a) { return adafactor_skip(a); }

  static FO_HD FO_INLINE Tensor tensor(const Args& a, int64_t t) {
    Tensor x;
    x.param = operand<P>(a.param, t);
    x.grad = operand<G>(a.grad, t);
    x.master_param = MASTER ? operand<float>(a.master_param, t) : nullptr;
    x.grad_scale = UNSCALE ? *a.grad_scale : 1.0f;
    x.eps1 = static_cast<float>(a.eps1);
    return x;
  }

  static FO_HD FO_INLINE bool aligned(const Tensor& x) {
    return vec_aligned(x.grad) && (MASTER ? vec_aligned(x.master_param) : vec_aligned(x.param));
  }

  template <int N, bool VEC, bool MATRIX>
  static FO_HD FO_INLINE void apply(const Tensor& x, const Tile&, int64_t i, float, const float*, float* rowcol,
                                    float* total) {
    float theta[N];
    if constexpr (MASTER) {
      load<N, VEC>(x.master_param, i, theta);
    } else {
      load<N, VEC>(x.param, i, theta);
    }
    FO_UNROLL
    for (int k = 0; k < N; ++k) total[k] = mul_rn(theta[k], theta[k]);
    if constexpr (MATRIX) {  // flat tensors keep a full V, updated in pass 2: no statistics, no read of g here
      float g[N];
      load<N, VEC>(x.grad, i, g);
      FO_UNROLL
      for (int k = 0; k < N; ++k) rowcol[k] = sq_plus_eps(unscaled<UNSCALE>(g[k], x.grad_scale), x.eps1);
    }
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Step 3 (entries of the statistics vector): R_t and C_t from the finished row and column sums.
// ---------------------------------------------------------------------------------------------------------------
struct AdafactorStatistics {
  using Args = AdafactorArgs;
  using Tensor = Beta2;

  static FO_HD FO_INLINE bool skip(const Args& a) { return adafactor_skip(a); }
  static FO_HD FO_INLINE int64_t owner(const Args& a, int64_t i) { return a.stat_tensor[i]; }
  static FO_HD FO_INLINE Tensor tensor(const Args& a, int64_t t) {
    return beta2_of(add_rn(*operand<float>(a.step, t), 1.0f), a.decay_rate);
  }

  static FO_HD FO_INLINE void apply(const Args& a, const Tensor& beta, int64_t i) {
    const int64_t t = a.stat_tensor[i];
    const int64_t* tm = a.meta + t * kTileMetaWidth;
    const bool is_row = i < a.n_rows;
    // exp_avg_sq_row[j] (a row mean is over the matrix's m columns) or exp_avg_sq_col[j] (over its n rows)
    float* state = operand<float>(is_row ? a.exp_avg_sq_row : a.exp_avg_sq_col, t) +
                   (i - tm[is_row ? kMetaRowBase : kMetaColBase]);
    const float mean = div_rn(a.stats[i], static_cast<float>(tm[is_row ? kMetaCols : kMetaRows]));
    const float x = ema(*state, mean, beta);
    *state = x;
    a.stats[i] = x;  // passes 2 and 3 read R_t and C_t here; step 4 sums R_t
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Pass 2 (tiles): ΣU² per tile; flat tensors update V_t first.
// ---------------------------------------------------------------------------------------------------------------
template <typename G, bool UNSCALE>
struct AdafactorPass2 : FactoredCoefs {
  using Args = AdafactorArgs;
  static constexpr bool kRowCol = false, kTotal = true, kStep = false;

  struct Tensor {
    const G* grad;
    float* exp_avg_sq;
    float grad_scale, eps1;
    Beta2 beta;
  };

  static FO_HD FO_INLINE bool skip(const Args& a) { return adafactor_skip(a); }

  static FO_HD FO_INLINE Tensor tensor(const Args& a, int64_t t) {
    Tensor x;
    x.grad = operand<G>(a.grad, t);
    x.exp_avg_sq = operand<float>(a.exp_avg_sq, t);  // null for a matrix
    x.grad_scale = UNSCALE ? *a.grad_scale : 1.0f;
    x.eps1 = static_cast<float>(a.eps1);
    x.beta = beta2_of(add_rn(*operand<float>(a.step, t), 1.0f), a.decay_rate);
    return x;
  }

  static FO_HD FO_INLINE bool aligned(const Tensor& x) {
    return vec_aligned(x.grad) && vec_aligned(x.exp_avg_sq);
  }

  template <int N, bool VEC, bool MATRIX>
  static FO_HD FO_INLINE void apply(const Tensor& x, const Tile&, int64_t i, float row_coef, const float* col_coef,
                                    float*, float* total) {
    float g[N], U[N];
    load<N, VEC>(x.grad, i, g);
    if constexpr (MATRIX) {
      FO_UNROLL
      for (int k = 0; k < N; ++k) U[k] = factored_u(unscaled<UNSCALE>(g[k], x.grad_scale), row_coef, col_coef[k]);
    } else {
      float V[N];
      load<N, VEC>(x.exp_avg_sq, i, V);
      FO_UNROLL
      for (int k = 0; k < N; ++k) {
        const float gk = unscaled<UNSCALE>(g[k], x.grad_scale);
        V[k] = ema(V[k], sq_plus_eps(gk, x.eps1), x.beta);
        U[k] = mul_rn(rsqrt_rn(V[k]), gk);
      }
      store<N, VEC>(x.exp_avg_sq, i, V);
    }
    FO_UNROLL
    for (int k = 0; k < N; ++k) total[k] = mul_rn(U[k], U[k]);
  }
};

// ---------------------------------------------------------------------------------------------------------------
// Pass 3 (tiles): the update, and step += 1.
// ---------------------------------------------------------------------------------------------------------------
template <typename P, typename G, bool MASTER, bool UNSCALE, bool MOMENTUM>
struct AdafactorPass3 : FactoredCoefs {
  static_assert(!MASTER || !std::is_same_v<P, float>, "master weights exist for bf16/fp16 params only");
  using Args = AdafactorArgs;
  static constexpr bool kRowCol = false, kTotal = false, kStep = true;

  struct Tensor {
    P* param;
    G* grad;
    const float* exp_avg_sq;
    float* exp_avg;
    float* master_param;
    float* step_ptr;
    float step;  // the new step, written by finish()
    float grad_scale;
    UpdateScalars s;
  };

  static FO_HD FO_INLINE bool skip(const Args& a) { return adafactor_skip(a); }

  static FO_HD FO_INLINE Tensor tensor(const Args& a, int64_t t) {
    Tensor x;
    x.param = operand<P>(a.param, t);
    x.grad = operand<G>(a.grad, t);
    x.exp_avg_sq = operand<float>(a.exp_avg_sq, t);
    x.exp_avg = MOMENTUM ? operand<float>(a.exp_avg, t) : nullptr;
    x.master_param = MASTER ? operand<float>(a.master_param, t) : nullptr;
    x.step_ptr = operand<float>(a.step, t);
    x.step = add_rn(*x.step_ptr, 1.0f);
    x.grad_scale = UNSCALE ? *a.grad_scale : 1.0f;
    double lr = a.lr;
    if (a.lr_ptr != nullptr) {
      lr = a.lr_is_double ? *static_cast<const double*>(a.lr_ptr)
                          : static_cast<double>(*static_cast<const float*>(a.lr_ptr));
    }
    const int64_t numel = a.meta[t * kTileMetaWidth + kMetaNumel];
    x.s = UpdateScalars{};
    if (numel > 0) {  // a zero-size tensor only advances its step
      x.s = update_scalars(lr, a.eps2, a.clip_threshold, a.beta1, a.weight_decay, a.relative_step, a.warmup_init,
                           a.scale_parameter, x.step, numel, a.stats[a.n_stats + t], a.usq_sums[t]);
    }
    return x;
  }

  static FO_HD FO_INLINE bool aligned(const Tensor& x) {
    return vec_aligned(x.param) && vec_aligned(x.grad) && vec_aligned(x.exp_avg_sq) &&
           (!MOMENTUM || vec_aligned(x.exp_avg)) && (!MASTER || vec_aligned(x.master_param));
  }

  template <int N, bool VEC, bool MATRIX>
  static FO_HD FO_INLINE void apply(const Tensor& x, const Tile&, int64_t i, float row_coef, const float* col_coef,
                                    float*, float*) {
    float g[N], U[N], theta[N];
    load<N, VEC>(x.grad, i, g);
    if constexpr (UNSCALE) {
      FO_UNROLL
      for (int k = 0; k < N; ++k) g[k] = div_rn(g[k], x.grad_scale);
      store<N, VEC>(x.grad, i, g);  // the unscaled grad, written back once, in the last pass
    }
    if constexpr (MATRIX) {
      FO_UNROLL
      for (int k = 0; k < N; ++k) U[k] = factored_u(g[k], row_coef, col_coef[k]);
    } else {
      float V[N];
      load<N, VEC>(x.exp_avg_sq, i, V);
      FO_UNROLL
      for (int k = 0; k < N; ++k) U[k] = mul_rn(rsqrt_rn(V[k]), g[k]);
    }
    FO_UNROLL
    for (int k = 0; k < N; ++k) U[k] = mul_rn(U[k], x.s.scale);  // α / max(1, RMS(U)/d), one fp32 coefficient
    if constexpr (MOMENTUM) {  // m.mul_(β1).add_(update, alpha=1 - β1): one FMA; the update is m
      float m[N];
      load<N, VEC>(x.exp_avg, i, m);
      FO_UNROLL
      for (int k = 0; k < N; ++k) U[k] = m[k] = fma_rn(x.s.one_minus_beta1, U[k], mul_rn(m[k], x.s.beta1));
      store<N, VEC>(x.exp_avg, i, m);
    }
    if constexpr (MASTER) {
      load<N, VEC>(x.master_param, i, theta);
    } else {
      load<N, VEC>(x.param, i, theta);
    }
    FO_UNROLL
    for (int k = 0; k < N; ++k) {
      // θ.add_(θ, alpha=-λα) (one FMA, θ before the update), then θ - update
      if (x.s.decay) theta[k] = fma_rn(x.s.decay_coef, theta[k], theta[k]);
      theta[k] = sub_rn(theta[k], U[k]);
    }
    if constexpr (MASTER) store<N, VEC>(x.master_param, i, theta);
    store<N, VEC>(x.param, i, theta);  // with MASTER: the bf16/fp16 param, rounded once from the master
  }

  static FO_HD FO_INLINE void finish(const Tensor& x) { *x.step_ptr = x.step; }
};

}  // namespace fused_optim
