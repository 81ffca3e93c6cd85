// Routing: which instance computes a request. In the cluster a request is prefilled and decoded
// on its computing instance (no hand-off between instances), so this also decides where it
// decodes.
//
// Rules (Options::rule):
//   - kScheduler: the elastic scheduler's decode placement (sched::PlaceDecode,
//     paper section 6.2) over the candidates' loads: the request joins the busiest instance
//     whose estimated decode iteration still meets the decode budget with it (best fit), ties
//     to the one holding most of its prompt's cached prefix (local_tokens: tokens of the
//     matched prefix with a copy there); else an idle instance (nothing running or queued; the
//     one holding most); else the one with the least decode work. An instance's load is its
//     latest load snapshot plus the requests routed to it since that the snapshot does not list
//     (Membership::Load; each request counts as a decode with its prompt as context, also while
//     it is still prefilling), and no instance takes more than the smallest batch limit the
//     candidates report. When PlaceDecode finds none (every candidate at that limit), the plan
//     rule decides. What it does not see: the prefill a request brings to its instance (its
//     prompt is computed there too), beyond counting the instance as not idle.
//   - kPlan (the default; measured faster on CPU instances, docs/results-service.md): the
//     instance the lake's plan for its prefill names (Lake::GenPlans, not admitted:
//     nothing is pinned or counted), unless that instance is not a candidate or has more
//     requests in flight than the least busy candidate plus `balance_abs_threshold`: then the
//     least busy candidate (fewest in flight, then fewest routed, then the lowest id).
//   - rotate: the candidates take turns instead (forces cross-process traffic).
// Candidates are the ready instances (membership.h) not excluded (those that failed the request
// before). Every routed request is recorded with the membership (AddRouted) before the lake's
// lock is let go, so that the next Route sees it.
//
// Thread-safety: thread-safe. Route takes the lake's lock, then Membership's.
#ifndef TOKENLAKE_SERVICE_ROUTER_H_
#define TOKENLAKE_SERVICE_ROUTER_H_

#include <array>
#include <atomic>
#include <cstdint>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/sched/elastic_scheduler.h"
#include "tokenlake/service/guarded_lake.h"
#include "tokenlake/service/membership.h"

namespace tokenlake::service {

struct RouteChoice {
  int32_t instance = -1;
  // Not where the plan said (no plan, or its instance not a candidate or too busy).
  bool overridden = false;
};

// The plan rule itself, on given candidates (ready, not excluded; each with its load) and the
// plan's instance (-1 = no plan). Errors: Unavailable when there is no candidate
// (`excluded_count` is named in the message).
absl::StatusOr<RouteChoice> ChooseComputeInstance(absl::Span<const Membership::Load> candidates,
                                                  int32_t planned, int32_t balance_abs_threshold,
                                                  size_t excluded_count);

// The scheduler's view of the candidates (index i = candidates[i]): decodes = Load::requests,
// context_tokens = Load::context_tokens, idle = no request and no prefill tokens, eligible,
// local_tokens = local_tokens[candidate id] (0 beyond its size).
std::vector<sched::DecodeInstance> DecodeView(absl::Span<const Membership::Load> candidates,
                                              absl::Span<const int64_t> local_tokens);

enum class RoutingRule { kScheduler, kPlan };
// "scheduler" / "plan" (the coordinator's --routing).
const char* RoutingRuleName(RoutingRule rule);
// Errors: InvalidArgument naming the accepted values.
absl::StatusOr<RoutingRule> ParseRoutingRule(std::string_view name);

class Router {
 public:
  struct Options {
    // Instances of the lake (the plan's degree of parallelism).
    int32_t num_instances = 1;
    int32_t balance_abs_threshold = 2;
    bool rotate = false;
    RoutingRule rule = RoutingRule::kPlan;
    // kScheduler: the decode iteration budget (seconds, > 0) and the scheduler's cost model
    // (borrowed, outlives the router; null: the plan rule decides every request).
    double decode_budget_s = 0.1;
    const sched::BatchCostModel* cost = nullptr;
  };
  // `lake` and `membership` are borrowed and outlive this.
  Router(const Options& options, GuardedLake* lake, Membership* membership)
      : options_(options), lake_(lake), membership_(membership) {}

  // The computing instance for a prompt with segment keys `keys` (its full segments) and
  // `prompt_tokens` tokens, never one in `excluded`; the request will be sent under lake
  // request id `request` (which also names it in the lake's unadmitted plan), and its work is
  // recorded with the membership under it (Membership::AddRouted; the caller ends it with
  // Membership::EndRequest). Errors: Unavailable when no instance is ready.
  absl::StatusOr<int32_t> Route(absl::Span<const index::SegmentKey> keys, int64_t prompt_tokens,
                                const absl::flat_hash_set<int32_t>& excluded, RequestId request);

  // Requests not computed where the lake's plan said (plan rule only).
  int64_t overrides() const { return overrides_.load(std::memory_order_relaxed); }

  // Routes decided by each way (index = Decision).
  enum Decision { kByScheduler, kByPlan, kByPlanFallback, kByRotation, kNumDecisions };
  static const char* DecisionName(Decision d);
  std::array<int64_t, kNumDecisions> decisions() const;

 private:
  const Options options_;
  GuardedLake* const lake_;
  Membership* const membership_;
  std::atomic<uint64_t> rotation_{0};
  std::atomic<int64_t> overrides_{0};
  std::array<std::atomic<int64_t>, kNumDecisions> decisions_{};
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_ROUTER_H_
