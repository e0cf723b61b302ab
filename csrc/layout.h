// Memory layouts the elementwise kernels take (Adam, LAMB; fused_optim/tables.py states the same checks in Python:
// dense, laid_out_like, laid_out).
//
// The engines walk each operand's memory flat: element k of a param's memory is updated with element k of its
// grad's and of each state tensor's. So a param can have any dense layout (contiguous, torch.channels_last, a
// transposed matrix: its numel() elements lie from data_ptr() on, with no gaps or overlaps) as long as every
// tensor paired with it keeps its elements in the same order.
#pragma once

#include <ATen/core/Tensor.h>

namespace fused_optim {

// Whether `t` keeps its elements in the order `like` does: both contiguous (in flat order, whatever their shapes), or
// the same sizes and the same strides in every dimension of more than one element (one element moves nothing).
inline bool laid_out_like(const at::Tensor& t, const at::Tensor& like) {
  if (t.is_contiguous() && like.is_contiguous()) return true;
  if (t.sizes() != like.sizes()) return false;
  for (int64_t d = 0; d < like.dim(); ++d) {
    if (like.size(d) != 1 && t.stride(d) != like.stride(d)) return false;
  }
  return true;
}

// The layout asked of a tensor `t` the kernels read with param `param`: laid out like the param when they pair the
// two element by element (`t` has the param's element count: a grad, a moment, a master weight), else contiguous (a
// step counter, a row or column statistic).
inline bool laid_out(const at::Tensor& t, const at::Tensor& param) {
  return t.numel() == param.numel() ? laid_out_like(t, param) : t.is_contiguous();
}

}  // namespace fused_optim
