// The binding layer of the Adafactor operators, shared by the CPU (adafactor_ops.cpp) and CUDA
// (adafactor_ops_cuda.cpp) implementations: checks the arguments and turns ATen tensors into the plain launch
// structs of adafactor_launch.h. Schemas and what each operator does: adafactor_ops.cpp.
//
// On the CPU the tables are host memory, so they are checked against the tensors completely (addresses, sizes,
// the tile map recomputed from the shapes, the owner maps): a stale or corrupt table is an error, never a write to
// freed memory. On CUDA that would need device-to-host copies (a sync per step), so there the caller's TileTable
// is trusted for its contents, as fused_optim::adam_ trusts its TensorTable; shapes, dtypes and devices are checked.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <string>
#include <vector>

#include "adafactor_launch.h"
#include "ops_common.h"

namespace fused_optim {
namespace adafactor_ops {

// The operand tables, in the order of fused_optim.native.ADAFACTOR_OPERANDS.
enum Operand : int { kParam = 0, kGrad, kRow, kCol, kSq, kExpAvg, kMaster, kStep, kOperands };
constexpr std::array<const char*, kOperands> kOperandNames = {
    "param", "grad", "exp_avg_sq_row", "exp_avg_sq_col", "exp_avg_sq", "exp_avg", "master_param", "step"};

constexpr const char* kRebuild = "; the table is stale or corrupt: rebuild it (fused_optim.tables.TileTable.build)";

inline DType dtype_of(const char* op, const at::Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", what, "[0] has dtype ", t.scalar_type(),
                  "; the native kernels support float32, float16 and bfloat16 (use backend='reference' for others)");
  }
}

// A 1-D index or buffer tensor of `n` entries (n < 0: any length) with the given dtype, on `device`.
inline void check_vector(const char* op, const at::Tensor& t, const char* what, at::ScalarType dtype, int64_t n,
                         const at::Device& device) {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && (n < 0 || t.numel() == n) && t.is_contiguous() &&
                  t.device() == device,
              op, ": ", what, " must be a contiguous ", dtype, " vector",
              (n < 0 ? std::string() : " of " + std::to_string(n) + " entries"),
              " on ", device, ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device(),
              " (fused_optim.native builds it from a fused_optim.tables.TileTable)");
}

inline const float* scalar_ptr(const char* op, const std::optional<at::Tensor>& t, const char* what,
                               const at::Device& device) {
  if (!t) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1 && t->device() == device, op, ": ", what,
              " must be a 1-element float32 tensor on ", device, " (as torch.amp.GradScaler makes it), got ",
              t->scalar_type(), " with ", t->numel(), " elements on ", t->device());
  return t->data_ptr<float>();
}

// What the checks learn from the table, used by the launches.
struct TileTotals {
  int64_t n_tiles = 0, n_rows = 0, n_cols = 0, n_batches = 0, n_partials = 0;
};

