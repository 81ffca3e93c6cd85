// HeavyHitterTracker: per-segment decayed cache-load counters and the heavy-hitter set.
//
// Each segment's load is the work that recent queries placed on its KV: every time a request
// with `q` new (query) tokens attends over a segment of `s` tokens, Record(segment, q * s) adds
// q * s units. Counters decay exponentially with a configurable half-life on the injected Clock,
// so a segment that stops being used cools down. All counters decay at the same rate, so the
// ratio of one segment's load to the cluster total only changes when loads are recorded.
//
// Fair share = (decayed total load) / num_instances. A segment is a HEAVY HITTER when
//   load > heavy_fraction * fair_share  AND  load >= min_heavy_load.
// A heavy hitter should have DesiredReplicas = ceil(load / (replica_target_fraction *
// fair_share)) replicas (at least 1, at most the cap the caller gives: instances, memory). Any
// other segment should have exactly one.
//
// Cost: Record and Load are O(1) (one hash lookup and one exp2). The warm set (segments whose
// load exceeds track_fraction * fair_share when last recorded) is what CollectWarm scans, so
// rebalancing never scans every stored segment.
//
// Invariants: every counter is >= 0; TotalLoad() >= Load(s) for every s (up to rounding) as long
// as nothing was Forget()-ed (Forget removes a segment's counter but not its share of the total,
// which then decays away).
//
// Thread-safety: not thread-safe (the Lake serialises access under its mutex).
#ifndef TOKENLAKE_BALANCE_HEAVY_HITTER_H_
#define TOKENLAKE_BALANCE_HEAVY_HITTER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/ids.h"

namespace tokenlake::balance {

struct HeavyHitterOptions {
  // Half-life of every load counter, in microseconds of the injected Clock. Must be > 0.
  int64_t half_life_us = 10'000'000;
  // Number of instances in the pool (the fair share divides the total by it). Must be >= 1.
  int32_t num_instances = 1;
  // A segment is heavy when its load exceeds this fraction of the per-instance fair share.
  // Must be > 0.
  double heavy_fraction = 0.5;
  // Each replica of a heavy hitter should carry at most this fraction of the fair share; the
  // desired replica count is ceil(load / (replica_target_fraction * fair_share)). Must be > 0.
  double replica_target_fraction = 0.5;
  // Segments above this fraction of the fair share are kept in the warm set (the candidates
  // for moves and replication). Must be in (0, heavy_fraction].
  double track_fraction = 0.05;
  // Absolute floor (load units = query tokens x segment tokens) below which nothing is heavy,
  // so that an idle pool does not replicate the first request's prefix. Must be >= 0.
  double min_heavy_load = 1 << 20;
};

// One entry of CollectWarm / HeavyHitters.
struct SegmentLoad {
  SegmentId segment;
  double load = 0;  // decayed to the time of the call
  bool heavy = false;
};

// One exponentially decaying value (same decay law as the tracker's counters). Used by the
// Lake for per-instance cache load. Add may be negative (a load share moving away); the value
// never goes below 0. Not thread-safe.
class DecayingCounter {
 public:
  // REQUIRES: half_life_us > 0.
  explicit DecayingCounter(int64_t half_life_us = 10'000'000) : half_life_us_(half_life_us) {}
  void Add(double delta, int64_t now_us);
  double Value(int64_t now_us) const;

 private:
  int64_t half_life_us_;
  double value_ = 0;
  int64_t updated_us_ = 0;
};

class HeavyHitterTracker {
 public:
  // Returns InvalidArgument naming the field when an option is out of range.
  // REQUIRES: clock != nullptr and outlives the tracker.
  static absl::StatusOr<std::unique_ptr<HeavyHitterTracker>> Create(
      const HeavyHitterOptions& options, const Clock* clock);

  // Adds `load` units (query tokens x segment tokens) to `segment` at the clock's current time.
  // Negative or non-finite loads are ignored (a programmer error upstream, never a crash here).
  void Record(SegmentId segment, double load);

  // Decayed load of `segment` now; 0 for an unknown segment.
  double Load(SegmentId segment) const;
  // Decayed total of every load ever recorded, now.
  double TotalLoad() const;
  // TotalLoad() / num_instances.
  double FairShare() const;

  // True when `segment` is a heavy hitter now (see the file comment).
  bool IsHeavy(SegmentId segment) const;
  // Desired replica count of `segment` now: 1 unless heavy; clamped to [1, max(1, max_replicas)].
  int32_t DesiredReplicas(SegmentId segment, int32_t max_replicas) const;

  // The warm segments (load > track_fraction * fair share now), sorted by load descending, then
  // id ascending (deterministic). Prunes segments that cooled below the tracking threshold.
  std::vector<SegmentLoad> CollectWarm();
  // The heavy hitters, same order. Prunes like CollectWarm.
  std::vector<SegmentLoad> HeavyHitters();

  // Number of warm segments that are heavy now (no pruning; O(warm set)).
  int64_t CountHeavy() const;

  // Drops `segment`'s counter (it was evicted from the pool). No-op if unknown.
  void Forget(SegmentId segment);

  // Number of segments with a counter.
  size_t tracked_segments() const { return counters_.size(); }
  const HeavyHitterOptions& options() const { return options_; }

 private:
  struct Counter {
    double value = 0;
    int64_t updated_us = 0;
  };
  HeavyHitterTracker(const HeavyHitterOptions& options, const Clock* clock);
  double Decayed(const Counter& c, int64_t now_us) const;
  bool IsHeavyLoad(double load, double fair_share) const;

  HeavyHitterOptions options_;
  const Clock* clock_;
  absl::flat_hash_map<SegmentId, Counter> counters_;
  absl::flat_hash_set<SegmentId> warm_;
  Counter total_;
};

}  // namespace tokenlake::balance

#endif  // TOKENLAKE_BALANCE_HEAVY_HITTER_H_
