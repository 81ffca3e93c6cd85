#include "tokenlake/engine/pool_backend.h"

#include <algorithm>
#include <utility>

#include "absl/strings/str_format.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::engine {

PoolBackend::PoolBackend(InstancePool* pool, const LlamaConfig& config, InstanceId compute,
                         std::vector<RemoteHolder> remote, std::vector<SegmentRef> local,
                         std::vector<PulledSegment> pulled, SequenceTail* tail,
                         PoolTraffic* traffic)
    : pool_(pool),
      config_(config),
      compute_(compute),
      remote_(std::move(remote)),
      local_(std::move(local)),
      pulled_(std::move(pulled)),
      tail_(tail),
      traffic_(traffic) {}

absl::Status PoolBackend::Attend(int32_t layer, int32_t num_tokens, absl::Span<const float> q,
                                 absl::Span<const float> k, absl::Span<const float> v,
                                 absl::Span<float> out) {
  if (layer < 0 || layer >= config_.num_layers) {
    return absl::InvalidArgumentError(absl::StrFormat("PoolBackend: layer %d", layer));
  }
  const attention::PartialShape shape{
      .num_q_tokens = num_tokens, .num_heads = config_.num_heads, .head_dim = config_.head_dim};
  const size_t out_size = static_cast<size_t>(num_tokens) * config_.num_heads * config_.head_dim;
  const size_t lse_size = static_cast<size_t>(num_tokens) * config_.num_heads;

  // 1. Queries out to every remote holder first, so they compute while we do.
  std::vector<uint64_t> tickets;
  for (const RemoteHolder& r : remote_) {
    TOKENLAKE_ASSIGN_OR_RETURN(
        uint64_t ticket, pool_->StartAttend(compute_, r.holder, layer, r.segments, num_tokens, q));
    tickets.push_back(ticket);
    ++traffic_->remote_attend_calls;
    traffic_->query_bytes_out += static_cast<int64_t>(q.size() * sizeof(float));
    traffic_->partial_bytes_back += static_cast<int64_t>((out_size + lse_size) * sizeof(float));
  }

  // 2. Own causal partial over the tail plus the new tokens.
  const int64_t row = int64_t{config_.num_kv_heads} * config_.head_dim;
  auto& kl = tail_->k[static_cast<size_t>(layer)];
  auto& vl = tail_->v[static_cast<size_t>(layer)];
  const int64_t before = static_cast<int64_t>(kl.size()) / row;
  kl.insert(kl.end(), k.begin(), k.end());
  vl.insert(vl.end(), v.begin(), v.end());
  const attention::KvBlock tail_block{
      .k = kl.data(), .v = vl.data(), .num_tokens = static_cast<int32_t>(before + num_tokens)};
  const attention::AttentionParams causal{.num_heads = config_.num_heads,
                                          .num_kv_heads = config_.num_kv_heads,
                                          .head_dim = config_.head_dim,
                                          .kv_dtype = attention::KvDtype::kFloat32,
                                          .causal = true,
                                          .q_start_pos = before};
  std::vector<float> acc_lse(lse_size);
  TOKENLAKE_RETURN_IF_ERROR(attention::PartialAttention(
      causal, num_tokens, q, absl::MakeConstSpan(&tail_block, 1), out, absl::MakeSpan(acc_lse)));

  // 3. Partials over local and pulled segments, then the remote replies.
  const size_t num_partials = (local_.empty() ? 0 : 1) + (pulled_.empty() ? 0 : 1) + remote_.size();
  std::vector<std::vector<float>> outs(num_partials, std::vector<float>(out_size));
  std::vector<std::vector<float>> lses(num_partials, std::vector<float>(lse_size));
  size_t next = 0;
  if (!local_.empty()) {
    TOKENLAKE_RETURN_IF_ERROR(pool_->LocalAttend(compute_, layer, local_, num_tokens, q,
                                                 absl::MakeSpan(outs[next]),
                                                 absl::MakeSpan(lses[next])));
    ++traffic_->local_attend_calls;
    ++next;
  }
  if (!pulled_.empty()) {
    std::vector<attention::KvBlock> blocks;
    for (const PulledSegment& p : pulled_) {
      TOKENLAKE_ASSIGN_OR_RETURN(
          attention::KvBlock block,
          attention::SlotLayerBlock(pool_->layout(), p.slot.data(), layer, p.ref.num_tokens));
      blocks.push_back(block);
    }
    const attention::AttentionParams plain{.num_heads = config_.num_heads,
                                           .num_kv_heads = config_.num_kv_heads,
                                           .head_dim = config_.head_dim,
                                           .kv_dtype = pool_->layout().dtype,
                                           .causal = false};
    TOKENLAKE_RETURN_IF_ERROR(attention::PartialAttention(
        plain, num_tokens, q, blocks, absl::MakeSpan(outs[next]), absl::MakeSpan(lses[next])));
    ++next;
  }
  for (uint64_t ticket : tickets) {
    TOKENLAKE_RETURN_IF_ERROR(pool_->AwaitAttend(compute_, ticket, absl::MakeSpan(outs[next]),
                                                 absl::MakeSpan(lses[next])));
    ++next;
  }
  if (num_partials == 0) return absl::OkStatus();
  std::vector<attention::PartialView> others;
  for (size_t i = 0; i < num_partials; ++i) others.push_back({outs[i], lses[i]});
  return attention::MergePartialsInPlace(shape, {out, absl::MakeSpan(acc_lse)}, others);
}

}  // namespace tokenlake::engine
