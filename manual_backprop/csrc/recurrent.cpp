// The loops over time of rules/recurrent.py (the readable reference), in C++: one step's gate arithmetic
// as plain passes over its rows, the products and the vectorised σ and tanh by ATen (the LSTM's tanh as
// 2σ(2z) − 1, and its input product x W_ihᵀ over every step here too). The Python rules call these for their
// forward and backward loops (CPU, float32/float64, no double backward, no autocast); everything else (the
// products over all steps for the weight gradients, observe, feedback) stays in the Python rule.
//
// Layout as there: step t owns rows [start_t, start_t + B_t) of the packed tensors, the B_t sequences
// still running first; a full (N, ·) state whose first B_t rows the step updates.

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
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

// The state step k (in the order the recursion runs) starts from, rows [0, B): the previous step's rows where
// they cover all B (no copy), else those rows then `init`'s for the sequences that start here, gathered in `buffer`.
Tensor state_before(const std::vector<Step>& order, size_t k, const Tensor& seq, const Tensor& init, Tensor& buffer) {
  const int64_t B = order[k].B;
  if (k == 0) return first(init, B);
  const Step& p = order[k - 1];
  if (p.B >= B) return rows(seq, p).narrow(0, 0, B);
  Tensor into = first(buffer, B);
  first(into, p.B).copy_(rows(seq, p));
  into.narrow(0, p.B, B - p.B).copy_(init.narrow(0, p.B, B - p.B));
  return into;
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

// Returns (h packed, h_n, c_n, gates i|f|g|o packed, c packed). The gates buffer starts as x W_ihᵀ + b (one
// product over every step); each step adds h_{t−1} W_hhᵀ to its rows in place.
std::tuple<Tensor, Tensor, Tensor, Tensor, Tensor> lstm_forward(const Tensor& x, const Tensor& W_ih, const c10::optional<Tensor>& b,
                                                                const Tensor& h0_, const Tensor& c0_,
                                                                const Tensor& W_hh, const c10::optional<Tensor>& W_hr,
                                                                at::IntArrayRef batch_sizes, bool reverse) {
  const Tensor h0 = h0_.contiguous(), c0 = c0_.contiguous();
  const int64_t H = c0.size(1), N = h0.size(0);
  const bool proj = W_hr.has_value() && W_hr->defined();
  Tensor gates = b.has_value() && b->defined() ? at::addmm(*b, x, W_ih.t()) : at::mm(x, W_ih.t());
  // tanh(z) = 2σ(2z) − 1: ATen's σ runs several times faster than its tanh here, and doubling is exact. So the
  // g rows of W_hh and of x W_ihᵀ + b are doubled once, one σ pass covers all four gates, and g = 2σ − 1.
  // W_hhᵀ laid out (Hr, 4H) row-major once, so that each step's h_{t−1} W_hhᵀ is a plain product, no transpose.
  gates.narrow(1, 2 * H, H).mul_(2);
  const Tensor Wt = W_hh.t().contiguous();
  Wt.narrow(1, 2 * H, H).mul_(2);
  const int64_t total = gates.size(0);
  Tensor cells = at::empty({total, H}, gates.options()), out = at::empty({total, h0.size(1)}, gates.options());
  Tensor h_buffer = at::empty_like(h0), c_buffer = at::empty_like(c0), tanh_c = at::empty({N, H}, gates.options());
  Tensor m = proj ? at::empty({N, H}, gates.options()) : Tensor();
  const std::vector<Step> order = steps(batch_sizes, reverse);
  for (size_t k = 0; k < order.size(); ++k) {
    const Step& s = order[k];
    Tensor z = rows(gates, s);
    at::addmm_out(z, z, state_before(order, k, out, h0, h_buffer), Wt);  // z_t = x_t W_ihᵀ + b + h_{t−1} W_hhᵀ
    z.sigmoid_();                                                         // i, f, o = σ(z); σ(2 z_g) for g
    const Tensor c_prev = state_before(order, k, cells, c0, c_buffer);
    Tensor tc = first(tanh_c, s.B);
    Tensor h_t = proj ? first(m, s.B) : rows(out, s);
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_cell", [&] {
      scalar_t* __restrict__ a = z.data_ptr<scalar_t>();
      const scalar_t* __restrict__ cp = c_prev.data_ptr<scalar_t>();
      scalar_t* __restrict__ c = cells.data_ptr<scalar_t>() + s.start * H;
      scalar_t* __restrict__ c2 = tc.data_ptr<scalar_t>();
      for (int64_t n = 0; n < s.B; ++n, a += 4 * H, cp += H, c += H, c2 += H)
        for (int64_t j = 0; j < H; ++j) {
          const scalar_t g = 2 * a[2 * H + j] - 1;  // g = tanh(z_g)
          a[2 * H + j] = g;
          c[j] = a[H + j] * cp[j] + a[j] * g;  // c_t = f ⊙ c_{t−1} + i ⊙ g
          c2[j] = 2 * c[j];
        }
    });
    tc.sigmoid_();  // σ(2 c_t)
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_output", [&] {
      const scalar_t* __restrict__ a = z.data_ptr<scalar_t>();
      const scalar_t* __restrict__ sc = tc.data_ptr<scalar_t>();
      scalar_t* __restrict__ o = h_t.data_ptr<scalar_t>();
      for (int64_t n = 0; n < s.B; ++n, a += 4 * H, sc += H, o += H)
        for (int64_t j = 0; j < H; ++j) o[j] = a[3 * H + j] * (2 * sc[j] - 1);  // m_t = o ⊙ tanh(c_t)
    });
    if (proj) {
      Tensor o = rows(out, s);
      at::mm_out(o, h_t, W_hr->t());  // h_t = W_hr m_t
    }
  }
  return {out, final_state(order, out, h0), final_state(order, cells, c0), gates, cells};
}

