// The loops over time of rules/recurrent.py (the readable reference), in C++: one step's gate arithmetic
// as plain passes over its rows; the GRU's σ and tanh by ATen, the LSTM's in the same one pass (σ and tanh
// below, vectorised by the compiler: one pass, not an ATen call and a pass over memory per function). The
// products: the GRU's by ATen; the LSTM's (its per-step ones and its input product x W_ihᵀ over every step)
// straight to torch's BLAS through direct.h where found, else ATen. The Python rules call these for their
// forward and backward loops (CPU, float32/float64, no double backward, no autocast); everything else (the
// products over all steps for the weight gradients, observe, feedback) stays in the Python rule.
//
// Layout as there: step t owns rows [start_t, start_t + B_t) of the packed tensors, the B_t sequences
// still running first; a full (N, ·) state whose first B_t rows the step updates.

#include "direct.h"

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <tuple>
#include <vector>

using at::Tensor;

namespace {

struct Step {
  int64_t start, B;
};

// The steps in the order the forward recursion runs (reverse: t = T-1 ... 0).
std::vector<Step> steps(at::IntArrayRef sizes, bool reverse) {
  std::vector<int64_t> offset(sizes.size() + 1, 0);
  for (size_t t = 0; t < sizes.size(); ++t) offset[t + 1] = offset[t] + sizes[t];
  std::vector<Step> order;
  for (size_t k = 0; k < sizes.size(); ++k) {
    const size_t t = reverse ? sizes.size() - 1 - k : k;
    order.push_back({offset[t], sizes[t]});
  }
  return order;
}

Tensor rows(const Tensor& t, const Step& s) { return t.narrow(0, s.start, s.B); }
Tensor first(const Tensor& t, int64_t B) { return t.narrow(0, 0, B); }

// The state step k (in the order the recursion runs) starts from, B rows of `width`: the previous step's rows
// where they cover all B (no copy), else those rows then `init`'s for the sequences that start here, gathered in
// `buffer`. Raw row-major memory, as the step's products and passes read it.
template <typename T>
const T* state_before(const std::vector<Step>& order, size_t k, const T* seq, const T* init, T* buffer, int64_t width) {
  const int64_t B = order[k].B;
  if (k == 0) return init;
  const Step& p = order[k - 1];
  if (p.B >= B) return seq + p.start * width;
  std::copy(seq + p.start * width, seq + (p.start + p.B) * width, buffer);
  std::copy(init + p.B * width, init + B * width, buffer + p.B * width);
  return buffer;
}

// C = A B (+ C where accumulate) for row-major contiguous A (m, k), B (k, n), C (m, n): BLAS straight, as the
// direct path of mlp.cpp, where torch's is found (an ATen product costs a few µs of dispatch, every step), else ATen.
template <typename T>
void product(const T* A, const T* B, T* C, int64_t m, int64_t k, int64_t n, bool accumulate, const Tensor& like) {
  if (manual_backprop::has_blas()) return manual_backprop::gemm<T>(false, false, m, n, k, A, B, T(accumulate), C);
  const auto options = like.options();
  Tensor a = at::from_blob(const_cast<T*>(A), {m, k}, options), b = at::from_blob(const_cast<T*>(B), {k, n}, options);
  Tensor c = at::from_blob(C, {m, n}, options);
  if (accumulate) at::addmm_out(c, c, a, b);
  else at::mm_out(c, a, b);
}

// Each sequence's last state (h_n): after step k, the rows the next step no longer runs.
Tensor final_state(const std::vector<Step>& order, const Tensor& seq, const Tensor& init) {
  Tensor last = init.contiguous().clone();
  for (size_t k = 0; k < order.size(); ++k) {
    const int64_t next = k + 1 < order.size() ? std::min(order[k + 1].B, order[k].B) : 0;
    if (next < order[k].B) last.narrow(0, next, order[k].B - next).copy_(rows(seq, order[k]).narrow(0, next, order[k].B - next));
  }
  return last;
}

// σ and tanh one value at a time, written so that a loop over them vectorises (no branch, no call): e^x for x ≤ 0 by
// Cody–Waite range reduction, x = n ln 2 + r with |r| ≤ ln 2 / 2, then Cephes' polynomial (float) or Padé form (double)
// for e^r, about 1 ulp, and 2^n written straight into the exponent bits. Below −87 (float) or −708 (double) e^x is
// held at e^−87, e^−708: σ and tanh there are 0 and ±1 to within those.
inline float exp_nonpositive(float x) {
  x = x < -87.0f ? -87.0f : x;
  const float shifter = 12582912.0f;  // 1.5 · 2²³: adding it rounds x log₂e to the integer n, kept in the low bits
  const float t = x * 1.44269504088896341f + shifter, n = t - shifter;
  const float r = (x - n * 0.693359375f) - n * -2.12194440e-4f;  // ln 2 in two parts: n · 0.693359375 is exact
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * (r * r) + r + 1.0f;
  int32_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - 0x4B400000 + 127) << 23;  // 2ⁿ
  float scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return p * scale;
}

