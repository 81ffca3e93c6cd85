// SegmentDirectory: the coordinator's cluster-wide view of the cache pool: which instance
// holds which segment (the prefix tree of the whole cluster with its replicas). It is soft
// state rebuilt from what the instances report (each report replaces the instance's whole set),
// so a coordinator restart loses nothing that the instances still hold, and an instance that
// dies takes exactly its own segments with it.
//
// Segment ids are chained (index/segment_id.h), so "instance i holds the first k segments of a
// prompt" is k successive membership tests; no parent links are needed to match.
//
// Thread-safety: not thread-safe (the coordinator guards it with its own mutex).
#ifndef TOKENLAKE_SERVICE_SEGMENT_DIRECTORY_H_
#define TOKENLAKE_SERVICE_SEGMENT_DIRECTORY_H_

#include <cstdint>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/types/span.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/index/segment_id.h"

namespace tokenlake::service {

// One segment an instance reports.
struct SegmentRecord {
  SegmentId id;
  int32_t num_tokens = 0;
};

class SegmentDirectory {
 public:
  // REQUIRES: segment_tokens >= 1, max_instances >= 1 (TOKENLAKE_CHECK: configuration is
  // validated by the caller).
  SegmentDirectory(int32_t segment_tokens, int32_t max_instances);

  // Replaces everything `instance` holds with `segments`.
  // Errors: InvalidArgument (instance out of range; a segment with an invalid id or num_tokens
  // outside [1, segment_tokens], naming its index). Nothing changes on error.
  absl::Status ReplaceInstance(int32_t instance, absl::Span<const SegmentRecord> segments);
  // Forgets everything `instance` holds (it died or rejoined empty). No-op when out of range.
  void DropInstance(int32_t instance);

  // Tokens of the longest prefix of `keys` whose segments are all held by `instance`
  // (0 when out of range).
  int64_t MatchedTokens(int32_t instance, absl::Span<const index::SegmentKey> keys) const;
  // Tokens of the longest prefix of `keys` whose every segment is held somewhere.
  int64_t ClusterMatchedTokens(absl::Span<const index::SegmentKey> keys) const;
  // Instances holding `id`.
  int32_t ReplicaCount(SegmentId id) const;

  int64_t distinct_segments() const { return static_cast<int64_t>(replicas_.size()); }
  int64_t total_replicas() const { return total_replicas_; }
  int64_t SegmentsOn(int32_t instance) const;
  int64_t TokensOn(int32_t instance) const;
  int32_t max_instances() const { return static_cast<int32_t>(held_.size()); }

 private:
  const int32_t segment_tokens_;
  // Per instance: segment id -> num_tokens.
  std::vector<absl::flat_hash_map<SegmentId, int32_t>> held_;
  std::vector<int64_t> tokens_on_;
  // Segment id -> number of instances holding it (entries > 0 only).
  absl::flat_hash_map<SegmentId, int32_t> replicas_;
  int64_t total_replicas_ = 0;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_SEGMENT_DIRECTORY_H_
