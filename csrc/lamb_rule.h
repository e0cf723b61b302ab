// LAMB: the per-element rule of the native backend's three LAMB passes, for the CUDA kernels and the CPU engine
// alike, and the global-gradient-norm pass of max_grad_norm.
//
// LAMB is You et al., "Large Batch Optimization for Deep Learning: Training BERT in 76 Minutes" (ICLR 2020,
// arXiv:1904.00962 v3, Algorithm 2). The math is the algorithm box of fused_optim.FusedLAMB, operation for operation
// in the order of the Triton rule (kernels/lamb.py) and of the reference (fused_optim/reference/lamb.py):
//
//     g   = grad / s                                  (GradScaler; the unscaled grad is written back, pass 1)
//     g   = g · c,   c = min(1, max_grad_norm / G)    (max_grad_norm; c = 1 without it, and g · 1 = g exactly)
//     m   = lerp(m, g, 1 - β1);  v = β2 v + (1 - β2) g²       (adam_moments of adam_rule.h, shared with Adam)
//     m̂   = m / (1 - β1^t);  v̂ = v / (1 - β2^t)               (bias_correction of adam_rule.h; 1 without it)
//     u   = m̂ / (sqrt(v̂) + ε) + λ θ                           (the paper's update direction; + λθ is one FMA)
//     r   = ‖θ‖ / ‖u‖ if both > 0 else 1, clamped to [φ_l, φ_u] (trust_clip, the paper's φ); 1 without adaptation
//     θ   = θ - γ r u                                          (one FMA: fma(-(γ r), u, θ))
//
// Passes (PHASE), and bytes per element for fp32 params and grads (the DESIGN.md byte model: 40 B/param):
//   kNorms  read θ, g, m, v; write m, v; per-block float64 Σθ², Σu² (engine partials, kPartials = 2) 24 B
//           then segment_sum -> per-tensor ‖θ‖², ‖u‖² (a separate launch: under FSDP the all-reduce goes there)
//   kApply  read θ, m, v; recompute u (bitwise the u of kNorms: same code, same inputs); write θ       16 B
//   kFused  layer_adaptation=False: r = 1, moments and update in one pass, as Adam                    28 B
// With bf16/fp16 params and fp32 master weights θ is the master, and the param is written once, rounded, by the
// pass that writes θ. A GradScaler adds the write-back of the unscaled grad (+4 B). found_inf skips every pass.
//
// Norms in float64. θ² and u² (and g² of the grad pass) are the fp32 values widened to float64 and squared there:
// exact (a 24-bit significand squared fits in 53 bits; 2^-298 <= x² <= 2^256 is inside float64's range), where an
// fp32 square overflows or underflows (one finite grad of 1e20 made Σg² inf and c = 0, so every grad of the step
// was dropped; params or directions of ~1e-24 squared to 0 and gave r = 1 instead of ‖θ‖ / ‖u‖). The engines add
// them in float64 (engine.h), and the ratio is formed from the float64 sums: the reference's
// vector_norm(dtype=float64), up to the order of the additions. Why it is cheap: the element math stays fp32, and
// kNorms adds per element 2 widenings, 2 float64 multiplies and 2 float64 adds (the grad pass: 1 of each) to a pass
// that moves 24 bytes (4): memory-bound, with compute to spare. The GPUs we target (A100, H100: sm_80, sm_90) run
// float64 adds and multiplies at half their fp32 rate (the CUDA C++ Programming Guide's table of arithmetic
// instruction throughput; consumer parts: 1/32 or 1/64): a few float64 ops per element at memory speed use a small
// part of it. The per-thread accumulators become float64 (2 per thread in kNorms), and the block tree's shared
// memory 2 KB per quantity. Not yet timed on a GPU: the rows under README.md's Results predate this change.
//
// Scalars: the bias corrections 1 - β^t in fp64 rounded to fp32 once (as kernels/lamb.py); the trust ratio from the
// float64 per-tensor sums in fp64 (sqrt, division, clamp), then -(γ r) in fp64 rounded to fp32 once. Per-tensor step:
// every pass reads `step` and uses step + 1; only the pass that writes θ (kApply or kFused) stores it.
// bias_correction and max_grad_norm are runtime values (a division by 1 and a product with 1 are exact, so one
// kernel serves both settings with the same bits); the param/grad dtypes, the phase, master weights and the
// unscale (which adds a store) are template arguments.
#pragma once

#include <cmath>
#include <cstdint>

#include "adam_rule.h"
#include "engine.h"