// Checks the address tables and the meta table's shape; on the CPU also recomputes every meta field from the
// (numel, batches, rows, cols, matrix) fields the way fused_optim.tables.TileTable.build lays them out, with the
// 32 x 128 tiles the engines are compiled for, and returns the totals (CUDA: zeros; the caller's table is trusted).
inline TileTotals check_table(const char* op, at::TensorList tables, const at::Tensor& meta, int64_t n,
                              const at::Device& device, bool host) {
  TORCH_CHECK(n > 0, op, ": the launch has no tensors");
  TORCH_CHECK(static_cast<int64_t>(tables.size()) == kOperands, op, ": expected ", int(kOperands),
              " address tables (param, grad, exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, exp_avg, master_param, step), "
              "got ", tables.size());
  for (int k = 0; k < kOperands; ++k) check_vector(op, tables[k], kOperandNames[k], at::kLong, n, device);
  TORCH_CHECK(meta.scalar_type() == at::kLong && meta.dim() == 2 && meta.size(0) == n &&
                  meta.size(1) == kTileMetaWidth && meta.is_contiguous() && meta.device() == device,
              op, ": meta must be a contiguous int64 [", n, ", ", int(kTileMetaWidth), "] tensor on ", device, ", got ",
              meta.scalar_type(), " ", meta.sizes(), " on ", meta.device(), kRebuild);
  TileTotals tot;
  if (!host) return tot;
  static_assert(kTileMetaWidth == 14, "fused_optim.tables.TILE_META_FIELDS has 14 fields");
  const int64_t* mt = meta.data_ptr<int64_t>();
  // Two sweeps: column statistics and column partials follow all rows and row partials of every tensor.
  for (int pass = 0; pass < 2; ++pass) {
    int64_t tiles = 0, rows = 0, cols = 0, batches = 0, rowp = 0, colp = 0;
    for (int64_t t = 0; t < n; ++t) {
      const int64_t* f = mt + t * kTileMetaWidth;
      const int64_t numel = f[kMetaNumel], b = f[kMetaBatches], r = f[kMetaRows], c = f[kMetaCols];
      const bool matrix = f[kMetaMatrix] == 1;
      bool ok = numel >= 0 && (f[kMetaMatrix] == 0 || f[kMetaMatrix] == 1);
      if (ok && matrix) {
        ok = b >= 1 && r >= 1 && c >= 1 && numel % c == 0 && (numel / c) % r == 0 && numel / c / r == b;
      } else if (ok) {
        ok = b == 1 && c == kTileC && r == (numel + kTileC - 1) / kTileC;
      }
      const int64_t rt = r > kTileR ? (r + kTileR - 1) / kTileR : 1, ct = c > kTileC ? (c + kTileC - 1) / kTileC : 1;
      ok = ok && f[kMetaRowTiles] == rt && f[kMetaColTiles] == ct && f[kMetaTiles] == b * rt * ct &&
           f[kMetaFirstTile] == tiles && f[kMetaRowBase] == rows && f[kMetaColBase] == tot.n_rows + cols &&
           f[kMetaBatchBase] == batches && f[kMetaRowPartBase] == rowp &&
           f[kMetaColPartBase] == (pass == 0 ? f[kMetaColPartBase] : tot.n_partials + colp);
      TORCH_CHECK(pass == 0 || ok, op, ": meta row ", t, " (numel ", numel, ", batches ", b, ", rows ", r, ", cols ", c,
                  ", matrix ", f[kMetaMatrix],
                  ") is not the layout of a TileTable with 32 x 128 tiles, which the native engines are compiled for "
                  "(fused_optim.tables.DEFAULT_TILE)", kRebuild);
      tiles += b * rt * ct;
      if (matrix) {
        rows += b * r;
        cols += b * c;
        batches += b;
        rowp += b * r * ct;
        colp += b * c * rt;
      }
    }
    tot.n_tiles = tiles;
    tot.n_rows = rows;
    tot.n_cols = cols;
    tot.n_batches = batches;
    tot.n_partials = pass == 0 ? rowp : rowp + colp;  // the first sweep's row partials place the columns'
  }
  return tot;
}

// The tile map: tile_tensor[k] is the tensor of tile k (host: every entry checked against meta).
inline void check_tile_tensor(const char* op, const at::Tensor& tile_tensor, const at::Tensor& meta,
                              const TileTotals& tot, int64_t n, const at::Device& device, bool host) {
  check_vector(op, tile_tensor, "tile_tensor", at::kInt, host ? tot.n_tiles : -1, device);
  TORCH_CHECK(tile_tensor.numel() >= n && tile_tensor.numel() < (int64_t{1} << 31), op, ": ", tile_tensor.numel(),
              " tiles for ", n, " tensors; the tile map needs at least one tile per tensor and fewer than 2^31");
  if (!host) return;
  const int64_t* mt = meta.data_ptr<int64_t>();
  const int32_t* owner = tile_tensor.data_ptr<int32_t>();
  for (int64_t t = 0; t < n; ++t) {
    const int64_t first = mt[t * kTileMetaWidth + kMetaFirstTile], tiles = mt[t * kTileMetaWidth + kMetaTiles];
    for (int64_t k = first; k < first + tiles; ++k) {
      TORCH_CHECK(owner[k] == t, op, ": tile ", k, " belongs to tensor ", owner[k], " in tile_tensor but to tensor ",
                  t, " in meta", kRebuild);
    }
  }
}

