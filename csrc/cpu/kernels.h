// CPU kernels of the omnicache ops: a framework-free interface.
//
// Each kernel processes a range of elements of one call; the torch glue
// (ops_cpu.cpp) splits a call into fixed-size ranges and runs them in parallel.
// The ranges never depend on the thread count, so results are bitwise-equal for
// any number of threads.
#pragma once

#include <cstdint>

namespace omnicache::cpu {

enum class DType { F32, F16, BF16 };

// Elements per reduction chunk: a fixed split of each sample, so the order of the
// float32 sums depends on the shape alone.
constexpr int64_t kChunk = 16384;

// apply_residual_: hidden[i] += gate[b, i % D] * (residual[i] + g1 * correction[i]
// + g2 * correction2[i]), each absent term dropped, in float32 (see reference.py).
struct ApplyArgs {
  void* hidden;
  const void* residual;
  const void* correction;   // null: no first-order term
  const void* correction2;  // null: no second-order term
  const void* gate;         // null: gate = 1; else contiguous [B, gate_dim]
  const float* gamma;       // null: g1 = g2 = 1
  int64_t gamma_stride;     // floats between samples' gammas (0: shared by all samples)
  int gamma_count;          // 1: gamma holds g1; 2: (g1, g2)
  int64_t gate_dim;         // D: hidden's last dim (with a gate)
  int64_t per_sample;       // N: elements per sample
  DType dtype;
};

// Reductions over one sample's elements [begin, end), writing K float32 partials.
//   store_residual_:  x0 = out, x1 = inp or null (new = out), w0 = cache (read then
//                     written), w1 = delta or null, w2 = delta2 or null (needs w1; reads
//                     the old delta before w1 is written)
//   trajectory_stats: x0 = x_next, x1 = x, x2 = x_prev
//   rel_l1:           x0 = a, x1 = b
struct ReduceArgs {
  const void* x0;
  const void* x1;
  const void* x2;
  void* w0;
  void* w1;
  void* w2;
  DType dtype;
  bool stream = false;  // write the write-only outputs around the caches (large calls)
};

// Tensors at least this large (bytes) are far outside the last-level cache: their
// write-only outputs are stored non-temporally.
constexpr int64_t kStreamBytes = int64_t{32} << 20;

// token_update_ over the tokens [begin, end) of the flat [B * N] view: owner[t] >= 0:
// cache row t = values row (b * K + owner[t]) - hidden row t, out row t = that values
// row (copied); owner[t] < 0: out row t = hidden row t + cache row t. Rows of C elements.
struct TokenArgs {
  void* cache;
  void* out;
  const void* values;
  const void* hidden;
  const int32_t* owner;  // [B * N]: the last k with index[b, k] == n, or -1
  int64_t tokens;        // N
  int64_t selected;      // K
  int64_t channels;      // C
  DType dtype;
  bool stream = false;   // write out around the caches (large calls)
};

using ApplyFn = void (*)(const ApplyArgs&, int64_t begin, int64_t end);
using ReduceFn = void (*)(const ReduceArgs&, int64_t begin, int64_t end, float* partials);
using TokenFn = void (*)(const TokenArgs&, int64_t begin, int64_t end);

struct KernelTable {
  const char* isa;  // "avx512", "avx2" or "baseline"
  ApplyFn apply_residual;
  ReduceFn store_residual;    // 4 partials
  ReduceFn trajectory_stats;  // 3 partials
  ReduceFn rel_l1;            // 2 partials
  TokenFn token_update;
};

// The fastest table this CPU supports, chosen once.
const KernelTable& kernels();

// Name of the chosen table ("avx512", "avx2" or "baseline").
inline const char* isa() { return kernels().isa; }

}  // namespace omnicache::cpu