namespace fused_optim {

enum LambPhase : int { kLambNorms = 0, kLambApply = 1, kLambFused = 2 };

// Kernel arguments of one LAMB pass. Operand tables in the order of fused_optim.native.LAMB_OPERANDS.
struct LambArgs {
  const int64_t* param;
  const int64_t* grad;          // not read by kApply
  const int64_t* exp_avg;
  const int64_t* exp_avg_sq;
  const int64_t* master_param;  // MASTER only: fp32 master weights of bf16/fp16 params
  const int64_t* step;          // fp32 scalars, one per tensor
  double lr;                    // used when lr_ptr is null (kApply, kFused)
  const void* lr_ptr;           // lr read from memory: a 1-element fp32 or fp64 tensor
  bool lr_is_double;
  double beta1, beta2, eps, weight_decay;
  bool bias_correction;
  bool trust_clip;  // clamp r to [clip_lo, clip_hi]
  double clip_lo, clip_hi;
  const void* grad_clip;  // null, or c = min(1, max_grad_norm / G): a 1-element fp64 or fp32 tensor
  bool grad_clip_is_double;
  const Partial* sums;  // kApply: float64 [2, n_tensors], per-tensor Σθ² then Σu² (segment_sum of kNorms' partials)
  int64_t n_tensors;
  const float* grad_scale;  // UNSCALE only: GradScaler's scale (fp32, 1 element)
  const float* found_inf;   // null, or GradScaler's found_inf: nonzero skips the pass
};

template <typename P, typename G, int PHASE, bool MASTER, bool UNSCALE>
struct LambRule {
  static_assert(!MASTER || !std::is_same_v<P, float>, "master weights exist for bf16/fp16 params only");
  static_assert(PHASE != kLambApply || !UNSCALE, "the grad is unscaled by the pass that reads it");
  static constexpr bool kReadsGrad = PHASE != kLambApply;
  static constexpr bool kWritesTheta = PHASE != kLambNorms;
  static constexpr int kPartials = PHASE == kLambNorms ? 2 : 0;  // Σθ², Σu²
  using Args = LambArgs;

  struct Tensor {
    P* param;
    G* grad;
    float* exp_avg;
    float* exp_avg_sq;
    float* master_param;
    float* step_ptr;
    float step;  // the new step, written by finish() of the pass that writes θ
    MomentCoefficients moments;
    float eps, weight_decay;
    float bc1, bc2;      // 1 - β^t rounded to fp32, or 1
    float grad_scale;    // UNSCALE
    float grad_clip;     // c, or 1
    float coef;          // -(γ r), kApply and kFused
  };

  static FO_HD FO_INLINE bool skip(const Args& a) { return a.found_inf != nullptr && *a.found_inf != 0.0f; }

  static FO_HD FO_INLINE Tensor tensor(const Args& a, int64_t t) {
    Tensor x;
    x.param = operand<P>(a.param, t);
    x.grad = kReadsGrad ? operand<G>(a.grad, t) : nullptr;
    x.exp_avg = operand<float>(a.exp_avg, t);
    x.exp_avg_sq = operand<float>(a.exp_avg_sq, t);
    x.master_param = MASTER ? operand<float>(a.master_param, t) : nullptr;
    x.step_ptr = operand<float>(a.step, t);
    x.step = add_rn(*x.step_ptr, 1.0f);
    x.moments = moment_coefficients(a.beta1, a.beta2);
    x.eps = static_cast<float>(a.eps);
    x.weight_decay = static_cast<float>(a.weight_decay);
    x.bc1 = a.bias_correction ? static_cast<float>(bias_correction(a.beta1, x.step)) : 1.0f;
    x.bc2 = a.bias_correction ? static_cast<float>(bias_correction(a.beta2, x.step)) : 1.0f;
    x.grad_scale = UNSCALE ? *a.grad_scale : 1.0f;
    x.grad_clip = 1.0f;
    if (kReadsGrad && a.grad_clip != nullptr) {
      x.grad_clip = a.grad_clip_is_double ? static_cast<float>(*static_cast<const double*>(a.grad_clip))
                                          : *static_cast<const float*>(a.grad_clip);
    }
    x.coef = 0.0f;
    if (kWritesTheta) {
      double lr = a.lr;
      if (a.lr_ptr != nullptr) {
        lr = a.lr_is_double ? *static_cast<const double*>(a.lr_ptr)
                            : static_cast<double>(*static_cast<const float*>(a.lr_ptr));
      }
      double r = 1.0;
      if (PHASE == kLambApply) {
        // The trust ratio of tensor t (You et al., Algorithm 2: ‖θ‖ / ‖u‖), in fp64 from the float64 sums of squares.
        const double w_norm = sqrt(a.sums[t]);
        const double u_norm = sqrt(a.sums[a.n_tensors + t]);
        r = (w_norm > 0.0 && u_norm > 0.0) ? w_norm / u_norm : 1.0;
        // The paper's φ(z) = min(max(z, γ_l), γ_u); a NaN ratio (‖θ‖ = ‖u‖ = inf) stays NaN, as in the reference
        // (fmax and fmin would replace it by γ_l).
        if (a.trust_clip) r = min_nan(max_nan(r, a.clip_lo), a.clip_hi);
      }
      x.coef = static_cast<float>(-(lr * r));
    }
    return x;
  }

  static FO_HD FO_INLINE bool aligned(const Tensor& x) {
    return vec_aligned(x.param) && (!kReadsGrad || vec_aligned(x.grad)) && vec_aligned(x.exp_avg) &&
           vec_aligned(x.exp_avg_sq) && (!MASTER || vec_aligned(x.master_param));
  }

