// Adam / AdamW on the CPU engine: the dtype and flag dispatch of the CPU launch (csrc/launch.h).
#include <ATen/Parallel.h>

#include <stdexcept>
#include <type_traits>

#include "../adam_rule.h"
#include "../launch.h"
#include "multi_tensor_cpu.h"

namespace fused_optim {

const char* adam_cpu(const AdamLaunch& l) {
  const cpu::Isa isa = cpu::active_isa();
  auto parallel_for = [](int64_t begin, int64_t end, int64_t grain, const auto& fn) {
    at::parallel_for(begin, end, grain, fn);
  };
  dispatch_dtype(l.param_dtype, [&](auto p_tag) {
    using P = typename decltype(p_tag)::type;
    dispatch_dtype(l.grad_dtype, [&](auto g_tag) {
      using G = typename decltype(g_tag)::type;
      dispatch_flags(
          [&](auto amsgrad, auto maximize, auto decoupled, auto master, auto unscale) {
            if constexpr (decltype(master)::value && std::is_same_v<P, float>) {
              throw std::invalid_argument("fused_optim: master weights are for bf16/fp16 params, not float32");
            } else {
              using Rule = AdamRule<P, G, decltype(amsgrad)::value, decltype(maximize)::value,
                                    decltype(decoupled)::value, decltype(master)::value, decltype(unscale)::value>;
              cpu::launch<Rule>(l.args, l.map, isa, parallel_for);
            }
          },
          l.amsgrad, l.maximize, l.decoupled, l.master, l.unscale);
    });
  });
  return cpu::isa_name(isa);
}

}  // namespace fused_optim
