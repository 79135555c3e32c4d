// The fused MLP rule, natively: the native twin of manual_backprop/rules/mlp.py (the readable
// reference; read it first). Same algebra, same saved tensors, same outputs, in ATen ops:
//
//     forward    z(l+1) = a(l) W(l)ᵀ + b(l),   a(l+1) = σ(z(l+1))          l = 0 … L−1
//     backward   ∂J/∂W(l) = δ(l+1)ᵀ a(l),   ∂J/∂b(l) = Σₙ δ(l+1)
//                δ(l) = (δ(l+1) W(l)) ⊙ σ'(·)                            l = L−1 … 0
//
// W is (out, in), torch's layout. One autograd node for the whole network, called from C++: no
// Python between the layers, which is where the Python rule spends its time at small widths.
// Backward uses forward ATen ops only (mm, sum, elementwise), never autograd or a *_backward
// kernel, and is differentiable: as in the Python rule, the hidden a(l) and the z(l) that σ' reads
// are extra outputs of the node (the operator hands back only the network's output), so double
// backward reaches W and the input through σ'. Where σ' reads a, σ is applied over z in place.
//
// On CPU, for float32 and float64, the same loop runs on raw memory (the "direct" path): matrix
// products straight to the BLAS that torch itself links (sgemm_/dgemm_, MKL or OpenBLAS), σ'⊙δ,
// the bias add and Σₙ δ as plain loops. At course sizes an ATen call costs 2–3 µs of dispatch and
// checks around a 0.3 µs product; that overhead, ten-odd calls a step, is what this path removes.
// It serves first-order backward (GradMode off); double backward, CUDA and other dtypes take ATen.
//
// Registered as the operator torch.ops.manual_backprop.mlp (no pybind11: it builds faster). The per-layer rules
// (layers.cpp) share this file's direct path through direct.h.

#include "direct.h"

#include <ATen/ATen.h>
#include <ATen/EmptyTensor.h>
#include <ATen/Parallel.h>
#include <ATen/record_function.h>  // the direct path's steps show by name in torch.profiler
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <climits>
#include <cmath>
#include <cstring>
#include <vector>

// d[i] depends on index i alone, even where d is g (δ written over ∂J/∂a): tell the compiler, so it vectorises
// instead of checking for overlap at run time and, finding d == g, falling back to a branchy scalar loop.
#if defined(__clang__)
#define ELEMENTWISE _Pragma("clang loop vectorize(assume_safety)")
#elif defined(__GNUC__)
#define ELEMENTWISE _Pragma("GCC ivdep")
#else
#define ELEMENTWISE
#endif

