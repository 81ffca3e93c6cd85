// The load side of the Lake (lake.h): what each segment and instance serves (the heavy-hitter
// tracker, fed by query and decode load), and Rebalance, which acts on it.
#include <algorithm>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::lake {

absl::Status Lake::RecordQueryLoad(RequestId request, int64_t query_tokens) {
  if (query_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("RecordQueryLoad: query_tokens must be >= 0, got %d", query_tokens));
  }
  absl::MutexLock lock(&mu_);
  auto it = active_.find(request);
  if (it == active_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("RecordQueryLoad: request %d is not active", request.value()));
  }
  if (query_tokens == 0) return absl::OkStatus();
  const int64_t now = clock_->NowUs();
  for (SegmentId s : it->second.pinned) {
    const index::PrefixTree::Node* node = tree_->Find(s);
    if (node == nullptr || node->replicas.empty()) continue;  // lost with an instance
    RecordSegmentLoadLocked(s, node, static_cast<double>(query_tokens) * node->num_tokens, now);
  }
  return absl::OkStatus();
}

void Lake::RecordSegmentLoadLocked(SegmentId segment, const index::PrefixTree::Node* node,
                                   double load, int64_t now) {
  tracker_->Record(segment, load);
  if (node == nullptr || node->replicas.empty()) return;
  const double share = load / static_cast<double>(node->replicas.size());
  for (InstanceId r : node->replicas) instance_load_[r.value()].Add(share, now);
}

std::vector<balance::InstanceState> Lake::PlanningStatesLocked(absl::Span<const Batch> batches) {
  access_.EraseUnless([&](RequestId r) {
    mu_.AssertHeld();  // held by this function; tells the analysis inside the lambda
    return active_.contains(r);
  });
  std::vector<balance::InstanceState> states = InstanceStatesLocked();
  if (access_.num_requests() == 0) return states;
  absl::flat_hash_set<RequestId> seen;
  for (const Batch& b : batches) {
    for (const LakeRequest& r : b.requests) {
      if (!seen.insert(r.id).second) continue;
      for (balance::InstanceState& st : states) {
        st.access_tokens -= static_cast<double>(access_.Share(r.id, st.id));
      }
    }
  }
  return states;
}

