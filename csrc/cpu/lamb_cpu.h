// LAMB on the CPU engine for one param dtype P: the grad-dtype, phase and flag dispatch. Each lamb_cpu_<P>.cpp
// instantiates it for one P, so that the variants of each param dtype compile in parallel (lamb_cpu.cpp picks).
#pragma once

#include <ATen/Parallel.h>

#include <stdexcept>
#include <type_traits>

#include "../lamb_rule.h"
#include "../launch.h"
#include "multi_tensor_cpu.h"

namespace fused_optim {

// ATen's parallel_for (OpenMP in torch's builds), as the engine takes it.
struct AtenParallelFor {
  template <class F>
  void operator()(int64_t begin, int64_t end, int64_t grain, const F& fn) const {
    at::parallel_for(begin, end, grain, fn);
  }
};

template <typename P>
void lamb_cpu_for(const LambLaunch& l, cpu::Isa isa) {
  auto run = [&](auto g_tag, auto phase, auto master, auto unscale) {
    using G = typename decltype(g_tag)::type;
    if constexpr (decltype(master)::value && std::is_same_v<P, float>) {
      throw std::invalid_argument("fused_optim: master weights are for bf16/fp16 params, not float32");
    } else {
      using Rule = LambRule<P, G, decltype(phase)::value, decltype(master)::value, decltype(unscale)::value>;
      cpu::launch<Rule>(l.args, l.map, isa, AtenParallelFor{}, l.partials);
    }
  };
  using Norms = std::integral_constant<int, kLambNorms>;
  using Fused = std::integral_constant<int, kLambFused>;
  if (l.phase == kLambApply) {  // reads no grad, unscales nothing: one variant per (P, master)
    dispatch_flags([&](auto master) { run(TypeTag<P>{}, std::integral_constant<int, kLambApply>{}, master,
                                          std::false_type{}); }, l.master);
    return;
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
}

extern template void lamb_cpu_for<float>(const LambLaunch&, cpu::Isa);
extern template void lamb_cpu_for<fp16_t>(const LambLaunch&, cpu::Isa);
extern template void lamb_cpu_for<bf16_t>(const LambLaunch&, cpu::Isa);

}  // namespace fused_optim
