// Adam / AdamW CPU loops for bf16_t params (see adam_cpu.h).
#include "adam_cpu.h"

namespace fused_optim {
template void adam_cpu_for<bf16_t>(const AdamLaunch&, cpu::Isa);
}  // namespace fused_optim
