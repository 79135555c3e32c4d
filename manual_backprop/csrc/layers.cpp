// The per-layer rules, natively: the native twins of rules/linear.py's Linear, rules/activations.py's Elementwise
// rules and rules/losses.py's MSE, BCE-with-logits and cross-entropy (the readable references; read them first).
// Same algebra, same saved tensors:
//
//     Linear       z = a Wᵀ + b              ∂J/∂a = δ W,  ∂J/∂W = δᵀ a,  ∂J/∂b = Σₙ δ
//     activation   a = σ(z)                  δ_z = δ ⊙ σ'(a or z)
//     MSE          J = mean (ŷ − y)²         δ = 2 (ŷ − y) · g/N,          ∂J/∂y = −δ
//     BCE logits   J = BCE(σ(z), y)          δ = (σ(z) − y) · g/N,         ∂J/∂y = −z · g/N
//     CE           J = −log softmax(z)_y     δ = (softmax(z) − onehot(y)) · g/K   (K: targets not ignored)
//
// (g/N and g/K for reduction "mean"; g for "sum".) Each is one C++ autograd node called straight from the
// functional API: no Python forward, setup_context or backward frames, which is where a Python per-layer rule
// spends its time at course sizes. On CPU, for float32 and float64, backward takes mlp.cpp's direct path (BLAS
// products, plain loops; direct.h); with GradMode on (double backward), other dtypes, or the direct path
// switched off, backward is the same algebra in ATen forward ops, so it is differentiable. Never autograd, never
// a *_backward kernel. Forward values come from torch's forward kernels, as in the Python rules.
//
// Each node's Python type carries the Python rule's node name (LinearBackward, SigmoidBackward, …), so code that
// names grad_fn types (the README, the tests' "our rule ran" checks) reads the same on either rule.

#include <Python.h>  // first, as Python asks

#include "direct.h"

#include <c10/core/impl/LocalDispatchKeySet.h>
#include <torch/csrc/autograd/custom_function.h>
#include <torch/csrc/autograd/python_cpp_function.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <cmath>
#include <mutex>
#include <vector>

namespace manual_backprop {

using torch::autograd::AutogradContext;
using torch::autograd::variable_list;

// Runs per node family (Linear, activation, loss): forwards, backwards, backwards on the direct path. The tests
// read them to prove which rule ran.
enum Family { LINEAR = 0, ACTIVATION = 1, LOSS = 2 };
std::atomic<int64_t> layer_runs[3][3];

void count(Family family, int what) { layer_runs[family][what].fetch_add(1, std::memory_order_relaxed); }

// Backward's path: direct where allowed and no double backward is asked for (it needs ATen's graph).
bool direct_backward(Family family, const Tensor& grad, at::TensorList saved, bool has_loop = true) {
  const bool direct = has_loop && !at::GradMode::is_enabled() && direct_ok(grad, saved);
  count(family, 1);
  if (direct) count(family, 2);
  return direct;
}

// g/N for reduction "mean", g for "sum" (at::Reduction: 1 mean, 2 sum)
double incoming(const Tensor& grad, int64_t reduction, int64_t N) {
  const double g = grad.scalar_type() == at::kFloat ? *grad.const_data_ptr<float>() : *grad.const_data_ptr<double>();
  return reduction == at::Reduction::Mean ? g / static_cast<double>(N) : g;
}

// ------------------------------------------------------------------ Linear

struct NativeLinear : public torch::autograd::Function<NativeLinear> {
  // a: (*, in), W: (out, in), bias: {} or {b}, b: (out,)
  static Tensor forward(AutogradContext* ctx, const Tensor& a, const Tensor& W, at::TensorList bias) {
    count(LINEAR, 0);
    const Tensor b = bias.empty() ? Tensor() : bias[0];
    const Tensor a_rows = rows(a);
    Tensor z = direct_ok(a, {W, b}) ? linear_direct(a_rows, W, b)
               : b.defined()        ? at::addmm(b, a_rows, W.t())
                                    : a_rows.mm(W.t());
    if (a.dim() != 2) {
      std::vector<int64_t> shape(a.sizes().begin(), a.sizes().end() - 1);
      shape.push_back(W.size(0));
      z = z.reshape(shape);
    }
    // a for ∂J/∂W, W for ∂J/∂a: only what the asked-for gradients need (rules/linear.py setup_context)
    // (a third, empty entry says there is a bias: cheaper than a saved_data entry)
    variable_list saved{W.requires_grad() ? a : Tensor(), a.requires_grad() ? W : Tensor()};
    if (b.defined()) saved.emplace_back();
    ctx->save_for_backward(saved);
    return z;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);  // the dtypes forward saved
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &a = saved[0], &W = saved[1];
    const Tensor delta = rows(grads[0]);  // δ = ∂J/∂z, every leading dimension flattened: (n, out)
    const bool direct = direct_backward(LINEAR, delta, {a, W});
    variable_list out(3);
    if (ctx->needs_input_grad(0)) {  // ∂J/∂a = δ W
      out[0] = direct ? product_direct(delta, false, W) : delta.mm(W);
      std::vector<int64_t> shape(grads[0].sizes().begin(), grads[0].sizes().end() - 1);
      shape.push_back(W.size(1));
      out[0] = out[0].reshape(shape);
    }
    if (ctx->needs_input_grad(1)) out[1] = direct ? product_direct(delta, true, rows(a)) : delta.t().mm(rows(a));
    if (saved.size() == 3 && ctx->needs_input_grad(2)) out[2] = direct ? column_sums_direct(delta) : delta.sum(0);  // Σₙ δ
    return out;
  }
};

