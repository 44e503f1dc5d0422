// CUDA kernels of the token ops (ToCa): token_update and gather_tokens. API and exact
// formulas: kernels.h; semantics: omnicache/reference.py.
//
// token_update runs on the stream without a host synchronisation (CUDA-graph capturable):
//   1. cudaMemsetAsync: owner map [B * N] int32 = -1, flag = 0 (caller's workspace);
//   2. token_owner_kernel, one thread per index entry: atomicMax(owner[b, n], k), so the
//      largest k of a repeated token wins whatever order the threads run in (integer
//      atomics: deterministic); an entry outside [0, N) sets the flag instead;
//   3. token_update_kernel over the elements of [B, N, C]: each thread reads the flag,
//      then its token's owner, and writes out (and cache where the token is selected).
//      A set flag means: out = NaN, cache untouched (no element of cache is written).
// Thread u handles one 16-byte vector (kVec: C a multiple of the vector, every pointer
// 16-byte aligned, so a vector never straddles two rows) or one element, in a
// grid-stride loop. Elementwise: the path taken changes no bit of any result.
#include "kernels.h"

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstdint>

namespace omnicache::cuda {
namespace {

#include "element_access.cuh"  // element types, dtype dispatch, 16-byte vector access

constexpr int kThreads = 256;
constexpr int64_t kMaxBlocks = 65536;  // more work: each thread loops (grid-stride)

unsigned int blocks_for(int64_t units) {
  const int64_t blocks = (units + kThreads - 1) / kThreads;
  return static_cast<unsigned int>(blocks < kMaxBlocks ? blocks : kMaxBlocks);
}

// a / b for a >= 0, b > 0, in 32 bits when both fit (64-bit division is emulated).
__device__ __forceinline__ int64_t div_nonneg(int64_t a, int64_t b) {
  if (((a | b) >> 32) == 0) {
    return static_cast<int64_t>(static_cast<uint32_t>(a) / static_cast<uint32_t>(b));
  }
  return a / b;
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

__global__ void __launch_bounds__(kThreads)
    token_owner_kernel(const int64_t* __restrict__ index, int32_t* __restrict__ owner,
                       int32_t* __restrict__ flag, int64_t tokens, int64_t selected,
                       int64_t entries) {
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t i = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; i < entries;
       i += stride) {
    const int64_t b = div_nonneg(i, selected);
    const int64_t n = index[i];
    if (n < 0 || n >= tokens) {
      atomicOr(flag, 1);
      continue;
    }
    atomicMax(owner + b * tokens + n, static_cast<int32_t>(i - b * selected));
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    token_update_kernel(T* __restrict__ cache, T* __restrict__ out, const T* __restrict__ values,
                        const T* __restrict__ hidden, const int32_t* __restrict__ owner,
                        const int32_t* __restrict__ flag, int64_t tokens, int64_t selected,
                        int64_t channels, int64_t units) {
  constexpr int V = kVec ? Pack<T>::kSize : 1;
  const bool ok = *flag == 0;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units;
       u += stride) {
    const int64_t e = u * V;
    const int64_t t = div_nonneg(e, channels);
    const int32_t o = ok ? owner[t] : -1;
    // The selected row's values (formed only for a selected token: values may be null).
    const auto row = [&] {
      return values + (div_nonneg(t, tokens) * selected + o) * channels + (e - t * channels);
    };
    if constexpr (kVec) {
      Pack<T> h, x, y{};
      if (!ok) {
#pragma unroll
        for (int j = 0; j < V; ++j) y.set(j, quiet_nan());
        y.store(out + e);
        continue;
      }
      h.load(hidden + e);
      if (o >= 0) {
        x.load(row());
#pragma unroll
        for (int j = 0; j < V; ++j) y.set(j, __fsub_rn(x.get(j), h.get(j)));
        y.store(cache + e);
        x.store(out + e);
      } else {
        x.load(cache + e);
#pragma unroll
        for (int j = 0; j < V; ++j) y.set(j, __fadd_rn(h.get(j), x.get(j)));
        y.store(out + e);
      }
    } else {
      if (!ok) {
        out[e] = Elem<T>::from_float(quiet_nan());
      } else if (o >= 0) {
        const T x = *row();
        cache[e] = Elem<T>::from_float(__fsub_rn(Elem<T>::to_float(x), Elem<T>::to_float(hidden[e])));
        out[e] = x;
      } else {
        out[e] = Elem<T>::from_float(__fadd_rn(Elem<T>::to_float(hidden[e]), Elem<T>::to_float(cache[e])));
      }
    }
  }
}

template <typename T, bool kVec>
__global__ void __launch_bounds__(kThreads)
    gather_tokens_kernel(T* __restrict__ out, const T* __restrict__ x,
                         const int64_t* __restrict__ index, int64_t tokens, int64_t selected,
                         int64_t channels, int64_t stride_b, int64_t stride_n, int64_t units) {
  constexpr int V = kVec ? Pack<T>::kSize : 1;
  const int64_t stride = static_cast<int64_t>(gridDim.x) * kThreads;
  for (int64_t u = static_cast<int64_t>(blockIdx.x) * kThreads + threadIdx.x; u < units;
       u += stride) {
    const int64_t e = u * V;
    const int64_t r = div_nonneg(e, channels);
    const int64_t n = index[r];
    const bool inside = n >= 0 && n < tokens;
    const auto src = [&] { return x + div_nonneg(r, selected) * stride_b + n * stride_n + (e - r * channels); };
    if constexpr (kVec) {
      Pack<T> y{};
      if (inside) {
        y.load(src());
      } else {
#pragma unroll
        for (int j = 0; j < V; ++j) y.set(j, quiet_nan());
      }
      y.store(out + e);
    } else {
      out[e] = inside ? *src() : Elem<T>::from_float(quiet_nan());
    }
  }
}

}  // namespace

cudaError_t token_update(void* cache, void* out, const int64_t* index, const void* values,
                         const void* hidden, int64_t batch, int64_t tokens, int64_t selected,
                         int64_t channels, DType dtype, void* workspace, size_t workspace_bytes,
                         cudaStream_t stream) {
  if (batch < 0 || tokens < 0 || selected < 0 || channels < 0 || selected > INT32_MAX) {
    return cudaErrorInvalidValue;
  }
  const int64_t total = batch * tokens * channels;
  if (total == 0) return cudaSuccess;
  if (cache == nullptr || out == nullptr || hidden == nullptr) return cudaErrorInvalidValue;
  if (selected > 0 && (index == nullptr || values == nullptr)) return cudaErrorInvalidValue;
  if (workspace == nullptr || workspace_bytes < token_update_workspace_bytes(batch, tokens) ||
      reinterpret_cast<uintptr_t>(workspace) % alignof(int32_t) != 0) {
    return cudaErrorInvalidValue;
  }
  int32_t* owner = static_cast<int32_t*>(workspace);
  int32_t* flag = owner + batch * tokens;
  cudaError_t err = cudaMemsetAsync(owner, 0xFF, static_cast<size_t>(batch * tokens) * sizeof(int32_t), stream);
  if (err == cudaSuccess) err = cudaMemsetAsync(flag, 0, sizeof(int32_t), stream);
  if (err != cudaSuccess) return err;
  if (selected > 0) {
    token_owner_kernel<<<blocks_for(batch * selected), kThreads, 0, stream>>>(
        index, owner, flag, tokens, selected, batch * selected);
    err = cudaGetLastError();
    if (err != cudaSuccess) return err;
  }
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    T* c = static_cast<T*>(cache);
    T* o = static_cast<T*>(out);
    const T* v = static_cast<const T*>(values);
    const T* h = static_cast<const T*>(hidden);
    constexpr int V = Pack<T>::kSize;
    if (channels % V == 0 && aligned16(c) && aligned16(o) && aligned16(v) && aligned16(h)) {
      token_update_kernel<T, true><<<blocks_for(total / V), kThreads, 0, stream>>>(
          c, o, v, h, owner, flag, tokens, selected, channels, total / V);
    } else {
      token_update_kernel<T, false><<<blocks_for(total), kThreads, 0, stream>>>(
          c, o, v, h, owner, flag, tokens, selected, channels, total);
    }
    return cudaGetLastError();
  });
}

