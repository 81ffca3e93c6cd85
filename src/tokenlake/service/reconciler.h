// The Reconciler: keeps the coordinator's lake in step with what the instances report they hold.
//
// Reconciliation (on every registration and heartbeat):
//   - at registration, everything the instance reports that the lake does not list is restored
//     (Lake::RestoreReplicas; after a coordinator restart the tree is rebuilt this way);
//     segments whose parent is not known yet (orphans) are retried on its heartbeats while
//     `restore_window` lasts after the coordinator started, then freed;
//   - on heartbeats, a reported segment the lake does not list (dropped or evicted by the lake)
//     is to be freed on the instance (returned in `to_free`); a replica the lake lists that the
//     instance did not report in kMissesToDrop heartbeats in a row is dropped from the lake
//     (Lake::DropReplica: not while pinned), in kMissesToLose heartbeats in a row even if pinned
//     (Lake::LoseReplica: under load a popular segment is always pinned, and every request that
//     reads the missing copy fails).
// Rebalance copies not yet confirmed ("fresh"): a copy the rebalancer ordered is confirmed once
// its receiver reports it (or the lake no longer lists it there; forgotten after 10 s); until
// then plans that name it read from its source, and the source's copy is not freed.
//
// Thread-safety: thread-safe (one internal mutex, taken after the lake's lock and never held while
// calling anything but the lake). Apply requires the caller to hold the lake's lock
// (guarded_lake.h).
#ifndef TOKENLAKE_SERVICE_RECONCILER_H_
#define TOKENLAKE_SERVICE_RECONCILER_H_

#include <cstdint>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/v1/tokenlake.pb.h"

namespace tokenlake::service {

class Reconciler {
 public:
  // Heartbeats in a row that missed a listed replica before it is dropped / lost.
  static constexpr int32_t kMissesToDrop = 2;
  static constexpr int32_t kMissesToLose = 4;

  // `started` is when the coordinator started (the restore window counts from it).
  Reconciler(int32_t num_instances, absl::Time started, absl::Duration restore_window);

  // A new incarnation of instance `id`: forgets what its predecessor missed or left to restore.
  void Forget(int32_t id);

  // Takes instance `id`'s report into `lake` (the file comment): `reconcile` false at
  // registration, true on heartbeats. Appends the segments the instance should free.
  // REQUIRES: the caller holds the lake's lock.
  void Apply(lake::Lake& lake, int32_t id, const v1::InstanceState& state, bool reconcile,
             absl::Time now, std::vector<uint64_t>* to_free);

  // A rebalance copy of `segment` ordered from `from` to `to` at `now`.
  void AddFresh(uint64_t segment, int32_t to, int32_t from, absl::Time now);

  // Points every read of `plan` from an unconfirmed copy at the copy's source, when that source
  // is routable (`routable[i]`); a local read becomes a remote one. Returns how many changed.
  int64_t RedirectUnconfirmed(lake::IterationPlan* plan, const std::vector<bool>& routable);

  struct Stats {
    int64_t frees = 0;      // segments the instances were told to free
    int64_t drops = 0;      // replicas dropped from the lake
    int64_t restored = 0;   // replicas restored from reports
    int64_t redirects = 0;  // planned reads of unconfirmed copies sent to their source
  };
  Stats stats() const;

 private:
  struct Fresh {
    int32_t source = -1;
    absl::Time since;
  };
  const absl::Time started_;
  const absl::Duration restore_window_;
  // Per instance: listed replicas its last heartbeats did not report (with the misses in a row),
  // and reported orphans retried while the restore window lasts.
  mutable absl::Mutex mu_;
  std::vector<absl::flat_hash_map<SegmentId, int32_t>> missing_ ABSL_GUARDED_BY(mu_);
  std::vector<absl::flat_hash_set<SegmentId>> pending_restore_ ABSL_GUARDED_BY(mu_);
  // (segment, receiving instance) -> source.
  absl::flat_hash_map<std::pair<uint64_t, int32_t>, Fresh> fresh_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_RECONCILER_H_