// One full operand list (one tensor per tensor of the launch): count, device, dtype (nullopt: the first entry's),
// contiguity, element counts (host: meta's numel; else `numels` when given).
inline void check_full_list(const char* op, at::TensorList list, const char* what, int64_t n, const at::Device& device,
                            std::optional<at::ScalarType> dtype, const at::Tensor& meta, bool host, bool scalar) {
  TORCH_CHECK(static_cast<int64_t>(list.size()) == n, op, ": ", what, " has ", list.size(),
              " tensors but the table has ", n, "; pass one per param");
  const at::ScalarType want = dtype ? *dtype : list[0].scalar_type();
  const int64_t* mt = host ? meta.data_ptr<int64_t>() : nullptr;
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.device() == device, op, ": ", what, "[", i, "] is on ", t.device(), " but the launch is on ", device,
                "; one launch updates tensors of one device");
    TORCH_CHECK(t.scalar_type() == want, op, ": ", what, "[", i, "] has dtype ", t.scalar_type(), ", expected ", want);
    TORCH_CHECK(t.is_contiguous(), op, ": ", what, "[", i,
                "] is not contiguous; the native kernels update contiguous tensors (make the param contiguous, or use "
                "backend='reference')");
    if (scalar) {
      TORCH_CHECK(t.numel() == 1, op, ": ", what, "[", i, "] must be a 1-element step tensor, has ", t.numel(),
                  " elements");
    } else if (mt != nullptr) {
      TORCH_CHECK(t.numel() == mt[i * kTileMetaWidth + kMetaNumel], op, ": ", what, "[", i, "] has ", t.numel(),
                  " elements but the table says ", mt[i * kTileMetaWidth + kMetaNumel], kRebuild);
    }
  }
}

// The shapes of a full list (params or grads) against meta: which tensors are matrices, and their n x m.
inline void check_shapes(const char* op, at::TensorList list, const char* what, const at::Tensor& meta) {
  const int64_t* mt = meta.data_ptr<int64_t>();
  for (size_t i = 0; i < list.size(); ++i) {
    const at::Tensor& t = list[i];
    const int64_t* f = mt + i * kTileMetaWidth;
    const bool matrix = t.dim() >= 2 && t.numel() > 0;
    const bool same = matrix == (f[kMetaMatrix] == 1) &&
                      (!matrix || (f[kMetaRows] == t.size(-2) && f[kMetaCols] == t.size(-1)));
    TORCH_CHECK(same, op, ": ", what, "[", i, "] of shape ", t.sizes(), " is ", (matrix ? "" : "not "),
                "factored over its last two dims, but the table has it as ",
                (f[kMetaMatrix] == 1 ? "a batch of " + std::to_string(f[kMetaRows]) + " x " +
                                           std::to_string(f[kMetaCols]) + " matrices"
                                     : std::string("flat")),
                kRebuild);
  }
}

// A compact operand list: one fp32 tensor per matrix (exp_avg_sq_row, _col) or per flat tensor with elements
// (exp_avg_sq), in tensor order. Host: count, element counts and table addresses.
inline void check_compact_list(const char* op, at::TensorList list, const char* what, Operand which,
                               const at::Tensor& table, const at::Tensor& meta, int64_t n, const TileTotals& tot,
                               const at::Device& device, bool host) {
  for (size_t j = 0; j < list.size(); ++j) {
    const at::Tensor& t = list[j];
    TORCH_CHECK(t.device() == device && t.scalar_type() == at::kFloat && t.is_contiguous(), op, ": ", what, "[", j,
                "] must be a contiguous float32 tensor on ", device, ", got ", t.scalar_type(), " on ", t.device());
  }
  TORCH_CHECK(static_cast<int64_t>(list.size()) <= n, op, ": ", what, " has ", list.size(), " tensors for ", n,
              " params");
  if (!host) return;
  const bool matrices = which != kSq;
  const int64_t* mt = meta.data_ptr<int64_t>();
  // The tensors of the list: matrices, or flat tensors with elements (a zero-size tensor is never read or written).
  auto listed = [&](int64_t t) {
    const int64_t* f = mt + t * kTileMetaWidth;
    return matrices ? f[kMetaMatrix] == 1 : (f[kMetaMatrix] == 0 && f[kMetaNumel] > 0);
  };
  int64_t want = 0;
  for (int64_t t = 0; t < n; ++t) want += listed(t);
  TORCH_CHECK(static_cast<int64_t>(list.size()) == want, op, ": ", what, " has ", list.size(),
              " tensors but the table has ", want, matrices ? " matrices (params of rank >= 2 with elements): pass one per matrix"
                             : " flat params (rank 0 or 1, with elements): pass one per flat param");
  const int64_t* addr = table.data_ptr<int64_t>();
  int64_t j = 0;
  for (int64_t t = 0; t < n; ++t) {
    if (!listed(t)) continue;
    const int64_t* f = mt + t * kTileMetaWidth;
    const int64_t numel = which == kRow ? f[kMetaBatches] * f[kMetaRows]
                          : which == kCol ? f[kMetaBatches] * f[kMetaCols] : f[kMetaNumel];
    TORCH_CHECK(list[j].numel() == numel, op, ": ", what, "[", j, "] (of param ", t, ") has ", list[j].numel(),
                " elements, expected ", numel, kRebuild);
    TORCH_CHECK(addr[t] == reinterpret_cast<int64_t>(list[j].data_ptr()), op, ": the ", kOperandNames[which],
                " table does not hold the address of ", what, "[", j, "] (param ", t, ")", kRebuild);
    ++j;
  }
}

