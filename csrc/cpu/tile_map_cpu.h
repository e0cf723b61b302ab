// The CPU engine's 2-D tile map (tile_map.h): tile passes, elementwise work on a statistics vector, and
// deterministic segment sums, for rules that keep row and column statistics of matrices (adafactor_rule.h).
//
// A tile pass, like the block launch of multi_tensor_cpu.h:
//   1. skips everything when the rule says so (GradScaler found inf/NaN);
//   2. computes each tensor's context once (Rule::tensor);
//   3. runs the tiles, split across threads by the caller's parallel_for (ATen's, OpenMP), each tile on one
//      thread: per-row and per-column factors once per tile, then row by row one `#pragma omp simd` loop over the
//      row's columns calling the rule, which the compiler vectorizes; the column tiles of the same rows run
//      together, row by row (run_band); the same AVX2+FMA / baseline ISA dispatch as the block engine (same
//      rounding in both: every operation is one IEEE fp32 rounding);
//   4. writes each tensor's new step (Rule::finish) after every tile has used the old one (kStep passes).
//
// Reductions in a fixed order, the same on every ISA and for any number of threads: a tile row's partial sum adds
// its columns into 8 lanes (lane k takes columns k, k + 8, ...), then a fixed tree over the lanes (sum_tile_row);
// column partials add the tile's rows in order; a tile total adds per-column accumulators over the rows, then
// sum_tile_row. Each written partial belongs to one tile, so which thread runs a tile does not matter. Explicit
// lanes rather than `omp simd reduction`, whose order would follow the vector width of the ISA.
#pragma once

#include <cstdint>
#include <vector>

#include "../tile_map.h"
#include "multi_tensor_cpu.h"

