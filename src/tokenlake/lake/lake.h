// Lake: TokenLake's unified segment-level prefix cache pool, control plane (design doc 3-4).
//
// The Lake owns the cluster-wide PrefixTree, one metadata-only SegmentStore per instance (slot
// accounting; capacities may differ per instance), the heavy-hitter tracker, the balancer and the
// planner. The scheduler-facing interface is declarative: callers say WHAT they need (match a
// prompt, the cache load of some requests, plans for batches with their DoPs, admit / commit /
// release an iteration) and never choose placements: placement decisions only appear as plan data.
//
// Lifecycle of one request iteration (the simulator and the engine follow it):
//   1. Match(keys)                  - how much of the prompt is cached (optional, read-only).
//   2. GenPlans({{requests, dop}})  - instance group, query plan and transfer plan per batch.
//                                     Pure with respect to the pool (only statistics change).
//   3. Admit(request)               - pins the request's matched prefix so nothing it reads is
//                                     evicted while it runs. Counts hit statistics.
//   4. (the data plane executes the plan)
//   5. Commit(request, placements)  - the iteration's new segments become visible in the tree,
//                                     stored where the transfer plan said (or, if that instance
//                                     is full, where the balancer says; evicting cluster-wide if
//                                     the whole pool is full). They stay pinned by the request.
//      or, where a data plane writes the KV after the call (the engines, the cluster):
//      CommitPending(request, placements) places the copies the same way but as PENDING, and
//      ConfirmStored(...) lists each once its data is known to be stored (see "Pending copies").
//   6. Release(request)             - unpins everything the request pinned, records accesses
//                                     (LRU recency) and the heavy-hitter load of its matched
//                                     segments (new_tokens x segment tokens each).
//   Periodically: Rebalance()       - drops replicas of cooled heavy hitters, replicates heavy
//                                     hitters, moves a few warm segments to fix load imbalance.
// A request id may be admitted again after Release (next iteration, e.g. decode).
//
// Segments and keys: a request is described by the chained keys of its sequence (see
// index/segment_id.h: full segments of segment_tokens, the last one may be a part-segment).
// The longest run of keys found in the tree is its cached prefix; the remaining keys are the
// segments this iteration produces (new segments), which Commit stores.
//
// Eviction (design doc 4.3), only when no instance has a free slot:
//   1. an extra replica of a cooled heavy hitter (replicas > desired, unpinned), coolest first,
//      preferring one on the producer (the placement's target);
//   2. locality first: the producer's own least-recently-used unpinned last-copy leaf, when the
//      balancer would keep the segment on the producer (Balancer::PrefersProducer) and that
//      leaf is not much more recent than the cluster-wide LRU leaf (its age since last access
//      is at least local_eviction_min_age_ratio x the global one's), so that the new segment
//      is stored where it was computed and does not move;
//   3. otherwise the least-recently-used unpinned leaf of the whole tree (all its replicas);
//   never a pinned segment. If nothing can be evicted, the segment is reported not stored.
//
// Memory admission (TryAdmit): pinned replicas are never evictable, so the slots that can still
// take a new segment are AvailableSlots() = total slots - replicas of pinned segments - slots
// reserved by admitted requests for their not yet committed new segments and their extra
// slots (LakeRequest::extra_slots). TryAdmit admits a request only if its new segments (keys
// beyond its match) and extra slots fit in that, and reserves them until its Commit (each
// placement consumes one) or Release. As long as every request is
// admitted with TryAdmit, every committed segment finds a slot (never not_stored for lack of
// memory). Rebalance never replicates a pinned segment into a slot that a reservation needs.
//
// Pending copies (docs/adr/0016): a copy that CommitPending placed is counted everywhere a
// copy takes room (its slot is allocated, its node is in the tree and pinned by the committing
// request, reservations are consumed as by Commit), but it is not VISIBLE: no Match, plan, cache
// load or admission sees it (the matched prefix ends before the first segment without a visible
// copy, and a plan never names a pending copy as a holder), Rebalance leaves its segment alone,
// and a request that commits the same segment meanwhile neither places another copy nor pins
// or reads this one (CommitResult::pending_elsewhere; it keeps its own KV). ConfirmStored makes
// the committing request's copies visible, each only once its parent is visible (chain order).
// A copy still pending when its request is released (Release, or the request dropped by the
// caller for any reason) is dropped and its slot freed; one lost with its instance (DropInstance,
// LoseReplica, eviction of an extra copy) is simply gone. So a visible copy is always one whose
// data was reported stored, or one made by Commit, Rebalance or RestoreReplicas.
//
// Tails in the pool (docs/adr/0017): a request whose LakeRequest names a tail (tail_end_tokens >
// 0; the GPU engine's) keeps its KV rows after its matched prefix, up to tail_end_tokens, in TAIL
// SLOTS of the pool: one slot per segment-aligned block of segment_tokens rows, block i holding
// the rows of the segment that will follow the tail's first i segments (a slot has exactly a
// segment's layout). Admit / TryAdmit make the tail cover [matched tokens, tail_end_tokens):
// blocks before the matched prefix are given back (another request stored them), missing ones
// are taken where a new segment produced on tail_instance would go (evicting as for new
// segments), and the slots they take are returned in AdmitResult (tail_slots, and the copies
// evicted for them, which the caller frees). A tail slot is counted as used in its store (never
// placed on, never evicted) and AvailableSlots() subtracts every tail slot, so TryAdmit waits
// while tails fill the pool; a tail request reserves nothing for its new segments: each one is
// its tail's next block already. Its Commit / CommitPending takes its placements as its
// tail's blocks in order: a segment whose placement targets the block's instance, or whose
// target has no free slot, is committed IN PLACE (the block becomes the segment's slot:
// CommitResult::in_place, no data moves); one placed on another instance with room is stored
// there and the block is given back, as is the block of a deduplicated segment. From the first
// placement that leaves its block in the tail (pending elsewhere, not stored) on, the rest stay
// in the tail too (not stored): a tail is the contiguous run of rows after what the pool holds.
// A tail outlives Release (a running request keeps its KV between iterations) and is given
// back by ReleaseTail, when the request ends.
//
// Load accounting: a segment's heavy-hitter load is recorded at Release (the prefill's queries
// over its matched prefix) and by RecordQueryLoad (later queries, e.g. decodes, over every
// segment the request pins); each instance's decayed cache load gets the segment's load divided
// evenly among its replicas.
//
// Cache access in force (plan::AccessLedger): every plan GenPlans returns is in force for its
// request until the request's next plan or its Release (a decode's one plan serves all its
// iterations); a plan of a request that is not admitted by the next GenPlans call is dropped
// then (it was never run). The planner spreads reads of replicated segments by each instance's
// access in force (planner.h, step 3), so that requests planned one at a time still even out
// the cache access of the pool; a request planned again does not count its own plan in force.
//
// Errors (absl::Status, never a crash): InvalidArgument for invalid options (zero instances,
// segment_tokens 0, slot counts, model shape...), for an unknown instance, a DoP outside
// [1, num_instances], keys with bad lengths, negative new_tokens; AlreadyExists for admitting an
// active request; NotFound for committing/releasing a request that is not active.
//
// Thread-safety: every public method is thread-safe (one internal mutex). prefix_tree() returns a
// reference to the live tree: reading it while another thread calls a mutating method
// (Admit, Commit, Release, Rebalance) is a data race, so single-threaded callers (the
// simulator, the scheduler loop) may use it freely; others should use Match().
#ifndef TOKENLAKE_LAKE_LAKE_H_
#define TOKENLAKE_LAKE_LAKE_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/types/span.h"
#include "tokenlake/balance/balancer.h"
#include "tokenlake/balance/heavy_hitter.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/index/prefix_tree.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/plan/access_ledger.h"
#include "tokenlake/plan/cost_model.h"
#include "tokenlake/plan/plan_types.h"
#include "tokenlake/plan/planner.h"
#include "tokenlake/store/segment_store.h"

