// The launchers the operator bindings call (ops.cpp for CPU, ops_cuda.cpp for CUDA): plain structs in, no ATen, so
// that the CUDA side (adam_cuda.cu) compiles with nvcc alone.
#pragma once

#include "adam_rule.h"
#include "engine.h"
#include "lamb_rule.h"

namespace fused_optim {

// One Adam launch: arguments, block map, and the runtime choices that select the compiled variant.
struct AdamLaunch {
  AdamArgs args;
  BlockMap map;
  DType param_dtype;
  DType grad_dtype;
  bool amsgrad, maximize, decoupled, master, unscale;
};

// CPU engine (cpu/adam_cpu.cpp), on the calling thread and ATen's intra-op threads.
void adam_cpu(const AdamLaunch& launch);

// CUDA engine (adam_cuda.cu), enqueued on `stream` (a cudaStream_t). Returns nullptr, or an error message
// (an invalid combination, or the launch error CUDA reported).
const char* adam_cuda(const AdamLaunch& launch, void* stream);

// One LAMB pass (lamb_rule.h: kLambNorms, kLambApply or kLambFused). `partials`: kLambNorms' float64
// [2, n_blocks] output.
struct LambLaunch {
  LambArgs args;
  BlockMap map;
  Partial* partials;
  DType param_dtype;
  DType grad_dtype;
  int phase;
  bool master, unscale;
};

// The grad pass of a global gradient norm: Σg² per block into float64 `partials` [1, n_blocks].
struct GradSqLaunch {
  GradSqArgs args;
  BlockMap map;
  Partial* partials;
  DType grad_dtype;
  bool unscale;
};

// Per-segment sums of per-block partials (engine.h): out[q, s] = sum of partials[q, seg_start[s] .. seg_start[s+1]],
// float64.
struct SegmentSumLaunch {
  const Partial* partials;  // [n_quantities, n_partials]
  int64_t n_quantities, n_partials;
  const void* seg_start;  // [n_segments + 1], int32 or int64
  bool seg_int64;
  int64_t n_segments;
  Partial* out;  // [n_quantities, n_segments]
};

// CPU engine (cpu/lamb_cpu.cpp).
void lamb_cpu(const LambLaunch& launch);
void grad_sq_cpu(const GradSqLaunch& launch);
void segment_sum_cpu(const SegmentSumLaunch& launch);

// CUDA engine (lamb_cuda.cu), enqueued on `stream`; nullptr or an error message, as adam_cuda.
const char* lamb_cuda(const LambLaunch& launch, void* stream);
const char* grad_sq_cuda(const GradSqLaunch& launch, void* stream);
const char* segment_sum_cuda(const SegmentSumLaunch& launch, void* stream);

}  // namespace fused_optim
