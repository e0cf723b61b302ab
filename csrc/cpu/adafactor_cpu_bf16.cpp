// Adafactor CPU passes 1 and 3 for bf16_t params (see adafactor_cpu.h).
#include "adafactor_cpu.h"

namespace fused_optim {
template void adafactor_cpu_for<bf16_t>(const AdafactorLaunch&, cpu::Isa);
}  // namespace fused_optim