inline double exp_nonpositive(double x) {
  x = x < -708.0 ? -708.0 : x;
  const double shifter = 6755399441055744.0;  // 1.5 · 2⁵²
  const double t = x * 1.4426950408889634 + shifter, n = t - shifter;
  const double r = (x - n * 6.93145751953125e-1) - n * 1.42860682030941723212e-6;
  const double rr = r * r;
  const double px = r * ((1.26177193074810590878e-4 * rr + 3.02994407707441961300e-2) * rr + 9.99999999999999999910e-1);
  const double q = ((3.00198505138664455042e-6 * rr + 2.52448340349684104192e-3) * rr + 2.27265548208155028766e-1) * rr +
                   2.00000000000000000009e0;
  const double e = 1.0 + 2.0 * px / (q - px);
  int64_t bits;
  std::memcpy(&bits, &t, sizeof bits);
  bits = (bits - 0x4338000000000000LL + 1023) << 52;
  double scale;
  std::memcpy(&scale, &bits, sizeof scale);
  return e * scale;
}

template <typename T>
inline T sigmoid(T z) {  // 1 / (1 + e^−z), from e^−|z| so that nothing overflows
  const T e = exp_nonpositive(z < 0 ? z : -z), s = 1 / (1 + e);
  return z < 0 ? e * s : s;
}

template <typename T>
inline T tanh_of(T z) {  // (1 − e^−2|z|) / (1 + e^−2|z|), signed
  const T e = exp_nonpositive(z < 0 ? 2 * z : -2 * z), t = (1 - e) / (1 + e);
  return z < 0 ? -t : t;
}

// The step loops below do a few exponentials per value: AVX2 where the processor has it (GCC picks at load time).
#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define MANUAL_BACKPROP_CLONES __attribute__((target_clones("arch=x86-64-v3", "default")))
#else
#define MANUAL_BACKPROP_CLONES
#endif

// One step's gates and cell in one pass over its rows, z holding x W_ihᵀ + h_{t−1} W_hhᵀ: i, f, o = σ(z + b),
// g = tanh(z_g + b_g), in place of z; c_t = f ⊙ c_{t−1} + i ⊙ g; m_t = o ⊙ tanh(c_t).
template <typename scalar_t>
MANUAL_BACKPROP_CLONES void lstm_step(scalar_t* __restrict__ a, const scalar_t* __restrict__ b,
                                      const scalar_t* __restrict__ cp, scalar_t* __restrict__ c,
                                      scalar_t* __restrict__ m, int64_t B, int64_t H) {
  for (int64_t n = 0; n < B; ++n, a += 4 * H, cp += H, c += H, m += H)
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t i = sigmoid(a[j] + b[j]), f = sigmoid(a[H + j] + b[H + j]);
      const scalar_t g = tanh_of(a[2 * H + j] + b[2 * H + j]), o = sigmoid(a[3 * H + j] + b[3 * H + j]);
      a[j] = i, a[H + j] = f, a[2 * H + j] = g, a[3 * H + j] = o;
      c[j] = f * cp[j] + i * g;
      m[j] = o * tanh_of(c[j]);
    }
}