namespace tokenlake::lake {

// Hot-run replication at planning time (docs/adr/0020, Lake::ReplicateHotRuns).
struct HotRunOptions {
  // false: ReplicateHotRuns does nothing.
  bool enabled = false;
  // A run's serving holder is hot when its cache access in force exceeds (1 + this) x the
  // pool's mean. Must be >= 0.
  double access_margin = 0.25;
  // ... and the run carries at least this share of that holder's access: its estimated access
  // (requests pinning it x its tokens / its copies) >= this x the holder's access. In (0, 1].
  double min_access_share = 0.25;
  // A copy of a run never takes more than this share of the target instance's slots (runs
  // longer than that are not copied; the copies it displaces are bounded by it). In (0, 1].
  double max_instance_share = 0.25;
};

struct LakeOptions {
  // Number of instances (InstanceIds 0 .. num_instances-1). Must be >= 1.
  int32_t num_instances = 4;
  // Tokens per full segment (S). Must be >= 1.
  int32_t segment_tokens = 512;
  // Segment slots per instance, used when instance_slots is empty. Must be >= 1.
  int32_t slots_per_instance = 1024;
  // Optional per-instance slot counts (size must equal num_instances, each >= 1); overrides
  // slots_per_instance.
  std::vector<int32_t> instance_slots;
  // The model's shape (bytes and FLOPs of every plan figure).
  plan::ModelShape model;
  // Heavy-hitter detection knobs (num_instances is taken from this struct's num_instances).
  balance::HeavyHitterOptions heavy_hitter;
  // Placement and rebalancing knobs.
  balance::BalancerOptions balancer;
  // Planner slacks (its shape and segment_tokens are taken from this struct).
  plan::PlannerOptions planner;
  // Locality of new segments when the pool is full (eviction step 2 in the file comment): the
  // producer's own LRU leaf is evicted instead of the cluster-wide one when its age is at least
  // this ratio of the cluster-wide LRU leaf's age. 0 = always evict on the producer when it has
  // a candidate; > 1 = never (cluster-wide LRU only, the behaviour before this option).
  // Must be >= 0.
  double local_eviction_min_age_ratio = 0.5;
  // Nodes to reserve in the prefix tree up front (0 = grow on demand). Must be >= 0.
  int64_t reserve_segments = 0;
  // Copies of hot runs decided from the plans in force (ReplicateHotRuns).
  HotRunOptions hot_runs;
};

// One request (one iteration of it) as the scheduler describes it.
struct LakeRequest {
  RequestId id;
  // The chained keys of the request's sequence up to the end of this iteration, in order.
  // Full segments have segment_tokens tokens; only the last may be shorter (a part-segment).
  std::vector<index::SegmentKey> keys;
  // Query tokens computed in this iteration (prefill: the uncached prompt tokens; decode: 1).
  // Must be >= 0.
  int64_t new_tokens = 0;
  // Optional: the instance that should compute it if it is in the batch's group (e.g. where it
  // ran last). Invalid = no preference.
  InstanceId preferred_instance;
  // Whether Admit counts this iteration in the hit statistics (true for a prefill, false for
  // later decode iterations of the same request).
  bool count_hits = true;
  // TryAdmit only: slots to reserve beyond the new segments, for KV the request will produce
  // that has no key yet (its generated tokens), held until Release. This is how a running
  // request's whole KV lives in the one pool. Must be >= 0.
  int64_t extra_slots = 0;
  // > 0: the request's tail is in the pool (file comment, "Tails in the pool") and covers its
  // rows up to this token (the end of the iteration), taken on tail_instance where it has
  // room. 0 = no tail in the pool (and any tail the request holds stays as it is). Must be >= 0.
  int64_t tail_end_tokens = 0;
  // The instance the tail's new blocks prefer (the computing instance); valid and in the pool
  // when tail_end_tokens > 0.
  InstanceId tail_instance;
};

struct Batch {
  std::vector<LakeRequest> requests;
  // Degree of parallelism: instances in the group. Must be in [1, num_instances].
  int32_t dop = 1;
  // The instances the group may be chosen from (e.g. those the scheduler has free now),
  // distinct and in the pool; empty = any. dop must not exceed their number.
  std::vector<InstanceId> candidates;
};

struct StoredReplica {
  SegmentId segment;
  InstanceId instance;
  friend bool operator==(const StoredReplica&, const StoredReplica&) = default;
};

struct AdmitResult {
  int32_t matched_segments = 0;
  int64_t matched_tokens = 0;  // the request's cached prefix (its hit)
  // TryAdmit only: slots reserved for the request's new segments (keys beyond the match).
  int64_t reserved_slots = 0;
  // A tail request (tail_end_tokens > 0): the instance of each block of its tail now, in row
  // order (block i holds rows [matched_tokens + i S, matched_tokens + (i + 1) S)).
  std::vector<InstanceId> tail_slots;
  // Replicas evicted to make room for the tail's new blocks (the caller frees them before it
  // writes the tail), and the change sequence number of that eviction (CommitResult::sequence;
  // 0 when nothing was evicted).
  std::vector<StoredReplica> evicted;
  uint64_t sequence = 0;
};

struct CommitResult {
  // New segments now stored, with where (may differ from the plan's target when that instance
  // filled up in the meantime).
  std::vector<StoredReplica> stored;
  // Segments that were already stored (another request committed them first): nothing stored.
  std::vector<SegmentId> deduplicated;
  // Segments that could not be stored: the pool is full of pinned segments, or their parent is
  // not stored (or has no visible copy: it is pending for another request). Not an error: the
  // request just does not leave this cache behind.
  std::vector<SegmentId> not_stored;
  // Segments another request placed and has not confirmed yet (pending copies): nothing placed,
  // nothing pinned, and not readable yet; the caller keeps their KV itself.
  std::vector<SegmentId> pending_elsewhere;
  // Replicas evicted to make room (a segment evicted whole appears once per replica).
  std::vector<StoredReplica> evicted;
  // Of `stored`, the segments committed in place: the request's tail block on that instance
  // became the segment's slot (its data is there already; nothing to copy).
  std::vector<SegmentId> in_place;
  // Bytes of new segments stored away from their source instance.
  int64_t moved_bytes = 0;
  // The lake's change sequence number of this call (every Commit and Rebalance takes the next
  // one): a copy placed by a later call has a larger number, so a data plane that remembers
  // each copy's number can tell an evicted copy from the same segment placed there again.
  uint64_t sequence = 0;
};

// One copy that a request's CommitPending placed, reported stored by the data plane.
struct StoreConfirmation {
  RequestId request;
  SegmentId segment;
  InstanceId instance;
  friend bool operator==(const StoreConfirmation&, const StoreConfirmation&) = default;
};

struct ConfirmResult {
  // Copies that became visible.
  int64_t confirmed = 0;
  // Confirmations that changed nothing: the copy is not pending for that request (already
  // visible, dropped with its request's release, lost with its instance, placed by another
  // request) or its parent has no visible copy (it stays pending).
  std::vector<StoreConfirmation> refused;
};

struct RebalanceResult {
  // The actions applied, in order.
  std::vector<balance::BalanceAction> actions;
  // KV bytes copied by replicate and move actions.
  int64_t bytes_moved = 0;
  // The lake's change sequence number of this call (see CommitResult::sequence).
  uint64_t sequence = 0;
};

// One segment an instance reports holding (RestoreReplicas): its id, its parent in the chain
// (invalid for a root child) and its token count.
struct HeldSegment {
  SegmentId id;
  SegmentId parent;
  int32_t num_tokens = 0;
};

struct RestoreResult {
  // Replicas added on the instance (new nodes and extra copies of known nodes).
  int64_t restored_replicas = 0;
  // Of those, nodes created in the tree.
  int64_t new_segments = 0;
  // Reported segments already listed on the instance (nothing to do).
  int64_t already_listed = 0;
  // Segments not restored: their parent is neither in the tree nor restorable from the report
  // (orphans), their id is known with another parent or length, their length is invalid, or the
  // instance has no free slot. The instance should free them.
  std::vector<SegmentId> rejected;
};

struct InstanceStats {
  InstanceId instance;
  int64_t capacity_slots = 0;
  int64_t used_slots = 0;
  int64_t free_slots = 0;
  // Tokens of the segments with a copy here (a segment's tokens count once per copy).
  int64_t tokens = 0;
  double load = 0;  // decayed cache load (query tokens x cached tokens)
  // Cached tokens attended here per iteration by the plans in force (file comment).
  int64_t access_tokens = 0;
};

struct LakeStats {
  int64_t segments = 0;         // distinct segments stored
  int64_t replicas = 0;         // stored copies (>= segments)
  double redundancy = 0;        // replicas / segments (0 when empty)
  int64_t stored_tokens = 0;    // distinct tokens cached
  int64_t pinned_segments = 0;  // segments pinned by running requests
  int64_t heavy_hitters = 0;    // currently heavy segments (warm set)
  std::vector<InstanceStats> instances;
  // Plans generated so far: bytes their transfers move (query, pull, new segment) and in total.
  int64_t plan_query_bytes = 0;
  int64_t plan_kv_pull_bytes = 0;
  int64_t plan_new_segment_bytes = 0;
  int64_t plan_total_bytes = 0;
  // Bytes moved by Commit (new segments stored off their source) and by Rebalance.
  int64_t commit_moved_bytes = 0;
  int64_t rebalance_bytes = 0;
  // Hit statistics over admitted iterations with count_hits.
  int64_t admitted_requests = 0;
  int64_t prompt_tokens = 0;
  int64_t hit_tokens = 0;
  double hit_rate = 0;  // hit_tokens / prompt_tokens (0 when none)
  // Eviction and dedup counters.
  int64_t evicted_replicas = 0;
  int64_t evicted_segments = 0;  // nodes erased from the tree by eviction
  int64_t deduplicated_segments = 0;
  int64_t not_stored_segments = 0;
  int64_t active_requests = 0;
  // Memory admission (see TryAdmit): replicas of pinned segments, slots reserved by admitted
  // requests for new segments not yet committed, and AvailableSlots() (capacity - both).
  int64_t pinned_replicas = 0;
  int64_t reserved_slots = 0;
  int64_t available_slots = 0;
  // TryAdmit calls that found too little memory (the request must wait).
  int64_t admissions_deferred = 0;
  // Placements stored on their producer by evicting there (eviction step 2).
  int64_t local_evictions = 0;
  // Cold leaves Rebalance evicted to make way for a replica (see Rebalance).
  int64_t rebalance_displaced = 0;
  // Pending copies (CommitPending): placed and not yet confirmed now (a gauge); confirmed so
  // far; dropped unconfirmed at their request's release; and placements that found their
  // segment pending for another request (CommitResult::pending_elsewhere).
  int64_t pending_copies = 0;
  int64_t confirmed_copies = 0;
  // Tails in the pool: slots the requests' tails hold now (a gauge, part of every instance's
  // used slots), and segments committed in place from a tail so far.
  int64_t tail_slots = 0;
  int64_t in_place_commits = 0;
  int64_t dropped_pending_copies = 0;
  int64_t pending_elsewhere_segments = 0;
};

class Lake {
 public:
  // Errors: InvalidArgument naming the bad option. REQUIRES: clock outlives the Lake.
  static absl::StatusOr<std::unique_ptr<Lake>> Create(const LakeOptions& options, Clock* clock);
  ~Lake();
  Lake(const Lake&) = delete;
  Lake& operator=(const Lake&) = delete;

