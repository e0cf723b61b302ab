// Adam / AdamW on the CUDA engine: the param-dtype dispatch of the CUDA launch (csrc/launch.h); the kernels of each
// param dtype are compiled in adam_cuda_<dtype>.cu. Plain CUDA, no ATen: the binding is ops_cuda.cpp.
#include "adam_cuda.cuh"

namespace fused_optim {

const char* adam_cuda(const AdamLaunch& l, void* stream) {
  const char* error = nullptr;
  dispatch_dtype(l.param_dtype, [&](auto p_tag) {
    error = adam_cuda_for<typename decltype(p_tag)::type>(l, static_cast<cudaStream_t>(stream));
  });
  return error;
}

}  // namespace fused_optim
