#include "tokenlake/index/prefix_tree.h"

#include <algorithm>
#include <sstream>
#include <string>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::index {
namespace {

std::string Str(SegmentId id) {
  std::ostringstream os;
  os << id;
  return os.str();
}

std::string Str(InstanceId id) {
  std::ostringstream os;
  os << id;
  return os.str();
}

// How far ahead Match prefetches hash-table slots: enough to overlap several cache misses.
constexpr size_t kPrefetchDistance = 8;

}  // namespace

bool PrefixTree::Node::HasReplicaOn(InstanceId instance) const {
  return std::find(replicas.begin(), replicas.end(), instance) != replicas.end();
}

absl::StatusOr<std::unique_ptr<PrefixTree>> PrefixTree::Create(const Options& options) {
  if (options.segment_tokens <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PrefixTree::Create: segment_tokens must be > 0, got %d", options.segment_tokens));
  }
  if (options.num_instances <= 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PrefixTree::Create: num_instances must be > 0, got %d", options.num_instances));
  }
  if (options.reserve_segments < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PrefixTree::Create: reserve_segments must be >= 0, got %d", options.reserve_segments));
  }
  return std::unique_ptr<PrefixTree>(new PrefixTree(options));
}

PrefixTree::PrefixTree(const Options& options)
    : options_(options), per_instance_(static_cast<size_t>(options.num_instances)) {
  if (options.reserve_segments > 0) nodes_.reserve(static_cast<size_t>(options.reserve_segments));
}

// ---------------------------------------------------------------------------------------------
// Matching

namespace {

template <typename Map, typename GetId, typename Elem>
MatchResult MatchImpl(const Map& nodes, absl::Span<const Elem> chain, GetId get_id) {
  MatchResult result;
  SegmentId expected_parent;  // invalid: the first element must be a root child
  const size_t n = chain.size();
  for (size_t i = 0; i < std::min(n, kPrefetchDistance); ++i) nodes.prefetch(get_id(chain[i]));
  for (size_t i = 0; i < n; ++i) {
    if (i + kPrefetchDistance < n) nodes.prefetch(get_id(chain[i + kPrefetchDistance]));
    const SegmentId id = get_id(chain[i]);
    auto it = nodes.find(id);
    if (it == nodes.end() || it->second.parent != expected_parent) break;
    ++result.matched_segments;
    result.matched_tokens += it->second.num_tokens;
    result.last_segment = id;
    expected_parent = id;
  }
  return result;
}

}  // namespace

MatchResult PrefixTree::Match(absl::Span<const SegmentId> chain) const {
  return MatchImpl(nodes_, chain, [](SegmentId id) { return id; });
}

MatchResult PrefixTree::Match(absl::Span<const SegmentKey> chain) const {
  return MatchImpl(nodes_, chain, [](const SegmentKey& key) { return key.id; });
}

// ---------------------------------------------------------------------------------------------
// Eviction indexes

void PrefixTree::Unindex(const Node& node) {
  if (node.is_pinned()) return;
  const LruKey key{node.last_access_us, node.id};
  if (node.is_leaf()) lru_leaves_.erase(key);
  if (node.replicas.size() >= 2) {
    for (InstanceId r : node.replicas) per_instance_[r.value()].extras.erase(key);
  } else if (node.is_leaf() && node.replicas.size() == 1) {
    per_instance_[node.replicas[0].value()].last_copy.erase(key);
  }
}

void PrefixTree::Index(const Node& node) {
  if (node.is_pinned()) return;
  const LruKey key{node.last_access_us, node.id};
  if (node.is_leaf()) lru_leaves_.insert(key);
  if (node.replicas.size() >= 2) {
    for (InstanceId r : node.replicas) per_instance_[r.value()].extras.insert(key);
  } else if (node.is_leaf() && node.replicas.size() == 1) {
    per_instance_[node.replicas[0].value()].last_copy.insert(key);
  }
}

// ---------------------------------------------------------------------------------------------
// Insertion

