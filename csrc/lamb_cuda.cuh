// LAMB on the CUDA engine for one param dtype P: the grad-dtype, phase and flag dispatch. Each lamb_cuda_<P>.cu
// instantiates it for one P, so that the kernels of each param dtype compile in parallel (lamb_cuda.cu picks).
// Kernels per param dtype: 2 passes x 3 grad dtypes x unscale x master (bf16/fp16) + kApply x master.
#pragma once

#include <type_traits>

#include "lamb_rule.h"
#include "launch.h"
#include "multi_tensor.cuh"

namespace fused_optim {

template <typename P>
const char* lamb_cuda_for(const LambLaunch& l, cudaStream_t stream) {
  const char* error = nullptr;
  auto run = [&](auto g_tag, auto phase, auto master, auto unscale) {
    using G = typename decltype(g_tag)::type;
    if constexpr (decltype(master)::value && std::is_same_v<P, float>) {
      error = "fused_optim: master weights are for bf16/fp16 params, not float32";
    } else {
      using Rule = LambRule<P, G, decltype(phase)::value, decltype(master)::value, decltype(unscale)::value>;
      error = cuda::launch<Rule>(l.args, l.map, stream, l.partials);
    }
  };
  using Norms = std::integral_constant<int, kLambNorms>;
  using Fused = std::integral_constant<int, kLambFused>;
  if (l.phase == kLambApply) {  // reads no grad, unscales nothing: one kernel per (P, master)
    dispatch_flags([&](auto master) { run(TypeTag<P>{}, std::integral_constant<int, kLambApply>{}, master,
                                          std::false_type{}); }, l.master);
    return error;
  }
  dispatch_dtype(l.grad_dtype, [&](auto g_tag) {
    dispatch_flags(
        [&](auto fused, auto master, auto unscale) {
          if constexpr (decltype(fused)::value) {
            run(g_tag, Fused{}, master, unscale);
          } else {
            run(g_tag, Norms{}, master, unscale);
          }
        },
        l.phase == kLambFused, l.master, l.unscale);
  });
  return error;
}

extern template const char* lamb_cuda_for<float>(const LambLaunch&, cudaStream_t);
extern template const char* lamb_cuda_for<fp16_t>(const LambLaunch&, cudaStream_t);
extern template const char* lamb_cuda_for<bf16_t>(const LambLaunch&, cudaStream_t);

}  // namespace fused_optim
