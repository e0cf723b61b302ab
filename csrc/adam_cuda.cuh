// Adam / AdamW on the CUDA engine for one param dtype P: the grad-dtype and flag dispatch. Each adam_cuda_<P>.cu
// instantiates it for one P, so that the 80 kernels of each param dtype compile in parallel (adam_cuda.cu picks).
#pragma once

#include <type_traits>

#include "adam_rule.h"
#include "launch.h"
#include "multi_tensor.cuh"

namespace fused_optim {

template <typename P>
const char* adam_cuda_for(const AdamLaunch& l, cudaStream_t stream) {
  const char* error = nullptr;
  dispatch_dtype(l.grad_dtype, [&](auto g_tag) {
    using G = typename decltype(g_tag)::type;
    dispatch_flags(
        [&](auto amsgrad, auto maximize, auto decoupled, auto master, auto unscale) {
          if constexpr (decltype(master)::value && std::is_same_v<P, float>) {
            error = "fused_optim: master weights are for bf16/fp16 params, not float32";
          } else {
            using Rule = AdamRule<P, G, decltype(amsgrad)::value, decltype(maximize)::value, decltype(decoupled)::value,
                                  decltype(master)::value, decltype(unscale)::value>;
            error = cuda::launch<Rule>(l.args, l.map, stream);
          }
        },
        l.amsgrad, l.maximize, l.decoupled, l.master, l.unscale);
  });
  return error;
}

extern template const char* adam_cuda_for<float>(const AdamLaunch&, cudaStream_t);
extern template const char* adam_cuda_for<fp16_t>(const AdamLaunch&, cudaStream_t);
extern template const char* adam_cuda_for<bf16_t>(const AdamLaunch&, cudaStream_t);

}  // namespace fused_optim
