// Adafactor's operators in the native backend: their schemas (a fragment of the fused_optim library that ops.cpp
// opens) and their CPU implementation. One Adafactor step of a bucket is seven launches, called in this order by
// fused_optim/native.py (adafactor), as kernels/adafactor.py launches the Triton kernels:
//
//   adafactor_pass1_      per tile: row/column partial sums of g² + ε1 (matrices), Σθ² per tile
//   segment_sums_         -> row sums, column sums, Σθ² per tensor           (stats)
//   adafactor_statistics_ R_t, C_t: EMAs of the row/column means, into the state and stats
//   segment_sums_         -> ΣR_t per matrix                                 (batch_sums)
//   adafactor_pass2_      per tile: ΣU²; flat tensors: V_t
//   segment_sums_         -> ΣU² per tensor                                  (usq_sums)
//   adafactor_pass3_      the update of params, momentum and master weights; unscaled grads; step += 1
//
// Each reduction is an operator of its own, so that under FSDP an all-reduce of its output (over the sharded mesh
// dimensions) fits between two of them. The tensor lists declare to the dispatcher what each launch reads and what
// it mutates, and on which device; the kernels address the tensors through the tables of a
// fused_optim.tables.TileTable (`tables`: one int64 address table per operand in the order param, grad,
// exp_avg_sq_row, exp_avg_sq_col, exp_avg_sq, exp_avg, master_param, step; `meta`, `tile_tensor`, `stat_tensor`:
// the tile map and the layout of the statistics). exp_avg_sq_rows/cols list the state of the matrices (params of
// rank >= 2 with elements), exp_avg_sqs that of the other params with elements, in param order; master_params is
// empty unless bf16/fp16 params keep fp32 master weights; exp_avgs is empty unless beta1 is set. `grad_scale`: the
// grads are divided by it (and written back unscaled by pass 3); `found_inf`: nonzero skips every launch of the
// step. Nothing is read back to the host.
//
// A table-only launch (a step the optimizer's step plan checked; adafactor_ops.h) passes every list empty and states
// what the lists would have said: passes 1 and 3 `param_dtype`, `grad_dtype`, `master`; pass 2 `grad_dtype`; the
// statistics `tables_only`.
//
//   fused_optim::tile_meta_fields() -> str[]     the meta fields the engines read, in order (native.py compares
//                                                them with fused_optim.tables.TILE_META_FIELDS)
#include <torch/library.h>

#include <string>
#include <vector>

#include "adafactor_launch.h"
#include "adafactor_ops.h"

