// LAMB on the CUDA engine: the param-dtype dispatch of a LAMB pass (the kernels of each param dtype are compiled in
// lamb_cuda_<dtype>.cu), the grad pass of the global gradient norm, and segment_sum (csrc/launch.h). Plain CUDA,
// no ATen: the binding is ops_lamb_cuda.cpp.
#include "lamb_cuda.cuh"

namespace fused_optim {

const char* lamb_cuda(const LambLaunch& l, void* stream) {
  const char* error = nullptr;
  dispatch_dtype(l.param_dtype, [&](auto p_tag) {
    error = lamb_cuda_for<typename decltype(p_tag)::type>(l, static_cast<cudaStream_t>(stream));
  });
  return error;
}

const char* grad_sq_cuda(const GradSqLaunch& l, void* stream) {
  const char* error = nullptr;
  dispatch_dtype(l.grad_dtype, [&](auto g_tag) {
    dispatch_flags(
        [&](auto unscale) {
          using Rule = GradSqRule<typename decltype(g_tag)::type, decltype(unscale)::value>;
          error = cuda::launch<Rule>(l.args, l.map, static_cast<cudaStream_t>(stream), l.partials);
        },
        l.unscale);
  });
  return error;
}

const char* segment_sum_cuda(const SegmentSumLaunch& l, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  if (l.seg_int64) {
    return cuda::segment_sum(l.partials, l.n_quantities, l.n_partials, static_cast<const int64_t*>(l.seg_start),
                             l.n_segments, l.out, s);
  }
  return cuda::segment_sum(l.partials, l.n_quantities, l.n_partials, static_cast<const int32_t*>(l.seg_start),
                           l.n_segments, l.out, s);
}

}  // namespace fused_optim