  // ---- Read-only views ----

  // The live prefix tree (see the thread-safety note in the file comment).
  const index::PrefixTree& prefix_tree() const { return *tree_; }
  // The request's cached prefix (a miss is {0, 0, invalid}). Does not change recency.
  index::MatchResult Match(absl::Span<const index::SegmentKey> keys) const;

  // Per-instance estimated cache work and memory of serving `requests` (index i = instance i).
  // Errors: InvalidArgument for bad keys or negative new_tokens.
  absl::StatusOr<std::vector<plan::InstanceCacheLoad>> GetCacheLoad(
      absl::Span<const LakeRequest> requests) const;

  // The paper's get_cache_load (section 6.1; plan::CacheLoad has the formula): the share
  // L = max(M / (M + N B T), F / (F + N P T)) of a batch of `requests` with iteration time
  // `batch_seconds` (T) that reading the cache adds when this pool (N = num_instances()
  // instances, each of `roofline`) spreads it evenly; each request's prefix is its keys' match
  // in the pool now and its input its new_tokens. The scheduler charges a batch
  // T / (1 - L) (sched::ElasticSchedulerOptions::pool_cache).
  // Errors: InvalidArgument for bad keys or new_tokens, a non-positive B, P or T (named).
  absl::StatusOr<double> GetCacheLoad(absl::Span<const LakeRequest> requests,
                                      const plan::InstanceRoofline& roofline,
                                      double batch_seconds) const;

