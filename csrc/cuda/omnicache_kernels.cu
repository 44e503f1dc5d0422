// CUDA kernels of the omnicache ops. API and exact formulas: omnicache_kernels.h.
//
// One kernel skeleton serves all four ops. Thread block `blk` = b * chunks + c handles
// elements [c * kChunkElements, min((c + 1) * kChunkElements, N)) of sample b, so the
// block knows its sample (per-sample gamma costs one load per block) and a chunk never
// straddles two samples. Thread t of a block owns the chunk elements
//     i * (kThreads * V) + t * V + j,   i < kIters, j < V,
// V the elements of one 16-byte vector (4 floats, 8 halves / bfloat16), and visits
// them in order (i, j). That order is the same whether an element is loaded in a
// vector or alone, so an op's statistics do not depend on pointer alignment:
//   - full chunk, every pointer 16-byte aligned at the chunk start: 16-byte loads and
//     stores, kBatch vectors per input loaded before any is used (memory parallelism);
//   - otherwise (a sample's last chunk, or N not a multiple of V, or a misaligned
//     view): 16-byte accesses where the vector is aligned and inside the chunk, scalar
//     accesses elsewhere.
// Reductions then sum the threads' accumulators in a fixed tree (warp shuffles, then
// one warp over the per-warp sums in shared memory) into one float32 partial per block
// (stage 1), and sum_partials_kernel adds each sample's partials in a fixed order
// (stage 2). No atomics, nothing depends on the device.
#include "omnicache_kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

namespace omnicache::cuda {
namespace {

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert((kWarps & (kWarps - 1)) == 0, "the cross-warp butterfly needs a power of two");

// Size of an array that holds `n` values but may not be empty.
template <int n>
inline constexpr int kDim = n > 0 ? n : 1;

#include "element_access.cuh"  // element types, dtype dispatch, 16-byte vector access

// ------------------------------------------------------------------ the ops
// An op maps kIn float inputs of one element to kOut float outputs (stored rounded to
// T; an output pointer may be null: not stored) and folds the element into kStats
// float32 accumulators; `i` is the element's flat index. for_sample(b) returns the op
// specialised to sample b.
template <typename T, int kIn, int kOut>
struct Operands {
  const T* in[kIn];
  T* out[kDim<kOut>];  // may alias in[] element for element (in-place targets)
};

// s = residual (+ g1 * correction) (+ g2 * correction2) (* gate[b, i % D]);
// hidden = hidden + s. Products and sums rounded separately (no FMA), as on the CPU.
// in: hidden, residual[, correction][, correction2]
template <typename T, bool kC1, bool kC2, bool kGate>
struct ApplyResidualOp {
  static constexpr int kIn = 2 + kC1 + kC2;
  static constexpr int kOut = 1;
  static constexpr int kStats = 0;
  const float* gamma;    // null: g1 = g2 = 1
  int64_t gamma_stride;  // floats between samples' gammas (0: shared)
  int gamma_count;       // 1: g1; 2: (g1, g2)
  const T* gate;         // [batch, gate_dim] (kGate)
  int64_t gate_dim;
  int64_t per_sample;
  float g1, g2;
  int64_t sample_start;  // flat index of the sample's first element
  const T* gate_row;

