// CUDA implementation of the LAMB operators (schemas: ops_lamb.cpp). Compiled only when torch has CUDA and nvcc is
// present (setup.py, fused_optim/_build.py); the kernels themselves are in the ATen-free lamb_cuda.cu.
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "launch.h"
#include "ops_lamb.h"

namespace fused_optim {
namespace {

void lamb_cuda_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList master_params, at::TensorList steps, at::TensorList tables, const at::Tensor& numels,
                  const at::Tensor& block_tensor, const at::Tensor& block_start, const at::Tensor& arrivals,
                  int64_t block, int64_t phase, double lr, const std::optional<at::Tensor>& lr_tensor, double beta1,
                  double beta2, double eps, double weight_decay, bool bias_correction, bool trust_clip,
                  double clip_lo, double clip_hi, const std::optional<at::Tensor>& grad_clip,
                  const std::optional<at::Tensor>& partials, const std::optional<at::Tensor>& sums,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  std::optional<at::ScalarType> param_dtype, std::optional<at::ScalarType> grad_dtype, bool master) {
  if (params.empty() && !param_dtype && !grad_dtype && !master) return;  // nothing to update
  const LambLaunch l = make_lamb_launch(params, grads, exp_avgs, exp_avg_sqs, master_params, steps, tables, numels,
                                        block_tensor, block_start, arrivals, block, phase, lr, lr_tensor, beta1, beta2,
                                        eps, weight_decay, bias_correction, trust_clip, clip_lo, clip_hi, grad_clip,
                                        partials, sums, grad_scale, found_inf,
                                        TablesOnly{param_dtype, grad_dtype, master}, /*host_tables=*/false);
  const c10::cuda::CUDAGuard guard(numels.device());
  const char* error = lamb_cuda(l, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "fused_optim::lamb_ CUDA launch failed: ", error);
}

void grad_sq_cuda_op(at::TensorList grads, const at::Tensor& grad_table, const at::Tensor& numels,
                     const at::Tensor& block_tensor, const at::Tensor& block_start, const at::Tensor& arrivals,
                     int64_t block, const std::optional<at::Tensor>& grad_scale,
                     const std::optional<at::Tensor>& found_inf, const at::Tensor& partials,
                     std::optional<at::ScalarType> grad_dtype) {
  if (grads.empty() && !grad_dtype) return;
  const GradSqLaunch l = make_grad_sq_launch(grads, grad_table, numels, block_tensor, block_start, arrivals, block,
                                             grad_scale, found_inf, partials, grad_dtype, /*host_tables=*/false);
  const c10::cuda::CUDAGuard guard(numels.device());
  const char* error = grad_sq_cuda(l, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "fused_optim::grad_sq_ CUDA launch failed: ", error);
}

at::Tensor segment_sum_cuda_op(const at::Tensor& partials, const at::Tensor& seg_start) {
  const c10::cuda::CUDAGuard guard(partials.device());
  at::Tensor out;
  const SegmentSumLaunch l = make_segment_sum_launch(partials, seg_start, out, /*host_index=*/false);
  const char* error = segment_sum_cuda(l, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "fused_optim::segment_sum CUDA launch failed: ", error);
  return out;
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) {
  m.impl("lamb_", &fused_optim::lamb_cuda_op);
  m.impl("grad_sq_", &fused_optim::grad_sq_cuda_op);
  m.impl("segment_sum", &fused_optim::segment_sum_cuda_op);
}