absl::StatusOr<InsertResult> PrefixTree::Insert(SegmentId parent, const SegmentKey& key,
                                                InstanceId holder, int64_t now_us) {
  if (!key.id.valid()) {
    return absl::InvalidArgumentError("PrefixTree::Insert: the segment id is invalid");
  }
  if (key.num_tokens < 1 || key.num_tokens > options_.segment_tokens) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PrefixTree::Insert: %s has num_tokens %d, must be in [1, %d]", Str(key.id),
                        key.num_tokens, options_.segment_tokens));
  }
  if (!InstanceInRange(holder)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PrefixTree::Insert: holder %s of %s is not in [0, %d)", Str(holder),
                        Str(key.id), num_instances()));
  }
  if (auto it = nodes_.find(key.id); it != nodes_.end()) {
    const Node& existing = it->second;
    if (existing.parent != parent || existing.num_tokens != key.num_tokens) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "PrefixTree::Insert: %s is already stored with parent %s and %d tokens, but was "
          "inserted with parent %s and %d tokens (hash collision or caller bug)",
          Str(key.id), Str(existing.parent), existing.num_tokens, Str(parent), key.num_tokens));
    }
    return InsertResult{.inserted = false, .depth = existing.depth};
  }
  int32_t depth = 0;
  if (parent.valid()) {
    auto pit = nodes_.find(parent);
    if (pit == nodes_.end()) {
      return absl::NotFoundError(absl::StrFormat(
          "PrefixTree::Insert: parent %s of %s is not stored", Str(parent), Str(key.id)));
    }
    Node& p = pit->second;
    if (p.num_tokens < options_.segment_tokens) {
      return absl::FailedPreconditionError(
          absl::StrFormat("PrefixTree::Insert: parent %s of %s is a part-segment (%d < %d tokens); "
                          "part-segments are leaves",
                          Str(parent), Str(key.id), p.num_tokens, options_.segment_tokens));
    }
    depth = p.depth + 1;
    Unindex(p);
    ++p.num_children;
    Index(p);
  }
  // Insert after touching the parent: emplace may rehash and move nodes.
  Node node;
  node.id = key.id;
  node.parent = parent;
  node.num_tokens = key.num_tokens;
  node.depth = depth;
  node.replicas.push_back(holder);
  node.last_access_us = now_us;
  if (parent.valid()) {
    Node& p = nodes_.find(parent)->second;
    node.next_sibling = p.first_child;
    p.first_child = key.id;
    if (node.next_sibling.valid()) nodes_.find(node.next_sibling)->second.prev_sibling = key.id;
  }
  auto [it, ok] = nodes_.emplace(key.id, std::move(node));
  TOKENLAKE_CHECK(ok);
  Index(it->second);
  num_tokens_ += key.num_tokens;
  CountAdded(it->second, holder);
  return InsertResult{.inserted = true, .depth = depth};
}

