// CPU kernels for eager MaxViT training and inference where Paddle's own CPU kernels are the slow part of a step
// (docs/performance.md lists what each replaces): the depthwise convolution, GELU, LayerNorm, the attention's scale +
// relative-position bias + softmax, and (static training graphs) the linear layers. float32, dense tensors.
// common/cpu_kernels.py builds this file with paddle.utils.cpp_extension and common/fast_layers.py calls it; where
// it cannot be built, the model runs on Paddle's ops. Each op has a backward, so Paddle's autograd runs through it; tests/test_cpu_kernels.py checks
// values and gradients against Paddle's ops.
#include <omp.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <vector>

#include "paddle/extension.h"

namespace {

// Threads: the process's MKL_NUM_THREADS (common/device.py sets it to this process's share of the cores).
int Threads() {
  static const int threads = [] {
    const char* env = std::getenv("MKL_NUM_THREADS");
    int n = env ? std::atoi(env) : 0;
    return n > 0 ? n : omp_get_max_threads();
  }();
  return threads;
}

// out[i] = sum over threads t of partial[t * stride + i], i < n: the per-thread sums of a reduction, added up.
void SumOverThreads(const float* partial, int threads, int64_t stride, int64_t n, float* out) {
  for (int64_t i = 0; i < n; ++i) {
    out[i] = 0.0f;
    for (int t = 0; t < threads; ++t) out[i] += partial[t * stride + i];
  }
}

void CheckFloat(const paddle::Tensor& t, const char* name) {
  PD_CHECK(t.is_cpu(), name, " must be on the CPU");
  PD_CHECK(t.dtype() == paddle::DataType::FLOAT32, name, " must be float32");
}

// exp for the softmax and GELU, written so that the compiler vectorises it: 2^n * p(r), x = n ln2 + r, |r| <= ln2 / 2,
// p a degree-6 polynomial (relative error below 2e-7 over the float range that does not overflow).
inline float FastExp(float v) {
  const float x = std::min(std::max(v, -87.0f), 88.0f);
  const float n = (x * 1.44269504088896341f + 12582912.0f) - 12582912.0f;  // round to nearest: 1.5 * 2^23
  const float r = (x - n * 0.693145751953125f) - n * 1.428606765330187e-06f;
  float p = 1.0f / 720;
  p = p * r + 1.0f / 120;
  p = p * r + 1.0f / 24;
  p = p * r + 1.0f / 6;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return v < -87.0f ? 0.0f : p * scale;  // (below -87 the result is under float's normal range; NaN stays NaN)
}

// erf as a rational function (the approximation Eigen and XLA use for float32: x P(x^2) / Q(x^2) on [-4, 4],
// about 1 ulp), so that the compiler vectorises it.
inline float FastErf(float x) {
  x = std::min(std::max(x, -4.0f), 4.0f);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

inline float FastTanh(float x) { return 1.0f - 2.0f / (FastExp(2.0f * x) + 1.0f); }

// ---------------------------------------------------------------------------------------------------------------
// GELU, exact (0.5 x (1 + erf(x / sqrt 2))) or with the tanh approximation, and its derivative.
// ---------------------------------------------------------------------------------------------------------------
constexpr float kSqrtHalf = 0.70710678118654752f, kSqrt2OverPi = 0.79788456080286536f, kTanhCubic = 0.044715f;

std::vector<paddle::Tensor> Gelu(const paddle::Tensor& x, bool approximate) {
  CheckFloat(x, "x");
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* px = x.data<float>();
  float* py = y.data<float>();
  const int64_t n = x.numel();
  if (approximate) {
#pragma omp parallel for simd num_threads(Threads()) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float v = px[i];
      py[i] = 0.5f * v * (1.0f + FastTanh(kSqrt2OverPi * (v + kTanhCubic * v * v * v)));
    }
  } else {
#pragma omp parallel for simd num_threads(Threads()) schedule(static)
    for (int64_t i = 0; i < n; ++i) py[i] = 0.5f * px[i] * (1.0f + FastErf(px[i] * kSqrtHalf));
  }
  return {y};
}

std::vector<paddle::Tensor> GeluGrad(const paddle::Tensor& x, const paddle::Tensor& grad_y, bool approximate) {
  auto grad_x = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *px = x.data<float>(), *pg = grad_y.data<float>();
  float* out = grad_x.data<float>();
  const int64_t n = x.numel();
  if (approximate) {
#pragma omp parallel for simd num_threads(Threads()) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float v = px[i], t = FastTanh(kSqrt2OverPi * (v + kTanhCubic * v * v * v));
      out[i] = pg[i] * (0.5f * (1.0f + t) +
                        0.5f * v * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * v * v));
    }
  } else {
    const float inv_sqrt_2pi = 0.39894228040143268f;
#pragma omp parallel for simd num_threads(Threads()) schedule(static)
    for (int64_t i = 0; i < n; ++i) {
      const float v = px[i];
      out[i] = pg[i] * (0.5f * (1.0f + FastErf(v * kSqrtHalf)) + v * inv_sqrt_2pi * FastExp(-0.5f * v * v));
    }
  }
  return {grad_x};
}

