#include "tokenlake/engine/sampler.h"

#include <algorithm>
#include <cmath>
#include <numeric>
#include <vector>

#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/engine/ops.h"

namespace tokenlake::engine {

absl::Status SamplingParams::Validate() const {
  if (!(temperature >= 0.0f) || !std::isfinite(temperature)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("temperature must be a finite number >= 0, got %g", temperature));
  }
  if (top_k < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("top_k must be >= 0, got %d", top_k));
  }
  if (!(top_p > 0.0f) || !(top_p <= 1.0f)) {
    return absl::InvalidArgumentError(absl::StrFormat("top_p must be in (0, 1], got %g", top_p));
  }
  return absl::OkStatus();
}

Sampler::Sampler(const SamplingParams& params)
    : params_(params), rng_(params.seed.has_value() ? *params.seed : std::random_device{}()) {}

int32_t Sampler::Next(absl::Span<const float> logits) {
  TOKENLAKE_CHECK(!logits.empty(), "Sampler::Next: no logits");
  if (params_.greedy()) return Argmax(logits);
  // Candidates by descending logit, lower id first among equals.
  std::vector<int32_t> order(logits.size());
  std::iota(order.begin(), order.end(), 0);
  const size_t k = params_.top_k > 0 ? std::min<size_t>(params_.top_k, order.size()) : order.size();
  auto before = [&](int32_t a, int32_t b) {
    return logits[a] > logits[b] || (logits[a] == logits[b] && a < b);
  };
  std::partial_sort(order.begin(), order.begin() + static_cast<long>(k), order.end(), before);
  order.resize(k);
  // Softmax of logits / temperature over the kept tokens (in double).
  const double inv_t = 1.0 / static_cast<double>(params_.temperature);
  const double top = static_cast<double>(logits[order[0]]) * inv_t;
  std::vector<double> p(k);
  double sum = 0;
  for (size_t i = 0; i < k; ++i) {
    p[i] = std::exp(static_cast<double>(logits[order[i]]) * inv_t - top);
    sum += p[i];
  }
  // Nucleus: the shortest prefix of the order whose probability reaches top_p.
  size_t keep = k;
  if (params_.top_p < 1.0f) {
    double cum = 0;
    for (size_t i = 0; i < k; ++i) {
      cum += p[i] / sum;
      if (cum >= static_cast<double>(params_.top_p) - 1e-12) {
        keep = i + 1;
        break;
      }
    }
  }
  double kept = 0;
  for (size_t i = 0; i < keep; ++i) kept += p[i];
  const double u = std::uniform_real_distribution<double>(0.0, kept)(rng_);
  double cum = 0;
  for (size_t i = 0; i < keep; ++i) {
    cum += p[i];
    if (u < cum) return order[i];
  }
  return order[keep - 1];
}

}  // namespace tokenlake::engine
