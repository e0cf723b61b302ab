// The CUDA engine's 2-D tile map (tile_map.h): tile passes, elementwise work on a statistics vector, and
// deterministic segment sums, for rules that keep row and column statistics of matrices (adafactor_rule.h).
// One launch covers every tensor of a bucket: the tables are in device memory (fused_optim.tables.TileTable).
//
// Tile passes: one CUDA block of 256 threads per kTileR x kTileC (32 x 128) tile, as one Triton program per tile
// in kernels/engine.py. Warp w owns tile rows w, w + 8, w + 16, w + 24; lane l owns columns 4l .. 4l + 3 of each,
// so a warp reads one tile row of 128 consecutive elements: 16-byte vector loads for fp32 (8 bytes for bf16/fp16)
// when every operand of the tensor is aligned and the matrix width is a multiple of 4, coalesced scalar loads
// otherwise, and per-element bounds checks at the tile's edges and the end of a flat tensor. Indices are 64-bit.
// Per-row and per-column factors (Rule::row_coef/col_coef) are computed once per tile into shared memory.
//
// Reductions, in a fixed order (no float atomics; reruns are bitwise equal): a row partial adds a lane's 4 values,
// then a butterfly over the warp's 32 lanes (__shfl_xor_sync: every lane ends with the same sum); a column partial
// adds each thread's 4 rows in order, then the 8 warps in order through shared memory; a tile total adds each
// thread's values, the warp butterfly, then the 8 warps in order. Partials are finished by `segment_sums`, a
// separate launch (one warp per segment, lane-strided, then the butterfly).
//
// Step protocol (kStep passes), as multi_tensor.cuh: thread 0 reads the tensor's step (Rule::tensor) before it
// increments the tensor's arrival counter; the tile that sees tiles - 1 arrivals writes the step and resets the
// counter. GradScaler: every kernel returns at once when found_inf is set. No host synchronization anywhere, so a
// step can be captured in a CUDA graph.
//
// Plain CUDA over raw pointers (no ATen): compiled and checked by csrc/check_cuda_compile.sh.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "tile_map.h"

