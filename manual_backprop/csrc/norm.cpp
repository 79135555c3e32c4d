// The normalisation rules of rules/norm.py (the readable reference) for LayerNorm, GroupNorm and BatchNorm in
// training, as plain loops: torch's unfused ops take about ten passes over x for forward + backward, these
// take five (forward: Σx, Σ(x − μ)², y; backward: Σδ and Σδ·x̂, which give ∂J/∂γ, ∂J/∂β; then ∂J/∂x). The
// Python rules call them on CPU for contiguous float32/float64 inputs without double backward; the rest
// (observe, other dtypes and layouts, double backward) stays in Python.
//
// LayerNorm and GroupNorm are "rows": x viewed as `rows` rows of D elements, each normalised alone.
//   LayerNorm: a row is one sample's normalized_shape; γ, β index the row's element j.
//   GroupNorm: a row is one (sample, group): C/G channels of `spatial` positions each; row r is group
//              r mod G, so element j has channel (r mod G)·C/G + j / spatial.
// BatchNorm normalises each channel over its N runs of S positions.
//
//   x̂ = (x − μ)·rstd,  y = γ x̂ + β
//   g = δ γ,  ∂J/∂x = rstd·(g − mean(g) − x̂·mean(g·x̂)),  ∂J/∂γ = Σ δ·x̂,  ∂J/∂β = Σ δ

#include <ATen/ATen.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <tuple>
#include <vector>

using at::Tensor;

namespace {

// Sums run in the input's precision within chunks of kChunk elements, vectorised (`omp simd reduction`:
// the compiler may add in any order within a chunk), and the chunks' totals add up in double: as accurate
// as torch's cascade sums, at the speed of the plain elementwise loops.
constexpr int64_t kChunk = 1024;

// Σ (x − shift) and Σ (x − shift)² (second only when `sum_sq`), shift = 0 or μ.
template <typename T>
void sums(const T* x, int64_t n, T shift, double& sum, double* sum_sq) {
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    T acc = 0, acc_sq = 0;
#pragma omp simd reduction(+ : acc, acc_sq)
    for (int64_t j = start; j < end; ++j) {
      const T c = x[j] - shift;
      acc += c;
      acc_sq += c * c;
    }
    sum += acc;
    if (sum_sq) *sum_sq += acc_sq;
  }
}

// Σ δ and Σ δ·(x − μ) over n elements.
template <typename T>
void delta_sums(const T* delta, const T* x, int64_t n, T mean, double& sum_d, double& sum_dx) {
  for (int64_t start = 0; start < n; start += kChunk) {
    const int64_t end = std::min(n, start + kChunk);
    T acc = 0, acc_x = 0;
#pragma omp simd reduction(+ : acc, acc_x)
    for (int64_t j = start; j < end; ++j) {
      acc += delta[j];
      acc_x += delta[j] * (x[j] - mean);
    }
    sum_d += acc;
    sum_dx += acc_x;
  }
}

// The affine parameters of a row as blocks: `blocks` runs of `run` elements, block b using parameter
// first + b (GroupNorm: a channel's positions), or with run 1 one parameter per element (LayerNorm).
struct Blocks {
  int64_t first, blocks, run;
};

Blocks row_blocks(int64_t r, int64_t D, int64_t groups, int64_t spatial) {
  const int64_t channels = D / spatial;
  return {(r % groups) * channels, channels, spatial};
}

