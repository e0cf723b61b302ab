// Operator registration of the native backend, and its CPU implementation.
//
//   fused_optim::adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs,
//                      Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] master_params, Tensor(g!)[] steps,
//                      Tensor[] tables, Tensor numels, Tensor block_tensor, Tensor block_start, Tensor(h!) arrivals,
//                      int block, float lr, Tensor? lr_tensor, float beta1, float beta2, float eps,
//                      float weight_decay, bool amsgrad, bool maximize, bool decoupled_weight_decay,
//                      Tensor? grad_scale, Tensor? found_inf, ScalarType? param_dtype=None,
//                      ScalarType? grad_dtype=None, bool master=False) -> ()
//
// One Adam/AdamW step on every tensor of a launch group, in place. The tensor lists declare to the dispatcher
// what is mutated and on which device (so torch.compile, functionalization and CUDA graphs see a mutating op);
// the kernels address the tensors through the prebuilt tables of fused_optim/tables.py (`tables`: one int64
// address table per operand in the order param, grad, exp_avg, exp_avg_sq, max_exp_avg_sq, master_param, step;
// `numels`, `block_tensor`, `block_start`, `arrivals`, `block`: the block map), so a step costs no host-side
// table work. max_exp_avg_sqs is empty unless amsgrad; master_params is empty unless the params are bf16/fp16 with
// fp32 master weights (their address table then holds zeros otherwise). `lr_tensor`, when given, is read by the
// kernel instead of `lr` (1 element, fp32 or fp64, on the params' device). `grad_scale`: the grads are divided
// by it and written back unscaled. `found_inf`: nonzero skips the whole step, steps included. Both are
// GradScaler's 1-element fp32 tensors on the params' device. Nothing is read back to the host. A table-only launch
// (ops_common.h, TablesOnly: the optimizer's step plan has checked the tensors against the tables this step) passes
// every list empty and states `param_dtype`, `grad_dtype` and `master` (fp32 master weights) instead.
//
//   fused_optim::build_info() -> str
//
// What this build contains (CPU ISA used now, OpenMP or not, whether CUDA kernels were compiled): shown by
// `python -m fused_optim info` through fused_optim.native.info().
//
// The Python side is fused_optim/native.py (loader and launcher) and fused_optim/backends.py (dispatch).
// Other rules register their operators as fragments of this library in their own files (LAMB: ops_lamb.cpp).
#include <Python.h>
#include <torch/library.h>

#include <string>

#include "cpu/multi_tensor_cpu.h"
#include "launch.h"
#include "ops_common.h"
#include "plan.h"

namespace fused_optim {
namespace {

void adam_cpu_op(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs, at::TensorList exp_avg_sqs,
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
                                        /*host_tables=*/true);
  adam_cpu(l);
}

std::string build_info() {
  std::string info = "cpu: ";
  info += cpu::isa_name(cpu::active_isa());
#if defined(_OPENMP)
  info += ", openmp threads";  // ATen's parallel_for is OpenMP only in code compiled with -fopenmp
#else
  info += ", one thread";
#endif
#if defined(FUSED_OPTIM_WITH_CUDA)
  info += "; cuda: compiled";
#else
  info += "; cuda: not compiled";
#endif
  return info;
}

}  // namespace
}  // namespace fused_optim

TORCH_LIBRARY(fused_optim, m) {
  m.def(
      "adam_(Tensor(a!)[] params, Tensor(b!)[] grads, Tensor(c!)[] exp_avgs, Tensor(d!)[] exp_avg_sqs, "
      "Tensor(e!)[] max_exp_avg_sqs, Tensor(f!)[] master_params, Tensor(g!)[] steps, Tensor[] tables, "
      "Tensor numels, Tensor block_tensor, Tensor block_start, Tensor(h!) arrivals, int block, float lr, "
      "Tensor? lr_tensor, float beta1, float beta2, float eps, float weight_decay, bool amsgrad, bool maximize, "
      "bool decoupled_weight_decay, Tensor? grad_scale, Tensor? found_inf, ScalarType? param_dtype=None, "
      "ScalarType? grad_dtype=None, bool master=False) -> ()");
  m.def("build_info() -> str", &fused_optim::build_info);
}

TORCH_LIBRARY_IMPL(fused_optim, CPU, m) { m.impl("adam_", &fused_optim::adam_cpu_op); }

// The module object of `import fused_optim._C` (setup.py) or of the JIT build (fused_optim/native.py); importing
// it runs the registrations above. Its name comes from the build (-DTORCH_EXTENSION_NAME=...). Its one Python
// function, plan_match, serves the optimizer's step plan (plan.cpp).
#define FUSED_OPTIM_CONCAT_(a, b) a##b
#define FUSED_OPTIM_CONCAT(a, b) FUSED_OPTIM_CONCAT_(a, b)
#define FUSED_OPTIM_STR_(a) #a
#define FUSED_OPTIM_STR(a) FUSED_OPTIM_STR_(a)

extern "C" PyMODINIT_FUNC FUSED_OPTIM_CONCAT(PyInit_, TORCH_EXTENSION_NAME)(void) {
  static struct PyModuleDef module = {PyModuleDef_HEAD_INIT, FUSED_OPTIM_STR(TORCH_EXTENSION_NAME),
                                      "fused_optim's native backend: registers the fused_optim:: operators "
                                      "(torch.ops.fused_optim) and has the step plan's check (plan_match).",
                                      -1, fused_optim::plan_methods};
  return PyModule_Create(&module);
}
