// Adafactor on the CPU engine for one param dtype P: the grad-dtype and flag dispatch of passes 1 and 3 (the passes
// that read or write the param). Each adafactor_cpu_<P>.cpp instantiates it for one P, so that the variants of each
// param dtype compile in parallel (adafactor_cpu.cpp picks, and runs the statistics and pass 2 itself).
#pragma once

#include <ATen/Parallel.h>

#include <stdexcept>
#include <type_traits>

#include "../adafactor_launch.h"
#include "../adafactor_rule.h"
#include "tile_map_cpu.h"

namespace fused_optim {

// ATen's parallel_for (OpenMP in torch's builds: torch.set_num_threads applies).
struct AtenParallelFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const {
    at::parallel_for(begin, end, grain, fn);
  }
};

template <typename P>
void adafactor_cpu_for(const AdafactorLaunch& l, cpu::Isa isa) {
  dispatch_dtype(l.grad_dtype, [&](auto g_tag) {
    using G = typename decltype(g_tag)::type;
    dispatch_flags(
        [&](auto master, auto unscale, auto momentum) {
          if constexpr (decltype(master)::value && std::is_same_v<P, float>) {
            throw std::invalid_argument("fused_optim: master weights are for bf16/fp16 params, not float32");
          } else if (l.pass == AdafactorPass::kPass1) {
            if constexpr (!decltype(momentum)::value) {  // pass 1 does not read the momentum
              using Rule = AdafactorPass1<P, G, decltype(master)::value, decltype(unscale)::value>;
              cpu::launch_tiles<Rule>(l.args, l.map, isa, AtenParallelFor{});
            }
          } else {
            using Rule = AdafactorPass3<P, G, decltype(master)::value, decltype(unscale)::value,
                                        decltype(momentum)::value>;
            cpu::launch_tiles<Rule>(l.args, l.map, isa, AtenParallelFor{});
          }
        },
        l.master, l.unscale, l.pass == AdafactorPass::kPass3 && l.momentum);
  });
}

extern template void adafactor_cpu_for<float>(const AdafactorLaunch&, cpu::Isa);
extern template void adafactor_cpu_for<fp16_t>(const AdafactorLaunch&, cpu::Isa);
extern template void adafactor_cpu_for<bf16_t>(const AdafactorLaunch&, cpu::Isa);

}  // namespace fused_optim
