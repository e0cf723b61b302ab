// The binding layer shared by the CPU (ops.cpp, ops_lamb.cpp) and CUDA (ops_cuda.cpp, ops_lamb_cuda.cpp)
// implementations of the operators: checks the arguments and turns ATen tensors into the plain launch structs of
// launch.h. Every check names the operator (`op`) in its message.
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Optional.h>

#include <array>
#include <initializer_list>
#include <optional>
#include <string>

#include "launch.h"
#include "layout.h"

namespace fused_optim {

// The operand tables of fused_optim::adam_, in the order of fused_optim.native.ADAM_OPERANDS.
constexpr std::array<const char*, 7> kAdamOperands = {"param",          "grad",         "exp_avg", "exp_avg_sq",
                                                      "max_exp_avg_sq", "master_param", "step"};

inline DType dtype_from(at::ScalarType s, const char* what, const char* op) {
  switch (s) {
    case at::kFloat:
      return DType::kFloat32;
    case at::kHalf:
      return DType::kFloat16;
    case at::kBFloat16:
      return DType::kBFloat16;
    default:
      TORCH_CHECK(false, op, ": ", what, " has dtype ", s,
                  "; the native kernels support float32, float16 and bfloat16 (use backend='reference' for others)");
  }
}

inline DType dtype_of(const at::Tensor& t, const char* what, int64_t i, const char* op = "fused_optim::adam_") {
  return dtype_from(t.scalar_type(), (std::string(what) + "[" + std::to_string(i) + "]").c_str(), op);
}

// Table-only launches. The optimizer's step plan (fused_optim/optimizer.py, _planned_buckets) checks at every step
// that each tensor of a launch group still has the dtype, contiguity, size and address its cached table holds; it
// then passes every tensor list of adam_ / lamb_ (and of Adafactor's passes, adafactor_ops.h) empty and states the
// dtypes instead (`param_dtype`, `grad_dtype`, `master`; grad_sq_ takes `grad_dtype` alone, ops_lamb.h), and the
// operator reads the tables alone: converting 1,000-tensor lists into operator arguments cost about 0.1 us per
// tensor, about 0.5 ms per launch of five such lists (measured on CPU). The operator then checks the tables and the
// block map only (on CPU the block map's entries too); the tensors' checks are the caller's.
struct TablesOnly {
  std::optional<at::ScalarType> param_dtype;  // set: a table-only launch
  std::optional<at::ScalarType> grad_dtype;
  bool master = false;
};

// What a launch updates: its tensor count, device, dtypes and whether it has master weights; from the tensor lists,
// or for a table-only launch from the caller's statement and the tables.
struct LaunchGroup {
  int64_t n;
  at::Device device;
  DType param_dtype;
  DType grad_dtype;
  bool master;
  bool tables_only;
};

// A table-only launch (`flag`: the argument that made it one) takes every tensor list in `lists` and `more` empty, and
// its tables (`table_n` tensors) hold at least one tensor. Every table-only operator checks this here: adam_, lamb_
// and Adafactor's passes 1 and 3 (launch_group), Adafactor's pass 2 and statistics (adafactor_ops.h, launch_size) and
// grad_sq_ (ops_lamb.h).
inline void check_table_only_lists(const char* op, const char* flag, int64_t table_n,
                                   std::initializer_list<at::TensorList> lists,
                                   std::initializer_list<at::TensorList> more = {}) {
  bool empty = true;
  for (const at::TensorList& list : lists) empty = empty && list.empty();
  for (const at::TensorList& list : more) empty = empty && list.empty();
  TORCH_CHECK(empty, op, ": a table-only launch (", flag, ") takes every tensor list empty; its tables are its "
              "operands");
  TORCH_CHECK(table_n > 0, op, ": a table-only launch of no tensors (its tables are empty)");
}

// `table_n`, `table_device`: the tensor count and device of the launch's tables (adam_/lamb_: `numels`; the Adafactor
// passes: `meta`), which a table-only launch takes as its own. Master weights are checked here for every rule: they
// are fp32 copies of bf16/fp16 params, so fp32 params with master weights are refused.
inline LaunchGroup launch_group(const char* op, const TablesOnly& only, at::TensorList params, at::TensorList grads,
                                at::TensorList master_params, std::initializer_list<at::TensorList> others,
                                int64_t table_n, const at::Device& table_device) {
  if (only.param_dtype) {
    TORCH_CHECK(only.grad_dtype.has_value(), op, ": param_dtype without grad_dtype; a table-only launch states both");
    check_table_only_lists(op, "param_dtype given", table_n, {params, grads, master_params}, others);
    const DType param_dtype = dtype_from(*only.param_dtype, "param_dtype", op);
    TORCH_CHECK(!only.master || param_dtype != DType::kFloat32, op,
                ": master=True was given for float32 params; master weights are fp32 copies of bfloat16/float16 "
                "params (pass master=False)");
    return {table_n, table_device, param_dtype, dtype_from(*only.grad_dtype, "grad_dtype", op), only.master, true};
  }
  TORCH_CHECK(!only.grad_dtype && !only.master, op,
              ": grad_dtype and master describe a table-only launch; pass them with param_dtype, or pass the lists");
  const int64_t n = static_cast<int64_t>(params.size());
  TORCH_CHECK(n > 0, op, ": params is empty");
  TORCH_CHECK(static_cast<int64_t>(grads.size()) == n, op, ": grads has ", grads.size(), " tensors but params has ", n,
              "; pass one per param");
  const DType param_dtype = dtype_of(params[0], "params", 0, op);
  TORCH_CHECK(master_params.empty() || param_dtype != DType::kFloat32, op,
              ": master_params were given for float32 params; master weights are fp32 copies of bfloat16/float16 "
              "params (pass an empty list)");
  return {n, params[0].device(), param_dtype, dtype_of(grads[0], "grads", 0, op), !master_params.empty(), false};
}

// Checks one tensor list of the launch: length, device, dtype, that every tensor has the numel of its param
// (`scalar`: one element, for the step tensors), and the layout: dense, and laid out like its param (layout.h).
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
    if (scalar) {
      TORCH_CHECK(t.numel() == 1, op, ": ", what, "[", i, "] must be a 1-element step tensor, has ",
                  t.numel(), " elements");
    } else {
      TORCH_CHECK(t.numel() == params[i].numel(), op, ": ", what, "[", i, "] has ", t.numel(),
                  " elements but params[", i, "] has ", params[i].numel());
      // The kernels walk each tensor's memory flat and pair a param's tensors element by element (layout.h).
      TORCH_CHECK(t.is_non_overlapping_and_dense(), op, ": ", what, "[", i,
                  "] has gaps or overlaps in memory; the native kernels update tensors that cover their memory exactly "
                  "(contiguous, or permuted like torch.channels_last): pass a tensor of its own (.clone()), or use "
                  "backend='reference'");
      TORCH_CHECK(laid_out_like(t, params[i]), op, ": ", what, "[", i, "] is laid out unlike params[", i,
                  "] (strides ", t.strides(), ", the param's ", params[i].strides(),
                  "); the kernels pair them element by element in memory: lay it out as its param "
                  "(torch.empty_like(param).copy_(t))");
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

// Checks the address tables and the block map of one launch (TensorTable) of `n` tensors on `device` and returns the
// map. `names`, `lists`: the operands in the order of the tables (an empty list: an operand the launch does not use,
// or a table-only launch). `host_tables`: the tables are host memory (CPU launch), so the addresses, sizes and block
// map can be checked against the tensors too; on CUDA that would need a device-to-host copy (a sync), so there the
// caller's TensorTable is trusted for those. `params` (empty in a table-only launch): the sizes' reference.
inline BlockMap check_block_map(const char* op, const char* const* names, const at::TensorList* lists,
                                size_t n_operands, at::TensorList tables, const at::Tensor& numels,
                                const at::Tensor& block_tensor, const at::Tensor& block_start,
                                const at::Tensor& arrivals, int64_t block, int64_t n, const at::Device& device,
                                at::TensorList params, bool host_tables) {
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
    for (int64_t i = 0; i < static_cast<int64_t>(params.size()); ++i) {
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
                                   const std::optional<at::Tensor>& found_inf, const TablesOnly& only,
                                   bool host_tables) {
  constexpr const char* op = "fused_optim::adam_";
  const LaunchGroup g = launch_group(op, only, params, grads, master_params,
                                     {exp_avgs, exp_avg_sqs, max_exp_avg_sqs, steps}, numels.numel(),
                                     numels.device());
  const int64_t n = g.n;
  const at::Device device = g.device;

  AdamLaunch l{};
  l.param_dtype = g.param_dtype;
  l.grad_dtype = g.grad_dtype;
  TORCH_CHECK(amsgrad || max_exp_avg_sqs.empty(), op, ": max_exp_avg_sqs were given with amsgrad=False; pass an "
              "empty list");

  if (!g.tables_only) {
    check_list(params, "params", n, device, params[0].scalar_type(), params, false);
    check_list(grads, "grads", n, device, grads[0].scalar_type(), params, false);
    check_list(exp_avgs, "exp_avgs", n, device, at::kFloat, params, false);
    check_list(exp_avg_sqs, "exp_avg_sqs", n, device, at::kFloat, params, false);
    if (amsgrad) check_list(max_exp_avg_sqs, "max_exp_avg_sqs", n, device, at::kFloat, params, false);
    if (g.master) check_list(master_params, "master_params", n, device, at::kFloat, params, false);
    check_list(steps, "steps", n, device, at::kFloat, params, true);
  }

  const at::TensorList lists[] = {params, grads, exp_avgs, exp_avg_sqs, max_exp_avg_sqs, master_params, steps};
  l.map = check_block_map(op, kAdamOperands.data(), lists, kAdamOperands.size(), tables, numels, block_tensor,
                          block_start, arrivals, block, n, device, params, host_tables);

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
  l.master = g.master;
  l.unscale = grad_scale.has_value();
  return l;
}

}  // namespace fused_optim
