// CUDA kernel of store_residual_: its op (elementwise writes, 4 statistics) on the chunk
// skeleton of chunk_kernel.cuh, and its launcher. API and exact formula: kernels.h.
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace omnicache::cuda {
namespace {

#include "element_access.cuh"  // element types, dtype dispatch, 16-byte vector access
#include "chunk_kernel.cuh"     // the chunk skeleton and the two-stage reduction

// new = out (- inp); d = new - old; cache = new; delta = d; delta2 = d - delta_old.
// in: out[, inp], cache(old)[, delta(old)]   out: cache, delta[, delta2]
template <bool kInp, bool kDelta2>
struct StoreResidualOp {
  static constexpr int kIn = 2 + kInp + kDelta2;
  static constexpr int kOut = 2 + kDelta2;
  static constexpr int kStats = kStoreResidualStats;

  __device__ __forceinline__ StoreResidualOp for_sample(int64_t) const { return *this; }
  __device__ __forceinline__ void operator()(const float* x, float* y, float* acc, int64_t) const {
    const float fresh = kInp ? __fsub_rn(x[0], x[1]) : x[0];
    const float old = x[kInp ? 2 : 1];
    const float d = __fsub_rn(fresh, old);
    y[0] = fresh;
    y[1] = d;
    if constexpr (kDelta2) y[2] = __fsub_rn(d, x[kInp ? 3 : 2]);
    acc[0] = __fadd_rn(acc[0], fabsf(d));
    acc[1] = __fadd_rn(acc[1], fabsf(old));
    acc[2] = __fmaf_rn(d, d, acc[2]);
    acc[3] = __fmaf_rn(old, old, acc[3]);
  }
};

}  // namespace

cudaError_t store_residual(void* cache, void* delta, void* delta2, const void* out,
                           const void* inp, int64_t batch, int64_t per_sample, DType dtype,
                           float* stats, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream) {
  bool done = false;
  const cudaError_t err =
      reduction_prologue(batch, per_sample, kStoreResidualStats, stats, stream, &done);
  if (done) return err;
  if (cache == nullptr || out == nullptr) return cudaErrorInvalidValue;
  if (delta2 != nullptr && delta == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    T* c = static_cast<T*>(cache);
    T* d1 = static_cast<T*>(delta);
    return with_flags(
        [&](auto has_inp, auto has_delta2) -> cudaError_t {
          constexpr bool kInp = decltype(has_inp)::value, kDelta2 = decltype(has_delta2)::value;
          using Op = StoreResidualOp<kInp, kDelta2>;
          Operands<T, Op::kIn, Op::kOut> p{};
          p.in[0] = static_cast<const T*>(out);
          if constexpr (kInp) p.in[1] = static_cast<const T*>(inp);
          p.in[kInp ? 2 : 1] = c;
          if constexpr (kDelta2) p.in[kInp ? 3 : 2] = d1;
          p.out[0] = c;
          p.out[1] = d1;
          if constexpr (kDelta2) p.out[2] = static_cast<T*>(delta2);
          return launch<T>(Op{}, p, batch, per_sample, stats, workspace, workspace_bytes, stream);
        },
        inp != nullptr, delta2 != nullptr);
  });
}

}  // namespace omnicache::cuda