cudaError_t gather_tokens(void* out, const void* x, const int64_t* index, int64_t batch,
                          int64_t tokens, int64_t selected, int64_t channels, int64_t stride_b,
                          int64_t stride_n, DType dtype, cudaStream_t stream) {
  if (batch < 0 || tokens < 0 || selected < 0 || channels < 0) return cudaErrorInvalidValue;
  const int64_t total = batch * selected * channels;
  if (total == 0) return cudaSuccess;
  if (out == nullptr || index == nullptr || (tokens > 0 && x == nullptr)) return cudaErrorInvalidValue;
  return dispatch_dtype(dtype, [&](auto tag) -> cudaError_t {
    using T = typename decltype(tag)::type;
    T* o = static_cast<T*>(out);
    const T* src = static_cast<const T*>(x);
    constexpr int V = Pack<T>::kSize;
    if (channels % V == 0 && stride_b % V == 0 && stride_n % V == 0 && aligned16(o) &&
        aligned16(src)) {
      gather_tokens_kernel<T, true><<<blocks_for(total / V), kThreads, 0, stream>>>(
          o, src, index, tokens, selected, channels, stride_b, stride_n, total / V);
    } else {
      gather_tokens_kernel<T, false><<<blocks_for(total), kThreads, 0, stream>>>(
          o, src, index, tokens, selected, channels, stride_b, stride_n, total);
    }
    return cudaGetLastError();
  });
}

}  // namespace omnicache::cuda
