// Argument checks shared by the CPU and CUDA implementations of every op.
//
// Each op calls its check first, before it writes anything, so an input that is
// refused leaves every in-place target exactly as it was. Failures raise
// ValueError with the op and the argument named; omnicache/_checks.py mirrors
// these rules for the Python-side backends (triton, torch) and the fake impls.
#pragma once

#include <ATen/core/Tensor.h>
#include <optional>

namespace omnicache {

void check_apply_residual(const at::Tensor& hidden, const at::Tensor& residual,
                          const std::optional<at::Tensor>& correction,
                          const std::optional<at::Tensor>& gamma,
                          const std::optional<at::Tensor>& correction2,
                          const std::optional<at::Tensor>& gate);

void check_store_residual(const at::Tensor& cache, const std::optional<at::Tensor>& delta,
                          const at::Tensor& out, const std::optional<at::Tensor>& inp,
                          const std::optional<at::Tensor>& delta2);

void check_trajectory_stats(const at::Tensor& x_next, const at::Tensor& x,
                            const at::Tensor& x_prev);

void check_rel_l1(const at::Tensor& a, const at::Tensor& b);

// The token ops: [B, N, C] tokens, an int64 [B, K] index. The index range is checked
// here when the index is on the CPU; on a GPU reading it would synchronise, and the
// kernels handle an out-of-range index on the device (omnicache/reference.py).
void check_token_update(const at::Tensor& cache, const at::Tensor& index,
                        const at::Tensor& values, const at::Tensor& hidden);

void check_gather_tokens(const at::Tensor& x, const at::Tensor& index);

// Elements per sample: numel / size(0) (0 when the tensor is empty).
int64_t per_sample(const at::Tensor& t);

}  // namespace omnicache
