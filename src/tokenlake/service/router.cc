#include "tokenlake/service/router.h"

#include <algorithm>
#include <vector>

#include "absl/strings/str_format.h"
#include "tokenlake/service/lake_rpc.h"

namespace tokenlake::service {

absl::StatusOr<RouteChoice> ChooseComputeInstance(absl::Span<const Membership::Load> candidates,
                                                  int32_t planned, int32_t balance_abs_threshold,
                                                  size_t excluded_count) {
  if (candidates.empty()) {
    return absl::UnavailableError(absl::StrFormat(
        "no live instance to serve the request (%d excluded after failures)", excluded_count));
  }
  int64_t min_load = INT64_MAX;
  const Membership::Load* least_busy = &candidates.front();
  const Membership::Load* plan = nullptr;
  for (const Membership::Load& c : candidates) {
    min_load = std::min(min_load, c.in_flight);
    if (c.in_flight < least_busy->in_flight ||
        (c.in_flight == least_busy->in_flight && c.routed < least_busy->routed)) {
      least_busy = &c;
    }
    if (c.id == planned) plan = &c;
  }
  if (plan != nullptr && plan->in_flight <= min_load + balance_abs_threshold) {
    return RouteChoice{.instance = plan->id, .overridden = false};
  }
  return RouteChoice{.instance = least_busy->id, .overridden = true};
}

absl::StatusOr<int32_t> Router::Route(absl::Span<const index::SegmentKey> keys,
                                      int64_t prompt_tokens,
                                      const absl::flat_hash_set<int32_t>& excluded,
                                      RequestId planning_id) {
  absl::MutexLock lake_lock(&lake_->mu);
  const std::vector<Membership::Load> candidates = membership_->ReadyLoads(excluded);
  if (candidates.empty() || options_.rotate) {
    if (candidates.empty()) {
      return ChooseComputeInstance(candidates, -1, 0, excluded.size()).status();
    }
    const uint64_t turn = rotation_.fetch_add(1, std::memory_order_relaxed);
    return candidates[static_cast<size_t>(turn % candidates.size())].id;
  }
  lake::Lake& lake = *lake_->lake;
  const index::MatchResult match = lake.Match(keys);
  lake::LakeRequest lr{.id = planning_id,
                       .keys = std::vector<index::SegmentKey>(keys.begin(), keys.end()),
                       .new_tokens = std::max<int64_t>(1, prompt_tokens - match.matched_tokens)};
  absl::StatusOr<std::vector<plan::BatchPlan>> plans =
      lake.GenPlans({lake::Batch{.requests = {lr}, .dop = options_.num_instances}});
  int32_t planned = -1;
  if (plans.ok() && plans->size() == 1 && (*plans)[0].requests.size() == 1) {
    planned = InstanceToWire((*plans)[0].requests[0].compute_instance);
  }
  absl::StatusOr<RouteChoice> choice =
      ChooseComputeInstance(candidates, planned, options_.balance_abs_threshold, excluded.size());
  if (!choice.ok()) return choice.status();
  if (choice->overridden) overrides_.fetch_add(1, std::memory_order_relaxed);
  return choice->instance;
}

}  // namespace tokenlake::service