// Returns (h packed, h_n, c_n, gates i|f|g|o packed, c packed). The gates buffer starts as x W_ihᵀ (one product
// over every step); each step adds h_{t−1} W_hhᵀ to its rows in place, then b and the activations in lstm_step.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(const Tensor& x, const Tensor& W_ih, const c10::optional<Tensor>& b,
                                                                const Tensor& h0_, const Tensor& c0_,
                                                                const Tensor& W_hh, const c10::optional<Tensor>& W_hr,
                                                                at::IntArrayRef batch_sizes, bool reverse) {
  const Tensor h0 = h0_.contiguous(), c0 = c0_.contiguous();
  const int64_t H = c0.size(1), N = h0.size(0);
  const bool proj = W_hr.has_value() && W_hr->defined();
  // W_ihᵀ and W_hhᵀ laid out (in, 4H) row-major once, so that x W_ihᵀ and each step's h_{t−1} W_hhᵀ are plain products
  const Tensor W_in = W_ih.t().contiguous(), Wt = W_hh.t().contiguous();
  const bool bias = b.has_value() && b->defined();
  const Tensor input = x.contiguous();
  const int64_t total = input.size(0);
  Tensor gates = at::empty({total, 4 * H}, input.options());
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_input", [&] {  // x W_ihᵀ + b, every step at once
    if (!manual_backprop::has_blas()) return void(bias ? at::addmm_out(gates, *b, input, W_in) : at::mm_out(gates, input, W_in));
    manual_backprop::gemm<scalar_t>(false, false, total, 4 * H, input.size(1), input.const_data_ptr<scalar_t>(),
                                    W_in.const_data_ptr<scalar_t>(), scalar_t(0), gates.data_ptr<scalar_t>());
  });
  // b is added step by step, in the pass that reads the step's rows anyway: not one more pass over every step's gates
  const Tensor b_step = bias && manual_backprop::has_blas() ? b->contiguous() : at::zeros({4 * H}, gates.options());
  const int64_t Hr = h0.size(1);
  Tensor cells = at::empty({total, H}, gates.options()), out = at::empty({total, Hr}, gates.options());
  Tensor h_buffer = at::empty_like(h0), c_buffer = at::empty_like(c0);
  Tensor m = proj ? at::empty({N, H}, gates.options()) : Tensor();
  const Tensor W_hr_t = proj ? W_hr->t().contiguous() : Tensor();  // (H, Hr): h_t = m_t W_hrᵀ, a plain product
  const std::vector<Step> order = steps(batch_sizes, reverse);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_forward", [&] {
    for (size_t k = 0; k < order.size(); ++k) {
      const Step& s = order[k];
      scalar_t* a = gates.data_ptr<scalar_t>() + s.start * 4 * H;
      const scalar_t* h_prev = state_before(order, k, out.const_data_ptr<scalar_t>(), h0.const_data_ptr<scalar_t>(),
                                            h_buffer.data_ptr<scalar_t>(), Hr);
      product(h_prev, Wt.const_data_ptr<scalar_t>(), a, s.B, Hr, 4 * H, true, gates);  // z_t += h_{t−1} W_hhᵀ
      const scalar_t* cp = state_before(order, k, cells.const_data_ptr<scalar_t>(),
                                                     c0.const_data_ptr<scalar_t>(), c_buffer.data_ptr<scalar_t>(), H);
      scalar_t* h_t = proj ? m.data_ptr<scalar_t>() : out.data_ptr<scalar_t>() + s.start * Hr;
      lstm_step(a, b_step.const_data_ptr<scalar_t>(), cp, cells.data_ptr<scalar_t>() + s.start * H, h_t, s.B, H);
      if (proj) product(h_t, W_hr_t.const_data_ptr<scalar_t>(), out.data_ptr<scalar_t>() + s.start * Hr, s.B, H, Hr,
                        false, gates);  // h_t = W_hr m_t
    }
  });
  return {out, final_state(order, out, h0), final_state(order, cells, c0), gates, cells};
}

