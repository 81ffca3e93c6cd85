// ControlPlane: the lake's per-iteration API, what an engine's iteration loop calls, so that
// the same loop (engine/iteration_loop.h) runs in one process over a lake::Lake it owns
// (LocalControlPlane) and in the multi-process cluster over the coordinator's lake through gRPC
// (service::RemoteControlPlane). It belongs to the lake: the coordinator serves it without any
// model runner.
//
// One iteration of one request (engine.h, the pool path) is made of three steps:
//   PlanIteration  match the sequence's full segments against the prefix tree (at most
//                  max_cached_segments of them may be served from the pool), generate the plan
//                  for the iteration alone (lake::GenPlans, DoP = the pool's instances) and admit
//                  it (pins the matched prefix): cached prefix, computing instance, per cached
//                  segment its serving replica and action, where the new segments go;
//   Commit         the iteration's completed segments are placed (lake::CommitPending): where
//                  each goes, deduplicated ones, evicted replicas (which the caller frees). The
//                  placed copies are PENDING: no plan names them until they are confirmed;
//   (stores)       the caller writes each placed copy's KV where the commit says;
//   confirm        the copies stored are confirmed (lake::ConfirmStored) and become visible:
//                  carried by the caller's next PlanBatch (`confirm`, applied before anything
//                  else of the call), or by ConfirmStored;
//   Release        unpins what the iteration pinned (lake::Release) and drops its copies never
//                  confirmed. Always called after a successful PlanIteration, also when the
//                  iteration failed.
// So a plan never names a copy whose data is not known to be stored (docs/adr/0016): before,
// the lake listed a new copy when Commit returned, and another engine's plan could read it
// from its holder while the store was still on its way.
// The iteration loop (iteration_loop.h) makes ONE PlanBatch call per iteration for its whole
// batch: it confirms the copies the previous iterations stored, releases what the batch's
// requests pinned in their previous iterations (and what finished requests pinned), then plans
// and admits every request of the batch; plus one Commit per request whose iteration completes
// a segment, and a PlanBatch without requests (confirm + release) for the last pins when the
// loop runs dry (or after a failure). A request of M generated tokens whose prompt is one chunk
// thus takes part in M PlanBatch calls. Over the cluster's RemoteControlPlane each call is one
// gRPC round trip to the coordinator, and a Commit with no placements makes none (lake_rpc.h).
// The GPU engine runs the same loop.
//
// Errors are those of the lake (InvalidArgument for bad keys, AlreadyExists for an active id,
// NotFound for an unknown request) plus, remotely, Unavailable / DeadlineExceeded when the
// control plane cannot be reached.
//
// Thread-safety: implementations are thread-safe (several requests may run concurrently, each
// with its own RequestId).
#ifndef TOKENLAKE_LAKE_CONTROL_PLANE_H_
#define TOKENLAKE_LAKE_CONTROL_PLANE_H_

#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/plan/plan_types.h"