// Host: a full list's addresses are the ones in its table.
inline void check_addresses(const char* op, at::TensorList list, Operand which, const at::Tensor& table, bool host) {
  if (!host) return;
  const int64_t* addr = table.data_ptr<int64_t>();
  for (size_t i = 0; i < list.size(); ++i) {
    TORCH_CHECK(addr[i] == reinterpret_cast<int64_t>(list[i].data_ptr()), op, ": the ", kOperandNames[which],
                " table does not hold the address of ", kOperandNames[which], " ", i, kRebuild);
  }
}

inline void check_buffer(const char* op, const at::Tensor& t, const char* what, int64_t n, const at::Device& device) {
  check_vector(op, t, what, at::kFloat, n, device);
}

// The launch fields every pass shares.
inline AdafactorLaunch base_launch(AdafactorPass pass, at::TensorList tables, const at::Tensor& meta,
                                   const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf, const char* op,
                                   const at::Device& device) {
  AdafactorLaunch l{};
  l.pass = pass;
  AdafactorArgs& a = l.args;
  a.param = tables[kParam].data_ptr<int64_t>();
  a.grad = tables[kGrad].data_ptr<int64_t>();
  a.exp_avg_sq_row = tables[kRow].data_ptr<int64_t>();
  a.exp_avg_sq_col = tables[kCol].data_ptr<int64_t>();
  a.exp_avg_sq = tables[kSq].data_ptr<int64_t>();
  a.exp_avg = tables[kExpAvg].data_ptr<int64_t>();
  a.master_param = tables[kMaster].data_ptr<int64_t>();
  a.step = tables[kStep].data_ptr<int64_t>();
  a.meta = meta.data_ptr<int64_t>();
  a.grad_scale = scalar_ptr(op, grad_scale, "grad_scale", device);
  a.found_inf = scalar_ptr(op, found_inf, "found_inf", device);
  l.unscale = grad_scale.has_value();
  l.map.meta = a.meta;
  l.map.n_tensors = meta.size(0);
  return l;
}

inline void set_tile_map(AdafactorLaunch& l, const at::Tensor& tile_tensor, int32_t* arrivals) {
  l.map.tile_tensor = tile_tensor.data_ptr<int32_t>();
  l.map.n_tiles = tile_tensor.numel();
  l.map.arrivals = arrivals;
}

inline void check_eps1(const char* op, double eps1) {
  TORCH_CHECK(eps1 >= 0.0, op, ": eps1 must be >= 0, got ", eps1);
}

// Table-only launches (ops_common.h, TablesOnly): the optimizer's step plan has checked this step that every tensor
// still has the dtype, contiguity, shape and address the TileTable holds, so it passes every tensor list empty and
// states the dtypes instead: passes 1 and 3 take param_dtype, grad_dtype and master (ops_common.h, launch_group), pass
// 2 grad_dtype, the statistics `tables_only`. The launch then has meta's tensor count and device, and the operator
// checks the tables and (CPU) the tile map against meta as a list launch does; the tensors' checks are the caller's.
inline int64_t table_size(const at::Tensor& meta) {  // check_table checks meta's shape
  return meta.dim() == 2 ? meta.size(0) : 0;
}