template <typename T>
void forward_rows(const T* x, const T* weight, const T* bias, T* y, T* mean_out, T* rstd_out, int64_t rows,
                  int64_t D, int64_t groups, int64_t spatial, double eps) {
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    T* yr = y + r * D;
    double sum = 0, sum_sq = 0;
    sums(xr, D, T(0), sum, nullptr);
    const T mean = T(sum / double(D));
    sum = 0;
    sums(xr, D, mean, sum, &sum_sq);  // two passes, as the Python rule: Σ(x − μ)², not Σx² − nμ²
    const T rstd = T(1.0 / std::sqrt(sum_sq / double(D) + eps));
    mean_out[r] = mean;
    rstd_out[r] = rstd;
    const Blocks p = row_blocks(r, D, groups, spatial);
    if (p.run == 1) {  // one parameter per element (LayerNorm): one flat loop
      const T* gamma = weight ? weight + p.first : nullptr;
      const T* beta = bias ? bias + p.first : nullptr;
      for (int64_t j = 0; j < D; ++j)
        yr[j] = (xr[j] - mean) * rstd * (gamma ? gamma[j] : T(1)) + (beta ? beta[j] : T(0));
      continue;
    }
    for (int64_t b = 0; b < p.blocks; ++b) {
      const int64_t c = p.first + b;
      const T scale = rstd * (weight ? weight[c] : T(1)), shift = (bias ? bias[c] : T(0)) - mean * scale;
      const T* xb = xr + b * p.run;
      T* yb = yr + b * p.run;
      for (int64_t s = 0; s < p.run; ++s) yb[s] = xb[s] * scale + shift;
    }
  }
}

template <typename T>
void backward_rows(const T* delta, const T* x, const T* mean_in, const T* rstd_in, const T* weight, T* grad_x,
                   double* grad_gamma, double* grad_beta, int64_t rows, int64_t D, int64_t groups,
                   int64_t spatial) {
  std::vector<T> g_row(D), x_hat_row(D);  // LayerNorm: g = δγ and x̂ of the row, formed once
  std::vector<double> scratch(spatial == 1 ? 2 * D : 0);
  for (int64_t r = 0; r < rows; ++r) {
    const T* xr = x + r * D;
    const T* dr = delta + r * D;
    const T mean = mean_in[r], rstd = rstd_in[r];
    const Blocks p = row_blocks(r, D, groups, spatial);
    double sum_g = 0, sum_g_xhat = 0;  // Σ g and Σ g·x̂ over the row, g = δγ
    if (p.run == 1) {  // one parameter per element (LayerNorm): one pass for g, x̂, the sums and ∂J/∂γ, ∂J/∂β
      const T* gamma = weight ? weight + p.first : nullptr;
      double* dgamma = grad_gamma ? grad_gamma + p.first : scratch.data();  // scratch: sums no one asked for
      double* dbeta = grad_beta ? grad_beta + p.first : scratch.data() + D;
      T* g = g_row.data();
      T* x_hat = x_hat_row.data();
      for (int64_t start = 0; start < D; start += kChunk) {
        const int64_t end = std::min(D, start + kChunk);
        T acc = 0, acc_x = 0;
#pragma omp simd reduction(+ : acc, acc_x)
        for (int64_t j = start; j < end; ++j) {
          const T d = dr[j], xh = (xr[j] - mean) * rstd, gj = gamma ? d * gamma[j] : d;
          x_hat[j] = xh;
          g[j] = gj;
          dgamma[j] += double(d * xh);
          dbeta[j] += double(d);
          acc += gj;
          acc_x += gj * xh;
        }
        sum_g += acc;
        sum_g_xhat += acc_x;
      }
      if (!grad_x) continue;
      const T mean_g = T(sum_g / double(D)), mean_g_xhat = T(sum_g_xhat / double(D));
      T* gr = grad_x + r * D;
      for (int64_t j = 0; j < D; ++j) gr[j] = rstd * (g[j] - mean_g - x_hat[j] * mean_g_xhat);
      continue;
    }
    for (int64_t b = 0; b < p.blocks; ++b) {
      const int64_t c = p.first + b;
      double block_d = 0, block_dx = 0;
      delta_sums(dr + b * p.run, xr + b * p.run, p.run, mean, block_d, block_dx);
      block_dx *= double(rstd);  // Σ δ·x̂ over the block
      if (grad_gamma) grad_gamma[c] += block_dx;
      if (grad_beta) grad_beta[c] += block_d;
      const double gamma = weight ? double(weight[c]) : 1.0;
      sum_g += gamma * block_d;
      sum_g_xhat += gamma * block_dx;
    }
    if (!grad_x) continue;
    const T mean_g = T(sum_g / double(D)), mean_g_xhat = T(sum_g_xhat / double(D));
    T* gr = grad_x + r * D;
    for (int64_t b = 0; b < p.blocks; ++b) {  // rstd(δγ − mean(g) − (x − μ)·rstd·mean(g·x̂)) = a δ + b x + c
      const T gamma = weight ? weight[p.first + b] : T(1);
      const T a = rstd * gamma, bx = -rstd * rstd * mean_g_xhat, c = -rstd * mean_g - bx * mean;
      const T* xb = xr + b * p.run;
      const T* db = dr + b * p.run;
      T* gb = gr + b * p.run;
      for (int64_t s = 0; s < p.run; ++s) gb[s] = a * db[s] + bx * xb[s] + c;
    }
  }
}

