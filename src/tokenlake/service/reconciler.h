// The Reconciler: keeps the coordinator's lake in step with what the instances hold, from their
// reports (the instance's side is holdings_report.h).
//
// Its view of each instance: the segments the instance holds as its reports say, at the
// instance's change number `seq` of its store's `incarnation`. A full report replaces the view
// (diffed against it); a report of changes (from_seq, to_seq] is applied in order when the view
// is at a change number in [from_seq, to_seq) of the same incarnation (the changes it already
// has are skipped: a duplicate or a report after a lost reply), ignored when the view is
// already at to_seq or later (a late one), and answered "full report wanted" otherwise (a gap:
// lost changes, another incarnation, no view yet after a coordinator restart or a
// registration). So after every report it takes, the view equals what the instance held when it
// made the report.
//
// Where the view and the lake disagree is kept as two sets per instance, updated by every
// change of either side (a report's changes here; the lake's own changes through its replica
// observer, OnLakeChange): `unlisted` (held, but the lake lists no copy there) and `missing`
// (listed, but not held). Reconciliation reads only these sets, never the whole tree:
//   - at registration, everything unlisted is restored (Lake::RestoreReplicas, parents first;
//     after a coordinator restart the tree is rebuilt this way); segments whose parent is not
//     known yet (orphans) are retried on its heartbeats while `restore_window` lasts after the
//     coordinator started, then freed;
//   - on heartbeats, an unlisted segment (dropped or evicted by the lake) is to be freed on the
//     instance (Outcome::to_free); a missing one that stays missing over kMissesToDrop
//     heartbeats in a row is dropped from the lake (Lake::DropReplica: not while pinned), over
//     kMissesToLose even if pinned (Lake::LoseReplica: under load a popular segment is always
//     pinned, and every request that reads the missing copy fails).
// Rebalance copies not yet confirmed ("fresh"): a copy the rebalancer ordered is confirmed once
// its receiver's view holds it (or the lake no longer lists it there; forgotten after 10 s);
// until then plans that name it read from its source, and the source's copy is not freed.
//
// The plan path never waits long behind a report: changes, restores and drops are applied in
// batches of Options::batch per hold of the lake's lock, and a full report is diffed against
// the view without it.
//
// Thread-safety: thread-safe. Report takes the instance's own report mutex, then the lake's lock
// (per batch), then the internal mutex of the fresh-copy table (never held while calling
// anything else). The view of an instance changes only with both its report mutex and the
// lake's lock held; the disagreement sets only with the lake's lock held.
#ifndef TOKENLAKE_SERVICE_RECONCILER_H_
#define TOKENLAKE_SERVICE_RECONCILER_H_

#include <chrono>
#include <cstdint>
#include <memory>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/service/guarded_lake.h"
#include "tokenlake/service/metrics.h"
#include "tokenlake/store/segment_change_log.h"
#include "tokenlake/v1/tokenlake.pb.h"

namespace tokenlake::service {

class Reconciler {
 public:
  // Heartbeats in a row that found a listed replica missing before it is dropped / lost.
  static constexpr int32_t kMissesToDrop = 2;
  static constexpr int32_t kMissesToLose = 4;

  struct Options {
    // Instances of the lake (ids [0, num_instances)), >= 1.
    int32_t num_instances = 1;
    // When the coordinator started (the restore window counts from it), and the window.
    absl::Time started;
    absl::Duration restore_window = absl::Seconds(5);
    // Changes, restores or drops applied per hold of the lake's lock, >= 1.
    int32_t batch = 256;
  };

  // `lake` is borrowed and outlives this; its lake must exist before the first Report, with
  // OnLakeChange wired as its replica observer (Lake::SetReplicaObserver).
  Reconciler(GuardedLake* lake, const Options& options);

  // The lake gained (`added`) or lost a copy of `segment` on `instance`.
  // REQUIRES: the lake's lock is held (every change of the lake is made under it; asserted).
  void OnLakeChange(SegmentId segment, InstanceId instance, bool added);