  __device__ __forceinline__ ApplyResidualOp for_sample(int64_t b) const {
    ApplyResidualOp op = *this;
    if (gamma != nullptr) {
      op.g1 = gamma[b * gamma_stride];
      if (gamma_count == 2) op.g2 = gamma[b * gamma_stride + 1];
    }
    op.sample_start = b * per_sample;
    if constexpr (kGate) op.gate_row = gate + b * gate_dim;
    return op;
  }
  __device__ __forceinline__ void operator()(const float* x, float* y, float*,
                                             [[maybe_unused]] int64_t i) const {
    float s = x[1];
    if constexpr (kC1) s = __fadd_rn(s, __fmul_rn(g1, x[2]));
    if constexpr (kC2) s = __fadd_rn(s, __fmul_rn(g2, x[kC1 ? 3 : 2]));
    if constexpr (kGate) {
      const int64_t local = i - sample_start;
      const int64_t col = local < (int64_t{1} << 32)
                              ? static_cast<int64_t>(static_cast<uint32_t>(local) %
                                                     static_cast<uint32_t>(gate_dim))
                              : local % gate_dim;
      s = __fmul_rn(s, Elem<T>::to_float(gate_row[col]));
    }
    y[0] = __fadd_rn(x[0], s);
  }
};

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

// ------------------------------------------------------------------ stage 1
template <typename T>
struct ChunkShape {
  static constexpr int kVec = Pack<T>::kSize;
  static constexpr int kStep = kThreads * kVec;  // elements per block-wide vector access
  static constexpr int kIters = static_cast<int>(kChunkElements) / kStep;
  static constexpr int kBatch = kIters < 4 ? kIters : 4;  // vectors in flight per input
  static_assert(kChunkElements % kStep == 0, "a chunk is whole block-wide vector steps");
  static_assert(kIters % kBatch == 0, "the full-chunk path loads whole batches");
};

// Apply the op to the kVec elements of one vector per input (order j = 0..kVec-1), then
// store the output vectors at `offset`.
template <typename T, typename Op>
__device__ __forceinline__ void apply_pack(const Op& op, const Pack<T> (&x)[Op::kIn],
                                          const Operands<T, Op::kIn, Op::kOut>& p,
                                          int64_t offset, float* acc) {
  Pack<T> y[kDim<Op::kOut>] = {};
#pragma unroll
  for (int j = 0; j < Pack<T>::kSize; ++j) {
    float xs[Op::kIn];
#pragma unroll
    for (int k = 0; k < Op::kIn; ++k) xs[k] = x[k].get(j);
    float ys[kDim<Op::kOut>] = {};
    op(xs, ys, acc, offset + j);
#pragma unroll
    for (int o = 0; o < Op::kOut; ++o) y[o].set(j, ys[o]);
  }
#pragma unroll
  for (int o = 0; o < Op::kOut; ++o) {
    if (p.out[o] != nullptr) y[o].store(p.out[o] + offset);
  }
}

// A whole chunk with every pointer 16-byte aligned at `start`: vector accesses only.
template <typename T, typename Op>
__device__ __forceinline__ void full_chunk(const Op& op, const Operands<T, Op::kIn, Op::kOut>& p,
                                           int64_t start, float* acc) {
  using S = ChunkShape<T>;
  const int64_t first = start + static_cast<int64_t>(threadIdx.x) * S::kVec;
#pragma unroll
  for (int i0 = 0; i0 < S::kIters; i0 += S::kBatch) {
    Pack<T> x[S::kBatch][Op::kIn];
#pragma unroll
    for (int u = 0; u < S::kBatch; ++u) {
#pragma unroll
      for (int k = 0; k < Op::kIn; ++k) x[u][k].load(p.in[k] + first + (i0 + u) * S::kStep);
    }
#pragma unroll
    for (int u = 0; u < S::kBatch; ++u) apply_pack<T>(op, x[u], p, first + (i0 + u) * S::kStep, acc);
  }
}

// The first `len` elements of a chunk; `aligned`: every pointer is 16-byte aligned at
// `start`. Same element order as full_chunk.
template <typename T, typename Op>
__device__ __forceinline__ void partial_chunk(const Op& op,
                                              const Operands<T, Op::kIn, Op::kOut>& p,
                                              int64_t start, int len, bool aligned, float* acc) {
  using S = ChunkShape<T>;
  for (int i = 0; i < S::kIters; ++i) {
    const int base = i * S::kStep + static_cast<int>(threadIdx.x) * S::kVec;
    if (base >= len) break;  // later steps of this thread lie further out
    if (aligned && base + S::kVec <= len) {
      Pack<T> x[Op::kIn];
#pragma unroll
      for (int k = 0; k < Op::kIn; ++k) x[k].load(p.in[k] + start + base);
      apply_pack<T>(op, x, p, start + base, acc);
      continue;
    }
    // Scalar accesses: all loads first (independent, so they overlap), then the op.
    float xs[S::kVec][Op::kIn];
#pragma unroll
    for (int j = 0; j < S::kVec; ++j) {
#pragma unroll
      for (int k = 0; k < Op::kIn; ++k) {
        xs[j][k] = base + j < len ? Elem<T>::to_float(p.in[k][start + base + j]) : 0.0f;
      }
    }
#pragma unroll
    for (int j = 0; j < S::kVec; ++j) {
      if (base + j >= len) break;
      float ys[kDim<Op::kOut>] = {};
      op(xs[j], ys, acc, start + base + j);
#pragma unroll
      for (int o = 0; o < Op::kOut; ++o) {
        if (p.out[o] != nullptr) p.out[o][start + base + j] = Elem<T>::from_float(ys[o]);
      }
    }
  }
}

// Sum of `acc` over the block, in a fixed order; the result is in thread 0.
template <int K>
__device__ __forceinline__ void block_sum(float* acc, float (*smem)[K]) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = __fadd_rn(acc[k], __shfl_xor_sync(0xffffffffu, acc[k], offset));
  }
  const int warp = static_cast<int>(threadIdx.x) / 32;
  const int lane = static_cast<int>(threadIdx.x) % 32;
  if (lane == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) smem[warp][k] = acc[k];
  }
  __syncthreads();
  if (warp == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = lane < kWarps ? smem[lane][k] : 0.0f;
#pragma unroll
    for (int offset = kWarps / 2; offset > 0; offset /= 2) {
#pragma unroll
      for (int k = 0; k < K; ++k) acc[k] = __fadd_rn(acc[k], __shfl_xor_sync(0xffffffffu, acc[k], offset));
    }
  }
}

