// Adam / AdamW: the per-element rule of the native backend, for the CUDA kernels and the CPU engine alike.
//
// The math is the algorithm box of fused_optim.FusedAdam, in the order of the reference
// (fused_optim/reference/adam.py, which follows torch.optim's single-tensor Adam) and of the Triton rule
// (kernels/adam.py), operation for operation:
//
//     g    = grad / grad_scale                      (GradScaler; the unscaled grad is written back)
//     g    = -g                                     (maximize)
//     θ    = θ · (1 - γλ)     or    g = g + λθ      (decoupled (AdamW) or L2 (Adam) weight decay; one FMA)
//     m    = lerp(m, g, 1 - β1)                     (one FMA, as torch's lerp)
//     v    = β2·v + (1 - β2)·g·g                    (one FMA, as torch's addcmul)
//     v̂max = max(v̂max, v)                           (amsgrad)
//     θ    = θ - (γ / (1 - β1^t)) · m / (sqrt(v) / sqrt(1 - β2^t) + ε)
//
// Scalar coefficients (bias corrections, step size, decay factor) are computed in fp64 from fp64
// hyperparameters, as torch computes them on the host, and rounded to fp32 once; the element math is fp32 with
// IEEE division and square root and an FMA exactly where torch uses one (numerics.h, tests/tolerances.py).
// Variants are template flags, so a launch compiles only the code of its variant; lr, step and grad scale are
// runtime values (lr and grad scale optionally read from device memory, so a step needs no host sync).
//
// Bytes per element (fp32 param and grad): read θ, g, m, v, write θ, m, v = 28; bf16 param with fp32 master:
// read θ32, g16, m, v, write θ32, θ16, m, v = 28; unscaling writes g back: +4.
#pragma once

#include <cmath>
#include <cstdint>

#include "engine.h"

namespace fused_optim {

// torch's lerp(start, end, weight): the formula switches at weight 0.5 so that both ends are exact, each branch
// one FMA (kernels/adam.py _lerp). `weight` is the same for every element; both FMAs are computed and one is
// selected, so that the CPU loops need no branch: GCC 12 unswitched Adam's smaller loops only in some variants and
// LAMB's larger ones never, and a loop with a branch does not vectorize (AdamW 3x and LAMB 9x slower on 19.7M params,
// 2 threads). The result is the selected FMA's, bit for bit.
FO_HD FO_INLINE float lerp(float start, float end, float weight) {
  const float diff = sub_rn(end, start);
  const float from_start = fma_rn(weight, diff, start);
  const float from_end = fma_rn(-diff, sub_rn(1.0f, weight), end);
  return weight < 0.5f ? from_start : from_end;
}

// The fp32 coefficients of Adam's moment update (adam_moments), shared by Adam and LAMB (lamb_rule.h).
struct MomentCoefficients {
  float beta1, one_minus_beta1, beta2, one_minus_beta2;
};

// β1, 1 - β1, β2, 1 - β2: the differences in fp64 (torch computes `1 - beta1` in Python floats), each rounded once.
FO_HD FO_INLINE MomentCoefficients moment_coefficients(double beta1, double beta2) {
  MomentCoefficients c;
  c.beta1 = static_cast<float>(beta1);
  c.one_minus_beta1 = static_cast<float>(1.0 - beta1);
  c.beta2 = static_cast<float>(beta2);
  c.one_minus_beta2 = static_cast<float>(1.0 - beta2);
  return c;
}

// The fp32 coefficients of one Adam step.
struct AdamCoefficients : MomentCoefficients {
  float eps, weight_decay;
  float step_size;  // γ / (1 - β1^t)
  float bc2_sqrt;   // sqrt(1 - β2^t)
  float decay;      // 1 - γλ
};

// 1 - beta^step in fp64 (torch computes `1 - beta1 ** step` on the host in Python floats). beta = 0 gives 1.
FO_HD FO_INLINE double bias_correction(double beta, float step) { return 1.0 - pow(beta, static_cast<double>(step)); }

FO_HD FO_INLINE AdamCoefficients adam_coefficients(double lr, double beta1, double beta2, double eps,
                                                   double weight_decay, float step) {
  AdamCoefficients c;
  static_cast<MomentCoefficients&>(c) = moment_coefficients(beta1, beta2);
  c.eps = static_cast<float>(eps);
  c.weight_decay = static_cast<float>(weight_decay);
  c.step_size = static_cast<float>(lr / bias_correction(beta1, step));
  c.bc2_sqrt = static_cast<float>(sqrt(bias_correction(beta2, step)));  // fp64 sqrt is correctly rounded
  c.decay = static_cast<float>(1.0 - lr * weight_decay);
  return c;
}

// The Adam moment update, shared with LAMB: m = lerp(m, g, 1 - β1); v = β2 v + (1 - β2) g², rounded as torch
// rounds exp_avg.lerp_(g, 1 - β1) and exp_avg_sq.mul_(β2).addcmul_(g, g, 1 - β2) on the device the code runs on:
// torch's CPU addcmul is fma((1 - β2) g, g, β2 v), its CUDA addcmul fma(1 - β2, g g, β2 v) (ATen's
// pointwise_op_impl rounds the product of the two tensors first). The two differ in the last bit of v.
FO_HD FO_INLINE void adam_moments(float g, float& m, float& v, const MomentCoefficients& c) {
  m = lerp(m, g, c.one_minus_beta1);
#ifdef __CUDA_ARCH__
  v = fma_rn(c.one_minus_beta2, mul_rn(g, g), mul_rn(v, c.beta2));
#else
  v = fma_rn(mul_rn(c.one_minus_beta2, g), g, mul_rn(v, c.beta2));
#endif
}

// Kernel arguments of one Adam launch. Operand tables in the order of fused_optim.native.ADAM_OPERANDS.
struct AdamArgs {
  const int64_t* param;
  const int64_t* grad;
  const int64_t* exp_avg;
  const int64_t* exp_avg_sq;
  const int64_t* max_exp_avg_sq;  // AMSGRAD only
  const int64_t* master_param;    // MASTER only: fp32 master weights of bf16/fp16 params
  const int64_t* step;            // fp32 scalars, one per tensor
  double lr;                      // used when lr_ptr is null
  const void* lr_ptr;             // lr read from memory: a 1-element fp32 or fp64 tensor
  bool lr_is_double;
  double beta1, beta2, eps, weight_decay;
  const float* grad_scale;  // UNSCALE only: GradScaler's scale (fp32, 1 element)
  const float* found_inf;   // null, or GradScaler's found_inf: nonzero skips the whole step
};

template <typename P, typename G, bool AMSGRAD, bool MAXIMIZE, bool DECOUPLED, bool MASTER, bool UNSCALE>
struct AdamRule {
  static_assert(!MASTER || !std::is_same_v<P, float>, "master weights exist for bf16/fp16 params only");
  using Args = AdamArgs;

