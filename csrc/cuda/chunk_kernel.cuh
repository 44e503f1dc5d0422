// The kernel skeleton of the four per-sample ops (apply_residual.cu, store_residual.cu,
// trajectory_stats.cu, rel_l1.cu): one elementwise pass, and for the reductions the
// deterministic two-stage sum. Included by each of them inside its anonymous namespace,
// after <type_traits> and element_access.cuh (no include guard and no includes). API:
// kernels.h.
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

constexpr int kThreads = 256;
constexpr int kWarps = kThreads / 32;
static_assert((kWarps & (kWarps - 1)) == 0, "the cross-warp butterfly needs a power of two");

// Size of an array that holds `n` values but may not be empty.
template <int n>
inline constexpr int kDim = n > 0 ? n : 1;

// ------------------------------------------------------------------ the op interface
// An op maps kIn float inputs of one element to kOut float outputs (stored rounded to
// T; an output pointer may be null: not stored) and folds the element into kStats
// float32 accumulators; `i` is the element's flat index. for_sample(b) returns the op
// specialised to sample b.
template <typename T, int kIn, int kOut>
struct Operands {
  const T* in[kIn];
  T* out[kDim<kOut>];  // may alias in[] element for element (in-place targets)
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
