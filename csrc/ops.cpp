// The omnicache op library: every schema in one place.
//
// Kernels register against these names from csrc/cpu/ops_cpu.cpp (CPU key) and
// csrc/cuda/ops_cuda.cpp (CUDA key, built only against a CUDA torch). The Triton
// kernels are registered from Python (omnicache/ops.py) as opaque custom ops in the
// "omnicache_triton" namespace, and the fake (meta) impls live in omnicache/ops.py.
// Semantics: omnicache/reference.py; argument checks: csrc/checks.cpp.
#include <Python.h>
#include <torch/library.h>

extern "C" {
// `import omnicache._C` loads this library, which runs the registrations below.
PyObject* PyInit__C(void) {
  static struct PyModuleDef module_def = {PyModuleDef_HEAD_INIT, "_C", nullptr, -1, nullptr};
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY(omnicache, m) {
  // New arguments are appended with defaults, so older calls keep working.
  m.def("apply_residual_(Tensor(a!) hidden, Tensor residual, Tensor? correction=None, "
        "Tensor? gamma=None, Tensor? correction2=None, Tensor? gate=None) -> ()");
  m.def("store_residual_(Tensor(a!) cache, Tensor(b!)? delta, Tensor out, Tensor? inp, "
        "Tensor(c!)? delta2=None) -> Tensor");
  m.def("trajectory_stats(Tensor x_next, Tensor x, Tensor x_prev) -> Tensor");
  m.def("rel_l1(Tensor a, Tensor b) -> Tensor");
  // ToCa (token-wise caching): [B, N, C] tokens, [B, K] int64 index of recomputed tokens.
  m.def("token_update_(Tensor(a!) cache, Tensor index, Tensor values, Tensor hidden) -> Tensor");
  m.def("gather_tokens(Tensor x, Tensor index) -> Tensor");
}