std::vector<std::vector<int64_t>> GeluShape(const std::vector<int64_t>& x, bool approximate) { return {x}; }

// ---------------------------------------------------------------------------------------------------------------
// Depthwise convolution, NCHW, k x k kernel, stride s, zero padding (top, left; the bottom/right padding follows
// from the output size), bias. Each (sample, channel) plane is computed on its own: the zero-padded input plane is
// split into s x s phase planes P[ry][rx][i][j] = padded[i*s + ry][j*s + rx], all Wq wide, so that every tap
// (dy, dx) is one contiguous multiply-add over a flat (Ho, Wq) grid:
//     out[h][j] += w[dy][dx] * P[dy % s][dx % s][(h + dy / s) * Wq + j + dx / s]
// The Wq - Wo columns past the output's width are scratch (discarded forward, zero gradient backward).
// ---------------------------------------------------------------------------------------------------------------
struct DwGeometry {
  int64_t N, C, H, W, K, S, pad_top, pad_left, Ho, Wo, Hq, Wq;
  DwGeometry(const std::vector<int64_t>& x, int64_t k, int stride, int pad_top, int pad_left, int out_h,
             int out_w)
      : N(x[0]), C(x[1]), H(x[2]), W(x[3]), K(k), S(stride), pad_top(pad_top), pad_left(pad_left), Ho(out_h),
        Wo(out_w) {
    Hq = ((Ho - 1) * S + K + S - 1) / S + 1;  // one spare row: the scratch columns of the last row read past it
    Wq = ((Wo - 1) * S + K + S - 1) / S;
  }
  int64_t Phase() const { return Hq * Wq; }            // floats in one phase plane
  int64_t Phases() const { return S * S * Phase(); }   // floats in all of them
  int64_t Grid() const { return Ho * Wq; }             // floats in the flat output grid
  int64_t Offset(int64_t dy, int64_t dx) const {       // where tap (dy, dx) starts in the phase buffer
    return ((dy % S) * S + dx % S) * Phase() + (dy / S) * Wq + dx / S;
  }
};

// Row y of a plane <-> its place in the phase planes: copy(padded_position, plane_position) for every column of the
// row that lies inside the padded extent the phases hold (one strided run per column phase).
template <typename Copy>
inline void ForRowInPhases(const DwGeometry& g, int64_t y, float* phases, Copy copy) {
  const int64_t py = y + g.pad_top, cols = g.Wq * g.S;
  if (py >= (g.Hq - 1) * g.S) return;
  float* row = phases + (py % g.S) * g.S * g.Phase() + (py / g.S) * g.Wq;
  const int64_t width = std::min(g.W, cols - g.pad_left);
  for (int64_t rx = 0; rx < g.S; ++rx) {
    float* dst = row + rx * g.Phase();
    const int64_t x0 = ((rx - g.pad_left) % g.S + g.S) % g.S;  // first column with (x + pad_left) % S == rx
    for (int64_t x = x0, j = (x0 + g.pad_left) / g.S; x < width; x += g.S, ++j) copy(dst + j, x);
  }
}