namespace fused_optim {
namespace {

using namespace adafactor_ops;

void adafactor_pass1_cpu(at::TensorList params, at::TensorList grads, at::TensorList master_params,
                         at::TensorList tables, const at::Tensor& meta, const at::Tensor& tile_tensor,
                         const at::Tensor& partials, int64_t n_partials, double eps1,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                         std::optional<at::ScalarType> param_dtype, std::optional<at::ScalarType> grad_dtype,
                         bool master) {
  adafactor_cpu(make_pass1(params, grads, master_params, tables, meta, tile_tensor, partials, n_partials, eps1,
                           grad_scale, found_inf, TablesOnly{param_dtype, grad_dtype, master}, /*host=*/true));
}

void adafactor_statistics_cpu(at::TensorList exp_avg_sq_rows, at::TensorList exp_avg_sq_cols, at::TensorList steps,
                              at::TensorList tables, const at::Tensor& meta, const at::Tensor& stat_tensor,
                              const at::Tensor& stats, int64_t n_rows, double decay_rate,
                              const std::optional<at::Tensor>& found_inf, bool tables_only) {
  adafactor_cpu(make_statistics(exp_avg_sq_rows, exp_avg_sq_cols, steps, tables, meta, stat_tensor, stats, n_rows,
                                decay_rate, found_inf, tables_only, /*host=*/true));
}

void adafactor_pass2_cpu(at::TensorList grads, at::TensorList exp_avg_sqs, at::TensorList steps, at::TensorList tables,
                         const at::Tensor& meta, const at::Tensor& tile_tensor, const at::Tensor& stats,
                         const at::Tensor& batch_sums, const at::Tensor& usq_partials, double eps1, double decay_rate,
                         const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                         std::optional<at::ScalarType> grad_dtype) {
  adafactor_cpu(make_pass2(grads, exp_avg_sqs, steps, tables, meta, tile_tensor, stats, batch_sums, usq_partials, eps1,
                           decay_rate, grad_scale, found_inf, grad_dtype, /*host=*/true));
}

void adafactor_pass3_cpu(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_sqs,
                         at::TensorList exp_avgs, at::TensorList master_params, at::TensorList steps,
                         at::TensorList tables, const at::Tensor& meta, const at::Tensor& tile_tensor,
                         const at::Tensor& arrivals, const at::Tensor& stats, const at::Tensor& batch_sums,
                         const at::Tensor& usq_sums, std::optional<double> lr,
                         const std::optional<at::Tensor>& lr_tensor, double eps2, double clip_threshold,
                         std::optional<double> beta1, double weight_decay, bool scale_parameter, bool relative_step,
                         bool warmup_init, const std::optional<at::Tensor>& grad_scale,
                         const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> param_dtype,
                         std::optional<at::ScalarType> grad_dtype, bool master) {
  adafactor_cpu(make_pass3(params, grads, exp_avg_sqs, exp_avgs, master_params, steps, tables, meta, tile_tensor,
                           arrivals, stats, batch_sums, usq_sums, lr, lr_tensor, eps2, clip_threshold, beta1,
                           weight_decay, scale_parameter, relative_step, warmup_init, grad_scale, found_inf,
                           TablesOnly{param_dtype, grad_dtype, master}, /*host=*/true));
}

void segment_sums_cpu_op(const at::Tensor& partials, const at::Tensor& seg_start, const at::Tensor& out) {
  check_segment_sums(partials, seg_start, out, /*host=*/true);
  segment_sums_cpu(partials.data_ptr<float>(), seg_start.data_ptr<int64_t>(), out.data_ptr<float>(), out.numel());
}

std::vector<std::string> tile_meta_fields() {
  const char* const* names = tile_meta_field_names();
  return std::vector<std::string>(names, names + kTileMetaWidth);
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def(
      "adafactor_pass1_(Tensor[] params, Tensor[] grads, Tensor[] master_params, Tensor[] tables, Tensor meta, "
      "Tensor tile_tensor, Tensor(a!) partials, int n_partials, float eps1, Tensor? grad_scale, Tensor? found_inf, "
      "ScalarType? param_dtype=None, ScalarType? grad_dtype=None, bool master=False) -> ()");
  m.def(
      "adafactor_statistics_(Tensor(a!)[] exp_avg_sq_rows, Tensor(b!)[] exp_avg_sq_cols, Tensor[] steps, "
      "Tensor[] tables, Tensor meta, Tensor stat_tensor, Tensor(c!) stats, int n_rows, float decay_rate, "
      "Tensor? found_inf, bool tables_only=False) -> ()");
  m.def(
      "adafactor_pass2_(Tensor[] grads, Tensor(a!)[] exp_avg_sqs, Tensor[] steps, Tensor[] tables, Tensor meta, "
      "Tensor tile_tensor, Tensor stats, Tensor batch_sums, Tensor(b!) usq_partials, float eps1, float decay_rate, "
      "Tensor? grad_scale, Tensor? found_inf, ScalarType? grad_dtype=None) -> ()");
  m.def(
      "adafactor_pass3_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor[] exp_avg_sqs, Tensor(c!)[] exp_avgs, "
      "Tensor(d!)[] master_params, Tensor(e!)[] steps, Tensor[] tables, Tensor meta, Tensor tile_tensor, "
      "Tensor(f!) arrivals, Tensor stats, Tensor batch_sums, Tensor usq_sums, float? lr, Tensor? lr_tensor, "
      "float eps2, float clip_threshold, float? beta1, float weight_decay, bool scale_parameter, bool relative_step, "
      "bool warmup_init, Tensor? grad_scale, Tensor? found_inf, ScalarType? param_dtype=None, "
      "ScalarType? grad_dtype=None, bool master=False) -> ()");
  m.def("segment_sums_(Tensor partials, Tensor seg_start, Tensor(a!) out) -> ()");
  m.def("tile_meta_fields() -> str[]", &fused_optim::tile_meta_fields);
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("adafactor_pass1_", &fused_optim::adafactor_pass1_cpu);
  m.impl("adafactor_statistics_", &fused_optim::adafactor_statistics_cpu);
  m.impl("adafactor_pass2_", &fused_optim::adafactor_pass2_cpu);
  m.impl("adafactor_pass3_", &fused_optim::adafactor_pass3_cpu);
  m.impl("segment_sums_", &fused_optim::segment_sums_cpu_op);
}
