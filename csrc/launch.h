// The launchers the operator bindings call (ops.cpp for CPU, ops_cuda.cpp for CUDA): plain structs in, no ATen, so
// that the CUDA side (adam_cuda.cu) compiles with nvcc alone.
#pragma once

#include "adam_rule.h"
#include "engine.h"

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

}  // namespace fused_optim
