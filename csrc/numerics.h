// fp32 arithmetic and 16-bit storage types shared by the CUDA kernels and the CPU engine.
//
// Plain C++/CUDA, no ATen: every .cu file that includes this compiles with nvcc alone (csrc/check_cuda_compile.sh).
//
// Rounding. The rules must round exactly like the Triton rules and the reference (tests/tolerances.py): every
// operation is one IEEE round-to-nearest fp32 operation, division and square root are correctly rounded, and an
// FMA appears only where a rule writes fma_rn (where torch's own kernels use one). On the GPU the *_rn functions
// are CUDA's rounding intrinsics, which nvcc never contracts into an FMA nor replaces by approximations, whatever
// -fmad / --use_fast_math say. On the CPU they are plain operators, and the build passes -ffp-contract=off so that
// the host compiler does not fuse a multiply and an add either (fused_optim/_build.py).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__CUDACC__)
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#define FO_HD __host__ __device__
#define FO_INLINE __forceinline__
#define FO_UNROLL _Pragma("unroll")
#else
#include <cmath>
#define FO_HD
#define FO_INLINE inline __attribute__((always_inline))
#define FO_UNROLL
#endif

namespace fused_optim {

// ---------------------------------------------------------------------------------------------------------------
// fp32 operations, each rounded once
// ---------------------------------------------------------------------------------------------------------------
FO_HD FO_INLINE float add_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(a, b);
#else
  return a + b;
#endif
}

FO_HD FO_INLINE float sub_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fsub_rn(a, b);
#else
  return a - b;
#endif
}

FO_HD FO_INLINE float mul_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fmul_rn(a, b);
#else
  return a * b;
#endif
}

FO_HD FO_INLINE float div_rn(float a, float b) {
#if defined(__CUDA_ARCH__)
  return __fdiv_rn(a, b);
#else
  return a / b;
#endif
}

FO_HD FO_INLINE float sqrt_rn(float a) {
#if defined(__CUDA_ARCH__)
  return __fsqrt_rn(a);
#else
  return std::sqrt(a);
#endif
}

// a * b + c with one rounding. On x86 CPUs without FMA (the baseline ISA) this is a libm call; the CPU engine
// runtime-dispatches to an AVX2+FMA build of its loops where the CPU has it (csrc/cpu/multi_tensor_cpu.h).
FO_HD FO_INLINE float fma_rn(float a, float b, float c) {
#if defined(__CUDA_ARCH__)
  return __fmaf_rn(a, b, c);
#else
  return std::fma(a, b, c);
#endif
}

// max and min that propagate NaN from either side, as torch.maximum and torch.minimum do (fmax and fmin drop it).
template <typename T>
FO_HD FO_INLINE T max_nan(T a, T b) {
  return (a > b || a != a) ? a : b;
}
template <typename T>
FO_HD FO_INLINE T min_nan(T a, T b) {
  return (a < b || a != a) ? a : b;
}

// ---------------------------------------------------------------------------------------------------------------
// float64 operations, each rounded once: the sums of squares of LAMB's norms (lamb_rule.h, the engines' partial
// sums). The CUDA intrinsics keep nvcc from contracting a multiply and an add, as the fp32 ones above.
// ---------------------------------------------------------------------------------------------------------------
FO_HD FO_INLINE double add_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dadd_rn(a, b);
#else
  return a + b;
#endif
}

FO_HD FO_INLINE double mul_rn(double a, double b) {
#if defined(__CUDA_ARCH__)
  return __dmul_rn(a, b);
#else
  return a * b;
#endif
}

FO_HD FO_INLINE uint32_t bits_of(float f) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(f);
#else
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
#endif
}