// plane (H, W) -> zero-padded phase planes
void ToPhases(const DwGeometry& g, const float* plane, float* phases) {
  std::fill(phases, phases + g.Phases(), 0.0f);
  for (int64_t y = 0; y < g.H; ++y) {
    const float* src = plane + y * g.W;
    ForRowInPhases(g, y, phases, [src](float* p, int64_t x) { *p = src[x]; });
  }
}

// the inverse gather: phase planes -> plane (H, W) (backward: the input gradient; zero where no output reads x)
void FromPhases(const DwGeometry& g, float* phases, float* plane) {
  std::fill(plane, plane + g.H * g.W, 0.0f);
  for (int64_t y = 0; y < g.H; ++y) {
    float* dst = plane + y * g.W;
    ForRowInPhases(g, y, phases, [dst](float* p, int64_t x) { dst[x] = *p; });
  }
}

std::vector<paddle::Tensor> DepthwiseConv(const paddle::Tensor& x, const paddle::Tensor& weight,
                                          const paddle::Tensor& bias, int stride, int pad_top, int pad_left,
                                          int out_h, int out_w) {
  CheckFloat(x, "x");
  PD_CHECK(x.shape().size() == 4 && weight.shape().size() == 4, "x must be (N, C, H, W), weight (C, 1, k, k)");
  const int64_t C = x.shape()[1], k = weight.shape()[2];
  PD_CHECK(weight.shape()[0] == C && weight.shape()[1] == 1 && weight.shape()[3] == k && bias.numel() == C,
           "weight must be (C, 1, k, k) and bias (C,) for x's C channels");
  PD_CHECK(stride > 0 && pad_top >= 0 && pad_left >= 0 && out_h > 0 && out_w > 0,
           "stride, padding and output size must be positive");
  const DwGeometry g(x.shape(), k, stride, pad_top, pad_left, out_h, out_w);
  auto out = paddle::empty({g.N, g.C, g.Ho, g.Wo}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *px = x.data<float>(), *pw = weight.data<float>(), *pb = bias.data<float>();
  float* po = out.data<float>();
#pragma omp parallel num_threads(Threads())
  {
    std::vector<float> phases(g.Phases()), acc(g.Grid());
#pragma omp for schedule(static)
    for (int64_t nc = 0; nc < g.N * g.C; ++nc) {
      const int64_t c = nc % g.C;
      const float* w = pw + c * g.K * g.K;
      ToPhases(g, px + nc * g.H * g.W, phases.data());
      std::fill(acc.begin(), acc.end(), pb[c]);
      for (int64_t dy = 0; dy < g.K; ++dy)
        for (int64_t dx = 0; dx < g.K; ++dx) {
          const float wt = w[dy * g.K + dx];
          const float* src = phases.data() + g.Offset(dy, dx);
          float* a = acc.data();
          for (int64_t i = 0; i < g.Grid(); ++i) a[i] += wt * src[i];
        }
      float* o = po + nc * g.Ho * g.Wo;
      for (int64_t h = 0; h < g.Ho; ++h) std::memcpy(o + h * g.Wo, acc.data() + h * g.Wq, g.Wo * sizeof(float));
    }
  }
  return {out};
}

std::vector<paddle::Tensor> DepthwiseConvGrad(const paddle::Tensor& x, const paddle::Tensor& weight,
                                              const paddle::Tensor& grad_out, int stride, int pad_top, int pad_left,
                                              int out_h, int out_w) {
  const DwGeometry g(x.shape(), weight.shape()[2], stride, pad_top, pad_left, out_h, out_w);
  auto grad_x = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto grad_w = paddle::empty(weight.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto grad_b = paddle::empty({g.C}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *px = x.data<float>(), *pw = weight.data<float>(), *pg = grad_out.data<float>();
  float *pgx = grad_x.data<float>(), *pgw = grad_w.data<float>(), *pgb = grad_b.data<float>();
  // one channel per iteration, all samples: the weight and bias gradients need no reduction across threads
#pragma omp parallel num_threads(Threads())
  {
    std::vector<float> phases(g.Phases()), grad_phases(g.Phases()), grid(g.Grid(), 0.0f);
#pragma omp for schedule(static)
    for (int64_t c = 0; c < g.C; ++c) {
      const float* w = pw + c * g.K * g.K;
      std::vector<double> gw(g.K * g.K, 0.0);
      double gb = 0.0;
      for (int64_t n = 0; n < g.N; ++n) {
        const int64_t nc = n * g.C + c;
        const float* go = pg + nc * g.Ho * g.Wo;
        for (int64_t h = 0; h < g.Ho; ++h) {  // the output gradient on the flat grid, zero in scratch columns
          std::memcpy(grid.data() + h * g.Wq, go + h * g.Wo, g.Wo * sizeof(float));
          float s = 0.0f;
#pragma omp simd reduction(+ : s)
          for (int64_t j = 0; j < g.Wo; ++j) s += go[h * g.Wo + j];
          gb += s;
        }
        ToPhases(g, px + nc * g.H * g.W, phases.data());
        std::fill(grad_phases.begin(), grad_phases.end(), 0.0f);
        const float* gr = grid.data();
        for (int64_t dy = 0; dy < g.K; ++dy)
          for (int64_t dx = 0; dx < g.K; ++dx) {
            const int64_t off = g.Offset(dy, dx);
            const float wt = w[dy * g.K + dx];
            const float* src = phases.data() + off;
            float* dst = grad_phases.data() + off;
            float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
            for (int64_t i = 0; i < g.Grid(); ++i) {
              dot += gr[i] * src[i];
              dst[i] += wt * gr[i];
            }
            gw[dy * g.K + dx] += dot;
          }
        FromPhases(g, grad_phases.data(), pgx + nc * g.H * g.W);
      }
      for (int64_t t = 0; t < g.K * g.K; ++t) pgw[c * g.K * g.K + t] = static_cast<float>(gw[t]);
      pgb[c] = static_cast<float>(gb);
    }
  }
  return {grad_x, grad_w, grad_b};
}

std::vector<std::vector<int64_t>> DepthwiseConvShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                     const std::vector<int64_t>& b, int stride, int pad_top,
                                                     int pad_left, int out_h, int out_w) {
  return {{x[0], x[1], out_h, out_w}};
}

// ---------------------------------------------------------------------------------------------------------------
// LayerNorm over the last axis. Forward as Paddle's (which is fast); the backward recomputes each row's mean and
// 1/std (the row is read anyway) and reduces the weight and bias gradients per thread, then across threads.
// ---------------------------------------------------------------------------------------------------------------
inline void RowStats(const float* x, int64_t n, float eps, float* mean, float* rstd) {
  float s = 0.0f, v = 0.0f;
#pragma omp simd reduction(+ : s)
  for (int64_t i = 0; i < n; ++i) s += x[i];
  const float m = s / n;
#pragma omp simd reduction(+ : v)
  for (int64_t i = 0; i < n; ++i) v += (x[i] - m) * (x[i] - m);
  *mean = m;
  *rstd = 1.0f / std::sqrt(v / n + eps);
}

std::vector<paddle::Tensor> LayerNorm(const paddle::Tensor& x, const paddle::Tensor& weight,
                                      const paddle::Tensor& bias, float eps) {
  CheckFloat(x, "x");
  const int64_t n = x.shape().back(), rows = x.numel() / n;
  PD_CHECK(n > 0 && weight.numel() == n && bias.numel() == n, "weight and bias must have x's last size");
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *px = x.data<float>(), *pw = weight.data<float>(), *pb = bias.data<float>();
  float* py = y.data<float>();
#pragma omp parallel for num_threads(Threads()) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    float mean, rstd;
    RowStats(px + r * n, n, eps, &mean, &rstd);
    const float* xr = px + r * n;
    float* yr = py + r * n;
    for (int64_t i = 0; i < n; ++i) yr[i] = (xr[i] - mean) * rstd * pw[i] + pb[i];
  }
  return {y};
}

std::vector<paddle::Tensor> LayerNormGrad(const paddle::Tensor& x, const paddle::Tensor& weight,
                                          const paddle::Tensor& grad_y, float eps) {
  const int64_t n = x.shape().back(), rows = x.numel() / n;
  auto grad_x = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto grad_w = paddle::empty({n}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto grad_b = paddle::empty({n}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *px = x.data<float>(), *pw = weight.data<float>(), *pg = grad_y.data<float>();
  float* pgx = grad_x.data<float>();
  const int threads = Threads();
  std::vector<float> partial(static_cast<size_t>(threads) * 2 * n, 0.0f);  // per thread: weight, bias gradients
#pragma omp parallel num_threads(threads)
  {
    float* gw = partial.data() + omp_get_thread_num() * 2 * n;
    float* gb = gw + n;
    std::vector<float> xhat(n), gxw(n);
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r) {
      const float *xr = px + r * n, *gr = pg + r * n;
      float mean, rstd;
      RowStats(xr, n, eps, &mean, &rstd);
      float sum_g = 0.0f, sum_gx = 0.0f;  // sums over the row of g*w and g*w*xhat
#pragma omp simd reduction(+ : sum_g, sum_gx)
      for (int64_t i = 0; i < n; ++i) {
        xhat[i] = (xr[i] - mean) * rstd;
        gxw[i] = gr[i] * pw[i];
        sum_g += gxw[i];
        sum_gx += gxw[i] * xhat[i];
        gw[i] += gr[i] * xhat[i];
        gb[i] += gr[i];
      }
      sum_g /= n;
      sum_gx /= n;
      float* out = pgx + r * n;
      for (int64_t i = 0; i < n; ++i) out[i] = rstd * (gxw[i] - sum_g - xhat[i] * sum_gx);
    }
  }
  SumOverThreads(partial.data(), threads, 2 * n, n, grad_w.data<float>());
  SumOverThreads(partial.data() + n, threads, 2 * n, n, grad_b.data<float>());
  return {grad_x, grad_w, grad_b};
}

std::vector<std::vector<int64_t>> LayerNormShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                 const std::vector<int64_t>& b, float eps) {
  return {x};
}

// ---------------------------------------------------------------------------------------------------------------
// Attention weights: softmax(scale * x + bias) over the last axis, x (B', heads, N, M), bias (heads, N, M) shared
// by every window. One pass instead of Paddle's scale, 4-D broadcast add and softmax. Backward:
// dz = y * (g - sum(g * y)); dx = scale * dz; dbias = dz summed over B' (per thread, then across threads).
// ---------------------------------------------------------------------------------------------------------------
std::vector<paddle::Tensor> BiasSoftmax(const paddle::Tensor& x, const paddle::Tensor& bias, float scale) {
  CheckFloat(x, "x");
  const int64_t m = x.shape().back(), per_window = bias.numel(), rows = x.numel() / m;
  PD_CHECK(m > 0 && bias.shape().back() == m && per_window % m == 0 && x.numel() % per_window == 0,
           "bias must be (heads, N, M) for x (B', heads, N, M)");
  auto y = paddle::empty(x.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *px = x.data<float>(), *pb = bias.data<float>();
  float* py = y.data<float>();
#pragma omp parallel for num_threads(Threads()) schedule(static)
  for (int64_t r = 0; r < rows; ++r) {
    const float *xr = px + r * m, *br = pb + (r * m) % per_window;
    float* yr = py + r * m;
    float top = -INFINITY;
#pragma omp simd reduction(max : top)
    for (int64_t i = 0; i < m; ++i) {
      yr[i] = scale * xr[i] + br[i];
      top = std::max(top, yr[i]);
    }
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < m; ++i) {
      yr[i] = FastExp(yr[i] - top);
      sum += yr[i];
    }
    const float inv = 1.0f / sum;
    for (int64_t i = 0; i < m; ++i) yr[i] *= inv;
  }
  return {y};
}

std::vector<paddle::Tensor> BiasSoftmaxGrad(const paddle::Tensor& y, const paddle::Tensor& bias,
                                            const paddle::Tensor& grad_y, float scale) {
  const int64_t m = y.shape().back(), per_window = bias.numel(), windows = y.numel() / per_window;
  auto grad_x = paddle::empty(y.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  auto grad_b = paddle::empty(bias.shape(), paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float *py = y.data<float>(), *pg = grad_y.data<float>();
  float* pgx = grad_x.data<float>();
  const int threads = Threads();
  std::vector<float> partial(static_cast<size_t>(threads) * per_window, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* gb = partial.data() + omp_get_thread_num() * per_window;
#pragma omp for schedule(static)
    for (int64_t w = 0; w < windows; ++w)
      for (int64_t r = 0; r < per_window; r += m) {
        const int64_t at = w * per_window + r;
        const float *yr = py + at, *gr = pg + at;
        float* out = pgx + at;
        float dot = 0.0f;
#pragma omp simd reduction(+ : dot)
        for (int64_t i = 0; i < m; ++i) dot += gr[i] * yr[i];
        for (int64_t i = 0; i < m; ++i) {
          const float dz = yr[i] * (gr[i] - dot);
          gb[r + i] += dz;
          out[i] = scale * dz;
        }
      }
  }
  SumOverThreads(partial.data(), threads, per_window, per_window, grad_b.data<float>());
  return {grad_x, grad_b};
}

std::vector<std::vector<int64_t>> BiasSoftmaxShape(const std::vector<int64_t>& x, const std::vector<int64_t>& b,
                                                   float scale) {
  return {x};
}

// ---------------------------------------------------------------------------------------------------------------
// Linear for static training graphs (eager training has fast_layers._LinearFn): out = x @ weight + bias, x (rows, in).
// Paddle's own backward for the bias runs a column sum 8x slower than a GEMM of the same size; this one sums the
// columns per thread and then across threads, and takes the two matrix gradients from Paddle's matmul.
// ---------------------------------------------------------------------------------------------------------------
std::vector<paddle::Tensor> Linear(const paddle::Tensor& x, const paddle::Tensor& weight, const paddle::Tensor& bias) {
  CheckFloat(x, "x");
  PD_CHECK(x.shape().size() == 2 && weight.shape().size() == 2 && weight.shape()[0] == x.shape()[1] &&
               bias.numel() == weight.shape()[1],
           "x must be (rows, in), weight (in, out) and bias (out,)");
  auto out = paddle::experimental::matmul(x, weight);  // (rows, out), this op's own tensor: the bias goes in place
  const int64_t rows = x.shape()[0], n = weight.shape()[1];
  const float* pb = bias.data<float>();
  float* po = out.data<float>();
#pragma omp parallel for num_threads(Threads()) schedule(static)
  for (int64_t r = 0; r < rows; ++r)
    for (int64_t i = 0; i < n; ++i) po[r * n + i] += pb[i];
  return {out};
}

std::vector<paddle::Tensor> LinearGrad(const paddle::Tensor& x, const paddle::Tensor& weight,
                                       const paddle::Tensor& grad_out) {
  const int64_t rows = x.shape()[0], n = weight.shape()[1];
  auto grad_b = paddle::empty({n}, paddle::DataType::FLOAT32, paddle::CPUPlace());
  const float* pg = grad_out.data<float>();
  const int threads = Threads();
  std::vector<float> partial(static_cast<size_t>(threads) * n, 0.0f);
#pragma omp parallel num_threads(threads)
  {
    float* sum = partial.data() + omp_get_thread_num() * n;
#pragma omp for schedule(static)
    for (int64_t r = 0; r < rows; ++r)
      for (int64_t i = 0; i < n; ++i) sum[i] += pg[r * n + i];
  }
  SumOverThreads(partial.data(), threads, n, n, grad_b.data<float>());
  return {paddle::experimental::matmul(grad_out, weight, false, true), paddle::experimental::matmul(x, grad_out, true),
          grad_b};
}

std::vector<std::vector<int64_t>> LinearShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                              const std::vector<int64_t>& b) {
  return {{x[0], w[1]}};
}
std::vector<std::vector<int64_t>> LinearGradShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                  const std::vector<int64_t>& grad) {
  return {x, w, {w[1]}};
}

// Static graphs (to_static training) infer every output's shape and dtype: all float32, each gradient shaped as
// its input.
using Dtype = paddle::DataType;
std::vector<Dtype> Float32From1(const Dtype&) { return {Dtype::FLOAT32}; }
std::vector<Dtype> Float32From2(const Dtype&, const Dtype&) { return {Dtype::FLOAT32}; }
std::vector<Dtype> Float32From3(const Dtype&, const Dtype&, const Dtype&) { return {Dtype::FLOAT32}; }
std::vector<Dtype> Float32x2From3(const Dtype&, const Dtype&, const Dtype&) { return {Dtype::FLOAT32, Dtype::FLOAT32}; }
std::vector<Dtype> Float32x3From3(const Dtype&, const Dtype&, const Dtype&) {
  return {Dtype::FLOAT32, Dtype::FLOAT32, Dtype::FLOAT32};
}

std::vector<std::vector<int64_t>> DepthwiseConvGradShape(const std::vector<int64_t>& x,
                                                         const std::vector<int64_t>& w,
                                                         const std::vector<int64_t>& grad, int stride, int pad_top,
                                                         int pad_left, int out_h, int out_w) {
  return {x, w, {w[0]}};
}
std::vector<std::vector<int64_t>> LayerNormGradShape(const std::vector<int64_t>& x, const std::vector<int64_t>& w,
                                                     const std::vector<int64_t>& grad, float eps) {
  return {x, w, w};
}
std::vector<std::vector<int64_t>> BiasSoftmaxGradShape(const std::vector<int64_t>& y, const std::vector<int64_t>& b,
                                                       const std::vector<int64_t>& grad, float scale) {
  return {y, b};
}
std::vector<std::vector<int64_t>> GeluGradShape(const std::vector<int64_t>& x, const std::vector<int64_t>& grad,
                                                bool approximate) {
  return {x};
}

}  // namespace

