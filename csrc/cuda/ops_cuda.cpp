// CUDA implementations of the omnicache ops: torch glue around kernels.h.
//
// Built only against a CUDA torch. Each op checks its arguments (csrc/checks.h) before
// anything is written, returns early on empty tensors, makes read-only inputs
// contiguous, allocates outputs and the reduction workspace from torch's caching
// allocator, and launches on the current stream: no host synchronisation, so every op
// can be captured in a CUDA graph. Semantics: omnicache/reference.py.
#include "kernels.h"

#include "../checks.h"

#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/util/Exception.h>
#include <torch/library.h>

#include <optional>

namespace omnicache {
namespace {

namespace kernels = omnicache::cuda;

kernels::DType dtype_of(const at::Tensor& t) {
  switch (t.scalar_type()) {
    case at::kFloat:
      return kernels::DType::F32;
    case at::kHalf:
      return kernels::DType::F16;
    case at::kBFloat16:
      return kernels::DType::BF16;
    default:
      TORCH_CHECK(false, "omnicache: unsupported dtype ", t.scalar_type());  // checks refuse it first
  }
}

void check_launch(cudaError_t err, const char* op) {
  TORCH_CHECK(err == cudaSuccess, "omnicache.", op, " (cuda): kernel launch failed: ",
              cudaGetErrorString(err));
}

at::Tensor empty_stats(const at::Tensor& like, int64_t num_stats) {
  return at::empty({like.size(0), num_stats}, like.options().dtype(at::kFloat));
}

// Workspace of the two-stage reductions (undefined tensor when none is needed).
at::Tensor workspace_for(const at::Tensor& like, int num_stats) {
  const size_t bytes =
      kernels::reduction_workspace_bytes(like.size(0), per_sample(like), num_stats);
  if (bytes == 0) return at::Tensor();
  return at::empty({static_cast<int64_t>(bytes)}, like.options().dtype(at::kByte));
}

void* data_or_null(const at::Tensor& t) { return t.defined() ? t.data_ptr() : nullptr; }

size_t nbytes_or_zero(const at::Tensor& t) { return t.defined() ? t.nbytes() : 0; }

// The current stream of the current device (set by the CUDAGuard of each op). From c10
// rather than ATen/cuda/CUDAContext.h, which also pulls in the cuBLAS/cuSPARSE headers.
cudaStream_t current_stream() { return c10::cuda::getCurrentCUDAStream().stream(); }

void apply_residual_cuda(const at::Tensor& hidden, const at::Tensor& residual,
                         const std::optional<at::Tensor>& correction,
                         const std::optional<at::Tensor>& gamma,
                         const std::optional<at::Tensor>& correction2,
                         const std::optional<at::Tensor>& gate) {
  check_apply_residual(hidden, residual, correction, gamma, correction2, gate);
  if (hidden.numel() == 0) return;
  const c10::cuda::CUDAGuard guard(hidden.device());
  const at::Tensor r = residual.contiguous();
  const at::Tensor c1 = correction ? correction->contiguous() : at::Tensor();
  const at::Tensor c2 = correction2 ? correction2->contiguous() : at::Tensor();
  const at::Tensor gt = gate ? gate->contiguous() : at::Tensor();
  const at::Tensor g = gamma ? gamma->contiguous() : at::Tensor();
  // gamma: [] or [2] shared by every sample, [B] or [B, 2] per sample (checks.cpp).
  const int gamma_count = correction2 ? 2 : 1;
  const bool per_sample_gamma = g.defined() && g.dim() == (correction2 ? 2 : 1);
  const cudaError_t err = kernels::apply_residual(
      hidden.data_ptr(), r.data_ptr(), data_or_null(c1), data_or_null(c2), data_or_null(gt),
      g.defined() ? g.data_ptr<float>() : nullptr, per_sample_gamma ? gamma_count : 0,
      gamma_count, hidden.size(-1), hidden.size(0), per_sample(hidden), dtype_of(hidden),
      current_stream());
  check_launch(err, "apply_residual_");
}

at::Tensor store_residual_cuda(const at::Tensor& cache, const std::optional<at::Tensor>& delta,
                               const at::Tensor& out, const std::optional<at::Tensor>& inp,
                               const std::optional<at::Tensor>& delta2) {
  check_store_residual(cache, delta, out, inp, delta2);
  const c10::cuda::CUDAGuard guard(cache.device());
  if (cache.numel() == 0) {
    return at::zeros({cache.size(0), kernels::kStoreResidualStats},
                     cache.options().dtype(at::kFloat));
  }
  const at::Tensor o = out.contiguous();
  const at::Tensor i = inp ? inp->contiguous() : at::Tensor();
  at::Tensor stats = empty_stats(cache, kernels::kStoreResidualStats);
  const at::Tensor ws = workspace_for(cache, kernels::kStoreResidualStats);
  const cudaError_t err = kernels::store_residual(
      cache.data_ptr(), delta ? delta->data_ptr() : nullptr,
      delta2 ? delta2->data_ptr() : nullptr, o.data_ptr(), data_or_null(i), cache.size(0),
      per_sample(cache), dtype_of(cache), stats.data_ptr<float>(), data_or_null(ws),
      nbytes_or_zero(ws), current_stream());
  check_launch(err, "store_residual_");
  return stats;
}

at::Tensor trajectory_stats_cuda(const at::Tensor& x_next, const at::Tensor& x,
                                 const at::Tensor& x_prev) {
  check_trajectory_stats(x_next, x, x_prev);
  const c10::cuda::CUDAGuard guard(x.device());
  if (x.numel() == 0) {
    return at::zeros({x.size(0), kernels::kTrajectoryStatsStats}, x.options().dtype(at::kFloat));
  }
  const at::Tensor xn = x_next.contiguous();
  const at::Tensor xc = x.contiguous();
  const at::Tensor xp = x_prev.contiguous();
  at::Tensor stats = empty_stats(x, kernels::kTrajectoryStatsStats);
  const at::Tensor ws = workspace_for(x, kernels::kTrajectoryStatsStats);
  const cudaError_t err = kernels::trajectory_stats(
      xn.data_ptr(), xc.data_ptr(), xp.data_ptr(), x.size(0), per_sample(x), dtype_of(x),
      stats.data_ptr<float>(), data_or_null(ws), nbytes_or_zero(ws),
      current_stream());
  check_launch(err, "trajectory_stats");
  return stats;
}

at::Tensor rel_l1_cuda(const at::Tensor& a, const at::Tensor& b) {
  check_rel_l1(a, b);
  const c10::cuda::CUDAGuard guard(a.device());
  if (a.numel() == 0) {
    return at::zeros({a.size(0), kernels::kRelL1Stats}, a.options().dtype(at::kFloat));
  }
  const at::Tensor ac = a.contiguous();
  const at::Tensor bc = b.contiguous();
  at::Tensor stats = empty_stats(a, kernels::kRelL1Stats);
  const at::Tensor ws = workspace_for(a, kernels::kRelL1Stats);
  const cudaError_t err = kernels::rel_l1(ac.data_ptr(), bc.data_ptr(), a.size(0), per_sample(a),
                                          dtype_of(a), stats.data_ptr<float>(), data_or_null(ws),
                                          nbytes_or_zero(ws), current_stream());
  check_launch(err, "rel_l1");
  return stats;
}

// The index range is not checked on the host (reading a CUDA index would synchronise):
// the kernels handle an index outside [0, N) on the device (kernels.h).
at::Tensor token_update_cuda(const at::Tensor& cache, const at::Tensor& index,
                             const at::Tensor& values, const at::Tensor& hidden) {
  check_token_update(cache, index, values, hidden);
  const c10::cuda::CUDAGuard guard(hidden.device());
  at::Tensor out = at::empty(hidden.sizes(), hidden.options());
  if (hidden.numel() == 0) return out;
  const at::Tensor idx = index.contiguous(), v = values.contiguous(), h = hidden.contiguous();
  const int64_t batch = hidden.size(0), tokens = hidden.size(1);
  const size_t bytes = kernels::token_update_workspace_bytes(batch, tokens);
  const at::Tensor ws = at::empty({static_cast<int64_t>(bytes)}, hidden.options().dtype(at::kByte));
  const cudaError_t err = kernels::token_update(
      cache.data_ptr(), out.data_ptr(), idx.data_ptr<int64_t>(), v.data_ptr(), h.data_ptr(), batch,
      tokens, index.size(1), hidden.size(2), dtype_of(hidden), ws.data_ptr(), bytes,
      current_stream());
  check_launch(err, "token_update_");
  return out;
}

// x needs a contiguous last dim only: its other strides go to the kernel.
at::Tensor gather_tokens_cuda(const at::Tensor& x, const at::Tensor& index) {
  check_gather_tokens(x, index);
  const c10::cuda::CUDAGuard guard(x.device());
  at::Tensor out = at::empty({x.size(0), index.size(1), x.size(2)}, x.options());
  if (out.numel() == 0) return out;
  const at::Tensor src = x.stride(2) == 1 ? x : x.contiguous();
  const at::Tensor idx = index.contiguous();
  const cudaError_t err = kernels::gather_tokens(
      out.data_ptr(), src.data_ptr(), idx.data_ptr<int64_t>(), x.size(0), x.size(1),
      index.size(1), x.size(2), src.stride(0), src.stride(1), dtype_of(x), current_stream());
  check_launch(err, "gather_tokens");
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(omnicache, CUDA, m) {
  m.impl("apply_residual_", &apply_residual_cuda);
  m.impl("store_residual_", &store_residual_cuda);
  m.impl("trajectory_stats", &trajectory_stats_cuda);
  m.impl("rel_l1", &rel_l1_cuda);
  m.impl("token_update_", &token_update_cuda);
  m.impl("gather_tokens", &gather_tokens_cuda);
}

}  // namespace omnicache
