// The `tokenlake` policy: the simulator driving the real TokenLake pool (lake::Lake, the same
// index, balancer and planner code as production) on simulated time (a ManualClock).
//
// What the simulated scheduler does (the part TokenLake leaves to "any scheduler"):
// - A request's cached prefix is its pool-wide match when it is admitted (Lake::Match: one
//   copy of a segment anywhere serves every instance).
// - DoP: a prefill of q uncached tokens gets ceil(q / dop_tokens) instances (at most max_dop,
//   and at most the number of instances with nothing in flight: spread only over idle capacity);
//   the Lake picks that instance group (GenPlans with that dop) and the prompt is split into
//   contiguous parts, one per member (sequence parallelism). A DoP-1 request runs on the
//   instance with the fewest requests in flight (ties: the one holding most of its prefix),
//   passed as the preferred instance of a plan over the whole pool, so the Lake's query plan
//   and transfer plan are used as produced.
// - The query plan is charged: for each remote holder that the plan serves by moving queries,
//   the holder's attention over its segments is added to the holder's next iteration, the
//   query and partial-result bytes count as moved, and the computing instance's iteration
//   waits for max(holder attention + transfer) beyond its own compute. Pulled KV is charged as
//   a transfer before the prefill (see below). New segments are committed (Lake::Commit) where the
//   transfer plan says when the prefill ends; the request's decode then runs on its computing
//   instance with a decode plan (q = 1) from GenPlans. Lake::Release at the end.
// - Lake::Rebalance runs every sample period; its bytes count as moved.
// - Memory: each instance's KV memory minus decode_reserve_fraction is pool slots; the reserve
//   holds running requests' generated tokens (which are not shared).
// - Memory admission and when a request is matched: a DoP-1 request is routed at arrival
//   (fewest requests in flight) and waits in that instance's queue; when the instance admits
//   it (Policy::Admit), it is matched and planned then (like the baselines, which match at
//   admission) and admitted to the pool with Lake::TryAdmit, which succeeds only when the pool
//   can hold its new segments: free slots plus slots that eviction may free, minus what
//   admitted but not yet committed requests were promised. Otherwise it waits, like the
//   baselines' requests waiting for memory (WaitsForMemory: it is not rejected while any
//   request holds pool memory), and idle instances retry when pool memory is released. A split
//   prefill (DoP > 1, only over idle instances) is admitted at arrival, or falls back to DoP 1.
//   So every running request's prompt KV has memory (UnstoredSegments() stays 0). A prompt with
//   more segments than the whole pool is rejected. Pulled KV delays the computing instance's
//   first iteration of the request.
//
// Thread-safety: not thread-safe (driven by one Simulator).
#ifndef TOKENLAKE_SIM_TOKENLAKE_POLICY_H_
#define TOKENLAKE_SIM_TOKENLAKE_POLICY_H_

#include <memory>

#include "absl/status/statusor.h"
#include "tokenlake/sim/simulator.h"

namespace tokenlake::sim {

struct TokenLakePolicyOptions {
  // A prefill of more uncached tokens than this is spread over several instances.
  int64_t dop_tokens = 16384;
  // Largest instance group for one prefill.
  int max_dop = 4;
  // Share of each instance's KV memory kept out of the pool for generated tokens.
  double decode_reserve_fraction = 0.25;
  // lake::LakeOptions::local_eviction_min_age_ratio: when the producer of a new segment is
  // full, it evicts its own LRU leaf (the segment stays local) if that leaf's age is at least
  // this ratio of the pool's LRU leaf's age; > 1 = pool-wide LRU only. Must be >= 0.
  double local_eviction_min_age_ratio = 0.5;
};

absl::StatusOr<std::unique_ptr<Policy>> MakeTokenLakePolicy(TokenLakePolicyOptions options = {});

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_TOKENLAKE_POLICY_H_
