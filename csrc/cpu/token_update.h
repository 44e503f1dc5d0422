// CPU kernel of token_update_, compiled once per ISA (isa_kernels.h) on the toolkit of
// simd.h (its loads, stores and for_each). gather_tokens is row copies (memcpy): it is
// in the torch glue, ops_cpu.cpp, with the owner map. No include guard and no includes
// on purpose: see kernels.cpp.
//
// Elementwise, so the vector width changes no result: cache = round(v - h) and out =
// round(h + c) in float32, one rounding each; out = v is a copy of the bits. The owner
// map (built by the torch glue) already resolved duplicates: the last k wins.

// out[i] = hidden[i] + cache[i] on [i0, i1), the elements of a run of reused tokens.
template <class T>
void token_reuse_span(const TokenArgs& a, int64_t i0, int64_t i1) {
  T* out = static_cast<T*>(a.out);
  const T* cache = static_cast<const T*>(a.cache);
  const T* hidden = static_cast<const T*>(a.hidden);
  if (a.stream) {
    for_each(i0, i1, [&](int64_t i, auto tag) {
      store_stream(out, i, load(hidden, i, tag) + load(cache, i, tag), tag);
    });
  } else {
    for_each(i0, i1, [&](int64_t i, auto tag) {
      store(out, i, load(hidden, i, tag) + load(cache, i, tag), tag);
    });
  }
}

template <class T>
void token_update_t(const TokenArgs& a, int64_t begin, int64_t end) {
  T* cache = static_cast<T*>(a.cache);
  T* out = static_cast<T*>(a.out);
  const T* values = static_cast<const T*>(a.values);
  const T* hidden = static_cast<const T*>(a.hidden);
  const int64_t c = a.channels;
  for (int64_t t = begin; t < end;) {
    if (a.owner[t] < 0) {  // a run of reused tokens: one span of contiguous rows
      int64_t e = t + 1;
      while (e < end && a.owner[e] < 0) ++e;
      token_reuse_span<T>(a, t * c, e * c);
      t = e;
      continue;
    }
    const int64_t b = t / a.tokens;
    const T* v = values + (b * a.selected + a.owner[t]) * c;
    const T* h = hidden + t * c;
    T* cr = cache + t * c;
    std::memcpy(out + t * c, v, static_cast<size_t>(c) * sizeof(T));
    for_each(0, c, [&](int64_t i, auto tag) { store(cr, i, load(v, i, tag) - load(h, i, tag), tag); });
    ++t;
  }
  stream_fence(a.stream);
}