namespace fused_optim {
namespace cuda {

constexpr int kTileThreads = 256;
constexpr int kTileWarps = kTileThreads / 32;
static_assert(kTileC == 32 * kVec, "a warp covers one tile row with kVec columns per lane");
static_assert(kTileR % kTileWarps == 0 && kTileR + kTileC <= kTileThreads, "tile and block shapes");

// Sum over the 32 lanes of a warp; every lane gets the same value (a + b == b + a in IEEE arithmetic).
__device__ FO_INLINE float warp_sum(float v) {
  FO_UNROLL
  for (int d = 16; d > 0; d >>= 1) v = add_rn(v, __shfl_xor_sync(0xffffffffu, v, d));
  return v;
}

template <class Rule, bool MATRIX>
__device__ FO_INLINE void tile_body(const typename Rule::Args& a, const typename Rule::Tensor& x, const Tile& tile,
                                    const float* row_coef, const float* col_coef, float (*col_part)[kTileC],
                                    float* warp_total) {
  constexpr bool kRowCol = Rule::kRowCol && MATRIX;  // flat tensors have no row/column statistics
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int64_t cc = static_cast<int64_t>(lane) * kVec;  // this lane's first column in the tile
  const bool vec = Rule::aligned(x) && tile.m % kVec == 0;
  float col_acc[kVec] = {0.0f, 0.0f, 0.0f, 0.0f};
  float tot = 0.0f;
  FO_UNROLL
  for (int j = 0; j < kTileR / kTileWarps; ++j) {
    const int64_t rr = warp + j * kTileWarps;
    const int64_t r = tile.r0 + rr;
    const int64_t cols = r < tile.r1 ? tile.row_columns(r) : 0;  // the same for the whole warp
    float rowcol[kVec] = {0.0f, 0.0f, 0.0f, 0.0f};
    float total[kVec] = {0.0f, 0.0f, 0.0f, 0.0f};
    if (cc < cols) {
      const int64_t i = tile.row_offset(r) + tile.c0 + cc;
      const float rc = row_coef[rr];
      if (vec && cc + kVec <= cols) {
        Rule::template apply<kVec, true, MATRIX>(x, tile, i, rc, col_coef + cc, rowcol, total);
      } else {
        FO_UNROLL
        for (int e = 0; e < kVec; ++e) {
          if (cc + e < cols) {
            Rule::template apply<1, false, MATRIX>(x, tile, i + e, rc, col_coef + cc + e, rowcol + e, total + e);
          }
        }
      }
    }
    if constexpr (kRowCol) {
      const float s = warp_sum(add_rn(add_rn(rowcol[0], rowcol[1]), add_rn(rowcol[2], rowcol[3])));
      if (lane == 0 && r < tile.r1) a.row_col_out[row_partial_at(tile, r)] = s;
      FO_UNROLL
      for (int e = 0; e < kVec; ++e) col_acc[e] = add_rn(col_acc[e], rowcol[e]);
    }
    if constexpr (Rule::kTotal) tot = add_rn(tot, add_rn(add_rn(total[0], total[1]), add_rn(total[2], total[3])));
  }
  if constexpr (kRowCol || Rule::kTotal) {
    if constexpr (kRowCol) {
      FO_UNROLL
      for (int e = 0; e < kVec; ++e) col_part[warp][cc + e] = col_acc[e];
    }
    if constexpr (Rule::kTotal) {
      tot = warp_sum(tot);
      if (lane == 0) warp_total[warp] = tot;
    }
    __syncthreads();
    if constexpr (kRowCol) {
      if (threadIdx.x < kTileC) {
        float s = 0.0f;
        FO_UNROLL
        for (int w = 0; w < kTileWarps; ++w) s = add_rn(s, col_part[w][threadIdx.x]);
        const int64_t c = tile.c0 + threadIdx.x;
        if (c < tile.c1) a.row_col_out[col_partial_at(tile, c)] = s;
      }
    }
    if constexpr (Rule::kTotal) {
      if (threadIdx.x == 0) {
        float s = 0.0f;
        FO_UNROLL
        for (int w = 0; w < kTileWarps; ++w) s = add_rn(s, warp_total[w]);
        a.total_out[tile.k] = s;
      }
    }
  }
}

template <class Rule>
__global__ void __launch_bounds__(kTileThreads) tile_kernel(const typename Rule::Args a, const TileMap map) {
  if (Rule::skip(a)) return;
  const Tile tile = tile_of(map, blockIdx.x);

  __shared__ typename Rule::Tensor shared_x;
  __shared__ float row_coef[kTileR];
  __shared__ float col_coef[kTileC];
  __shared__ float col_part[kTileWarps][kTileC];
  __shared__ float warp_total[kTileWarps];
  if (threadIdx.x == 0) shared_x = Rule::tensor(a, tile.t);
  if (threadIdx.x < kTileC) {
    const int64_t c = tile.c0 + threadIdx.x;
    col_coef[threadIdx.x] = Rule::kCoefs && tile.matrix && c < tile.c1 ? Rule::col_coef(a, tile, c) : 1.0f;
  } else if (threadIdx.x < kTileC + kTileR) {
    const int64_t r = tile.r0 + (threadIdx.x - kTileC);
    row_coef[threadIdx.x - kTileC] = Rule::kCoefs && tile.matrix && r < tile.r1 ? Rule::row_coef(a, tile, r) : 1.0f;
  }
  __syncthreads();
  const typename Rule::Tensor x = shared_x;

  if (tile.matrix) {  // the same for the whole block
    tile_body<Rule, true>(a, x, tile, row_coef, col_coef, col_part, warp_total);
  } else {
    tile_body<Rule, false>(a, x, tile, row_coef, col_coef, col_part, warp_total);
  }

  if constexpr (Rule::kStep) {
    if (threadIdx.x == 0) {
      __threadfence();
      const int arrived = atomicAdd(map.arrivals + tile.t, 1);
      if (arrived == static_cast<int>(tile.tm[kMetaTiles] - 1)) {
        Rule::finish(x);
        map.arrivals[tile.t] = 0;
      }
    }
  }
}

// Enqueues one tile pass of `Rule` over the whole tile map on `stream`; returns nullptr or CUDA's error message.
template <class Rule>
const char* launch_tiles(const typename Rule::Args& a, const TileMap& map, cudaStream_t stream) {
  if (map.n_tiles == 0) return nullptr;
  tile_kernel<Rule><<<static_cast<unsigned int>(map.n_tiles), kTileThreads, 0, stream>>>(a, map);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

constexpr int kEntryThreads = 256;

template <class Rule>
__global__ void __launch_bounds__(kEntryThreads) entries_kernel(const typename Rule::Args a, int64_t n) {
  if (Rule::skip(a)) return;
  const int64_t i = static_cast<int64_t>(blockIdx.x) * kEntryThreads + threadIdx.x;
  if (i >= n) return;
  Rule::apply(a, Rule::tensor(a, Rule::owner(a, i)), i);
}

// Elementwise work on `n` entries of a vector that each belong to a tensor (Rule::owner): one thread per entry,
// which computes its tensor's context (Rule::tensor) itself.
template <class Rule>
const char* launch_entries(const typename Rule::Args& a, int64_t n, cudaStream_t stream) {
  if (n == 0) return nullptr;
  const int64_t blocks = (n + kEntryThreads - 1) / kEntryThreads;
  entries_kernel<Rule><<<static_cast<unsigned int>(blocks), kEntryThreads, 0, stream>>>(a, n);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

constexpr int kSegmentThreads = 256;

// out[s] = sum(partials[seg_start[s] : seg_start[s + 1]]): one warp per segment, lane l adding partials l, l + 32,
// ... in order, then the butterfly. Deterministic. (A template, like every kernel of these headers, so that each
// .cu file may include it.)
template <typename T>
__global__ void __launch_bounds__(kSegmentThreads) segment_sums_kernel(const T* partials, const int64_t* seg_start,
                                                                      T* out, int64_t n_segments) {
  const int64_t s = static_cast<int64_t>(blockIdx.x) * (kSegmentThreads / 32) + threadIdx.x / 32;
  if (s >= n_segments) return;  // the same for the whole warp
  const int lane = static_cast<int>(threadIdx.x) % 32;
  const int64_t hi = seg_start[s + 1];
  T acc = 0.0f;
  for (int64_t i = seg_start[s] + lane; i < hi; i += 32) acc = add_rn(acc, partials[i]);
  acc = warp_sum(acc);
  if (lane == 0) out[s] = acc;
}

inline const char* segment_sums(const float* partials, const int64_t* seg_start, float* out, int64_t n_segments,
                                cudaStream_t stream) {
  if (n_segments == 0) return nullptr;
  constexpr int64_t per_block = kSegmentThreads / 32;
  const int64_t blocks = (n_segments + per_block - 1) / per_block;
  segment_sums_kernel<float>
      <<<static_cast<unsigned int>(blocks), kSegmentThreads, 0, stream>>>(partials, seg_start, out, n_segments);
  const cudaError_t err = cudaGetLastError();
  return err == cudaSuccess ? nullptr : cudaGetErrorString(err);
}

}  // namespace cuda
}  // namespace fused_optim