// BatchNorm in training: x (N, C, S) contiguous, statistics per channel over its N runs of S positions.
template <typename T>
void batch_forward_channels(const T* x, const T* weight, const T* bias, T* y, T* mean_out, T* var_out, int64_t N,
                            int64_t C, int64_t S, double eps) {
  const double count = double(N * S);
  for (int64_t c = 0; c < C; ++c) {
    double sum = 0, unused = 0, sum_sq = 0;
    for (int64_t n = 0; n < N; ++n) sums(x + (n * C + c) * S, S, T(0), sum, nullptr);
    const T mean = T(sum / count);
    for (int64_t n = 0; n < N; ++n) sums(x + (n * C + c) * S, S, mean, unused, &sum_sq);
    const double var = sum_sq / count;
    mean_out[c] = mean;
    var_out[c] = T(var);
    // γ x̂ + β = x·scale + shift per channel
    const T scale = T(1.0 / std::sqrt(var + eps)) * (weight ? weight[c] : T(1));
    const T shift = (bias ? bias[c] : T(0)) - mean * scale;
    for (int64_t n = 0; n < N; ++n) {
      const T* xr = x + (n * C + c) * S;
      T* yr = y + (n * C + c) * S;
      for (int64_t s = 0; s < S; ++s) yr[s] = xr[s] * scale + shift;
    }
  }
}

// ∂J/∂γ = Σδx̂, ∂J/∂β = Σδ, and ∂J/∂x = a δ + b x + c per channel (rules/norm.py's `per_channel_delta`):
// a = γ/σ, b = −a·mean(δx̂)/σ, c = −a·mean(δ) − b μ.
template <typename T>
void batch_backward_channels(const T* delta, const T* x, const T* mean_in, const T* var_in, const T* weight,
                             T* grad_x, T* grad_gamma, T* grad_beta, int64_t N, int64_t C, int64_t S, double eps) {
  const double count = double(N * S);
  for (int64_t c = 0; c < C; ++c) {
    const T mean = mean_in[c];
    const double rstd = 1.0 / std::sqrt(double(var_in[c]) + eps);
    double sum_d = 0, sum_dx = 0;
    for (int64_t n = 0; n < N; ++n) delta_sums(delta + (n * C + c) * S, x + (n * C + c) * S, S, mean, sum_d, sum_dx);
    const double sum_d_xhat = sum_dx * rstd;
    if (grad_gamma) grad_gamma[c] = T(sum_d_xhat);
    if (grad_beta) grad_beta[c] = T(sum_d);
    if (!grad_x) continue;
    const double a = rstd * (weight ? double(weight[c]) : 1.0), b = -a * (sum_d_xhat / count) * rstd;
    const T ta = T(a), tb = T(b), tc = T(-a * (sum_d / count) - b * double(mean));
    for (int64_t n = 0; n < N; ++n) {
      const T* dr = delta + (n * C + c) * S;
      const T* xr = x + (n * C + c) * S;
      T* gr = grad_x + (n * C + c) * S;
      for (int64_t s = 0; s < S; ++s) gr[s] = ta * dr[s] + tb * xr[s] + tc;
    }
  }
}

