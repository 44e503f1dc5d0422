#include "checks.h"

#include <c10/util/Exception.h>

#include <initializer_list>
#include <string>
#include <utility>

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

bool overlaps(const at::Tensor& a, const at::Tensor& b) {
  if (a.numel() == 0 || b.numel() == 0) return false;
  if (!a.storage().is_alias_of(b.storage())) return false;
  auto [a0, a1] = byte_range(a);
  auto [b0, b1] = byte_range(b);
  return a0 < b1 && b0 < a1;
}

// Same shape, dtype and device as `ref`, and a floating dtype omnicache supports.
void check_like(const char* op, const Named& ref, std::initializer_list<Named> others) {
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
void check_target(const char* op, const Named& target, std::initializer_list<Named> others) {
  TORCH_CHECK_VALUE(target.second->is_contiguous(), "omnicache.", op, ": ", target.first,
                    " is written in place and must be contiguous");
  for (const auto& [name, t] : others) {
    TORCH_CHECK_VALUE(!overlaps(*target.second, *t), "omnicache.", op, ": ", target.first,
                      " is written in place and overlaps ", name);
  }
}

}  // namespace

int64_t per_sample(const at::Tensor& t) {
  return t.size(0) == 0 ? 0 : t.numel() / t.size(0);
}

void check_apply_residual(const at::Tensor& hidden, const at::Tensor& residual,
                          const std::optional<at::Tensor>& correction,
                          const std::optional<at::Tensor>& gamma) {
  const char* op = "apply_residual_";
  if (correction) {
    check_like(op, {"hidden", &hidden}, {{"residual", &residual}, {"correction", &*correction}});
  } else {
    check_like(op, {"hidden", &hidden}, {{"residual", &residual}});
  }
  if (gamma) {
    TORCH_CHECK_VALUE(correction.has_value(), "omnicache.", op,
                      ": gamma is given but correction is None");
    const at::Tensor& g = *gamma;
    TORCH_CHECK_VALUE(g.scalar_type() == at::kFloat, "omnicache.", op,
                      ": gamma must be float32, got ", g.scalar_type());
    TORCH_CHECK_VALUE(g.device() == hidden.device(), "omnicache.", op, ": gamma is on ",
                      g.device(), " but hidden is on ", hidden.device());
    TORCH_CHECK_VALUE(g.dim() == 0 || (g.dim() == 1 && g.size(0) == hidden.size(0)),
                      "omnicache.", op, ": gamma must have shape [] or [B] = [", hidden.size(0),
                      "], got ", g.sizes());
  }
  if (correction && gamma) {
    check_target(op, {"hidden", &hidden},
                 {{"residual", &residual}, {"correction", &*correction}, {"gamma", &*gamma}});
  } else if (correction) {
    check_target(op, {"hidden", &hidden}, {{"residual", &residual}, {"correction", &*correction}});
  } else {
    check_target(op, {"hidden", &hidden}, {{"residual", &residual}});
  }
}

void check_store_residual(const at::Tensor& cache, const std::optional<at::Tensor>& delta,
                          const at::Tensor& out, const at::Tensor& inp) {
  const char* op = "store_residual_";
  if (delta) {
    check_like(op, {"cache", &cache}, {{"delta", &*delta}, {"out", &out}, {"inp", &inp}});
    check_target(op, {"cache", &cache}, {{"delta", &*delta}, {"out", &out}, {"inp", &inp}});
    check_target(op, {"delta", &*delta}, {{"cache", &cache}, {"out", &out}, {"inp", &inp}});
  } else {
    check_like(op, {"cache", &cache}, {{"out", &out}, {"inp", &inp}});
    check_target(op, {"cache", &cache}, {{"out", &out}, {"inp", &inp}});
  }
}

void check_trajectory_stats(const at::Tensor& x_next, const at::Tensor& x,
                            const at::Tensor& x_prev) {
  check_like("trajectory_stats", {"x_next", &x_next}, {{"x", &x}, {"x_prev", &x_prev}});
}

void check_rel_l1(const at::Tensor& a, const at::Tensor& b) {
  check_like("rel_l1", {"a", &a}, {{"b", &b}});
}

}  // namespace omnicache
