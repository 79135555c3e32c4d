// What mlp.cpp (the fused MLP) and layers.cpp (the per-layer rules) share: the activation codes, σ and δ ⊙ σ'
// in ATen ops, and the direct CPU path (BLAS products and plain loops on raw memory), defined in mlp.cpp. The BLAS
// lookup and `gemm` are inline here: recurrent.cpp, a library of its own, calls them for its per-step products.
#pragma once

#include <ATen/ATen.h>

#if defined(__unix__) || defined(__APPLE__)
#include <dlfcn.h>
#endif

#include <algorithm>
#include <cstdint>
#include <type_traits>

namespace manual_backprop {

using at::Tensor;

// Fortran BLAS (32-bit integers), looked up in torch's own CPU library: the BLAS torch's at::mm calls, whatever
// else the process has loaded (another library's sgemm_ could take 64-bit integers). Where it is not found (a torch
// without exported BLAS symbols, a platform without dladdr), the ATen path runs.
using SgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const float*, const float*,
                         const int*, const float*, const int*, const float*, float*, const int*);
using DgemmFn = void (*)(const char*, const char*, const int*, const int*, const int*, const double*, const double*,
                         const int*, const double*, const int*, const double*, double*, const int*);
struct Blas {
  SgemmFn sgemm = nullptr;
  DgemmFn dgemm = nullptr;
};

inline const Blas& blas() {
  static const Blas found = [] {
    Blas b;
#if defined(__unix__) || defined(__APPLE__)
    Dl_info torch_cpu;  // the shared library that defines ATen's operators
    if (dladdr(reinterpret_cast<void*>(&at::_ops::mm::call), &torch_cpu) && torch_cpu.dli_fname != nullptr) {
      if (void* library = dlopen(torch_cpu.dli_fname, RTLD_LAZY | RTLD_NOLOAD)) {  // already loaded: no new copy
        b.sgemm = reinterpret_cast<SgemmFn>(dlsym(library, "sgemm_"));
        b.dgemm = reinterpret_cast<DgemmFn>(dlsym(library, "dgemm_"));
        dlclose(library);  // drops the reference dlopen took; torch keeps the library loaded
      }
    }
#endif
    return b;
  }();
  return found;
}

inline bool has_blas() { return blas().sgemm != nullptr && blas().dgemm != nullptr; }

// C = op(A) op(B) + β C for row-major contiguous A, B, C, op(X) = Xᵀ where asked; C is (m, n). A column-major
// BLAS reads row-major C as Cᵀ = op(B)ᵀ op(A)ᵀ: hence B before A.
template <typename T>
inline void gemm(bool transpose_a, bool transpose_b, int64_t m, int64_t n, int64_t k, const T* A, const T* B, T beta, T* C) {
  if (m == 0 || n == 0) return;
  if (k == 0) {  // an empty sum; BLAS refuses the zero leading dimensions that come with it
    if (beta == T(0)) std::fill(C, C + m * n, T(0));
    return;
  }
  const int M = static_cast<int>(n), N = static_cast<int>(m), K = static_cast<int>(k);
  const int ldb = static_cast<int>(transpose_b ? k : n), lda = static_cast<int>(transpose_a ? m : k);
  const char op_b = transpose_b ? 'T' : 'N', op_a = transpose_a ? 'T' : 'N';
  const T one = 1;
  if constexpr (std::is_same_v<T, float>) {
    blas().sgemm(&op_b, &op_a, &M, &N, &K, &one, B, &ldb, A, &lda, &beta, C, &M);
  } else {
    blas().dgemm(&op_b, &op_a, &M, &N, &K, &one, B, &ldb, A, &lda, &beta, C, &M);
  }
}


// Activation codes; the Python side (rules/_native.py, _ACTIVATION_CODES) maps Elementwise rules to them.
enum Kind : int64_t {
  NONE = 0,  // no activation: a(l+1) = z(l+1) (also rules.Identity)
  SIGMOID = 1,
  TANH = 2,
  RELU = 3,
  LEAKY_RELU = 4,  // p0 = negative_slope
  ELU = 5,         // p0 = alpha
  SOFTPLUS = 6,    // p0 = beta, p1 = threshold
  SILU = 7,
  GELU = 8,       // p0 = 0: exact, 1: tanh approximation
  RELU6 = 9,
  HARDTANH = 10,  // p0 = min_val, p1 = max_val
  HARDSIGMOID = 11,
  HARDSWISH = 12,
  MISH = 13,
};
constexpr int64_t KINDS = 14;

enum Source { FROM_NOTHING, FROM_A, FROM_Z };  // where σ' reads from, as Elementwise.sigma_prime_from

inline Source source_of(int64_t kind) {
  switch (kind) {
    case NONE: return FROM_NOTHING;
    case SIGMOID: case TANH: case RELU: case RELU6: case HARDTANH: return FROM_A;
    default: return FROM_Z;
  }
}

Tensor sigma(const Tensor& z, int64_t kind, double p0, double p1);  // a = σ(z)
// δ ⊙ σ'(s), s = a or z by source_of(kind), in ATen ops (differentiable: double backward)
Tensor delta_sigma_prime(const Tensor& delta, const Tensor& s, int64_t kind, double p0, double p1);
Tensor rows(const Tensor& t);  // (*, features) -> (n, features)

// The direct CPU path: whether it may run (CPU, float32/float64, plain strided, one dtype), and its steps
bool direct_ok(const Tensor& a, at::TensorList tensors);
Tensor uninitialised(at::IntArrayRef size, const Tensor& like);
Tensor linear_direct(const Tensor& a, const Tensor& W, const Tensor& b);             // a Wᵀ + b, a: (n, in)
Tensor product_direct(const Tensor& A, bool transpose_a, const Tensor& B);           // op(A) B
Tensor column_sums_direct(const Tensor& delta);                                      // Σₙ δ
bool delta_loop_for(int64_t kind);                                                   // delta_direct serves kind
Tensor delta_direct(const Tensor& grad_a, bool own_grad_a, const Tensor& a, int64_t kind, double p0, double p1);

}  // namespace manual_backprop
