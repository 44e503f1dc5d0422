// CUDA kernel of trajectory_stats: its op (3 statistics) on the chunk skeleton of
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

// v1 = x_next - x; v0 = x - x_prev.   in: x_next, x, x_prev
struct TrajectoryStatsOp {
  static constexpr int kIn = 3;
  static constexpr int kOut = 0;
  static constexpr int kStats = kTrajectoryStatsStats;

  __device__ __forceinline__ TrajectoryStatsOp for_sample(int64_t) const { return *this; }
  __device__ __forceinline__ void operator()(const float* x, float*, float* acc, int64_t) const {
    const float v1 = __fsub_rn(x[0], x[1]);
    const float v0 = __fsub_rn(x[1], x[2]);
    acc[0] = __fmaf_rn(v1, v1, acc[0]);
    acc[1] = __fmaf_rn(v0, v0, acc[1]);
    acc[2] = __fmaf_rn(v1, v0, acc[2]);
  }
};

}  // namespace

cudaError_t trajectory_stats(const void* x_next, const void* x, const void* x_prev,
                             int64_t batch, int64_t per_sample, DType dtype, float* stats,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream) {
  bool done = false;
  const cudaError_t err =
      reduction_prologue(batch, per_sample, kTrajectoryStatsStats, stats, stream, &done);
  if (done) return err;
  if (x_next == nullptr || x == nullptr || x_prev == nullptr) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    const Operands<T, 3, 0> p{{static_cast<const T*>(x_next), static_cast<const T*>(x),
                               static_cast<const T*>(x_prev)},
                              {nullptr}};
    return launch<T>(TrajectoryStatsOp{}, p, batch, per_sample, stats, workspace,
                     workspace_bytes, stream);
  });
}

}  // namespace omnicache::cuda