void check(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias, int64_t rows,
           int64_t groups, int64_t spatial) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu(), "norm rows: x must be a contiguous CPU tensor");
  TORCH_CHECK(rows > 0 && x.numel() % rows == 0, "norm rows: ", x.numel(), " elements do not split into ", rows,
              " rows");
  const int64_t D = x.numel() / rows;
  TORCH_CHECK(groups > 0 && spatial > 0 && D % spatial == 0, "norm rows: row of ", D, " elements, spatial ", spatial);
  for (const auto& p : {weight, bias})
    if (p.has_value() && p->defined())
      TORCH_CHECK(p->is_contiguous() && p->scalar_type() == x.scalar_type() && p->numel() == groups * (D / spatial),
                  "norm rows: an affine parameter of ", p->numel(), " elements for rows of ", D / spatial,
                  " channels in ", groups, " groups");
}

template <typename T>
const T* data_or_null(const c10::optional<Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

std::tuple<Tensor, Tensor, Tensor> norm_forward(const Tensor& x, const c10::optional<Tensor>& weight,
                                                const c10::optional<Tensor>& bias, int64_t rows, int64_t groups,
                                                int64_t spatial, double eps) {
  check(x, weight, bias, rows, groups, spatial);
  Tensor y = at::empty_like(x), mean = at::empty({rows}, x.options()), rstd = at::empty({rows}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_forward", [&] {
    forward_rows<scalar_t>(x.data_ptr<scalar_t>(), data_or_null<scalar_t>(weight), data_or_null<scalar_t>(bias),
                           y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(), rstd.data_ptr<scalar_t>(), rows,
                           x.numel() / rows, groups, spatial, eps);
  });
  return {y, mean, rstd};
}

// Returns (∂J/∂x, ∂J/∂γ, ∂J/∂β); a gradient not asked for is an empty tensor.
std::tuple<Tensor, Tensor, Tensor> norm_backward(const Tensor& delta, const Tensor& x, const Tensor& mean,
                                                 const Tensor& rstd, const c10::optional<Tensor>& weight,
                                                 int64_t rows, int64_t groups, int64_t spatial, bool need_x,
                                                 bool need_gamma, bool need_beta) {
  check(x, weight, c10::nullopt, rows, groups, spatial);
  TORCH_CHECK(delta.is_contiguous() && delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type(),
              "norm rows: δ must be contiguous and shaped and typed as x");
  TORCH_CHECK(mean.is_contiguous() && rstd.is_contiguous() && mean.numel() == rows && rstd.numel() == rows &&
                  mean.scalar_type() == x.scalar_type() && rstd.scalar_type() == x.scalar_type(),
              "norm rows: μ and rstd must hold one value per row");
  const int64_t channels = groups * ((x.numel() / rows) / spatial);
  Tensor grad_x = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  auto sums = x.options().dtype(at::kDouble);
  Tensor grad_gamma = need_gamma ? at::zeros({channels}, sums) : at::empty({0}, sums);
  Tensor grad_beta = need_beta ? at::zeros({channels}, sums) : at::empty({0}, sums);
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "norm_backward", [&] {
    backward_rows<scalar_t>(delta.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                            rstd.data_ptr<scalar_t>(), data_or_null<scalar_t>(weight),
                            need_x ? grad_x.data_ptr<scalar_t>() : nullptr,
                            need_gamma ? grad_gamma.data_ptr<double>() : nullptr,
                            need_beta ? grad_beta.data_ptr<double>() : nullptr, rows, x.numel() / rows, groups,
                            spatial);
  });
  return {grad_x, grad_gamma.to(x.scalar_type()), grad_beta.to(x.scalar_type())};
}

void check_channels(const Tensor& x, const c10::optional<Tensor>& weight, const c10::optional<Tensor>& bias) {
  TORCH_CHECK(x.is_contiguous() && x.device().is_cpu() && x.dim() >= 2, "batch norm: x must be a contiguous CPU "
              "(N, C, *) tensor");
  for (const auto& p : {weight, bias})
    if (p.has_value() && p->defined())
      TORCH_CHECK(p->is_contiguous() && p->scalar_type() == x.scalar_type() && p->numel() == x.size(1),
                  "batch norm: an affine parameter of ", p->numel(), " elements for ", x.size(1), " channels");
}

