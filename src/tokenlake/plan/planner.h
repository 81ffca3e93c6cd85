// Planner: cache load estimates and plan generation (design doc 3 and 4.4) over plain data.
//
// The Lake turns its prefix tree into PlanRequests (each request's matched segments with their
// replicas, and the segments this iteration produces); the Planner turns batches of them into
// BatchPlans. It never reads the tree itself, so the simulator and tests can drive it directly.
//
// GenPlans, for each batch (in order; a batch's work is added to the instances' loads before
// the next batch is planned, so consecutive batches spread):
//   1. Instance group: the `dop` instances (among the batch's candidates) with the highest score,
//   where an instance's score is
//      the batch's cached tokens it holds (a segment with R replicas counts 1/R on each), divided
//      by (1 + how far its load is above the mean, as a fraction of the mean). Ties: lower load,
//      then lower id.
//   2. Computing instance of each request (largest new_tokens first): its preferred instance if
//      that is in the group and under the cap, else the group member holding most of its cached
//      tokens among those whose assigned new tokens stay under the cap
//      max(largest q, ceil(total q / dop x (1 + compute_slack))); if none, the least assigned.
//   3. Query plan: for each (request, cached segment) the serving replica, under a per-holder
//      work cap of (1 + holder_slack) x (total cached work of the plan so far + this batch) /
//      num_instances (this spreads a heavy hitter's queries over its replicas). Work = q x
//      segment tokens. Two dispatch rules (PlannerOptions::dispatch, ADR 0015):
//      - kMatching: a min-cost transportation problem (transport_problem.h) over the whole
//        batch: each run of a request's consecutive segments with the same replicas places its
//        work on those replicas (a segment with one replica is not the dispatch's to place and
//        counts against no cap). Within the caps, a unit of work costs the bytes it brings:
//        bytes(r, h) (step 4) is a fixed charge once holder h serves request r, spread over
//        the work, first as if h served all it holds of r, then over what h took in the last
//        solution (dynamic slope scaling, a few rounds, the best kept); ties go to less plan
//        work, less load, then an order rotated by the request id. Beyond a cap work costs more
//        than any placement within one and spreads over the replicas by load alone. A run the
//        solver splits is cut on segment boundaries in prefix order, the largest share first.
//      - kGreedy (default): request by request, segment by segment: (a) the reader of the
//        segment's run (its consecutive segments with the same replicas, when it has several;
//        its one replica otherwise), else (b) a replica this request already uses, else (c) the
//        replica with the least work assigned in this plan, skipping replicas over the cap while
//        one fits; the same ties. A run's reader balances the pool's cache access (the cached
//        tokens attended per iteration, InstanceState::access_tokens: the plans in force, see
//        plan/access_ledger.h, plus this call's reads so far): the computing instance if its
//        access with the run's stays within (1 + access_slack) x the pool's mean, else an
//        instance the request reads from (a replica it used already, or the holder of one of
//        its single-copy segments) within the same bound, else the replica with the least
//        access (ties: the computing instance, an instance the request reads from, less load,
//        an order rotated by the request id).
//   4. Per (request, remote holder): move the queries if MoveQueriesBytes(q) <=
//      KvBytes(tokens the holder serves for it), else pull the KV (cost_model.h).
//   5. Transfer plan: each new segment goes where the Balancer places it, with the computing
//      instance as the producer (so usually where computed); when no instance has a free slot
//      the target is the computing instance and the Lake evicts at commit. Under kMatching the
//      segments whose producer keeps them (by the Balancer's rule) are placed first, then the
//      rest: a new segment's only zero-byte target is its producer, so this order is the
//      matching of least bytes (no producer loses its free slots to another's segments);
//      kGreedy places them in request order.
//
// Thread-safety: immutable after Create; const methods are thread-safe if the Balancer's are.
#ifndef TOKENLAKE_PLAN_PLANNER_H_
#define TOKENLAKE_PLAN_PLANNER_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/inlined_vector.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "tokenlake/balance/balancer.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/plan/cost_model.h"
#include "tokenlake/plan/plan_types.h"

