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

void Linear(absl::Span<const float> x, int32_t n, int32_t in, absl::Span<const float> w,
            int32_t out, absl::Span<float> y) {
  TOKENLAKE_CHECK(x.size() == static_cast<size_t>(n) * in);
  TOKENLAKE_CHECK(w.size() == static_cast<size_t>(out) * in);
  TOKENLAKE_CHECK(y.size() == static_cast<size_t>(n) * out);
  for (int32_t t = 0; t < n; ++t) {
    const float* xr = x.data() + static_cast<size_t>(t) * in;
    float* yr = y.data() + static_cast<size_t>(t) * out;
    for (int32_t o = 0; o < out; ++o) {
      const float* wr = w.data() + static_cast<size_t>(o) * in;
      float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
      int32_t i = 0;
      for (; i + 8 <= in; i += 8) {
        for (int k = 0; k < 8; ++k) acc[k] += xr[i + k] * wr[i + k];
      }
      float sum = ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
      for (; i < in; ++i) sum += xr[i] * wr[i];
      yr[o] = sum;
    }
  }
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
