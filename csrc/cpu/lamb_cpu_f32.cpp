// LAMB CPU loops for float params (see lamb_cpu.h).
#include "lamb_cpu.h"

namespace fused_optim {
template void lamb_cpu_for<float>(const LambLaunch&, cpu::Isa);
}  // namespace fused_optim
