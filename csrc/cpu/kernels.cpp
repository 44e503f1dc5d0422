// Compiles kernels_impl.h twice, for the baseline ISA and for AVX2+FMA, and
// picks the table once from what the CPU supports. The lanes and chunks are the
// same in both, so the choice changes speed, not the order of the sums.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstring>

namespace omnicache::cpu {

namespace baseline {
#include "kernels_impl.h"
}  // namespace baseline

#if defined(__x86_64__) && defined(__GNUC__)
#pragma GCC push_options
#pragma GCC target("avx2,fma")
namespace avx2 {
#include "kernels_impl.h"
}  // namespace avx2
#pragma GCC pop_options
#define OMNICACHE_HAVE_AVX2_TABLE 1
#endif

const KernelTable& kernels() {
  static const KernelTable table = [] {
#ifdef OMNICACHE_HAVE_AVX2_TABLE
    __builtin_cpu_init();
    if (__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma")) {
      return KernelTable{"avx2", avx2::apply_residual, avx2::store_residual,
                         avx2::trajectory_stats, avx2::rel_l1};
    }
#endif
    return KernelTable{"baseline", baseline::apply_residual, baseline::store_residual,
                       baseline::trajectory_stats, baseline::rel_l1};
  }();
  return table;
}

}  // namespace omnicache::cpu
