// CUDA implementation of Adafactor's operators (schemas and the order of a step: adafactor_ops.cpp). Compiled only
// when torch has CUDA and nvcc is present (setup.py, fused_optim/_build.py); the kernels themselves are in the
// ATen-free adafactor_cuda*.cu. Every launch is enqueued on the current stream: no host synchronization.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "adafactor_launch.h"
#include "adafactor_ops.h"

namespace fused_optim {
namespace {

using namespace adafactor_ops;

void run(const AdafactorLaunch& l, const at::Device& device, const char* op) {
  const c10::cuda::CUDAGuard guard(device);
  const char* error = adafactor_cuda(l, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, op, " CUDA launch failed: ", error);
}

void adafactor_pass1_cuda(at::TensorList params, at::TensorList grads, at::TensorList master_params,
                          at::TensorList tables, const at::Tensor& meta, const at::Tensor& tile_tensor,
                          const at::Tensor& partials, int64_t n_partials, double eps1,
                          const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                          std::optional<at::ScalarType> param_dtype, std::optional<at::ScalarType> grad_dtype,
                          bool master) {
  run(make_pass1(params, grads, master_params, tables, meta, tile_tensor, partials, n_partials, eps1, grad_scale,
                 found_inf, TablesOnly{param_dtype, grad_dtype, master}, /*host=*/false),
      meta.device(), "fused_optim::adafactor_pass1_");
}

void adafactor_statistics_cuda(at::TensorList exp_avg_sq_rows, at::TensorList exp_avg_sq_cols, at::TensorList steps,
                               at::TensorList tables, const at::Tensor& meta, const at::Tensor& stat_tensor,
                               const at::Tensor& stats, int64_t n_rows, double decay_rate,
                               const std::optional<at::Tensor>& found_inf, bool tables_only) {
  run(make_statistics(exp_avg_sq_rows, exp_avg_sq_cols, steps, tables, meta, stat_tensor, stats, n_rows, decay_rate,
                      found_inf, tables_only, /*host=*/false),
      meta.device(), "fused_optim::adafactor_statistics_");
}

void adafactor_pass2_cuda(at::TensorList grads, at::TensorList exp_avg_sqs, at::TensorList steps,
                          at::TensorList tables, const at::Tensor& meta, const at::Tensor& tile_tensor,
                          const at::Tensor& stats, const at::Tensor& batch_sums, const at::Tensor& usq_partials,
                          double eps1, double decay_rate, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> grad_dtype) {
  run(make_pass2(grads, exp_avg_sqs, steps, tables, meta, tile_tensor, stats, batch_sums, usq_partials, eps1,
                 decay_rate, grad_scale, found_inf, grad_dtype, /*host=*/false),
      meta.device(), "fused_optim::adafactor_pass2_");
}

void adafactor_pass3_cuda(at::TensorList params, at::TensorList grads, at::TensorList exp_avg_sqs,
                          at::TensorList exp_avgs, at::TensorList master_params, at::TensorList steps,
                          at::TensorList tables, const at::Tensor& meta, const at::Tensor& tile_tensor,
                          const at::Tensor& arrivals, const at::Tensor& stats, const at::Tensor& batch_sums,
                          const at::Tensor& usq_sums, std::optional<double> lr,
                          const std::optional<at::Tensor>& lr_tensor, double eps2, double clip_threshold,
                          std::optional<double> beta1, double weight_decay, bool scale_parameter, bool relative_step,
                          bool warmup_init, const std::optional<at::Tensor>& grad_scale,
                          const std::optional<at::Tensor>& found_inf, std::optional<at::ScalarType> param_dtype,
                          std::optional<at::ScalarType> grad_dtype, bool master) {
  run(make_pass3(params, grads, exp_avg_sqs, exp_avgs, master_params, steps, tables, meta, tile_tensor, arrivals,
                 stats, batch_sums, usq_sums, lr, lr_tensor, eps2, clip_threshold, beta1, weight_decay,
                 scale_parameter, relative_step, warmup_init, grad_scale, found_inf,
                 TablesOnly{param_dtype, grad_dtype, master}, /*host=*/false),
      meta.device(), "fused_optim::adafactor_pass3_");
}

void segment_sums_cuda_op(const at::Tensor& partials, const at::Tensor& seg_start, const at::Tensor& out) {
  check_segment_sums(partials, seg_start, out, /*host=*/false);
  const c10::cuda::CUDAGuard guard(partials.device());
  const char* error = segment_sums_cuda(partials.data_ptr<float>(), seg_start.data_ptr<int64_t>(),
                                        out.data_ptr<float>(), out.numel(),
                                        c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "fused_optim::segment_sums_ CUDA launch failed: ", error);
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("adafactor_pass1_", &fused_optim::adafactor_pass1_cuda);
  m.impl("adafactor_statistics_", &fused_optim::adafactor_statistics_cuda);
  m.impl("adafactor_pass2_", &fused_optim::adafactor_pass2_cuda);
  m.impl("adafactor_pass3_", &fused_optim::adafactor_pass3_cuda);
  m.impl("segment_sums_", &fused_optim::segment_sums_cuda_op);
}
