// The binding layer of the LAMB operators (schemas: ops_lamb.cpp), shared by the CPU (ops_lamb.cpp) and CUDA
// (ops_lamb_cuda.cpp) implementations: checks the arguments and fills the launch structs of launch.h.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <cmath>
#include <optional>

#include "launch.h"
#include "ops_common.h"

namespace fused_optim {

// The operand tables of fused_optim::lamb_, in the order of fused_optim.native.LAMB_OPERANDS.
constexpr std::array<const char*, 6> kLambOperands = {"param", "grad", "exp_avg", "exp_avg_sq", "master_param", "step"};

// A float64 tensor of exactly `numel` elements, contiguous, on `device` (a partials or sums buffer: the sums of
// squares are float64, engine.h).
inline Partial* checked_buffer(const at::Tensor& t, const char* what, int64_t numel, const at::Device& device,
                               const char* op, const char* shape) {
  TORCH_CHECK(t.scalar_type() == at::kDouble && t.numel() == numel && t.is_contiguous() && t.device() == device, op,
              ": ", what, " must be a contiguous float64 tensor of ", shape, " = ", numel, " elements on ", device,
              ", got ", t.scalar_type(), " ", t.sizes(), (t.is_contiguous() ? "" : " (not contiguous)"), " on ",
              t.device());
  return t.data_ptr<Partial>();
}

// Checks every argument of fused_optim::lamb_ and fills the launch. `host_tables`: see check_block_map.
inline LambLaunch make_lamb_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList master_params, at::TensorList steps,
                                   at::TensorList tables, const at::Tensor& numels, const at::Tensor& block_tensor,
                                   const at::Tensor& block_start, const at::Tensor& arrivals, int64_t block,
                                   int64_t phase, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                                   double beta2, double eps, double weight_decay, bool bias_correction,
                                   bool trust_clip, double clip_lo, double clip_hi,
                                   const std::optional<at::Tensor>& grad_clip,
                                   const std::optional<at::Tensor>& partials, const std::optional<at::Tensor>& sums,
                                   const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf, const TablesOnly& only,
                                   bool host_tables) {
  constexpr const char* op = "fused_optim::lamb_";
  TORCH_CHECK(phase == kLambNorms || phase == kLambApply || phase == kLambFused, op, ": phase must be ", kLambNorms,
              " (pass 1: moments and partial norms), ", kLambApply, " (pass 2: update with the trust ratio) or ",
              kLambFused, " (one pass, no layer adaptation), got ", phase);
  const LaunchGroup g = launch_group(op, only, params, grads, master_params, {exp_avgs, exp_avg_sqs, steps}, numels.numel(),
                                     numels.device());
  const int64_t n = g.n;
  const at::Device device = g.device;
  const bool master = g.master;

  LambLaunch l{};
  l.phase = static_cast<int>(phase);
  l.param_dtype = g.param_dtype;
  l.grad_dtype = g.grad_dtype;
  if (!g.tables_only) {
    check_list(params, "params", n, device, params[0].scalar_type(), params, false, op);
    check_list(grads, "grads", n, device, grads[0].scalar_type(), params, false, op);
    check_list(exp_avgs, "exp_avgs", n, device, at::kFloat, params, false, op);
    check_list(exp_avg_sqs, "exp_avg_sqs", n, device, at::kFloat, params, false, op);
    if (master) check_list(master_params, "master_params", n, device, at::kFloat, params, false, op);
    check_list(steps, "steps", n, device, at::kFloat, params, true, op);
  }
  const at::TensorList lists[] = {params, grads, exp_avgs, exp_avg_sqs, master_params, steps};
  l.map = check_block_map(op, kLambOperands.data(), lists, kLambOperands.size(), tables, numels, block_tensor,
                          block_start, arrivals, block, n, device, params, host_tables);

  TORCH_CHECK(partials.has_value() == (phase == kLambNorms), op, ": partials ",
              phase == kLambNorms ? "is required by" : "is only written by", " pass 1 (phase ", kLambNorms, ")");
  TORCH_CHECK(sums.has_value() == (phase == kLambApply), op, ": sums ",
              phase == kLambApply ? "is required by" : "is only read by", " pass 2 (phase ", kLambApply, ")");
  l.partials = partials ? checked_buffer(*partials, "partials", 2 * l.map.n_blocks, device, op, "[2, n_blocks]")
                        : nullptr;

  LambArgs& a = l.args;
  a.param = tables[0].data_ptr<int64_t>();
  a.grad = tables[1].data_ptr<int64_t>();
  a.exp_avg = tables[2].data_ptr<int64_t>();
  a.exp_avg_sq = tables[3].data_ptr<int64_t>();
  a.master_param = tables[4].data_ptr<int64_t>();
  a.step = tables[5].data_ptr<int64_t>();
  a.lr = lr;
  a.lr_ptr = lr_pointer(lr_tensor, device, &a.lr_is_double, op);
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.bias_correction = bias_correction;
  a.trust_clip = trust_clip;
  a.clip_lo = clip_lo;
  a.clip_hi = clip_hi;
  if (trust_clip) {
    TORCH_CHECK(std::isfinite(clip_lo) && 0.0 <= clip_lo && clip_lo <= clip_hi, op,
                ": trust_clip needs 0 <= clip_lo <= clip_hi with clip_lo finite, got (", clip_lo, ", ", clip_hi, ")");
  }
  a.grad_clip = nullptr;
  a.grad_clip_is_double = false;
  if (grad_clip) {
    const at::Tensor& c = *grad_clip;
    TORCH_CHECK(c.numel() == 1 && (c.scalar_type() == at::kFloat || c.scalar_type() == at::kDouble) &&
                    c.device() == device,
                op, ": grad_clip must be a 1-element float32 or float64 tensor on ", device, ", got ", c.scalar_type(),
                " with ", c.numel(), " elements on ", c.device());
    a.grad_clip = c.data_ptr();
    a.grad_clip_is_double = c.scalar_type() == at::kDouble;
  }
  a.sums = sums ? checked_buffer(*sums, "sums", 2 * n, device, op, "[2, n_tensors]") : nullptr;
  a.n_tensors = n;
  // The grad is unscaled by the pass that reads it; pass 2 ignores grad_scale.
  l.unscale = grad_scale.has_value() && phase != kLambApply;
  a.grad_scale = l.unscale ? scalar_ptr(grad_scale, "grad_scale", device, op) : nullptr;
  a.found_inf = scalar_ptr(found_inf, "found_inf", device, op);
  l.master = master;
  return l;
}

