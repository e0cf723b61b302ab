// Adafactor on the CPU engine: the launches of one step (csrc/adafactor_launch.h). Passes 1 and 3 are compiled per
// param dtype in adafactor_cpu_<dtype>.cpp; the statistics, pass 2 (which does not touch the param) and the
// segment sums are here.
#include "adafactor_cpu.h"

namespace fused_optim {

void adafactor_cpu(const AdafactorLaunch& l) {
  const cpu::Isa isa = cpu::active_isa();
  switch (l.pass) {
    case AdafactorPass::kPass1:
    case AdafactorPass::kPass3:
      dispatch_dtype(l.param_dtype, [&](auto p_tag) { adafactor_cpu_for<typename decltype(p_tag)::type>(l, isa); });
      break;
    case AdafactorPass::kStatistics:
      cpu::launch_entries<AdafactorStatistics>(l.args, l.n_entries, l.map.n_tensors, AtenParallelFor{});
      break;
    case AdafactorPass::kPass2:
      dispatch_dtype(l.grad_dtype, [&](auto g_tag) {
        dispatch_flags(
            [&](auto unscale) {
              using Rule = AdafactorPass2<typename decltype(g_tag)::type, decltype(unscale)::value>;
              cpu::launch_tiles<Rule>(l.args, l.map, isa, AtenParallelFor{});
            },
            l.unscale);
      });
      break;
  }
}

void segment_sums_cpu(const float* partials, const int64_t* seg_start, float* out, int64_t n_segments) {
  cpu::segment_sums(partials, seg_start, out, n_segments, AtenParallelFor{});
}

}  // namespace fused_optim
