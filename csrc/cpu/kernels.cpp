// Compiles the CPU kernels (isa_kernels.h: simd.h and one file per op) three times, for
// the baseline ISA, for AVX2+FMA+F16C and for AVX-512, and picks the table once from what
// the CPU supports. The lanes and chunks are the same in all three, so the choice changes
// speed, not the bits of any result.
#include "kernels.h"

#include <algorithm>
#include <cmath>
#include <cstdlib>
#include <cstring>
#include <string>

#if defined(__x86_64__) && defined(__GNUC__)
#include <immintrin.h>
#define OMNICACHE_X86_TABLES 1
#endif

// 64-byte vectors are passed between always-inline helpers only: no ABI crosses here.
#pragma GCC diagnostic ignored "-Wpsabi"
// GCC 12's _mm512_cvtps_ph starts from an undefined register (a false positive).
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"

namespace omnicache::cpu {

namespace baseline {
#include "isa_kernels.h"
}  // namespace baseline

#ifdef OMNICACHE_X86_TABLES
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
#define OMNICACHE_F16C_256 1
namespace avx2 {
#include "isa_kernels.h"
}  // namespace avx2
#undef OMNICACHE_F16C_256
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c")
#define OMNICACHE_F16C_512 1
namespace avx512 {
#include "isa_kernels.h"
}  // namespace avx512
#undef OMNICACHE_F16C_512
#pragma GCC pop_options
#endif

// OMNICACHE_CPU_ISA=baseline|avx2 caps the choice (tests compare the tables' bits).
const KernelTable& kernels() {
  static const KernelTable table = [] {
#ifdef OMNICACHE_X86_TABLES
    const char* cap_env = std::getenv("OMNICACHE_CPU_ISA");
    const std::string cap = cap_env == nullptr ? "" : cap_env;
    __builtin_cpu_init();
    if (cap != "baseline" && cap != "avx2" && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
        __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq")) {
      return KernelTable{"avx512", avx512::apply_residual, avx512::store_residual,
                         avx512::trajectory_stats, avx512::rel_l1, avx512::token_update};
    }
    if (cap != "baseline" && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") &&
        __builtin_cpu_supports("f16c")) {
      return KernelTable{"avx2", avx2::apply_residual, avx2::store_residual,
                         avx2::trajectory_stats, avx2::rel_l1, avx2::token_update};
    }
#endif
    return KernelTable{"baseline", baseline::apply_residual, baseline::store_residual,
                       baseline::trajectory_stats, baseline::rel_l1, baseline::token_update};
  }();
  return table;
}

}  // namespace omnicache::cpu
