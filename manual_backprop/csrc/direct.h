// What mlp.cpp (the fused MLP) and layers.cpp (the per-layer rules) share: the activation codes, σ and δ ⊙ σ'
// in ATen ops, and the direct CPU path (BLAS products and plain loops on raw memory). Defined in mlp.cpp.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

namespace manual_backprop {

using at::Tensor;

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
