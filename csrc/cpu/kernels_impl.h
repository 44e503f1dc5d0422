// Kernel bodies, included twice by kernels.cpp: once for the baseline ISA and once
// under `#pragma GCC target("avx2,fma")`. Plain loops over fixed-width lanes
// that GCC vectorises at -O3; everything is computed in float32.
// No include guard and no includes on purpose: see kernels.cpp.

// Storage types: float, and half and bf16 as raw bits. The conversions are branch-free
// bit arithmetic (exact, round-to-nearest-even, subnormals, inf and NaN included) so
// that GCC vectorises them like the float loops.
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

inline float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
inline uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

inline float to_float(float v) { return v; }
inline float to_float(BF16 v) { return bits_to_float(static_cast<uint32_t>(v.bits) << 16); }
inline float to_float(F16 v) {
  // Shift exponent and mantissa into place and rebias by 2^112 (= 2^(127-15)): exact
  // for normals and subnormals; inf/NaN get the all-ones exponent.
  const uint32_t h = v.bits;
  const uint32_t shifted = (h & 0x7FFFu) << 13;
  const float finite = bits_to_float(shifted) * 0x1p112f;
  const uint32_t magnitude = (h & 0x7C00u) == 0x7C00u ? (shifted | 0x7F800000u) : float_to_bits(finite);
  return bits_to_float(magnitude | ((h & 0x8000u) << 16));
}

template <class T>
inline T from_float(float f);
template <>
inline float from_float<float>(float f) { return f; }
template <>
inline BF16 from_float<BF16>(float f) {
  // Round to nearest even, quiet NaN for NaN (as c10::BFloat16).
  const uint32_t u = float_to_bits(f);
  const uint32_t rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return BF16{static_cast<uint16_t>(f != f ? 0x7FC0u : rounded)};
}
template <>
inline F16 from_float<F16>(float f) {
  // Round to nearest even (F. Giesen's float_to_half_fast3_rtne, all paths selected).
  const uint32_t all = float_to_bits(f);
  const uint32_t sign = (all >> 16) & 0x8000u;
  const uint32_t u = all & 0x7FFFFFFFu;
  const uint32_t overflow = u > 0x7F800000u ? 0x7E00u : 0x7C00u;          // NaN : inf
  constexpr uint32_t kDenormMagic = ((127 - 15) + (23 - 10) + 1) << 23;  // 0.5f * 2^-13
  const uint32_t subnormal =
      float_to_bits(bits_to_float(u) + bits_to_float(kDenormMagic)) - kDenormMagic;
  const uint32_t normal = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
  const uint32_t magnitude = u >= (143u << 23) ? overflow : (u < (113u << 23) ? subnormal : normal);
  return F16{static_cast<uint16_t>(magnitude | sign)};
}

constexpr int kLanes = 16;

// Sum of `v` over lanes in a fixed pairwise order.
inline float lane_sum(const float* v) {
  float s8[8], s4[4];
  for (int j = 0; j < 8; ++j) s8[j] = v[j] + v[j + 8];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Accumulates body(i, terms) over [begin, end) in kLanes float32 lanes, then folds
// the lanes and the tail in a fixed order into partials[0..K).
template <int K, class Body>
inline void reduce_lanes(int64_t begin, int64_t end, float* partials, Body body) {
  float acc[K][kLanes] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int j = 0; j < kLanes; ++j) {
      float t[K];
      body(i + j, t);
      for (int k = 0; k < K; ++k) acc[k][j] += t[k];
    }
  }
  float tail[K] = {};
  for (; i < end; ++i) {
    float t[K];
    body(i, t);
    for (int k = 0; k < K; ++k) tail[k] += t[k];
  }
  for (int k = 0; k < K; ++k) partials[k] = lane_sum(acc[k]) + tail[k];
}