namespace manual_backprop {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

const double SQRT_2_OVER_PI = std::sqrt(2.0 / M_PI);
const double INV_SQRT_2PI = 1.0 / std::sqrt(2.0 * M_PI);
const double ONE_SIXTH = static_cast<double>(1.0f / 6.0f);  // torch's hardsigmoid slope, 1/6 in float32

// a = σ(z)
Tensor sigma(const Tensor& z, int64_t kind, double p0, double p1) {
  switch (kind) {
    case NONE: return z;
    case SIGMOID: return at::sigmoid(z);
    case TANH: return at::tanh(z);
    case RELU: return at::relu(z);
    case LEAKY_RELU: return at::leaky_relu(z, p0);
    case ELU: return at::elu(z, p0);
    case SOFTPLUS: return at::softplus(z, p0, p1);
    case SILU: return at::silu(z);
    case GELU: return at::gelu(z, p0 != 0 ? "tanh" : "none");
    case RELU6: return at::hardtanh(z, 0.0, 6.0);
    case HARDTANH: return at::hardtanh(z, p0, p1);
    case HARDSIGMOID: return at::hardsigmoid(z);
    case HARDSWISH: return at::hardswish(z);
    case MISH: return at::mish(z);
  }
  TORCH_CHECK(false, "manual_backprop native MLP: unknown activation code ", kind);
}

// δ ⊙ σ'(s), s = a or z by source_of(kind): the formulas of rules/activations.py, term for term.
Tensor delta_sigma_prime(const Tensor& delta, const Tensor& s, int64_t kind, double p0, double p1) {
  // No double backward asked for: δ (1 − a²) = δ − δa·a in two passes, not three (rounding as torch's 1 − a²).
  // Not so for sigmoid: δa − δa·a cancels as a → 1, where 1 − a is exact; it keeps the notes' three passes.
  if (!at::GradMode::is_enabled() && kind == TANH) return at::addcmul(delta, delta * s, s, -1);
  switch (kind) {
    case NONE: return delta;
    case SIGMOID: return (1 - s).mul_(s).mul_(delta);               // σ' = a (1 − a)
    case TANH: return (s * s).neg_().add_(1).mul_(delta);           // σ' = 1 − a²
    case RELU: return s.sign().mul_(delta);                         // σ' = [a > 0]  (a ≥ 0)
    case LEAKY_RELU: return at::where(s > 0, delta, delta * p0);    // σ' = 1 for z > 0, slope else
    case ELU: return delta * at::where(s > 0, 1.0, p0 * at::exp(s));
    case SOFTPLUS: {  // σ' = sigmoid(βz), 1 past the threshold
      Tensor bz = s * p0;
      return delta * at::where(bz > p1, 1.0, at::sigmoid(bz));
    }
    case SILU: {  // σ' = s (1 + z (1 − s)), s = sigmoid(z)
      Tensor sg = at::sigmoid(s);
      return delta * (sg * (1 + s * (1 - sg)));
    }
    case GELU: {
      if (p0 != 0) {  // tanh: ½(1 + t) + ½z (1 − t²) √(2/π)(1 + 3·0.044715 z²)
        Tensor t = at::tanh(SQRT_2_OVER_PI * (s + 0.044715 * at::pow(s, 3)));
        return delta * (0.5 * (1 + t) + 0.5 * s * (1 - t * t) * SQRT_2_OVER_PI * (1 + 3 * 0.044715 * s * s));
      }
      // Φ(z) + z φ(z)
      Tensor z_pdf = (s * (s * s).mul_(-0.5).exp_()).mul_(INV_SQRT_2PI);
      return at::erf(s * (1 / std::sqrt(2.0))).add_(1).mul_(0.5).add_(z_pdf).mul_(delta);
    }
    case RELU6: return at::where((s > 0.0).logical_and_(s < 6.0), delta, 0.0);  // 1 on (0, 6), from a
    case HARDTANH: return at::where((s > p0).logical_and_(s < p1), delta, 0.0);  // 1 on (min, max), from a
    case HARDSIGMOID:  // 1/6 on (−3, 3), from z
      return delta * at::where((s > -3).logical_and_(s < 3), ONE_SIXTH, at::zeros_like(s));
    case HARDSWISH:  // 0 for z ≤ −3, z/3 + ½ on (−3, 3), 1 for z ≥ 3
      return delta * at::where(s <= -3, 0.0, at::where(s < 3, s / 3 + 0.5, 1.0));
    case MISH: {  // t + z sigmoid(z) (1 − t²), t = tanh(softplus(z))
      Tensor t = at::tanh(at::softplus(s));
      return delta * (t + s * at::sigmoid(s) * (1 - t * t));
    }
  }
  TORCH_CHECK(false, "manual_backprop native MLP: unknown activation code ", kind);
}

// a = σ(z) over z's own memory where σ' reads a, not z: one tensor fewer a layer
Tensor activate(Tensor z, int64_t kind, double p0, double p1) {
  switch (kind) {
    case NONE: return z;
    case SIGMOID: return z.sigmoid_();
    case TANH: return z.tanh_();
    case RELU: return z.relu_();
    case RELU6: return at::hardtanh_(z, 0.0, 6.0);
    case HARDTANH: return at::hardtanh_(z, p0, p1);
    default: return sigma(z, kind, p0, p1);
  }
}

Tensor plus(const Tensor& x, const Tensor& y) {
  return !x.defined() ? y : !y.defined() ? x : x + y;
}

Tensor rows(const Tensor& t) {  // (*, features) -> (n, features)
  return !t.defined() || t.dim() == 2 ? t : t.reshape({-1, t.size(-1)});
}

// ------------------------------------------------------------------ the direct CPU path

std::atomic<bool> direct_allowed{true};  // set_direct(false): ATen everywhere (the tests run both paths)
std::atomic<int64_t> direct_runs[2];     // forwards, backwards on the direct path: the tests check it ran

// Whether the direct path may run: CPU, float32 or float64, plain strided tensors, sizes within BLAS's int.
bool direct_ok(const Tensor& a, at::TensorList tensors) {
  if (!direct_allowed.load(std::memory_order_relaxed) || !has_blas()) return false;
  const auto dtype = a.scalar_type();
  if (dtype != at::kFloat && dtype != at::kDouble) return false;
  auto plain = [&](const Tensor& t) {
    return t.device().is_cpu() && t.layout() == at::kStrided && t.has_storage() && t.scalar_type() == dtype &&
           t.numel() <= INT_MAX;
  };
  if (!plain(a) || (a.dim() > 0 && a.numel() / std::max<int64_t>(a.size(-1), 1) > INT_MAX)) return false;
  return std::all_of(tensors.begin(), tensors.end(), [&](const Tensor& t) { return !t.defined() || plain(t); });
}

// An uninitialised CPU tensor of like's dtype, allocated without a trip through the dispatcher
Tensor uninitialised(at::IntArrayRef size, const Tensor& like) {
  return at::detail::empty_cpu(size, like.scalar_type(), /*pin_memory=*/false, /*memory_format=*/std::nullopt);
}

// z = a Wᵀ + b: b copied into every row, then the product added onto it (as addmm does)
Tensor linear_direct(const Tensor& a_any, const Tensor& W_any, const Tensor& b_any) {
  RECORD_FUNCTION("manual_backprop::linear_direct", std::vector<c10::IValue>());
  const Tensor a = a_any.contiguous(), W = W_any.contiguous();
  const int64_t n = a.size(0), in = a.size(1), out = W.size(0);
  Tensor z = uninitialised({n, out}, a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "manual_backprop::mlp", [&] {
    scalar_t* pz = z.data_ptr<scalar_t>();
    if (b_any.defined()) {
      const Tensor b = b_any.contiguous();
      const scalar_t* pb = b.const_data_ptr<scalar_t>();
      for (int64_t i = 0; i < n; ++i) std::memcpy(pz + i * out, pb, out * sizeof(scalar_t));
    }
    gemm<scalar_t>(false, true, n, out, in, a.const_data_ptr<scalar_t>(), W.const_data_ptr<scalar_t>(),
                   scalar_t(b_any.defined() ? 1 : 0), pz);
  });
  return z;
}

// op(A) op(B) as a new (m, n) tensor: δᵀ a (∂J/∂W) and δ W (∂J/∂a)
Tensor product_direct(const Tensor& A_any, bool transpose_a, const Tensor& B_any) {
  RECORD_FUNCTION("manual_backprop::product_direct", std::vector<c10::IValue>());
  const Tensor A = A_any.contiguous(), B = B_any.contiguous();
  const int64_t m = A.size(transpose_a ? 1 : 0), k = A.size(transpose_a ? 0 : 1), n = B.size(1);
  Tensor C = uninitialised({m, n}, A);
  AT_DISPATCH_FLOATING_TYPES(A.scalar_type(), "manual_backprop::mlp", [&] {
    gemm<scalar_t>(transpose_a, false, m, n, k, A.const_data_ptr<scalar_t>(), B.const_data_ptr<scalar_t>(),
                   scalar_t(0), C.data_ptr<scalar_t>());
  });
  return C;
}

// Σₙ δ: the column sums of (n, out), each thread a block of columns down all the rows
Tensor column_sums_direct(const Tensor& delta_any) {
  RECORD_FUNCTION("manual_backprop::column_sums_direct", std::vector<c10::IValue>());
  const Tensor delta = delta_any.contiguous();
  const int64_t n = delta.size(0), out = delta.size(1);
  Tensor sums = uninitialised({out}, delta);
  AT_DISPATCH_FLOATING_TYPES(delta.scalar_type(), "manual_backprop::mlp", [&] {
    const scalar_t* d = delta.const_data_ptr<scalar_t>();
    scalar_t* s = sums.data_ptr<scalar_t>();
    std::fill(s, s + out, scalar_t(0));
    at::parallel_for(0, out, std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(n, 1)),
                     [&](int64_t begin, int64_t end) {
                       for (int64_t i = 0; i < n; ++i) {
                         const scalar_t* row = d + i * out;
                         for (int64_t j = begin; j < end; ++j) s[j] += row[j];
                       }
                     });
  });
  return sums;
}

