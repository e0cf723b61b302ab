// Adam / AdamW on the CPU engine for one param dtype P: the grad-dtype and flag dispatch. Each adam_cpu_<P>.cpp
// instantiates it for one P, so that the variants of each param dtype compile in parallel (adam_cpu.cpp picks).
#pragma once

#include <ATen/Parallel.h>

#include <stdexcept>
#include <type_traits>

#include "../adam_rule.h"
#include "../launch.h"
#include "multi_tensor_cpu.h"

namespace fused_optim {

template <typename P>
void adam_cpu_for(const AdamLaunch& l, cpu::Isa isa) {
  auto parallel_for = [](int64_t begin, int64_t end, int64_t grain, const auto& fn) {
    at::parallel_for(begin, end, grain, fn);
  };
  dispatch_dtype(l.grad_dtype, [&](auto g_tag) {
    using G = typename decltype(g_tag)::type;
    dispatch_flags(
        [&](auto amsgrad, auto maximize, auto decoupled, auto master, auto unscale) {
          if constexpr (decltype(master)::value && std::is_same_v<P, float>) {
            throw std::invalid_argument("fused_optim: master weights are for bf16/fp16 params, not float32");
          } else {
            using Rule = AdamRule<P, G, decltype(amsgrad)::value, decltype(maximize)::value, decltype(decoupled)::value,
                                  decltype(master)::value, decltype(unscale)::value>;
            cpu::launch<Rule>(l.args, l.map, isa, parallel_for);
          }
        },
        l.amsgrad, l.maximize, l.decoupled, l.master, l.unscale);
  });
}

extern template void adam_cpu_for<float>(const AdamLaunch&, cpu::Isa);
extern template void adam_cpu_for<fp16_t>(const AdamLaunch&, cpu::Isa);
extern template void adam_cpu_for<bf16_t>(const AdamLaunch&, cpu::Isa);

}  // namespace fused_optim