// One step of the LSTM's δs in one pass over its rows, tanh(c_t) formed again from c_t: δc_t, δz_t = (δi, δf, δg, δo)
// pre-activation, δc_{t−1} into dc. add_above: δm_t = dm + up (δ from above, without proj_size), else dm.
template <typename scalar_t, bool add_above>
MANUAL_BACKPROP_CLONES void lstm_delta(const scalar_t* __restrict__ a, const scalar_t* __restrict__ c,
                                       const scalar_t* __restrict__ cp, const scalar_t* __restrict__ dm,
                                       const scalar_t* __restrict__ up, scalar_t* __restrict__ dc,
                                       scalar_t* __restrict__ dz, int64_t B, int64_t H) {
  for (int64_t n = 0; n < B; ++n, a += 4 * H, c += H, cp += H, dm += H, dc += H, dz += 4 * H) {
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
      const scalar_t tc = tanh_of(c[j]), d_m = add_above ? dm[j] + up[n * H + j] : dm[j];
      const scalar_t d_c = dc[j] + d_m * o * (1 - tc * tc);  // δc_t
      dz[j] = d_c * g * i * (1 - i);
      dz[H + j] = d_c * cp[j] * f * (1 - f);
      dz[2 * H + j] = d_c * i * (1 - g * g);
      dz[3 * H + j] = d_m * tc * o * (1 - o);
      dc[j] = d_c * f;  // δc_{t−1} = δc_t ⊙ f
    }
  }
}

// The LSTM's backward loop: (δz packed, δh packed (proj only), δh0, δc0). B_hh, B_hr: what δ goes back through;
// c_{t−1} read from `cells` and c0 as the forward read it.
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward(const c10::optional<Tensor>& delta_out_, const Tensor& delta_hn,
                                                         const Tensor& delta_cn, const Tensor& gates, const Tensor& cells,
                                                         const Tensor& c0_, const Tensor& B_hh,
                                                         const c10::optional<Tensor>& B_hr, at::IntArrayRef batch_sizes,
                                                         bool reverse) {
  const int64_t total = gates.size(0), H = cells.size(1);
  const bool proj = B_hr.has_value() && B_hr->defined();
  const bool from_above = delta_out_.has_value() && delta_out_->defined();
  const Tensor delta_out = from_above ? delta_out_->contiguous() : Tensor();
  Tensor delta_h = delta_hn.contiguous().clone(), delta_c = delta_cn.contiguous().clone();
  const Tensor c0 = c0_.contiguous();
  Tensor c_buffer = at::empty_like(c0);
  Tensor delta_z = at::empty({total, 4 * H}, gates.options());
  Tensor delta_hs = proj ? at::empty({total, delta_h.size(1)}, gates.options()) : at::empty({0}, gates.options());
  Tensor dm_buffer = proj ? at::empty({delta_h.size(0), H}, gates.options()) : Tensor();
  const Tensor B_hh_ = B_hh.contiguous(), B_hr_ = proj ? B_hr->contiguous() : Tensor();
  const int64_t Hr = delta_h.size(1);
  std::vector<Step> order = steps(batch_sizes, reverse);
  AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_backward", [&] {
    scalar_t* dh = delta_h.data_ptr<scalar_t>();
    for (size_t k = order.size(); k-- > 0;) {
      const Step* s = &order[k];
      const int64_t row = s->start;
      const scalar_t* dm = dh;  // δm_t = δh_t (+ δ from above, added in lstm_delta), or δh_t B_hr with proj_size
      if (proj) {
        scalar_t* dh_t = delta_hs.data_ptr<scalar_t>() + row * Hr;  // δh_t: from t+1 (+ from above)
        const scalar_t* above = from_above ? delta_out.const_data_ptr<scalar_t>() + row * Hr : nullptr;
        for (int64_t i = 0; i < s->B * Hr; ++i) dh_t[i] = above ? dh[i] + above[i] : dh[i];
        product(dh_t, B_hr_.const_data_ptr<scalar_t>(), dm_buffer.data_ptr<scalar_t>(), s->B, Hr, H, false, gates);
        dm = dm_buffer.data_ptr<scalar_t>();
      }
      const scalar_t* up = from_above && !proj ? delta_out.const_data_ptr<scalar_t>() + row * H : nullptr;
      scalar_t* dz = delta_z.data_ptr<scalar_t>() + row * 4 * H;
      const scalar_t* cp = state_before(order, k, cells.const_data_ptr<scalar_t>(), c0.const_data_ptr<scalar_t>(),
                                        c_buffer.data_ptr<scalar_t>(), H);
      (up ? lstm_delta<scalar_t, true> : lstm_delta<scalar_t, false>)(
          gates.const_data_ptr<scalar_t>() + row * 4 * H, cells.const_data_ptr<scalar_t>() + row * H,
          cp, dm, up, delta_c.data_ptr<scalar_t>(), dz, s->B, H);
      product(dz, B_hh_.const_data_ptr<scalar_t>(), dh, s->B, 4 * H, Hr, false, gates);  // δh_{t−1} = B_hhᵀ δz_t
    }
  });
  return {delta_z, delta_hs, delta_h, delta_c};
}

