// Adam / AdamW on the CPU engine: the param-dtype dispatch of the CPU launch (csrc/launch.h); the loops of each
// param dtype are compiled in adam_cpu_<dtype>.cpp.
#include "adam_cpu.h"

namespace fused_optim {

void adam_cpu(const AdamLaunch& l) {
  const cpu::Isa isa = cpu::active_isa();
  dispatch_dtype(l.param_dtype, [&](auto p_tag) { adam_cpu_for<typename decltype(p_tag)::type>(l, isa); });
}

}  // namespace fused_optim