// Whether δ ⊙ σ'(a) has a one-pass loop below: the activations whose σ' is a polynomial or a step in a
bool delta_loop_for(int64_t kind) {
  return kind == NONE || kind == SIGMOID || kind == TANH || kind == RELU || kind == RELU6 || kind == HARDTANH;
}

// δ = ∂J/∂a ⊙ σ'(a) in one pass (ATen's path takes two or three), written over grad_a where we own it.
Tensor delta_direct(const Tensor& grad_a_any, bool own_grad_a, const Tensor& a_any, int64_t kind, double p0,
                    double p1) {
  RECORD_FUNCTION("manual_backprop::delta_direct", std::vector<c10::IValue>());
  const Tensor grad_a = grad_a_any.contiguous(), a = a_any.contiguous();
  if (kind == NONE) return grad_a;
  // contiguous() copied it, or it is ours: overwrite it
  Tensor delta = own_grad_a || !grad_a.is_same(grad_a_any) ? grad_a : uninitialised(grad_a.sizes(), grad_a);
  AT_DISPATCH_FLOATING_TYPES(a.scalar_type(), "manual_backprop::mlp", [&] {
    const scalar_t* g = grad_a.const_data_ptr<scalar_t>();
    const scalar_t* s = a.const_data_ptr<scalar_t>();
    scalar_t* d = delta.data_ptr<scalar_t>();
    const scalar_t lo = kind == RELU6 ? 0 : static_cast<scalar_t>(p0), hi = kind == RELU6 ? 6 : static_cast<scalar_t>(p1);
    at::parallel_for(0, a.numel(), at::internal::GRAIN_SIZE, [&](int64_t begin, int64_t end) {
      switch (kind) {  // the switch outside the loops, so each loop vectorises
        case SIGMOID:  // a (1 − a)
          ELEMENTWISE for (int64_t i = begin; i < end; ++i) d[i] = g[i] * s[i] * (1 - s[i]);
          break;
        case TANH:  // 1 − a²
          ELEMENTWISE for (int64_t i = begin; i < end; ++i) d[i] = g[i] * (1 - s[i] * s[i]);
          break;
        case RELU:  // [a > 0]
          ELEMENTWISE for (int64_t i = begin; i < end; ++i) {
            const scalar_t gi = g[i];  // loaded whatever the test says: a conditional load stops vectorisation
            d[i] = s[i] > 0 ? gi : scalar_t(0);
          }
          break;
        default:  // 1 on (lo, hi)
          ELEMENTWISE for (int64_t i = begin; i < end; ++i) {
            const scalar_t gi = g[i];
            d[i] = s[i] > lo && s[i] < hi ? gi : scalar_t(0);
          }
      }
    });
  });
  return delta;
}

