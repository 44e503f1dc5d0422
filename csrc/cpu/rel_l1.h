// CPU kernel of rel_l1, compiled once per ISA (isa_kernels.h) on the toolkit of simd.h.
// A reduction (reduce_lanes, 2 partials): sum |a - b|, sum |b|.
// No include guard and no includes on purpose: see kernels.cpp.

template <class T>
void rel_l1_t(const ReduceArgs& a, int64_t begin, int64_t end, float* partials) {
  const T* x = static_cast<const T*>(a.x0);
  const T* y = static_cast<const T*>(a.x1);
  reduce_lanes<2>(begin, end, partials, [&](int64_t i, auto tag, auto* t) {
    const auto yv = load(y, i, tag);
    t[0] = abs_f(load(x, i, tag) - yv);
    t[1] = abs_f(yv);
  });
}