  // u = m̂ / (sqrt(v̂) + ε) + λ θ, rounded as the reference's `m_hat / (v_hat.sqrt() + eps)` and
  // `u.add(theta, alpha=wd)` (one FMA in torch), as kernels/lamb.py _direction. The decay is a select, not a
  // branch (λ = 0 keeps u as is, also where λ θ would be NaN): the CPU loops vectorize without relying on the
  // compiler to unswitch them.
  static FO_HD FO_INLINE float direction(const Tensor& x, float theta, float m, float v) {
    const float m_hat = div_rn(m, x.bc1);
    const float v_hat = div_rn(v, x.bc2);
    const float a = div_rn(m_hat, add_rn(sqrt_rn(v_hat), x.eps));
    const float decayed = fma_rn(x.weight_decay, theta, a);
    return x.weight_decay != 0.0f ? decayed : a;
  }

  // Elements i .. i + N - 1 of tensor x; kNorms leaves θ² and u² of each element in part[0], part[1] (float64).
  template <int N, bool VEC>
  static FO_HD FO_INLINE void body(const Tensor& x, int64_t i, Partial (&part)[2][N]) {
    float theta[N], m[N], v[N];
    if constexpr (MASTER) {
      load<N, VEC>(x.master_param, i, theta);
    } else {
      load<N, VEC>(x.param, i, theta);
    }
    load<N, VEC>(x.exp_avg, i, m);  // kApply: the moments kNorms wrote
    load<N, VEC>(x.exp_avg_sq, i, v);
    if constexpr (kReadsGrad) {
      float g[N];
      load<N, VEC>(x.grad, i, g);
      if constexpr (UNSCALE) {
        FO_UNROLL
        for (int k = 0; k < N; ++k) g[k] = div_rn(g[k], x.grad_scale);
        store<N, VEC>(x.grad, i, g);
      }
      FO_UNROLL
      for (int k = 0; k < N; ++k) adam_moments(mul_rn(g[k], x.grad_clip), m[k], v[k], x.moments);
      store<N, VEC>(x.exp_avg, i, m);
      store<N, VEC>(x.exp_avg_sq, i, v);
    }
    FO_UNROLL
    for (int k = 0; k < N; ++k) {
      const float u = direction(x, theta[k], m[k], v[k]);
      if constexpr (PHASE == kLambNorms) {  // squared in float64: exact
        const double theta64 = theta[k];
        const double u64 = u;
        part[0][k] = mul_rn(theta64, theta64);
        part[1][k] = mul_rn(u64, u64);
      } else {
        theta[k] = fma_rn(x.coef, u, theta[k]);  // the reference's theta.add_(u, alpha=-γr): one FMA
      }
    }
    if constexpr (kWritesTheta) {
      if constexpr (MASTER) store<N, VEC>(x.master_param, i, theta);
      store<N, VEC>(x.param, i, theta);  // with MASTER: the bf16/fp16 param, rounded once from the master
    }
  }

  template <int N, bool VEC>
  static FO_HD FO_INLINE void apply(const Tensor& x, int64_t i, Partial (&part)[2][N]) {
    body<N, VEC>(x, i, part);
  }

  template <int N, bool VEC>
  static FO_HD FO_INLINE void apply(const Tensor& x, int64_t i) {
    Partial unused[2][N];
    body<N, VEC>(x, i, unused);
  }

  static FO_HD FO_INLINE void finish(const Tensor& x) {
    if constexpr (kWritesTheta) *x.step_ptr = x.step;
  }
};

// The global gradient norm of max_grad_norm: per-block Σg² of every grad (g divided by the GradScaler's scale
// first, bitwise the g of kNorms, then squared and summed in float64), 4 B/param; segment_sum over all blocks
// finishes it. found_inf: zeros.
struct GradSqArgs {
  const int64_t* grad;
  const float* grad_scale;  // UNSCALE only
  const float* found_inf;
};

template <typename G, bool UNSCALE>
struct GradSqRule {
  static constexpr int kPartials = 1;
  using Args = GradSqArgs;

  struct Tensor {
    G* grad;
    float grad_scale;
  };

  static FO_HD FO_INLINE bool skip(const Args& a) { return a.found_inf != nullptr && *a.found_inf != 0.0f; }

  static FO_HD FO_INLINE Tensor tensor(const Args& a, int64_t t) {
    Tensor x;
    x.grad = operand<G>(a.grad, t);
    x.grad_scale = UNSCALE ? *a.grad_scale : 1.0f;
    return x;
  }

  static FO_HD FO_INLINE bool aligned(const Tensor& x) { return vec_aligned(x.grad); }

  template <int N, bool VEC>
  static FO_HD FO_INLINE void apply(const Tensor& x, int64_t i, Partial (&part)[1][N]) {
    float g[N];
    load<N, VEC>(x.grad, i, g);
    FO_UNROLL
    for (int k = 0; k < N; ++k) {
      const double gk = UNSCALE ? div_rn(g[k], x.grad_scale) : g[k];  // fp32 unscale, then widened
      part[0][k] = mul_rn(gk, gk);
    }
  }

  static FO_HD FO_INLINE void finish(const Tensor&) {}
};

}  // namespace fused_optim