// Checks every argument of fused_optim::grad_sq_ and fills the launch. `grad_dtype` set: a table-only launch (the
// optimizer's step plan checked the grads against the table; see TablesOnly in ops_common.h), `grads` empty.
inline GradSqLaunch make_grad_sq_launch(at::TensorList grads, const at::Tensor& grad_table, const at::Tensor& numels,
                                        const at::Tensor& block_tensor, const at::Tensor& block_start,
                                        const at::Tensor& arrivals, int64_t block,
                                        const std::optional<at::Tensor>& grad_scale,
                                        const std::optional<at::Tensor>& found_inf, const at::Tensor& partials,
                                        std::optional<at::ScalarType> grad_dtype, bool host_tables) {
  constexpr const char* op = "fused_optim::grad_sq_";
  GradSqLaunch l{};
  int64_t n = 0;
  at::Device device = numels.device();
  if (grad_dtype) {
    n = numels.numel();
    check_table_only_lists(op, "grad_dtype given", n, {grads});
    l.grad_dtype = dtype_from(*grad_dtype, "grad_dtype", op);
  } else {
    n = static_cast<int64_t>(grads.size());
    TORCH_CHECK(n > 0, op, ": grads is empty");
    device = grads[0].device();
    l.grad_dtype = dtype_of(grads[0], "grads", 0, op);
    check_list(grads, "grads", n, device, grads[0].scalar_type(), grads, false, op);
  }
  const char* names[] = {"grad"};
  const at::TensorList lists[] = {grads};  // empty for a table-only launch: its addresses are not checked here
  const at::Tensor tables[] = {grad_table};
  l.map = check_block_map(op, names, lists, 1, tables, numels, block_tensor, block_start, arrivals, block, n, device,
                          grads, host_tables);
  l.partials = checked_buffer(partials, "partials", l.map.n_blocks, device, op, "[1, n_blocks]");
  l.args.grad = grad_table.data_ptr<int64_t>();
  l.unscale = grad_scale.has_value();
  l.args.grad_scale = scalar_ptr(grad_scale, "grad_scale", device, op);
  l.args.found_inf = scalar_ptr(found_inf, "found_inf", device, op);
  return l;
}

// Checks the arguments of fused_optim::segment_sum, allocates its output [Q, S] and fills the launch.
// `host_index`: seg_start is host memory (CPU), so its entries can be checked too.
inline SegmentSumLaunch make_segment_sum_launch(const at::Tensor& partials, const at::Tensor& seg_start, at::Tensor& out,
                                                bool host_index) {
  constexpr const char* op = "fused_optim::segment_sum";
  TORCH_CHECK(partials.scalar_type() == at::kDouble && partials.is_contiguous() &&
                  (partials.dim() == 1 || partials.dim() == 2),
              op, ": partials must be a contiguous float64 tensor of [n_quantities, n_partials] (or [n_partials]), got ",
              partials.scalar_type(), " ", partials.sizes());
  TORCH_CHECK((seg_start.scalar_type() == at::kInt || seg_start.scalar_type() == at::kLong) && seg_start.dim() == 1 &&
                  seg_start.numel() >= 1 && seg_start.is_contiguous() && seg_start.device() == partials.device(),
              op, ": seg_start must be a contiguous int32 or int64 vector of n_segments + 1 >= 1 entries on ",
              partials.device(), ", got ", seg_start.scalar_type(), " ", seg_start.sizes(), " on ", seg_start.device());
  SegmentSumLaunch l{};
  l.n_quantities = partials.dim() == 2 ? partials.size(0) : 1;
  l.n_partials = partials.dim() == 2 ? partials.size(1) : partials.size(0);
  l.n_segments = seg_start.numel() - 1;
  l.seg_int64 = seg_start.scalar_type() == at::kLong;
  if (host_index) {
    for (int64_t s = 0; s <= l.n_segments; ++s) {
      const int64_t v = l.seg_int64 ? seg_start.data_ptr<int64_t>()[s] : seg_start.data_ptr<int32_t>()[s];
      const int64_t prev = s == 0 ? 0 : (l.seg_int64 ? seg_start.data_ptr<int64_t>()[s - 1]
                                                     : seg_start.data_ptr<int32_t>()[s - 1]);
      TORCH_CHECK(v >= prev && v <= l.n_partials, op, ": seg_start[", s, "] = ", v,
                  " is out of order or out of range; segment starts must be non-decreasing within [0, ", l.n_partials,
                  "] (fused_optim.tables.TensorTable.first_block)");
    }
  }
  out = at::empty({l.n_quantities, l.n_segments}, partials.options());
  l.partials = partials.data_ptr<Partial>();
  l.seg_start = seg_start.data_ptr();
  l.out = out.data_ptr<Partial>();
  return l;
}

}  // namespace fused_optim
