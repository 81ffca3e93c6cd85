#include "tokenlake/service/reconciler.h"

#include "tokenlake/service/lake_rpc.h"

namespace tokenlake::service {

Reconciler::Reconciler(int32_t num_instances, absl::Time started, absl::Duration restore_window)
    : started_(started),
      restore_window_(restore_window),
      missing_(static_cast<size_t>(num_instances)),
      pending_restore_(static_cast<size_t>(num_instances)) {}

void Reconciler::Forget(int32_t id) {
  absl::MutexLock lock(&mu_);
  if (id < 0 || id >= static_cast<int32_t>(missing_.size())) return;
  missing_[static_cast<size_t>(id)].clear();
  pending_restore_[static_cast<size_t>(id)].clear();
}

void Reconciler::Apply(lake::Lake& lake, int32_t id, const v1::InstanceState& state, bool reconcile,
                       absl::Time now, std::vector<uint64_t>* to_free) {
  absl::MutexLock lock(&mu_);
  if (id < 0 || id >= static_cast<int32_t>(missing_.size())) return;
  absl::flat_hash_set<SegmentId>& pending_restore = pending_restore_[static_cast<size_t>(id)];
  const InstanceId inst(id);
  absl::flat_hash_set<SegmentId> listed;
  lake.prefix_tree().ForEachNode([&](const index::PrefixTree::Node& node) {
    if (node.HasReplicaOn(inst)) listed.insert(node.id);
  });
  // Rebalance copies: confirmed once the receiver reports the segment (or the lake no longer
  // lists it there); while pending, the source keeps its copy (a move's source is no longer
  // listed, but plans read from it until the copy is confirmed).
  absl::flat_hash_set<SegmentId> protected_sources;
  for (auto it = fresh_.begin(); it != fresh_.end();) {
    auto cur = it++;
    if (now - cur->second.since > absl::Seconds(10)) {
      fresh_.erase(cur);
    } else if (cur->second.source == id) {
      protected_sources.insert(SegmentId(cur->first.first));
    }
  }
  absl::flat_hash_set<SegmentId> reported;
  for (const v1::Segment& seg : state.segments()) reported.insert(SegmentId(seg.id()));
  for (auto it = fresh_.begin(); it != fresh_.end();) {
    auto cur = it++;
    const SegmentId seg(cur->first.first);
    if (cur->first.second == id && (reported.contains(seg) || !listed.contains(seg))) {
      fresh_.erase(cur);
    }
  }
  std::vector<lake::HeldSegment> unlisted;
  for (const v1::Segment& seg : state.segments()) {
    if (protected_sources.contains(SegmentId(seg.id()))) continue;
    if (!listed.contains(SegmentId(seg.id()))) {
      unlisted.push_back({SegmentId(seg.id()), SegmentId(seg.parent()), seg.num_tokens()});
    }
  }
  const bool in_window = now - started_ < restore_window_;
  if (!in_window) pending_restore.clear();
  // At registration everything unlisted is restored; on heartbeats only what registration
  // could not place yet (orphans whose parent is on an instance that had not re-registered):
  // any other unlisted copy is one the lake dropped or evicted, to be freed.
  const size_t frees_before = to_free->size();
  std::vector<lake::HeldSegment> restore;
  for (const lake::HeldSegment& h : unlisted) {
    if (!reconcile || pending_restore.contains(h.id)) {
      restore.push_back(h);
    } else {
      to_free->push_back(h.id.value());
    }
  }
  if (!restore.empty()) {
    absl::StatusOr<lake::RestoreResult> r = lake.RestoreReplicas(inst, restore);
    if (r.ok()) {
      stats_.restored += r->restored_replicas;
      pending_restore.clear();
      for (SegmentId seg : r->rejected) {
        if (in_window) {
          pending_restore.insert(seg);  // retried on the next heartbeats
        } else {
          to_free->push_back(seg.value());
        }
      }
    }
  }
  stats_.frees += static_cast<int64_t>(to_free->size() - frees_before);
  if (!reconcile) return;
  absl::flat_hash_map<SegmentId, int32_t>& old_missing = missing_[static_cast<size_t>(id)];
  absl::flat_hash_map<SegmentId, int32_t> missing;
  for (SegmentId seg : listed) {
    if (reported.contains(seg)) continue;
    auto it = old_missing.find(seg);
    const int32_t misses = 1 + (it == old_missing.end() ? 0 : it->second);
    if (misses >= kMissesToDrop && lake.DropReplica(seg, inst).ok()) {
      ++stats_.drops;
      continue;
    }
    if (misses >= kMissesToLose && lake.LoseReplica(seg, inst).ok()) {
      ++stats_.drops;
      continue;
    }
    missing[seg] = misses;
  }
  old_missing = std::move(missing);
}

void Reconciler::AddFresh(uint64_t segment, int32_t to, int32_t from, absl::Time now) {
  absl::MutexLock lock(&mu_);
  fresh_[{segment, to}] = Fresh{.source = from, .since = now};
}

int64_t Reconciler::RedirectUnconfirmed(lake::IterationPlan* plan,
                                        const std::vector<bool>& routable) {
  auto is_routable = [&](int32_t i) {
    return i >= 0 && i < static_cast<int32_t>(routable.size()) && routable[static_cast<size_t>(i)];
  };
  absl::MutexLock lock(&mu_);
  int64_t n = 0;
  for (plan::SegmentAssignment& a : plan->segments) {
    auto it = fresh_.find({a.segment.value(), InstanceToWire(a.holder)});
    if (it == fresh_.end() || !is_routable(it->second.source)) continue;
    a.holder = InstanceId(it->second.source);
    if (a.action == plan::HolderAction::kLocal) a.action = plan::HolderAction::kMoveQueries;
    ++n;
  }
  stats_.redirects += n;
  return n;
}

Reconciler::Stats Reconciler::stats() const {
  absl::MutexLock lock(&mu_);
  return stats_;
}

}  // namespace tokenlake::service
