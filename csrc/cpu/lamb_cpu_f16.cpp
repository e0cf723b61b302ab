// LAMB CPU loops for fp16_t params (see lamb_cpu.h).
#include "lamb_cpu.h"

namespace fused_optim {
template void lamb_cpu_for<fp16_t>(const LambLaunch&, cpu::Isa);
}  // namespace fused_optim