Tensor linear(const Tensor& a, const Tensor& W, const std::optional<Tensor>& b) {
  return b.has_value() && b->defined() ? NativeLinear::apply(a, W, at::TensorList(*b))
                                       : NativeLinear::apply(a, W, at::TensorList());
}

// ------------------------------------------------------------------ activations

bool has_params(int64_t kind) {
  return kind == LEAKY_RELU || kind == ELU || kind == SOFTPLUS || kind == GELU || kind == HARDTANH;
}

// One node type per activation, so each grad_fn carries its rule's name
template <int64_t K>
struct NativeElementwise : public torch::autograd::Function<NativeElementwise<K>> {
  static Tensor forward(AutogradContext* ctx, const Tensor& z, double p0, double p1) {
    count(ACTIVATION, 0);
    Tensor a = sigma(z, K, p0, p1);
    ctx->save_for_backward({source_of(K) == FROM_A ? a : z});  // σ' from a where the math allows, else from z
    if (has_params(K)) ctx->saved_data["p"] = std::vector<double>{p0, p1};
    return a;
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const Tensor s = ctx->get_saved_variables()[0];
    double p0 = 0, p1 = 0;
    if (has_params(K)) {
      const auto p = ctx->saved_data["p"].toDoubleVector();
      p0 = p[0], p1 = p[1];
    }
    const bool direct = direct_backward(ACTIVATION, grads[0], {s}, delta_loop_for(K));
    // δ_z = δ ⊙ σ'
    return {direct ? delta_direct(grads[0], false, s, K, p0, p1) : delta_sigma_prime(grads[0], s, K, p0, p1),
            Tensor(), Tensor()};
  }
};

Tensor elementwise(const Tensor& z, int64_t kind, double p0, double p1) {
  switch (kind) {
    case SIGMOID: return NativeElementwise<SIGMOID>::apply(z, p0, p1);
    case TANH: return NativeElementwise<TANH>::apply(z, p0, p1);
    case RELU: return NativeElementwise<RELU>::apply(z, p0, p1);
    case LEAKY_RELU: return NativeElementwise<LEAKY_RELU>::apply(z, p0, p1);
    case ELU: return NativeElementwise<ELU>::apply(z, p0, p1);
    case SOFTPLUS: return NativeElementwise<SOFTPLUS>::apply(z, p0, p1);
    case SILU: return NativeElementwise<SILU>::apply(z, p0, p1);
    case GELU: return NativeElementwise<GELU>::apply(z, p0, p1);
    case RELU6: return NativeElementwise<RELU6>::apply(z, p0, p1);
    case HARDTANH: return NativeElementwise<HARDTANH>::apply(z, p0, p1);
    case HARDSIGMOID: return NativeElementwise<HARDSIGMOID>::apply(z, p0, p1);
    case HARDSWISH: return NativeElementwise<HARDSWISH>::apply(z, p0, p1);
    case MISH: return NativeElementwise<MISH>::apply(z, p0, p1);
  }
  TORCH_CHECK(false, "manual_backprop native activation: no node for activation code ", kind);
}

