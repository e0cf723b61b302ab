// The LAMB operators of the native backend: their registration with the PyTorch dispatcher (a fragment of the
// `fused_optim` library that ops.cpp defines) and their CPU implementation. The CUDA implementation is
// ops_lamb_cuda.cpp; the Python side is fused_optim/native.py (lamb, grad_sq_norm).
//
//   fused_optim::lamb_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs,
//                      Tensor(e!)[] master_params, Tensor(f!)[] steps, Tensor[] tables, Tensor numels,
//                      Tensor block_tensor, Tensor block_start, Tensor(g!) arrivals, int block, int phase, float lr,
//                      Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay,
//                      bool bias_correction, bool trust_clip, float clip_lo, float clip_hi, Tensor? grad_clip,
//                      Tensor(h!)? partials, Tensor? sums, Tensor? grad_scale, Tensor? found_inf,
//                      ScalarType? param_dtype=None, ScalarType? grad_dtype=None, bool master=False) -> ()
//
// One pass of a LAMB step (csrc/lamb_rule.h) over every tensor of a launch group, in place; a step is
// phase 0 (pass 1: moments, per-block Σθ² and Σu² into float64 `partials` [2, n_blocks]), segment_sum of the
// partials per tensor, phase 1 (pass 2: θ -= γ r u with r from float64 `sums` [2, n_tensors]); or phase 2 alone
// (one pass, r = 1, for a group without layer adaptation). The tensor lists declare what a step mutates (the union
// over the passes), the kernels address the tensors through the tables of fused_optim/tables.py (`tables`: param,
// grad, exp_avg, exp_avg_sq, master_param, step), as fused_optim::adam_ (ops.cpp). master_params is empty unless
// the params are bf16/fp16 with fp32 master weights. `lr_tensor`: read instead of `lr` (1 element, fp32 or fp64).
// `grad_clip`: c = min(1, max_grad_norm / G) (1 element, fp64 or fp32, rounded to fp32), multiplies the grads of
// the passes that read them. `grad_scale`: the pass that reads the grads divides them by it and writes them back.
// `found_inf`: nonzero skips every pass (pass 1 then writes zero partials). Nothing is read back to the host.
// `param_dtype`, `grad_dtype`, `master`: a table-only launch, every list empty (as adam_, ops.cpp).
//
//   fused_optim::grad_sq_(Tensor[] grads, Tensor grad_table, Tensor numels, Tensor block_tensor,
//                         Tensor block_start, Tensor(a!) arrivals, int block, Tensor? grad_scale, Tensor? found_inf,
//                         Tensor(b!) partials, ScalarType? grad_dtype=None) -> ()
//
// Per-block Σg² of every grad (divided by grad_scale first, not written back) into float64 `partials`
// [1, n_blocks]: the grad pass of the global gradient norm of max_grad_norm. found_inf nonzero: zeros.
// `grad_dtype`: a table-only launch, `grads` empty.
//
//   fused_optim::segment_sum(Tensor partials, Tensor seg_start) -> Tensor
//
// out[q, s] = the sum of partials[q, seg_start[s] : seg_start[s + 1]] (partials float64 [Q, P] or [P], seg_start
// int32/int64 [S + 1]), a new float64 [Q, S] tensor, in the fixed order of csrc/engine.h: deterministic, and the
// same bits on CPU and CUDA. With seg_start = TensorTable.first_block: per-tensor sums of per-block partials.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cpu/multi_tensor_cpu.h"
#include "launch.h"
#include "ops_lamb.h"

namespace fused_optim {
namespace {

void lamb_cpu_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                 at::TensorList master_params, at::TensorList steps, at::TensorList tables, const at::Tensor& numels,
                 const at::Tensor& block_tensor, const at::Tensor& block_start, const at::Tensor& arrivals,
                 int64_t block, int64_t phase, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                 double beta2, double eps, double weight_decay, bool bias_correction, bool trust_clip, double clip_lo,
                 double clip_hi, const std::optional<at::Tensor>& grad_clip, const std::optional<at::Tensor>& partials,
                 const std::optional<at::Tensor>& sums, const std::optional<at::Tensor>& grad_scale,
                 const std::optional<at::Tensor>& found_inf,
                 std::optional<at::ScalarType> param_dtype, std::optional<at::ScalarType> grad_dtype, bool master) {
  if (params.empty() && !param_dtype && !grad_dtype && !master) return;  // nothing to update
  const LambLaunch l = make_lamb_launch(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, tables, numels,
                                        block_tensor, block_start, arrivals, block, phase, lr, lr_tensor, beta1, beta2,
                                        eps, weight_decay, bias_correction, trust_clip, clip_lo, clip_hi, grad_clip,
                                        partials, sums, grad_scale, found_inf,
                                        TablesOnly{param_dtype, grad_dtype, master}, /*host_tables=*/true);
  lamb_cpu(l);
}

void grad_sq_cpu_op(at::TensorList grads, const at::Tensor& grad_table, const at::Tensor& numels,
                    const at::Tensor& block_tensor, const at::Tensor& block_start, const at::Tensor& arrivals,
                    int64_t block, const std::optional<at::Tensor>& grad_scale,
                    const std::optional<at::Tensor>& found_inf, const at::Tensor& partials,
                    std::optional<at::ScalarType> grad_dtype) {
  if (grads.empty() && !grad_dtype) return;
  grad_sq_cpu(make_grad_sq_launch(grads, grad_table, numels, block_tensor, block_start, arrivals, block, grad_scale,
                                  found_inf, partials, grad_dtype, /*host_tables=*/true));
}

at::Tensor segment_sum_cpu_op(const at::Tensor& partials, const at::Tensor& seg_start) {
  at::Tensor out;
  const SegmentSumLaunch l = make_segment_sum_launch(partials, seg_start, out, /*host_index=*/true);
  segment_sum_cpu(l);
  return out;
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY_FRAGMENT(fused_optim, m) {
  m.def(
      "lamb_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] master_params, Tensor(f!)[] steps, Tensor[] tables, Tensor numels, Tensor block_tensor, "
      "Tensor block_start, Tensor(g!) arrivals, int block, int phase, float lr, Tensor? lr_tensor, float beta1, "
      "float beta2, float eps, float weight_decay, bool bias_correction, bool trust_clip, float clip_lo, "
      "float clip_hi, Tensor? grad_clip, Tensor(h!)? partials, Tensor? sums, Tensor? grad_scale, "
      "Tensor? found_inf, ScalarType? param_dtype=None, ScalarType? grad_dtype=None, bool master=False) -> ()");
  m.def(
      "grad_sq_(Tensor[] grads, Tensor grad_table, Tensor numels, Tensor block_tensor, Tensor block_start, "
      "Tensor(a!) arrivals, int block, Tensor? grad_scale, Tensor? found_inf, Tensor(b!) partials, "
      "ScalarType? grad_dtype=None) -> ()");
  m.def("segment_sum(Tensor partials, Tensor seg_start) -> Tensor");
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) {
  m.impl("lamb_", &fused_optim::lamb_cpu_op);
  m.impl("grad_sq_", &fused_optim::grad_sq_cpu_op);
  m.impl("segment_sum", &fused_optim::segment_sum_cpu_op);
}