absl::StatusOr<int32_t> PrefixTree::InsertChain(absl::Span<const SegmentKey> chain,
                                                InstanceId holder, int64_t now_us) {
  if (!InstanceInRange(holder)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PrefixTree::InsertChain: holder %s is not in [0, %d)", Str(holder), num_instances()));
  }
  // Validate everything first so that the whole call is all-or-nothing.
  size_t first_new = chain.size();
  absl::flat_hash_set<SegmentId> new_ids;
  for (size_t i = 0; i < chain.size(); ++i) {
    const SegmentKey& key = chain[i];
    const SegmentId parent = i == 0 ? SegmentId() : chain[i - 1].id;
    if (!key.id.valid()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("PrefixTree::InsertChain: the id at position %d is invalid", i));
    }
    if (key.num_tokens < 1 || key.num_tokens > options_.segment_tokens) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "PrefixTree::InsertChain: %s at position %d has num_tokens %d, must be in [1, %d]",
          Str(key.id), i, key.num_tokens, options_.segment_tokens));
    }
    if (i + 1 < chain.size() && key.num_tokens < options_.segment_tokens) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "PrefixTree::InsertChain: %s at position %d is a part-segment (%d tokens) but is not "
          "last; part-segments are leaves",
          Str(key.id), i, key.num_tokens));
    }
    auto it = nodes_.find(key.id);
    if (it != nodes_.end()) {
      if (i >= first_new || it->second.parent != parent ||
          it->second.num_tokens != key.num_tokens) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "PrefixTree::InsertChain: %s at position %d is already stored with parent %s and %d "
            "tokens, but the chain gives parent %s and %d tokens",
            Str(key.id), i, Str(it->second.parent), it->second.num_tokens, Str(parent),
            key.num_tokens));
      }
    } else {
      if (first_new == chain.size()) first_new = i;
      if (!new_ids.insert(key.id).second) {
        return absl::InvalidArgumentError(
            absl::StrFormat("PrefixTree::InsertChain: %s appears twice in the chain (position %d)",
                            Str(key.id), i));
      }
    }
  }
  int32_t created = 0;
  for (size_t i = first_new; i < chain.size(); ++i) {
    const SegmentId parent = i == 0 ? SegmentId() : chain[i - 1].id;
    absl::StatusOr<InsertResult> r = Insert(parent, chain[i], holder, now_us);
    TOKENLAKE_CHECK_OK(r.status());
    TOKENLAKE_CHECK(r->inserted);
    ++created;
  }
  return created;
}

// ---------------------------------------------------------------------------------------------
// Replicas

absl::Status PrefixTree::AddReplica(SegmentId id, InstanceId instance) {
  if (!InstanceInRange(instance)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PrefixTree::AddReplica: instance %s of %s is not in [0, %d)",
                        Str(instance), Str(id), num_instances()));
  }
  auto it = nodes_.find(id);
  if (it == nodes_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("PrefixTree::AddReplica: %s is not stored", Str(id)));
  }
  Node& node = it->second;
  if (node.HasReplicaOn(instance)) {
    return absl::AlreadyExistsError(absl::StrFormat(
        "PrefixTree::AddReplica: %s already has a replica on %s", Str(id), Str(instance)));
  }
  Unindex(node);
  node.replicas.push_back(instance);
  Index(node);
  CountAdded(node, instance);
  return absl::OkStatus();
}

void PrefixTree::CountAdded(const Node& node, InstanceId instance) {
  ++num_replicas_;
  PerInstance& per = per_instance_[instance.value()];
  ++per.num_replicas;
  per.num_tokens += node.num_tokens;
  if (observer_) observer_(node.id, instance, /*added=*/true);
}

void PrefixTree::CountRemoved(const Node& node, InstanceId instance) {
  --num_replicas_;
  PerInstance& per = per_instance_[instance.value()];
  --per.num_replicas;
  per.num_tokens -= node.num_tokens;
  if (observer_) observer_(node.id, instance, /*added=*/false);
}

void PrefixTree::EraseLeafNode(SegmentId id) {
  auto it = nodes_.find(id);
  TOKENLAKE_CHECK(it != nodes_.end());
  Node& node = it->second;
  TOKENLAKE_CHECK(node.is_leaf(), "EraseLeafNode on an interior node");
  Unindex(node);
  for (InstanceId r : node.replicas) CountRemoved(node, r);
  num_tokens_ -= node.num_tokens;
  if (node.is_pinned()) --num_pinned_;
  const SegmentId parent = node.parent;
  const SegmentId prev = node.prev_sibling;
  const SegmentId next = node.next_sibling;
  nodes_.erase(it);
  if (next.valid()) nodes_.find(next)->second.prev_sibling = prev;
  if (parent.valid()) {
    auto pit = nodes_.find(parent);
    TOKENLAKE_CHECK(pit != nodes_.end(), "a stored node's parent is missing");
    Node& p = pit->second;
    if (prev.valid()) {
      nodes_.find(prev)->second.next_sibling = next;
    } else {
      TOKENLAKE_CHECK(p.first_child == id, "a first child is not its parent's first_child");
      p.first_child = next;
    }
    Unindex(p);
    --p.num_children;
    Index(p);
  }
}