// ------------------------------------------------------------------ losses (reduction "mean" or "sum")

struct NativeMSELoss : public torch::autograd::Function<NativeMSELoss> {
  static Tensor forward(AutogradContext* ctx, const Tensor& input, const Tensor& target, int64_t reduction) {
    count(LOSS, 0);
    ctx->save_for_backward({input, target});  // ŷ and y, not ŷ − y: double backward sees ŷ − y as a function of ŷ
    ctx->saved_data["r"] = reduction;
    return at::mse_loss(input, target, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &input = saved[0], &target = saved[1], &grad = grads[0];
    const int64_t reduction = ctx->saved_data["r"].toInt();
    Tensor delta;  // δ = 2 (ŷ − y) · g/N
    if (direct_backward(LOSS, grad, {input, target})) {
      const Tensor x = input.contiguous(), y = target.contiguous();
      delta = uninitialised(x.sizes(), x);
      AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "manual_backprop::mse_loss", [&] {
        const scalar_t scale = static_cast<scalar_t>(incoming(grad, reduction, x.numel()));
        const scalar_t *px = x.const_data_ptr<scalar_t>(), *py = y.const_data_ptr<scalar_t>();
        scalar_t* d = delta.data_ptr<scalar_t>();
        for (int64_t i = 0; i < x.numel(); ++i) d[i] = 2 * (px[i] - py[i]) * scale;
      });
    } else {
      delta = 2 * (input - target) * (reduction == at::Reduction::Mean ? grad / input.numel() : grad);
    }
    return {ctx->needs_input_grad(0) ? delta : Tensor(), ctx->needs_input_grad(1) ? -delta : Tensor(), Tensor()};
  }
};

struct NativeBCEWithLogits : public torch::autograd::Function<NativeBCEWithLogits> {
  static Tensor forward(AutogradContext* ctx, const Tensor& z, const Tensor& y, int64_t reduction) {
    count(LOSS, 0);
    ctx->save_for_backward({z, y});
    ctx->saved_data["r"] = reduction;
    return at::binary_cross_entropy_with_logits(z, y, {}, {}, reduction);
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &z = saved[0], &y = saved[1], &grad = grads[0];
    const int64_t reduction = ctx->saved_data["r"].toInt();
    const bool need_z = ctx->needs_input_grad(0), need_y = ctx->needs_input_grad(1);
    Tensor grad_z, grad_y;
    if (direct_backward(LOSS, grad, {z, y})) {
      const Tensor zc = z.contiguous(), yc = y.contiguous();
      if (need_z) grad_z = uninitialised(zc.sizes(), zc);
      if (need_y) grad_y = uninitialised(zc.sizes(), zc);
      AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "manual_backprop::bce_with_logits", [&] {
        const scalar_t g = static_cast<scalar_t>(incoming(grad, reduction, zc.numel()));
        const scalar_t *pz = zc.const_data_ptr<scalar_t>(), *py = yc.const_data_ptr<scalar_t>();
        if (need_z) {  // δ = (σ(z) − y) · g/N
          scalar_t* d = grad_z.data_ptr<scalar_t>();
          for (int64_t i = 0; i < zc.numel(); ++i) d[i] = g * (1 / (1 + std::exp(-pz[i])) - py[i]);
        }
        if (need_y) {  // ∂J/∂y = −z · g/N
          scalar_t* d = grad_y.data_ptr<scalar_t>();
          for (int64_t i = 0; i < zc.numel(); ++i) d[i] = -g * pz[i];
        }
      });
    } else {
      const Tensor g = reduction == at::Reduction::Mean ? grad / z.numel() : grad;
      if (need_z) grad_z = g * (at::sigmoid(z) - y);
      if (need_y) grad_y = -g * z;
    }
    return {grad_z, grad_y, Tensor()};
  }
};

// z: (N, C) logits, target: (N,) class indices (int64), no class weights, no label smoothing
struct NativeCrossEntropy : public torch::autograd::Function<NativeCrossEntropy> {
  static Tensor forward(AutogradContext* ctx, const Tensor& z, const Tensor& target, int64_t ignore_index,
                        int64_t reduction) {
    count(LOSS, 0);
    // z, not log p: saved as the Python rule's log p is (as many bytes), and double backward sees p as a
    // function of z; backward forms p = softmax(z) again (one pass over N·C)
    ctx->save_for_backward({z, target});
    ctx->saved_data["r"] = std::vector<int64_t>{ignore_index, reduction};
    return at::nll_loss(at::log_softmax(z, 1), target, {}, reduction, ignore_index);  // checks the targets' range
  }

