// CUDA implementation of the fused_optim:: operators (schemas: ops.cpp). Compiled only when torch has CUDA and nvcc
// is present (setup.py, fused_optim/_build.py); the kernels themselves are in the ATen-free adam_cuda.cu.
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "launch.h"
#include "ops_common.h"

namespace fused_optim {
namespace {

void adam_cuda_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
                  at::TensorList max_exp_avg_sqs, at::TensorList master_params, at::TensorList steps,
                  at::TensorList tables, const at::Tensor& numels, const at::Tensor& block_tensor,
                  const at::Tensor& block_start, const at::Tensor& arrivals, int64_t block, double lr,
                  const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                  double weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
                  const std::optional<at::Tensor>& grad_scale, const std::optional<at::Tensor>& found_inf,
                  std::optional<at::ScalarType> param_dtype, std::optional<at::ScalarType> grad_dtype, bool master) {
  if (params.empty() && !param_dtype && !grad_dtype && !master) return;  // nothing to update
  const AdamLaunch l = make_adam_launch(params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps,
                                        tables, numels, block_tensor, block_start, arrivals, block, lr, lr_tensor,
                                        beta1, beta2, eps, weight_decay, amsgrad, maximize, decoupled_weight_decay,
                                        grad_scale, found_inf, TablesOnly{param_dtype, grad_dtype, master},
                                        /*host_tables=*/false);
  const c10::cuda::CUDAGuard guard(numels.device());
  const char* error = adam_cuda(l, c10::cuda::getCurrentCUDAStream().stream());
  TORCH_CHECK(error == nullptr, "fused_optim::adam_ CUDA launch failed: ", error);
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY_IMPL(fused_optim, CUDA, m) { m.impl("adam_", &fused_optim::adam_cuda_op); }