  struct Outcome {
    // Segments the instance should free (each only if not stored again after acked_seq).
    std::vector<uint64_t> to_free;
    // The change number the view of the instance is at (0 when it has none).
    uint64_t acked_seq = 0;
    // The report could not be taken (a gap): the instance should send a full report.
    bool full_wanted = false;
  };
  // Takes instance `id`'s report (`state`'s holdings: segments or holdings_changes, with
  // holdings_incarnation and holdings_seq): `registration` for a Register (a new incarnation
  // of the instance; the report must be a full one, and everything it holds that the lake does
  // not list is restored), a heartbeat otherwise (reconciled as the file comment says).
  // Errors: InvalidArgument naming the instance and the problem (id out of range, changes that
  // do not number to_seq - from_seq, changes together with a segment list, a registration
  // without a full report). REQUIRES: the lake's lock is NOT held.
  absl::StatusOr<Outcome> Report(int32_t id, const v1::InstanceState& state, bool registration,
                                 absl::Time now) ABSL_LOCKS_EXCLUDED(lake_->mu);

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
    // Reports taken: full ones, change sets, change sets that found a gap (a full report was
    // asked for) and late ones (ignored); and the changes applied (from either kind).
    int64_t full_reports = 0;
    int64_t change_reports = 0;
    int64_t gaps = 0;
    int64_t late_reports = 0;
    int64_t changes_applied = 0;
    // Holds of the lake's lock by reports (seconds), and the longest one, so that what plans
    // may wait behind is measured.
    Histogram::Snapshot lock_holds;
    double longest_lock_hold_s = 0;
  };
  Stats stats() const;

  // The view of instance `id` and where it disagrees with the lake (for tests). Takes the
  // instance's report mutex and the lake's lock.
  struct View {
    bool known = false;  // a full report of `incarnation` has been taken since registration
    uint64_t incarnation = 0;
    uint64_t seq = 0;
    std::vector<lake::HeldSegment> held;                 // sorted by id
    std::vector<SegmentId> unlisted;                     // sorted
    std::vector<std::pair<SegmentId, int32_t>> missing;  // (segment, misses), sorted
  };
  View ViewOf(int32_t id) const ABSL_LOCKS_EXCLUDED(lake_->mu);

 private:
  struct Held {
    SegmentId parent;
    int32_t num_tokens = 0;
  };
  struct Instance {
    // Serialises this instance's reports; taken before the lake's lock.
    mutable absl::Mutex report_mu;
    // The view: written with report_mu and the lake's lock held, read with either.
    bool known = false;
    uint64_t incarnation = 0;
    uint64_t seq = 0;
    absl::flat_hash_map<SegmentId, Held> held;
    // Where the view and the lake disagree (the lake's lock), and orphans retried while the
    // restore window lasts (a subset of unlisted).
    absl::flat_hash_set<SegmentId> unlisted;
    absl::flat_hash_map<SegmentId, int32_t> missing;  // -> heartbeats in a row
    absl::flat_hash_set<SegmentId> pending_restore;
  };
  struct Fresh {
    int32_t source = -1;
    absl::Time since;
  };

  // A hold of the lake's lock by a report, timed into the stats.
  class ABSL_SCOPED_LOCKABLE TimedLakeLock {
   public:
    TimedLakeLock(absl::Mutex* mu, Reconciler* reconciler) ABSL_EXCLUSIVE_LOCK_FUNCTION(mu);
    ~TimedLakeLock() ABSL_UNLOCK_FUNCTION();
    TimedLakeLock(const TimedLakeLock&) = delete;
    TimedLakeLock& operator=(const TimedLakeLock&) = delete;

   private:
    absl::Mutex* const mu_;
    Reconciler* const reconciler_;
    std::chrono::steady_clock::time_point start_;
  };

  bool Listed(SegmentId segment, InstanceId instance) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(lake_->mu);
  void ApplyChange(Instance& in, InstanceId id, const store::SegmentChange& change)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(lake_->mu);
  // Applies `changes` in batches and sets the view to (incarnation, seq).
  void ApplyChanges(Instance& in, InstanceId id, const std::vector<store::SegmentChange>& changes,
                    uint64_t incarnation, uint64_t seq) ABSL_LOCKS_EXCLUDED(lake_->mu);
  // Restores `segments` (held, unlisted) parents first, in batches; rejected ones are kept for a
  // retry while `in_window`, else appended to `to_free`.
  void Restore(Instance& in, InstanceId id, std::vector<SegmentId> segments, bool in_window,
               std::vector<uint64_t>* to_free) ABSL_LOCKS_EXCLUDED(lake_->mu);
  // The heartbeat's reconciliation (file comment).
  void Reconcile(Instance& in, InstanceId id, absl::Time now, std::vector<uint64_t>* to_free)
      ABSL_LOCKS_EXCLUDED(lake_->mu);

  GuardedLake* const lake_;
  const Options options_;
  std::vector<std::unique_ptr<Instance>> instances_;
  mutable absl::Mutex mu_;
  // (segment, receiving instance) -> source.
  absl::flat_hash_map<std::pair<uint64_t, int32_t>, Fresh> fresh_ ABSL_GUARDED_BY(mu_);
  Stats stats_ ABSL_GUARDED_BY(mu_);
  Histogram lock_holds_{{50e-6, 100e-6, 250e-6, 500e-6, 1e-3, 2e-3, 5e-3, 10e-3, 50e-3}};
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_RECONCILER_H_
