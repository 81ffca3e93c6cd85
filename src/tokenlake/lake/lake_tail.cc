// The tails of the Lake (lake.h, "Tails in the pool"; docs/adr/0017): a running request's KV
// rows after its pooled prefix kept in slots of the pool, counted like the segments they become.
#include <algorithm>
#include <limits>
#include <optional>
#include <string>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::lake {

int64_t Lake::TailBlocksNeeded(int64_t from_tokens, int64_t end_tokens) const {
  const int64_t s = options_.segment_tokens;
  if (end_tokens <= from_tokens) return 0;
  return (end_tokens + s - 1) / s - from_tokens / s;
}

int64_t Lake::TailGrowthLocked(const LakeRequest& request, int64_t matched_tokens) const {
  auto it = tails_.find(request.id);
  const int64_t held = it == tails_.end() ? 0 : static_cast<int64_t>(it->second.blocks.size());
  return TailBlocksNeeded(matched_tokens, request.tail_end_tokens) - held;
}

void Lake::FreeTailBlockLocked(const TailBlock& block, InstanceStatesCache* states) {
  TOKENLAKE_CHECK_OK(stores_[block.instance.value()]->FreeTail(block.slot));
  if (states != nullptr) states->Freed(block.instance);
  tail_slots_ -= 1;
}

void Lake::DropFirstTailBlockLocked(Tail& tail) {
  tail.blocks.erase(tail.blocks.begin());
  tail.first_tokens += options_.segment_tokens;
}

void Lake::PopTailBlockLocked(Tail& tail, InstanceStatesCache* states) {
  FreeTailBlockLocked(tail.blocks.front(), states);
  DropFirstTailBlockLocked(tail);
}

std::vector<InstanceId> Lake::TailInstances(const Tail& tail) {
  std::vector<InstanceId> out;
  out.reserve(tail.blocks.size());
  for (const TailBlock& b : tail.blocks) out.push_back(b.instance);
  return out;
}

absl::Status Lake::SetTailLocked(RequestId request, int64_t from_tokens, int64_t end_tokens,
                                 InstanceId instance, AdmitResult* result) {
  Tail& t = tails_[request];
  t.computing = instance;
  InstanceStatesCache states(this, &result->evicted);
  // A tail that starts after the matched prefix belongs to a lost prefix (the request restarts
  // from what the pool holds): its rows are of no use. Else rows the pool now serves (another
  // request stored them) leave the tail, and blocks past the iteration's rows go back.
  const size_t keep = t.first_tokens > from_tokens ? 0 : t.blocks.size();
  while (t.blocks.size() > keep) {
    FreeTailBlockLocked(t.blocks.back(), &states);
    t.blocks.pop_back();
  }
  while (!t.blocks.empty() && t.first_tokens < from_tokens) PopTailBlockLocked(t, &states);
  if (t.blocks.empty()) t.first_tokens = from_tokens;
  const auto need = static_cast<size_t>(TailBlocksNeeded(from_tokens, end_tokens));
  while (t.blocks.size() > need) {
    FreeTailBlockLocked(t.blocks.back(), &states);
    t.blocks.pop_back();
  }
  absl::Status status = absl::OkStatus();
  while (t.blocks.size() < need) {
    const InstanceId where = PlaceTailBlockLocked(instance, states, &result->evicted);
    if (!where.valid()) {
      status = absl::ResourceExhaustedError(absl::StrFormat(
          "no slot for block %d of the KV tail of request %d (every other slot is pinned or a "
          "tail)",
          t.blocks.size(), request.value()));
      break;
    }
    absl::StatusOr<SlotId> slot = stores_[where.value()]->AllocateTail();
    TOKENLAKE_CHECK_OK(slot.status());
    states.Allocated(where);
    t.blocks.push_back({where, *slot});
    tail_slots_ += 1;
  }
  if (!result->evicted.empty()) result->sequence = ++sequence_;
  result->tail_slots = TailInstances(t);
  if (t.blocks.empty()) tails_.erase(request);
  return status;
}

InstanceId Lake::PlaceTailBlockLocked(InstanceId computing, InstanceStatesCache& states,
                                      std::vector<StoredReplica>* evicted) {
  if (device_domains_.empty()) return PlaceLocked(computing, SegmentId(), states, evicted);
  const int32_t domain = device_domains_[computing.value()];
  std::vector<InstanceId> members{computing};  // the domain, computing first
  for (int32_t i = 0; i < num_instances(); ++i) {
    if (i != computing.value() && device_domains_[i] == domain) members.emplace_back(i);
  }
  while (true) {
    if (stores_[computing.value()]->free() > 0) return computing;
    InstanceId best;
    int64_t best_free = 0;
    for (InstanceId x : members) {
      if (const int64_t f = stores_[x.value()]->free(); f > best_free) {
        best = x;
        best_free = f;
      }
    }
    if (best.valid()) return best;
    bool dropped = false;
    for (InstanceId x : members) {
      const std::optional<SegmentId> victim = tree_->EvictionCandidateOn(x);
      if (!victim.has_value()) continue;
      absl::StatusOr<index::EvictResult> r = tree_->RemoveReplica(*victim, x);
      TOKENLAKE_CHECK_OK(r.status());
      OnReplicasFreedLocked(*victim, r->node_erased, r->freed_on, evicted);
      dropped = true;
      break;
    }
    if (!dropped) return {};
  }
}

