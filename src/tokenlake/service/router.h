// Routing: which instance computes a request.
//
// The computing instance of a request is the one the lake's plan for its prefill names
// (Lake::GenPlans, not admitted: nothing is pinned or counted), unless that instance is not
// ready (membership.h), is excluded (it failed this request before) or has more requests in
// flight than the least busy candidate plus `balance_abs_threshold`: then the least busy
// candidate (fewest in flight, then fewest routed, then the lowest id). With `rotate`, the
// candidates take turns instead (forces cross-process traffic).
//
// Thread-safety: thread-safe. Route takes the lake's lock, then Membership's.
#ifndef TOKENLAKE_SERVICE_ROUTER_H_
#define TOKENLAKE_SERVICE_ROUTER_H_

#include <atomic>
#include <cstdint>

#include "absl/container/flat_hash_set.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/service/guarded_lake.h"
#include "tokenlake/service/membership.h"

namespace tokenlake::service {

struct RouteChoice {
  int32_t instance = -1;
  // Not where the plan said (no plan, or its instance not a candidate or too busy).
  bool overridden = false;
};

// The decision itself, on given candidates (ready, not excluded; each with its load) and the
// plan's instance (-1 = no plan). Errors: Unavailable when there is no candidate
// (`excluded_count` is named in the message).
absl::StatusOr<RouteChoice> ChooseComputeInstance(absl::Span<const Membership::Load> candidates,
                                                  int32_t planned, int32_t balance_abs_threshold,
                                                  size_t excluded_count);

class Router {
 public:
  struct Options {
    // Instances of the lake (the plan's degree of parallelism).
    int32_t num_instances = 1;
    int32_t balance_abs_threshold = 2;
    bool rotate = false;
  };
  // `lake` and `membership` are borrowed and outlive this.
  Router(const Options& options, GuardedLake* lake, Membership* membership)
      : options_(options), lake_(lake), membership_(membership) {}

  // The computing instance for a prompt with segment keys `keys` (its full segments) and
  // `prompt_tokens` tokens, never one in `excluded`; `planning_id` names the request in the
  // lake's (unadmitted) plan. Errors: Unavailable when no instance is ready.
  absl::StatusOr<int32_t> Route(absl::Span<const index::SegmentKey> keys, int64_t prompt_tokens,
                                const absl::flat_hash_set<int32_t>& excluded,
                                RequestId planning_id);

  // Requests not computed where the lake's plan said.
  int64_t overrides() const { return overrides_.load(std::memory_order_relaxed); }

 private:
  const Options options_;
  GuardedLake* const lake_;
  Membership* const membership_;
  std::atomic<uint64_t> rotation_{0};
  std::atomic<int64_t> overrides_{0};
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_ROUTER_H_