  // One plan per batch (plan/planner.h says how). Deterministic for the same pool state.
  // Errors: InvalidArgument for a DoP outside [1, num_instances] (naming the batch), bad keys,
  // negative new_tokens, an invalid preferred instance outside the pool.
  absl::StatusOr<std::vector<plan::BatchPlan>> GenPlans(absl::Span<const Batch> batches);

  // ---- Request lifecycle ----

  // Pins the request's matched prefix (and, for a tail request, makes its tail cover the
  // iteration, evicting unpinned segments as needed). Errors: AlreadyExists (id active),
  // InvalidArgument (bad keys / new_tokens / invalid id / tail fields), ResourceExhausted (a
  // tail request whose tail cannot grow: the pool's other slots are pinned or other tails;
  // nothing changed).
  absl::StatusOr<AdmitResult> Admit(const LakeRequest& request);

  // Admit with memory admission: if the pool can hold the request's new segments (the keys
  // beyond its current match) on top of everything pinned and reserved, counting the matched
  // segments it is about to pin, pins its prefix and reserves that many slots (until Commit
  // consumes them or Release) and returns the AdmitResult (reserved_slots set). Otherwise
  // returns nullopt and changes nothing (no pin, no hit statistics): the caller should retry
  // once memory is released. A request with more keys than the whole pool's slots never fits.
  // A tail request counts its tail's growth instead of its new segments (they are its tail's
  // blocks) and reserves nothing for them.
  // Errors: as Admit.
  absl::StatusOr<std::optional<AdmitResult>> TryAdmit(const LakeRequest& request);