// Stage 1 (and the whole of an elementwise op): block b * chunks + c handles chunk c of
// sample b; with statistics it writes them to partials[(b * chunks + c) * kStats + k].
template <typename T, typename Op>
__global__ void __launch_bounds__(kThreads)
    chunk_kernel(const Op op, const Operands<T, Op::kIn, Op::kOut> p, int64_t per_sample,
                 int64_t chunks, float* partials) {
  const int64_t block = blockIdx.x;
  const int64_t b = block / chunks;
  const int64_t c = block - b * chunks;
  const int64_t start = b * per_sample + c * kChunkElements;
  const int64_t left = per_sample - c * kChunkElements;
  const int len = static_cast<int>(left < kChunkElements ? left : kChunkElements);

  bool aligned = true;
#pragma unroll
  for (int k = 0; k < Op::kIn; ++k) aligned = aligned && aligned16(p.in[k] + start);
#pragma unroll
  for (int o = 0; o < Op::kOut; ++o) {
    aligned = aligned && (p.out[o] == nullptr || aligned16(p.out[o] + start));
  }

  const Op sample_op = op.for_sample(b);
  float acc[kDim<Op::kStats>] = {};
  if (aligned && len == kChunkElements) {
    full_chunk<T>(sample_op, p, start, acc);
  } else {
    partial_chunk<T>(sample_op, p, start, len, aligned, acc);
  }

  if constexpr (Op::kStats > 0) {
    __shared__ float smem[kWarps][Op::kStats];
    block_sum<Op::kStats>(acc, smem);
    if (threadIdx.x == 0) {
#pragma unroll
      for (int k = 0; k < Op::kStats; ++k) partials[block * Op::kStats + k] = acc[k];
    }
  }
}

// ------------------------------------------------------------------ stage 2
// stats[b, k] = sum over c of partials[b, c, k]: thread t adds chunks t, t + kThreads,
// ... in order, then block_sum. One block per sample.
template <int K>
__global__ void __launch_bounds__(kThreads)
    sum_partials_kernel(const float* partials, int64_t chunks, float* stats) {
  const int64_t b = blockIdx.x;
  const float* row = partials + b * chunks * K;
  float acc[K] = {};
  for (int64_t c = threadIdx.x; c < chunks; c += kThreads) {
#pragma unroll
    for (int k = 0; k < K; ++k) acc[k] = __fadd_rn(acc[k], row[c * K + k]);
  }
  __shared__ float smem[kWarps][K];
  block_sum<K>(acc, smem);
  if (threadIdx.x == 0) {
#pragma unroll
    for (int k = 0; k < K; ++k) stats[b * K + k] = acc[k];
  }
}

// ------------------------------------------------------------------ launchers
// Runs `op` over [batch, per_sample] (both > 0); with statistics, writes [batch, kStats]
// to `stats` through the workspace (stage 2) when a sample has more than one chunk.
template <typename T, typename Op>
cudaError_t launch(const Op& op, const Operands<T, Op::kIn, Op::kOut>& p, int64_t batch,
                   int64_t per_sample, float* stats, void* workspace, size_t workspace_bytes,
                   cudaStream_t stream) {
  const int64_t chunks = chunks_per_sample(per_sample);
  if (chunks > INT32_MAX / batch) return cudaErrorInvalidValue;  // grid.x limit
  const unsigned int blocks = static_cast<unsigned int>(batch * chunks);
  float* partials = stats;
  const bool two_stage = Op::kStats > 0 && chunks > 1;
  if (two_stage) {
    const size_t need = reduction_workspace_bytes(batch, per_sample, Op::kStats);
    if (workspace == nullptr || workspace_bytes < need ||
        reinterpret_cast<uintptr_t>(workspace) % alignof(float) != 0) {
      return cudaErrorInvalidValue;
    }
    partials = static_cast<float*>(workspace);
  }
  chunk_kernel<T, Op><<<blocks, kThreads, 0, stream>>>(op, p, per_sample, chunks, partials);
  if constexpr (Op::kStats > 0) {
    if (two_stage) {
      const cudaError_t err = cudaGetLastError();
      if (err != cudaSuccess) return err;
      sum_partials_kernel<Op::kStats><<<static_cast<unsigned int>(batch), kThreads, 0, stream>>>(
          partials, chunks, stats);
    }
  }
  return cudaGetLastError();
}

