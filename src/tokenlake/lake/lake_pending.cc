// The pending half of the Lake (lake.h, "Pending copies"; docs/adr/0016): copies that
// CommitPending placed and that become visible only once ConfirmStored says their data is
// stored, so that no plan ever names a copy whose data may still be on its way.
#include <algorithm>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::lake {

absl::StatusOr<CommitResult> Lake::CommitPending(
    RequestId request, absl::Span<const plan::NewSegmentPlacement> placements) {
  TOKENLAKE_RETURN_IF_ERROR(ValidatePlacements(request, placements, "CommitPending"));
  absl::MutexLock lock(&mu_);
  return CommitLocked(request, placements, /*pending=*/true);
}

absl::StatusOr<ConfirmResult> Lake::ConfirmStored(absl::Span<const StoreConfirmation> copies) {
  for (size_t i = 0; i < copies.size(); ++i) {
    const InstanceId x = copies[i].instance;
    if (!x.valid() || x.value() < 0 || x.value() >= num_instances()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("ConfirmStored: copy %d (segment %d): unknown instance %d (pool has %d)",
                          i, copies[i].segment.value(), x.value(), num_instances()));
    }
  }
  absl::MutexLock lock(&mu_);
  ConfirmResult result;
  for (const StoreConfirmation& c : copies) {
    auto it = pending_.find(c.segment);
    if (it == pending_.end() || it->second.owner != c.request ||
        it->second.instance != c.instance) {
      result.refused.push_back(c);
      continue;
    }
    // Visible copies form a prefix-closed set: a copy under a parent nobody may read yet stays
    // pending (it would be unreachable by Match anyway, and dropping its parent must not find
    // a visible child).
    const index::PrefixTree::Node* node = tree_->Find(c.segment);
    TOKENLAKE_CHECK(node != nullptr);  // pending_ follows the tree (OnTreeReplicaChangeLocked)
    if (node->parent.valid()) {
      const index::PrefixTree::Node* parent = tree_->Find(node->parent);
      if (parent == nullptr || !VisibleLocked(*parent)) {
        result.refused.push_back(c);
        continue;
      }
    }
    pending_.erase(it);
    ++result.confirmed;
    counters_.confirmed_copies += 1;
  }
  return result;
}

bool Lake::VisibleLocked(const index::PrefixTree::Node& node) const {
  if (pending_.empty()) return true;
  // pending_ is exact: a pending copy is one of the node's copies, and a node has at most one.
  return node.replicas.size() > 1 || !pending_.contains(node.id);
}

index::MatchResult Lake::VisibleMatchLocked(absl::Span<const index::SegmentKey> keys) const {
  index::MatchResult m = tree_->Match(keys);
  if (pending_.empty()) return m;
  for (int32_t i = 0; i < m.matched_segments; ++i) {
    const SegmentId id = keys[static_cast<size_t>(i)].id;
    if (!pending_.contains(id) || VisibleLocked(*tree_->Find(id))) continue;
    index::MatchResult cut;
    cut.matched_segments = i;
    for (int32_t j = 0; j < i; ++j) cut.matched_tokens += keys[static_cast<size_t>(j)].num_tokens;
    if (i > 0) cut.last_segment = keys[static_cast<size_t>(i - 1)].id;
    return cut;
  }
  return m;
}

void Lake::DropPendingLocked(RequestId request, Active& active) {
  // Deepest first: a request's pending chain was placed parents first, and only its owner can
  // place under a pending copy, so each copy's pending children are gone before it.
  for (size_t k = active.pending.size(); k-- > 0;) {
    const SegmentId seg = active.pending[k];
    auto p = pending_.find(seg);
    if (p == pending_.end() || p->second.owner != request) continue;  // confirmed, or lost
    const InstanceId where = p->second.instance;
    const index::PrefixTree::Node* node = tree_->Find(seg);
    TOKENLAKE_CHECK(node != nullptr);
    counters_.dropped_pending_copies += 1;
    if (node->replicas.size() > 1 || (node->is_leaf() && !node->is_pinned())) {
      const bool pinned = node->is_pinned();
      absl::StatusOr<index::EvictResult> r = tree_->RemoveReplica(seg, where);
      TOKENLAKE_CHECK_OK(r.status());
      OnReplicasFreedLocked(seg, r->node_erased, r->freed_on, nullptr);
      if (pinned) pinned_replicas_ -= 1;  // a copy of a node another request pins went
    } else {
      // Its last copy, with children that are not this request's pending ones: only possible
      // when a copy restored elsewhere made it visible, something was restored under it, and
      // that copy was lost again. The subtree goes as with a lost copy (LoseReplica); its
      // copies elsewhere become unlisted, which the cluster's reconciliation frees.
      absl::StatusOr<std::vector<StoredReplica>> r = EraseSubtreeLocked(seg, where);
      TOKENLAKE_CHECK_OK(r.status());
    }
  }
  active.pending.clear();
}

void Lake::OnTreeReplicaChangeLocked(SegmentId segment, InstanceId instance, bool added) {
  if (!added) {
    if (auto it = pending_.find(segment); it != pending_.end() && it->second.instance == instance) {
      pending_.erase(it);
    }
  }
  if (observer_) observer_(segment, instance, added);
}

}  // namespace tokenlake::lake