  static variable_list backward(AutogradContext* ctx, variable_list grads) {
    c10::impl::ExcludeDispatchKeyGuard no_autocast(c10::autocast_dispatch_keyset);
    const variable_list saved = ctx->get_saved_variables();
    const Tensor &z = saved[0], &target = saved[1], &grad = grads[0];
    const auto settings = ctx->saved_data["r"].toIntVector();
    const int64_t ignore_index = settings[0], reduction = settings[1];
    const int64_t N = z.size(0), C = z.size(1);
    Tensor grad_z;  // δ = (p − onehot(y)) · g/K, 0 on rows whose target is ignored
    if (direct_backward(LOSS, grad, {z}, target.device().is_cpu() && target.is_contiguous())) {
      const Tensor zc = z.contiguous();
      const int64_t* t = target.const_data_ptr<int64_t>();
      int64_t kept = 0;
      for (int64_t n = 0; n < N; ++n) kept += t[n] != ignore_index;
      grad_z = uninitialised({N, C}, zc);
      AT_DISPATCH_FLOATING_TYPES(zc.scalar_type(), "manual_backprop::cross_entropy", [&] {
        // every target ignored: the loss is 0/0 (nan, as torch), its gradient 0: divide by 1, not by 0
        const scalar_t g = static_cast<scalar_t>(incoming(grad, reduction, std::max<int64_t>(kept, 1)));
        const scalar_t* pz = zc.const_data_ptr<scalar_t>();
        scalar_t* d = grad_z.data_ptr<scalar_t>();
        for (int64_t n = 0; n < N; ++n) {
          const scalar_t* row = pz + n * C;
          scalar_t* out = d + n * C;
          if (t[n] == ignore_index) {
            std::fill(out, out + C, scalar_t(0));
            continue;
          }
          const scalar_t top = *std::max_element(row, row + C);
          scalar_t total = 0;
          for (int64_t c = 0; c < C; ++c) total += out[c] = std::exp(row[c] - top);
          const scalar_t scale = g / total;
          for (int64_t c = 0; c < C; ++c) out[c] *= scale;  // p · g/K
          out[t[n]] -= g;                                   // − onehot(y) · g/K
        }
      });
    } else {
      const Tensor kept = target != ignore_index;
      const Tensor denominator = reduction == at::Reduction::Mean ? kept.sum().clamp_min(1).to(z.scalar_type())
                                                                   : at::ones({}, z.options());
      const Tensor scale = (kept.to(z.scalar_type()) * (grad / denominator)).unsqueeze(1);  // g/K per kept row
      const Tensor index = at::where(kept, target, 0).unsqueeze(1);
      grad_z = (at::softmax(z, 1) * scale).scatter_add(1, index, -scale);
    }
    return {grad_z, Tensor(), Tensor(), Tensor()};
  }
};

Tensor mse_loss(const Tensor& input, const Tensor& target, int64_t reduction) {
  return NativeMSELoss::apply(input, target, reduction);
}
Tensor bce_with_logits(const Tensor& z, const Tensor& y, int64_t reduction) {
  return NativeBCEWithLogits::apply(z, y, reduction);
}
Tensor cross_entropy(const Tensor& z, const Tensor& target, int64_t ignore_index, int64_t reduction) {
  return NativeCrossEntropy::apply(z, target, ignore_index, reduction);
}

// ------------------------------------------------------------------ names, counters

// grad_fn.name(): the Python rule's node name (the type's name after its module), not the C++ class's
PyObject* rule_name(PyObject* self, PyObject* /*unused*/) {
  const char* full = Py_TYPE(self)->tp_name;
  const char* dot = std::strrchr(full, '.');
  return PyUnicode_FromString(dot != nullptr ? dot + 1 : full);
}

// torch's methods of a C++ node (THP_FUNCTION_DEFAULT_METHODS less _set_sequence_nr, which libtorch_python does
// not export), with `name` answering as the Python rule's node does
PyMethodDef node_methods[] = {
    {"_register_hook_dict", torch::autograd::THPCppFunction_register_hook_dict, METH_O, nullptr},
    {"register_hook", torch::autograd::THPCppFunction_register_hook, METH_O, nullptr},
    {"register_prehook", torch::autograd::THPCppFunction_register_prehook, METH_O, nullptr},
    {"name", rule_name, METH_NOARGS, nullptr},
    {"_sequence_nr", torch::autograd::THPCppFunction_sequence_nr, METH_NOARGS, nullptr},
    {nullptr, nullptr, 0, nullptr}};

