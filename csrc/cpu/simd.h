// The toolkit every CPU kernel is written in, compiled once per ISA (isa_kernels.h,
// included three times by kernels.cpp): for the baseline ISA, under
// `#pragma GCC target("avx2,fma,f16c")` and under the AVX-512 target. Everything is
// computed in float32 on the ISA's native vectors (GCC vector extensions: 16 floats in a
// zmm with AVX-512, 8 in a ymm with AVX2, 4 in an xmm on the baseline). Reductions keep
// one float32 sum per lane of a 16-element block on every ISA (lane j sums the elements
// 16m + j), so every ISA adds the same numbers in the same order and gives the same
// bits. Only native widths are used: GCC lowers a vector wider than the ISA's registers
// through the stack and general registers, and its compares one lane at a time.
// Storage types, vectors, conversions, loads and stores, the reduction loop
// (reduce_lanes) and the elementwise loop (for_each); the ops' kernels are in
// <op>.h. No include guard and no includes on purpose: see kernels.cpp.


// Storage types: float, and half and bf16 as raw bits.
struct F16 {
  uint16_t bits;
};
struct BF16 {
  uint16_t bits;
};

constexpr int kLanes = 16;  // the reduction block: one float32 sum per lane
#if defined(OMNICACHE_F16C_512)
constexpr int kWidth = 16;  // floats per native vector
#elif defined(OMNICACHE_F16C_256)
constexpr int kWidth = 8;
#else
constexpr int kWidth = 4;
#endif
constexpr int kParts = kLanes / kWidth;  // native vectors per block
typedef float vf __attribute__((vector_size(4 * kWidth)));     // floats
typedef uint32_t vu __attribute__((vector_size(4 * kWidth)));  // float bit patterns
typedef uint16_t vh __attribute__((vector_size(2 * kWidth)));  // half/bf16 bit patterns

#define OMNICACHE_INLINE inline __attribute__((always_inline))

OMNICACHE_INLINE float bits_to_float(uint32_t u) {
  float f;
  std::memcpy(&f, &u, sizeof f);
  return f;
}
OMNICACHE_INLINE uint32_t float_to_bits(float f) {
  uint32_t u;
  std::memcpy(&u, &f, sizeof u);
  return u;
}

// ------------------------------------------------------------ conversions
// Branch-free bit arithmetic, written once for a scalar (U = uint32_t, F = float) and
// for a vector (U = vu, F = vf): exact widening; narrowing rounds to nearest even with
// subnormals, overflow to inf, inf and NaN as c10::Half / c10::BFloat16.
template <class U, class F>
OMNICACHE_INLINE U as_bits(F f) {
  if constexpr (sizeof(F) == 4) {
    return float_to_bits(f);
  } else {
    return (U)f;  // same-size vector cast: the bits
  }
}
template <class F, class U>
OMNICACHE_INLINE F as_float(U u) {
  if constexpr (sizeof(U) == 4) {
    return bits_to_float(u);
  } else {
    return (F)u;
  }
}
// c ? a : b, elementwise (c is a comparison result).
template <class C, class U>
OMNICACHE_INLINE U select(C c, U a, U b) {
  return c ? a : b;  // on vectors: GCC's elementwise conditional
}

template <class F, class U>
OMNICACHE_INLINE F half_bits_to_float(U h) {
  // Shift exponent and mantissa into place and rebias by 2^112 (= 2^(127-15)): exact
  // for normals and subnormals; inf/NaN get the all-ones exponent.
  const U shifted = (h & 0x7FFFu) << 13;
  const F finite = as_float<F>(shifted) * 0x1p112f;
  const U inf_nan = shifted | 0x7F800000u;
  const U magnitude = select((h & 0x7C00u) == 0x7C00u, inf_nan, as_bits<U>(finite));
  return as_float<F>(magnitude | ((h & 0x8000u) << 16));
}

template <class U, class F>
OMNICACHE_INLINE U float_to_half_bits(F f) {
  // Round to nearest even (F. Giesen's float_to_half_fast3_rtne, all paths selected).
  const U all = as_bits<U>(f);
  const U sign = (all >> 16) & 0x8000u;
  const U u = all & 0x7FFFFFFFu;
  const U nan_inf = select(u > 0x7F800000u, U{} + 0x7E00u, U{} + 0x7C00u);
  constexpr uint32_t kDenormMagic = ((127 - 15) + (23 - 10) + 1) << 23;  // 0.5f * 2^-13
  const U subnormal =
      as_bits<U>(as_float<F>(u) + bits_to_float(kDenormMagic)) - kDenormMagic;
  const U normal = (u + (static_cast<uint32_t>(15 - 127) << 23) + 0xFFFu + ((u >> 13) & 1u)) >> 13;
  const U magnitude =
      select(u >= (143u << 23), nan_inf, select(u < (113u << 23), subnormal, normal));
  return magnitude | sign;
}

