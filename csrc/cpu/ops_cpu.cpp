// Torch glue for the CPU kernels: check, split into fixed ranges, run in parallel,
// fold the per-chunk partials in a fixed order. Registers the CPU key.
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <vector>

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

// owner[b * N + n]: the largest k with index[b, k] == n (the last occurrence wins), or
// -1. One sequential pass per sample, in k order; the index range was checked.
std::vector<int32_t> token_owners(const at::Tensor& index, int64_t tokens) {
  const int64_t batch = index.size(0), k = index.size(1);
  std::vector<int32_t> owner(static_cast<size_t>(batch * tokens), -1);
  const int64_t* idx = index.data_ptr<int64_t>();
  at::parallel_for(0, batch, 1, [&](int64_t first, int64_t last) {
    for (int64_t b = first; b < last; ++b) {
      for (int64_t j = 0; j < k; ++j) owner[b * tokens + idx[b * k + j]] = static_cast<int32_t>(j);
    }
  });
  return owner;
}

// Tokens per parallel task: about kChunk elements (a fixed split: the same bits for any
// number of threads, the kernel being elementwise anyway).
int64_t token_grain(int64_t channels) { return std::max<int64_t>(1, kChunk / std::max<int64_t>(channels, 1)); }

at::Tensor token_update_cpu(const at::Tensor& cache, const at::Tensor& index,
                            const at::Tensor& values, const at::Tensor& hidden) {
  check_token_update(cache, index, values, hidden);
  at::Tensor out = at::empty(hidden.sizes(), hidden.options());
  if (hidden.numel() == 0) return out;
  const at::Tensor idx = index.contiguous(), v = values.contiguous(), h = hidden.contiguous();
  const int64_t tokens = hidden.size(1);
  const std::vector<int32_t> owner = token_owners(idx, tokens);
  const cpu::TokenArgs args{cache.data_ptr(), out.data_ptr(), v.data_ptr(), h.data_ptr(),
                            owner.data(), tokens, index.size(1), hidden.size(2),
                            to_dtype(hidden.scalar_type()),
                            static_cast<int64_t>(out.nbytes()) >= cpu::kStreamBytes};
  const auto fn = cpu::kernels().token_update;
  at::parallel_for(0, hidden.size(0) * tokens, token_grain(hidden.size(2)),
                   [&](int64_t begin, int64_t end) { fn(args, begin, end); });
  return out;
}

// Row copies: out[b, k] = x[b, index[b, k]]. x needs a contiguous last dim only (its
// other strides are followed), so a view costs no copy of the N rows.
at::Tensor gather_tokens_cpu(const at::Tensor& x, const at::Tensor& index) {
  check_gather_tokens(x, index);
  const int64_t batch = x.size(0), k = index.size(1), c = x.size(2);
  at::Tensor out = at::empty({batch, k, c}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor src = x.stride(2) == 1 ? x : x.contiguous();
  const at::Tensor idx = index.contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  const int64_t size = src.element_size(), row = c * size;
  const auto* base = static_cast<const char*>(src.data_ptr());
  auto* dst = static_cast<char*>(out.data_ptr());
  const int64_t sb = src.stride(0) * size, sn = src.stride(1) * size;
  at::parallel_for(0, batch * k, token_grain(c), [&](int64_t first, int64_t last) {
    for (int64_t r = first; r < last; ++r) {
      std::memcpy(dst + r * row, base + (r / k) * sb + p[r] * sn, static_cast<size_t>(row));
    }
  });
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(omnicache, CPU, m) {
  m.impl("apply_residual_", &apply_residual_cpu);
  m.impl("store_residual_", &store_residual_cpu);
  m.impl("trajectory_stats", &trajectory_stats_cpu);
  m.impl("rel_l1", &rel_l1_cpu);
  m.impl("token_update_", &token_update_cpu);
  m.impl("gather_tokens", &gather_tokens_cpu);
}

}  // namespace omnicache
