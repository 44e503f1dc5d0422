#include "checks.h"

#include <c10/util/Exception.h>

#include <algorithm>
#include <cstdint>
#include <limits>
#include <string>
#include <utility>
#include <vector>

namespace omnicache {
namespace {

using Named = std::pair<const char*, const at::Tensor*>;

bool is_float_dtype(at::ScalarType t) {
  return t == at::kFloat || t == at::kHalf || t == at::kBFloat16;
}

// [first byte, one past the last byte] that a tensor can touch.
std::pair<uintptr_t, uintptr_t> byte_range(const at::Tensor& t) {
  int64_t extent = 1;
  for (int64_t d = 0; d < t.dim(); ++d) extent += (t.size(d) - 1) * t.stride(d);
  auto begin = reinterpret_cast<uintptr_t>(t.data_ptr());
  return {begin, begin + static_cast<uintptr_t>(extent * t.element_size())};
}

// Compares addresses, not storages: two storages can share memory (torch.from_numpy
// or torch.frombuffer views of one buffer).
bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0 || a.device() != b.device()) return false;
  auto [a0, a1] = byte_range(a);
  auto [b0, b1] = byte_range(b);
  return a0 < b1 && b0 < a1;
}

// Same shape, dtype and device as `ref`, and a floating dtype omnicache supports.
void check_like(const char* op, const Named& ref, const std::vector<Named>& others) {
  const at::Tensor& r = *ref.second;
  TORCH_CHECK_VALUE(is_float_dtype(r.scalar_type()), "omnicache.", op, ": ", ref.first,
                    " must be float32, float16 or bfloat16, got ", r.scalar_type());
  TORCH_CHECK_VALUE(r.dim() >= 1, "omnicache.", op, ": ", ref.first,
                    " must have a batch dimension (dim >= 1), got a 0-d tensor");
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(t->device() == r.device(), "omnicache.", op, ": ", name, " is on ",
                      t->device(), " but ", ref.first, " is on ", r.device());
    TORCH_CHECK_VALUE(t->scalar_type() == r.scalar_type(), "omnicache.", op, ": ", name,
                      " has dtype ", t->scalar_type(), " but ", ref.first, " has dtype ",
                      r.scalar_type());
    TORCH_CHECK_VALUE(t->sizes() == r.sizes(), "omnicache.", op, ": ", name, " has shape ",
                      t->sizes(), " but ", ref.first, " has shape ", r.sizes());
  }
}

// An in-place target must be contiguous and share no memory with any other argument.
void check_target(const char* op, const Named& target, const std::vector<Named>& others) {
  TORCH_CHECK_VALUE(target.second->is_contiguous(), "omnicache.", op, ": ", target.first,
                    " is written in place and must be contiguous");
  for (const auto& [name, t] : others) {
    if (t == target.second) continue;
    TORCH_CHECK_VALUE(!overlaps(*target.second, *t), "omnicache.", op, ": ", target.first,
                      " is written in place and overlaps ", name);
  }
}

std::string shape_str(at::IntArrayRef s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) out += (i ? ", " : "") + std::to_string(s[i]);
  return out + "]";
}

void check_gamma(const char* op, const at::Tensor& g, const at::Tensor& hidden,
                 bool second_order) {
  TORCH_CHECK_VALUE(g.scalar_type() == at::kFloat, "omnicache.", op,
                    ": gamma must be float32, got ", g.scalar_type());
  TORCH_CHECK_VALUE(g.device() == hidden.device(), "omnicache.", op, ": gamma is on ",
                    g.device(), " but hidden is on ", hidden.device());
  const int64_t b = hidden.size(0);
  if (second_order) {
    TORCH_CHECK_VALUE((g.dim() == 1 && g.size(0) == 2) ||
                          (g.dim() == 2 && g.size(0) == b && g.size(1) == 2),
                      "omnicache.", op, ": gamma must have shape [2] or [B, 2] = [", b,
                      ", 2] (γ1, γ2) when correction2 is given, got ", shape_str(g.sizes()));
  } else {
    TORCH_CHECK_VALUE(g.dim() == 0 || (g.dim() == 1 && g.size(0) == b), "omnicache.", op,
                      ": gamma must have shape [] or [B] = [", b, "], got ",
                      shape_str(g.sizes()));
  }
}

void check_gate(const char* op, const at::Tensor& gate, const at::Tensor& hidden) {
  TORCH_CHECK_VALUE(hidden.dim() >= 2, "omnicache.", op,
                    ": gate needs hidden of shape [B, ..., D], got ", shape_str(hidden.sizes()));
  TORCH_CHECK_VALUE(gate.device() == hidden.device(), "omnicache.", op, ": gate is on ",
                    gate.device(), " but hidden is on ", hidden.device());
  TORCH_CHECK_VALUE(gate.scalar_type() == hidden.scalar_type(), "omnicache.", op,
                    ": gate has dtype ", gate.scalar_type(), " but hidden has dtype ",
                    hidden.scalar_type());
  const int64_t b = hidden.size(0), d = hidden.size(-1);
  TORCH_CHECK_VALUE(gate.dim() == 2 && gate.size(0) == b && gate.size(1) == d, "omnicache.",
                    op, ": gate must have shape [B, D] = [", b, ", ", d, "], got ",
                    shape_str(gate.sizes()));
}

void check_tokens(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK_VALUE(is_float_dtype(t.scalar_type()), "omnicache.", op, ": ", name,
                    " must be float32, float16 or bfloat16, got ", t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == 3, "omnicache.", op, ": ", name, " must have shape [B, N, C], got ",
                    shape_str(t.sizes()));
}