absl::StatusOr<EvictResult> PrefixTree::RemoveReplica(SegmentId id, InstanceId instance) {
  if (!InstanceInRange(instance)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PrefixTree::RemoveReplica: instance %s of %s is not in [0, %d)",
                        Str(instance), Str(id), num_instances()));
  }
  auto it = nodes_.find(id);
  if (it == nodes_.end()) {
    return absl::NotFoundError(
        absl::StrFormat("PrefixTree::RemoveReplica: %s is not stored", Str(id)));
  }
  Node& node = it->second;
  auto rit = std::find(node.replicas.begin(), node.replicas.end(), instance);
  if (rit == node.replicas.end()) {
    return absl::NotFoundError(absl::StrFormat("PrefixTree::RemoveReplica: %s has no replica on %s",
                                               Str(id), Str(instance)));
  }
  EvictResult result;
  result.segment = id;
  result.freed_on.push_back(instance);
  if (node.replicas.size() == 1) {
    if (node.is_pinned() || !node.is_leaf()) {
      return absl::FailedPreconditionError(absl::StrFormat(
          "PrefixTree::RemoveReplica: cannot drop the last replica of %s (pin_count %d, %d "
          "children): only unpinned leaves can be erased",
          Str(id), node.pin_count, node.num_children));
    }
    EraseLeafNode(id);
    result.node_erased = true;
    return result;
  }
  Unindex(node);
  node.replicas.erase(rit);
  Index(node);
  CountRemoved(node, instance);
  return result;
}

// ---------------------------------------------------------------------------------------------
// Pins and access statistics

absl::Status PrefixTree::Pin(absl::Span<const SegmentId> ids) {
  for (SegmentId id : ids) {
    if (!nodes_.contains(id)) {
      return absl::NotFoundError(
          absl::StrFormat("PrefixTree::Pin: %s is not stored (nothing was pinned)", Str(id)));
    }
  }
  for (SegmentId id : ids) {
    Node& node = nodes_.find(id)->second;
    if (node.pin_count == 0) {
      Unindex(node);
      ++num_pinned_;
    }
    ++node.pin_count;
  }
  return absl::OkStatus();
}

absl::Status PrefixTree::Unpin(absl::Span<const SegmentId> ids) {
  for (SegmentId id : ids) {
    if (!nodes_.contains(id)) {
      return absl::NotFoundError(
          absl::StrFormat("PrefixTree::Unpin: %s is not stored (nothing was unpinned)", Str(id)));
    }
  }
  std::vector<Node*> released;
  for (size_t i = 0; i < ids.size(); ++i) {
    Node& node = nodes_.find(ids[i])->second;
    if (node.pin_count == 0) {
      for (size_t j = 0; j < i; ++j) ++nodes_.find(ids[j])->second.pin_count;  // roll back
      return absl::FailedPreconditionError(absl::StrFormat(
          "PrefixTree::Unpin: %s (position %d) is not pinned%s (nothing was unpinned)", Str(ids[i]),
          i, i > 0 ? " enough times" : ""));
    }
    if (--node.pin_count == 0) released.push_back(&node);
  }
  for (Node* node : released) {
    Index(*node);
    --num_pinned_;
  }
  return absl::OkStatus();
}

int32_t PrefixTree::Touch(absl::Span<const SegmentId> ids, int64_t now_us) {
  int32_t touched = 0;
  for (SegmentId id : ids) {
    auto it = nodes_.find(id);
    if (it == nodes_.end()) continue;
    Node& node = it->second;
    Unindex(node);
    node.last_access_us = now_us;
    ++node.access_count;
    Index(node);
    ++touched;
  }
  return touched;
}

// ---------------------------------------------------------------------------------------------
// Eviction

std::optional<SegmentId> PrefixTree::LruEvictableLeaf() const {
  if (lru_leaves_.empty()) return std::nullopt;
  return lru_leaves_.begin()->second;
}

