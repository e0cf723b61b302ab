// The binding layer shared by the CPU (ops.cpp, ops_lamb.cpp) and CUDA (ops_cuda.cpp, ops_lamb_cuda.cpp)
// implementations of the operators: checks the arguments and turns ATen tensors into the plain launch structs of
// launch.h. Every check names the operator (`op`) in its message.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <array>
#include <optional>
#include <string>

#include "launch.h"

namespace fused_optim {

// The operand tables of fused_optim::adam_, in the order of fused_optim.native.ADAM_OPERANDS.
constexpr std::array<const char*, 7> kAdamOperands = {"param",          "grad",         "exp_avg", "exp_avg_sq",
                                                      "max_exp_avg_sq", "master_param", "step"};

inline DType dtype_of(const at::Tensor& t, const char* what, int64_t i, const char* op = "fused_optim::adam_") {
  switch (t.scalar_type()) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", what, "[", i, "] has dtype ", t.scalar_type(),
                  "; the native kernels support float32, float16 and bfloat16 (use backend='reference' for others)");
  }
}

// Checks one tensor list of the launch: length, device, dtype, contiguity, and that every tensor has the numel of
// its param (`scalar`: one element, for the step tensors).
inline void check_list(const at::TensorList list, const char* what, int64_t n, const at::Device& device,
                       std::optional<at::ScalarType> dtype, const at::TensorList params, bool scalar,
                       const char* op = "fused_optim::adam_") {
  TORCH_CHECK(static_cast<int64_t>(list.size()) == n, op, ": ", what, " has ", list.size(),
              " tensors but params has ", n, "; pass one per param");
  for (int64_t i = 0; i < n; ++i) {
    const at::Tensor& t = list[i];
    TORCH_CHECK(t.device() == device, op, ": ", what, "[", i, "] is on ", t.device(), " but params[0] is on ",
                device, "; one launch updates tensors of one device");
    if (dtype) {
      TORCH_CHECK(t.scalar_type() == *dtype, op, ": ", what, "[", i, "] has dtype ", t.scalar_type(),
                  ", expected ", *dtype);
    }
    TORCH_CHECK(t.is_contiguous(), op, ": ", what, "[", i,
                "] is not contiguous; the native kernels update contiguous tensors (make the param contiguous, or use "
                "backend='reference')");
    if (scalar) {
      TORCH_CHECK(t.numel() == 1, op, ": ", what, "[", i, "] must be a 1-element step tensor, has ",
                  t.numel(), " elements");
    } else {
      TORCH_CHECK(t.numel() == params[i].numel(), op, ": ", what, "[", i, "] has ", t.numel(),
                  " elements but params[", i, "] has ", params[i].numel());
    }
  }
}

inline void check_index_tensor(const at::Tensor& t, const char* what, at::ScalarType dtype, int64_t n,
                               const at::Device& device, const char* op = "fused_optim::adam_") {
  TORCH_CHECK(t.scalar_type() == dtype && t.dim() == 1 && t.numel() == n && t.is_contiguous() && t.device() == device,
              op, ": table ", what, " must be a contiguous ", dtype, " vector of ", n, " entries on ",
              device, ", got ", t.scalar_type(), " ", t.sizes(), " on ", t.device(),
              " (build the tables with fused_optim.tables.TensorTable)");
}

inline const float* scalar_ptr(const std::optional<at::Tensor>& t, const char* what, const at::Device& device,
                               const char* op = "fused_optim::adam_") {
  if (!t) return nullptr;
  TORCH_CHECK(t->scalar_type() == at::kFloat && t->numel() == 1 && t->device() == device, op, ": ",
              what, " must be a 1-element float32 tensor on ", device, " (as torch.amp.GradScaler makes it), got ",
              t->scalar_type(), " with ", t->numel(), " elements on ", t->device());
  return t->data_ptr<float>();
}

