// Element types, the dtype dispatch and 16-byte vector access of the CUDA kernels
// (included by every .cu file inside its anonymous namespace, after the CUDA headers:
// no include guard and no includes).
// ------------------------------------------------------------------ element types
// Conversions between a storage type and float32: exact widening, round-to-nearest-even
// narrowing. `bits` forms work on the element's bit pattern inside a 16-byte vector.
template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static __device__ __forceinline__ float to_float(float x) { return x; }
  static __device__ __forceinline__ float from_float(float x) { return x; }
  static __device__ __forceinline__ float from_bits(uint32_t b) { return __uint_as_float(b); }
  static __device__ __forceinline__ uint32_t to_bits(float x) { return __float_as_uint(x); }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float to_float(__half x) { return __half2float(x); }
  static __device__ __forceinline__ __half from_float(float x) { return __float2half_rn(x); }
  static __device__ __forceinline__ float from_bits(uint32_t b) {
    return __half2float(__ushort_as_half(static_cast<unsigned short>(b)));
  }
  static __device__ __forceinline__ uint32_t to_bits(float x) {
    return __half_as_ushort(__float2half_rn(x));
  }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float to_float(__nv_bfloat16 x) { return __bfloat162float(x); }
  static __device__ __forceinline__ __nv_bfloat16 from_float(float x) {
    return __float2bfloat16_rn(x);
  }
  static __device__ __forceinline__ float from_bits(uint32_t b) {
    return __bfloat162float(__ushort_as_bfloat16(static_cast<unsigned short>(b)));
  }
  static __device__ __forceinline__ uint32_t to_bits(float x) {
    return __bfloat16_as_ushort(__float2bfloat16_rn(x));
  }
};

__device__ __forceinline__ uint32_t get_word(const uint4& v, int w) {
  return w == 0 ? v.x : w == 1 ? v.y : w == 2 ? v.z : v.w;
}

__device__ __forceinline__ void set_word(uint4& v, int w, uint32_t x) {
  if (w == 0) v.x = x;
  else if (w == 1) v.y = x;
  else if (w == 2) v.z = x;
  else v.w = x;
}

// 16 bytes of T (vec_t style): one 128-bit load or store. Element j lives in word
// j / kPerWord, at bit (j % kPerWord) * kBits (little-endian, as in memory).
template <typename T>
struct Pack {
  static constexpr int kSize = 16 / sizeof(T);
  static constexpr int kBits = 8 * sizeof(T);
  static constexpr int kPerWord = 4 / sizeof(T);
  uint4 raw;

  __device__ __forceinline__ void load(const T* p) { raw = *reinterpret_cast<const uint4*>(p); }
  __device__ __forceinline__ void store(T* p) const { *reinterpret_cast<uint4*>(p) = raw; }

  __device__ __forceinline__ float get(int j) const {
    const uint32_t w = get_word(raw, j / kPerWord);
    if constexpr (kBits == 32) {
      return Elem<T>::from_bits(w);
    } else {
      return Elem<T>::from_bits((w >> ((j % kPerWord) * kBits)) & 0xffffu);
    }
  }

  __device__ __forceinline__ void set(int j, float x) {
    const uint32_t bits = Elem<T>::to_bits(x);
    if constexpr (kBits == 32) {
      set_word(raw, j, bits);
    } else {
      const int shift = (j % kPerWord) * kBits;
      const uint32_t w = get_word(raw, j / kPerWord);
      set_word(raw, j / kPerWord, (w & ~(0xffffu << shift)) | (bits << shift));
    }
  }
};

__host__ __device__ __forceinline__ bool aligned16(const void* p) {
  return (reinterpret_cast<uintptr_t>(p) & 15u) == 0;
}

// ------------------------------------------------------------------ dtype dispatch
template <typename T>
struct TypeTag {
  using type = T;
};

// The one dtype dispatch: calls f(TypeTag<T>{}) with T the storage type of `dtype`.
template <typename F>
cudaError_t dispatch_dtype(DType dtype, F&& f) {
  switch (dtype) {
    case DType::F32:
      return f(TypeTag<float>{});
    case DType::F16:
      return f(TypeTag<__half>{});
    case DType::BF16:
      return f(TypeTag<__nv_bfloat16>{});
  }
  return cudaErrorInvalidValue;
}