  // Slots that can still take a new segment: total slots - replicas of pinned segments -
  // reserved slots - tail slots (may be negative if plain Admit over-subscribed the pool). O(1).
  int64_t AvailableSlots() const;

  // Gives back every slot of the request's tail (file comment, "Tails in the pool"): the
  // request ended (finished, cancelled, failed) or dropped its tail (restarted). OK when it has
  // none. Does not touch its pins (Release does).
  void ReleaseTail(RequestId request);
  // The instance of each block of the request's tail, in row order (empty: none).
  std::vector<InstanceId> TailSlots(RequestId request) const;
  // Gives back, as ReleaseTail, the tails of the requests whose engine ran on `instance` (the
  // tail_instance of their latest admission): another process took that instance's place, so
  // nobody will ever end them (the instances that held blocks of them give those slots back
  // themselves: PeerDevicePool::ForgetPeerTails). Returns the requests in id order. Their pins
  // are not touched (Release; the request path releases a failed attempt's).
  std::vector<RequestId> ReleaseTailsComputedOn(InstanceId instance);
  // Instances whose slots each other's kernels can write in place (instances on one GPU: a
  // tail's blocks are written by its computing instance's forward, docs/adr/0018) share a
  // device domain. A tail's new blocks go only to its computing instance's domain (evicting
  // there when the domain is full); segments go anywhere. domains[i] is instance i's; empty (the
  // default) is one domain for all. Blocks placed before a change stay where they are.
  // Errors: InvalidArgument unless `domains` is empty or has num_instances() entries.
  absl::Status SetDeviceDomains(std::vector<int32_t> domains);

  // Stores the request's new segments where `placements` say (normally the plan's
  // transfer.new_segments entries whose request is this one; entries for other requests are
  // an error). Placements must continue the request's chain: each one's parent must be stored
  // (or invalid for a root child). Stored and deduplicated segments become pinned by the
  // request until Release.
  // Errors: NotFound (request not active), InvalidArgument (a placement for another request,
  // an unknown target/source instance, a bad num_tokens). Nothing is changed on error.
  absl::StatusOr<CommitResult> Commit(RequestId request,
                                      absl::Span<const plan::NewSegmentPlacement> placements);

  // Commit whose copies are PENDING (file comment, "Pending copies"): placed, evicted for,
  // deduplicated, counted and pinned exactly as by Commit, but listed to no plan or match until
  // ConfirmStored names them, and dropped at the request's Release if it never does.
  // CommitResult::stored lists the pending copies (the caller stores each, then confirms it).
  // A placement whose parent is pending for this request is placed (a chain committed in one
  // iteration); one whose parent is pending for another request is not stored.
  // Errors: as Commit.
  absl::StatusOr<CommitResult> CommitPending(
      RequestId request, absl::Span<const plan::NewSegmentPlacement> placements);

  // The data plane stored these copies: each one pending for its request (on that instance)
  // becomes visible, in the order given, provided its parent is visible by then (a chain is
  // confirmed parents first). Anything else is refused and changes nothing (see ConfirmResult):
  // a late or repeated confirmation is harmless. Errors: InvalidArgument (an instance outside
  // the pool; nothing is changed).
  absl::StatusOr<ConfirmResult> ConfirmStored(absl::Span<const StoreConfirmation> copies);

  // Convenience: Commit the request's keys beyond its matched prefix, produced on `producer`
  // (placed as the balancer says). Errors as Commit, plus InvalidArgument for a bad producer.
  absl::StatusOr<CommitResult> CommitKeys(RequestId request,
                                          absl::Span<const index::SegmentKey> keys,
                                          InstanceId producer);

  // Unpins everything the request pinned, records accesses and heavy-hitter load, and drops
  // the copies its CommitPending placed that were never confirmed (their slots are free again;
  // the data plane holds nothing the lake lists). Errors: NotFound (request not active).
  absl::Status Release(RequestId request);

  // Records the load of `query_tokens` more queries of an active request over every segment it
  // pins (its matched prefix and the segments it committed): a decode's iterations, which
  // attend to the whole sequence. Release records the prefill's queries over the matched
  // prefix; this records the rest, so heavy hitters are found from all the work that reads
  // them. Errors: NotFound (request not active), InvalidArgument (query_tokens < 0).
  absl::Status RecordQueryLoad(RequestId request, int64_t query_tokens);

  // ---- Maintenance ----

  // Rebalances (balance/balancer.h) and applies the actions. A full instance whose least
  // recently used last-copy leaf is cold (as old as local_eviction_min_age_ratio x the pool's
  // LRU leaf) offers the balancer one slot: a replica that lands there first evicts that
  // leaf, listed as a kDrop action before it (a move there is skipped). Without it a pool that
  // caching keeps full could never replicate a heavy hitter, nor spread a hot shared prefix
  // that running requests pin. An action planned on a state that a skipped one did not leave
  // (its source no longer holds the segment, or its target already does) is skipped too.
  absl::StatusOr<RebalanceResult> Rebalance();

