// Adafactor CPU passes 1 and 3 for float params (see adafactor_cpu.h).
#include "adafactor_cpu.h"

namespace fused_optim {
template void adafactor_cpu_for<float>(const AdafactorLaunch&, cpu::Isa);
}  // namespace fused_optim
