// The Adafactor launchers the operator bindings call (adafactor_ops.cpp for CPU, adafactor_ops_cuda.cpp for CUDA):
// plain structs in, no ATen, so that the CUDA side (adafactor_cuda*.cu) compiles with nvcc alone.
#pragma once

#include "adafactor_rule.h"
#include "engine.h"
#include "tile_map.h"

namespace fused_optim {

// Which launch of the step (adafactor_rule.h); the segment sums between them are launches of their own.
enum class AdafactorPass : int { kPass1 = 1, kStatistics = 2, kPass2 = 3, kPass3 = 4 };

// One launch of an Adafactor step: arguments, tile map, and the runtime choices that select the compiled variant.
struct AdafactorLaunch {
  AdafactorPass pass;
  AdafactorArgs args;
  TileMap map;
  int64_t n_entries;  // kStatistics: entries of the statistics vector (row and column statistics)
  DType param_dtype;
  DType grad_dtype;
  bool master, unscale, momentum;
};

// CPU engine (cpu/adafactor_cpu.cpp), on the calling thread and ATen's intra-op threads.
void adafactor_cpu(const AdafactorLaunch& launch);
void segment_sums_cpu(const float* partials, const int64_t* seg_start, float* out, int64_t n_segments);

// CUDA engine (adafactor_cuda.cu), enqueued on `stream` (a cudaStream_t). Return nullptr, or an error message
// (an invalid combination, or the launch error CUDA reported).
const char* adafactor_cuda(const AdafactorLaunch& launch, void* stream);
const char* segment_sums_cuda(const float* partials, const int64_t* seg_start, float* out, int64_t n_segments,
                              void* stream);

}  // namespace fused_optim