template <class F, class U>
OMNICACHE_INLINE F bf16_bits_to_float(U h) {
  return as_float<F>(h << 16);
}

template <class U, class F>
OMNICACHE_INLINE U float_to_bf16_bits(F f) {
  // Round to nearest even, quiet NaN for NaN (as c10::BFloat16).
  const U u = as_bits<U>(f);
  const U rounded = (u + 0x7FFFu + ((u >> 16) & 1u)) >> 16;
  return select(f != f, U{} + 0x7FC0u, rounded);
}

// ------------------------------------------------------------ loads and stores
// load(p, i, tag) / store(p, i, v, tag): one element (One) or kWidth elements (Vec)
// starting at p[i], converted to / from float32. Unaligned vector accesses.
struct One {};
struct Vec {};

OMNICACHE_INLINE float load(const float* p, int64_t i, One) { return p[i]; }
OMNICACHE_INLINE float load(const BF16* p, int64_t i, One) {
  return bf16_bits_to_float<float>(static_cast<uint32_t>(p[i].bits));
}
OMNICACHE_INLINE float load(const F16* p, int64_t i, One) {
  return half_bits_to_float<float>(static_cast<uint32_t>(p[i].bits));
}
OMNICACHE_INLINE void store(float* p, int64_t i, float v, One) { p[i] = v; }
OMNICACHE_INLINE void store(BF16* p, int64_t i, float v, One) {
  p[i].bits = static_cast<uint16_t>(float_to_bf16_bits<uint32_t>(v));
}
OMNICACHE_INLINE void store(F16* p, int64_t i, float v, One) {
  p[i].bits = static_cast<uint16_t>(float_to_half_bits<uint32_t>(v));
}

OMNICACHE_INLINE vf load(const float* p, int64_t i, Vec) {
  vf v;
  std::memcpy(&v, p + i, sizeof v);
  return v;
}
OMNICACHE_INLINE void store(float* p, int64_t i, vf v, Vec) { std::memcpy(p + i, &v, sizeof v); }

#if defined(OMNICACHE_F16C_256)
// vpmovzxwd from memory and vpackusdw of the two halves (every lane <= 0xFFFF, so the
// saturation never acts): GCC's generic conversions take two or three more shuffles.
OMNICACHE_INLINE vu load_bits(const void* p) {
  return (vu)_mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
}
OMNICACHE_INLINE void store_bits(void* p, vu u) {
  const __m256i w = (__m256i)u;
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p),
                   _mm_packus_epi32(_mm256_castsi256_si128(w), _mm256_extracti128_si256(w, 1)));
}
#else
OMNICACHE_INLINE vu load_bits(const void* p) {
  vh h;
  std::memcpy(&h, p, sizeof h);
  return __builtin_convertvector(h, vu);
}
OMNICACHE_INLINE void store_bits(void* p, vu u) {
  const vh h = __builtin_convertvector(u, vh);  // keeps the low 16 bits of each lane
  std::memcpy(p, &h, sizeof h);
}
#endif

OMNICACHE_INLINE vf load(const BF16* p, int64_t i, Vec) {
  return bf16_bits_to_float<vf>(load_bits(p + i));
}
OMNICACHE_INLINE void store(BF16* p, int64_t i, vf v, Vec) {
  store_bits(p + i, float_to_bf16_bits<vu>(v));
}

#if defined(OMNICACHE_F16C_512)
// vcvtph2ps / vcvtps2ph: exact, round to nearest even (the bit arithmetic's results).
OMNICACHE_INLINE vf load(const F16* p, int64_t i, Vec) {
  return (vf)_mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p + i)));
}
OMNICACHE_INLINE void store(F16* p, int64_t i, vf v, Vec) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p + i),
                      _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#elif defined(OMNICACHE_F16C_256)
OMNICACHE_INLINE vf load(const F16* p, int64_t i, Vec) {
  return (vf)_mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p + i)));
}
OMNICACHE_INLINE void store(F16* p, int64_t i, vf v, Vec) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p + i),
                   _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
}
#else
OMNICACHE_INLINE vf load(const F16* p, int64_t i, Vec) {
  return half_bits_to_float<vf>(load_bits(p + i));
}
OMNICACHE_INLINE void store(F16* p, int64_t i, vf v, Vec) {
  store_bits(p + i, float_to_half_bits<vu>(v));
}
#endif