namespace tokenlake::plan {

struct PlannerOptions {
  // Model shape used for every byte and FLOP figure.
  ModelShape shape;
  // Tokens per full segment (for memory figures). Must be > 0.
  int32_t segment_tokens = 512;
  // Slack of the per-member new-token cap when assigning computing instances. Must be >= 0.
  double compute_slack = 0.25;
  // Slack of the per-holder work cap when choosing replicas. Must be >= 0.
  double holder_slack = 0.25;
  // Greedy dispatch, a run of segments with several replicas (the file comment, step 3 (a)):
  // the computing instance, or an instance the request reads from anyway, keeps the run while
  // its cache access in force with the run's stays within (1 + access_slack) x the pool's
  // mean; otherwise the replica with the least access reads it. 0: any instance above the mean
  // gives its replicated reads away, which is what evens out the pool's access when requests
  // are planned one at a time (measured: docs/adr/0019). Must be >= 0.
  double access_slack = 0;
  // How queries and new segments are dispatched (the file comment, steps 3 and 5).
  enum class Dispatch { kMatching, kGreedy };
  // kGreedy by default: in the simulator the matching moves fewer bytes but serves decodes
  // from fewer holders, which costs latency where decode attention dominates (ADR 0015).
  Dispatch dispatch = Dispatch::kGreedy;
  // When true, GenPlans also plans every batch with the other dispatch rule, on the same
  // requests and instance states (the work of earlier batches of the same call aside), without
  // effect on its result, and adds both plans' figures to DispatchComparison (the measurement of
  // ADR 0015). Costs a second planning of every batch.
  bool compare_dispatch = false;
};

// Totals over the batches GenPlans planned with compare_dispatch on: the plans returned and, on
// the same inputs, the other dispatch rule's.
struct DispatchComparison {
  int64_t batches = 0;
  int64_t query_bytes = 0, other_query_bytes = 0;  // queries, results and pulled KV
  int64_t holders = 0, other_holders = 0;          // (request, holder) pairs
  int64_t new_segment_bytes = 0, other_new_segment_bytes = 0;
};

// A cached (matched) segment of a request, with where its replicas live.
struct CachedSegment {
  SegmentId segment;
  int32_t num_tokens = 0;
  absl::InlinedVector<InstanceId, 2> replicas;  // >= 1, distinct
};

// One request of a batch, as the planner sees it.
struct PlanRequest {
  RequestId request;
  // q: query tokens computed in this iteration. Must be >= 0.
  int64_t new_tokens = 0;
  // The matched prefix, in order.
  std::vector<CachedSegment> cached;
  // Segments this iteration completes, in order, continuing `cached` (the first one's parent
  // is cached.back(), or the root when cached is empty).
  std::vector<index::SegmentKey> new_segments;
  // Optional: the instance that should compute it (e.g. where it decoded last); used when it is
  // in the group and not over the cap. Invalid = no preference.
  InstanceId preferred_instance;
};

struct PlanBatch {
  std::vector<PlanRequest> requests;
  // Degree of parallelism: size of the instance group. Must be in [1, num_instances].
  int32_t dop = 1;
  // The instances the group is chosen from (distinct, in the pool); empty = all. dop must not
  // exceed their number.
  std::vector<InstanceId> candidates;
};

// Estimated cache work and memory on one instance for a set of requests.
struct InstanceCacheLoad {
  InstanceId instance;
  // Attention FLOPs of the requests' new queries over the cached tokens this instance holds
  // (a segment's work split evenly over its replicas), all layers.
  double attention_flops = 0;
  // KV bytes that attention reads here, all layers.
  double kv_read_bytes = 0;
  // Cached tokens served from here (split over replicas).
  double cached_tokens = 0;
  // Work in load units (q x tokens), the unit of InstanceState::load.
  double load_units = 0;
  // KV bytes stored here now (used slots x one full segment's KV).
  int64_t memory_used_bytes = 0;
  // KV bytes of the requests' new segments expected to be stored here (each request's new
  // segments are attributed to the instance holding most of its cached prefix; the least
  // loaded instance when it has none).
  int64_t new_memory_bytes = 0;
  // KV bytes of free slots here.
  int64_t memory_free_bytes = 0;
};

class Planner {
 public:
  // REQUIRES: balancer outlives the planner.
  // Errors: InvalidArgument for a bad option (named) or a null balancer.
  static absl::StatusOr<std::unique_ptr<Planner>> Create(const PlannerOptions& options,
                                                         const balance::Balancer* balancer);

  // One plan per batch, in order (see the file comment).
  // `instances[i].id` must be InstanceId(i) (dense, in order); it must not be empty.
  // Errors (InvalidArgument, message naming the batch/request/segment): dop outside
  // [1, instances.size()], candidates outside the pool, repeated, or fewer than dop, negative
  // new_tokens, a cached segment with no replica or a replica outside the pool, num_tokens <= 0,
  // instances not dense.
  absl::StatusOr<std::vector<BatchPlan>> GenPlans(
      absl::Span<const PlanBatch> batches,
      absl::Span<const balance::InstanceState> instances) const;

  // Per-instance estimated cache load of `requests` (index i is instance i).
  // Errors as GenPlans (except dop).
  absl::StatusOr<std::vector<InstanceCacheLoad>> GetCacheLoad(
      absl::Span<const PlanRequest> requests,
      absl::Span<const balance::InstanceState> instances) const;

  const PlannerOptions& options() const { return options_; }

  // The totals so far (all zero unless compare_dispatch). Thread-safe.
  DispatchComparison dispatch_comparison() const;

 private:
  Planner(const PlannerOptions& options, const balance::Balancer* balancer)
      : options_(options), balancer_(balancer) {}
  absl::Status ValidateRequests(absl::Span<const PlanRequest> requests, int32_t num_instances,
                                int32_t batch) const;

  PlannerOptions options_;
  const balance::Balancer* balancer_;
  mutable absl::Mutex comparison_mu_;
  mutable DispatchComparison comparison_ ABSL_GUARDED_BY(comparison_mu_);
};

}  // namespace tokenlake::plan

#endif  // TOKENLAKE_PLAN_PLANNER_H_
