// The `tokenlake` policy: the simulator driving the real TokenLake pool (lake::Lake, the same
// index, balancer and planner code as production) and the elastic scheduler
// (sched/elastic_scheduler.h) on simulated time (a ManualClock).
//
// One pool for all KV memory: every instance's KV capacity is pool slots. A request is admitted
// to the pool (Lake::TryAdmit) when it is first scheduled, reserving its uncached prompt
// segments and the segments its generated tokens will need (LakeRequest::extra_slots); it waits
// in the queue while the pool cannot hold them, and is rejected only if it could never fit (a
// request larger than the pool, with nothing else holding memory).
//
// The scheduler, every time instances become free (Policy::OnIdle), requests arrive (once all
// of an instant's are queued: Policy::OnArrivalsDone), a chunk completes or a request finishes:
// - Prefill: the queued requests, first come first served, form this iteration's chunks on the
//   instances free for prefill (no decodes): SchedulePrefill's DP picks the batches and their
//   DoPs (a long prefill over several idle instances is sequence-parallel: its chunk is split
//   into contiguous parts, one per member). For each batch the Lake picks the group among the
//   free instances (GenPlans with candidates) and plans every request: its cached segments'
//   holders (queries move there, or KV is pulled) and where the chunk's new segments go, which
//   are committed when the chunk completes (visible to later requests at once). A request
//   whose prompt is not done goes back to the queue in its arrival position.
// - Decode: when its prompt is done, a request decodes at DoP 1 on the instance PlaceDecode
//   picks (best fit under the decode iteration budget, slo_tpot x decode_budget_share), with a
//   decode plan whose remote holders compute its partial attention every iteration. The
//   prefill/decode split follows the load: instances join the decode side as decodes arrive
//   and return to prefill when their decodes finish. Decode iterations record their load in
//   the heavy-hitter tracker (Lake::RecordQueryLoad).
// - Mixed chunks: a decode instance whose decode iteration leaves slack under the same decode
//   budget computes a chunk of a queued request in its next iteration
//   (sched::ScheduleMixedPrefill: sized so the mixed iteration's estimate stays within the
//   budget; one chunk per instance at a time; the queue's requests left after the free
//   instances' batches, first come first served). Not in the static-split ablation.
// - Costs: a remote holder's partial attention is charged to the holder (Simulator::
//   ChargeExtra); the computing instance waits for the slowest holder: the sum of the partial
//   attention of all the batch's queries it serves, their queries' and partials' transfer over
//   its link, and one round trip per layer (2 x layers latencies), beyond its own compute.
//   Pulled KV streams in layer by layer while the chunk computes (the iteration lasts at least
//   the slowest pull). New segments stored off their producer and the copies of
//   Lake::Rebalance (every sample period) count as bytes moved and travel over the links
//   (LinkClock, links.h): each copy occupies its source's and destination's link for its
//   transfer time, serialised per link, and a chunk or decode whose plan reads a replica still
//   in transit is delivered when the copy lands (its instance waits for it).
// - Ablation (fixed_prefill_instances = P > 0): prefill only on instances [0, P), decode only on
//   the rest: TokenLake's pool with a static PD split.
//
// Thread-safety: not thread-safe (driven by one Simulator).
#ifndef TOKENLAKE_SIM_TOKENLAKE_POLICY_H_
#define TOKENLAKE_SIM_TOKENLAKE_POLICY_H_

#include <memory>

#include "absl/status/statusor.h"
#include "tokenlake/plan/planner.h"
#include "tokenlake/sim/simulator.h"

namespace tokenlake::sim {

struct TokenLakePolicyOptions {
  // Largest instance group (DoP) of one prefill batch, >= 1.
  int max_dop = 4;
  // A decode instance takes decodes while its estimated decode iteration stays within this
  // share of the TPOT SLO, in (0, 1]: the rest of the SLO is headroom for the holders' partial
  // attention and the queries' round trips, which the estimate leaves out.
  double decode_budget_share = 0.5;
  // lake::LakeOptions::local_eviction_min_age_ratio: when the producer of a new segment is
  // full, it evicts its own LRU leaf (the segment stays local) if that leaf's age is at least
  // this ratio of the pool's LRU leaf's age; > 1 = pool-wide LRU only. Must be >= 0.
  double local_eviction_min_age_ratio = 0.5;
  // 0: the decode budget is decode_budget_share x the TPOT SLO (SimOptions::slo_tpot_s). > 0:
  // the paper's per-token SLO at this factor is in force (metrics.h), so each request's TPOT bar
  // is factor x its batch-1 time per output token, and a decode instance's budget is
  // decode_budget_share x the smallest bar among its decodes (the new one included). Must be
  // >= 0.
  double per_token_slo_factor = 0;
  // How the lake's planner dispatches queries and new segments (plan::PlannerOptions).
  plan::PlannerOptions::Dispatch dispatch = plan::PlannerOptions::Dispatch::kGreedy;
  // plan::PlannerOptions::compare_dispatch: the policy's counters (Policy::Counters) then hold
  // the dispatch's bytes and holders beside the other rule's on the same batches
  // (dispatch_batches, dispatch_query_bytes, dispatch_other_query_bytes, dispatch_holders,
  // dispatch_other_holders, dispatch_new_segment_bytes, dispatch_other_new_segment_bytes).
  bool compare_dispatch = false;
  // plan::PlannerOptions::access_slack.
  double access_slack = 0;
  // Copies of hot runs decided at planning time (lake::Lake::ReplicateHotRuns, docs/adr/0020):
  // after each GenPlans the policy asks the lake for them and moves them over the links.
  bool hot_runs = true;
  // Admission to the pool: false, in queue order; true, the first 128 queued requests not yet
  // admitted go longest cached prefix first (SGLang's "lpm" schedule policy), so that a request
  // whose prefix is cached is admitted, and pins it, before others evict it.
  bool admit_longest_prefix_first = false;
  // 0: elastic. P in [1, instances - 1]: the static-split ablation (prefill on instances
  // [0, P), decode on the rest). P >= instances is refused by Init.
  int fixed_prefill_instances = 0;
};

// Errors: InvalidArgument naming a bad option. The policy's Init (so Simulator::Run) refuses,
// with InvalidArgument naming the setting, a setup the pool cannot hold: a static split without
// a decode instance, more KV blocks per instance or a larger model dimension than the pool's
// 32-bit counts.
absl::StatusOr<std::unique_ptr<Policy>> MakeTokenLakePolicy(TokenLakePolicyOptions options = {});

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_TOKENLAKE_POLICY_H_
