// PrefixTree: the cluster-wide prefix tree of cached segments (a trie whose edges are segments).
//
// Every stored segment is one node keyed by its chained SegmentId (see segment_id.h). A node
// records its parent, its length in tokens, its depth (segment index in its sequence), how many
// children it has, where its replicas live (distinct instances; one for ordinary segments,
// several for heavy hitters), how many running requests pin it, and its access statistics.
//
// What the tree answers:
//   - Match: how much of a request's chain is cached (a miss is a value: 0 segments).
//   - Insert / AddReplica / RemoveReplica: bookkeeping of where copies live.
//   - Pin / Unpin / Touch: protection and recency for running requests.
//   - Eviction order, cluster-wide: least-recently-used UNPINNED LEAVES first (a segment whose
//     descendants are cached is kept while they are), and per instance: extra replicas (nodes with
//     >= 2 replicas, interior or leaf) before last copies. Maintained incrementally, O(log n).
// Policy (heavy hitters, where to place or replicate) lives in the balancer, not here.
//
// Invariants (checked by CheckIntegrity()):
//   I1. Every stored node's parent is stored, or the node is a root child (parent invalid).
//   I2. num_children of every node equals the number of stored nodes naming it as parent;
//       depth = parent's depth + 1 (0 for root children).
//   I3. A part-segment (num_tokens < segment_tokens) has no children.
//   I4. Every node has >= 1 replica; its replicas are distinct, valid instances.
//   I5. SegmentsOn(x) = number of nodes with a replica on x; num_replicas() = their sum;
//       TokensOn(x) = the sum of those nodes' num_tokens.
//   I6. The global eviction index holds exactly the unpinned leaves, ordered by
//       (last_access_us, id); the per-instance indexes hold exactly the unpinned nodes with a
//       replica on x that are leaves with one replica (last copies) or have >= 2 replicas (extras).
//   I7. pin_count >= 0; a pinned node is never evicted nor erased by this class, except by
//       DropInstance (instance loss is not optional).
//   I8. A node's children list (first_child, then next_sibling) holds exactly the stored nodes
//       naming it as parent, each once, with prev_sibling the reverse link.
//
// Errors: every mutating call validates its input (unknown ids, instances out of range, bad
// lengths) and returns an absl::Status without changing anything; it never crashes on caller
// data. TOKENLAKE_CHECK guards internal invariants only.
//
// Thread-safety: NOT thread-safe. The lake serialises all access (one control-plane thread).
// Pointers returned by Find() are valid until the next mutating call.
#ifndef TOKENLAKE_INDEX_PREFIX_TREE_H_
#define TOKENLAKE_INDEX_PREFIX_TREE_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <optional>
#include <utility>
#include <vector>

#include "absl/container/btree_set.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/inlined_vector.h"
#include "absl/functional/function_ref.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/index/segment_id.h"

