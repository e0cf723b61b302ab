// Adafactor CPU passes 1 and 3 for fp16_t params (see adafactor_cpu.h).
#include "adafactor_cpu.h"

namespace fused_optim {
template void adafactor_cpu_for<fp16_t>(const AdafactorLaunch&, cpu::Isa);
}  // namespace fused_optim
