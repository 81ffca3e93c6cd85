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
      TOKENLAKE_ASSIGN_OR_RETURN(const std::optional<SegmentId> leaf,
                                 DisplaceLeafOnLocked(a.to, &result));
      if (!leaf.has_value()) continue;
      displaced.insert(*leaf);
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
      case balance::ActionKind::kReplicate:
        TOKENLAKE_RETURN_IF_ERROR(AddCopyLocked(a.segment, a.to, now, &result));
        break;
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

absl::StatusOr<std::optional<SegmentId>> Lake::DisplaceLeafOnLocked(InstanceId instance,
                                                                    RebalanceResult* result) {
  const std::optional<SegmentId> leaf = DisplaceableLeafOnLocked(instance);
  if (!leaf.has_value()) return std::nullopt;
  TOKENLAKE_ASSIGN_OR_RETURN(index::EvictResult e, tree_->Evict(*leaf));
  OnReplicasFreedLocked(*leaf, e.node_erased, e.freed_on, nullptr);
  counters_.rebalance_displaced += 1;
  result->actions.push_back({balance::ActionKind::kDrop, *leaf, instance, InstanceId()});
  return leaf;
}

absl::Status Lake::AddCopyLocked(SegmentId segment, InstanceId to, int64_t now,
                                 RebalanceResult* result) {
  const index::PrefixTree::Node* node = tree_->Find(segment);
  if (node == nullptr) {
    return absl::InternalError(absl::StrFormat("AddCopy: segment %d not stored", segment.value()));
  }
  const double load = tracker_->Load(segment);
  const auto r = static_cast<double>(node->replicas.size());
  const int32_t tokens = node->num_tokens;
  const std::vector<InstanceId> others(node->replicas.begin(), node->replicas.end());
  TOKENLAKE_RETURN_IF_ERROR(stores_[to.value()]->Allocate(segment).status());
  TOKENLAKE_RETURN_IF_ERROR(tree_->AddReplica(segment, to));
  for (InstanceId o : others) instance_load_[o.value()].Add(load / (r + 1) - load / r, now);
  instance_load_[to.value()].Add(load / (r + 1), now);
  result->bytes_moved += plan::KvBytes(options_.model, tokens);
  return absl::OkStatus();
}

namespace {

// Whether two nodes have copies on the same instances (in any order).
bool SameCopies(const index::PrefixTree::Node& a, const index::PrefixTree::Node& b) {
  if (a.replicas.size() != b.replicas.size()) return false;
  for (InstanceId r : a.replicas) {
    if (!b.HasReplicaOn(r)) return false;
  }
  return true;
}

}  // namespace

absl::StatusOr<RebalanceResult> Lake::ReplicateHotRuns(absl::Span<const plan::BatchPlan> plans) {
  absl::MutexLock lock(&mu_);
  RebalanceResult result;
  result.sequence = sequence_;
  const HotRunOptions& opt = options_.hot_runs;
  const int32_t n = num_instances();
  if (!opt.enabled || n < 2) return result;
  const int64_t now = clock_->NowUs();
  const auto access = [&](InstanceId i) {
    mu_.AssertHeld();  // held by this function; tells the analysis inside the lambda
    return static_cast<double>(access_.tokens(i));
  };
  const auto mean_access = [&] {
    double sum = 0;
    for (int32_t i = 0; i < n; ++i) sum += access(InstanceId(i));
    return sum / n;
  };
  // Copies one run (the segments of `run`, read on `holder`) when the rule says so.
  const auto copy_run = [&](absl::Span<const SegmentId> run, InstanceId holder,
                            const index::PrefixTree::Node& first) -> absl::Status {
    mu_.AssertHeld();
    const double mean = mean_access();
    const double hot_access = access(holder);
    if (!(hot_access > (1 + opt.access_margin) * mean)) return absl::OkStatus();
    int64_t run_tokens = 0;
    for (SegmentId s : run) run_tokens += tree_->Find(s)->num_tokens;
    const double estimate = static_cast<double>(first.pin_count) * static_cast<double>(run_tokens) /
                            static_cast<double>(first.replicas.size());
    if (estimate < opt.min_access_share * hot_access) return absl::OkStatus();
    // The instance with the least access below the mean that holds none of the run.
    InstanceId target;
    for (int32_t i = 0; i < n; ++i) {
      const InstanceId c(i);
      if (first.HasReplicaOn(c) || !(access(c) < mean)) continue;
      if (static_cast<double>(run.size()) >
          opt.max_instance_share * static_cast<double>(stores_[i]->capacity())) {
        continue;
      }
      if (!target.valid() || access(c) < access(target)) target = c;
    }
    if (!target.valid()) return absl::OkStatus();
    for (SegmentId s : run) {
      const index::PrefixTree::Node* node = tree_->Find(s);
      if (node == nullptr || pending_.contains(s) || !node->HasReplicaOn(holder)) break;
      if (node->HasReplicaOn(target)) continue;
      const bool pinned = node->is_pinned();
      if (pinned && AvailableSlotsLocked() <= 0) break;  // promised to admitted requests
      if (stores_[target.value()]->free() <= 0) {
        TOKENLAKE_ASSIGN_OR_RETURN(const std::optional<SegmentId> leaf,
                                   DisplaceLeafOnLocked(target, &result));
        if (!leaf.has_value() || tree_->Find(s) == nullptr) break;
        if (pinned && AvailableSlotsLocked() <= 0) break;
      }
      TOKENLAKE_RETURN_IF_ERROR(AddCopyLocked(s, target, now, &result));
      if (pinned) pinned_replicas_ += 1;
      RefreshReplicatedLocked(s);
      result.actions.push_back({balance::ActionKind::kReplicate, s, holder, target});
    }
    return absl::OkStatus();
  };
  std::vector<SegmentId> run;
  for (const plan::BatchPlan& p : plans) {
    for (const plan::RequestPlan& rp : p.requests) {
      if (!active_.contains(rp.request)) continue;
      size_t i = 0;
      while (i < rp.segments.size()) {
        const InstanceId holder = rp.segments[i].holder;
        const index::PrefixTree::Node* first = tree_->Find(rp.segments[i].segment);
        run.clear();
        size_t j = i;
        for (; j < rp.segments.size() && rp.segments[j].holder == holder; ++j) {
          const index::PrefixTree::Node* node = tree_->Find(rp.segments[j].segment);
          if (node == nullptr || first == nullptr || !SameCopies(*node, *first)) break;
          run.push_back(rp.segments[j].segment);
        }
        if (j == i) j = i + 1;  // a segment no longer stored: skip it
        i = j;
        if (run.empty() || first == nullptr || !first->HasReplicaOn(holder)) continue;
        const index::PrefixTree::Node first_copy = *first;  // the copying changes the tree
        TOKENLAKE_RETURN_IF_ERROR(copy_run(run, holder, first_copy));
      }
    }
  }
  if (!result.actions.empty()) result.sequence = ++sequence_;
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