// zx: x W_ihᵀ + b_ih, every row. Returns (h packed, h_n, r|u|n|z^h_n packed).
std::tuple<Tensor, Tensor, Tensor> gru_forward(const Tensor& zx, const Tensor& h0, const Tensor& W_hh,
                                               const c10::optional<Tensor>& b_hh, at::IntArrayRef batch_sizes,
                                               bool reverse) {
  const int64_t total = zx.size(0), H = h0.size(1);
  Tensor out = at::empty({total, H}, zx.options()), kept = at::empty({total, 4 * H}, zx.options());
  Tensor h = h0.contiguous().clone(), zh = at::empty({h0.size(0), 3 * H}, zx.options());
  const bool bias = b_hh.has_value() && b_hh->defined();
  const Tensor Wt = W_hh.t();
  for (const Step& s : steps(batch_sizes, reverse)) {
    Tensor zh_t = first(zh, s.B);
    if (bias) at::addmm_out(zh_t, *b_hh, first(h, s.B), Wt);
    else at::mm_out(zh_t, first(h, s.B), Wt);
    Tensor k = rows(kept, s);  // r | u | n | z^h_n, built in place: pre-activations, then ATen's σ and tanh
    AT_DISPATCH_FLOATING_TYPES(zx.scalar_type(), "gru_gates", [&] {
      const scalar_t* x = zx.data_ptr<scalar_t>() + s.start * 3 * H;
      const scalar_t* zhp = zh_t.data_ptr<scalar_t>();
      scalar_t* kp = k.data_ptr<scalar_t>();
      for (int64_t n = 0; n < s.B; ++n)
        for (int64_t j = 0; j < 2 * H; ++j) kp[n * 4 * H + j] = x[n * 3 * H + j] + zhp[n * 3 * H + j];
    });
    k.narrow(1, 0, 2 * H).sigmoid_();  // r, u
    AT_DISPATCH_FLOATING_TYPES(zx.scalar_type(), "gru_candidate", [&] {
      const scalar_t* x = zx.data_ptr<scalar_t>() + s.start * 3 * H;
      const scalar_t* zhp = zh_t.data_ptr<scalar_t>();
      scalar_t* kp = k.data_ptr<scalar_t>();
      for (int64_t n = 0; n < s.B; ++n)
        for (int64_t j = 0; j < H; ++j) {
          const scalar_t zh_n = zhp[n * 3 * H + 2 * H + j];
          kp[n * 4 * H + 2 * H + j] = x[n * 3 * H + 2 * H + j] + kp[n * 4 * H + j] * zh_n;
          kp[n * 4 * H + 3 * H + j] = zh_n;
        }
    });
    k.narrow(1, 2 * H, H).tanh_();  // n = tanh(z^x_n + r ⊙ z^h_n)
    AT_DISPATCH_FLOATING_TYPES(zx.scalar_type(), "gru_state", [&] {
      const scalar_t* kp = k.data_ptr<scalar_t>();
      scalar_t* hp = h.data_ptr<scalar_t>();
      scalar_t* o = out.data_ptr<scalar_t>() + s.start * H;
      for (int64_t n = 0; n < s.B; ++n)
        for (int64_t j = 0; j < H; ++j) {
          const scalar_t u = kp[n * 4 * H + H + j], nn = kp[n * 4 * H + 2 * H + j];
          hp[n * H + j] = o[n * H + j] = nn + u * (hp[n * H + j] - nn);  // (1 − u) ⊙ n + u ⊙ h_{t−1}
        }
    });
  }
  return {out, h, kept};
}