namespace tokenlake::index {

// The replicas of one segment: distinct instances, in the order they were added.
using ReplicaList = absl::InlinedVector<InstanceId, 2>;

// The result of matching a request's chain against the tree.
struct MatchResult {
  // Number of leading ids of the chain that are stored and form a path from the root.
  int32_t matched_segments = 0;
  // Sum of num_tokens over those segments (the cached prefix length, the request's hit).
  int64_t matched_tokens = 0;
  // The id of the last matched segment; invalid when matched_segments == 0. Use it as the
  // parent when inserting the rest of the chain.
  SegmentId last_segment;
};

struct InsertResult {
  // True when a new node was created (with `holder` as its only replica). False when the id was
  // already stored: nothing new is stored and NO replica is added (dedup); callers that want a
  // deliberate extra copy call AddReplica.
  bool inserted = false;
  // Depth of the node (segment index in its sequence, 0 for a root child).
  int32_t depth = 0;
};

// What Evict / RemoveReplica / eviction freed.
struct EvictResult {
  // The segment the call acted on.
  SegmentId segment;
  // True when the node itself was erased from the tree (its last replica went).
  bool node_erased = false;
  // The instances that freed a slot (one entry per dropped replica).
  ReplicaList freed_on;
};

// One freed (segment, instance) copy, reported by DropInstance.
struct FreedReplica {
  SegmentId segment;
  InstanceId instance;
};

struct DropInstanceResult {
  // Copies freed on OTHER instances because their segment lost an ancestor (the subtree under a
  // segment whose only copy was on the dropped instance is no longer reachable by Match).
  // Sorted by (segment, instance), so the result is deterministic.
  std::vector<FreedReplica> freed_elsewhere;
  // Number of nodes erased from the tree.
  int64_t erased_segments = 0;
  // Number of replicas the dropped instance held.
  int64_t dropped_replicas = 0;
  // Copies removed from pinned nodes: the dropped instance's, and every copy of an erased
  // pinned node (a lake that counts pinned copies subtracts this).
  int64_t dropped_pinned_replicas = 0;
};

class PrefixTree {
 public:
  struct Options {
    // Tokens per full segment (S). A node with fewer tokens is a part-segment (always a leaf).
    // Must be > 0.
    int32_t segment_tokens = 512;
    // Number of instances; valid InstanceIds are [0, num_instances). Must be > 0. Can grow later
    // with SetNumInstances.
    int32_t num_instances = 1;
    // Number of nodes to reserve space for up front (0 = grow on demand).
    int64_t reserve_segments = 0;
  };

  // One stored segment. Read-only to callers (obtained through Find / ForEachNode).
  struct Node {
    SegmentId id;
    SegmentId parent;  // invalid for a root child
    int32_t num_tokens = 0;
    int32_t depth = 0;  // 0 for a root child
    int32_t num_children = 0;
    int32_t pin_count = 0;
    ReplicaList replicas;
    int64_t last_access_us = 0;  // time of Insert or of the latest Touch
    int64_t access_count = 0;    // number of Touch calls naming this node
    // The children, as a list threaded through them (invalid ids end it), so that a subtree
    // is found without a pass over the tree. In unspecified order.
    SegmentId first_child;
    SegmentId next_sibling;
    SegmentId prev_sibling;

    bool is_leaf() const { return num_children == 0; }
    bool is_pinned() const { return pin_count > 0; }
    bool HasReplicaOn(InstanceId instance) const;
  };

  // Errors: InvalidArgument if segment_tokens <= 0, num_instances <= 0 or reserve_segments < 0.
  static absl::StatusOr<std::unique_ptr<PrefixTree>> Create(const Options& options);

  // Told of every replica the tree gains (`added`) or loses, by any call (Insert, AddReplica,
  // RemoveReplica, eviction, DropInstance), once per (segment, instance) and right after the
  // change: so that a caller can keep a view of where copies live without scanning the tree.
  // It runs inside the mutating call and must not call the tree.
  using ReplicaObserver = std::function<void(SegmentId segment, InstanceId instance, bool added)>;
  // Replaces the observer (empty: none).
  void SetReplicaObserver(ReplicaObserver observer) { observer_ = std::move(observer); }

  PrefixTree(const PrefixTree&) = delete;
  PrefixTree& operator=(const PrefixTree&) = delete;

  // ---- Matching (read-only) ----

  // Number of leading ids of `chain` that are stored and form a path from the root (chain[0] a
  // root child, chain[i]'s parent chain[i-1]), and their tokens. A miss is {0, 0, invalid}.
  // Does not change access statistics (call Touch for that). O(matched) hash probes.
  MatchResult Match(absl::Span<const SegmentId> chain) const;
  MatchResult Match(absl::Span<const SegmentKey> chain) const;

  // ---- Mutation ----

