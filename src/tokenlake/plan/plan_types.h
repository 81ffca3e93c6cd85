// Plans: the plain-data output of the query/transfer planner (design doc 3 and 4.4), consumed by
//   (a) the simulator, which charges each transfer's bytes and each request's attention work to
//       instances in simulated time, and
//   (b) the engine, which, per layer, for each request and each holder in its query plan, runs
//       partial attention of the request's new queries over the holder's local segments (after
//       pulling their KV when the action is kPullKv), then merges the partials with log-sum-exp
//       on the request's computing instance.
// Plans are deterministic for the same pool state. (Between processes the cluster sends one
// request's part of a plan as a protobuf message: service/lake_rpc.h.)
//
// Byte counts are totals over all layers (see cost_model.h; per layer = bytes / num_layers).
//
// Thread-safety: value types.
#ifndef TOKENLAKE_PLAN_PLAN_TYPES_H_
#define TOKENLAKE_PLAN_PLAN_TYPES_H_

#include <cstdint>
#include <vector>

#include "tokenlake/base/ids.h"

namespace tokenlake::plan {

// What a holder does for a request.
enum class HolderAction {
  kLocal,        // the holder IS the computing instance: attention over local segments
  kMoveQueries,  // send the queries to the holder; it returns partial outputs + LSEs
  kPullKv,       // copy the holder's segments' KV to the computing instance (not stored there)
};

// One (request, cached segment) pair of the query plan.
struct SegmentAssignment {
  SegmentId segment;
  int32_t num_tokens = 0;
  InstanceId holder;  // the replica that serves this segment for this request
  HolderAction action = HolderAction::kLocal;
  friend bool operator==(const SegmentAssignment&, const SegmentAssignment&) = default;
};

// One distinct holder of one request (segments grouped by holder).
struct HolderPlan {
  InstanceId holder;
  HolderAction action = HolderAction::kLocal;
  int32_t num_segments = 0;
  int64_t cached_tokens = 0;  // tokens of the request's segments served by this holder
  int64_t bytes = 0;          // traffic this choice costs (0 for kLocal), all layers
  // Attention FLOPs of the request's queries over these tokens (all layers). They run on the
  // holder for kLocal / kMoveQueries and on the computing instance for kPullKv.
  double attention_flops = 0;
  friend bool operator==(const HolderPlan&, const HolderPlan&) = default;
};

// The query plan of one request.
struct RequestPlan {
  RequestId request;
  // The instance that computes the request's new tokens and merges the partial results.
  InstanceId compute_instance;
  int64_t new_tokens = 0;     // q, the query tokens of this iteration
  int64_t cached_tokens = 0;  // sum of segments[i].num_tokens
  // Every cached segment, in prefix order, with its serving replica and action.
  std::vector<SegmentAssignment> segments;
  // The distinct holders, in order of first use in `segments`.
  std::vector<HolderPlan> holders;
  // Attention FLOPs of the new queries over the cached tokens (all layers).
  double attention_flops = 0;
  friend bool operator==(const RequestPlan&, const RequestPlan&) = default;
};

enum class TransferKind {
  kQueries,         // request's queries, compute_instance -> holder
  kPartialResults,  // partial outputs + LSEs, holder -> compute_instance
  kSegmentKv,       // a cached segment's KV pulled, holder -> compute_instance (segment set)
  kNewSegmentKv,    // a new segment's KV stored away from where it was computed (segment set)
};

struct Transfer {
  TransferKind kind = TransferKind::kQueries;
  RequestId request;
  SegmentId segment;  // invalid for kQueries / kPartialResults
  InstanceId src;
  InstanceId dst;
  int64_t bytes = 0;  // all layers
  friend bool operator==(const Transfer&, const Transfer&) = default;
};

// Where one new segment (produced by this iteration) is stored.
struct NewSegmentPlacement {
  RequestId request;
  SegmentId segment;
  SegmentId parent;  // invalid for a root child
  int32_t num_tokens = 0;
  InstanceId source;  // the computing instance (where the KV is produced)
  InstanceId target;  // where it is stored; == source unless balance required otherwise
  friend bool operator==(const NewSegmentPlacement&, const NewSegmentPlacement&) = default;
};

struct TransferPlan {
  std::vector<NewSegmentPlacement> new_segments;
  // Every inter-instance transfer, grouped by request in request order; within a request:
  // queries/results holder by holder, then pulled segments in prefix order, and new-segment
  // moves (after all requests).
  std::vector<Transfer> transfers;
  int64_t query_bytes = 0;        // kQueries + kPartialResults
  int64_t kv_pull_bytes = 0;      // kSegmentKv
  int64_t new_segment_bytes = 0;  // kNewSegmentKv
  int64_t total_bytes = 0;        // sum of the three
  friend bool operator==(const TransferPlan&, const TransferPlan&) = default;
};

// The plan of one batch.
struct BatchPlan {
  int32_t batch_index = 0;  // position of the batch in the GenPlans input
  int32_t dop = 0;
  // The DoP instances that compute the batch, best first (every compute_instance is one).
  std::vector<InstanceId> instance_group;
  std::vector<RequestPlan> requests;  // in the batch's request order
  TransferPlan transfer;
  friend bool operator==(const BatchPlan&, const BatchPlan&) = default;
};

}  // namespace tokenlake::plan

#endif  // TOKENLAKE_PLAN_PLAN_TYPES_H_