std::vector<SegmentId> PrefixTree::EvictionCandidates(int32_t n) const {
  std::vector<SegmentId> out;
  for (auto it = lru_leaves_.begin();
       it != lru_leaves_.end() && static_cast<int32_t>(out.size()) < n; ++it) {
    out.push_back(it->second);
  }
  return out;
}

absl::StatusOr<EvictResult> PrefixTree::Evict(SegmentId id) {
  auto it = nodes_.find(id);
  if (it == nodes_.end()) {
    return absl::NotFoundError(absl::StrFormat("PrefixTree::Evict: %s is not stored", Str(id)));
  }
  const Node& node = it->second;
  if (node.is_pinned() || !node.is_leaf()) {
    return absl::FailedPreconditionError(
        absl::StrFormat("PrefixTree::Evict: %s is not an unpinned leaf (pin_count %d, %d children)",
                        Str(id), node.pin_count, node.num_children));
  }
  EvictResult result;
  result.segment = id;
  result.node_erased = true;
  result.freed_on = node.replicas;
  EraseLeafNode(id);
  return result;
}

std::optional<SegmentId> PrefixTree::LruExtraReplicaOn(InstanceId instance) const {
  if (!InstanceInRange(instance)) return std::nullopt;
  const auto& set = per_instance_[instance.value()].extras;
  if (set.empty()) return std::nullopt;
  return set.begin()->second;
}

std::optional<SegmentId> PrefixTree::LruLastCopyLeafOn(InstanceId instance) const {
  if (!InstanceInRange(instance)) return std::nullopt;
  const auto& set = per_instance_[instance.value()].last_copy;
  if (set.empty()) return std::nullopt;
  return set.begin()->second;
}

std::optional<SegmentId> PrefixTree::EvictionCandidateOn(InstanceId instance) const {
  if (auto extra = LruExtraReplicaOn(instance)) return extra;
  return LruLastCopyLeafOn(instance);
}

std::optional<EvictResult> PrefixTree::EvictOneOn(InstanceId instance) {
  const std::optional<SegmentId> victim = EvictionCandidateOn(instance);
  if (!victim) return std::nullopt;
  absl::StatusOr<EvictResult> result = RemoveReplica(*victim, instance);
  TOKENLAKE_CHECK_OK(result.status());
  return *std::move(result);
}

absl::StatusOr<DropInstanceResult> PrefixTree::DropInstance(InstanceId instance) {
  if (!InstanceInRange(instance)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PrefixTree::DropInstance: instance %s is not in [0, %d)", Str(instance), num_instances()));
  }
  DropInstanceResult result;
  // 1. Drop extra copies; remember the nodes whose only copy was on the instance.
  absl::flat_hash_set<SegmentId> lost;
  for (auto& [id, node] : nodes_) {
    auto rit = std::find(node.replicas.begin(), node.replicas.end(), instance);
    if (rit == node.replicas.end()) continue;
    ++result.dropped_replicas;
    if (node.replicas.size() == 1) {
      lost.insert(id);
      continue;
    }
    if (node.is_pinned()) ++result.dropped_pinned_replicas;
    Unindex(node);
    node.replicas.erase(rit);
    Index(node);
    CountRemoved(node, instance);
  }
  if (lost.empty()) return result;
  // 2. Everything under a lost node is unreachable: each lost node's subtree is erased, deepest
  //    first (so every erased node is a leaf then). A lost node under another goes with that
  //    one's subtree (its own is empty by then). Taken in id order, so that the erasure order
  //    does not depend on the hash.
  std::vector<SegmentId> tops(lost.begin(), lost.end());
  std::sort(tops.begin(), tops.end());
  for (SegmentId top : tops) {
    for (SegmentId id : SubtreeDeepestFirst(top)) {
      const Node& node = nodes_.find(id)->second;
      for (InstanceId r : node.replicas) {
        if (r != instance) result.freed_elsewhere.push_back(FreedReplica{id, r});
      }
      if (node.is_pinned()) {
        result.dropped_pinned_replicas += static_cast<int64_t>(node.replicas.size());
      }
      EraseLeafNode(id);
      ++result.erased_segments;
    }
  }
  std::sort(result.freed_elsewhere.begin(), result.freed_elsewhere.end(),
            [](const FreedReplica& a, const FreedReplica& b) {
              return std::pair(a.segment, a.instance) < std::pair(b.segment, b.instance);
            });
  return result;
}