int64_t Lake::DomainRoomLocked(InstanceId computing, absl::Span<const index::SegmentKey> to_pin,
                               int64_t enough) const {
  if (device_domains_.empty()) return std::numeric_limits<int64_t>::max();
  std::vector<bool> in_domain(static_cast<size_t>(num_instances()));
  int64_t room = 0;
  for (int32_t i = 0; i < num_instances(); ++i) {
    in_domain[i] = device_domains_[i] == device_domains_[computing.value()];
    if (in_domain[i]) room += stores_[i]->free();
  }
  if (room >= enough) return room;
  // What PlaceTailBlockLocked's drops reach: every copy in the domain of an unpinned segment
  // with a copy outside it; of one with every copy inside, all but one, and that one too once
  // the segment is a leaf, i.e. when its whole subtree can go (deepest first).
  absl::flat_hash_set<SegmentId> pinned;
  for (const index::SegmentKey& k : to_pin) pinned.insert(k.id);
  std::vector<const index::PrefixTree::Node*> nodes;
  tree_->ForEachNode([&](const index::PrefixTree::Node& n) { nodes.push_back(&n); });
  std::sort(nodes.begin(), nodes.end(),
            [](const auto* a, const auto* b) { return a->depth > b->depth; });
  absl::flat_hash_set<SegmentId> blocked;  // segments with a child that cannot go
  for (const index::PrefixTree::Node* n : nodes) {
    const bool can_drop = !n->is_pinned() && !pinned.contains(n->id);
    int64_t inside = 0;
    int64_t outside = 0;
    for (InstanceId x : n->replicas) (in_domain[x.value()] ? inside : outside) += 1;
    bool erasable = false;
    if (can_drop) {
      if (outside > 0) {
        room += inside;
      } else {
        erasable = !blocked.contains(n->id);
        room += inside - 1 + (erasable ? 1 : 0);
      }
    }
    if (!erasable && n->parent.valid()) blocked.insert(n->parent);
  }
  return room;
}

absl::Status Lake::SetDeviceDomains(std::vector<int32_t> domains) {
  if (!domains.empty() && static_cast<int32_t>(domains.size()) != num_instances()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("SetDeviceDomains: %d domains for a pool of %d instances", domains.size(),
                        num_instances()));
  }
  // One domain for all is the same as none (and keeps PlaceLocked's balancing for tails).
  if (std::all_of(domains.begin(), domains.end(), [&](int32_t d) { return d == domains[0]; })) {
    domains.clear();
  }
  absl::MutexLock lock(&mu_);
  device_domains_ = std::move(domains);
  return absl::OkStatus();
}

void Lake::ReleaseTail(RequestId request) {
  absl::MutexLock lock(&mu_);
  auto it = tails_.find(request);
  if (it == tails_.end()) return;
  while (!it->second.blocks.empty()) PopTailBlockLocked(it->second, nullptr);
  tails_.erase(it);
}

std::vector<RequestId> Lake::ReleaseTailsComputedOn(InstanceId instance) {
  absl::MutexLock lock(&mu_);
  std::vector<RequestId> released;
  for (auto it = tails_.begin(); it != tails_.end();) {
    if (it->second.computing != instance) {
      ++it;
      continue;
    }
    while (!it->second.blocks.empty()) PopTailBlockLocked(it->second, nullptr);
    released.push_back(it->first);
    tails_.erase(it++);
  }
  std::sort(released.begin(), released.end());
  return released;
}

std::vector<InstanceId> Lake::TailSlots(RequestId request) const {
  absl::MutexLock lock(&mu_);
  auto it = tails_.find(request);
  return it == tails_.end() ? std::vector<InstanceId>() : TailInstances(it->second);
}

absl::Status Lake::CheckTailsLocked() const {
  std::vector<int64_t> per_instance(stores_.size(), 0);
  int64_t total = 0;
  for (const auto& [id, t] : tails_) {
    if (t.blocks.empty()) {
      return absl::InternalError(absl::StrFormat("Lake: request %d has an empty tail", id.value()));
    }
    if (t.first_tokens % options_.segment_tokens != 0) {
      return absl::InternalError(
          absl::StrFormat("Lake: the tail of request %d starts at row %d, not a segment boundary",
                          id.value(), t.first_tokens));
    }
    for (const TailBlock& b : t.blocks) per_instance[b.instance.value()] += 1;
    total += static_cast<int64_t>(t.blocks.size());
  }
  if (total != tail_slots_) {
    return absl::InternalError(
        absl::StrFormat("Lake: tails hold %d slots, %d counted", total, tail_slots_));
  }
  for (size_t i = 0; i < stores_.size(); ++i) {
    if (per_instance[i] != stores_[i]->num_tail_slots()) {
      return absl::InternalError(
          absl::StrFormat("Lake: tails hold %d slots of instance %d, its store %d", per_instance[i],
                          i, stores_[i]->num_tail_slots()));
    }
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::lake
