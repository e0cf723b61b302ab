// The 2-D tile map of the native engines: what the CPU (cpu/tile_map_cpu.h) and CUDA (tile_map.cuh) tile engines
// share with the rules that keep row and column statistics of matrices (Adafactor, adafactor_rule.h). Plain
// C++/CUDA, no ATen.
//
// The tables are fused_optim.tables.TileTable (built on the host, cached by the optimizer, shared with the Triton
// engine, kernels/engine.py "2-D tile map"): each tensor is a batch of B matrices of n x m (its last two dims) or
// flat (ceil(numel / kTileC) rows of kTileC elements), cut into kTileR x kTileC tiles, one tile per unit of work
// (a CUDA block, a CPU task). Tile k of tensor t is (batch b, row tile rt, column tile ct) with
// k - first_tile = (b * row_tiles + rt) * col_tiles + ct. A zero-size tensor is flat with one empty tile, so that
// its step advances.
//
// Reductions. A tile pass writes per-tile partial sums, never a float atomic: for a matrix, one partial per
// (row, column tile) at row_part_base + (b * n + r) * col_tiles + ct and one per (column, row tile) at
// col_part_base + (b * m + c) * row_tiles + rt; and/or one total per tile. `segment_sums` then finishes them in a
// fixed order (TileTable.stat_seg / batch_seg / tile_seg), as a separate launch: the visible step where FSDP will
// put an all-reduce over the sharded mesh dimensions. Same inputs, bitwise the same sums, on every run.
//
// A tile pass (adafactor_rule.h) is a struct with
//   Args, Tensor, skip(args), tensor(args, t), aligned(x)
//                                             as an elementwise rule (engine.h);
//   kRowCol, kTotal                           which partial sums it produces (row/column sums of matrices; a
//                                             per-tile total), written to args.row_col_out and args.total_out;
//   kCoefs, row_coef(args, tile, r), col_coef(args, tile, c)
//                                             per-row and per-column values of a matrix computed once per tile
//                                             (kTileR + kTileC of them) instead of once per element;
//   template <int N, bool VEC, bool MATRIX> apply(x, tile, i, row_coef, col_coef, rowcol, total)
//                                             elements i .. i + N - 1 (consecutive, in one row of the tile): loads,
//                                             fp32 math, stores; writes each element's contributions to the
//                                             row/column sums (rowcol[k]) and to the tile total (total[k]);
//   kStep, finish(x)                          writes tensor x's new step, once, after every tile has read it.
#pragma once

#include <cstdint>

#include "engine.h"

namespace fused_optim {

// Tile size the native engines are compiled for: fused_optim.tables.DEFAULT_TILE (the bindings refuse others).
// 128 fp32 columns = 512 contiguous bytes per tile row: one warp reads a tile row with 16-byte vectors.
constexpr int64_t kTileR = 32;
constexpr int64_t kTileC = 128;

// Fields of TileTable.meta (int64 [n_tensors, kTileMetaWidth]), in the order of fused_optim.tables.TILE_META_FIELDS
// (fused_optim.native compares them with these names, torch.ops.fused_optim.tile_meta_fields(), when it loads).
enum TileMeta : int {
  kMetaNumel = 0,
  kMetaBatches,
  kMetaRows,
  kMetaCols,
  kMetaRowTiles,
  kMetaColTiles,
  kMetaTiles,
  kMetaFirstTile,
  kMetaRowBase,
  kMetaColBase,
  kMetaBatchBase,
  kMetaRowPartBase,
  kMetaColPartBase,
  kMetaMatrix,
  kTileMetaWidth
};

inline const char* const* tile_meta_field_names() {
  static const char* const names[kTileMetaWidth] = {
      "numel",    "batches",    "rows",       "cols",          "row_tiles",     "col_tiles", "tiles",
      "first_tile", "row_base", "col_base", "batch_base", "row_part_base", "col_part_base", "matrix"};
  return names;
}

// The tile map of one launch (device pointers on CUDA, host pointers on CPU).
struct TileMap {
  const int64_t* meta;         // [n_tensors, kTileMetaWidth]
  const int32_t* tile_tensor;  // [n_tiles]
  int32_t* arrivals;           // [n_tensors], zero between launches (CUDA step protocol)
  int64_t n_tensors;
  int64_t n_tiles;
};

// One tile: its tensor, matrix of the batch, and the element ranges it covers.
struct Tile {
  const int64_t* tm;  // the tensor's meta row
  int64_t t;          // tensor index
  int64_t k;          // tile index in the map
  int64_t b, rt, ct;  // matrix of the batch, row tile, column tile
  int64_t n, m;       // rows and columns of each matrix (flat: ceil(numel / kTileC) rows of kTileC)
  int64_t numel;
  int64_t r0, r1;  // rows [r0, r1) of the tile
  int64_t c0, c1;  // columns [c0, c1)
  bool matrix;     // row/column statistics (rank >= 2); else flat

  // Element offset of row r's first column (column 0) in the tensor.
  FO_HD FO_INLINE int64_t row_offset(int64_t r) const { return (b * n + r) * m; }
  // Valid columns of row r inside the tile: c1 - c0, except in the last row of a flat tensor.
  FO_HD FO_INLINE int64_t row_columns(int64_t r) const {
    const int64_t left = numel - row_offset(r) - c0;
    return left < c1 - c0 ? (left > 0 ? left : 0) : c1 - c0;
  }
};

FO_HD FO_INLINE Tile tile_of(const TileMap& map, int64_t k) {
  Tile x;
  x.k = k;
  x.t = map.tile_tensor[k];
  x.tm = map.meta + x.t * kTileMetaWidth;
  x.numel = x.tm[kMetaNumel];
  x.n = x.tm[kMetaRows];
  x.m = x.tm[kMetaCols];
  x.matrix = x.tm[kMetaMatrix] != 0;
  const int64_t n_ct = x.tm[kMetaColTiles];
  const int64_t n_rt = x.tm[kMetaRowTiles];
  const int64_t local = k - x.tm[kMetaFirstTile];
  x.ct = local % n_ct;
  x.rt = (local / n_ct) % n_rt;
  x.b = local / (n_ct * n_rt);
  x.r0 = x.rt * kTileR;
  x.r1 = x.r0 + kTileR < x.n ? x.r0 + kTileR : x.n;
  x.c0 = x.ct * kTileC;
  x.c1 = x.c0 + kTileC < x.m ? x.c0 + kTileC : x.m;
  return x;
}

// Where a tile's row partial of row r, and column partial of column c, go in the partials buffer.
FO_HD FO_INLINE int64_t row_partial_at(const Tile& x, int64_t r) {
  return x.tm[kMetaRowPartBase] + (x.b * x.n + r) * x.tm[kMetaColTiles] + x.ct;
}
FO_HD FO_INLINE int64_t col_partial_at(const Tile& x, int64_t c) {
  return x.tm[kMetaColPartBase] + (x.b * x.m + c) * x.tm[kMetaRowTiles] + x.rt;
}

}  // namespace fused_optim
