// Adam / AdamW CPU loops for float params (see adam_cpu.h).
#include "adam_cpu.h"

namespace fused_optim {
template void adam_cpu_for<float>(const AdamLaunch&, cpu::Isa);
}  // namespace fused_optim