absl::Status PrefixTree::SetNumInstances(int32_t num_instances) {
  if (num_instances < this->num_instances()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PrefixTree::SetNumInstances: cannot shrink from %d to %d instances (use DropInstance)",
        this->num_instances(), num_instances));
  }
  per_instance_.resize(static_cast<size_t>(num_instances));
  return absl::OkStatus();
}

// ---------------------------------------------------------------------------------------------
// Inspection

const PrefixTree::Node* PrefixTree::Find(SegmentId id) const {
  auto it = nodes_.find(id);
  return it == nodes_.end() ? nullptr : &it->second;
}

std::vector<SegmentId> PrefixTree::SubtreeDeepestFirst(SegmentId root) const {
  std::vector<SegmentId> out;
  if (!Contains(root)) return out;
  // Pre-order (every node before its descendants), reversed.
  std::vector<SegmentId> stack = {root};
  while (!stack.empty()) {
    const SegmentId cur = stack.back();
    stack.pop_back();
    out.push_back(cur);
    for (SegmentId c = nodes_.find(cur)->second.first_child; c.valid();
         c = nodes_.find(c)->second.next_sibling) {
      stack.push_back(c);
    }
  }
  std::reverse(out.begin(), out.end());
  return out;
}

void PrefixTree::ForEachNode(absl::FunctionRef<void(const Node&)> fn) const {
  for (const auto& [id, node] : nodes_) fn(node);
}

int64_t PrefixTree::SegmentsOn(InstanceId instance) const {
  if (!InstanceInRange(instance)) return 0;
  return per_instance_[instance.value()].num_replicas;
}

int64_t PrefixTree::TokensOn(InstanceId instance) const {
  if (!InstanceInRange(instance)) return 0;
  return per_instance_[instance.value()].num_tokens;
}