// The tensor count of a pass 2 or statistics launch, and its device: from `first` (grads, steps) or, table-only
// (`flag`: the argument that says so), from meta; then every list, `first` and `others`, must be empty.
inline int64_t launch_size(const char* op, bool tables_only, const char* flag, at::TensorList first,
                           const char* first_name, std::initializer_list<at::TensorList> others,
                           const at::Tensor& meta, at::Device* device) {
  if (tables_only) {
    check_table_only_lists(op, flag, table_size(meta), {first}, others);
    *device = meta.device();
    return table_size(meta);
  }
  TORCH_CHECK(!first.empty(), op, ": ", first_name, " is empty");
  *device = first[0].device();
  return static_cast<int64_t>(first.size());
}

// ---------------------------------------------------------------------------------------------------------------
// The launches. Each make_* checks every argument of its operator and fills the launch struct.
// ---------------------------------------------------------------------------------------------------------------
inline AdafactorLaunch make_pass1(at::TensorList params, at::TensorList grads, at::TensorList master_params,
                                  at::TensorList tables, const at::Tensor& meta, const at::Tensor& tile_tensor,
                                  const at::Tensor& partials, int64_t n_partials, double eps1,
                                  const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& found_inf, const TablesOnly& only, bool host) {
  const char* op = "fused_optim::adafactor_pass1_";
  const LaunchGroup g = launch_group(op, only, params, grads, master_params, {}, table_size(meta), meta.device());
  const int64_t n = g.n;
  const at::Device device = g.device;
  const TileTotals tot = check_table(op, tables, meta, n, device, host);
  check_tile_tensor(op, tile_tensor, meta, tot, n, device, host);
  if (!g.tables_only) {
    check_full_list(op, params, "params", n, device, std::nullopt, meta, host, false);
    check_full_list(op, grads, "grads", n, device, std::nullopt, meta, host, false);
    if (g.master) check_full_list(op, master_params, "master_params", n, device, at::kFloat, meta, host, false);
    if (host) {
      check_shapes(op, params, "params", meta);
      check_addresses(op, params, kParam, tables[kParam], host);
      check_addresses(op, grads, kGrad, tables[kGrad], host);
      check_addresses(op, master_params, kMaster, tables[kMaster], host);
    }
  }
  TORCH_CHECK(!host || n_partials == tot.n_partials, op, ": n_partials is ", n_partials, " but the table has ",
              tot.n_partials, " row and column partials", kRebuild);
  TORCH_CHECK(n_partials >= 0, op, ": n_partials must be >= 0, got ", n_partials);
  check_buffer(op, partials, "partials", n_partials + tile_tensor.numel(), device);
  check_eps1(op, eps1);

  AdafactorLaunch l = base_launch(AdafactorPass::kPass1, tables, meta, grad_scale, found_inf, op, device);
  set_tile_map(l, tile_tensor, nullptr);
  l.param_dtype = g.param_dtype;
  l.grad_dtype = g.grad_dtype;
  l.master = g.master;
  l.args.row_col_out = partials.data_ptr<float>();
  l.args.total_out = partials.data_ptr<float>() + n_partials;
  l.args.eps1 = eps1;
  return l;
}