  // Stores `key` as a child of `parent` (invalid parent = child of the root) with `holder` as
  // its only replica and last access `now_us`. If key.id is already stored with the same parent
  // and length, nothing changes and {inserted = false} is returned (no replica is added).
  // Errors (nothing changed):
  //   InvalidArgument    key.id invalid; key.num_tokens not in [1, segment_tokens]; holder out of
  //                      range; key.id already stored with a different parent or length (a hash
  //                      collision or a caller bug; the message names both).
  //   NotFound           parent valid but not stored.
  //   FailedPrecondition parent is a part-segment (part-segments are leaves).
  absl::StatusOr<InsertResult> Insert(SegmentId parent, const SegmentKey& key, InstanceId holder,
                                      int64_t now_us);

  // Inserts the missing suffix of `chain` (a whole sequence from the root), each new node held
  // by `holder`. Returns the number of nodes created. Existing nodes are left as they are.
  // All-or-nothing: on error (as for Insert, for any element) nothing is changed.
  absl::StatusOr<int32_t> InsertChain(absl::Span<const SegmentKey> chain, InstanceId holder,
                                      int64_t now_us);

  // Adds a replica of `id` on `instance`.
  // Errors: NotFound (id not stored), InvalidArgument (instance out of range),
  //   AlreadyExists (instance already holds a replica).
  absl::Status AddReplica(SegmentId id, InstanceId instance);

  // Removes the replica of `id` on `instance`. Removing a non-last replica is always allowed (even
  // if pinned: a pin protects the segment, not a particular copy). Removing the last replica
  // erases the node, allowed only if it is an unpinned leaf.
  // Errors: NotFound (id not stored, or no replica on instance), InvalidArgument (instance out of
  //   range), FailedPrecondition (last replica of a pinned node or of an interior node).
  absl::StatusOr<EvictResult> RemoveReplica(SegmentId id, InstanceId instance);

  // Pins every id of `ids` once (duplicates pin twice). All-or-nothing.
  // Errors: NotFound naming the first unknown id (nothing pinned).
  absl::Status Pin(absl::Span<const SegmentId> ids);
  // Unpins every id of `ids` once. All-or-nothing.
  // Errors: NotFound (unknown id), FailedPrecondition (an id would be unpinned more times than it
  //   is pinned). Nothing is changed on error.
  absl::Status Unpin(absl::Span<const SegmentId> ids);

  // Records an access to every id of `ids` at `now_us` (last_access_us = now_us, access_count+1).
  // Unknown ids are skipped (an entry may have been evicted since it was matched); returns the
  // number of ids touched.
  int32_t Touch(absl::Span<const SegmentId> ids, int64_t now_us);

  // ---- Eviction ----

  // The least-recently-used unpinned leaf of the whole tree (ties by id), or nullopt if none.
  // O(1).
  std::optional<SegmentId> LruEvictableLeaf() const;
  // Up to n unpinned leaves in eviction order (LRU first). Only the current leaves: evicting them
  // may expose their parents as new leaves, which this snapshot does not contain.
  std::vector<SegmentId> EvictionCandidates(int32_t n) const;

  // Erases the unpinned leaf `id` and all its replicas. freed_on lists the instances that freed
  // a slot. Errors: NotFound (not stored), FailedPrecondition (pinned, or has children).
  absl::StatusOr<EvictResult> Evict(SegmentId id);

  // The best copy to drop to free a slot on `instance`: the LRU unpinned node with >= 2
  // replicas, one on `instance` (an extra copy; interior nodes qualify), if any; otherwise the
  // LRU unpinned leaf whose only replica is on `instance`. nullopt if neither exists or the
  // instance is out of range. O(log n).
  std::optional<SegmentId> EvictionCandidateOn(InstanceId instance) const;
  // The two halves of EvictionCandidateOn, for policies that want to choose themselves.
  std::optional<SegmentId> LruExtraReplicaOn(InstanceId instance) const;
  std::optional<SegmentId> LruLastCopyLeafOn(InstanceId instance) const;

  // Frees one slot on `instance`: drops the copy chosen by EvictionCandidateOn (RemoveReplica
  // semantics). Returns nullopt when nothing on the instance can be dropped.
  std::optional<EvictResult> EvictOneOn(InstanceId instance);

