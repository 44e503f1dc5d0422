// CUDA kernels of the omnicache ops: a framework-free launcher API. Each op's kernel is
// in <op>.cu: apply_residual.cu, store_residual.cu, trajectory_stats.cu and rel_l1.cu
// (on the one kernel skeleton of chunk_kernel.cuh), token_update.cu (both token ops).
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
//     s = residual[b, i]
//     s = s + g1[b] * correction[b, i]        (if correction is not null)
//     s = s + g2[b] * correction2[b, i]       (if correction2 is not null)
//     s = s * gate[b, i % gate_dim]           (if gate is not null)
//     hidden[b, i] = round(hidden[b, i] + s)
//
// in float32, each product and sum rounded on its own (no FMA: the CPU kernels give
// the same bits), one rounding to `dtype`. g1[b] = gamma[b * gamma_stride] and, when
// gamma_count == 2, g2[b] = gamma[b * gamma_stride + 1]; both 1 when gamma is null.
//
// Parameters
// ----------
// hidden : dtype [batch, per_sample], read and written.
// residual, correction, correction2 : dtype [batch, per_sample]; the corrections may be null.
// gate : dtype [batch, gate_dim] or null; per_sample is a multiple of gate_dim (hidden
//     is [batch, ..., gate_dim]).
// gamma : float32, or null (then no correction needs it); non-null only with a
//     correction. gamma_stride: 0 (one set for all samples) or gamma_count (per sample);
//     gamma_count: 1 (g1) or 2 (g1, g2; required with correction2).
// Bytes moved: (3 + corrections) * batch * per_sample * sizeof(dtype), plus the gate.
cudaError_t apply_residual(void* hidden, const void* residual, const void* correction,
                           const void* correction2, const void* gate, const float* gamma,
                           int64_t gamma_stride, int gamma_count, int64_t gate_dim,
                           int64_t batch, int64_t per_sample, DType dtype, cudaStream_t stream);

// Store a block's residual (or a branch's output), its drift and the drift's change,
// and return change statistics.
//
//     new = out - inp  (new = out if inp is null);  old = cache;  d = new - old
//     delta2 = round(d - delta)    (if delta2 is not null; reads delta before writing it)
//     delta = round(d)             (if delta is not null)
//     cache = round(new)
//     stats[b] = [sum |d|, sum |old|, sum d^2, sum old^2]     (over the sample's elements)
//
// Parameters
// ----------
// cache : dtype [batch, per_sample], read and written.
// delta : dtype [batch, per_sample] or null, written (and read with delta2).
// delta2 : dtype [batch, per_sample] or null (needs delta), written.
// out, inp : dtype [batch, per_sample]; inp may be null.
// stats : float32 [batch, 4], written.
// workspace : at least reduction_workspace_bytes(batch, per_sample, 4) bytes, 4-byte
//     aligned (may be null when that is 0).
// Bytes moved: (reads + writes) * batch * per_sample * sizeof(dtype), 3 to 7.
cudaError_t store_residual(void* cache, void* delta, void* delta2, const void* out,
                           const void* inp, int64_t batch, int64_t per_sample, DType dtype,
                           float* stats, void* workspace, size_t workspace_bytes,
                           cudaStream_t stream);

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

// ------------------------------------------------------------------ token ops (ToCa)
// In token_update.cu. Tokens are rows of `channels` elements: hidden, cache and out are
// [batch, tokens, channels], values [batch, selected, channels], index int64 [batch,
// selected]. An index outside [0, tokens) is not an error here (the host does not read
// it: that would synchronise); the kernels handle it on the device, as
// omnicache/reference.py specifies.

// Bytes of int32 workspace token_update needs: the owner map [batch * tokens] and a flag.
inline size_t token_update_workspace_bytes(int64_t batch, int64_t tokens) {
  return (static_cast<size_t>(batch) * static_cast<size_t>(tokens) + 1) * sizeof(int32_t);
}

// ToCa's token update:
//
//     owner[b, n] = largest k with index[b, k] == n, else -1    (atomicMax: last wins)
//     owner[b, n] >= 0:  cache[b, n] = round(values[b, owner] - hidden[b, n])
//                        out[b, n] = values[b, owner]            (the bits)
//     owner[b, n] < 0:   out[b, n] = round(hidden[b, n] + cache[b, n])
//
// float32 arithmetic, no FMA. When any index lies outside [0, tokens) no element of cache
// is written and out is all NaN. Three launches: the owner map and flag are reset
// (cudaMemsetAsync), the owner pass, the update pass.
//
// Parameters
// ----------
// cache : dtype, contiguous, read and written.  out : dtype, contiguous, written.
// values, hidden : dtype, contiguous.  index : int64, contiguous; selected < 2^31.
// workspace : at least token_update_workspace_bytes(batch, tokens) bytes, 4-byte aligned.
// Bytes moved: (3 * tokens + selected) * channels * sizeof(dtype) per sample.
cudaError_t token_update(void* cache, void* out, const int64_t* index, const void* values,
                         const void* hidden, int64_t batch, int64_t tokens, int64_t selected,
                         int64_t channels, DType dtype, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream);

// out[b, k] = x[b, index[b, k]]: rows copied (the bits); a row whose index lies outside
// [0, tokens) is NaN. x: element (b, n, c) at x[b * stride_b + n * stride_n + c]; out:
// contiguous [batch, selected, channels].
cudaError_t gather_tokens(void* out, const void* x, const int64_t* index, int64_t batch,
                          int64_t tokens, int64_t selected, int64_t channels, int64_t stride_b,
                          int64_t stride_n, DType dtype, cudaStream_t stream);

}  // namespace omnicache::cuda