inline AdafactorLaunch make_statistics(at::TensorList exp_avg_sq_rows, at::TensorList exp_avg_sq_cols,
                                       at::TensorList steps, at::TensorList tables, const at::Tensor& meta,
                                       const at::Tensor& stat_tensor, const at::Tensor& stats, int64_t n_rows,
                                       double decay_rate, const std::optional<at::Tensor>& found_inf,
                                       bool tables_only, bool host) {
  const char* op = "fused_optim::adafactor_statistics_";
  at::Device device = meta.device();
  const int64_t n = launch_size(op, tables_only, "tables_only=True", steps, "steps",
                                {exp_avg_sq_rows, exp_avg_sq_cols}, meta, &device);
  const TileTotals tot = check_table(op, tables, meta, n, device, host);
  if (!tables_only) {
    check_full_list(op, steps, "steps", n, device, at::kFloat, meta, host, true);
    check_addresses(op, steps, kStep, tables[kStep], host);
    check_compact_list(op, exp_avg_sq_rows, "exp_avg_sq_rows", kRow, tables[kRow], meta, n, tot, device, host);
    check_compact_list(op, exp_avg_sq_cols, "exp_avg_sq_cols", kCol, tables[kCol], meta, n, tot, device, host);
    TORCH_CHECK(exp_avg_sq_rows.size() == exp_avg_sq_cols.size(), op, ": ", exp_avg_sq_rows.size(),
                " exp_avg_sq_rows but ", exp_avg_sq_cols.size(), " exp_avg_sq_cols; pass both for every matrix");
  }
  const int64_t n_entries = stat_tensor.numel();
  check_vector(op, stat_tensor, "stat_tensor", at::kInt, host ? tot.n_rows + tot.n_cols : -1, device);
  TORCH_CHECK(n_rows >= 0 && n_rows <= n_entries && (!host || n_rows == tot.n_rows), op, ": n_rows is ", n_rows,
              " for ", n_entries, " statistics",
              (host ? " (the table has " + std::to_string(tot.n_rows) + " rows)" : std::string()), kRebuild);
  check_vector(op, stats, "stats", at::kFloat, n_entries + n, device);
  TORCH_CHECK(decay_rate <= 0.0, op, ": decay_rate must be <= 0 (the decay is 1 - t**decay_rate), got ", decay_rate);
  if (host) {  // every statistic belongs to the matrix whose rows (then columns) it is
    const int64_t* mt = meta.data_ptr<int64_t>();
    const int32_t* owner = stat_tensor.data_ptr<int32_t>();
    for (int64_t t = 0; t < n; ++t) {
      const int64_t* f = mt + t * kTileMetaWidth;
      if (f[kMetaMatrix] != 1) continue;
      const int64_t ranges[2][2] = {{f[kMetaRowBase], f[kMetaBatches] * f[kMetaRows]},
                                    {f[kMetaColBase], f[kMetaBatches] * f[kMetaCols]}};
      for (const auto& range : ranges) {
        for (int64_t i = range[0]; i < range[0] + range[1]; ++i) {
          TORCH_CHECK(owner[i] == t, op, ": statistic ", i, " belongs to tensor ", owner[i],
                      " in stat_tensor but to tensor ", t, " in meta", kRebuild);
        }
      }
    }
  }
  AdafactorLaunch l = base_launch(AdafactorPass::kStatistics, tables, meta, std::nullopt, found_inf, op, device);
  l.args.stat_tensor = stat_tensor.data_ptr<int32_t>();
  l.args.n_rows = n_rows;
  l.args.n_stats = n_entries;
  l.args.stats = stats.data_ptr<float>();
  l.args.decay_rate = decay_rate;
  l.n_entries = n_entries;
  l.param_dtype = l.grad_dtype = DType::kFloat32;  // not used by the statistics
  return l;
}