namespace fused_optim {
namespace cpu {

// The sum of kTileC values in a fixed order: 8 interleaved lanes, then a tree over them.
FO_INLINE float sum_tile_row(const float* v) {
  float lanes[8] = {0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f, 0.0f};
  for (int64_t j = 0; j < kTileC; j += 8) {
    for (int k = 0; k < 8; ++k) lanes[k] = add_rn(lanes[k], v[j + k]);
  }
  return add_rn(add_rn(add_rn(lanes[0], lanes[4]), add_rn(lanes[2], lanes[6])),
                add_rn(add_rn(lanes[1], lanes[5]), add_rn(lanes[3], lanes[7])));
}

// Tiles of one band (the column tiles of the same rows of the same matrix) run together, row by row: row r of each
// tile in turn, so that a thread reads each matrix row left to right instead of a tile's 512-byte slice of 32 rows,
// then the next tile's. Measured on the 2-core CI machine (one thread, fp32, 38.6M-element matrices): pass 1 took
// 70 ms with 768 or 3,072 columns tile by tile, against 27 ms with 128 columns (each tile one contiguous run).
// Every accumulator still adds its tile's rows in order, so the results are bitwise those of one tile at a time.
// At most 32 tiles (4,096 fp32 columns of each row) per band pass: with 8, a 3,072-column matrix still took 40 ms
// for pass 1 above, 32 ms with 32. The per-tile state is then about 68 KB of stack per thread.
constexpr int64_t kBandTiles = 32;

template <class Rule, bool MATRIX>
FO_INLINE void run_band(const typename Rule::Args& a, const typename Rule::Tensor& x, const Tile* tiles, int64_t g) {
  constexpr bool kRowCol = Rule::kRowCol && MATRIX;  // flat tensors have no row/column statistics
  float row_coef[kBandTiles][kTileR], col_coef[kBandTiles][kTileC];
  float col_acc[kBandTiles][kTileC], tot_acc[kBandTiles][kTileC];
  bool done[kBandTiles];  // the tile has no columns left (past the end of a flat tensor)
  for (int64_t j = 0; j < g; ++j) {
    const Tile& tile = tiles[j];
    done[j] = false;
    if constexpr (Rule::kCoefs && MATRIX) {
      for (int64_t r = tile.r0; r < tile.r1; ++r) row_coef[j][r - tile.r0] = Rule::row_coef(a, tile, r);
      for (int64_t c = tile.c0; c < tile.c1; ++c) col_coef[j][c - tile.c0] = Rule::col_coef(a, tile, c);
    } else {
      for (int64_t r = 0; r < kTileR; ++r) row_coef[j][r] = 1.0f;
      for (int64_t c = 0; c < kTileC; ++c) col_coef[j][c] = 1.0f;
    }
    if constexpr (kRowCol || Rule::kTotal) {
      for (int64_t c = 0; c < kTileC; ++c) col_acc[j][c] = tot_acc[j][c] = 0.0f;
    }
  }
  const int64_t r0 = tiles[0].r0, r1 = tiles[0].r1;  // every tile of a band has the same rows
  for (int64_t r = r0; r < r1; ++r) {
    for (int64_t j = 0; j < g; ++j) {
      const Tile& tile = tiles[j];
      if (done[j]) continue;
      const int64_t cols = tile.row_columns(r);
      if (cols == 0) {  // and none in the rows after it
        done[j] = true;
        continue;
      }
      const int64_t start = tile.row_offset(r) + tile.c0;
      const float rc = row_coef[j][r - r0];
      const float* cc = col_coef[j];
      float rowcol[kTileC], total[kTileC];  // this row's contributions, zero past its last column
      if constexpr (kRowCol || Rule::kTotal) {
        if (cols < kTileC) {
          for (int64_t c = 0; c < kTileC; ++c) rowcol[c] = total[c] = 0.0f;
        }
      }
#pragma omp simd
      for (int64_t c = 0; c < cols; ++c) {
        Rule::template apply<1, false, MATRIX>(x, tile, start + c, rc, cc + c, rowcol + c, total + c);
      }
      if constexpr (kRowCol) {
        a.row_col_out[row_partial_at(tile, r)] = sum_tile_row(rowcol);
        for (int64_t c = 0; c < kTileC; ++c) col_acc[j][c] = add_rn(col_acc[j][c], rowcol[c]);
      }
      if constexpr (Rule::kTotal) {
        for (int64_t c = 0; c < kTileC; ++c) tot_acc[j][c] = add_rn(tot_acc[j][c], total[c]);
      }
    }
  }
  for (int64_t j = 0; j < g; ++j) {
    const Tile& tile = tiles[j];
    if constexpr (kRowCol) {
      for (int64_t c = tile.c0; c < tile.c1; ++c) a.row_col_out[col_partial_at(tile, c)] = col_acc[j][c - tile.c0];
    }
    if constexpr (Rule::kTotal) a.total_out[tile.k] = sum_tile_row(tot_acc[j]);
  }
}

// Tiles k0 .. k1 - 1 in bands: consecutive tiles of the same tensor, matrix and row tile (the map numbers a band's
// column tiles consecutively, tile_map.h).
template <class Rule>
FO_INLINE void run_tiles_impl(const typename Rule::Args& a, const typename Rule::Tensor* tensors, const TileMap& map,
                              int64_t k0, int64_t k1) {
  Tile tiles[kBandTiles];
  for (int64_t k = k0; k < k1;) {
    tiles[0] = tile_of(map, k);
    int64_t g = 1;
    for (; g < kBandTiles && k + g < k1; ++g) {
      tiles[g] = tile_of(map, k + g);
      if (tiles[g].t != tiles[0].t || tiles[g].b != tiles[0].b || tiles[g].rt != tiles[0].rt) break;
    }
    if (tiles[0].matrix) {
      run_band<Rule, true>(a, tensors[tiles[0].t], tiles, g);
    } else {
      run_band<Rule, false>(a, tensors[tiles[0].t], tiles, g);
    }
    k += g;
  }
}

template <class Rule>
void run_tiles_baseline(const typename Rule::Args& a, const typename Rule::Tensor* tensors, const TileMap& map,
                        int64_t k0, int64_t k1) {
  run_tiles_impl<Rule>(a, tensors, map, k0, k1);
}

#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
template <class Rule>
__attribute__((target("avx2,fma"))) void run_tiles_avx2(const typename Rule::Args& a,
                                                        const typename Rule::Tensor* tensors, const TileMap& map,
                                                        int64_t k0, int64_t k1) {
  run_tiles_impl<Rule>(a, tensors, map, k0, k1);
}
#endif

// One tile pass of `Rule` over the whole tile map.
template <class Rule, class ParallelFor>
void launch_tiles(const typename Rule::Args& a, const TileMap& map, Isa isa, ParallelFor&& parallel_for) {
  if (map.n_tiles == 0 || Rule::skip(a)) return;
  std::vector<typename Rule::Tensor> tensors(static_cast<size_t>(map.n_tensors));
  for (int64_t t = 0; t < map.n_tensors; ++t) tensors[t] = Rule::tensor(a, t);
  const typename Rule::Tensor* x = tensors.data();
  const int64_t grain = 8;  // tiles of 4,096 elements: ~32K elements per task (ATen's GRAIN_SIZE)
#if defined(__x86_64__) && (defined(__GNUC__) || defined(__clang__))
  if (isa == Isa::kAvx2) {
    parallel_for(0, map.n_tiles, grain, [&](int64_t k0, int64_t k1) { run_tiles_avx2<Rule>(a, x, map, k0, k1); });
  } else
#endif
  {
    (void)isa;
    parallel_for(0, map.n_tiles, grain, [&](int64_t k0, int64_t k1) { run_tiles_baseline<Rule>(a, x, map, k0, k1); });
  }
  if constexpr (Rule::kStep) {
    for (int64_t t = 0; t < map.n_tensors; ++t) Rule::finish(tensors[t]);
  }
}

// Elementwise work on `n` entries of a vector that each belong to a tensor (Rule::owner), e.g. the statistics
// vector: each tensor's context once (Rule::tensor), then Rule::apply(args, context, i) for every entry.
template <class Rule, class ParallelFor>
void launch_entries(const typename Rule::Args& a, int64_t n, int64_t n_tensors, ParallelFor&& parallel_for) {
  if (n == 0 || Rule::skip(a)) return;
  std::vector<typename Rule::Tensor> tensors(static_cast<size_t>(n_tensors));
  for (int64_t t = 0; t < n_tensors; ++t) tensors[t] = Rule::tensor(a, t);
  parallel_for(0, n, 4096, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) Rule::apply(a, tensors[Rule::owner(a, i)], i);
  });
}

// out[s] = sum(partials[seg_start[s] : seg_start[s + 1]]), each segment added in order by one thread:
// deterministic whatever the thread count (kernels/engine.py segment_sums is the Triton counterpart).
template <class ParallelFor>
void segment_sums(const float* partials, const int64_t* seg_start, float* out, int64_t n_segments,
                  ParallelFor&& parallel_for) {
  if (n_segments == 0) return;
  parallel_for(0, n_segments, 1024, [&](int64_t s0, int64_t s1) {
    for (int64_t s = s0; s < s1; ++s) {
      float acc = 0.0f;
      for (int64_t i = seg_start[s]; i < seg_start[s + 1]; ++i) acc = add_rn(acc, partials[i]);
      out[s] = acc;
    }
  });
}

}  // namespace cpu
}  // namespace fused_optim