// The Python type of each node: named as the Python rule's node, `torch.autograd.function.<Rule>Backward`.
template <class F>
void name_node(PyTypeObject& type, const char* name) {
  torch::autograd::_initFunctionPyTypeObject(type, name, nullptr, node_methods);
  Py_INCREF(&type);  // static: never freed
  torch::autograd::registerCppFunction(typeid(torch::autograd::CppNode<F>), &type);
}

void name_nodes() {
  static std::once_flag once;
  std::call_once(once, [] {
    static PyTypeObject types[16];
    const PyGILState_STATE gil = PyGILState_Ensure();
    name_node<NativeLinear>(types[0], "torch.autograd.function.LinearBackward");
    name_node<NativeElementwise<SIGMOID>>(types[1], "torch.autograd.function.SigmoidBackward");
    name_node<NativeElementwise<TANH>>(types[2], "torch.autograd.function.TanhBackward");
    name_node<NativeElementwise<RELU>>(types[3], "torch.autograd.function.ReLUBackward");
    name_node<NativeElementwise<LEAKY_RELU>>(types[4], "torch.autograd.function.LeakyReLUBackward");
    name_node<NativeElementwise<ELU>>(types[5], "torch.autograd.function.ELUBackward");
    name_node<NativeElementwise<SOFTPLUS>>(types[6], "torch.autograd.function.SoftplusBackward");
    name_node<NativeElementwise<SILU>>(types[7], "torch.autograd.function.SiLUBackward");
    name_node<NativeElementwise<GELU>>(types[8], "torch.autograd.function.GELUBackward");
    name_node<NativeElementwise<RELU6>>(types[9], "torch.autograd.function.ReLU6Backward");
    name_node<NativeElementwise<HARDTANH>>(types[10], "torch.autograd.function.HardtanhBackward");
    name_node<NativeElementwise<HARDSIGMOID>>(types[11], "torch.autograd.function.HardsigmoidBackward");
    name_node<NativeElementwise<HARDSWISH>>(types[12], "torch.autograd.function.HardswishBackward");
    name_node<NativeElementwise<MISH>>(types[13], "torch.autograd.function.MishBackward");
    name_node<NativeMSELoss>(types[14], "torch.autograd.function.MSELossBackward");
    name_node<NativeBCEWithLogits>(types[15], "torch.autograd.function.BinaryCrossEntropyWithLogitsBackward");
    static PyTypeObject cross_entropy_type;
    name_node<NativeCrossEntropy>(cross_entropy_type, "torch.autograd.function.CrossEntropyBackward");
    PyGILState_Release(gil);
  });
}

std::vector<int64_t> layer_counts() {
  std::vector<int64_t> counts;
  for (auto& family : layer_runs) {
    for (auto& n : family) counts.push_back(n.load());
  }
  return counts;
}

}  // namespace manual_backprop

TORCH_LIBRARY_FRAGMENT(manual_backprop, m) {
  m.def("linear(Tensor a, Tensor W, Tensor? b) -> Tensor");
  m.def("elementwise(Tensor z, int kind, float p0, float p1) -> Tensor");
  m.def("mse_loss(Tensor input, Tensor target, int reduction) -> Tensor");
  m.def("bce_with_logits(Tensor z, Tensor y, int reduction) -> Tensor");
  m.def("cross_entropy(Tensor z, Tensor target, int ignore_index, int reduction) -> Tensor");
  m.def("name_nodes() -> ()", &manual_backprop::name_nodes);
  m.def("layer_counts() -> int[]", &manual_backprop::layer_counts);
}

TORCH_LIBRARY_IMPL(manual_backprop, CompositeImplicitAutograd, m) {
  m.impl("linear", &manual_backprop::linear);
  m.impl("elementwise", &manual_backprop::elementwise);
  m.impl("mse_loss", &manual_backprop::mse_loss);
  m.impl("bce_with_logits", &manual_backprop::bce_with_logits);
  m.impl("cross_entropy", &manual_backprop::cross_entropy);
}
