// The CUDA multi-tensor engine: one launch over the block map of fused_optim/tables.py for any number of tensors.
//
// The tables live in device memory, built once on the host and cached by the optimizer, so a launch is not bounded
// by the 4 KB kernel-argument space that limits torch's fused Adam (36 tensors / 320 blocks per launch) and apex
// (110 tensors): one CUDA block per table block (grid = n_blocks), each reads its tensor index and element offset
// from the block map and its tensor's addresses from the operand tables.
//
// Inside a block: 16-byte vector accesses (ld/st.global.v4 for fp32, 8 bytes for bf16/fp16) when every operand
// of the tensor is 16-byte aligned (checked per tensor, so one odd view does not slow the rest), a scalar tail for
// the last elements of a tensor, scalar accesses otherwise. Indices are 64-bit: a tensor of more than 2^31
// elements is updated completely.
//
// Per-tensor step protocol (as kernels/engine.py): torch keeps one step per parameter and they differ across a
// launch, so each block reads its tensor's step, uses step + 1, and the new value is written exactly once, after
// every block of the tensor has read the old one. Thread 0 of each block reads the step (Rule::tensor) before it
// increments the tensor's arrival counter; the block that sees n_blocks - 1 arrivals is the last reader, writes
// the step (Rule::finish) and resets the counter to 0 for the next launch. The __threadfence before the atomic is
// the release of the "last block" pattern of the CUDA Programming Guide (threadFenceReduction); the store after
// it depends on the atomic's result. Integer atomics commute: the result is deterministic, and there is no float
// atomic anywhere. A zero-size tensor has one empty block, so its step advances too.
//
// GradScaler: when found_inf is set every block returns at once: params, state, grads and steps are unchanged
// (a reducing rule's partials are written as zeros). Nothing is read back to the host, so a step can be captured
// in a CUDA graph.
//
// Per-block partial sums (engine.h), in float64: each thread adds its elements' contributions in its loop order,
// then the block adds the 256 thread sums in a fixed shared-memory tree (2 KB per quantity) and thread 0 writes the
// block's partial; the per-tensor sums come from segment_sum_kernel, a separate launch (1,024 lanes per segment,
// then a tree: the order of the CPU engine's segment_sum, so both give the same bits).
//
// Plain CUDA over raw pointers (no ATen): compiled and checked by csrc/check_cuda_compile.sh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "engine.h"

namespace fused_optim {
namespace cuda {

// 256 threads x kVec elements = 1024 elements per pass: a 4096-element block is 4 passes per thread.
constexpr int kThreads = 256;

// Rule::apply on elements i .. i + N - 1, adding their contributions to the thread's sums (reducing rules).
template <class Rule, int N, bool VEC, int Q>
__device__ FO_INLINE void apply_at(const typename Rule::Tensor& x, int64_t i, Partial (&acc)[Q > 0 ? Q : 1]) {
  if constexpr (Q == 0) {
    Rule::template apply<N, VEC>(x, i);
  } else {
    Partial part[Q][N];
    Rule::template apply<N, VEC>(x, i, part);
    FO_UNROLL
    for (int q = 0; q < Q; ++q) {
      FO_UNROLL
      for (int k = 0; k < N; ++k) acc[q] = add_rn(acc[q], part[q][k]);
    }
  }
}

// The block's sum of each quantity, in a fixed order: the thread sums, then a tree over the threads.
template <int Q>
__device__ FO_INLINE void write_block_sums(const Partial (&acc)[Q], Partial* partials, int64_t n_blocks, int64_t b) {
  __shared__ Partial sums[Q][kThreads];
  FO_UNROLL
  for (int q = 0; q < Q; ++q) sums[q][threadIdx.x] = acc[q];
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) {
      FO_UNROLL
      for (int q = 0; q < Q; ++q) sums[q][threadIdx.x] = add_rn(sums[q][threadIdx.x], sums[q][threadIdx.x + w]);
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) {
    FO_UNROLL
    for (int q = 0; q < Q; ++q) partials[q * n_blocks + b] = sums[q][0];
  }
}

template <class Rule>
__global__ void __launch_bounds__(kThreads)
    multi_tensor_kernel(const typename Rule::Args args, const BlockMap map, Partial* partials) {
  constexpr int Q = partials_of<Rule>;
  const int64_t b = blockIdx.x;
  if (Rule::skip(args)) {
    if constexpr (Q > 0) {
      if (threadIdx.x == 0) {
        for (int q = 0; q < Q; ++q) partials[q * map.n_blocks + b] = 0.0;
      }
    }
    return;
  }

  const int64_t t = map.block_tensor[b];
  const int64_t n = map.numels[t];
  const int64_t start = map.block_start[b];
  const int64_t end = start + map.block < n ? start + map.block : n;

  __shared__ typename Rule::Tensor shared_x;
  if (threadIdx.x == 0) shared_x = Rule::tensor(args, t);
  __syncthreads();
  const typename Rule::Tensor x = shared_x;

  // Vectors from the block start (a multiple of block, itself a multiple of kVec, so every vector is aligned when
  // the tensor is), then one element per thread for the tail of the tensor, or for the whole block of a tensor
  // with an unaligned operand. Two copies of the rule's body per kernel, not three: it keeps nvcc's time down.
  const int64_t vec_end = Rule::aligned(x) ? start + (end > start ? (end - start) / kVec * kVec : 0) : start;
  Partial acc[Q > 0 ? Q : 1] = {};
  for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
       i += static_cast<int64_t>(kThreads) * kVec) {
    apply_at<Rule, kVec, true, Q>(x, i, acc);
  }
  for (int64_t i = vec_end + threadIdx.x; i < end; i += kThreads) apply_at<Rule, 1, false, Q>(x, i, acc);
  if constexpr (Q > 0) write_block_sums<Q>(acc, partials, map.n_blocks, b);

