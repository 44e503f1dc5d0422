// CUDA kernels of the omnicache ops: a framework-free launcher API.
//
// Pointers are device pointers to contiguous [batch, per_sample] data (dim 0 is the
// batch B, N = per_sample elements per sample; sample b spans [b*N, (b+1)*N)). Every
// tensor argument of one call has the same element type `dtype`; arithmetic and
// accumulation are float32; float -> half/bfloat16 rounds to nearest even. Launchers
// are asynchronous on `stream`, never synchronise with the host, allocate nothing
// (reductions take a caller-allocated workspace) and are CUDA-graph capturable. They
// return cudaErrorInvalidValue for bad arguments and otherwise cudaGetLastError().
// batch == 0 or per_sample == 0 is a no-op (reductions then write zeros to `stats`).
//
// Reductions are deterministic: each thread block reduces a fixed chunk of
// kChunkElements elements of one sample in a fixed order into a float32 partial
// (stage 1); a second kernel sums each sample's partials in a fixed order (stage 2).
// No float atomics; the chunk size does not depend on the device, so the same inputs
// give bitwise-equal statistics on every call and every GPU, whatever their alignment.
//
// Semantics: omnicache/reference.py. Torch glue: csrc/cuda/ops_cuda.cpp.
#pragma once

#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>

namespace omnicache::cuda {

enum class DType : int { F32 = 0, F16 = 1, BF16 = 2 };

// Elements of one sample handled by one thread block, in every op. A multiple of
// 256 threads x 8 elements (one 16-byte vector of half/bf16 per thread).
inline constexpr int64_t kChunkElements = 8192;

// Statistics per sample returned by each reduction ([batch, k] float32).
inline constexpr int kStoreResidualStats = 4;
inline constexpr int kTrajectoryStatsStats = 3;
inline constexpr int kRelL1Stats = 2;

// Number of stage-1 chunks of one sample: ceil(per_sample / kChunkElements).
inline int64_t chunks_per_sample(int64_t per_sample) {
  return (per_sample + kChunkElements - 1) / kChunkElements;
}

// Bytes of workspace a reduction with `num_stats` statistics needs for these sizes:
// batch * chunks_per_sample(per_sample) * num_stats floats, or 0 when a sample fits in
// one chunk (stage 1 then writes `stats` directly and no stage 2 runs).
inline size_t reduction_workspace_bytes(int64_t batch, int64_t per_sample, int num_stats) {
  const int64_t chunks = chunks_per_sample(per_sample);
  if (batch <= 0 || chunks <= 1) return 0;
  return static_cast<size_t>(batch) * static_cast<size_t>(chunks) *
         static_cast<size_t>(num_stats) * sizeof(float);
}

// In-place residual application.
//
//     hidden[b, i] = round(hidden[b, i] + residual[b, i] + g[b] * correction[b, i])
//
// with g[b] = gamma[b] if gamma_per_sample, gamma[0] if gamma is a scalar, 1 if gamma
// is null; the correction term is dropped when correction is null. Sums in float32
// (h + r first, then fmaf(g, c, h + r)), one rounding to `dtype`.
//
// Parameters
// ----------
// hidden : dtype [batch, per_sample], read and written.
// residual, correction : dtype [batch, per_sample]; correction may be null.
// gamma : float32 [batch] (gamma_per_sample) or [] (scalar), or null; non-null only
//     with a correction.
// Bytes moved: 4 * batch * per_sample * sizeof(dtype) (3 without correction).
cudaError_t apply_residual(void* hidden, const void* residual, const void* correction,
                           const float* gamma, bool gamma_per_sample, int64_t batch,
                           int64_t per_sample, DType dtype, cudaStream_t stream);

// Store a block's residual, optionally its drift, and return change statistics.
//
//     new = out - inp;  old = cache;  d = new - old           (float32, unrounded)
//     delta = round(d)             (if delta is not null)
//     cache = round(new)
//     stats[b] = [sum |d|, sum |old|, sum d^2, sum old^2]     (over the sample's elements)
//
// Parameters
// ----------
// cache : dtype [batch, per_sample], read and written.
// delta : dtype [batch, per_sample] or null, written.
// out, inp : dtype [batch, per_sample].
// stats : float32 [batch, 4], written.
// workspace : at least reduction_workspace_bytes(batch, per_sample, 4) bytes, 4-byte
//     aligned (may be null when that is 0).
// Bytes moved: (4 or 5) * batch * per_sample * sizeof(dtype).
cudaError_t store_residual(void* cache, void* delta, const void* out, const void* inp,
                           int64_t batch, int64_t per_sample, DType dtype, float* stats,
                           void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Trajectory statistics of three consecutive points.
//
//     v1 = x_next - x;  v0 = x - x_prev                       (float32)
//     stats[b] = [sum v1^2, sum v0^2, sum v1 * v0]
//
// Parameters
// ----------
// x_next, x, x_prev : dtype [batch, per_sample].
// stats : float32 [batch, 3], written.
// workspace : at least reduction_workspace_bytes(batch, per_sample, 3) bytes.
// Bytes moved: 3 * batch * per_sample * sizeof(dtype).
cudaError_t trajectory_stats(const void* x_next, const void* x, const void* x_prev,
                             int64_t batch, int64_t per_sample, DType dtype, float* stats,
                             void* workspace, size_t workspace_bytes, cudaStream_t stream);

// Relative-L1 numerator and denominator.
//
//     stats[b] = [sum |a - b|, sum |b|]                       (float32)
//
// Parameters
// ----------
// a, b : dtype [batch, per_sample].
// stats : float32 [batch, 2], written.
// workspace : at least reduction_workspace_bytes(batch, per_sample, 2) bytes.
// Bytes moved: 2 * batch * per_sample * sizeof(dtype).
cudaError_t rel_l1(const void* a, const void* b, int64_t batch, int64_t per_sample,
                   DType dtype, float* stats, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream);

}  // namespace omnicache::cuda