  // Hot-run replication at planning time (docs/adr/0020; off unless options().hot_runs.enabled).
  // For each request of `plans` (as GenPlans returned them, in force now), each RUN of its plan
  // (consecutive segments read on one holder, with the same copies) whose holder's cache access
  // in force exceeds (1 + access_margin) x the pool's mean and whose estimated access (the
  // requests pinning its first segment x its tokens / its copies) is at least
  // min_access_share x that holder's access is copied, segment by segment in prefix order, to
  // the instance with the least access in force below the mean that holds none of it, when the
  // run fits in max_instance_share of that instance's slots. A copy goes into a free slot, or
  // displaces the instance's LRU last-copy leaf as Rebalance's copies do (when it is old enough);
  // a pinned segment is copied only while AvailableSlots() > 0. The copying stops at the first
  // segment that finds no room (the prefix copied so far stays). At most one copy per run per
  // call. The copies are extra replicas: Rebalance drops them once their segments are no longer
  // pinned (they are not heavy), and eviction takes them first. The plans themselves are not
  // changed (they read the copies they named); later plans may read the new copies (ADR 0019).
  // Returns the actions applied (kReplicate from the run's holder, and kDrop of displaced
  // leaves) and the bytes copied, for the caller to move the data. Plans naming requests or
  // segments no longer in the pool are skipped. No errors but Internal.
  absl::StatusOr<RebalanceResult> ReplicateHotRuns(absl::Span<const plan::BatchPlan> plans);

  // The instance is lost: its replicas disappear (segments whose only copy it held are erased
  // with their subtrees). Errors: InvalidArgument (unknown instance).
  absl::Status DropInstance(InstanceId instance);

  // Rebuilds the instance's part of the pool from what it reports holding (e.g. after a
  // coordinator restart, when instances re-register): every reported segment whose parent is in
  // the tree (or is itself restorable from `held`, which may be in any order: parents are
  // inserted first) becomes a replica on `instance`; a segment the tree already lists with the
  // same parent and length gets an extra replica. Orphans (parent unknown, or with no visible
  // copy: pending), conflicting ids, bad lengths and segments beyond the instance's free slots
  // are reported as rejected and change nothing. A reported segment that is pending on this
  // very instance is confirmed (its data is there), parents first. Restored segments are
  // unpinned, last accessed now.
  // Errors: InvalidArgument (unknown instance). O(|held| x depth) worst case.
  absl::StatusOr<RestoreResult> RestoreReplicas(InstanceId instance,
                                                absl::Span<const HeldSegment> held);

  // Drops the copy of `segment` on `instance` (the instance lost it, e.g. heartbeat
  // reconciliation). Removing the last copy erases the node, allowed only for an unpinned leaf.
  // Errors: InvalidArgument (unknown instance), NotFound (no such replica), FailedPrecondition
  // (the segment is pinned by a running request, or it is the last copy of an interior node:
  // use DropInstance). Nothing is changed on error.
  absl::Status DropReplica(SegmentId segment, InstanceId instance);

  // The copy of `segment` on `instance` is gone (the instance reported, repeatedly, that it does
  // not hold it): like DropInstance for one copy, pins do not protect it. A non-last copy is
  // removed; the last copy erases the segment and its whole subtree (their copies elsewhere are
  // freed and returned, for the caller to free on those instances), and running requests lose
  // their pins on the erased segments. Returns the copies freed on other instances. O(1) for a
  // copy that is not the last; O(size of its subtree) for a last copy.
  // Errors: InvalidArgument (unknown instance), NotFound (no such copy).
  absl::StatusOr<std::vector<StoredReplica>> LoseReplica(SegmentId segment, InstanceId instance);

  // ---- Introspection ----

  // Tells `observer` of every copy the pool gains or loses from now on, whichever call made the
  // change (index::PrefixTree::ReplicaObserver: once per (segment, instance), right after the
  // change). It runs with the lake's lock held and must not call the lake. Empty: none.
  // A pending copy is told when it is placed (its slot is taken then), not when confirmed.
  void SetReplicaObserver(index::PrefixTree::ReplicaObserver observer);

  // The counters and gauges, kept up to date as the pool changes: never a walk of the tree.
  // heavy_hitters scans the warm set (the segments tracked for rebalancing) unless
  // `scan_heavy_hitters` is false: then it is the count found by the latest Rebalance, and the
  // call is O(instances) (for a metrics scrape under a lock that plans need).
  LakeStats Stats(bool scan_heavy_hitters = true) const;
  // The tree's integrity, every store's integrity, that each store holds exactly the tree's
  // replicas on its instance, and that every pending copy is in the tree, pinned, and owned by
  // an active request that lists it. OK or Internal naming the first violation. O(n).
  absl::Status CheckIntegrity() const;
  // Whether `segment` is currently heavy, and its decayed load.
  bool IsHeavyHitter(SegmentId segment) const;
  double SegmentLoad(SegmentId segment) const;

  // The planner's comparison of its dispatch with the other rule (all zero unless
  // options().planner.compare_dispatch; plan::PlannerOptions).
  plan::DispatchComparison dispatch_comparison() const { return planner_->dispatch_comparison(); }

  int32_t num_instances() const { return options_.num_instances; }
  const LakeOptions& options() const { return options_; }

 private:
  struct Active {
    std::vector<SegmentId> pinned;           // every pin this request holds
    std::vector<index::SegmentKey> matched;  // its matched prefix at Admit
    int64_t new_tokens = 0;
    int64_t reserved_slots = 0;      // TryAdmit's reservation not yet consumed by Commit
    std::vector<SegmentId> pending;  // copies its CommitPending placed, in placement order
  };
  // A copy placed by CommitPending, not confirmed yet. A node has at most one (CommitPending
  // places only new nodes).
  struct PendingCopy {
    RequestId owner;
    InstanceId instance;
  };
  // One block of a request's tail: a tail slot of `instance`'s store.
  struct TailBlock {
    InstanceId instance;
    SlotId slot;
  };
  // A request's tail in the pool: blocks[i] holds rows [first_tokens + i S, ... + S).
  struct Tail {
    int64_t first_tokens = 0;
    std::vector<TailBlock> blocks;
    // The instance whose engine computes the request (its latest admission's tail_instance).
    InstanceId computing;
  };
  explicit Lake(const LakeOptions& options, Clock* clock);

