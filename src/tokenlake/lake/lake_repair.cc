// The repair half of the Lake (lake.h, "Maintenance"): what the pool does when instances are
// lost or report what they hold.
#include <algorithm>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::lake {
namespace {

absl::Status Invalid(const std::string& message) { return absl::InvalidArgumentError(message); }

}  // namespace

absl::Status Lake::DropInstance(InstanceId instance) {
  if (!instance.valid() || instance.value() < 0 || instance.value() >= num_instances()) {
    return Invalid(absl::StrFormat("DropInstance: unknown instance %d (pool has %d)",
                                   instance.value(), num_instances()));
  }
  absl::MutexLock lock(&mu_);
  TOKENLAKE_ASSIGN_OR_RETURN(index::DropInstanceResult r, tree_->DropInstance(instance));
  store::SegmentStore& s = *stores_[instance.value()];
  for (SegmentId seg : s.Segments()) TOKENLAKE_RETURN_IF_ERROR(s.Free(seg));
  for (const index::FreedReplica& f : r.freed_elsewhere) {
    TOKENLAKE_RETURN_IF_ERROR(stores_[f.instance.value()]->Free(f.segment));
  }
  std::vector<SegmentId> replicated(replicated_.begin(), replicated_.end());
  for (SegmentId seg : replicated) RefreshReplicatedLocked(seg);
  // Pins on erased segments are gone: forget them now, so that a later re-insertion of the same
  // id by another request is never unpinned by this one.
  for (auto& [id, a] : active_) {
    std::erase_if(a.pinned, [&](SegmentId seg) { return !tree_->Contains(seg); });
  }
  pinned_replicas_ -= r.dropped_pinned_replicas;
  const int64_t now = clock_->NowUs();
  instance_load_[instance.value()].Add(-instance_load_[instance.value()].Value(now), now);
  access_.DropInstance(instance);
  return absl::OkStatus();
}

absl::StatusOr<RestoreResult> Lake::RestoreReplicas(InstanceId instance,
                                                    absl::Span<const HeldSegment> held) {
  if (!instance.valid() || instance.value() < 0 || instance.value() >= num_instances()) {
    return Invalid(absl::StrFormat("RestoreReplicas: unknown instance %d (pool has %d)",
                                   instance.value(), num_instances()));
  }
  absl::MutexLock lock(&mu_);
  RestoreResult result;
  store::SegmentStore& st = *stores_[instance.value()];
  const int64_t now = clock_->NowUs();
  // Passes over what is left until one makes no progress: a segment can go in once its parent
  // is in the tree, so parents always go first whatever the order of `held`.
  std::vector<HeldSegment> pending(held.begin(), held.end());
  std::vector<std::pair<int32_t, SegmentId>> held_pending;  // (depth, id) pending here
  while (!pending.empty()) {
    std::vector<HeldSegment> next;
    for (const HeldSegment& h : pending) {
      const index::PrefixTree::Node* node = tree_->Find(h.id);
      if (node != nullptr) {
        if (node->parent != h.parent || node->num_tokens != h.num_tokens) {
          result.rejected.push_back(h.id);
        } else if (node->HasReplicaOn(instance)) {
          // A copy pending here that the instance reports holding: its data is stored, so it
          // is confirmed below.
          if (auto p = pending_.find(h.id); p != pending_.end() && p->second.instance == instance) {
            held_pending.emplace_back(node->depth, h.id);
          }
          ++result.already_listed;
        } else if (!VisibleLocked(*node) && node->parent.valid() &&
                   !VisibleLocked(*tree_->Find(node->parent))) {
          next.push_back(h);  // under a pending copy: maybe once this report restores its parent
          continue;
        } else if (st.free() == 0) {
          result.rejected.push_back(h.id);
        } else {
          const bool pinned = node->is_pinned();
          TOKENLAKE_RETURN_IF_ERROR(tree_->AddReplica(h.id, instance));
          TOKENLAKE_CHECK_OK(st.Allocate(h.id).status());
          RefreshReplicatedLocked(h.id);
          if (pinned) pinned_replicas_ += 1;  // a running request's segment gained a copy
          ++result.restored_replicas;
        }
        continue;
      }
      if (const index::PrefixTree::Node* parent =
              h.parent.valid() ? tree_->Find(h.parent) : nullptr;
          h.parent.valid() && (parent == nullptr || !VisibleLocked(*parent))) {
        next.push_back(h);  // maybe later in this report (a pending parent counts as absent)
        continue;
      }
      if (!h.id.valid() || h.num_tokens < 1 || h.num_tokens > options_.segment_tokens ||
          st.free() == 0) {
        result.rejected.push_back(h.id);
        continue;
      }
      absl::StatusOr<index::InsertResult> ins =
          tree_->Insert(h.parent, index::SegmentKey{h.id, h.num_tokens}, instance, now);
      if (!ins.ok()) {  // e.g. the parent is a part-segment
        result.rejected.push_back(h.id);
        continue;
      }
      TOKENLAKE_CHECK_OK(st.Allocate(h.id).status());
      ++result.restored_replicas;
      ++result.new_segments;
    }
    if (next.size() == pending.size()) {
      for (const HeldSegment& h : next) result.rejected.push_back(h.id);  // orphans
      break;
    }
    pending = std::move(next);
  }
  // Confirm the reported pending copies parents first, each once its parent is visible
  // (visible copies stay prefix-closed).
  std::sort(held_pending.begin(), held_pending.end());
  for (const auto& [depth, id] : held_pending) {
    auto p = pending_.find(id);
    if (p == pending_.end() || p->second.instance != instance) continue;
    const index::PrefixTree::Node* node = tree_->Find(id);
    const index::PrefixTree::Node* parent =
        node->parent.valid() ? tree_->Find(node->parent) : nullptr;
    if (node->parent.valid() && (parent == nullptr || !VisibleLocked(*parent))) continue;
    pending_.erase(p);
    counters_.confirmed_copies += 1;
  }
  return result;
}

