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
//
// Per-block partial sums (engine.h; float64): a reducing rule's element contributions go into kCpuLanes = 128
// accumulators, element k of a 128-element chunk into lane k, so that the `omp simd` loop adds lane-wise (each lane
// is its own accumulator: no reassociation, the same bits with SSE2 or AVX2 or one element at a time), then a
// pairwise tree over the lanes gives the block's partial. segment_sum adds each segment's partials in the order
// the CUDA engine uses (1,024 lanes, then a tree), one segment per task.
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

// The sum of lanes[0 .. width), width a power of two, as a pairwise tree: lanes k and k + w for w = width / 2, ...
template <int Width, typename T>
FO_INLINE T tree_sum(T* lanes) {
  for (int w = Width / 2; w > 0; w /= 2) {
    for (int k = 0; k < w; ++k) lanes[k] = add_rn(lanes[k], lanes[k + w]);
  }
  return lanes[0];
}

template <class Rule>
FO_INLINE void run_blocks_impl(const typename Rule::Tensor* tensors, const BlockMap& map, Partial* partials,
                               int64_t b0, int64_t b1) {
  constexpr int Q = partials_of<Rule>;
  for (int64_t b = b0; b < b1; ++b) {
    const int64_t t = map.block_tensor[b];
    const typename Rule::Tensor x = tensors[t];
    const int64_t start = map.block_start[b];
    const int64_t n = map.numels[t];
    const int64_t end = start + map.block < n ? start + map.block : n;
    if constexpr (Q == 0) {
#pragma omp simd
      for (int64_t i = start; i < end; ++i) Rule::template apply<1, false>(x, i);
    } else {
      Partial lanes[Q][kCpuLanes] = {};
      for (int64_t c = start; c < end; c += kCpuLanes) {
        const int len = static_cast<int>(end - c < kCpuLanes ? end - c : kCpuLanes);
#pragma omp simd
        for (int k = 0; k < len; ++k) {
          Partial part[Q][1];
          Rule::template apply<1, false>(x, c + k, part);
#pragma GCC unroll 8
          for (int q = 0; q < Q; ++q) lanes[q][k] = add_rn(lanes[q][k], part[q][0]);
        }
      }
      for (int q = 0; q < Q; ++q) partials[q * map.n_blocks + b] = tree_sum<kCpuLanes>(lanes[q]);
    }
  }
}

template <class Rule>
void run_blocks_baseline(const typename Rule::Tensor* tensors, const BlockMap& map, Partial* partials, int64_t b0,
                         int64_t b1) {
  run_blocks_impl<Rule>(tensors, map, partials, b0, b1);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <class Rule>
__attribute__((target("avx2,fma"))) void run_blocks_avx2(const typename Rule::Tensor* tensors, const BlockMap& map,
                                                         Partial* partials, int64_t b0, int64_t b1) {
  run_blocks_impl<Rule>(tensors, map, partials, b0, b1);
}
#endif

// One launch of `Rule` on the CPU. parallel_for(begin, end, grain, fn) runs fn(b0, b1) over sub-ranges of the
// block map, possibly on several threads (the caller supplies ATen's; the engine itself needs no ATen).
// `partials`: a reducing rule's [kPartials, n_blocks] output (engine.h), unused otherwise.
template <class Rule, class ParallelFor>
void launch(const typename Rule::Args& args, const BlockMap& map, Isa isa, ParallelFor&& parallel_for,
            Partial* partials = nullptr) {
  constexpr int Q = partials_of<Rule>;
  if (map.n_blocks == 0) return;
  if (Rule::skip(args)) {
    for (int64_t i = 0; i < Q * map.n_blocks; ++i) partials[i] = 0.0;
    return;
  }
  std::vector<typename Rule::Tensor> tensors(static_cast<size_t>(map.n_tensors));
  for (int64_t t = 0; t < map.n_tensors; ++t) tensors[t] = Rule::tensor(args, t);
  const typename Rule::Tensor* x = tensors.data();
  // ~32K elements per task (ATen's GRAIN_SIZE): smaller launches stay on the calling thread.
  const int64_t grain = map.block >= 32768 ? 1 : 32768 / map.block;
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == Isa::kAvx2) {
    parallel_for(0, map.n_blocks, grain,
                 [&](int64_t b0, int64_t b1) { run_blocks_avx2<Rule>(x, map, partials, b0, b1); });
  } else
#endif
  {
    (void)isa;
    parallel_for(0, map.n_blocks, grain,
                 [&](int64_t b0, int64_t b1) { run_blocks_baseline<Rule>(x, map, partials, b0, b1); });
  }
  for (int64_t t = 0; t < map.n_tensors; ++t) Rule::finish(tensors[t]);
}

// out[q * n_segments + s] = the sum of partials[q * n_partials + seg_start[s] .. seg_start[s + 1]], in the order of
// the CUDA engine's segment_sum_kernel (engine.h): lane k adds partials k, k + 1024, ... in order, then a pairwise
// tree over the lanes. Only the first `width` lanes (a power of two >= the segment's length, at most 1024) take
// part in the tree: the others hold +0 (each lane starts at +0 and a sum that starts at +0 is never -0), and
// x + (+0) = x, so the levels above `width` change nothing and the result is the full tree's, bit for bit.
template <typename Index, class ParallelFor>
void segment_sum(const Partial* partials, int64_t n_quantities, int64_t n_partials, const Index* seg_start,
                 int64_t n_segments, Partial* out, ParallelFor&& parallel_for) {
  const int64_t tasks = n_quantities * n_segments;
  parallel_for(0, tasks, 256, [&](int64_t task0, int64_t task1) {
    Partial lanes[kSegmentLanes];
    for (int64_t task = task0; task < task1; ++task) {
      const int64_t q = task / n_segments;
      const int64_t s = task % n_segments;
      const int64_t lo = static_cast<int64_t>(seg_start[s]);
      const int64_t len = static_cast<int64_t>(seg_start[s + 1]) - lo;
      const Partial* row = partials + q * n_partials + lo;
      int width = 1;
      while (width < len && width < kSegmentLanes) width *= 2;
      for (int k = 0; k < width; ++k) lanes[k] = 0.0;
      for (int64_t j = 0; j < len; j += kSegmentLanes) {
        const int64_t m = len - j < kSegmentLanes ? len - j : kSegmentLanes;
        for (int64_t k = 0; k < m; ++k) lanes[k] = add_rn(lanes[k], row[j + k]);
      }
      for (int w = width / 2; w > 0; w /= 2) {
        for (int k = 0; k < w; ++k) lanes[k] = add_rn(lanes[k], lanes[k + w]);
      }
      out[q * n_segments + s] = lanes[0];
    }
  });
}

}  // namespace cpu
}  // namespace fused_optim