FO_HD FO_INLINE float float_of(uint32_t u) {
#if defined(__CUDA_ARCH__)
  return __uint_as_float(u);
#else
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Storage types. A bf16 or fp16 value is held as its 16 bits; the math always runs in fp32. Widening is exact;
// narrowing rounds to nearest even (as torch's .to(dtype)). On the GPU the hardware conversions do it; the CPU
// uses the bit formulas below, written without branches so that the loops still vectorize.
// ---------------------------------------------------------------------------------------------------------------
struct bf16_t {
  uint16_t bits;
};
struct fp16_t {
  uint16_t bits;
};

// Conversions between a storage type and fp32.
template <typename T>
struct Convert;

template <>
struct Convert<float> {
  static FO_HD FO_INLINE float to_float(float x) { return x; }
  static FO_HD FO_INLINE float from_float(float x) { return x; }
};

template <>
struct Convert<bf16_t> {
  static FO_HD FO_INLINE float to_float(bf16_t x) { return float_of(static_cast<uint32_t>(x.bits) << 16); }
  static FO_HD FO_INLINE bf16_t from_float(float x) {
#if defined(__CUDA_ARCH__)
    return bf16_t{__bfloat16_as_ushort(__float2bfloat16_rn(x))};
#else
    // Round to nearest even on the bit pattern: adding 0x7FFF plus the lowest kept bit carries into the kept bits
    // exactly when the dropped half rounds up (to inf too, as it should); NaN stays a quiet NaN. Same formula as
    // kernels/engine.py round_to.
    const uint32_t u = bits_of(x);
    const uint32_t rounded = u + 0x7FFFu + ((u >> 16) & 1u);
    return bf16_t{static_cast<uint16_t>(((x != x) ? (u | 0x400000u) : rounded) >> 16)};
#endif
  }
};

template <>
struct Convert<fp16_t> {
  static FO_HD FO_INLINE float to_float(fp16_t x) {
#if defined(__CUDA_ARCH__)
    return __half2float(__ushort_as_half(x.bits));
#else
    // Exact: move exponent and mantissa into fp32 position and rebias the exponent by 127 - 15 = 112; inf/NaN
    // (exponent 31) rebias by 224 more; subnormals (exponent 0) are renormalized by one exact fp32 subtraction:
    // (2^-14 + m 2^-24) - 2^-14 = m 2^-24, both operands normal, so flush-to-zero modes do not touch it.
    // (F. Giesen's half_to_float, public domain, https://gist.github.com/rygorous/2156668.)
    const uint32_t em = static_cast<uint32_t>(x.bits & 0x7FFFu) << 13;
    const uint32_t exp = em & 0x0F800000u;
    const uint32_t normal = em + 0x38000000u;
    const uint32_t infnan = em + 0x70000000u;
    const uint32_t subnormal = bits_of(float_of(em + 0x38800000u) - float_of(0x38800000u));
    const uint32_t r = exp == 0x0F800000u ? infnan : (exp == 0u ? subnormal : normal);
    return float_of(r | (static_cast<uint32_t>(x.bits & 0x8000u) << 16));
#endif
  }
  static FO_HD FO_INLINE fp16_t from_float(float x) {
#if defined(__CUDA_ARCH__)
    return fp16_t{__half_as_ushort(__float2half_rn(x))};
#else
    // Round to nearest even (F. Giesen's float_to_half_fast3_rtne, public domain, same gist):
    // * |x| >= 2^16: inf, or a quiet NaN (0x7E00) for NaN;
    // * |x| < 2^-14 (fp16 subnormal or zero): adding 0.5 makes the fp32 adder round |x| to a multiple of 2^-24,
    //   the fp16 subnormal spacing (ulp(0.5) = 2^-24); the low bits of the sum are the fp16 bits;
    // * otherwise rebias the exponent by -112 and round the 13 dropped bits to nearest even (adding 0xFFF plus
    //   the lowest kept bit); values from 65520 up carry into exponent 31, i.e. round to inf, as they should.
    const uint32_t u = bits_of(x);
    const uint32_t sign = (u >> 16) & 0x8000u;
    const uint32_t a = u & 0x7FFFFFFFu;
    const uint32_t special = a > 0x7F800000u ? 0x7E00u : 0x7C00u;
    const uint32_t subnormal = bits_of(float_of(a) + 0.5f) - 0x3F000000u;
    const uint32_t normal = (a + 0xC8000FFFu + ((a >> 13) & 1u)) >> 13;
    const uint32_t h = a >= 0x47800000u ? special : (a < 0x38800000u ? subnormal : normal);
    return fp16_t{static_cast<uint16_t>(h | sign)};
#endif
  }
};

template <typename T>
FO_HD FO_INLINE float to_float(T x) {
  return Convert<T>::to_float(x);
}

template <typename T>
FO_HD FO_INLINE T from_float(float x) {
  return Convert<T>::from_float(x);
}

}  // namespace fused_optim
