#include "tokenlake/engine/ops.h"

#include <cmath>
#include <cstddef>

#include "tokenlake/base/check.h"

namespace tokenlake::engine {

void RmsNorm(absl::Span<const float> x, absl::Span<const float> weight, float eps,
             absl::Span<float> y) {
  const size_t d = weight.size();
  TOKENLAKE_CHECK(d > 0 && x.size() == y.size() && x.size() % d == 0);
  for (size_t row = 0; row < x.size(); row += d) {
    double sum_sq = 0.0;
    for (size_t i = 0; i < d; ++i) sum_sq += static_cast<double>(x[row + i]) * x[row + i];
    const float variance = static_cast<float>(sum_sq / static_cast<double>(d));
    const float inv = 1.0f / std::sqrt(variance + eps);
    for (size_t i = 0; i < d; ++i) y[row + i] = weight[i] * (x[row + i] * inv);
  }
}

std::vector<float> RopeInvFreq(int32_t head_dim, double theta) {
  TOKENLAKE_CHECK(head_dim > 0 && head_dim % 2 == 0);
  std::vector<float> inv(static_cast<size_t>(head_dim / 2));
  for (int32_t i = 0; i < head_dim / 2; ++i) {
    const float exponent = static_cast<float>(2 * i) / static_cast<float>(head_dim);
    const float p = static_cast<float>(std::pow(theta, static_cast<double>(exponent)));
    inv[static_cast<size_t>(i)] = 1.0f / p;
  }
  return inv;
}

void ApplyRope(absl::Span<float> x, int32_t num_tokens, int32_t num_heads, int32_t head_dim,
               int64_t start_pos, absl::Span<const float> inv_freq) {
  const int32_t half = head_dim / 2;
  TOKENLAKE_CHECK(static_cast<int32_t>(inv_freq.size()) == half);
  TOKENLAKE_CHECK(x.size() == static_cast<size_t>(num_tokens) * num_heads * head_dim);
  std::vector<float> cos_v(static_cast<size_t>(half)), sin_v(static_cast<size_t>(half));
  for (int32_t t = 0; t < num_tokens; ++t) {
    const float pos = static_cast<float>(start_pos + t);
    for (int32_t i = 0; i < half; ++i) {
      const float angle = pos * inv_freq[static_cast<size_t>(i)];
      cos_v[static_cast<size_t>(i)] = static_cast<float>(std::cos(static_cast<double>(angle)));
      sin_v[static_cast<size_t>(i)] = static_cast<float>(std::sin(static_cast<double>(angle)));
    }
    for (int32_t h = 0; h < num_heads; ++h) {
      float* v = x.data() + (static_cast<size_t>(t) * num_heads + h) * head_dim;
      for (int32_t i = 0; i < half; ++i) {
        const float a = v[i];
        const float b = v[i + half];
        v[i] = a * cos_v[static_cast<size_t>(i)] - b * sin_v[static_cast<size_t>(i)];
        v[i + half] = b * cos_v[static_cast<size_t>(i)] + a * sin_v[static_cast<size_t>(i)];
      }
    }
  }
}

namespace {

// y[t][o] for the rows t of [t0, t0 + R): each weight row is read once for the R rows. Every
// row's sum is formed in the same order whatever R (8 strided accumulators, then a fixed tree,
// then the remainder), so a row's result does not depend on the rows batched with it.
template <int R>
void LinearRows(const float* x, int32_t t0, int32_t in, absl::Span<const float> w, int32_t out,
                float* y) {
  for (int32_t o = 0; o < out; ++o) {
    const float* wr = w.data() + static_cast<size_t>(o) * in;
    float acc[R][8] = {};
    int32_t i = 0;
    for (; i + 8 <= in; i += 8) {
      for (int r = 0; r < R; ++r) {
        const float* xr = x + static_cast<size_t>(t0 + r) * in;
        for (int k = 0; k < 8; ++k) acc[r][k] += xr[i + k] * wr[i + k];
      }
    }
    for (int r = 0; r < R; ++r) {
      const float* xr = x + static_cast<size_t>(t0 + r) * in;
      const float* a = acc[r];
      float sum = ((a[0] + a[1]) + (a[2] + a[3])) + ((a[4] + a[5]) + (a[6] + a[7]));
      for (int32_t j = i; j < in; ++j) sum += xr[j] * wr[j];
      y[static_cast<size_t>(t0 + r) * out + o] = sum;
    }
  }
}

}  // namespace

void Linear(absl::Span<const float> x, int32_t n, int32_t in, absl::Span<const float> w,
            int32_t out, absl::Span<float> y) {
  TOKENLAKE_CHECK(x.size() == static_cast<size_t>(n) * in);
  TOKENLAKE_CHECK(w.size() == static_cast<size_t>(out) * in);
  TOKENLAKE_CHECK(y.size() == static_cast<size_t>(n) * out);
  int32_t t = 0;
  for (; t + 4 <= n; t += 4) LinearRows<4>(x.data(), t, in, w, out, y.data());
  for (; t < n; ++t) LinearRows<1>(x.data(), t, in, w, out, y.data());
}

float Silu(float x) { return x / (1.0f + std::exp(-x)); }

int32_t Argmax(absl::Span<const float> x) {
  TOKENLAKE_CHECK(!x.empty());
  size_t best = 0;
  for (size_t i = 1; i < x.size(); ++i) {
    if (x[i] > x[best]) best = i;
  }
  return static_cast<int32_t>(best);
}

}  // namespace tokenlake::engine