inline AdafactorLaunch make_pass2(at::TensorList grads, at::TensorList exp_avg_sqs, at::TensorList steps,
                                  at::TensorList tables, const at::Tensor& meta, const at::Tensor& tile_tensor,
                                  const at::Tensor& stats, const at::Tensor& batch_sums,
                                  const at::Tensor& usq_partials, double eps1, double decay_rate,
                                  const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& found_inf,
                                  std::optional<at::ScalarType> grad_dtype, bool host) {
  const char* op = "fused_optim::adafactor_pass2_";
  const bool tables_only = grad_dtype.has_value();
  at::Device device = meta.device();
  const int64_t n =
      launch_size(op, tables_only, "grad_dtype given", grads, "grads", {exp_avg_sqs, steps}, meta, &device);
  const TileTotals tot = check_table(op, tables, meta, n, device, host);
  check_tile_tensor(op, tile_tensor, meta, tot, n, device, host);
  if (!tables_only) {
    check_full_list(op, grads, "grads", n, device, std::nullopt, meta, host, false);
    check_full_list(op, steps, "steps", n, device, at::kFloat, meta, host, true);
    check_compact_list(op, exp_avg_sqs, "exp_avg_sqs", kSq, tables[kSq], meta, n, tot, device, host);
    if (host) {
      check_shapes(op, grads, "grads", meta);
      check_addresses(op, grads, kGrad, tables[kGrad], host);
      check_addresses(op, steps, kStep, tables[kStep], host);
    }
  }
  check_buffer(op, stats, "stats", host ? tot.n_rows + tot.n_cols + n : -1, device);
  check_buffer(op, batch_sums, "batch_sums", host ? tot.n_batches : -1, device);
  check_buffer(op, usq_partials, "usq_partials", tile_tensor.numel(), device);
  check_eps1(op, eps1);
  TORCH_CHECK(decay_rate <= 0.0, op, ": decay_rate must be <= 0 (the decay is 1 - t**decay_rate), got ", decay_rate);

  AdafactorLaunch l = base_launch(AdafactorPass::kPass2, tables, meta, grad_scale, found_inf, op, device);
  set_tile_map(l, tile_tensor, nullptr);
  l.grad_dtype = tables_only ? dtype_from(*grad_dtype, "grad_dtype", op) : dtype_of(op, grads[0], "grads");
  l.param_dtype = l.grad_dtype;  // not used by pass 2
  l.args.stats = stats.data_ptr<float>();
  l.args.batch_sums = batch_sums.data_ptr<float>();
  l.args.total_out = usq_partials.data_ptr<float>();
  l.args.eps1 = eps1;
  l.args.decay_rate = decay_rate;
  return l;
}