// Shared argument handling of the reductions: validates, zero-fills `stats` for empty
// samples, and returns true in *done when there is nothing left to launch.
cudaError_t reduction_prologue(int64_t batch, int64_t per_sample, int num_stats, float* stats,
                               cudaStream_t stream, bool* done) {
  *done = true;
  if (batch < 0 || per_sample < 0) return cudaErrorInvalidValue;
  if (batch == 0) return cudaSuccess;
  if (stats == nullptr) return cudaErrorInvalidValue;
  if (per_sample == 0) {
    return cudaMemsetAsync(stats, 0, static_cast<size_t>(batch) * num_stats * sizeof(float),
                           stream);
  }
  *done = false;
  return cudaSuccess;
}

}  // namespace

namespace {

template <typename T, bool kC1, bool kC2, bool kGate>
cudaError_t launch_apply(const ApplyResidualOp<T, kC1, kC2, kGate>& op, T* h, const T* r,
                         const T* c1, const T* c2, int64_t batch, int64_t per_sample,
                         cudaStream_t stream) {
  Operands<T, 2 + kC1 + kC2, 1> p{};
  p.in[0] = h;
  p.in[1] = r;
  if constexpr (kC1) p.in[2] = c1;
  if constexpr (kC2) p.in[kC1 ? 3 : 2] = c2;
  p.out[0] = h;
  return launch<T>(op, p, batch, per_sample, nullptr, nullptr, 0, stream);
}

// Calls f(bool_constant<a>, bool_constant<b>, bool_constant<c>) for the runtime flags.
template <bool... kFlags, typename F, typename... Rest>
cudaError_t with_flags(F&& f, bool first, Rest... rest) {
  if constexpr (sizeof...(Rest) == 0) {
    return first ? f(std::bool_constant<kFlags>{}..., std::true_type{})
                 : f(std::bool_constant<kFlags>{}..., std::false_type{});
  } else {
    return first ? with_flags<kFlags..., true>(f, rest...)
                 : with_flags<kFlags..., false>(f, rest...);
  }
}

}  // namespace

cudaError_t apply_residual(void* hidden, const void* residual, const void* correction,
                           const void* correction2, const void* gate, const float* gamma,
                           int64_t gamma_stride, int gamma_count, int64_t gate_dim,
                           int64_t batch, int64_t per_sample, DType dtype, cudaStream_t stream) {
  if (batch < 0 || per_sample < 0) return cudaErrorInvalidValue;
  if (batch == 0 || per_sample == 0) return cudaSuccess;
  if (hidden == nullptr || residual == nullptr) return cudaErrorInvalidValue;
  if (gamma != nullptr && correction == nullptr && correction2 == nullptr) return cudaErrorInvalidValue;
  if (gamma != nullptr && (gamma_count < 1 || gamma_count > 2 || gamma_stride < 0)) {
    return cudaErrorInvalidValue;
  }
  if (correction2 != nullptr && gamma != nullptr && gamma_count != 2) return cudaErrorInvalidValue;
  if (gate != nullptr && (gate_dim <= 0 || per_sample % gate_dim != 0)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    return with_flags(
        [&](auto c1, auto c2, auto g) -> cudaError_t {
          const ApplyResidualOp<T, decltype(c1)::value, decltype(c2)::value, decltype(g)::value> op{
              gamma, gamma_stride, gamma_count, static_cast<const T*>(gate), gate_dim,
              per_sample, 1.0f, 1.0f, 0, nullptr};
          return launch_apply(op, static_cast<T*>(hidden), static_cast<const T*>(residual),
                              static_cast<const T*>(correction), static_cast<const T*>(correction2),
                              batch, per_sample, stream);
        },
        correction != nullptr, correction2 != nullptr, gate != nullptr);
  });
}

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