template <class T>
void apply_residual_t(const ApplyArgs& a, int64_t begin, int64_t end) {
  T* h = static_cast<T*>(a.hidden);
  const T* r = static_cast<const T*>(a.residual);
  const T* c = static_cast<const T*>(a.correction);
  // Walk the range one sample segment at a time so gamma is a constant per loop.
  for (int64_t s = begin; s < end;) {
    const int64_t b = s / a.per_sample;
    const int64_t e = std::min(end, (b + 1) * a.per_sample);
    if (c == nullptr) {
      for (int64_t i = s; i < e; ++i) h[i] = from_float<T>(to_float(h[i]) + to_float(r[i]));
    } else {
      const float g = a.gamma == nullptr ? 1.0f : a.gamma[a.gamma_per_sample ? b : 0];
      for (int64_t i = s; i < e; ++i)
        h[i] = from_float<T>(to_float(h[i]) + (to_float(r[i]) + g * to_float(c[i])));
    }
    s = e;
  }
}

// HAS_DELTA is a template flag so the delta test is not inside the vector loop.
template <class T, bool HAS_DELTA>
void store_residual_impl(const ReduceArgs& a, int64_t begin, int64_t end, float* partials) {
  const T* out = static_cast<const T*>(a.x0);
  const T* inp = static_cast<const T*>(a.x1);
  T* cache = static_cast<T*>(a.w0);
  T* delta = static_cast<T*>(a.w1);
  reduce_lanes<4>(begin, end, partials, [&](int64_t i, float* t) {
    const float nw = to_float(out[i]) - to_float(inp[i]);
    const float old = to_float(cache[i]);
    const float d = nw - old;
    cache[i] = from_float<T>(nw);
    if constexpr (HAS_DELTA) delta[i] = from_float<T>(d);
    t[0] = std::fabs(d);
    t[1] = std::fabs(old);
    t[2] = d * d;
    t[3] = old * old;
  });
}

template <class T>
void store_residual_t(const ReduceArgs& a, int64_t begin, int64_t end, float* partials) {
  if (a.w1 != nullptr) {
    store_residual_impl<T, true>(a, begin, end, partials);
  } else {
    store_residual_impl<T, false>(a, begin, end, partials);
  }
}

template <class T>
void trajectory_stats_t(const ReduceArgs& a, int64_t begin, int64_t end, float* partials) {
  const T* xn = static_cast<const T*>(a.x0);
  const T* x = static_cast<const T*>(a.x1);
  const T* xp = static_cast<const T*>(a.x2);
  reduce_lanes<3>(begin, end, partials, [&](int64_t i, float* t) {
    const float xc = to_float(x[i]);
    const float v1 = to_float(xn[i]) - xc;
    const float v0 = xc - to_float(xp[i]);
    t[0] = v1 * v1;
    t[1] = v0 * v0;
    t[2] = v1 * v0;
  });
}

template <class T>
void rel_l1_t(const ReduceArgs& a, int64_t begin, int64_t end, float* partials) {
  const T* x = static_cast<const T*>(a.x0);
  const T* y = static_cast<const T*>(a.x1);
  reduce_lanes<2>(begin, end, partials, [&](int64_t i, float* t) {
    const float yv = to_float(y[i]);
    t[0] = std::fabs(to_float(x[i]) - yv);
    t[1] = std::fabs(yv);
  });
}

// One switch on the dtype per range; the loops above are specialised per type.
#define OMNICACHE_CPU_ENTRY(name, Args, ...)                                  \
  void name(const Args& a, int64_t begin, int64_t end __VA_OPT__(, ) __VA_ARGS__) { \
    switch (a.dtype) {                                                        \
      case DType::F32: return name##_t<float>(a, begin, end __VA_OPT__(, partials)); \
      case DType::F16: return name##_t<F16>(a, begin, end __VA_OPT__(, partials)); \
      case DType::BF16: return name##_t<BF16>(a, begin, end __VA_OPT__(, partials)); \
    }                                                                         \
  }

OMNICACHE_CPU_ENTRY(apply_residual, ApplyArgs)
OMNICACHE_CPU_ENTRY(store_residual, ReduceArgs, float* partials)
OMNICACHE_CPU_ENTRY(trajectory_stats, ReduceArgs, float* partials)
OMNICACHE_CPU_ENTRY(rel_l1, ReduceArgs, float* partials)
#undef OMNICACHE_CPU_ENTRY