PD_BUILD_OP(maxvit_depthwise_conv)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Out"})
    .Attrs({"stride: int", "pad_top: int", "pad_left: int", "out_h: int", "out_w: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseConv))
    .SetInferShapeFn(PD_INFER_SHAPE(DepthwiseConvShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32From3));

PD_BUILD_GRAD_OP(maxvit_depthwise_conv)
    .Inputs({"X", "Weight", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Bias")})
    .Attrs({"stride: int", "pad_top: int", "pad_left: int", "out_h: int", "out_w: int"})
    .SetKernelFn(PD_KERNEL(DepthwiseConvGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(DepthwiseConvGradShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32x3From3));

PD_BUILD_OP(maxvit_layer_norm)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Y"})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(LayerNorm))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32From3));

PD_BUILD_GRAD_OP(maxvit_layer_norm)
    .Inputs({"X", "Weight", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Bias")})
    .Attrs({"eps: float"})
    .SetKernelFn(PD_KERNEL(LayerNormGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(LayerNormGradShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32x3From3));

PD_BUILD_OP(maxvit_bias_softmax)
    .Inputs({"X", "Bias"})
    .Outputs({"Y"})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(BiasSoftmax))
    .SetInferShapeFn(PD_INFER_SHAPE(BiasSoftmaxShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32From2));

PD_BUILD_GRAD_OP(maxvit_bias_softmax)
    .Inputs({"Y", "Bias", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Bias")})
    .Attrs({"scale: float"})
    .SetKernelFn(PD_KERNEL(BiasSoftmaxGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(BiasSoftmaxGradShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32x2From3));

PD_BUILD_OP(maxvit_gelu)
    .Inputs({"X"})
    .Outputs({"Y"})
    .Attrs({"approximate: bool"})
    .SetKernelFn(PD_KERNEL(Gelu))
    .SetInferShapeFn(PD_INFER_SHAPE(GeluShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32From1));

PD_BUILD_GRAD_OP(maxvit_gelu)
    .Inputs({"X", paddle::Grad("Y")})
    .Outputs({paddle::Grad("X")})
    .Attrs({"approximate: bool"})
    .SetKernelFn(PD_KERNEL(GeluGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(GeluGradShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32From2));

PD_BUILD_OP(maxvit_linear)
    .Inputs({"X", "Weight", "Bias"})
    .Outputs({"Out"})
    .SetKernelFn(PD_KERNEL(Linear))
    .SetInferShapeFn(PD_INFER_SHAPE(LinearShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32From3));

PD_BUILD_GRAD_OP(maxvit_linear)
    .Inputs({"X", "Weight", paddle::Grad("Out")})
    .Outputs({paddle::Grad("X"), paddle::Grad("Weight"), paddle::Grad("Bias")})
    .SetKernelFn(PD_KERNEL(LinearGrad))
    .SetInferShapeFn(PD_INFER_SHAPE(LinearGradShape))
    .SetInferDtypeFn(PD_INFER_DTYPE(Float32x3From3));