  if (threadIdx.x == 0) {
    const int64_t blocks_of_tensor = n > map.block ? (n + map.block - 1) / map.block : 1;
    __threadfence();
    const int arrived = atomicAdd(map.arrivals + t, 1);
    if (arrived == static_cast<int>(blocks_of_tensor - 1)) {
      Rule::finish(x);
      map.arrivals[t] = 0;
    }
  }
}

// Enqueues one launch of `Rule` over the whole block map on `stream`; returns nullptr or CUDA's error message.
// `partials`: a reducing rule's [kPartials, n_blocks] float64 output (device memory), unused otherwise.
template <class Rule>
const char* launch(const typename Rule::Args& args, const BlockMap& map, cudaStream_t stream,
                   Partial* partials = nullptr) {
  if (map.n_blocks == 0) return nullptr;
  multi_tensor_kernel<Rule><<<static_cast<unsigned int>(map.n_blocks), kThreads, 0, stream>>>(args, map, partials);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

// out[q * n_segments + s] = the sum of partials[q * n_partials + seg_start[s] .. seg_start[s + 1]], one CUDA block
// per (segment, quantity). The order of engine.h: lane k (k < kSegmentLanes) adds partials k, k + 1024, ... of the
// segment in order; thread t holds lanes t, t + 256, t + 512, t + 768, so the first two levels of the tree over
// the lanes (1024 -> 512 -> 256) are its own, the other eight go through shared memory.
template <typename Index>
__global__ void __launch_bounds__(kThreads)
    segment_sum_kernel(const Partial* partials, int64_t n_partials, const Index* seg_start, int64_t n_segments,
                       Partial* out) {
  static_assert(kSegmentLanes == 4 * kThreads, "four lanes per thread");
  const int64_t s = blockIdx.x;
  const int64_t q = blockIdx.y;
  const int64_t lo = static_cast<int64_t>(seg_start[s]);
  const int64_t hi = static_cast<int64_t>(seg_start[s + 1]);
  const Partial* row = partials + q * n_partials;
  Partial lane[4] = {0.0, 0.0, 0.0, 0.0};
  for (int64_t j = lo; j < hi; j += kSegmentLanes) {
    FO_UNROLL
    for (int c = 0; c < 4; ++c) {
      const int64_t i = j + threadIdx.x + c * kThreads;
      if (i < hi) lane[c] = add_rn(lane[c], row[i]);
    }
  }
  // Level 512: lane t += lane t + 512, lane t + 256 += lane t + 768; level 256: lane t += lane t + 256.
  __shared__ Partial sums[kThreads];
  sums[threadIdx.x] = add_rn(add_rn(lane[0], lane[2]), add_rn(lane[1], lane[3]));
  __syncthreads();
  for (int w = kThreads / 2; w > 0; w /= 2) {
    if (static_cast<int>(threadIdx.x) < w) sums[threadIdx.x] = add_rn(sums[threadIdx.x], sums[threadIdx.x + w]);
    __syncthreads();
  }
  if (threadIdx.x == 0) out[q * n_segments + s] = sums[0];
}

// Enqueues segment_sum_kernel for `n_quantities` rows of partials and `n_segments` segments.
template <typename Index>
const char* segment_sum(const Partial* partials, int64_t n_quantities, int64_t n_partials, const Index* seg_start,
                        int64_t n_segments, Partial* out, cudaStream_t stream) {
  if (n_segments == 0 || n_quantities == 0) return nullptr;
  const dim3 grid(static_cast<unsigned int>(n_segments), static_cast<unsigned int>(n_quantities));
  segment_sum_kernel<Index><<<grid, kThreads, 0, stream>>>(partials, n_partials, seg_start, n_segments, out);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace fused_optim
