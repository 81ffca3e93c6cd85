#include "tokenlake/attention/attention_reference.h"

#include <cmath>
#include <limits>
#include <vector>

#include "tokenlake/base/status_macros.h"

namespace tokenlake::attention {
namespace {

double LoadElement(const void* base, KvDtype dtype, int64_t index) {
  if (dtype == KvDtype::kFloat32) return static_cast<const float*>(base)[index];
  return Bf16ToFloat(static_cast<const uint16_t*>(base)[index]);
}

}  // namespace

absl::Status ReferencePartialAttention(const AttentionParams& params, int32_t num_q_tokens,
                                       absl::Span<const float> q, absl::Span<const KvBlock> blocks,
                                       absl::Span<float> out, absl::Span<float> lse) {
  TOKENLAKE_RETURN_IF_ERROR(ValidateAttentionArgs(params, num_q_tokens, q, blocks, out, lse));
  const int d = params.head_dim;
  const int group = params.num_heads / params.num_kv_heads;
  const double scale = params.softmax_scale != 0.0f ? static_cast<double>(params.softmax_scale)
                                                    : 1.0 / std::sqrt(static_cast<double>(d));
  // Flatten the key list: (block, row) per key.
  std::vector<std::pair<size_t, int64_t>> keys;
  for (size_t b = 0; b < blocks.size(); ++b) {
    for (int64_t t = 0; t < blocks[b].num_tokens; ++t) keys.emplace_back(b, t);
  }
  std::vector<double> scores;
  std::vector<double> acc(d);
  for (int32_t i = 0; i < num_q_tokens; ++i) {
    for (int32_t h = 0; h < params.num_heads; ++h) {
      const int kvh = h / group;
      const float* qv = q.data() + (static_cast<int64_t>(i) * params.num_heads + h) * d;
      const int64_t row = static_cast<int64_t>(i) * params.num_heads + h;
      int64_t visible = static_cast<int64_t>(keys.size());
      if (params.causal) {
        visible = std::min<int64_t>(visible, params.q_start_pos + i + 1);
      }
      scores.assign(static_cast<size_t>(visible), 0.0);
      double m = -std::numeric_limits<double>::infinity();
      for (int64_t j = 0; j < visible; ++j) {
        const auto [b, t] = keys[static_cast<size_t>(j)];
        const int64_t base = (t * params.num_kv_heads + kvh) * d;
        double dot = 0.0;
        for (int c = 0; c < d; ++c) {
          dot += static_cast<double>(qv[c]) * LoadElement(blocks[b].k, params.kv_dtype, base + c);
        }
        scores[static_cast<size_t>(j)] = dot * scale;
        m = std::max(m, scores[static_cast<size_t>(j)]);
      }
      float* o = out.data() + row * d;
      if (visible == 0) {
        for (int c = 0; c < d; ++c) o[c] = 0.0f;
        lse[row] = -std::numeric_limits<float>::infinity();
        continue;
      }
      double l = 0.0;
      std::fill(acc.begin(), acc.end(), 0.0);
      for (int64_t j = 0; j < visible; ++j) {
        const double p = std::exp(scores[static_cast<size_t>(j)] - m);
        l += p;
        const auto [b, t] = keys[static_cast<size_t>(j)];
        const int64_t base = (t * params.num_kv_heads + kvh) * d;
        for (int c = 0; c < d; ++c)
          acc[c] += p * LoadElement(blocks[b].v, params.kv_dtype, base + c);
      }
      for (int c = 0; c < d; ++c) o[c] = static_cast<float>(acc[c] / l);
      lse[row] = static_cast<float>(m + std::log(l));
    }
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::attention