inline AdafactorLaunch make_pass3(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_sqs,
                                  at::TensorList exp_avgs, at::TensorList master_params, at::TensorList steps,
                                  at::TensorList tables, const at::Tensor& meta, const at::Tensor& tile_tensor,
                                  const at::Tensor& arrivals, const at::Tensor& stats, const at::Tensor& batch_sums,
                                  const at::Tensor& usq_sums, std::optional<double> lr,
                                  const std::optional<at::Tensor>& lr_tensor, double eps2, double clip_threshold,
                                  std::optional<double> beta1, double weight_decay, bool scale_parameter,
                                  bool relative_step, bool warmup_init, const std::optional<at::Tensor>& grad_scale,
                                  const std::optional<at::Tensor>& found_inf, const TablesOnly& only, bool host) {
  const char* op = "fused_optim::adafactor_pass3_";
  const LaunchGroup g = launch_group(op, only, params, grads, master_params, {exp_avg_sqs, exp_avgs, steps},
                                     table_size(meta), meta.device());
  const int64_t n = g.n;
  const at::Device device = g.device;
  const TileTotals tot = check_table(op, tables, meta, n, device, host);
  check_tile_tensor(op, tile_tensor, meta, tot, n, device, host);
  const bool momentum = beta1.has_value();
  if (!g.tables_only) {
    check_full_list(op, params, "params", n, device, std::nullopt, meta, host, false);
    check_full_list(op, grads, "grads", n, device, std::nullopt, meta, host, false);
    check_full_list(op, steps, "steps", n, device, at::kFloat, meta, host, true);
    if (g.master) check_full_list(op, master_params, "master_params", n, device, at::kFloat, meta, host, false);
    TORCH_CHECK(momentum == !exp_avgs.empty(), op, ": ",
                momentum ? "beta1 is set but exp_avgs is empty; pass the momentum (exp_avg) of every param"
                         : "exp_avgs were given without beta1; pass an empty list, or beta1");
    if (momentum) check_full_list(op, exp_avgs, "exp_avgs", n, device, at::kFloat, meta, host, false);
    check_compact_list(op, exp_avg_sqs, "exp_avg_sqs", kSq, tables[kSq], meta, n, tot, device, host);
    if (host) {
      check_shapes(op, params, "params", meta);
      check_addresses(op, params, kParam, tables[kParam], host);
      check_addresses(op, grads, kGrad, tables[kGrad], host);
      check_addresses(op, exp_avgs, kExpAvg, tables[kExpAvg], host);
      check_addresses(op, master_params, kMaster, tables[kMaster], host);
      check_addresses(op, steps, kStep, tables[kStep], host);
    }
  }
  check_vector(op, arrivals, "arrivals", at::kInt, n, device);
  check_buffer(op, stats, "stats", host ? tot.n_rows + tot.n_cols + n : -1, device);
  TORCH_CHECK(stats.numel() >= n, op, ": stats has ", stats.numel(), " entries for ", n, " tensors", kRebuild);
  check_buffer(op, batch_sums, "batch_sums", host ? tot.n_batches : -1, device);
  check_buffer(op, usq_sums, "usq_sums", n, device);
  TORCH_CHECK(relative_step || lr.has_value() || lr_tensor.has_value(), op,
              ": relative_step=False needs an external learning rate: pass lr or lr_tensor");
  TORCH_CHECK(!(lr.has_value() && lr_tensor.has_value()), op, ": pass lr or lr_tensor, not both");
  TORCH_CHECK(clip_threshold > 0.0, op, ": clip_threshold must be > 0, got ", clip_threshold);
  TORCH_CHECK(!momentum || (*beta1 >= 0.0 && *beta1 < 1.0), op, ": beta1 must be None or in [0, 1), got ", *beta1);

  AdafactorLaunch l = base_launch(AdafactorPass::kPass3, tables, meta, grad_scale, found_inf, op, device);
  set_tile_map(l, tile_tensor, arrivals.data_ptr<int32_t>());
  l.param_dtype = g.param_dtype;
  l.grad_dtype = g.grad_dtype;
  l.master = g.master;
  l.momentum = momentum;
  AdafactorArgs& a = l.args;
  a.n_stats = stats.numel() - n;
  a.stats = stats.data_ptr<float>();
  a.batch_sums = batch_sums.data_ptr<float>();
  a.usq_sums = usq_sums.data_ptr<float>();
  a.lr = lr.value_or(0.0);
  a.lr_ptr = nullptr;
  a.lr_is_double = false;
  if (lr_tensor) {
    const at::Tensor& t = *lr_tensor;
    TORCH_CHECK(t.numel() == 1 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) &&
                    t.device() == device,
                op, ": lr_tensor must be a 1-element float32 or float64 tensor on ", device, ", got ", t.scalar_type(),
                " with ", t.numel(), " elements on ", t.device());
    a.lr_ptr = t.data_ptr();
    a.lr_is_double = t.scalar_type() == at::kDouble;
  }
  a.eps2 = eps2;
  a.clip_threshold = clip_threshold;
  a.beta1 = beta1.value_or(0.0);
  a.weight_decay = weight_decay;
  a.scale_parameter = scale_parameter;
  a.relative_step = relative_step;
  a.warmup_init = warmup_init;
  return l;
}

// segment_sums_: out[s] = sum(partials[seg_start[s] : seg_start[s + 1]]).
inline void check_segment_sums(const at::Tensor& partials, const at::Tensor& seg_start, const at::Tensor& out,
                               bool host) {
  const char* op = "fused_optim::segment_sums_";
  const at::Device device = partials.device();
  check_vector(op, partials, "partials", at::kFloat, -1, device);
  check_vector(op, seg_start, "seg_start", at::kLong, -1, device);
  TORCH_CHECK(seg_start.numel() >= 1, op, ": seg_start needs at least one entry (S segments: S + 1 starts)");
  check_vector(op, out, "out", at::kFloat, seg_start.numel() - 1, device);
  if (!host) return;
  const int64_t* s = seg_start.data_ptr<int64_t>();
  TORCH_CHECK(s[0] >= 0, op, ": seg_start[0] is ", s[0], ", must be >= 0");
  for (int64_t i = 1; i < seg_start.numel(); ++i) {
    TORCH_CHECK(s[i] >= s[i - 1], op, ": seg_start must be non-decreasing, but seg_start[", i, "] = ", s[i],
                " < seg_start[", i - 1, "] = ", s[i - 1]);
  }
  TORCH_CHECK(s[seg_start.numel() - 1] <= partials.numel(), op, ": the last segment ends at ",
              s[seg_start.numel() - 1], " but partials has ", partials.numel(), " entries");
}

}  // namespace adafactor_ops
}  // namespace fused_optim