// int64 [B, K] on ref's device; on the CPU every entry in [0, N).
void check_index(const char* op, const at::Tensor& index, const Named& ref) {
  const at::Tensor& r = *ref.second;
  TORCH_CHECK_VALUE(index.scalar_type() == at::kLong, "omnicache.", op,
                    ": index must be int64, got ", index.scalar_type());
  TORCH_CHECK_VALUE(index.device() == r.device(), "omnicache.", op, ": index is on ",
                    index.device(), " but ", ref.first, " is on ", r.device());
  TORCH_CHECK_VALUE(index.dim() == 2 && index.size(0) == r.size(0), "omnicache.", op,
                    ": index must have shape [B, K] with B = ", r.size(0), ", got ",
                    shape_str(index.sizes()));
  constexpr int64_t kMaxK = std::numeric_limits<int32_t>::max();  // owners are int32
  TORCH_CHECK_VALUE(index.size(1) <= kMaxK, "omnicache.", op, ": index has ", index.size(1),
                    " columns; at most ", kMaxK);
  if (!index.is_cpu() || index.numel() == 0) return;
  const at::Tensor idx = index.contiguous();
  const int64_t* p = idx.data_ptr<int64_t>();
  int64_t lo = p[0], hi = p[0];
  for (int64_t i = 1; i < idx.numel(); ++i) {
    lo = std::min(lo, p[i]);
    hi = std::max(hi, p[i]);
  }
  const int64_t n = r.size(1);
  TORCH_CHECK_VALUE(lo >= 0 && hi < n, "omnicache.", op, ": index must lie in [0, N) = [0, ", n,
                    "), got values from ", lo, " to ", hi);
}

}  // namespace

int64_t per_sample(const at::Tensor& t) {
  return t.size(0) == 0 ? 0 : t.numel() / t.size(0);
}

void check_apply_residual(const at::Tensor& hidden, const at::Tensor& residual,
                          const std::optional<at::Tensor>& correction,
                          const std::optional<at::Tensor>& gamma,
                          const std::optional<at::Tensor>& correction2,
                          const std::optional<at::Tensor>& gate) {
  const char* op = "apply_residual_";
  std::vector<Named> reads{{"residual", &residual}};
  if (correction) reads.push_back({"correction", &*correction});
  if (correction2) reads.push_back({"correction2", &*correction2});
  check_like(op, {"hidden", &hidden}, reads);
  if (gamma) {
    TORCH_CHECK_VALUE(correction.has_value() || correction2.has_value(), "omnicache.", op,
                      ": gamma is given but correction is None");
    check_gamma(op, *gamma, hidden, correction2.has_value());
    reads.push_back({"gamma", &*gamma});
  }
  if (gate) {
    check_gate(op, *gate, hidden);
    reads.push_back({"gate", &*gate});
  }
  check_target(op, {"hidden", &hidden}, reads);
}

void check_store_residual(const at::Tensor& cache, const std::optional<at::Tensor>& delta,
                          const at::Tensor& out, const std::optional<at::Tensor>& inp,
                          const std::optional<at::Tensor>& delta2) {
  const char* op = "store_residual_";
  TORCH_CHECK_VALUE(!delta2 || delta, "omnicache.", op,
                    ": delta2 is given but delta is None (delta2 = new delta - old delta)");
  std::vector<Named> targets{{"cache", &cache}};
  if (delta) targets.push_back({"delta", &*delta});
  if (delta2) targets.push_back({"delta2", &*delta2});
  std::vector<Named> all(targets.begin() + 1, targets.end());
  all.push_back({"out", &out});
  if (inp) all.push_back({"inp", &*inp});
  check_like(op, {"cache", &cache}, all);
  all.insert(all.begin(), targets[0]);
  for (const Named& target : targets) check_target(op, target, all);
}

void check_trajectory_stats(const at::Tensor& x_next, const at::Tensor& x,
                            const at::Tensor& x_prev) {
  check_like("trajectory_stats", {"x_next", &x_next}, {{"x", &x}, {"x_prev", &x_prev}});
}

void check_rel_l1(const at::Tensor& a, const at::Tensor& b) {
  check_like("rel_l1", {"a", &a}, {{"b", &b}});
}

void check_token_update(const at::Tensor& cache, const at::Tensor& index,
                        const at::Tensor& values, const at::Tensor& hidden) {
  const char* op = "token_update_";
  check_tokens(op, "hidden", hidden);
  check_like(op, {"hidden", &hidden}, {{"cache", &cache}});
  check_index(op, index, {"hidden", &hidden});
  TORCH_CHECK_VALUE(values.device() == hidden.device(), "omnicache.", op, ": values is on ",
                    values.device(), " but hidden is on ", hidden.device());
  TORCH_CHECK_VALUE(values.scalar_type() == hidden.scalar_type(), "omnicache.", op,
                    ": values has dtype ", values.scalar_type(), " but hidden has dtype ",
                    hidden.scalar_type());
  const std::vector<int64_t> want{hidden.size(0), index.size(1), hidden.size(2)};
  TORCH_CHECK_VALUE(values.sizes() == at::IntArrayRef(want), "omnicache.", op,
                    ": values must have shape [B, K, C] = ", shape_str(want), ", got ",
                    shape_str(values.sizes()));
  check_target(op, {"cache", &cache},
               {{"hidden", &hidden}, {"values", &values}, {"index", &index}});
}

void check_gather_tokens(const at::Tensor& x, const at::Tensor& index) {
  check_tokens("gather_tokens", "x", x);
  check_index("gather_tokens", index, {"x", &x});
}

}  // namespace omnicache