// Checks the address tables and the block map of one launch (TensorTable) and returns the map. `names`, `lists`: the
// operands in the order of the tables (an empty list: an operand the launch does not use). `host_tables`: the tables
// are host memory (CPU launch), so the addresses, sizes and block map can be checked against the tensors too; on
// CUDA that would need a device-to-host copy (a sync), so there the caller's TensorTable is trusted for those.
inline BlockMap check_block_map(const char* op, const char* const* names, const at::TensorList* lists,
                                size_t n_operands, at::TensorList tables, const at::Tensor& numels,
                                const at::Tensor& block_tensor, const at::Tensor& block_start,
                                const at::Tensor& arrivals, int64_t block, at::TensorList params, bool host_tables) {
  const int64_t n = static_cast<int64_t>(params.size());
  const at::Device device = params[0].device();
  if (tables.size() != n_operands) {
    std::string expected;
    for (size_t k = 0; k < n_operands; ++k) expected += (k ? ", " : "") + std::string(names[k]);
    TORCH_CHECK(false, op, ": expected ", n_operands, " address tables (", expected, "), got ", tables.size());
  }
  for (size_t k = 0; k < tables.size(); ++k) check_index_tensor(tables[k], names[k], at::kLong, n, device, op);
  check_index_tensor(numels, "numels", at::kLong, n, device, op);
  check_index_tensor(arrivals, "arrivals", at::kInt, n, device, op);
  const int64_t n_blocks = block_tensor.numel();
  check_index_tensor(block_tensor, "block_tensor", at::kInt, n_blocks, device, op);
  check_index_tensor(block_start, "block_start", at::kLong, n_blocks, device, op);
  TORCH_CHECK(block > 0 && block % kVec == 0, op, ": block must be a positive multiple of ", kVec, ", got ", block);
  TORCH_CHECK(n_blocks >= n && n_blocks < (int64_t{1} << 31), op, ": ", n_blocks, " blocks for ", n,
              " tensors; the block map needs at least one block per tensor and fewer than 2^31");

  if (host_tables) {
    const int64_t* num = numels.data_ptr<int64_t>();
    for (size_t k = 0; k < n_operands; ++k) {
      const int64_t* addr = tables[k].data_ptr<int64_t>();
      const at::TensorList list = lists[k];
      if (list.empty()) continue;  // an operand the launch does not use: its table is never read
      for (int64_t i = 0; i < n; ++i) {
        const int64_t expected = reinterpret_cast<int64_t>(list[i].data_ptr());
        TORCH_CHECK(addr[i] == expected, op, ": the ", names[k], " table does not hold the address of ", names[k], " ",
                    i, "; the table is stale: rebuild it (fused_optim.tables.TensorTable.build)");
      }
    }
    for (int64_t i = 0; i < n; ++i) {
      TORCH_CHECK(num[i] == params[i].numel(), op, ": numels[", i, "] is ", num[i], " but params[", i, "] has ",
                  params[i].numel(), " elements; the table is stale: rebuild it");
    }
    const int32_t* bt = block_tensor.data_ptr<int32_t>();
    const int64_t* bs = block_start.data_ptr<int64_t>();
    for (int64_t b = 0; b < n_blocks; ++b) {
      TORCH_CHECK(bt[b] >= 0 && bt[b] < n && bs[b] >= 0, op, ": block ", b, " of the block map points at tensor ",
                  bt[b], ", offset ", bs[b], "; the block map is corrupt: rebuild the table");
    }
  }

  BlockMap map{};
  map.numels = numels.data_ptr<int64_t>();
  map.block_tensor = block_tensor.data_ptr<int32_t>();
  map.block_start = block_start.data_ptr<int64_t>();
  map.arrivals = arrivals.data_ptr<int32_t>();
  map.n_tensors = n;
  map.n_blocks = n_blocks;
  map.block = block;
  return map;
}

// The lr the kernel reads from memory (a 1-element fp32 or fp64 tensor on the params' device), or nullptr.
inline const void* lr_pointer(const std::optional<at::Tensor>& lr_tensor, const at::Device& device, bool* is_double,
                              const char* op) {
  *is_double = false;
  if (!lr_tensor) return nullptr;
  const at::Tensor& t = *lr_tensor;
  TORCH_CHECK(t.numel() == 1 && (t.scalar_type() == at::kFloat || t.scalar_type() == at::kDouble) &&
                  t.device() == device,
              op, ": lr_tensor must be a 1-element float32 or float64 tensor on ", device, ", got ", t.scalar_type(),
              " with ", t.numel(), " elements on ", t.device());
  *is_double = t.scalar_type() == at::kDouble;
  return t.data_ptr();
}

