// What the two multi-tensor engines (CUDA: multi_tensor.cuh, CPU: cpu/multi_tensor_cpu.h) share with the rules:
// the block map, typed operand pointers, loads and stores, and the one place where dtypes and compile-time flags
// are dispatched. Plain C++/CUDA, no ATen.
//
// The tables are the ones fused_optim/tables.py builds (TensorTable) and caches on the optimizer; nothing here
// rebuilds them. Per operand, an int64 table holds each tensor's address (0 where the operand is absent); a block
// map cuts every tensor into `block`-element blocks (block b covers elements block_start[b] ..
// block_start[b] + block of tensor block_tensor[b]); a zero-size tensor has one empty block, so that its step
// advances as in torch.
//
// A rule (adam_rule.h, and later lamb_rule.h, adafactor_rule.h) is a struct with
//   Args                          the kernel arguments: operand tables and hyperparameters (plain data);
//   Tensor                        what one tensor's blocks need: typed pointers, fp32 coefficients, its new step;
//   static bool skip(args)        true when the whole launch must do nothing (GradScaler found inf/NaN);
//   static Tensor tensor(args, t) reads tensor t's step and computes its coefficients (once per tensor on the
//                                 CPU, by one thread per block on the GPU);
//   static bool aligned(x)        every operand address of tensor x allows kVec-element vector accesses;
//   template <int N, bool VEC> static void apply(x, i)
//                                 updates elements i .. i + N - 1 of tensor x: loads through load<N, VEC>, fp32
//                                 math, stores through store<N, VEC>; VEC (GPU only) selects vector instructions;
//   static void finish(x)         writes tensor x's new step; called once per tensor per launch, after every
//                                 block of the tensor has read the old one.
// An engine owns everything else: the grid over the block map, vector body and scalar tail, 64-bit indexing,
// the skip, the step protocol.
//
// Per-block partial sums (LAMB's norms, a global grad norm). A rule that reduces declares
//   static constexpr int kPartials = Q;   (Q >= 1 quantities; absent or 0: a purely elementwise rule)
// and its apply takes one more argument, `Partial (&part)[Q][N]`, where it leaves each element's contribution
// (θ², u², ...). The engine adds the contributions in a fixed order of its own and writes one sum per quantity
// and block into `partials[q * n_blocks + b]` (the layout of kernels/lamb.py); a skipped launch writes zeros. A
// separate launch, segment_sum, then adds each tensor's partials in a fixed order: there is no float atomic, and
// the same inputs give bitwise the same sums on every run. The two steps stay separate so that under FSDP an
// all-reduce of the per-tensor sums fits between them.
//
// Contributions, accumulators, partials and segment sums are all float64 (Partial): the rules square their fp32
// values in float64, which is exact and cannot overflow or underflow (an fp32 square can: one finite grad of
// 1e20 made an fp32 Σg² inf), as the reference's vector_norm(dtype=float64) does (lamb_rule.h says why it is
// cheap). Only LAMB's rules reduce on this engine.
//
// Summation depth, which bounds the rounding error of a sum of non-negative terms (fused_optim/testing.py,
// sum_sq_rel: 39 additions per 4096-element block, then ceil(n / 1024) + 15 per segment of n partials, each
// rounding eps64 = 2^-53); both native engines stay within it:
//   CPU block:   kCpuLanes = 128 lanes, lane k adding elements k, k + 128, ... in order (32 per 4096-element
//                block), then a pairwise tree over the lanes (7 levels): depth 39, whatever the ISA or vector width
//                (each lane is its own accumulator, so vectorizing the loop does not reorder any addition);
//   CUDA block:  each of the 256 threads adds its 16 elements in order (17 with a tensor's last few), then a
//                shared-memory tree (8 levels): at most 25;
//   segment_sum: kSegmentLanes = 1024 lanes, lane k adding partials k, k + 1024, ... in order, then a pairwise
//                tree (10 levels): depth ceil(n / 1024) + 10, and the same order, hence the same bits, on the CPU
//                and the GPU.
#pragma once

#include <cstdint>
#include <type_traits>

#include "numerics.h"