  absl::Status ValidateKeys(absl::Span<const index::SegmentKey> keys) const;
  absl::Status ValidateRequest(const LakeRequest& request) const;
  std::vector<balance::InstanceState> InstanceStatesLocked() const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  plan::PlanRequest ToPlanRequestLocked(const LakeRequest& request) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  std::vector<balance::SegmentState> ReplicatedStatesLocked() const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // InstanceStatesLocked() for a run of placement and eviction decisions under one lock hold:
  // built on the first Get(), then kept current from the allocations the caller reports and
  // the evictions appended to `evicted` (each frees one slot on its instance). Valid only while
  // nothing else changes the stores or the loads.
  class InstanceStatesCache {
   public:
    InstanceStatesCache(const Lake* lake, const std::vector<StoredReplica>* evicted)
        : lake_(lake), evicted_(evicted) {}
    // REQUIRES: the lake's mu_ is held (it is used inside CommitLocked only).
    const std::vector<balance::InstanceState>& Get() ABSL_NO_THREAD_SAFETY_ANALYSIS;
    void Allocated(InstanceId instance);
    void Freed(InstanceId instance);

   private:
    const Lake* lake_;
    const std::vector<StoredReplica>* evicted_;
    std::vector<balance::InstanceState> states_;
    size_t seen_ = 0;
    bool built_ = false;
  };
  // Frees one slot somewhere (eviction order in the file comment). False when nothing can go.
  // `states` is InstanceStatesLocked() now.
  bool EvictOneLocked(absl::Span<const balance::InstanceState> states,
                      std::vector<StoredReplica>* evicted) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Where a new slot produced on `target` goes: target if it has a free slot, else where the
  // balancer places it, else target after evicting there (locality), else anywhere after
  // evicting pool-wide (the eviction order in the file comment). Invalid when nothing can go,
  // or when `must_stay` (valid) was evicted on the way (a new segment's parent).
  InstanceId PlaceLocked(InstanceId target, SegmentId must_stay, InstanceStatesCache& states,
                         std::vector<StoredReplica>* evicted) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Where a new block of a tail computed on `computing` goes: PlaceLocked's choice in one device
  // domain; else `computing` if it has a free slot, else the instance of its domain with the most
  // free slots, else one of them after dropping a copy there (computing first). Invalid when
  // nothing in the domain can go.
  InstanceId PlaceTailBlockLocked(InstanceId computing, InstanceStatesCache& states,
                                  std::vector<StoredReplica>* evicted)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Slots the device domain of `computing` can give a tail's new blocks (PlaceTailBlockLocked):
  // its free slots plus the copies there that repeated drops would remove, with the segments of
  // `to_pin` counted as pinned (the admission pins them first). Exact below `enough`; at least
  // `enough` when the domain's free slots alone reach it (no pass over the tree). With one
  // domain the callers' pool-wide check is the whole rule: INT64_MAX. Otherwise O(tree).
  int64_t DomainRoomLocked(InstanceId computing, absl::Span<const index::SegmentKey> to_pin,
                           int64_t enough) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // How many blocks a tail covering [from, end) holds, and how many more than now the request's
  // tail needs to cover [matched_tokens, request.tail_end_tokens).
  int64_t TailBlocksNeeded(int64_t from_tokens, int64_t end_tokens) const;
  int64_t TailGrowthLocked(const LakeRequest& request, int64_t matched_tokens) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Makes the request's tail cover [from_tokens, end_tokens) (file comment, "Tails in the
  // pool"); new blocks prefer `instance`. Fills result->tail_slots / evicted / sequence.
  // Errors: ResourceExhausted when a block finds no slot (the blocks taken so far stay).
  absl::Status SetTailLocked(RequestId request, int64_t from_tokens, int64_t end_tokens,
                             InstanceId instance, AdmitResult* result)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives `block`'s slot back to its store (and to `states`, when given).
  void FreeTailBlockLocked(const TailBlock& block, InstanceStatesCache* states)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The tail's first block leaves it (its rows are the pool's now): the tail starts a segment
  // later. Its slot is the caller's to free or to give to the segment.
  void DropFirstTailBlockLocked(Tail& tail) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Gives back the first block of the request's tail (its rows left the tail).
  void PopTailBlockLocked(Tail& tail, InstanceStatesCache* states)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The instances of the tail's blocks, in order.
  static std::vector<InstanceId> TailInstances(const Tail& tail);
  // Bookkeeping after the tree dropped replicas (frees store slots, updates sets and loads).
  void OnReplicasFreedLocked(SegmentId segment, bool node_erased,
                             absl::Span<const InstanceId> freed_on,
                             std::vector<StoredReplica>* evicted)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::Status ValidatePlacements(RequestId request,
                                  absl::Span<const plan::NewSegmentPlacement> placements,
                                  const char* call) const;
  absl::StatusOr<CommitResult> CommitLocked(RequestId request,
                                            absl::Span<const plan::NewSegmentPlacement> placements,
                                            bool pending) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Whether `node` has a copy that is not pending (what plans and matches may see).
  bool VisibleLocked(const index::PrefixTree::Node& node) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The tree's match of `keys` cut before the first segment without a visible copy.
  index::MatchResult VisibleMatchLocked(absl::Span<const index::SegmentKey> keys) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Drops the request's copies still pending (at its Release), deepest first.
  void DropPendingLocked(RequestId request, Active& active) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The tree's replica observer: keeps pending_ exact (a pending copy the tree loses, by any
  // call, is forgotten), then tells the caller's observer.
  void OnTreeReplicaChangeLocked(SegmentId segment, InstanceId instance, bool added)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The subtree erase of LoseReplica for the last copy of `segment` (on `instance`); returns
  // the copies freed on other instances.
  absl::StatusOr<std::vector<StoredReplica>> EraseSubtreeLocked(SegmentId segment,
                                                                InstanceId instance)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void RefreshReplicatedLocked(SegmentId segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Pin / unpin one segment, keeping pinned_replicas_ (replicas of pinned nodes) current.
  void PinOneLocked(SegmentId segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  void UnpinOneLocked(SegmentId segment) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  absl::StatusOr<AdmitResult> AdmitLocked(const LakeRequest& request, int64_t reserve_slots)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t AvailableSlotsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Replicas of the first `matched_segments` keys' nodes that are not pinned yet (admitting a
  // request pins them: they stop being evictable).
  int64_t NewlyPinnedLocked(absl::Span<const index::SegmentKey> keys,
                            int32_t matched_segments) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The tails agree with the stores' tail slots and with tail_slots_ (CheckIntegrity).
  absl::Status CheckTailsLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Frees one slot on `producer` for a new segment when locality allows (eviction steps 1-2
  // restricted to the producer). False when it does not apply or nothing there can go.
  // `states` is InstanceStatesLocked() now.
  bool EvictOnProducerLocked(InstanceId producer, absl::Span<const balance::InstanceState> states,
                             std::vector<StoredReplica>* evicted)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The leaf a rebalancing copy may displace on the full `instance` (see Rebalance): its LRU
  // unpinned last-copy leaf when that is at least local_eviction_min_age_ratio x as old as the
  // pool's LRU leaf; nullopt otherwise (also when local eviction is off: the ratio is > 1).
  std::optional<SegmentId> DisplaceableLeafOnLocked(InstanceId instance) const
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Evicts that leaf from the full `instance` to make way for a copy, recording the drop in
  // `result`; returns it, or nullopt (nothing displaced) when there is none.
  absl::StatusOr<std::optional<SegmentId>> DisplaceLeafOnLocked(InstanceId instance,
                                                                RebalanceResult* result)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds a copy of `segment` on `to` (a free slot there): the slot, the tree's replica, the
  // segment's decode load shared by one more copy, its KV bytes added to result->bytes_moved.
  absl::Status AddCopyLocked(SegmentId segment, InstanceId to, int64_t now, RebalanceResult* result)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  int64_t CountPinnedReplicasLocked() const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // Adds `load` to `segment`'s heavy-hitter counter and, split evenly, to the decayed load of
  // the instances holding it (`node`, its tree node; null when it is no longer stored).
  void RecordSegmentLoadLocked(SegmentId segment, const index::PrefixTree::Node* node, double load,
                               int64_t now) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The planner's view of the pool for plans of `batches`: InstanceStatesLocked(), after the
  // plans in force of requests not admitted were dropped, less the batches' requests' own plans
  // in force (a request planned again replaces its plan).
  std::vector<balance::InstanceState> PlanningStatesLocked(absl::Span<const Batch> batches)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);
  // The plans GenPlans returns come into force (AccessLedger).
  void PlansInForceLocked(absl::Span<const plan::BatchPlan> plans)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_);

  const LakeOptions options_;
  Clock* const clock_;

  mutable absl::Mutex mu_;
  std::unique_ptr<index::PrefixTree> tree_;  // guarded by mu_ (see prefix_tree())
  std::vector<std::unique_ptr<store::SegmentStore>> stores_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<balance::HeavyHitterTracker> tracker_ ABSL_GUARDED_BY(mu_);
  std::unique_ptr<balance::Balancer> balancer_;
  std::unique_ptr<plan::Planner> planner_;
  std::vector<balance::DecayingCounter> instance_load_ ABSL_GUARDED_BY(mu_);
  plan::AccessLedger access_ ABSL_GUARDED_BY(mu_);  // cache access of the plans in force
  absl::flat_hash_set<SegmentId> replicated_ ABSL_GUARDED_BY(mu_);  // nodes with >= 2 replicas
  absl::flat_hash_map<RequestId, Active> active_ ABSL_GUARDED_BY(mu_);
  LakeStats counters_ ABSL_GUARDED_BY(mu_);           // the cumulative counters of Stats()
  int64_t total_slots_ = 0;                           // sum of the instances' capacities
  int64_t pinned_replicas_ ABSL_GUARDED_BY(mu_) = 0;  // replicas of nodes with pin_count > 0
  int64_t reserved_slots_ ABSL_GUARDED_BY(mu_) = 0;   // sum of Active::reserved_slots
  uint64_t sequence_ ABSL_GUARDED_BY(mu_) = 0;        // last Commit / Rebalance sequence
  int64_t rebalance_heavy_ ABSL_GUARDED_BY(mu_) = 0;  // heavy hitters at the latest Rebalance
  absl::flat_hash_map<SegmentId, PendingCopy> pending_ ABSL_GUARDED_BY(mu_);
  absl::flat_hash_map<RequestId, Tail> tails_ ABSL_GUARDED_BY(mu_);  // non-empty tails only
  int64_t tail_slots_ ABSL_GUARDED_BY(mu_) = 0;                      // blocks of all tails
  std::vector<int32_t> device_domains_ ABSL_GUARDED_BY(mu_);         // SetDeviceDomains; empty: one
  index::PrefixTree::ReplicaObserver observer_ ABSL_GUARDED_BY(mu_);  // the caller's
};

}  // namespace tokenlake::lake

#endif  // TOKENLAKE_LAKE_LAKE_H_