absl::Status Lake::DropReplica(SegmentId segment, InstanceId instance) {
  if (!instance.valid() || instance.value() < 0 || instance.value() >= num_instances()) {
    return Invalid(absl::StrFormat("DropReplica: unknown instance %d (pool has %d)",
                                   instance.value(), num_instances()));
  }
  absl::MutexLock lock(&mu_);
  const index::PrefixTree::Node* node = tree_->Find(segment);
  if (node == nullptr || !node->HasReplicaOn(instance)) {
    return absl::NotFoundError(absl::StrFormat("DropReplica: segment %d has no copy on instance %d",
                                               segment.value(), instance.value()));
  }
  if (node->is_pinned()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("DropReplica: segment %d is pinned by a running request", segment.value()));
  }
  TOKENLAKE_ASSIGN_OR_RETURN(index::EvictResult r, tree_->RemoveReplica(segment, instance));
  OnReplicasFreedLocked(segment, r.node_erased, r.freed_on, nullptr);
  return absl::OkStatus();
}

absl::StatusOr<std::vector<StoredReplica>> Lake::LoseReplica(SegmentId segment,
                                                             InstanceId instance) {
  if (!instance.valid() || instance.value() < 0 || instance.value() >= num_instances()) {
    return Invalid(absl::StrFormat("LoseReplica: unknown instance %d (pool has %d)",
                                   instance.value(), num_instances()));
  }
  absl::MutexLock lock(&mu_);
  const index::PrefixTree::Node* node = tree_->Find(segment);
  if (node == nullptr || !node->HasReplicaOn(instance)) {
    return absl::NotFoundError(absl::StrFormat("LoseReplica: segment %d has no copy on instance %d",
                                               segment.value(), instance.value()));
  }
  if (node->replicas.size() > 1) {
    const bool pinned = node->is_pinned();
    TOKENLAKE_ASSIGN_OR_RETURN(index::EvictResult r, tree_->RemoveReplica(segment, instance));
    OnReplicasFreedLocked(segment, r.node_erased, r.freed_on, nullptr);
    if (pinned) pinned_replicas_ -= 1;  // a pinned node's copy went
    return std::vector<StoredReplica>();
  }
  return EraseSubtreeLocked(segment, instance);
}

absl::StatusOr<std::vector<StoredReplica>> Lake::EraseSubtreeLocked(SegmentId segment,
                                                                    InstanceId instance) {
  std::vector<StoredReplica> freed_elsewhere;
  // The last copy: the segment and everything under it become unreachable. Erase the subtree
  // leaves first, unpinning as it goes (the requests' pin lists are fixed below).
  for (SegmentId id : tree_->SubtreeDeepestFirst(segment)) {
    const index::PrefixTree::Node* d = tree_->Find(id);
    if (d == nullptr) continue;
    if (d->pin_count > 0) {
      // Its copies all go: they no longer count as pinned.
      pinned_replicas_ -= static_cast<int64_t>(d->replicas.size());
      const std::vector<SegmentId> pins(static_cast<size_t>(d->pin_count), id);
      TOKENLAKE_RETURN_IF_ERROR(tree_->Unpin(pins));
    }
    const std::vector<InstanceId> holders(d->replicas.begin(), d->replicas.end());
    for (InstanceId h : holders) {
      TOKENLAKE_ASSIGN_OR_RETURN(index::EvictResult r, tree_->RemoveReplica(id, h));
      OnReplicasFreedLocked(id, r.node_erased, r.freed_on, nullptr);
      if (h != instance) freed_elsewhere.push_back({id, h});
    }
  }
  for (auto& [id, a] : active_) {
    std::erase_if(a.pinned, [&](SegmentId seg) { return !tree_->Contains(seg); });
  }
  return freed_elsewhere;
}

}  // namespace tokenlake::lake
