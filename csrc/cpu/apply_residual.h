// CPU kernel of apply_residual_, compiled once per ISA (isa_kernels.h) on the toolkit of simd.h.
// hidden += gate * (residual + g1 * correction + g2 * correction2): see kernels.h.
// No include guard and no includes on purpose: see kernels.cpp.

// hidden[i] += gate[i - i0] * (residual[i] + g1 * c1[i] + g2 * c2[i]) on [i0, i1).
template <class T, bool C1, bool C2, bool GATE>
void apply_span(const ApplyArgs& a, int64_t i0, int64_t i1, float g1, float g2, const T* gate) {
  T* h = static_cast<T*>(a.hidden);
  const T* r = static_cast<const T*>(a.residual);
  const T* c1 = static_cast<const T*>(a.correction);
  const T* c2 = static_cast<const T*>(a.correction2);
  for_each(i0, i1, [&](int64_t i, auto tag) {
    auto s = load(r, i, tag);
    if constexpr (C1) s = s + g1 * load(c1, i, tag);
    if constexpr (C2) s = s + g2 * load(c2, i, tag);
    if constexpr (GATE) s = s * load(gate, i - i0, tag);
    store(h, i, load(h, i, tag) + s, tag);
  });
}

template <class T, bool C1, bool C2, bool GATE>
void apply_residual_impl(const ApplyArgs& a, int64_t begin, int64_t end) {
  const T* gate = static_cast<const T*>(a.gate);
  // Walk one sample (and with a gate one row of D) at a time: gamma and the gate row
  // are fixed inside each span.
  for (int64_t s = begin; s < end;) {
    const int64_t b = s / a.per_sample;
    const int64_t sample_end = std::min(end, (b + 1) * a.per_sample);
    float g1 = 1.0f, g2 = 1.0f;
    if (a.gamma != nullptr) {
      g1 = a.gamma[b * a.gamma_stride];
      if (a.gamma_count == 2) g2 = a.gamma[b * a.gamma_stride + 1];
    }
    if constexpr (GATE) {
      while (s < sample_end) {
        const int64_t col = (s - b * a.per_sample) % a.gate_dim;
        const int64_t e = std::min(sample_end, s + (a.gate_dim - col));
        apply_span<T, C1, C2, GATE>(a, s, e, g1, g2, gate + b * a.gate_dim + col);
        s = e;
      }
    } else {
      apply_span<T, C1, C2, GATE>(a, s, sample_end, g1, g2, nullptr);
      s = sample_end;
    }
  }
}

template <class T>
void apply_residual_t(const ApplyArgs& a, int64_t begin, int64_t end) {
  const int mode = (a.correction != nullptr) | (a.correction2 != nullptr) << 1 | (a.gate != nullptr) << 2;
  switch (mode) {
    case 0: return apply_residual_impl<T, false, false, false>(a, begin, end);
    case 1: return apply_residual_impl<T, true, false, false>(a, begin, end);
    case 2: return apply_residual_impl<T, false, true, false>(a, begin, end);
    case 3: return apply_residual_impl<T, true, true, false>(a, begin, end);
    case 4: return apply_residual_impl<T, false, false, true>(a, begin, end);
    case 5: return apply_residual_impl<T, true, false, true>(a, begin, end);
    case 6: return apply_residual_impl<T, false, true, true>(a, begin, end);
    default: return apply_residual_impl<T, true, true, true>(a, begin, end);
  }
}
