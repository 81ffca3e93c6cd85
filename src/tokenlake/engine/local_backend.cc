#include "tokenlake/engine/local_backend.h"

#include "absl/strings/str_format.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::engine {

LocalKvBackend::LocalKvBackend(const LlamaConfig& config)
    : config_(config),
      row_(int64_t{config.num_kv_heads} * config.head_dim),
      k_(static_cast<size_t>(config.num_layers)),
      v_(static_cast<size_t>(config.num_layers)) {}

absl::Status LocalKvBackend::Attend(int32_t layer, int32_t num_tokens, absl::Span<const float> q,
                                    absl::Span<const float> k, absl::Span<const float> v,
                                    absl::Span<float> out) {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrFormat("LocalKvBackend: layer %d", layer));
  }
  auto& kl = k_[static_cast<size_t>(layer)];
  auto& vl = v_[static_cast<size_t>(layer)];
  const int64_t before = static_cast<int64_t>(kl.size()) / row_;
  kl.insert(kl.end(), k.begin(), k.end());
  vl.insert(vl.end(), v.begin(), v.end());
  const attention::KvBlock block{
      .k = kl.data(), .v = vl.data(), .num_tokens = static_cast<int32_t>(before + num_tokens)};
  const attention::AttentionParams params{.num_heads = config_.num_heads,
                                          .num_kv_heads = config_.num_kv_heads,
                                          .head_dim = config_.head_dim,
                                          .kv_dtype = attention::KvDtype::kFloat32,
                                          .causal = true,
                                          .q_start_pos = before};
  lse_.resize(static_cast<size_t>(num_tokens) * config_.num_heads);
  return attention::PartialAttention(params, num_tokens, q, absl::MakeConstSpan(&block, 1), out,
                                     absl::MakeSpan(lse_));
}

}  // namespace tokenlake::engine
