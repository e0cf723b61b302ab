// Adafactor on the CUDA engine for one param dtype P: the grad-dtype and flag dispatch of passes 1 and 3 (the
// passes that read or write the param). Each adafactor_cuda_<P>.cu instantiates it for one P, so that the kernels
// of each param dtype compile in parallel (adafactor_cuda.cu picks, and launches the statistics and pass 2 itself).
#pragma once

#include <type_traits>

#include "adafactor_launch.h"
#include "adafactor_rule.h"
#include "tile_map.cuh"

namespace fused_optim {

template <typename P>
const char* adafactor_cuda_for(const AdafactorLaunch& l, cudaStream_t stream) {
  const char* error = nullptr;
  dispatch_dtype(l.grad_dtype, [&](auto g_tag) {
    using G = typename decltype(g_tag)::type;
    dispatch_flags(
        [&](auto master, auto unscale, auto momentum) {
          if constexpr (decltype(master)::value && std::is_same_v<P, float>) {
            error = "fused_optim: master weights are for bf16/fp16 params, not float32";
          } else if (l.pass == AdafactorPass::kPass1) {
            if constexpr (!decltype(momentum)::value) {  // pass 1 does not read the momentum
              using Rule = AdafactorPass1<P, G, decltype(master)::value, decltype(unscale)::value>;
              error = cuda::launch_tiles<Rule>(l.args, l.map, stream);
            }
          } else {
            using Rule = AdafactorPass3<P, G, decltype(master)::value, decltype(unscale)::value,
                                        decltype(momentum)::value>;
            error = cuda::launch_tiles<Rule>(l.args, l.map, stream);
          }
        },
        l.master, l.unscale, l.pass == AdafactorPass::kPass3 && l.momentum);
  });
  return error;
}

extern template const char* adafactor_cuda_for<float>(const AdafactorLaunch&, cudaStream_t);
extern template const char* adafactor_cuda_for<fp16_t>(const AdafactorLaunch&, cudaStream_t);
extern template const char* adafactor_cuda_for<bf16_t>(const AdafactorLaunch&, cudaStream_t);

}  // namespace fused_optim
