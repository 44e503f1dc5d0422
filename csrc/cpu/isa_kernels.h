// Every CPU kernel, compiled once per ISA: kernels.cpp includes this file three times,
// in the namespaces baseline, avx2 and avx512 (see there). One file per op, each written
// on the toolkit of simd.h, then the entry points of kernels.h's KernelTable. No include
// guard and no includes of system headers on purpose: see kernels.cpp.
#include "simd.h"

#include "apply_residual.h"
#include "store_residual.h"
#include "trajectory_stats.h"
#include "rel_l1.h"
#include "token_update.h"

// The entry point `name` of each op's kernel `name##_t<T>`: one switch on the dtype per
// range; the loops are specialised per type.
#define OMNICACHE_CPU_ENTRY(name, Args, ...)                                  \
  void name(const Args& a, int64_t begin, int64_t end __VA_OPT__(, ) __VA_ARGS__) { \
    switch (a.dtype) {                                                        \
      case DType::F32: return name##_t<float>(a, begin, end __VA_OPT__(, partials)); \
      case DType::F16: return name##_t<F16>(a, begin, end __VA_OPT__(, partials)); \
      case DType::BF16: return name##_t<BF16>(a, begin, end __VA_OPT__(, partials)); \
    }                                                                         \
  }

OMNICACHE_CPU_ENTRY(apply_residual, ApplyArgs)
OMNICACHE_CPU_ENTRY(store_residual, ReduceArgs, float* partials)
OMNICACHE_CPU_ENTRY(trajectory_stats, ReduceArgs, float* partials)
OMNICACHE_CPU_ENTRY(rel_l1, ReduceArgs, float* partials)
OMNICACHE_CPU_ENTRY(token_update, TokenArgs)
#undef OMNICACHE_CPU_ENTRY
#undef OMNICACHE_INLINE
