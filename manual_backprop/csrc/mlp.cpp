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
// are extra outputs, so double backward reaches W and the input through σ'.
//
// Registered as the operator torch.ops.manual_backprop.mlp (no pybind11: it builds faster).

#include <ATen/ATen.h>
#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

namespace manual_backprop {

using at::Tensor;
using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Activation codes; the Python side (rules/_native.py, NATIVE_ACTIVATIONS) maps Elementwise rules to them.
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

enum Source { FROM_NOTHING, FROM_A, FROM_Z };  // where σ' reads from, as Elementwise.sigma_prime_from

Source source_of(int64_t kind) {
  switch (kind) {
    case NONE: return FROM_NOTHING;
    case SIGMOID: case TANH: case RELU: case RELU6: case HARDTANH: return FROM_A;
    default: return FROM_Z;
  }
}

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
  if (!at::GradMode::is_enabled()) {  // no double backward asked for: the same products in two passes, not three
    switch (kind) {
      case SIGMOID: {  // δ a (1 − a) = δa − δa·a
        Tensor delta_a = delta * s;
        return delta_a.addcmul_(delta_a, s, -1);
      }
      case TANH: return at::addcmul(delta, delta * s, s, -1);  // δ (1 − a²) = δ − δa·a
      default: break;
    }
  }
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

Tensor plus(const Tensor& x, const Tensor& y) {
  return !x.defined() ? y : !y.defined() ? x : x + y;
}

Tensor rows(const Tensor& t) {  // (*, features) -> (n, features)
  return !t.defined() || t.dim() == 2 ? t : t.reshape({-1, t.size(-1)});
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
    variable_list activations, zs;
    for (int64_t l = 0; l < L; ++l) {
      const Tensor& W = weights_and_biases[2 * l];
      const Tensor& b = weights_and_biases[2 * l + 1];
      Tensor z = b.defined() ? at::addmm(b, a, W.t()) : a.mm(W.t());  // z(l+1) = a(l) W(l)ᵀ + b(l), as F.linear
      a = sigma(z, kinds[l], params[2 * l], params[2 * l + 1]);
      if (source_of(kinds[l]) == FROM_Z) zs.push_back(z);
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
    ctx->saved_data["slot"] = slot;
    ctx->saved_data["kinds"] = kinds;
    ctx->saved_data["params"] = params;
    ctx->saved_data["lowest"] = lowest;
    ctx->saved_data["input_shape"] = a_in.sizes().vec();

    variable_list outputs{out};
    outputs.insert(outputs.end(), activations.begin(), activations.end());
    outputs.insert(outputs.end(), zs.begin(), zs.end());
    return outputs;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grad_outputs) {
    // Compute in the dtypes forward saved, whatever autocast says (the Python rule's `without_autocast`).
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const auto slot = ctx->saved_data["slot"].toIntVector();
    const auto kinds = ctx->saved_data["kinds"].toIntVector();
    const auto params = ctx->saved_data["params"].toDoubleVector();
    const int64_t lowest = ctx->saved_data["lowest"].toInt();
    const int64_t L = static_cast<int64_t>(kinds.size());
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
    for (int64_t l = L - 1; l >= 0; --l) {
      grad_a = plus(grad_a, grad_hidden[l]);
      const Tensor& s = source_of(kinds[l]) == FROM_A ? a[l + 1] : z[l];
      Tensor delta = plus(grad_a.defined() ? delta_sigma_prime(grad_a, s, kinds[l], params[2 * l], params[2 * l + 1])
                                           : Tensor(),
                          grad_z[l]);
      grad_a = Tensor();
      if (!delta.defined()) continue;
      // ∂J/∂W(l) = δ(l+1)ᵀ a(l),  ∂J/∂b(l) = Σₙ δ(l+1)
      if (need(2 * l)) grads[1 + slot[2 * l]] = delta.t().mm(a[l]);
      if (need(2 * l + 1)) grads[1 + slot[2 * l + 1]] = delta.sum(0);
      if (l > lowest || need_a0) grad_a = delta.mm(W[l]);  // ∂J/∂a(l) = δ(l+1) W(l)
    }
    if (need_a0 && grad_a.defined()) grads[0] = grad_a.reshape(ctx->saved_data["input_shape"].toIntVector());
    return grads;
  }
};

std::vector<Tensor> mlp(const Tensor& a, const c10::List<std::optional<Tensor>>& weights_and_biases,
                        at::IntArrayRef kinds, at::ArrayRef<double> params) {
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
  return NativeMLP::apply(a, at::TensorList(given), std::move(slot), kinds.vec(), params.vec());
}

}  // namespace manual_backprop

TORCH_LIBRARY(manual_backprop, m) {
  m.def("mlp(Tensor a, Tensor?[] weights_and_biases, int[] kinds, float[] params) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(manual_backprop, CompositeImplicitAutograd, m) {
  m.impl("mlp", &manual_backprop::mlp);
}