  struct Tensor {
    P* param;
    G* grad;
    float* exp_avg;
    float* exp_avg_sq;
    float* max_exp_avg_sq;
    float* master_param;
    float* step_ptr;
    float step;  // the new step, written by finish()
    float grad_scale;
    AdamCoefficients c;
  };

  static FO_HD FO_INLINE bool skip(const Args& a) { return a.found_inf != nullptr && *a.found_inf != 0.0f; }

  static FO_HD FO_INLINE Tensor tensor(const Args& a, int64_t t) {
    Tensor x;
    x.param = operand<P>(a.param, t);
    x.grad = operand<G>(a.grad, t);
    x.exp_avg = operand<float>(a.exp_avg, t);
    x.exp_avg_sq = operand<float>(a.exp_avg_sq, t);
    x.max_exp_avg_sq = AMSGRAD ? operand<float>(a.max_exp_avg_sq, t) : nullptr;
    x.master_param = MASTER ? operand<float>(a.master_param, t) : nullptr;
    x.step_ptr = operand<float>(a.step, t);
    x.step = add_rn(*x.step_ptr, 1.0f);
    x.grad_scale = UNSCALE ? *a.grad_scale : 1.0f;
    double lr = a.lr;
    if (a.lr_ptr != nullptr) {
      lr = a.lr_is_double ? *static_cast<const double*>(a.lr_ptr)
                          : static_cast<double>(*static_cast<const float*>(a.lr_ptr));
    }
    x.c = adam_coefficients(lr, a.beta1, a.beta2, a.eps, a.weight_decay, x.step);
    return x;
  }

  static FO_HD FO_INLINE bool aligned(const Tensor& x) {
    return vec_aligned(x.param) && vec_aligned(x.grad) && vec_aligned(x.exp_avg) && vec_aligned(x.exp_avg_sq) &&
           (!AMSGRAD || vec_aligned(x.max_exp_avg_sq)) && (!MASTER || vec_aligned(x.master_param));
  }

  template <int N, bool VEC>
  static FO_HD FO_INLINE void apply(const Tensor& x, int64_t i) {
    const AdamCoefficients& c = x.c;
    float g[N], theta[N], m[N], v[N];
    load<N, VEC>(x.grad, i, g);
    if constexpr (MASTER) {
      load<N, VEC>(x.master_param, i, theta);
    } else {
      load<N, VEC>(x.param, i, theta);
    }
    load<N, VEC>(x.exp_avg, i, m);
    load<N, VEC>(x.exp_avg_sq, i, v);
    float vmax[N];
    if constexpr (AMSGRAD) load<N, VEC>(x.max_exp_avg_sq, i, vmax);

    if constexpr (UNSCALE) {
      FO_UNROLL
      for (int k = 0; k < N; ++k) g[k] = div_rn(g[k], x.grad_scale);
      store<N, VEC>(x.grad, i, g);
    }
    FO_UNROLL
    for (int k = 0; k < N; ++k) {
      float gk = MAXIMIZE ? -g[k] : g[k];
      if (c.weight_decay != 0.0f) {
        if constexpr (DECOUPLED) {
          theta[k] = mul_rn(theta[k], c.decay);
        } else {
          gk = fma_rn(c.weight_decay, theta[k], gk);  // torch's grad.add(param, alpha=wd) is one FMA
        }
      }
      adam_moments(gk, m[k], v[k], c);
      float v_hat = v[k];
      if constexpr (AMSGRAD) {
        vmax[k] = max_nan(vmax[k], v[k]);
        v_hat = vmax[k];
      }
      const float denom = add_rn(div_rn(sqrt_rn(v_hat), c.bc2_sqrt), c.eps);
      theta[k] = add_rn(theta[k], div_rn(mul_rn(-c.step_size, m[k]), denom));
    }

    store<N, VEC>(x.exp_avg, i, m);
    store<N, VEC>(x.exp_avg_sq, i, v);
    if constexpr (AMSGRAD) store<N, VEC>(x.max_exp_avg_sq, i, vmax);
    if constexpr (MASTER) store<N, VEC>(x.master_param, i, theta);
    store<N, VEC>(x.param, i, theta);  // with MASTER: the bf16/fp16 param, rounded once from the master
  }

  static FO_HD FO_INLINE void finish(const Tensor& x) { *x.step_ptr = x.step; }
};

}  // namespace fused_optim
