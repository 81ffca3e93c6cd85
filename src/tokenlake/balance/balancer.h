// Balancer: the placement and rebalancing policy of the pool (design doc 4.2 and 4.3), over
// plain data, so the Lake, the tests and the simulator can drive it with any state.
//
// - PlaceNewSegment: where a newly produced segment is stored. The producer (the instance that
//   computed it) is preferred so most new caches do not move, unless it is full, or its memory
//   is under pressure (utilisation >= memory_high_watermark) and more than `memory_slack` above
//   the mean, or its cache load is more than `load_slack` above the mean. Never a full instance
//   when another has a free slot.
// - Rebalance: a short list of actions (drop, replicate, move), in this order:
//     1. drop extra replicas of segments that have more replicas than desired (cooled heavy
//        hitters first), from the most loaded holders;
//     2. replicate heavy hitters that have fewer replicas than desired onto the least loaded
//        instances with a free slot;
//     3. while max instance load > (1 + imbalance_threshold) x mean, move the warm segment
//        whose load best halves the gap from the most to the least loaded instance; a pinned
//        segment (read by running requests, so it cannot move) is replicated there instead,
//        which sheds load/r - load/(r + 1) from its holders (a hot shared prefix on few
//        instances, each of its segments below the heavy threshold).
//   Pinned segments are never dropped or moved (they may be replicated, in phases 2 and 3). At most
//   max_actions actions are returned.
// - PickExtraReplicaToEvict: the first step of cluster-wide eviction: an extra replica of a
//   cooled heavy hitter (replicas > desired), unpinned, from the fullest holder.
//
// Load model: a segment's load is split evenly over its replicas (the query planner spreads a
// heavy hitter's queries that way); an instance's load is the sum of its replicas' shares.
//
// Thread-safety: immutable after Create; all methods are const and thread-safe.
#ifndef TOKENLAKE_BALANCE_BALANCER_H_
#define TOKENLAKE_BALANCE_BALANCER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/base/ids.h"

namespace tokenlake::balance {

struct BalancerOptions {
  // The producer keeps a new segment unless its memory utilisation (used / capacity) is at
  // least memory_high_watermark AND exceeds the mean utilisation of the pool by more than
  // memory_slack (absolute fraction). Must be >= 0.
  double memory_slack = 0.10;
  // See memory_slack: below this utilisation memory balance never overrides the producer.
  // Must be in [0, 1].
  double memory_high_watermark = 0.9;
  // ... or its cache load exceeds (1 + load_slack) x the mean instance load. Must be >= 0.
  double load_slack = 0.5;
  // Rebalance moves segments only while max load > (1 + imbalance_threshold) x mean load.
  // Must be >= 0.
  double imbalance_threshold = 0.2;
  // Most actions one Rebalance call returns. Must be >= 1.
  int32_t max_actions = 16;
};

// One instance's state as the balancer sees it.
struct InstanceState {
  InstanceId id;
  int64_t capacity_slots = 0;  // segment slots of this instance
  int64_t used_slots = 0;      // slots holding a segment (0 <= used <= capacity)
  double load = 0;             // decayed cache load currently served by this instance
  // Cache access in force: cached tokens attended here per iteration by the plans in force
  // (plan::AccessLedger). The query planner spreads reads of replicated segments by it.
  double access_tokens = 0;
};

// One segment as the balancer sees it (warm, or holding more than one replica).
struct SegmentState {
  SegmentId segment;
  double load = 0;                   // decayed load of the segment (all replicas together)
  int32_t desired_replicas = 1;      // from HeavyHitterTracker::DesiredReplicas
  std::vector<InstanceId> replicas;  // current holders, no duplicates
  bool pinned = false;               // pinned by a running request
};

enum class ActionKind { kDrop, kReplicate, kMove };
const char* ActionKindName(ActionKind kind);

// A placement change. kDrop: remove the replica on `from` (`to` invalid). kReplicate: copy
// from `from` to `to`. kMove: copy from `from` to `to`, then remove from `from`.
struct BalanceAction {
  ActionKind kind = ActionKind::kDrop;
  SegmentId segment;
  InstanceId from;
  InstanceId to;
  friend bool operator==(const BalanceAction&, const BalanceAction&) = default;
};
std::string ToString(const BalanceAction& action);

class Balancer {
 public:
  // Returns InvalidArgument naming the field when an option is out of range.
  static absl::StatusOr<std::unique_ptr<Balancer>> Create(const BalancerOptions& options);

  // Where to store a new segment produced on `producer`. Returns nullopt when no instance has
  // a free slot (the caller must evict first). Returns InvalidArgument if `producer` is not
  // one of `instances` or an instance's state is inconsistent (used > capacity, negative).
  absl::StatusOr<std::optional<InstanceId>> PlaceNewSegment(
      InstanceId producer, absl::Span<const InstanceState> instances) const;

  // Whether a new segment produced on `producer` should stay there by the memory and load rules
  // of PlaceNewSegment, ignoring whether it has a free slot (the Lake then frees one there by
  // evicting locally rather than storing the segment elsewhere). False when `producer` is not
  // one of `instances` or a state is inconsistent.
  bool PrefersProducer(InstanceId producer, absl::Span<const InstanceState> instances) const;

  // The actions that fix most of the imbalance (see the file comment). `instances` and
  // `segments` are not modified; the caller applies the actions in order. Deterministic.
  // Actions only reference instances in `instances`; a replicate/move target always has a free
  // slot after the previous actions are applied.
  std::vector<BalanceAction> Rebalance(absl::Span<const SegmentState> segments,
                                       absl::Span<const InstanceState> instances) const;

  // The replica to evict first, if any: among unpinned segments with replicas.size() >
  // desired_replicas, the one with the lowest load per replica; its replica on the holder
  // with the highest utilisation (ties: highest load, then highest id). If `only_on` is
  // valid, only replicas on that instance are considered.
  std::optional<BalanceAction> PickExtraReplicaToEvict(absl::Span<const SegmentState> segments,
                                                       absl::Span<const InstanceState> instances,
                                                       InstanceId only_on = InstanceId()) const;

  const BalancerOptions& options() const { return options_; }

 private:
  explicit Balancer(const BalancerOptions& options) : options_(options) {}
  BalancerOptions options_;
};

}  // namespace tokenlake::balance

#endif  // TOKENLAKE_BALANCE_BALANCER_H_
