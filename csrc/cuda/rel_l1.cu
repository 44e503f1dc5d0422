// CUDA kernel of rel_l1: its op (2 statistics) on the chunk skeleton of
// chunk_kernel.cuh, and its launcher. API and exact formula: kernels.h.
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

// |a - b|, |b|.   in: a, b
struct RelL1Op {
  static constexpr int kIn = 2;
  static constexpr int kOut = 0;
  static constexpr int kStats = kRelL1Stats;

  __device__ __forceinline__ RelL1Op for_sample(int64_t) const { return *this; }
  __device__ __forceinline__ void operator()(const float* x, float*, float* acc, int64_t) const {
    acc[0] = __fadd_rn(acc[0], fabsf(__fsub_rn(x[0], x[1])));
    acc[1] = __fadd_rn(acc[1], fabsf(x[1]));
  }
};

}  // namespace

cudaError_t rel_l1(const void* a, const void* b, int64_t batch, int64_t per_sample,
                   DType dtype, float* stats, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream) {
  bool done = false;
  const cudaError_t err = reduction_prologue(batch, per_sample, kRelL1Stats, stats, stream, &done);
  if (done) return err;
  if (a == nullptr || b == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const Operands<T, 2, 0> p{{static_cast<const T*>(a), static_cast<const T*>(b)}, {nullptr}};
    return launch<T>(RelL1Op{}, p, batch, per_sample, stats, workspace, workspace_bytes, stream);
  });
}

}  // namespace omnicache::cuda
