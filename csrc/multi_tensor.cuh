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
// GradScaler: when found_inf is set every block returns at once: params, state, grads and steps are unchanged.
// Nothing is read back to the host, so a step can be captured in a CUDA graph.
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

template <class Rule>
__global__ void __launch_bounds__(kThreads) multi_tensor_kernel(const typename Rule::Args args, const BlockMap map) {
  if (Rule::skip(args)) return;

  const int64_t b = blockIdx.x;
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
  for (int64_t i = start + static_cast<int64_t>(threadIdx.x) * kVec; i < vec_end;
       i += static_cast<int64_t>(kThreads) * kVec) {
    Rule::template apply<kVec, true>(x, i);
  }
  for (int64_t i = vec_end + threadIdx.x; i < end; i += kThreads) Rule::template apply<1, false>(x, i);

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
template <class Rule>
const char* launch(const typename Rule::Args& args, const BlockMap& map, cudaStream_t stream) {
  if (map.n_blocks == 0) return nullptr;
  multi_tensor_kernel<Rule><<<static_cast<unsigned int>(map.n_blocks), kThreads, 0, stream>>>(args, map);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace fused_optim
