// CUDA kernel of apply_residual_: its elementwise op on the chunk skeleton of
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

}  // namespace omnicache::cuda