struct NativeMLP : public torch::autograd::Function<NativeMLP> {
  // a: (*, in); given: the tensors among W₀, b₀, W₁, b₁, … (autograd takes no undefined inputs), slot[i]: where
  // the i-th of W₀, b₀, … is in `given` (−1: no bias); kinds[l], params[2l], params[2l+1]: layer l's activation.
  // Returns (out, a(1) … a(L−1), z(l) of the layers whose σ' reads z), as MLP.forward.
  static variable_list forward(AutogradContext* ctx, const Tensor& a_in, at::TensorList given,
                               std::vector<int64_t> slot, std::vector<int64_t> kinds, std::vector<double> params) {
    const int64_t L = static_cast<int64_t>(kinds.size());
    std::vector<Tensor> weights_and_biases(2 * L);
    for (int64_t i = 0; i < 2 * L; ++i) {
      if (slot[i] >= 0) weights_and_biases[i] = given[slot[i]];
    }
    auto leading = a_in.sizes().slice(0, a_in.dim() - 1);
    Tensor a = rows(a_in);
    const bool direct = direct_ok(a_in, given);
    if (direct) direct_runs[0].fetch_add(1, std::memory_order_relaxed);
    variable_list activations, zs;
    for (int64_t l = 0; l < L; ++l) {
      const Tensor& W = weights_and_biases[2 * l];
      const Tensor& b = weights_and_biases[2 * l + 1];
      // z(l+1) = a(l) W(l)ᵀ + b(l), as F.linear
      Tensor z = direct ? linear_direct(a, W, b) : b.defined() ? at::addmm(b, a, W.t()) : a.mm(W.t());
      if (source_of(kinds[l]) == FROM_Z) {
        zs.push_back(z);
        a = sigma(z, kinds[l], params[2 * l], params[2 * l + 1]);
      } else {
        a = activate(z, kinds[l], params[2 * l], params[2 * l + 1]);
      }
      activations.push_back(a);
    }
    Tensor out = activations.back();
    activations.pop_back();
    if (leading.size() != 1) {
      std::vector<int64_t> shape(leading.begin(), leading.end());
      shape.push_back(out.size(-1));
      out = out.reshape(shape);
    }

    // Save only what backward needs (rules/mlp.py setup_context, line for line).
    const bool need_a0 = a_in.requires_grad();
    std::vector<bool> need(2 * L);
    int64_t lowest = L;  // δ travels down to the lowest layer with a parameter that wants a gradient
    for (int64_t l = L - 1; l >= 0; --l) {
      for (int k = 0; k < 2; ++k) {
        const Tensor& p = weights_and_biases[2 * l + k];
        need[2 * l + k] = p.defined() && p.requires_grad();
      }
      if (need[2 * l] || need[2 * l + 1]) lowest = l;
    }
    if (need_a0) lowest = 0;
    variable_list saved;
    saved.push_back(need[0] ? a_in : Tensor());
    saved.push_back(source_of(kinds[L - 1]) == FROM_A ? out : Tensor());
    for (int64_t l = 0; l < L; ++l) saved.push_back(l > lowest || need_a0 ? weights_and_biases[2 * l] : Tensor());
    for (const auto& t : activations) saved.push_back(t);
    for (const auto& t : zs) saved.push_back(t);
    ctx->save_for_backward(saved);
    ctx->set_materialize_grads(false);  // unused extra outputs get undefined gradients, not zeros
    // One entry each for the integers and the floats: every saved_data entry is a hashed string and a boxed list.
    std::vector<int64_t> layout{lowest, direct};  // lowest, direct, kinds (L), slot (2L), the input's shape
    layout.insert(layout.end(), kinds.begin(), kinds.end());
    layout.insert(layout.end(), slot.begin(), slot.end());
    layout.insert(layout.end(), a_in.sizes().begin(), a_in.sizes().end());
    ctx->saved_data["layout"] = std::move(layout);
    ctx->saved_data["params"] = std::move(params);

    variable_list outputs{out};
    outputs.insert(outputs.end(), activations.begin(), activations.end());
    outputs.insert(outputs.end(), zs.begin(), zs.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // Compute in the dtypes forward saved, whatever autocast says (the Python rule's `without_autocast`).
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto params = ctx->saved_data["params"].toDoubleVector();
    const auto layout = ctx->saved_data["layout"].toIntVector();
    const int64_t L = static_cast<int64_t>(params.size()) / 2;
    const int64_t lowest = layout[0];
    const at::IntArrayRef kinds(layout.data() + 2, L), slot(layout.data() + 2 + L, 2 * L);
    const at::IntArrayRef input_shape(layout.data() + 2 + 3 * L, layout.size() - 2 - 3 * L);
    const variable_list saved = ctx->get_saved_variables();

    // a[l] = a(l), the input of layer l; a[L] the output. z[l]: z(l+1) where σ' reads z.
    std::vector<Tensor> a(L + 1), W(L), z(L), grad_z(L), grad_hidden(L);
    a[0] = rows(saved[0]);
    a[L] = rows(saved[1]);
    for (int64_t l = 0; l < L; ++l) W[l] = saved[2 + l];
    for (int64_t l = 1; l < L; ++l) {
      a[l] = saved[2 + L + l - 1];
      grad_hidden[l - 1] = grad_outputs[l];  // gradients that reached a(l) directly (double backward)
    }
    for (int64_t l = 0, k = 0; l < L; ++l) {
      if (source_of(kinds[l]) != FROM_Z) continue;
      z[l] = saved[2 + 2 * L - 1 + k];
      grad_z[l] = grad_outputs[L + k];
      ++k;
    }
    const bool need_a0 = ctx->needs_input_grad(0);

    const int64_t given = 1 + *std::max_element(slot.begin(), slot.end());
    auto need = [&](int64_t i) { return slot[i] >= 0 && ctx->needs_input_grad(1 + slot[i]); };
    variable_list grads(1 + given + 3);  // a(0), the given W and b, and none for slot, kinds and params
    Tensor grad_a = rows(grad_outputs[0]);  // ∂J/∂a(L)
    // The direct path where forward took it, unless double backward is asked for (it needs ATen's graph).
    const bool direct = layout[1] && !at::GradMode::is_enabled() &&
                        (!grad_a.defined() || direct_ok(grad_a, {}));
    if (direct) direct_runs[1].fetch_add(1, std::memory_order_relaxed);
    bool own_grad_a = false;  // grad_a is a product made below, which δ may overwrite
    for (int64_t l = L - 1; l >= 0; --l) {
      if (grad_hidden[l].defined()) {
        own_grad_a = grad_a.defined();  // a sum is a new tensor; ∂J/∂a(l) handed in alone is not ours to overwrite
        grad_a = plus(grad_a, grad_hidden[l]);
      }
      const Tensor& s = source_of(kinds[l]) == FROM_A ? a[l + 1] : z[l];
      const double p0 = params[2 * l], p1 = params[2 * l + 1];
      Tensor delta = !grad_a.defined() ? Tensor()
                     : direct && delta_loop_for(kinds[l]) ? delta_direct(grad_a, own_grad_a, s, kinds[l], p0, p1)
                                                          : delta_sigma_prime(grad_a, s, kinds[l], p0, p1);
      delta = plus(delta, grad_z[l]);
      grad_a = Tensor();
      if (!delta.defined()) continue;
      // ∂J/∂W(l) = δ(l+1)ᵀ a(l),  ∂J/∂b(l) = Σₙ δ(l+1)
      if (need(2 * l)) grads[1 + slot[2 * l]] = direct ? product_direct(delta, true, a[l]) : delta.t().mm(a[l]);
      if (need(2 * l + 1)) grads[1 + slot[2 * l + 1]] = direct ? column_sums_direct(delta) : delta.sum(0);
      if (l > lowest || need_a0) {  // ∂J/∂a(l) = δ(l+1) W(l)
        grad_a = direct ? product_direct(delta, false, W[l]) : delta.mm(W[l]);
        own_grad_a = true;
      }
    }
    if (need_a0 && grad_a.defined()) grads[0] = grad_a.reshape(input_shape);
    return grads;
  }
};

// The network's output. The node's other outputs (the hidden a(l), z(l)) stay with the node, which saved them:
// no Python object is made for them on every call.
Tensor mlp(const Tensor& a, const c10::List<std::optional<Tensor>>& weights_and_biases, at::IntArrayRef kinds,
           at::ArrayRef<double> params) {
  TORCH_CHECK(static_cast<int64_t>(weights_and_biases.size()) == 2 * static_cast<int64_t>(kinds.size()) &&
                  params.size() == 2 * kinds.size() && !kinds.empty(),
              "manual_backprop native MLP: expected W, b and two parameters per layer");
  std::vector<Tensor> given;
  std::vector<int64_t> slot;
  given.reserve(weights_and_biases.size());
  slot.reserve(weights_and_biases.size());
  for (const auto& t : weights_and_biases) {
    std::optional<Tensor> o = t;
    const bool present = o.has_value() && o->defined();
    slot.push_back(present ? static_cast<int64_t>(given.size()) : -1);
    if (present) given.push_back(*o);
  }
  // Shapes, before anything reads memory (the direct path trusts them): layer l maps width[l] to W(l).size(0).
  TORCH_CHECK(a.dim() >= 1, "manual_backprop native MLP: the input must have a feature dimension, got shape ",
              a.sizes());
  int64_t width = a.size(-1);
  for (int64_t l = 0; l < static_cast<int64_t>(kinds.size()); ++l) {
    TORCH_CHECK(slot[2 * l] >= 0, "manual_backprop native MLP: layer ", l, " has no weight");
    const Tensor& W = given[slot[2 * l]];
    TORCH_CHECK(W.dim() == 2 && W.size(1) == width, "manual_backprop native MLP: layer ", l,
                " takes ", width, " features, but its weight has shape ", W.sizes(), " (expected (out, ", width, "))");
    TORCH_CHECK(slot[2 * l + 1] < 0 || given[slot[2 * l + 1]].sizes() == at::IntArrayRef{W.size(0)},
                "manual_backprop native MLP: layer ", l, "'s bias must have shape (", W.size(0), ",), got ",
                slot[2 * l + 1] < 0 ? at::IntArrayRef{} : given[slot[2 * l + 1]].sizes());
    width = W.size(0);
  }
  return NativeMLP::apply(a, at::TensorList(given), std::move(slot), kinds.vec(), params.vec())[0];
}

}  // namespace manual_backprop

namespace manual_backprop {
// The direct CPU path's switch (returns the setting it replaces) and counters (forwards, backwards), for the tests.
bool set_direct(bool allowed) { return direct_allowed.exchange(allowed); }
std::vector<int64_t> direct_counts() { return {direct_runs[0].load(), direct_runs[1].load()}; }
}  // namespace manual_backprop

TORCH_LIBRARY(manual_backprop, m) {  // layers.cpp adds the per-layer operators (a fragment)
  m.def("mlp(Tensor a, Tensor?[] weights_and_biases, int[] kinds, float[] params) -> Tensor");
  m.def("set_direct(bool allowed) -> bool", &manual_backprop::set_direct);
  m.def("direct_counts() -> int[]", &manual_backprop::direct_counts);
  m.def("has_blas() -> bool", &manual_backprop::has_blas);
}

TORCH_LIBRARY_IMPL(manual_backprop, CompositeImplicitAutograd, m) {
  m.impl("mlp", &manual_backprop::mlp);
}
