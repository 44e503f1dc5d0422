// Torch glue for the CPU kernels: check, split into fixed ranges, run in parallel,
// fold the per-chunk partials in a fixed order. Registers the CPU key.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include "../checks.h"
#include "kernels.h"

namespace omnicache {
namespace {

using cpu::DType;
using cpu::kChunk;

DType to_dtype(at::ScalarType t) {
  switch (t) {
    case at::kFloat: return DType::F32;
    case at::kHalf: return DType::F16;
    case at::kBFloat16: return DType::BF16;
    default: TORCH_CHECK_VALUE(false, "omnicache: unsupported dtype ", t);
  }
}

// Runs `fn` on each (sample, chunk) of a [B, N] reduction and folds the chunks of
// each sample in order. Returns [B, K] float32.
template <int K>
at::Tensor chunked_reduce(const at::Tensor& like, cpu::ReduceFn fn, const cpu::ReduceArgs& args) {
  const int64_t batch = like.size(0);
  const int64_t n = per_sample(like);
  at::Tensor result = at::zeros({batch, K}, like.options().dtype(at::kFloat));
  if (like.numel() == 0) return result;
  const int64_t chunks = (n + kChunk - 1) / kChunk;
  std::vector<float> partials(static_cast<size_t>(batch * chunks * K));
  at::parallel_for(0, batch * chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t task = first; task < last; ++task) {
      const int64_t b = task / chunks, c = task % chunks;
      const int64_t begin = b * n + c * kChunk;
      fn(args, begin, begin + std::min(kChunk, n - c * kChunk), &partials[task * K]);
    }
  });
  float* out = result.data_ptr<float>();
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t c = 0; c < chunks; ++c) {
      for (int k = 0; k < K; ++k) out[b * K + k] += partials[(b * chunks + c) * K + k];
    }
  }
  return result;
}

// The C++ signature of every kernel is the same on CPU and CUDA (csrc/cuda/ops_cuda.cpp):
// a CUDA torch aborts `import omnicache._C` when two keys register one op with different
// C++ function types (tests/test_kernel_signatures.py keeps them equal).
void apply_residual_cpu(const at::Tensor& hidden, const at::Tensor& residual,
                        const std::optional<at::Tensor>& correction,
                        const std::optional<at::Tensor>& gamma,
                        const std::optional<at::Tensor>& correction2,
                        const std::optional<at::Tensor>& gate) {
  check_apply_residual(hidden, residual, correction, gamma, correction2, gate);
  if (hidden.numel() == 0) return;
  const at::Tensor r = residual.contiguous();
  const at::Tensor c1 = correction ? correction->contiguous() : at::Tensor();
  const at::Tensor c2 = correction2 ? correction2->contiguous() : at::Tensor();
  const at::Tensor gt = gate ? gate->contiguous() : at::Tensor();
  const at::Tensor g = gamma ? gamma->contiguous() : at::Tensor();
  // gamma: [] or [2] shared by every sample, [B] or [B, 2] per sample (checks.cpp).
  const int gamma_count = correction2 ? 2 : 1;
  const bool per_sample_gamma = g.defined() && g.dim() == (correction2 ? 2 : 1);
  const cpu::ApplyArgs args{hidden.data_ptr(),
                            r.data_ptr(),
                            c1.defined() ? c1.data_ptr() : nullptr,
                            c2.defined() ? c2.data_ptr() : nullptr,
                            gt.defined() ? gt.data_ptr() : nullptr,
                            g.defined() ? g.data_ptr<float>() : nullptr,
                            per_sample_gamma ? gamma_count : 0,
                            gamma_count,
                            hidden.size(-1),
                            per_sample(hidden),
                            to_dtype(hidden.scalar_type())};
  const auto fn = cpu::kernels().apply_residual;
  at::parallel_for(0, hidden.numel(), kChunk,
                   [&](int64_t begin, int64_t end) { fn(args, begin, end); });
}

at::Tensor store_residual_cpu(const at::Tensor& cache, const std::optional<at::Tensor>& delta,
                              const at::Tensor& out, const std::optional<at::Tensor>& inp,
                              const std::optional<at::Tensor>& delta2) {
  check_store_residual(cache, delta, out, inp, delta2);
  const at::Tensor o = out.contiguous();
  const at::Tensor i = inp ? inp->contiguous() : at::Tensor();
  const cpu::ReduceArgs args{o.data_ptr(),
                             i.defined() ? i.data_ptr() : nullptr,
                             nullptr,
                             cache.data_ptr(),
                             delta ? delta->data_ptr() : nullptr,
                             delta2 ? delta2->data_ptr() : nullptr,
                             to_dtype(cache.scalar_type()),
                             static_cast<int64_t>(cache.nbytes()) >= cpu::kStreamBytes};
  return chunked_reduce<4>(cache, cpu::kernels().store_residual, args);
}

at::Tensor trajectory_stats_cpu(const at::Tensor& x_next, const at::Tensor& x,
                                const at::Tensor& x_prev) {
  check_trajectory_stats(x_next, x, x_prev);
  const at::Tensor a = x_next.contiguous(), b = x.contiguous(), c = x_prev.contiguous();
  const cpu::ReduceArgs args{a.data_ptr(), b.data_ptr(), c.data_ptr(), nullptr, nullptr,
                             nullptr, to_dtype(x.scalar_type())};
  return chunked_reduce<3>(x, cpu::kernels().trajectory_stats, args);
}

at::Tensor rel_l1_cpu(const at::Tensor& a, const at::Tensor& b) {
  check_rel_l1(a, b);
  const at::Tensor x = a.contiguous(), y = b.contiguous();
  const cpu::ReduceArgs args{x.data_ptr(), y.data_ptr(), nullptr, nullptr, nullptr, nullptr,
                             to_dtype(a.scalar_type())};
  return chunked_reduce<2>(a, cpu::kernels().rel_l1, args);
}

}  // namespace

TORCH_LIBRARY_IMPL(omnicache, CPU, m) {
  m.impl("apply_residual_", &apply_residual_cpu);
  m.impl("store_residual_", &store_residual_cpu);
  m.impl("trajectory_stats", &trajectory_stats_cpu);
  m.impl("rel_l1", &rel_l1_cpu);
}

}  // namespace omnicache