absl::Status PrefixTree::CheckIntegrity() const {
  absl::flat_hash_map<SegmentId, int32_t> children;
  std::vector<int64_t> per_instance(per_instance_.size(), 0);
  std::vector<int64_t> tokens_on(per_instance_.size(), 0);
  int64_t replicas = 0, tokens = 0, pinned = 0;
  absl::btree_set<LruKey> leaves;
  std::vector<absl::btree_set<LruKey>> extras(per_instance_.size());
  std::vector<absl::btree_set<LruKey>> last_copy(per_instance_.size());
  auto fail = [](const std::string& what) {
    return absl::InternalError("PrefixTree::CheckIntegrity: " + what);
  };
  for (const auto& [id, node] : nodes_) {
    if (node.id != id) return fail(Str(id) + " is stored under the key of another id");
    if (node.parent.valid()) {
      auto pit = nodes_.find(node.parent);
      if (pit == nodes_.end()) {
        return fail(Str(id) + " has parent " + Str(node.parent) + " which is not stored (I1)");
      }
      if (pit->second.num_tokens < options_.segment_tokens) {
        return fail(Str(id) + " is a child of part-segment " + Str(node.parent) + " (I3)");
      }
      if (node.depth != pit->second.depth + 1) return fail(Str(id) + " has a wrong depth (I2)");
      ++children[node.parent];
    } else if (node.depth != 0) {
      return fail(Str(id) + " is a root child with depth != 0 (I2)");
    }
    if (node.num_tokens < 1 || node.num_tokens > options_.segment_tokens) {
      return fail(Str(id) + " has an out-of-range num_tokens");
    }
    if (node.replicas.empty()) return fail(Str(id) + " has no replica (I4)");
    for (size_t i = 0; i < node.replicas.size(); ++i) {
      if (!InstanceInRange(node.replicas[i])) {
        return fail(Str(id) + " has a replica on out-of-range " + Str(node.replicas[i]) + " (I4)");
      }
      for (size_t j = 0; j < i; ++j) {
        if (node.replicas[i] == node.replicas[j]) {
          return fail(Str(id) + " has two replicas on " + Str(node.replicas[i]) + " (I4)");
        }
      }
      ++per_instance[node.replicas[i].value()];
      tokens_on[node.replicas[i].value()] += node.num_tokens;
    }
    if (node.pin_count < 0) return fail(Str(id) + " has a negative pin count (I7)");
    replicas += static_cast<int64_t>(node.replicas.size());
    tokens += node.num_tokens;
    if (node.is_pinned()) {
      ++pinned;
    } else {
      const LruKey key{node.last_access_us, id};
      if (node.is_leaf()) leaves.insert(key);
      if (node.replicas.size() >= 2) {
        for (InstanceId r : node.replicas) extras[r.value()].insert(key);
      } else if (node.is_leaf()) {
        last_copy[node.replicas[0].value()].insert(key);
      }
    }
  }
  for (const auto& [id, node] : nodes_) {
    auto cit = children.find(id);
    const int32_t expected = cit == children.end() ? 0 : cit->second;
    if (node.num_children != expected) {
      return fail(absl::StrFormat("%s records %d children but %d are stored (I2)", Str(id),
                                  node.num_children, expected));
    }
    // I8: the list holds num_children distinct nodes naming `id` as parent (distinct because
    // the walk is bounded by num_children + 1 and every link is checked both ways).
    int32_t listed = 0;
    SegmentId prev;
    for (SegmentId c = node.first_child; c.valid(); c = nodes_.find(c)->second.next_sibling) {
      auto child = nodes_.find(c);
      if (child == nodes_.end()) return fail(Str(id) + " lists a child that is not stored (I8)");
      if (child->second.parent != id) {
        return fail(Str(id) + " lists " + Str(c) + ", whose parent is another (I8)");
      }
      if (child->second.prev_sibling != prev) {
        return fail(Str(c) + " has a wrong prev_sibling (I8)");
      }
      prev = c;
      if (++listed > node.num_children) return fail(Str(id) + " lists too many children (I8)");
    }
    if (listed != node.num_children) return fail(Str(id) + " lists too few children (I8)");
    if (!node.parent.valid() && (node.prev_sibling.valid() || node.next_sibling.valid())) {
      return fail(Str(id) + " is a root child with sibling links (I8)");
    }
  }
  if (replicas != num_replicas_) return fail("num_replicas counter is wrong (I5)");
  if (tokens != num_tokens_) return fail("num_tokens counter is wrong");
  if (pinned != num_pinned_) return fail("num_pinned counter is wrong");
  for (size_t i = 0; i < per_instance_.size(); ++i) {
    if (per_instance[i] != per_instance_[i].num_replicas) {
      return fail(absl::StrFormat("SegmentsOn(%d) is %d but %d replicas are stored (I5)", i,
                                  per_instance_[i].num_replicas, per_instance[i]));
    }
    if (tokens_on[i] != per_instance_[i].num_tokens) {
      return fail(absl::StrFormat("TokensOn(%d) is %d but the replicas there hold %d (I5)", i,
                                  per_instance_[i].num_tokens, tokens_on[i]));
    }
    if (extras[i] != per_instance_[i].extras) {
      return fail(absl::StrFormat("the extra-replica index of instance %d is wrong (I6)", i));
    }
    if (last_copy[i] != per_instance_[i].last_copy) {
      return fail(absl::StrFormat("the last-copy index of instance %d is wrong (I6)", i));
    }
  }
  if (leaves != lru_leaves_) return fail("the global LRU leaf index is wrong (I6)");
  return absl::OkStatus();
}

}  // namespace tokenlake::index
