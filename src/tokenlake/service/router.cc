#include "tokenlake/service/router.h"

#include <algorithm>
#include <limits>
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

std::vector<sched::DecodeInstance> DecodeView(absl::Span<const Membership::Load> candidates,
                                              absl::Span<const int64_t> local_tokens) {
  std::vector<sched::DecodeInstance> view(candidates.size());
  for (size_t i = 0; i < candidates.size(); ++i) {
    const Membership::Load& c = candidates[i];
    sched::DecodeInstance& v = view[i];
    v.decodes = c.requests;
    v.context_tokens = c.context_tokens;
    v.idle = c.requests == 0 && c.prefill_tokens == 0;
    v.eligible = true;
    const auto id = static_cast<size_t>(c.id);
    v.local_tokens = c.id >= 0 && id < local_tokens.size() ? local_tokens[id] : 0;
  }
  return view;
}

const char* RoutingRuleName(RoutingRule rule) {
  return rule == RoutingRule::kScheduler ? "scheduler" : "plan";
}

absl::StatusOr<RoutingRule> ParseRoutingRule(std::string_view name) {
  if (name == "scheduler") return RoutingRule::kScheduler;
  if (name == "plan") return RoutingRule::kPlan;
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown routing rule '%s': use scheduler or plan", name));
}

const char* Router::DecisionName(Decision d) {
  switch (d) {
    case kByScheduler:
      return "scheduler";
    case kByPlan:
      return "plan";
    case kByPlanFallback:
      return "plan_fallback";
    case kByRotation:
      return "rotate";
    case kNumDecisions:
      break;
  }
  return "unknown";
}

std::array<int64_t, Router::kNumDecisions> Router::decisions() const {
  std::array<int64_t, kNumDecisions> out{};
  for (int d = 0; d < kNumDecisions; ++d) {
    out[static_cast<size_t>(d)] =
        decisions_[static_cast<size_t>(d)].load(std::memory_order_relaxed);
  }
  return out;
}

absl::StatusOr<int32_t> Router::Route(absl::Span<const index::SegmentKey> keys,
                                      int64_t prompt_tokens,
                                      const absl::flat_hash_set<int32_t>& excluded,
                                      RequestId request) {
  absl::MutexLock lake_lock(&lake_->mu);
  const std::vector<Membership::Load> candidates = membership_->ReadyLoads(excluded);
  if (candidates.empty()) {
    return ChooseComputeInstance(candidates, -1, 0, excluded.size()).status();
  }
  lake::Lake& lake = *lake_->lake;
  const index::MatchResult match = lake.Match(keys);
  const int64_t new_tokens = std::max<int64_t>(1, prompt_tokens - match.matched_tokens);
  auto routed = [&](int32_t instance, Decision how) {
    decisions_[how].fetch_add(1, std::memory_order_relaxed);
    membership_->AddRouted(instance, request,
                           {.context_tokens = prompt_tokens, .prefill_tokens = new_tokens});
    return instance;
  };
  if (options_.rotate) {
    const uint64_t turn = rotation_.fetch_add(1, std::memory_order_relaxed);
    return routed(candidates[static_cast<size_t>(turn % candidates.size())].id, kByRotation);
  }
  const bool scheduler = options_.rule == RoutingRule::kScheduler && options_.cost != nullptr;
  if (scheduler) {
    // Where the prompt's cached prefix lives: tokens with a copy per instance (each replica
    // counts). The lake lock held makes reading the tree safe (guarded_lake.h).
    std::vector<int64_t> local(static_cast<size_t>(options_.num_instances), 0);
    for (int32_t k = 0; k < match.matched_segments; ++k) {
      const index::PrefixTree::Node* node = lake.prefix_tree().Find(keys[k].id);
      if (node == nullptr) continue;
      for (InstanceId holder : node->replicas) {
        const auto h = static_cast<size_t>(holder.value());
        if (h < local.size()) local[h] += node->num_tokens;
      }
    }
    int64_t max_decodes = std::numeric_limits<int64_t>::max();
    for (const Membership::Load& c : candidates) {
      if (c.max_batch_requests > 0) max_decodes = std::min(max_decodes, c.max_batch_requests);
    }
    const int32_t at = sched::PlaceDecode(DecodeView(candidates, local), prompt_tokens,
                                          options_.decode_budget_s, *options_.cost, max_decodes);
    if (at >= 0) return routed(candidates[static_cast<size_t>(at)].id, kByScheduler);
  }
  lake::LakeRequest lr{.id = request,
                       .keys = std::vector<index::SegmentKey>(keys.begin(), keys.end()),
                       .new_tokens = new_tokens};
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
  return routed(choice->instance, scheduler ? kByPlanFallback : kByPlan);
}

}  // namespace tokenlake::service
