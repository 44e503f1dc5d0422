// CPU kernel of store_residual_, compiled once per ISA (isa_kernels.h) on the toolkit of simd.h.
// A reduction (reduce_lanes, 4 partials) that also writes cache, delta and delta2.
// No include guard and no includes on purpose: see kernels.cpp.

// INP, DELTA, DELTA2 are template flags so no test sits inside the vector loop. With
// a.stream, the outputs that are only written (delta2; delta without delta2) bypass
// the caches.
template <class T, bool INP, bool DELTA, bool DELTA2>
void store_residual_impl(const ReduceArgs& a, int64_t begin, int64_t end, float* partials) {
  const T* out = static_cast<const T*>(a.x0);
  const T* inp = static_cast<const T*>(a.x1);
  T* cache = static_cast<T*>(a.w0);
  T* delta = static_cast<T*>(a.w1);
  T* delta2 = static_cast<T*>(a.w2);
  const bool stream = a.stream;
  reduce_lanes<4>(begin, end, partials, [&](int64_t i, auto tag, auto* t) {
    auto nw = load(out, i, tag);
    if constexpr (INP) nw = nw - load(inp, i, tag);
    const auto old = load(cache, i, tag);
    const auto d = nw - old;
    if constexpr (DELTA2) {
      const auto d2 = d - load(delta, i, tag);
      stream ? store_stream(delta2, i, d2, tag) : store(delta2, i, d2, tag);
      store(delta, i, d, tag);
    } else if constexpr (DELTA) {
      stream ? store_stream(delta, i, d, tag) : store(delta, i, d, tag);
    }
    store(cache, i, nw, tag);
    t[0] = abs_f(d);
    t[1] = abs_f(old);
    t[2] = d * d;
    t[3] = old * old;
  });
  stream_fence(stream);
}

template <class T>
void store_residual_t(const ReduceArgs& a, int64_t begin, int64_t end, float* partials) {
  const int mode = (a.x1 != nullptr) | (a.w1 != nullptr) << 1 | (a.w2 != nullptr) << 2;
  switch (mode) {
    case 0: return store_residual_impl<T, false, false, false>(a, begin, end, partials);
    case 1: return store_residual_impl<T, true, false, false>(a, begin, end, partials);
    case 2: return store_residual_impl<T, false, true, false>(a, begin, end, partials);
    case 3: return store_residual_impl<T, true, true, false>(a, begin, end, partials);
    case 6: return store_residual_impl<T, false, true, true>(a, begin, end, partials);
    default: return store_residual_impl<T, true, true, true>(a, begin, end, partials);
  }
}
