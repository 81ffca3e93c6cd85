#include "tokenlake/service/segment_directory.h"

#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::service {

SegmentDirectory::SegmentDirectory(int32_t segment_tokens, int32_t max_instances)
    : segment_tokens_(segment_tokens) {
  TOKENLAKE_CHECK(segment_tokens >= 1);
  TOKENLAKE_CHECK(max_instances >= 1);
  held_.resize(max_instances);
  tokens_on_.assign(max_instances, 0);
}

absl::Status SegmentDirectory::ReplaceInstance(int32_t instance,
                                               absl::Span<const SegmentRecord> segments) {
  if (instance < 0 || instance >= max_instances()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "SegmentDirectory: instance %d out of range [0, %d)", instance, max_instances()));
  }
  for (size_t i = 0; i < segments.size(); ++i) {
    if (!segments[i].id.valid()) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "SegmentDirectory: segments[%d] of instance %d has an invalid id", i, instance));
    }
    if (segments[i].num_tokens < 1 || segments[i].num_tokens > segment_tokens_) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "SegmentDirectory: segments[%d] of instance %d has num_tokens %d outside [1, %d]", i,
          instance, segments[i].num_tokens, segment_tokens_));
    }
  }
  DropInstance(instance);
  auto& mine = held_[instance];
  for (const SegmentRecord& s : segments) {
    if (!mine.emplace(s.id, s.num_tokens).second) continue;  // duplicate in the report
    tokens_on_[instance] += s.num_tokens;
    ++replicas_[s.id];
    ++total_replicas_;
  }
  return absl::OkStatus();
}

void SegmentDirectory::DropInstance(int32_t instance) {
  if (instance < 0 || instance >= max_instances()) return;
  for (const auto& [id, tokens] : held_[instance]) {
    auto it = replicas_.find(id);
    TOKENLAKE_CHECK(it != replicas_.end());
    if (--it->second == 0) replicas_.erase(it);
    --total_replicas_;
  }
  held_[instance].clear();
  tokens_on_[instance] = 0;
}

int64_t SegmentDirectory::MatchedTokens(int32_t instance,
                                        absl::Span<const index::SegmentKey> keys) const {
  if (instance < 0 || instance >= max_instances()) return 0;
  const auto& mine = held_[instance];
  int64_t tokens = 0;
  for (const index::SegmentKey& k : keys) {
    auto it = mine.find(k.id);
    if (it == mine.end() || it->second != k.num_tokens) break;
    tokens += k.num_tokens;
  }
  return tokens;
}

int64_t SegmentDirectory::ClusterMatchedTokens(absl::Span<const index::SegmentKey> keys) const {
  int64_t tokens = 0;
  for (const index::SegmentKey& k : keys) {
    if (!replicas_.contains(k.id)) break;
    tokens += k.num_tokens;
  }
  return tokens;
}

int32_t SegmentDirectory::ReplicaCount(SegmentId id) const {
  auto it = replicas_.find(id);
  return it == replicas_.end() ? 0 : it->second;
}

int64_t SegmentDirectory::SegmentsOn(int32_t instance) const {
  if (instance < 0 || instance >= max_instances()) return 0;
  return static_cast<int64_t>(held_[instance].size());
}

int64_t SegmentDirectory::TokensOn(int32_t instance) const {
  if (instance < 0 || instance >= max_instances()) return 0;
  return tokens_on_[instance];
}

}  // namespace tokenlake::service