namespace tokenlake::lake {

struct IterationRequest {
  // Unique among the requests active in the control plane.
  RequestId request;
  // The chained keys of the full segments of the sequence up to the end of this iteration.
  std::vector<index::SegmentKey> keys;
  // At most this many leading segments may be served from the pool (those before the first
  // token computed in the iteration), >= 0. Keys are cut to this length if more match.
  int32_t max_cached_segments = 0;
  // Tokens of the sequence at the end of this iteration, >= 1.
  int64_t end_tokens = 0;
  // Prefill: the iteration computes every token after the cached prefix. Otherwise it computes
  // end_tokens - computed_tokens tokens.
  bool prefill = true;
  int64_t computed_tokens = 0;
  // Preferred computing instance (invalid = none), as lake::LakeRequest.
  InstanceId preferred_instance;
  // Count the iteration in the hit statistics (the prefill).
  bool count_hits = true;
  // Prefill only: compute at most this many tokens after the cached prefix (a chunk of the
  // prompt); the iteration then ends at cached + max_new_tokens and the keys are cut to its
  // full segments. 0 = no limit.
  int64_t max_new_tokens = 0;
  // Memory admission (lake::Lake::TryAdmit): admit only if the pool can hold the iteration's
  // new segments; otherwise nothing is admitted and the plan says admitted = false (the
  // request waits). false = lake::Lake::Admit (segments that find no slot are not stored).
  bool try_admit = false;
  // The request's KV tail (its rows after the cached prefix) lives in slots of the pool
  // (lake.h, "Tails in the pool"; docs/adr/0017): an admitted plan makes it cover the
  // iteration's rows [cached_tokens, end_tokens) on the computing instance where it has room
  // (IterationPlan::tail_slots), and the request's Commit commits its segments from it (in
  // place where the placement allows). The tail lasts until ReleaseTail.
  bool tail_in_pool = false;
};

struct IterationPlan {
  // The keys the plan is about: IterationRequest::keys, cut to max_cached_segments when more
  // of them matched (the segments that complete in this iteration are the ones after the
  // cached prefix).
  int32_t num_keys = 0;
  // Tokens served from the pool (a multiple of the segment size).
  int64_t cached_tokens = 0;
  // Query tokens of the iteration (end_tokens - cached_tokens on a prefill).
  int64_t new_tokens = 0;
  // The plan's computing instance.
  InstanceId compute_instance;
  // Every cached segment in prefix order, with its serving replica and action.
  std::vector<plan::SegmentAssignment> segments;
  // Where the request's new segments are to be stored (to pass to Commit).
  std::vector<plan::NewSegmentPlacement> new_segments;
  // Tokens of the sequence at the end of the iteration: IterationRequest::end_tokens, or less
  // when max_new_tokens cut a prefill into a chunk. 0 from a control plane that does not know
  // chunks (read as IterationRequest::end_tokens).
  int64_t end_tokens = 0;
  // false: try_admit found too little memory; nothing was admitted and the rest of the plan
  // is empty (the request waits and asks again).
  bool admitted = true;
  // tail_in_pool: the instance of each block of the request's tail after this plan, in row
  // order (block i holds rows [cached_tokens + i S, cached_tokens + (i + 1) S)); empty when
  // the tail holds nothing. The replicas evicted to make room for its new blocks, which the
  // caller frees before it writes the tail, and the change sequence number of that eviction.
  std::vector<InstanceId> tail_slots;
  std::vector<lake::StoredReplica> evicted;
  uint64_t evicted_at = 0;
};

// One request's outcome in a PlanBatch call.
struct BatchPlanEntry {
  // OK, or the error the control plane answered for this request (as PlanIteration's);
  // nothing of the request stays admitted after an error.
  absl::Status status;
  IterationPlan plan;
};

class ControlPlane {
 public:
  virtual ~ControlPlane() = default;
  // Number of instances of the pool (instance ids are [0, num_instances())).
  virtual int32_t num_instances() const = 0;
  // Match + plan + admit. On error nothing stays admitted.
  virtual absl::StatusOr<IterationPlan> PlanIteration(const IterationRequest& request) = 0;
  // Places the request's new segments as pending copies (lake::Lake::CommitPending): the
  // caller stores each copy of CommitResult::stored and then confirms it; until then no plan
  // names it, and its request's Release drops it.
  virtual absl::StatusOr<lake::CommitResult> Commit(
      RequestId request, absl::Span<const plan::NewSegmentPlacement> placements) = 0;
  // Makes the named pending copies visible (lake::Lake::ConfirmStored: copies not pending for
  // their request are ignored). Errors: InvalidArgument (an instance outside the pool), and
  // remotely Unavailable / DeadlineExceeded / Cancelled (the caller cannot tell whether it was
  // applied; confirming again is harmless).
  virtual absl::Status ConfirmStored(absl::Span<const lake::StoreConfirmation> copies) = 0;
  // Unpins what the request pinned and drops its unconfirmed copies (lake::Lake::Release).
  virtual absl::Status Release(RequestId request) = 0;
  // Gives back the slots of the request's tail in the pool (lake::Lake::ReleaseTail; see
  // IterationRequest::tail_in_pool). The default: a control plane without tails, nothing to do.
  virtual absl::Status ReleaseTail(RequestId /*request*/) { return absl::OkStatus(); }

  // Release(release) followed by PlanIteration(next), in one call (one round trip remotely):
  // the engine's step from iteration i of a request to iteration i + 1 (`next.request` is
  // normally `release` again; any id is allowed). The default implementation makes the two
  // calls; RemoteControlPlane sends one RPC, which the coordinator runs under its lake lock.
  // Outcomes:
  //   OK: `release` is released and the returned plan is admitted (as PlanIteration).
  //   an error of the Release part (NotFound: `release` is not active): nothing changed,
  //     nothing planned;
  //   an error of the PlanIteration part (InvalidArgument, AlreadyExists, ...): `release` IS
  //     released and nothing of `next` stays admitted;
  //   so after any error the control plane answered, the caller holds no pin of either and
  //   does not Release `release` again (a second Release would answer NotFound);
  //   Unavailable / DeadlineExceeded / Cancelled (remote only: the call failed on the wire):
  //     the caller cannot tell which of nothing, the Release, or Release + PlanIteration was
  //     applied. One more Release(release) (when next.request == release) cleans up in every
  //     case and is harmless (NotFound when nothing is pinned any more); the engine makes it.
  //     In the cluster the coordinator also releases a failed attempt's request id.
  virtual absl::StatusOr<IterationPlan> ReleaseAndPlan(RequestId release,
                                                       const IterationRequest& next);

