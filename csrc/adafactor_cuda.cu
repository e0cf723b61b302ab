// Adafactor on the CUDA engine: the launches of one step (csrc/adafactor_launch.h). Passes 1 and 3 are compiled per
// param dtype in adafactor_cuda_<dtype>.cu; the statistics, pass 2 (which does not touch the param) and the segment
// sums are here. Plain CUDA, no ATen: the binding is adafactor_ops_cuda.cpp.
#include "adafactor_cuda.cuh"

namespace fused_optim {

const char* adafactor_cuda(const AdafactorLaunch& l, void* stream) {
  const cudaStream_t s = static_cast<cudaStream_t>(stream);
  const char* error = nullptr;
  switch (l.pass) {
    case AdafactorPass::kPass1:
    case AdafactorPass::kPass3:
      dispatch_dtype(l.param_dtype,
                     [&](auto p_tag) { error = adafactor_cuda_for<typename decltype(p_tag)::type>(l, s); });
      break;
    case AdafactorPass::kStatistics:
      error = cuda::launch_entries<AdafactorStatistics>(l.args, l.n_entries, s);
      break;
    case AdafactorPass::kPass2:
      dispatch_dtype(l.grad_dtype, [&](auto g_tag) {
        dispatch_flags(
            [&](auto unscale) {
              using Rule = AdafactorPass2<typename decltype(g_tag)::type, decltype(unscale)::value>;
              error = cuda::launch_tiles<Rule>(l.args, l.map, s);
            },
            l.unscale);
      });
      break;
  }
  return error;
}

const char* segment_sums_cuda(const float* partials, const int64_t* seg_start, float* out, int64_t n_segments,
                              void* stream) {
  return cuda::segment_sums(partials, seg_start, out, n_segments, static_cast<cudaStream_t>(stream));
}

}  // namespace fused_optim