// store_stream: like store, but a vector whose address is aligned to its size goes
// around the caches (non-temporal) on AVX2/AVX-512, for outputs that are only written
// (no read-for-ownership of lines that are overwritten whole). Same bits as store.
#if defined(OMNICACHE_F16C_512) || defined(OMNICACHE_F16C_256)
#define OMNICACHE_STREAM_STORES 1
#if defined(OMNICACHE_F16C_512)
OMNICACHE_INLINE void stream_vec(float* p, vf v) { _mm512_stream_ps(p, (__m512)v); }
OMNICACHE_INLINE void stream_bits(void* p, __m256i h) { _mm256_stream_si256(reinterpret_cast<__m256i*>(p), h); }
OMNICACHE_INLINE __m256i half_bits(vf v) {
  return _mm512_cvtps_ph((__m512)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#else
OMNICACHE_INLINE void stream_vec(float* p, vf v) { _mm256_stream_ps(p, (__m256)v); }
OMNICACHE_INLINE void stream_bits(void* p, __m128i h) { _mm_stream_si128(reinterpret_cast<__m128i*>(p), h); }
OMNICACHE_INLINE __m128i half_bits(vf v) {
  return _mm256_cvtps_ph((__m256)v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
}
#endif
OMNICACHE_INLINE void stream_vec(BF16* p, vf v) {
  const vh h = __builtin_convertvector(float_to_bf16_bits<vu>(v), vh);
  stream_bits(p, (decltype(half_bits(v)))h);
}
OMNICACHE_INLINE void stream_vec(F16* p, vf v) { stream_bits(p, half_bits(v)); }
#endif

template <class T>
OMNICACHE_INLINE void store_stream(T* p, int64_t i, float v, One) {
  store(p, i, v, One{});
}
template <class T>
OMNICACHE_INLINE void store_stream(T* p, int64_t i, vf v, Vec) {
#ifdef OMNICACHE_STREAM_STORES
  if ((reinterpret_cast<uintptr_t>(p + i) & (sizeof(T) * kWidth - 1)) == 0) {
    stream_vec(p + i, v);
    return;
  }
#endif
  store(p, i, v, Vec{});
}

// Orders the streaming stores before whatever the caller does next.
OMNICACHE_INLINE void stream_fence(bool streamed) {
#ifdef OMNICACHE_STREAM_STORES
  if (streamed) _mm_sfence();
#else
  (void)streamed;
#endif
}

OMNICACHE_INLINE float abs_f(float x) { return std::fabs(x); }
OMNICACHE_INLINE vf abs_f(vf x) { return (vf)((vu)x & 0x7FFFFFFFu); }

// ------------------------------------------------------------ reductions
// Sum of the 16 lanes of a block (kParts native vectors) in a fixed pairwise order.
OMNICACHE_INLINE float lane_sum(const vf* parts) {
  float l[kLanes], s8[8], s4[4];
  std::memcpy(l, parts, sizeof l);
  for (int j = 0; j < 8; ++j) s8[j] = l[j] + l[j + 8];
  for (int j = 0; j < 4; ++j) s4[j] = s8[j] + s8[j + 4];
  return (s4[0] + s4[2]) + (s4[1] + s4[3]);
}

// Accumulates body(i, tag, terms) over [begin, end): element begin + 16m + j goes to
// lane j (part j / kWidth of the block's accumulators); the tail (fewer than 16) to one
// scalar sum; then lanes and tail fold in a fixed order into partials[0..K). body
// computes the same float32 arithmetic on a vector (Vec: kWidth elements) as on one
// element (One).
template <int K, class Body>
OMNICACHE_INLINE void reduce_lanes(int64_t begin, int64_t end, float* partials, Body body) {
  vf acc[K][kParts] = {};
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int p = 0; p < kParts; ++p) {
      vf t[K];
      body(i + p * kWidth, Vec{}, t);
      for (int k = 0; k < K; ++k) acc[k][p] += t[k];
    }
  }
  float tail[K] = {};
  for (; i < end; ++i) {
    float t[K];
    body(i, One{}, t);
    for (int k = 0; k < K; ++k) tail[k] += t[k];
  }
  for (int k = 0; k < K; ++k) partials[k] = lane_sum(acc[k]) + tail[k];
}

// Runs body(i, tag) on [begin, end): 16-element blocks (kParts native vectors per
// iteration: more loads in flight, and with 16-bit types a whole 32-byte line segment per
// stream), then native vectors, then single elements (elementwise: the width does not
// change any result).
template <class Body>
OMNICACHE_INLINE void for_each(int64_t begin, int64_t end, Body body) {
  int64_t i = begin;
  for (; i + kLanes <= end; i += kLanes) {
    for (int p = 0; p < kParts; ++p) body(i + p * kWidth, Vec{});
  }
  for (; i + kWidth <= end; i += kWidth) body(i, Vec{});
  for (; i < end; ++i) body(i, One{});
}
