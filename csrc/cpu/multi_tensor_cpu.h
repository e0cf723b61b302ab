// The CPU multi-tensor engine: the rules of csrc/<opt>_rule.h over the block map of fused_optim/tables.py.
//
// One launch updates every tensor of a bucket:
//   1. skip everything when the rule says so (GradScaler found inf/NaN): params, state and steps unchanged;
//   2. each tensor's context once (Rule::tensor: typed pointers, step + 1, fp32 coefficients);
//   3. the blocks, split across threads by the caller's parallel_for (ATen's, i.e. OpenMP in torch's builds, so
//      torch.set_num_threads applies; the build needs -fopenmp, see fused_optim/_build.py); inside a block one
//      `#pragma omp simd` loop over elements, which the compiler
//      vectorizes (the rules are branch-free per element: flags are template arguments, the lerp branch is
//      uniform and becomes a blend);
//   4. each tensor's new step (Rule::finish), after every block has used the old one. On the CPU the phases are
//      simply sequential; the GPU needs the arrival counters of multi_tensor.cuh for the same guarantee.
//
// ISA. Distributed builds target the baseline ISA (x86-64: SSE2, no FMA instruction, so every fma_rn would be a
// libm call and no loop would vectorize well). On x86-64 the loops are therefore compiled twice from the same
// source: once for the baseline and once with target("avx2,fma") (GCC/Clang function attribute; the rule's
// always-inline functions are inlined into it and compiled for that target), and the AVX2 build is used when
// the CPU has AVX2 and FMA (__builtin_cpu_supports checks the OS state too). Both round identically: every
// operation is IEEE fp32 and an FMA is a single rounding whether libm or the instruction computes it.
// FUSED_OPTIM_CPU_ISA=baseline forces the baseline build (tests compare the two bitwise).
#pragma once

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "../engine.h"

namespace fused_optim {
namespace cpu {

enum class Isa : int { kBaseline = 0, kAvx2 = 1 };

// The ISA the loops run with: AVX2+FMA when the CPU has them, unless FUSED_OPTIM_CPU_ISA=baseline.
inline Isa active_isa() {
  const char* forced = std::getenv("FUSED_OPTIM_CPU_ISA");
  if (forced != nullptr && std::strcmp(forced, "baseline") == 0) return Isa::kBaseline;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  static const bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return avx2 ? Isa::kAvx2 : Isa::kBaseline;
#else
  return Isa::kBaseline;  // other architectures: the baseline has FMA (aarch64) or we do not special-case it
#endif
}

inline const char* isa_name(Isa isa) { return isa == Isa::kAvx2 ? "avx2+fma" : "baseline"; }

template <class Rule>
FO_INLINE void run_blocks_impl(const typename Rule::Tensor* tensors, const BlockMap& map, int64_t b0, int64_t b1) {
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t t = map.block_tensor[b];
    const typename Rule::Tensor x = tensors[t];
    const int64_t start = map.block_start[b];
    const int64_t n = map.numels[t];
    const int64_t end = start + map.block < n ? start + map.block : n;
#pragma omp simd
    for (int64_t i = start; i < end; ++i) Rule::template apply<1, false>(x, i);
  }
}

template <class Rule>
void run_blocks_baseline(const typename Rule::Tensor* tensors, const BlockMap& map, int64_t b0, int64_t b1) {
  run_blocks_impl<Rule>(tensors, map, b0, b1);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <class Rule>
__attribute__((target("avx2,fma"))) void run_blocks_avx2(const typename Rule::Tensor* tensors, const BlockMap& map,
                                                         int64_t b0, int64_t b1) {
  run_blocks_impl<Rule>(tensors, map, b0, b1);
}
#endif

// One launch of `Rule` on the CPU. parallel_for(begin, end, grain, fn) runs fn(b0, b1) over sub-ranges of the
// block map, possibly on several threads (the caller supplies ATen's; the engine itself needs no ATen).
template <class Rule, class ParallelFor>
void launch(const typename Rule::Args& args, const BlockMap& map, Isa isa, ParallelFor&& parallel_for) {
  if (map.n_blocks == 0 || Rule::skip(args)) return;
  std::vector<typename Rule::Tensor> tensors(static_cast<size_t>(map.n_tensors));
  for (int64_t t = 0; t < map.n_tensors; ++t) tensors[t] = Rule::tensor(args, t);
  const typename Rule::Tensor* x = tensors.data();
  // ~32K elements per task (ATen's GRAIN_SIZE): smaller launches stay on the calling thread.
  const int64_t grain = map.block >= 32768 ? 1 : 32768 / map.block;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == Isa::kAvx2) {
    parallel_for(0, map.n_blocks, grain, [&](int64_t b0, int64_t b1) { run_blocks_avx2<Rule>(x, map, b0, b1); });
  } else
#endif
  {
    (void)isa;
    parallel_for(0, map.n_blocks, grain, [&](int64_t b0, int64_t b1) { run_blocks_baseline<Rule>(x, map, b0, b1); });
  }
  for (int64_t t = 0; t < map.n_tensors; ++t) Rule::finish(tensors[t]);
}

}  // namespace cpu
}  // namespace fused_optim