// Checks every argument of fused_optim::adam_ and fills the launch. `host_tables`: see check_block_map.
inline AdamLaunch make_adam_launch(at::TensorList params, at::TensorList grads, at::TensorList exp_avgs,
                                   at::TensorList exp_avg_sqs, at::TensorList max_exp_avg_sqs,
                                   at::TensorList master_params, at::TensorList steps, at::TensorList tables,
                                   const at::Tensor& numels, const at::Tensor& block_tensor,
                                   const at::Tensor& block_start, const at::Tensor& arrivals, int64_t block, double lr,
                                   const std::optional<at::Tensor>& lr_tensor, double beta1, double beta2, double eps,
                                   double weight_decay, bool amsgrad, bool maximize, bool decoupled,
                                   const std::optional<at::Tensor>& grad_scale,
                                   const std::optional<at::Tensor>& found_inf, bool host_tables) {
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(n > 0, "fused_optim::adam_: params is empty");
  const at::Device device = params[0].device();
  const bool master = !master_params.empty();

  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, "fused_optim::adam_: grads has ", grads.size(),
              " tensors but params has ", n, "; pass one per param");
  AdamLaunch l{};
  l.param_dtype = dtype_of(params[0], "params", 0);
  l.grad_dtype = dtype_of(grads[0], "grads", 0);
  TORCH_CHECK(!master || l.param_dtype != DType::kFloat32,
              "fused_optim::adam_: master_params were given for float32 params; master weights are fp32 copies of "
              "bfloat16/float16 params (pass an empty list)");
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(),
              "fused_optim::adam_: max_exp_avg_sqs were given with amsgrad=False; pass an empty list");

  check_list(params, "params", n, device, params[0].scalar_type(), params, false);
  check_list(grads, "grads", n, device, grads[0].scalar_type(), params, false);
  check_list(exp_avgs, "exp_avgs", n, device, at::kFloat, params, false);
  check_list(exp_avg_sqs, "exp_avg_sqs", n, device, at::kFloat, params, false);
  if (amsgrad) check_list(max_exp_avg_sqs, "max_exp_avg_sqs", n, device, at::kFloat, params, false);
  if (master) check_list(master_params, "master_params", n, device, at::kFloat, params, false);
  check_list(steps, "steps", n, device, at::kFloat, params, true);

  const at::TensorList lists[] = {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps};
  l.map = check_block_map("fused_optim::adam_", kAdamOperands.data(), lists, kAdamOperands.size(), tables, numels,
                          block_tensor, block_start, arrivals, block, params, host_tables);

  AdamArgs& a = l.args;
  a.param = tables[0].data_ptr<int64_t>();
  a.grad = tables[1].data_ptr<int64_t>();
  a.exp_avg = tables[2].data_ptr<int64_t>();
  a.exp_avg_sq = tables[3].data_ptr<int64_t>();
  a.max_exp_avg_sq = tables[4].data_ptr<int64_t>();
  a.master_param = tables[5].data_ptr<int64_t>();
  a.step = tables[6].data_ptr<int64_t>();
  a.lr = lr;
  a.lr_ptr = lr_pointer(lr_tensor, device, &a.lr_is_double, "fused_optim::adam_");
  a.beta1 = beta1;
  a.beta2 = beta2;
  a.eps = eps;
  a.weight_decay = weight_decay;
  a.grad_scale = scalar_ptr(grad_scale, "grad_scale", device);
  a.found_inf = scalar_ptr(found_inf, "found_inf", device);

  l.amsgrad = amsgrad;
  l.maximize = maximize;
  l.decoupled = decoupled;
  l.master = master;
  l.unscale = grad_scale.has_value();
  return l;
}

}  // namespace fused_optim