  // The instance is gone (failure or scale-in): drops all its replicas, erases the nodes left
  // without a replica and their whole subtrees (freeing their copies elsewhere), ignoring pins.
  // The number of instances is unchanged (the id may come back empty). O(num_segments).
  // Errors: InvalidArgument (instance out of range).
  absl::StatusOr<DropInstanceResult> DropInstance(InstanceId instance);

  // Grows the instance range to [0, num_instances).
  // Errors: InvalidArgument if num_instances < current num_instances().
  absl::Status SetNumInstances(int32_t num_instances);

  // ---- Inspection ----

  // The node of `id`, or nullptr. Valid until the next mutating call.
  const Node* Find(SegmentId id) const;
  bool Contains(SegmentId id) const { return Find(id) != nullptr; }
  // The ids of `root` and of every node under it, each after all of its descendants (so erasing
  // them in this order erases leaves only); empty if `root` is not stored. O(subtree size).
  std::vector<SegmentId> SubtreeDeepestFirst(SegmentId root) const;
  // Calls fn for every node, in unspecified order: the order may differ between processes (the
  // hash is seeded per process), so sort what you collect if you need determinism (the
  // simulator does). fn must not mutate the tree.
  void ForEachNode(absl::FunctionRef<void(const Node&)> fn) const;

  int64_t num_segments() const { return static_cast<int64_t>(nodes_.size()); }
  int64_t num_replicas() const { return num_replicas_; }
  // Sum of num_tokens over stored segments (distinct tokens cached, not counting replicas).
  int64_t num_tokens() const { return num_tokens_; }
  int64_t num_pinned() const { return num_pinned_; }
  int64_t num_evictable_leaves() const { return static_cast<int64_t>(lru_leaves_.size()); }
  // Number of replicas stored on `instance` (0 if out of range). O(1).
  int64_t SegmentsOn(InstanceId instance) const;
  // Sum of num_tokens over the segments with a replica on `instance` (0 if out of range). O(1).
  int64_t TokensOn(InstanceId instance) const;
  int32_t num_instances() const { return static_cast<int32_t>(per_instance_.size()); }
  int32_t segment_tokens() const { return options_.segment_tokens; }

  // Verifies invariants I1-I8 with a full scan. OK, or Internal naming the first violation.
  // O(n log n); meant for tests and debugging.
  absl::Status CheckIntegrity() const;

 private:
  using LruKey = std::pair<int64_t, SegmentId>;  // (last_access_us, id)
  struct PerInstance {
    int64_t num_replicas = 0;
    int64_t num_tokens = 0;
    absl::btree_set<LruKey> extras;     // unpinned nodes with >= 2 replicas, one here
    absl::btree_set<LruKey> last_copy;  // unpinned leaves whose only replica is here
  };

  explicit PrefixTree(const Options& options);

  bool InstanceInRange(InstanceId instance) const {
    return instance.valid() && instance.value() >= 0 &&
           instance.value() < static_cast<int32_t>(per_instance_.size());
  }
  // Removes / adds `node` from / to every eviction index it belongs to, given its current state.
  void Unindex(const Node& node);
  void Index(const Node& node);
  // Erases a node with no children (ignoring pins), releasing all its replicas from the
  // counters, and updates the parent (re-indexing it).
  void EraseLeafNode(SegmentId id);
  // Counts a replica of `node` that `instance` gained / lost and tells the observer.
  void CountAdded(const Node& node, InstanceId instance);
  void CountRemoved(const Node& node, InstanceId instance);

  Options options_;
  absl::flat_hash_map<SegmentId, Node> nodes_;
  absl::btree_set<LruKey> lru_leaves_;  // unpinned leaves
  std::vector<PerInstance> per_instance_;
  int64_t num_replicas_ = 0;
  int64_t num_tokens_ = 0;
  int64_t num_pinned_ = 0;
  ReplicaObserver observer_;
};

}  // namespace tokenlake::index

#endif  // TOKENLAKE_INDEX_PREFIX_TREE_H_