namespace fused_optim {

// Elements per vector access: 4 fp32 = 16 bytes (one ld.global.v4), 4 bf16/fp16 = 8 bytes.
constexpr int kVec = 4;

// Accumulator lanes of a per-block partial sum on the CPU, and of segment_sum on both engines (see above).
constexpr int kCpuLanes = 128;
constexpr int kSegmentLanes = 1024;

// The type of a contribution, a lane, a partial and a segment sum.
using Partial = double;

// Rule::kPartials, or 0 for a rule without per-block partial sums.
template <class Rule, class = void>
struct PartialsOf : std::integral_constant<int, 0> {};
template <class Rule>
struct PartialsOf<Rule, std::void_t<decltype(Rule::kPartials)>> : std::integral_constant<int, Rule::kPartials> {};
template <class Rule>
constexpr int partials_of = PartialsOf<Rule>::value;

// The block map of one launch (device pointers on CUDA, host pointers on CPU).
struct BlockMap {
  const int64_t* numels;        // [n_tensors]
  const int32_t* block_tensor;  // [n_blocks]
  const int64_t* block_start;   // [n_blocks], element offset of the block in its tensor
  int32_t* arrivals;            // [n_tensors], zero between launches (CUDA step protocol)
  int64_t n_tensors;
  int64_t n_blocks;
  int64_t block;  // elements per block; a multiple of kVec, so that a vector never straddles two blocks
};

// Typed pointer to tensor t of one operand's address table (nullptr where the operand is absent).
template <typename T>
FO_HD FO_INLINE T* operand(const int64_t* table, int64_t t) {
  return reinterpret_cast<T*>(static_cast<uintptr_t>(table[t]));
}

// True when `p` allows a kVec-element vector access of T at every multiple of kVec elements.
template <typename T>
FO_HD FO_INLINE bool vec_aligned(const T* p) {
  return reinterpret_cast<uintptr_t>(p) % (sizeof(T) * kVec) == 0;
}

// ---------------------------------------------------------------------------------------------------------------
// Loads and stores of N consecutive elements as fp32. VEC = true (GPU, aligned tensors, N == kVec): one 16-byte
// (fp32) or 8-byte (bf16/fp16) access; otherwise element by element (and always on the CPU, whose loops the
// compiler vectorizes).
// ---------------------------------------------------------------------------------------------------------------
#if defined(__CUDACC__)
template <typename T>
__device__ FO_INLINE void load_vector(const T* p, int64_t i, float (&out)[kVec]) {
  if constexpr (std::is_same_v<T, float>) {
    const float4 v = *reinterpret_cast<const float4*>(p + i);
    out[0] = v.x;
    out[1] = v.y;
    out[2] = v.z;
    out[3] = v.w;
  } else {
    const uint2 v = *reinterpret_cast<const uint2*>(p + i);
    out[0] = to_float(T{static_cast<uint16_t>(v.x & 0xFFFFu)});
    out[1] = to_float(T{static_cast<uint16_t>(v.x >> 16)});
    out[2] = to_float(T{static_cast<uint16_t>(v.y & 0xFFFFu)});
    out[3] = to_float(T{static_cast<uint16_t>(v.y >> 16)});
  }
}

template <typename T>
__device__ FO_INLINE void store_vector(T* p, int64_t i, const float (&in)[kVec]) {
  if constexpr (std::is_same_v<T, float>) {
    *reinterpret_cast<float4*>(p + i) = make_float4(in[0], in[1], in[2], in[3]);
  } else {
    uint2 v;
    v.x = static_cast<uint32_t>(from_float<T>(in[0]).bits) | (static_cast<uint32_t>(from_float<T>(in[1]).bits) << 16);
    v.y = static_cast<uint32_t>(from_float<T>(in[2]).bits) | (static_cast<uint32_t>(from_float<T>(in[3]).bits) << 16);
    *reinterpret_cast<uint2*>(p + i) = v;
  }
}
#endif

template <int N, bool VEC, typename T>
FO_HD FO_INLINE void load(const T* p, int64_t i, float (&out)[N]) {
  static_assert(!VEC || N == kVec, "vector accesses move kVec elements");
#if defined(__CUDA_ARCH__)
  if constexpr (VEC) {
    load_vector(p, i, out);
  } else {
    FO_UNROLL
    for (int k = 0; k < N; ++k) out[k] = to_float(p[i + k]);
  }
#else
  for (int k = 0; k < N; ++k) out[k] = to_float(p[i + k]);
#endif
}

template <int N, bool VEC, typename T>
FO_HD FO_INLINE void store(T* p, int64_t i, const float (&in)[N]) {
  static_assert(!VEC || N == kVec, "vector accesses move kVec elements");
#if defined(__CUDA_ARCH__)
  if constexpr (VEC) {
    store_vector(p, i, in);
  } else {
    FO_UNROLL
    for (int k = 0; k < N; ++k) p[i + k] = from_float<T>(in[k]);
  }
#else
  for (int k = 0; k < N; ++k) p[i + k] = from_float<T>(in[k]);
#endif
}

// ---------------------------------------------------------------------------------------------------------------
// Dispatch: the one place where runtime dtypes and flags become template arguments. A launcher calls
//   dispatch_dtype(param_dtype, [&](auto p) { dispatch_dtype(grad_dtype, [&](auto g) { dispatch_flags(...) }) })
// and `typename decltype(p)::type` is the storage type.
// ---------------------------------------------------------------------------------------------------------------
enum class DType : int { kFloat32 = 0, kFloat16 = 1, kBFloat16 = 2 };

template <typename T>
struct TypeTag {
  using type = T;
};

template <typename F>
void dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::kFloat32:
      f(TypeTag<float>{});
      break;
    case DType::kFloat16:
      f(TypeTag<fp16_t>{});
      break;
    case DType::kBFloat16:
      f(TypeTag<bf16_t>{});
      break;
  }
}

// Calls f(std::integral_constant<bool, b0>{}, std::integral_constant<bool, b1>{}, ...) for runtime bools.
template <typename F>
void dispatch_flags(F&& f) {
  f();
}

template <typename F, typename... Rest>
void dispatch_flags(F&& f, bool first, Rest... rest) {
  if (first) {
    dispatch_flags([&](auto... flags) { f(std::true_type{}, flags...); }, rest...);
  } else {
    dispatch_flags([&](auto... flags) { f(std::false_type{}, flags...); }, rest...);
  }
}

}  // namespace fused_optim