// Returns (y, μ, σ²), μ and the biased σ² per channel.
std::tuple<Tensor, Tensor, Tensor> batch_forward(const Tensor& x, const c10::optional<Tensor>& weight,
                                                 const c10::optional<Tensor>& bias, double eps) {
  check_channels(x, weight, bias);
  const int64_t N = x.size(0), C = x.size(1), S = C ? x.numel() / (N * C) : 0;
  Tensor y = at::empty_like(x), mean = at::empty({C}, x.options()), var = at::empty({C}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_forward", [&] {
    batch_forward_channels<scalar_t>(x.data_ptr<scalar_t>(), data_or_null<scalar_t>(weight),
                                     data_or_null<scalar_t>(bias), y.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                                     var.data_ptr<scalar_t>(), N, C, S, eps);
  });
  return {y, mean, var};
}

// Returns (∂J/∂x, ∂J/∂γ, ∂J/∂β); a gradient not asked for is an empty tensor.
std::tuple<Tensor, Tensor, Tensor> batch_backward(const Tensor& delta, const Tensor& x, const Tensor& mean,
                                                  const Tensor& var, const c10::optional<Tensor>& weight, double eps,
                                                  bool need_x, bool need_gamma, bool need_beta) {
  check_channels(x, weight, c10::nullopt);
  const int64_t N = x.size(0), C = x.size(1), S = C ? x.numel() / (N * C) : 0;
  TORCH_CHECK(delta.is_contiguous() && delta.sizes() == x.sizes() && delta.scalar_type() == x.scalar_type(),
              "batch norm: δ must be contiguous and shaped and typed as x");
  TORCH_CHECK(mean.is_contiguous() && var.is_contiguous() && mean.numel() == C && var.numel() == C &&
                  mean.scalar_type() == x.scalar_type() && var.scalar_type() == x.scalar_type(),
              "batch norm: μ and σ² must hold one value per channel");
  Tensor grad_x = need_x ? at::empty_like(x) : at::empty({0}, x.options());
  Tensor grad_gamma = at::empty({need_gamma ? C : 0}, x.options()), grad_beta = at::empty({need_beta ? C : 0}, x.options());
  AT_DISPATCH_FLOATING_TYPES(x.scalar_type(), "batch_backward", [&] {
    batch_backward_channels<scalar_t>(delta.data_ptr<scalar_t>(), x.data_ptr<scalar_t>(), mean.data_ptr<scalar_t>(),
                                      var.data_ptr<scalar_t>(), data_or_null<scalar_t>(weight),
                                      need_x ? grad_x.data_ptr<scalar_t>() : nullptr,
                                      need_gamma ? grad_gamma.data_ptr<scalar_t>() : nullptr,
                                      need_beta ? grad_beta.data_ptr<scalar_t>() : nullptr, N, C, S, eps);
  });
  return {grad_x, grad_gamma, grad_beta};
}

}  // namespace

TORCH_LIBRARY(manual_backprop_norm, m) {
  m.def("forward(Tensor x, Tensor? weight, Tensor? bias, int rows, int groups, int spatial, float eps)"
        " -> (Tensor, Tensor, Tensor)");
  m.def("backward(Tensor delta, Tensor x, Tensor mean, Tensor rstd, Tensor? weight, int rows, int groups, "
        "int spatial, bool need_x, bool need_gamma, bool need_beta) -> (Tensor, Tensor, Tensor)");
  m.def("batch_forward(Tensor x, Tensor? weight, Tensor? bias, float eps) -> (Tensor, Tensor, Tensor)");
  m.def("batch_backward(Tensor delta, Tensor x, Tensor mean, Tensor var, Tensor? weight, float eps, bool need_x, "
        "bool need_gamma, bool need_beta) -> (Tensor, Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(manual_backprop_norm, CPU, m) {
  m.impl("forward", &norm_forward);
  m.impl("backward", &norm_backward);
  m.impl("batch_forward", &batch_forward);
  m.impl("batch_backward", &batch_backward);
}