// One step of the LSTM's δs, row by row (a function of its own, with restrict pointers, so that the
// compiler vectorises the inner loop): δc_t, δz_t = (δi, δf, δg, δo) pre-activation, δc_{t−1} into dc.
// add_above: δm_t = dm + up (δ from above, without proj_size), else dm.
template <typename scalar_t, bool add_above>
void lstm_delta(const scalar_t* __restrict__ a, const scalar_t* __restrict__ c, const scalar_t* __restrict__ cp,
                const scalar_t* __restrict__ dm, const scalar_t* __restrict__ up, scalar_t* __restrict__ dc,
                scalar_t* __restrict__ dz, int64_t B, int64_t H) {
  for (int64_t n = 0; n < B; ++n, a += 4 * H, c += H, cp += H, dm += H, dc += H, dz += 4 * H) {
    for (int64_t j = 0; j < H; ++j) {
      const scalar_t i = a[j], f = a[H + j], g = a[2 * H + j], o = a[3 * H + j];
      const scalar_t tc = c[j], d_m = add_above ? dm[j] + up[n * H + j] : dm[j];
      const scalar_t d_c = dc[j] + d_m * o * (1 - tc * tc);  // δc_t
      dz[j] = d_c * g * i * (1 - i);
      dz[H + j] = d_c * cp[j] * f * (1 - f);
      dz[2 * H + j] = d_c * i * (1 - g * g);
      dz[3 * H + j] = d_m * tc * o * (1 - o);
      dc[j] = d_c * f;  // δc_{t−1} = δc_t ⊙ f
    }
  }
}

// The LSTM's backward loop: (δz packed, δh packed (proj only), δh0, δc0). B_hh, B_hr: what δ goes back through.
std::tuple<Tensor, Tensor, Tensor, Tensor> lstm_backward(const c10::optional<Tensor>& delta_out_, const Tensor& delta_hn,
                                                         const Tensor& delta_cn, const Tensor& gates, const Tensor& cells,
                                                         const Tensor& c_prev, const Tensor& B_hh,
                                                         const c10::optional<Tensor>& B_hr, at::IntArrayRef batch_sizes,
                                                         bool reverse) {
  const int64_t total = gates.size(0), H = cells.size(1);
  const bool proj = B_hr.has_value() && B_hr->defined();
  const bool from_above = delta_out_.has_value() && delta_out_->defined();
  const Tensor delta_out = from_above ? delta_out_->contiguous() : Tensor();
  Tensor delta_h = delta_hn.contiguous().clone(), delta_c = delta_cn.contiguous().clone();
  Tensor delta_z = at::empty({total, 4 * H}, gates.options());
  Tensor delta_hs = proj ? at::empty({total, delta_h.size(1)}, gates.options()) : at::empty({0}, gates.options());
  Tensor dm_buffer = proj ? at::empty({delta_h.size(0), H}, gates.options()) : Tensor();
  const Tensor tanh_cells = at::sigmoid(cells * 2).mul_(2).sub_(1);  // tanh(c) = 2σ(2c) − 1, every row at once
  std::vector<Step> order = steps(batch_sizes, reverse);
  for (auto s = order.rbegin(); s != order.rend(); ++s) {
    Tensor dh = first(delta_h, s->B);
    Tensor dm = dh;  // δm_t = δh_t (+ δ from above, added in the pass below), or B_hrᵀ δh_t with proj_size
    if (proj) {
      Tensor dh_t = rows(delta_hs, *s);
      if (from_above) at::add_out(dh_t, dh, rows(delta_out, *s));  // δh_t: from above + from t+1
      else dh_t.copy_(dh);
      dm = first(dm_buffer, s->B);
      at::mm_out(dm, dh_t, *B_hr);
    }
    AT_DISPATCH_FLOATING_TYPES(gates.scalar_type(), "lstm_backward", [&] {
      const int64_t row = s->start;
      const scalar_t* up = from_above && !proj ? delta_out.data_ptr<scalar_t>() + row * H : nullptr;
      (up ? lstm_delta<scalar_t, true> : lstm_delta<scalar_t, false>)(
          gates.data_ptr<scalar_t>() + row * 4 * H, tanh_cells.data_ptr<scalar_t>() + row * H,
          c_prev.data_ptr<scalar_t>() + row * H, dm.data_ptr<scalar_t>(), up, delta_c.data_ptr<scalar_t>(),
          delta_z.data_ptr<scalar_t>() + row * 4 * H, s->B, H);
    });
    at::mm_out(dh, rows(delta_z, *s), B_hh);  // δh_{t−1} = B_hhᵀ δz_t
  }
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
        "Tensor c_prev, Tensor B_hh, Tensor? B_hr, int[] batch_sizes, bool reverse) -> (Tensor, Tensor, Tensor, Tensor)");
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