void Lake::PlansInForceLocked(absl::Span<const plan::BatchPlan> plans) {
  for (const plan::BatchPlan& p : plans) {
    for (const plan::RequestPlan& rp : p.requests) {
      // The planner names only instances of the pool, with non-negative token counts.
      TOKENLAKE_CHECK_OK(access_.Set(rp.request, plan::AccessLedger::SharesOf(rp)));
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Maintenance

absl::StatusOr<RebalanceResult> Lake::Rebalance() {
  absl::MutexLock lock(&mu_);
  const int64_t now = clock_->NowUs();
  std::vector<balance::SegmentState> segments;
  absl::flat_hash_set<SegmentId> seen;
  rebalance_heavy_ = 0;
  for (const balance::SegmentLoad& w : tracker_->CollectWarm()) {
    const index::PrefixTree::Node* node = tree_->Find(w.segment);
    if (node == nullptr) {
      tracker_->Forget(w.segment);
      continue;
    }
    if (pending_.contains(w.segment)) continue;  // its data may not be there yet
    rebalance_heavy_ += w.heavy ? 1 : 0;
    balance::SegmentState st;
    st.segment = w.segment;
    st.load = w.load;
    st.desired_replicas = tracker_->DesiredReplicas(w.segment, num_instances());
    st.replicas.assign(node->replicas.begin(), node->replicas.end());
    st.pinned = node->is_pinned();
    segments.push_back(std::move(st));
    seen.insert(w.segment);
  }
  for (balance::SegmentState& st : ReplicatedStatesLocked()) {
    if (!seen.contains(st.segment)) segments.push_back(std::move(st));
  }
  std::vector<balance::InstanceState> states = InstanceStatesLocked();
  for (balance::InstanceState& st : states) {
    if (st.used_slots >= st.capacity_slots && DisplaceableLeafOnLocked(st.id).has_value()) {
      st.used_slots = st.capacity_slots - 1;  // one cold leaf may make way (see lake.h)
    }
  }
  const std::vector<balance::BalanceAction> actions = balancer_->Rebalance(segments, states);
  RebalanceResult result;
  result.sequence = ++sequence_;
  absl::flat_hash_set<SegmentId> displaced;
  for (const balance::BalanceAction& a : actions) {
    if (displaced.contains(a.segment)) continue;  // a copy this call made way for went first
    const index::PrefixTree::Node* node = tree_->Find(a.segment);
    if (node == nullptr) {
      return absl::InternalError(
          absl::StrFormat("Rebalance: %s names a segment not stored", balance::ToString(a)));
    }
    // The balancer planned each action on the state its earlier ones left; one skipped below
    // (no room) leaves a copy where a later action does not expect it: skip that one too.
    const auto holds = [&](InstanceId i) {
      return std::find(node->replicas.begin(), node->replicas.end(), i) != node->replicas.end();
    };
    if (!holds(a.from) || (a.kind != balance::ActionKind::kDrop && holds(a.to))) continue;
    const bool pinned = node->is_pinned();
    if (pinned && a.kind == balance::ActionKind::kReplicate && AvailableSlotsLocked() <= 0) {
      continue;  // the free slot is promised to an admitted request's new segment
    }
    if (a.kind != balance::ActionKind::kDrop && stores_[a.to.value()]->free() <= 0) {
      // Only a replica makes way: a move would trade cached data for a shift of load.
      if (a.kind == balance::ActionKind::kMove) continue;
      const std::optional<SegmentId> leaf = DisplaceableLeafOnLocked(a.to);
      if (!leaf.has_value()) continue;
      TOKENLAKE_ASSIGN_OR_RETURN(index::EvictResult e, tree_->Evict(*leaf));
      OnReplicasFreedLocked(*leaf, e.node_erased, e.freed_on, nullptr);
      displaced.insert(*leaf);
      counters_.rebalance_displaced += 1;
      result.actions.push_back({balance::ActionKind::kDrop, *leaf, a.to, InstanceId()});
      node = tree_->Find(a.segment);  // (another node went)
    }
    const int64_t pinned_before = pinned ? static_cast<int64_t>(node->replicas.size()) : 0;
    const double load = tracker_->Load(a.segment);
    const auto r = static_cast<double>(node->replicas.size());
    const int32_t tokens = node->num_tokens;
    std::vector<InstanceId> others(node->replicas.begin(), node->replicas.end());
    switch (a.kind) {
      case balance::ActionKind::kDrop: {
        TOKENLAKE_ASSIGN_OR_RETURN(index::EvictResult e, tree_->RemoveReplica(a.segment, a.from));
        OnReplicasFreedLocked(a.segment, e.node_erased, e.freed_on, nullptr);
        instance_load_[a.from.value()].Add(-load / r, now);
        for (InstanceId o : others) {
          if (o != a.from) instance_load_[o.value()].Add(load / (r - 1) - load / r, now);
        }
        break;
      }
      case balance::ActionKind::kReplicate: {
        TOKENLAKE_RETURN_IF_ERROR(stores_[a.to.value()]->Allocate(a.segment).status());
        TOKENLAKE_RETURN_IF_ERROR(tree_->AddReplica(a.segment, a.to));
        for (InstanceId o : others) instance_load_[o.value()].Add(load / (r + 1) - load / r, now);
        instance_load_[a.to.value()].Add(load / (r + 1), now);
        result.bytes_moved += plan::KvBytes(options_.model, tokens);
        break;
      }
      case balance::ActionKind::kMove: {
        TOKENLAKE_RETURN_IF_ERROR(stores_[a.to.value()]->Allocate(a.segment).status());
        TOKENLAKE_RETURN_IF_ERROR(tree_->AddReplica(a.segment, a.to));
        TOKENLAKE_ASSIGN_OR_RETURN(index::EvictResult e, tree_->RemoveReplica(a.segment, a.from));
        OnReplicasFreedLocked(a.segment, e.node_erased, e.freed_on, nullptr);
        instance_load_[a.from.value()].Add(-load / r, now);
        instance_load_[a.to.value()].Add(load / r, now);
        result.bytes_moved += plan::KvBytes(options_.model, tokens);
        break;
      }
    }
    if (pinned) {
      const index::PrefixTree::Node* after = tree_->Find(a.segment);
      pinned_replicas_ +=
          (after != nullptr ? static_cast<int64_t>(after->replicas.size()) : 0) - pinned_before;
    }
    RefreshReplicatedLocked(a.segment);
    result.actions.push_back(a);
  }
  counters_.rebalance_bytes += result.bytes_moved;
  return result;
}

bool Lake::IsHeavyHitter(SegmentId segment) const {
  absl::MutexLock lock(&mu_);
  return tracker_->IsHeavy(segment);
}

double Lake::SegmentLoad(SegmentId segment) const {
  absl::MutexLock lock(&mu_);
  return tracker_->Load(segment);
}

}  // namespace tokenlake::lake