// The GRU's backward loop: (δz^x packed, δz^h packed, δh0).
std::tuple<Tensor, Tensor, Tensor> gru_backward(const c10::optional<Tensor>& delta_out, const Tensor& delta_hn,
                                                const Tensor& kept, const Tensor& h_prev, const Tensor& B_hh,
                                                at::IntArrayRef batch_sizes, bool reverse) {
  const int64_t total = kept.size(0), H = h_prev.size(1);
  Tensor delta_h = delta_hn.contiguous().clone(), direct = at::empty_like(delta_h);
  Tensor delta_zx = at::empty({total, 3 * H}, kept.options()), delta_zh = at::empty({total, 3 * H}, kept.options());
  std::vector<Step> order = steps(batch_sizes, reverse);
  for (auto s = order.rbegin(); s != order.rend(); ++s) {
    Tensor dh = first(delta_h, s->B);
    if (delta_out.has_value() && delta_out->defined()) dh.add_(rows(*delta_out, *s));
    AT_DISPATCH_FLOATING_TYPES(kept.scalar_type(), "gru_backward", [&] {
      const scalar_t* k = kept.data_ptr<scalar_t>() + s->start * 4 * H;
      const scalar_t* hp = h_prev.data_ptr<scalar_t>() + s->start * H;
      const scalar_t* d = dh.data_ptr<scalar_t>();
      scalar_t* dx = delta_zx.data_ptr<scalar_t>() + s->start * 3 * H;
      scalar_t* dhh = delta_zh.data_ptr<scalar_t>() + s->start * 3 * H;
      scalar_t* dir = direct.data_ptr<scalar_t>();
      for (int64_t n = 0; n < s->B; ++n) {
        const scalar_t* kn = k + n * 4 * H;
        for (int64_t j = 0; j < H; ++j) {
          const scalar_t r = kn[j], u = kn[H + j], nn = kn[2 * H + j], zh_n = kn[3 * H + j], dh_t = d[n * H + j];
          const scalar_t d_n = dh_t * (1 - u) * (1 - nn * nn);
          const scalar_t d_u = dh_t * (hp[n * H + j] - nn) * u * (1 - u);
          const scalar_t d_r = d_n * zh_n * r * (1 - r);
          dx[n * 3 * H + j] = dhh[n * 3 * H + j] = d_r;
          dx[n * 3 * H + H + j] = dhh[n * 3 * H + H + j] = d_u;
          dx[n * 3 * H + 2 * H + j] = d_n;
          dhh[n * 3 * H + 2 * H + j] = d_n * r;
          dir[n * H + j] = dh_t * u;  // the path to h_{t−1} that skips W_hh
        }
      }
    });
    at::addmm_out(dh, first(direct, s->B), rows(delta_zh, *s), B_hh);  // δh_{t−1} = u ⊙ δh_t + B_hhᵀ δz^h_t
  }
  return {delta_zx, delta_zh, delta_h};
}

}  // namespace

TORCH_LIBRARY(manual_backprop_recurrent, m) {
  m.def("lstm_forward(Tensor x, Tensor W_ih, Tensor? b, Tensor h0, Tensor c0, Tensor W_hh, Tensor? W_hr, int[] batch_sizes, "
        "bool reverse)"
        " -> (Tensor, Tensor, Tensor, Tensor, Tensor)");
  m.def("lstm_backward(Tensor? delta_out, Tensor delta_hn, Tensor delta_cn, Tensor gates, Tensor cells, "
        "Tensor c0, Tensor B_hh, Tensor? B_hr, int[] batch_sizes, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("gru_forward(Tensor zx, Tensor h0, Tensor W_hh, Tensor? b_hh, int[] batch_sizes, bool reverse)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("gru_backward(Tensor? delta_out, Tensor delta_hn, Tensor kept, Tensor h_prev, Tensor B_hh, int[] batch_sizes, "
        "bool reverse) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(manual_backprop_recurrent, CPU, m) {
  m.impl("lstm_forward", &lstm_forward);
  m.impl("lstm_backward", &lstm_backward);
  m.impl("gru_forward", &gru_forward);
  m.impl("gru_backward", &gru_backward);
}
