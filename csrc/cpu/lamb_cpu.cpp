// LAMB on the CPU engine: the param-dtype dispatch of a LAMB pass (the loops of each param dtype are compiled in
// lamb_cpu_<dtype>.cpp), the grad pass of the global gradient norm, and segment_sum (csrc/launch.h).
#include "lamb_cpu.h"

namespace fused_optim {

void lamb_cpu(const LambLaunch& l) {
  const cpu::Isa isa = cpu::active_isa();
  dispatch_dtype(l.param_dtype, [&](auto p_tag) { lamb_cpu_for<typename decltype(p_tag)::type>(l, isa); });
}

void grad_sq_cpu(const GradSqLaunch& l) {
  const cpu::Isa isa = cpu::active_isa();
  dispatch_dtype(l.grad_dtype, [&](auto g_tag) {
    dispatch_flags(
        [&](auto unscale) {
          using Rule = GradSqRule<typename decltype(g_tag)::type, decltype(unscale)::value>;
          cpu::launch<Rule>(l.args, l.map, isa, AtenParallelFor{}, l.partials);
        },
        l.unscale);
  });
}

void segment_sum_cpu(const SegmentSumLaunch& l) {
  if (l.seg_int64) {
    cpu::segment_sum(l.partials, l.n_quantities, l.n_partials, static_cast<const int64_t*>(l.seg_start), l.n_segments,
                     l.out, AtenParallelFor{});
  } else {
    cpu::segment_sum(l.partials, l.n_quantities, l.n_partials, static_cast<const int32_t*>(l.seg_start), l.n_segments,
                     l.out, AtenParallelFor{});
  }
}

}  // namespace fused_optim