  // One iteration of a whole batch in one call (one round trip remotely): confirms the copies of
  // `confirm` (as ConfirmStored: the stores of earlier iterations, so that the releases below
  // drop only copies never stored), releases the ids of
  // `release` that no request of `requests` has (finished requests' pins, and their tails:
  // ReleaseTail), then, per request in
  // order, releases its own id if listed (the pins of its previous iteration) and plans and
  // admits it (as PlanIteration): no other request of the batch can evict its prefix between
  // the two. A request whose own release fails (NotFound: not active) is not planned: its entry
  // carries that error (as ReleaseAndPlan); a failed release of another id is ignored.
  // Returns one entry per request, in order. The default implementation makes the calls one by
  // one; RemoteControlPlane sends one RPC, which the coordinator runs under its lake lock.
  // With no requests it only confirms and releases (what a loop that runs dry sends).
  // `token_budget` > 0 bounds the tokens the batch computes (BatchTokenBudget): the requests
  // take it in order, a prefill's chunk is cut after its cached prefix to what is left (only
  // the control plane knows how much is cached), and a request that finds too little left is
  // not planned: its entry is admitted = false with nothing pinned (as a try_admit deferral).
  // 0 = no budget.
  // Errors (of the whole call): InvalidArgument for a confirmation naming an instance outside
  // the pool (nothing applied); Unavailable / DeadlineExceeded / Cancelled remotely: the
  // caller cannot tell what was applied; confirming `confirm` and releasing every id of
  // `release` and `requests` again cleans up in every case (NotFound answers ignored).
  virtual absl::StatusOr<std::vector<BatchPlanEntry>> PlanBatch(
      absl::Span<const lake::StoreConfirmation> confirm, absl::Span<const RequestId> release,
      absl::Span<const IterationRequest> requests, int64_t token_budget);
};

// PlanBatch's token budget, taken by its requests in order (every control plane applies it the
// same way). A prefill fits while at least one token is left, its max_new_tokens cut to what is
// left; a continuation (not a prefill) fits while its end_tokens - computed_tokens are left.
// Thread-compatible.
class BatchTokenBudget {
 public:
  // tokens <= 0: no budget (everything fits).
  explicit BatchTokenBudget(int64_t tokens) : left_(tokens > 0 ? tokens : -1) {}
  // Whether `request` fits what is left; if so, a prefill's max_new_tokens is cut to it.
  bool Fit(IterationRequest& request) const;
  // Takes an admitted plan's new tokens from what is left.
  void Charge(int64_t new_tokens);

 private:
  int64_t left_;  // -1: no budget
};

// Whether `status` says a control-plane call may not have been applied, or only partly (it
// failed on the way: Unavailable, DeadlineExceeded, Cancelled), as opposed to an error the
// control plane answered (the lake's codes), after which its state is as documented per call.
bool FailedOnTheWire(const absl::Status& status);

// The control plane of one process: a borrowed lake::Lake. A ManualClock it owns advances by
// 1 ms per PlanIteration (the lake's recency and heavy-hitter decay run on iterations).
class LocalControlPlane final : public ControlPlane {
 public:
  // `lake` is borrowed and must outlive this object; `clock` is the lake's clock (advanced by
  // 1 ms per PlanIteration; may be null to leave time alone).
  LocalControlPlane(lake::Lake* lake, ManualClock* clock) : lake_(lake), clock_(clock) {}

  int32_t num_instances() const override { return lake_->num_instances(); }
  absl::StatusOr<IterationPlan> PlanIteration(const IterationRequest& request) override;
  absl::StatusOr<lake::CommitResult> Commit(
      RequestId request, absl::Span<const plan::NewSegmentPlacement> placements) override;
  absl::Status ConfirmStored(absl::Span<const lake::StoreConfirmation> copies) override;
  absl::Status Release(RequestId request) override;
  absl::Status ReleaseTail(RequestId request) override;

 private:
  lake::Lake* lake_;
  ManualClock* clock_;
};

// The PlanIteration logic over a lake (shared by LocalControlPlane and the coordinator's gRPC
// service). `clock` as above.
absl::StatusOr<IterationPlan> PlanIterationOnLake(lake::Lake& lake, ManualClock* clock,
                                                  const IterationRequest& request);

}  // namespace tokenlake::lake

#endif  // TOKENLAKE_LAKE_CONTROL_PLANE_H_
