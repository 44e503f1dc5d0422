// CPU kernel of trajectory_stats, compiled once per ISA (isa_kernels.h) on the toolkit of simd.h.
// A reduction (reduce_lanes, 3 partials): |v1|^2, |v0|^2, <v1, v0>.
// No include guard and no includes on purpose: see kernels.cpp.

template <class T>
void trajectory_stats_t(const ReduceArgs& a, int64_t begin, int64_t end, float* partials) {
  const T* xn = static_cast<const T*>(a.x0);
  const T* x = static_cast<const T*>(a.x1);
  const T* xp = static_cast<const T*>(a.x2);
  reduce_lanes<3>(begin, end, partials, [&](int64_t i, auto tag, auto* t) {
    const auto xc = load(x, i, tag);
    const auto v1 = load(xn, i, tag) - xc;
    const auto v0 = xc - load(xp, i, tag);
    t[0] = v1 * v1;
    t[1] = v0 * v0;
    t[2] = v1 * v0;
  });
}
