#include "tokenlake/index/prefix_tree.h"

#include <algorithm>
#include <iostream>
#include <map>
#include <set>
#include <string>
#include <tuple>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/random.h"
#include "tokenlake/base/random_testing.h"
#include "tokenlake/index/segment_id.h"

namespace tokenlake::index {
namespace {

using ::testing::ElementsAre;
using ::testing::HasSubstr;
using ::testing::UnorderedElementsAre;

constexpr int32_t kS = 4;  // segment size used by the unit tests

std::unique_ptr<PrefixTree> MakeTree(int32_t num_instances = 4, int32_t segment_tokens = kS) {
  auto tree =
      PrefixTree::Create({.segment_tokens = segment_tokens, .num_instances = num_instances});
  EXPECT_TRUE(tree.ok()) << tree.status();
  return *std::move(tree);
}

SegmentKey Full(uint64_t id) { return SegmentKey{SegmentId(id), kS}; }
SegmentId Id(uint64_t id) { return SegmentId(id); }
InstanceId Inst(int32_t i) { return InstanceId(i); }

// Inserts the chain 1 -> 2 -> ... -> n (ids 1..n) held on instance `holder`.
void InsertPath(PrefixTree& tree, uint64_t first, int n, int32_t holder, int64_t now = 0) {
  SegmentId parent;
  for (int i = 0; i < n; ++i) {
    auto r = tree.Insert(parent, Full(first + i), Inst(holder), now);
    ASSERT_TRUE(r.ok()) << r.status();
    parent = Id(first + i);
  }
}

// ---------------------------------------------------------------------------------------------
// Creation and bad input

TEST(PrefixTreeTest, CreateRejectsBadOptions) {
  auto a = PrefixTree::Create({.segment_tokens = 0, .num_instances = 1});
  EXPECT_EQ(a.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(a.status().message(), HasSubstr("segment_tokens"));
  auto b = PrefixTree::Create({.segment_tokens = 16, .num_instances = 0});
  EXPECT_EQ(b.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(b.status().message(), HasSubstr("num_instances"));
  auto c = PrefixTree::Create({.segment_tokens = 16, .num_instances = 1, .reserve_segments = -1});
  EXPECT_EQ(c.status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PrefixTreeTest, InsertRejectsBadInputWithoutChangingAnything) {
  auto tree = MakeTree(2);
  InsertPath(*tree, 1, 2, 0);
  // Unknown parent.
  auto r = tree->Insert(Id(99), Full(10), Inst(0), 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(r.status().message(), HasSubstr("99"));
  // Holder out of range (and invalid).
  EXPECT_EQ(tree->Insert(Id(2), Full(10), Inst(2), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tree->Insert(Id(2), Full(10), InstanceId(), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tree->Insert(Id(2), Full(10), Inst(-1), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Bad lengths.
  EXPECT_EQ(tree->Insert(Id(2), SegmentKey{Id(10), 0}, Inst(0), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tree->Insert(Id(2), SegmentKey{Id(10), kS + 1}, Inst(0), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Invalid id.
  EXPECT_EQ(tree->Insert(Id(2), SegmentKey{SegmentId(), kS}, Inst(0), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Existing id under another parent (collision / bug).
  auto c = tree->Insert(Id(1), Full(2), Inst(0), 0);
  ASSERT_TRUE(c.ok());  // same parent: dedup
  auto d = tree->Insert(SegmentId(), Full(2), Inst(0), 0);
  EXPECT_EQ(d.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(d.status().message(), HasSubstr("already stored"));
  EXPECT_EQ(tree->num_segments(), 2);
  EXPECT_EQ(tree->num_replicas(), 2);
  EXPECT_TRUE(tree->CheckIntegrity().ok());
}

TEST(PrefixTreeTest, ChildOfPartSegmentIsRejected) {
  auto tree = MakeTree();
  ASSERT_TRUE(tree->Insert(SegmentId(), SegmentKey{Id(1), kS - 1}, Inst(0), 0).ok());
  auto r = tree->Insert(Id(1), Full(2), Inst(0), 0);
  EXPECT_EQ(r.status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_THAT(r.status().message(), HasSubstr("part-segment"));
  EXPECT_EQ(tree->num_segments(), 1);
}

TEST(PrefixTreeTest, InsertOfExistingIdStoresNothingAndAddsNoReplica) {
  auto tree = MakeTree();
  auto a = tree->Insert(SegmentId(), Full(1), Inst(0), 5);
  ASSERT_TRUE(a.ok());
  EXPECT_TRUE(a->inserted);
  auto b = tree->Insert(SegmentId(), Full(1), Inst(3), 9);
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->inserted);
  EXPECT_EQ(tree->num_segments(), 1);
  EXPECT_EQ(tree->num_replicas(), 1);
  EXPECT_EQ(tree->SegmentsOn(Inst(3)), 0);
  EXPECT_THAT(tree->Find(Id(1))->replicas, ElementsAre(Inst(0)));
  EXPECT_EQ(tree->Find(Id(1))->last_access_us, 5);
}

TEST(PrefixTreeTest, NodeRecordsParentDepthChildrenAndTokens) {
  auto tree = MakeTree();
  InsertPath(*tree, 1, 3, 1);
  ASSERT_TRUE(tree->Insert(Id(1), SegmentKey{Id(7), 2}, Inst(2), 0).ok());
  const auto* n1 = tree->Find(Id(1));
  ASSERT_NE(n1, nullptr);
  EXPECT_FALSE(n1->parent.valid());
  EXPECT_EQ(n1->depth, 0);
  EXPECT_EQ(n1->num_children, 2);
  const auto* n3 = tree->Find(Id(3));
  EXPECT_EQ(n3->parent, Id(2));
  EXPECT_EQ(n3->depth, 2);
  EXPECT_TRUE(n3->is_leaf());
  EXPECT_EQ(tree->Find(Id(7))->num_tokens, 2);
  EXPECT_EQ(tree->num_tokens(), 3 * kS + 2);
  EXPECT_EQ(tree->Find(Id(42)), nullptr);
  EXPECT_TRUE(tree->CheckIntegrity().ok());
}

// ---------------------------------------------------------------------------------------------
// Match

TEST(PrefixTreeTest, MatchCountsLeadingStoredPathAndMissIsZero) {
  auto tree = MakeTree();
  InsertPath(*tree, 1, 3, 0);
  const std::vector<SegmentId> chain = {Id(1), Id(2), Id(3), Id(4), Id(5)};
  MatchResult m = tree->Match(chain);
  EXPECT_EQ(m.matched_segments, 3);
  EXPECT_EQ(m.matched_tokens, 3 * kS);
  EXPECT_EQ(m.last_segment, Id(3));
  MatchResult miss = tree->Match(std::vector<SegmentId>{Id(9), Id(1)});
  EXPECT_EQ(miss.matched_segments, 0);
  EXPECT_EQ(miss.matched_tokens, 0);
  EXPECT_FALSE(miss.last_segment.valid());
  EXPECT_EQ(tree->Match(absl::Span<const SegmentId>()).matched_segments, 0);
}

TEST(PrefixTreeTest, MatchStopsWhenStoredIdsDoNotFormAPathFromTheRoot) {
  auto tree = MakeTree();
  InsertPath(*tree, 1, 3, 0);
  // 2 is stored but is not a root child; 1 -> 3 skips 2.
  EXPECT_EQ(tree->Match(std::vector<SegmentId>{Id(2), Id(3)}).matched_segments, 0);
  EXPECT_EQ(tree->Match(std::vector<SegmentId>{Id(1), Id(3)}).matched_segments, 1);
}

TEST(PrefixTreeTest, MatchOverKeysCountsPartSegmentTokens) {
  auto tree = MakeTree();
  auto keys =
      ComputeSegmentKeys(NamespaceSalt("m"), std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9}, kS);
  ASSERT_TRUE(keys.ok());
  auto created = tree->InsertChain(*keys, Inst(0), 0);
  ASSERT_TRUE(created.ok()) << created.status();
  EXPECT_EQ(*created, 3);
  MatchResult m = tree->Match(absl::Span<const SegmentKey>(*keys));
  EXPECT_EQ(m.matched_segments, 3);
  EXPECT_EQ(m.matched_tokens, 9);
  // Extending the sequence: the part-segment's id is not a prefix of the longer chain.
  auto longer = ComputeSegmentKeys(NamespaceSalt("m"),
                                   std::vector<int32_t>{1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}, kS);
  ASSERT_TRUE(longer.ok());
  EXPECT_EQ(tree->Match(absl::Span<const SegmentKey>(*longer)).matched_tokens, 8);
}

TEST(PrefixTreeTest, InsertChainInsertsOnlyTheMissingSuffixAndIsAllOrNothing) {
  auto tree = MakeTree();
  InsertPath(*tree, 1, 2, 0);
  std::vector<SegmentKey> chain = {Full(1), Full(2), Full(3), Full(4)};
  auto created = tree->InsertChain(chain, Inst(1), 7);
  ASSERT_TRUE(created.ok());
  EXPECT_EQ(*created, 2);
  EXPECT_THAT(tree->Find(Id(1))->replicas, ElementsAre(Inst(0)));
  EXPECT_THAT(tree->Find(Id(4))->replicas, ElementsAre(Inst(1)));
  // A part-segment in the middle, a duplicate id, a bad holder: rejected, nothing changed.
  std::vector<SegmentKey> bad1 = {Full(1), SegmentKey{Id(10), 1}, Full(11)};
  EXPECT_EQ(tree->InsertChain(bad1, Inst(0), 0).status().code(),
            absl::StatusCode::kFailedPrecondition);
  std::vector<SegmentKey> bad2 = {Full(1), Full(20), Full(21), Full(20)};
  EXPECT_EQ(tree->InsertChain(bad2, Inst(0), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tree->InsertChain(chain, Inst(9), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  std::vector<SegmentKey> bad3 = {Full(30), Full(3)};  // 3 exists under another parent
  EXPECT_EQ(tree->InsertChain(bad3, Inst(0), 0).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tree->num_segments(), 4);
  EXPECT_TRUE(tree->CheckIntegrity().ok());
}

// ---------------------------------------------------------------------------------------------
// Replicas

TEST(PrefixTreeTest, ReplicasAreDistinctAndCountedPerInstance) {
  auto tree = MakeTree(3);
  InsertPath(*tree, 1, 2, 0);
  ASSERT_TRUE(tree->AddReplica(Id(1), Inst(2)).ok());
  EXPECT_EQ(tree->AddReplica(Id(1), Inst(2)).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_EQ(tree->AddReplica(Id(1), Inst(3)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(tree->AddReplica(Id(9), Inst(1)).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(tree->SegmentsOn(Inst(0)), 2);
  EXPECT_EQ(tree->SegmentsOn(Inst(2)), 1);
  EXPECT_EQ(tree->SegmentsOn(Inst(1)), 0);
  EXPECT_EQ(tree->SegmentsOn(Inst(7)), 0);
  EXPECT_EQ(tree->num_replicas(), 3);
  EXPECT_TRUE(tree->CheckIntegrity().ok());
}

TEST(PrefixTreeTest, RemovingLastReplicaErasesOnlyUnpinnedLeaves) {
  auto tree = MakeTree(2);
  InsertPath(*tree, 1, 2, 0);
  // Interior node: last replica cannot go.
  auto a = tree->RemoveReplica(Id(1), Inst(0));
  EXPECT_EQ(a.status().code(), absl::StatusCode::kFailedPrecondition);
  // Pinned leaf: neither.
  ASSERT_TRUE(tree->Pin(std::vector<SegmentId>{Id(2)}).ok());
  EXPECT_EQ(tree->RemoveReplica(Id(2), Inst(0)).status().code(),
            absl::StatusCode::kFailedPrecondition);
  // A non-last replica of a pinned node may go.
  ASSERT_TRUE(tree->AddReplica(Id(2), Inst(1)).ok());
  auto b = tree->RemoveReplica(Id(2), Inst(1));
  ASSERT_TRUE(b.ok());
  EXPECT_FALSE(b->node_erased);
  EXPECT_THAT(b->freed_on, ElementsAre(Inst(1)));
  ASSERT_TRUE(tree->Unpin(std::vector<SegmentId>{Id(2)}).ok());
  auto c = tree->RemoveReplica(Id(2), Inst(0));
  ASSERT_TRUE(c.ok());
  EXPECT_TRUE(c->node_erased);
  EXPECT_EQ(tree->Find(Id(2)), nullptr);
  EXPECT_TRUE(tree->Find(Id(1))->is_leaf());
  // Unknown replica / id / instance.
  EXPECT_EQ(tree->RemoveReplica(Id(1), Inst(1)).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(tree->RemoveReplica(Id(5), Inst(1)).status().code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(tree->RemoveReplica(Id(1), Inst(5)).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(tree->CheckIntegrity().ok());
}

// ---------------------------------------------------------------------------------------------
// Pins

TEST(PrefixTreeTest, PinIsAllOrNothingOnUnknownIds) {
  auto tree = MakeTree();
  InsertPath(*tree, 1, 2, 0);
  auto s = tree->Pin(std::vector<SegmentId>{Id(1), Id(9), Id(2)});
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(s.message(), HasSubstr("9"));
  EXPECT_EQ(tree->Find(Id(1))->pin_count, 0);
  EXPECT_EQ(tree->num_pinned(), 0);
}

TEST(PrefixTreeTest, UnpinOfUnpinnedIsAnErrorAndChangesNothing) {
  auto tree = MakeTree();
  InsertPath(*tree, 1, 3, 0);
  ASSERT_TRUE(tree->Pin(std::vector<SegmentId>{Id(1), Id(2), Id(2)}).ok());
  EXPECT_EQ(tree->Find(Id(2))->pin_count, 2);
  // 3 was never pinned.
  EXPECT_EQ(tree->Unpin(std::vector<SegmentId>{Id(1), Id(3)}).code(),
            absl::StatusCode::kFailedPrecondition);
  // 1 is pinned once but unpinned twice.
  EXPECT_EQ(tree->Unpin(std::vector<SegmentId>{Id(1), Id(1)}).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(tree->Unpin(std::vector<SegmentId>{Id(8)}).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ(tree->Find(Id(1))->pin_count, 1);
  EXPECT_EQ(tree->Find(Id(2))->pin_count, 2);
  EXPECT_EQ(tree->num_pinned(), 2);
  EXPECT_TRUE(tree->CheckIntegrity().ok());
  ASSERT_TRUE(tree->Unpin(std::vector<SegmentId>{Id(2), Id(1), Id(2)}).ok());
  EXPECT_EQ(tree->num_pinned(), 0);
  EXPECT_TRUE(tree->CheckIntegrity().ok());
}

TEST(PrefixTreeTest, PinnedLeafIsNeverEvicted) {
  auto tree = MakeTree();
  InsertPath(*tree, 1, 2, 0, /*now=*/1);
  ASSERT_TRUE(tree->Pin(std::vector<SegmentId>{Id(2)}).ok());
  EXPECT_EQ(tree->LruEvictableLeaf(), std::nullopt);  // 1 is interior, 2 pinned
  EXPECT_EQ(tree->Evict(Id(2)).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(tree->EvictOneOn(Inst(0)), std::nullopt);
  EXPECT_NE(tree->Find(Id(2)), nullptr);
}

// ---------------------------------------------------------------------------------------------
// Eviction order

TEST(PrefixTreeTest, EvictsLeastRecentlyUsedLeafFirst) {
  auto tree = MakeTree();
  // Two branches under root: 1 -> 2 (time 10), 3 -> 4 (time 20); then touch 2 at 30.
  InsertPath(*tree, 1, 2, 0, 10);
  InsertPath(*tree, 3, 2, 0, 20);
  EXPECT_EQ(tree->LruEvictableLeaf(), Id(2));
  EXPECT_EQ(tree->Touch(std::vector<SegmentId>{Id(2), Id(77)}, 30), 1);
  EXPECT_EQ(tree->Find(Id(2))->access_count, 1);
  EXPECT_EQ(tree->Find(Id(2))->last_access_us, 30);
  EXPECT_THAT(tree->EvictionCandidates(10), ElementsAre(Id(4), Id(2)));
  auto e = tree->Evict(Id(4));
  ASSERT_TRUE(e.ok());
  EXPECT_TRUE(e->node_erased);
  EXPECT_THAT(e->freed_on, ElementsAre(Inst(0)));
  // 3 became a leaf (time 20) and is now older than 2 (time 30).
  EXPECT_EQ(tree->LruEvictableLeaf(), Id(3));
  // An interior node is not evictable.
  EXPECT_EQ(tree->Evict(Id(1)).status().code(), absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(tree->Evict(Id(99)).status().code(), absl::StatusCode::kNotFound);
  EXPECT_TRUE(tree->CheckIntegrity().ok());
}

TEST(PrefixTreeTest, EvictReportsEveryInstanceThatFreedASlot) {
  auto tree = MakeTree(3);
  InsertPath(*tree, 1, 1, 0);
  ASSERT_TRUE(tree->AddReplica(Id(1), Inst(2)).ok());
  auto e = tree->Evict(Id(1));
  ASSERT_TRUE(e.ok());
  EXPECT_THAT(e->freed_on, UnorderedElementsAre(Inst(0), Inst(2)));
  EXPECT_EQ(tree->num_replicas(), 0);
  EXPECT_EQ(tree->SegmentsOn(Inst(2)), 0);
}

TEST(PrefixTreeTest, PerInstanceEvictionDropsExtraReplicasBeforeLastCopies) {
  auto tree = MakeTree(2);
  InsertPath(*tree, 1, 2, 0, 100);                     // 1 -> 2 on instance 0
  InsertPath(*tree, 5, 1, 0, 10);                      // 5 on instance 0, older
  ASSERT_TRUE(tree->AddReplica(Id(1), Inst(1)).ok());  // interior extra replica
  EXPECT_EQ(tree->LruExtraReplicaOn(Inst(0)), Id(1));
  EXPECT_EQ(tree->LruLastCopyLeafOn(Inst(0)), Id(5));
  EXPECT_EQ(tree->EvictionCandidateOn(Inst(0)), Id(1));
  auto e = tree->EvictOneOn(Inst(0));
  ASSERT_TRUE(e.has_value());
  EXPECT_EQ(e->segment, Id(1));
  EXPECT_FALSE(e->node_erased);
  EXPECT_THAT(tree->Find(Id(1))->replicas, ElementsAre(Inst(1)));
  // Now only last copies: the LRU leaf on instance 0 is 5.
  EXPECT_EQ(tree->EvictionCandidateOn(Inst(0)), Id(5));
  // Instance 1 holds only interior node 1: nothing to drop there.
  EXPECT_EQ(tree->EvictionCandidateOn(Inst(1)), std::nullopt);
  EXPECT_EQ(tree->EvictionCandidateOn(Inst(9)), std::nullopt);
  EXPECT_TRUE(tree->CheckIntegrity().ok());
}

TEST(PrefixTreeTest, DropInstanceErasesLostSegmentsAndTheirSubtrees) {
  auto tree = MakeTree(3);
  // 1 -> 2 -> 3, with 1 on {0, 1}, 2 on {1} only, 3 on {0}. Dropping 1 loses 2 and so 3.
  ASSERT_TRUE(tree->Insert(SegmentId(), Full(1), Inst(0), 0).ok());
  ASSERT_TRUE(tree->AddReplica(Id(1), Inst(1)).ok());
  ASSERT_TRUE(tree->Insert(Id(1), Full(2), Inst(1), 0).ok());
  ASSERT_TRUE(tree->Insert(Id(2), Full(3), Inst(0), 0).ok());
  ASSERT_TRUE(tree->Insert(SegmentId(), Full(4), Inst(2), 0).ok());
  ASSERT_TRUE(tree->Pin(std::vector<SegmentId>{Id(3)}).ok());
  auto r = tree->DropInstance(Inst(1));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->dropped_replicas, 2);
  EXPECT_EQ(r->erased_segments, 2);
  ASSERT_EQ(r->freed_elsewhere.size(), 1u);
  EXPECT_EQ(r->freed_elsewhere[0].segment, Id(3));
  EXPECT_EQ(r->freed_elsewhere[0].instance, Inst(0));
  EXPECT_EQ(tree->num_segments(), 2);
  EXPECT_EQ(tree->SegmentsOn(Inst(1)), 0);
  EXPECT_EQ(tree->SegmentsOn(Inst(0)), 1);
  EXPECT_EQ(tree->num_pinned(), 0);
  EXPECT_TRUE(tree->CheckIntegrity().ok());
  EXPECT_EQ(tree->DropInstance(Inst(3)).status().code(), absl::StatusCode::kInvalidArgument);
}

TEST(PrefixTreeTest, SetNumInstancesGrowsOnly) {
  auto tree = MakeTree(2);
  EXPECT_EQ(tree->AddReplica(Id(1), Inst(3)).code(), absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE(tree->SetNumInstances(4).ok());
  InsertPath(*tree, 1, 1, 3);
  EXPECT_EQ(tree->SegmentsOn(Inst(3)), 1);
  EXPECT_EQ(tree->SetNumInstances(3).code(), absl::StatusCode::kInvalidArgument);
}

// ---------------------------------------------------------------------------------------------
// Randomised model test: the tree against a naive std::map reference, plus per-instance slot
// accounting driven only by what the tree reports (inserted / freed_on / DropInstance).

struct RefNode {
  SegmentId parent;
  int32_t num_tokens = 0;
  int32_t depth = 0;
  std::set<int32_t> replicas;
  int32_t pins = 0;
  int64_t last = 0;
  int64_t count = 0;
};

class RefTree {
 public:
  RefTree(int32_t s, int32_t n) : s_(s), n_(n) {}
  std::map<SegmentId, RefNode> nodes;

  int32_t Children(SegmentId id) const {
    int32_t c = 0;
    for (const auto& [k, v] : nodes) c += (v.parent == id);
    return c;
  }
  bool Leaf(SegmentId id) const { return Children(id) == 0; }
  int64_t On(int32_t x) const {
    int64_t c = 0;
    for (const auto& [k, v] : nodes) c += v.replicas.count(x);
    return c;
  }
  int32_t Match(const std::vector<SegmentKey>& chain) const {
    SegmentId parent;
    int32_t m = 0;
    for (const SegmentKey& k : chain) {
      auto it = nodes.find(k.id);
      if (it == nodes.end() || it->second.parent != parent) break;
      ++m;
      parent = k.id;
    }
    return m;
  }
  // (last, id) minimum over nodes satisfying pred.
  template <typename Pred>
  std::optional<SegmentId> MinLru(Pred pred) const {
    std::optional<std::pair<int64_t, SegmentId>> best;
    for (const auto& [id, v] : nodes) {
      if (!pred(id, v)) continue;
      std::pair<int64_t, SegmentId> key{v.last, id};
      if (!best || key < *best) best = key;
    }
    if (!best) return std::nullopt;
    return best->second;
  }
  std::optional<SegmentId> LruLeaf() const {
    return MinLru([&](SegmentId id, const RefNode& v) { return v.pins == 0 && Leaf(id); });
  }
  std::optional<SegmentId> Extra(int32_t x) const {
    return MinLru([&](SegmentId, const RefNode& v) {
      return v.pins == 0 && v.replicas.size() >= 2 && v.replicas.count(x);
    });
  }
  std::optional<SegmentId> LastCopy(int32_t x) const {
    return MinLru([&](SegmentId id, const RefNode& v) {
      return v.pins == 0 && v.replicas.size() == 1 && v.replicas.count(x) && Leaf(id);
    });
  }
  // Predicted status code of Insert(parent, key, holder).
  absl::StatusCode InsertCode(SegmentId parent, const SegmentKey& key, int32_t holder) const {
    if (!key.id.valid() || key.num_tokens < 1 || key.num_tokens > s_) {
      return absl::StatusCode::kInvalidArgument;
    }
    if (holder < 0 || holder >= n_) return absl::StatusCode::kInvalidArgument;
    if (auto it = nodes.find(key.id); it != nodes.end()) {
      return (it->second.parent == parent && it->second.num_tokens == key.num_tokens)
                 ? absl::StatusCode::kOk
                 : absl::StatusCode::kInvalidArgument;
    }
    if (parent.valid()) {
      auto it = nodes.find(parent);
      if (it == nodes.end()) return absl::StatusCode::kNotFound;
      if (it->second.num_tokens < s_) return absl::StatusCode::kFailedPrecondition;
    }
    return absl::StatusCode::kOk;
  }
  void DoInsert(SegmentId parent, const SegmentKey& key, int32_t holder, int64_t now) {
    if (nodes.count(key.id)) return;
    RefNode n;
    n.parent = parent;
    n.num_tokens = key.num_tokens;
    n.depth = parent.valid() ? nodes.at(parent).depth + 1 : 0;
    n.replicas = {holder};
    n.last = now;
    nodes[key.id] = n;
  }

 private:
  int32_t s_, n_;
};

struct ModelParams {
  int32_t num_instances;
  int32_t segment_tokens;
  int32_t capacity_per_instance;
  uint64_t seed;
};

class PrefixTreeModelTest : public ::testing::TestWithParam<ModelParams> {};

TEST_P(PrefixTreeModelTest, RandomOperationsMatchReferenceModel) {
  ModelParams p = GetParam();
  // TOKENLAKE_TEST_SEED=<n> replays or explores other seeds with the same sizes.
  p.seed = TestSeed(p.seed);
  SCOPED_TRACE(::testing::Message() << "seed=" << p.seed << " instances=" << p.num_instances
                                    << " S=" << p.segment_tokens);
  Rng rng(p.seed);
  const int32_t n = p.num_instances, s = p.segment_tokens;
  auto created = PrefixTree::Create({.segment_tokens = s, .num_instances = n});
  ASSERT_TRUE(created.ok());
  PrefixTree& tree = **created;
  // Where copies live as the observer tells it (each change once: no gain of a copy held, no
  // loss of one not held).
  std::set<std::pair<SegmentId, int32_t>> observed;
  bool observer_ok = true;
  tree.SetReplicaObserver([&](SegmentId seg, InstanceId x, bool added) {
    observer_ok &=
        added ? observed.insert({seg, x.value()}).second : observed.erase({seg, x.value()}) == 1;
  });
  RefTree ref(s, n);
  std::vector<int64_t> used(static_cast<size_t>(n), 0);  // slots in use, from tree reports
  std::vector<std::vector<SegmentId>> pin_sets;          // pins held by fake requests
  std::vector<std::vector<SegmentKey>> seqs;             // sequences seen so far
  const uint64_t salt = NamespaceSalt("model");
  int64_t now = 0;

  auto free_slots = [&](const EvictResult& e) {
    for (InstanceId x : e.freed_on) --used[x.value()];
  };
  auto ref_remove = [&](SegmentId id, int32_t x) {
    RefNode& v = ref.nodes.at(id);
    v.replicas.erase(x);
    if (v.replicas.empty()) ref.nodes.erase(id);
  };
  // Sequences are generated from a per-family token stream so that prefixes are shared.
  std::vector<std::vector<int32_t>> families;
  auto make_seq = [&]() {
    if (families.empty() || rng.Bernoulli(0.2)) {
      std::vector<int32_t> f(static_cast<size_t>(8 * s));
      for (auto& t : f) t = static_cast<int32_t>(rng.UniformInt(0, 1));
      families.push_back(f);
    }
    const auto& f = families[rng.UniformInt(0, families.size() - 1)];
    std::vector<int32_t> tokens(f.begin(), f.begin() + rng.UniformInt(1, f.size()));
    if (rng.Bernoulli(0.3)) tokens.push_back(static_cast<int32_t>(rng.UniformInt(2, 3)));
    auto keys = ComputeSegmentKeys(salt, tokens, s);
    TOKENLAKE_CHECK_OK(keys.status());
    return *keys;
  };
  auto random_known_id = [&]() -> SegmentId {
    if (ref.nodes.empty() || rng.Bernoulli(0.1)) return SegmentId(rng.Next64() >> 1);
    auto it = ref.nodes.begin();
    std::advance(it, rng.UniformInt(0, ref.nodes.size() - 1));
    return it->first;
  };
  auto random_instance = [&]() -> int32_t {
    return rng.Bernoulli(0.05) ? static_cast<int32_t>(rng.UniformInt(-1, n + 1))
                               : static_cast<int32_t>(rng.UniformInt(0, n - 1));
  };

  // How often each kind of operation succeeded, printed so that a run that exercises nothing shows.
  std::map<std::string, int> done;
  int64_t max_segments = 0, max_replicated = 0;
  const int kSteps = 1200;
  for (int step = 0; step < kSteps; ++step) {
    SCOPED_TRACE(::testing::Message() << "step=" << step);
    now += rng.UniformInt(0, 2);
    const int64_t op = rng.UniformInt(0, 99);
    if (op < 25) {
      // A request's prompt: make room on the holder, then insert the missing suffix.
      std::vector<SegmentKey> seq = make_seq();
      seqs.push_back(seq);
      const int32_t holder = static_cast<int32_t>(rng.UniformInt(0, n - 1));
      while (true) {
        const int64_t needed = static_cast<int64_t>(seq.size()) - ref.Match(seq);
        if (used[holder] + needed <= p.capacity_per_instance) break;
        const auto expect = ref.Extra(holder) ? ref.Extra(holder) : ref.LastCopy(holder);
        auto e = tree.EvictOneOn(InstanceId(holder));
        ASSERT_EQ(e.has_value(), expect.has_value());
        if (!e) break;
        ASSERT_EQ(e->segment, *expect);
        ASSERT_THAT(e->freed_on, ElementsAre(InstanceId(holder)));
        ASSERT_EQ(e->node_erased, ref.nodes.at(*expect).replicas.size() == 1);
        ++done[e->node_erased ? "evict_on_last_copy" : "evict_on_extra"];
        ref_remove(*expect, holder);
        free_slots(*e);
      }
      const int64_t needed = static_cast<int64_t>(seq.size()) - ref.Match(seq);
      if (used[holder] + needed > p.capacity_per_instance) continue;  // full of pinned data
      auto r = tree.InsertChain(seq, InstanceId(holder), now);
      ASSERT_TRUE(r.ok()) << r.status();
      ASSERT_EQ(*r, needed);
      for (size_t i = 0; i < seq.size(); ++i) {
        ref.DoInsert(i == 0 ? SegmentId() : seq[i - 1].id, seq[i], holder, now);
      }
      used[holder] += *r;
      ++done["insert_chain"];
    } else if (op < 35) {
      // A single Insert, possibly with a missing parent or a bad holder / length.
      if (seqs.empty()) continue;
      const auto& seq = seqs[rng.UniformInt(0, seqs.size() - 1)];
      const size_t i = static_cast<size_t>(rng.UniformInt(0, seq.size() - 1));
      const SegmentId parent = i == 0 ? SegmentId() : seq[i - 1].id;
      SegmentKey key = seq[i];
      if (rng.Bernoulli(0.05)) key.num_tokens = rng.Bernoulli(0.5) ? 0 : s + 1;
      const int32_t holder = random_instance();
      const absl::StatusCode expect = ref.InsertCode(parent, key, holder);
      const bool fresh = !ref.nodes.count(key.id);
      if (expect == absl::StatusCode::kOk && fresh && used[holder] >= p.capacity_per_instance) {
        continue;  // the harness would have to evict first
      }
      auto r = tree.Insert(parent, key, InstanceId(holder), now);
      ASSERT_EQ(r.status().code(), expect) << r.status();
      if (r.ok()) {
        ASSERT_EQ(r->inserted, fresh);
        if (fresh) {
          ref.DoInsert(parent, key, holder, now);
          ++used[holder];
        }
      }
    } else if (op < 45) {
      // Replicate.
      const SegmentId id = random_known_id();
      const int32_t x = random_instance();
      absl::StatusCode expect = absl::StatusCode::kOk;
      if (x < 0 || x >= n) {
        expect = absl::StatusCode::kInvalidArgument;
      } else if (!ref.nodes.count(id)) {
        expect = absl::StatusCode::kNotFound;
      } else if (ref.nodes.at(id).replicas.count(x)) {
        expect = absl::StatusCode::kAlreadyExists;
      } else if (used[x] >= p.capacity_per_instance) {
        continue;
      }
      ASSERT_EQ(tree.AddReplica(id, InstanceId(x)).code(), expect);
      if (expect == absl::StatusCode::kOk) {
        ref.nodes.at(id).replicas.insert(x);
        ++used[x];
        ++done["add_replica"];
      }
    } else if (op < 52) {
      // Drop one replica explicitly.
      const SegmentId id = random_known_id();
      int32_t x = random_instance();
      if (ref.nodes.count(id) && rng.Bernoulli(0.8)) {
        const auto& reps = ref.nodes.at(id).replicas;
        auto it = reps.begin();
        std::advance(it, rng.UniformInt(0, reps.size() - 1));
        x = *it;
      }
      absl::StatusCode expect = absl::StatusCode::kOk;
      if (x < 0 || x >= n) {
        expect = absl::StatusCode::kInvalidArgument;
      } else if (!ref.nodes.count(id) || !ref.nodes.at(id).replicas.count(x)) {
        expect = absl::StatusCode::kNotFound;
      } else if (ref.nodes.at(id).replicas.size() == 1 &&
                 (ref.nodes.at(id).pins > 0 || !ref.Leaf(id))) {
        expect = absl::StatusCode::kFailedPrecondition;
      }
      auto r = tree.RemoveReplica(id, InstanceId(x));
      ASSERT_EQ(r.status().code(), expect) << r.status();
      if (r.ok()) {
        ASSERT_EQ(r->node_erased, ref.nodes.at(id).replicas.size() == 1);
        ref_remove(id, x);
        free_slots(*r);
        ++done["remove_replica"];
      }
    } else if (op < 62) {
      // A request pins its matched prefix.
      if (seqs.empty()) continue;
      const auto& seq = seqs[rng.UniformInt(0, seqs.size() - 1)];
      std::vector<SegmentId> ids;
      const int32_t m = ref.Match(seq);
      for (int32_t i = 0; i < m; ++i) ids.push_back(seq[i].id);
      if (rng.Bernoulli(0.1)) ids.push_back(random_known_id());  // maybe unknown
      bool all_known = true;
      for (SegmentId id : ids) all_known &= ref.nodes.count(id) > 0;
      const absl::Status st = tree.Pin(ids);
      ASSERT_EQ(st.ok(), all_known) << st;
      if (st.ok()) {
        for (SegmentId id : ids) ++ref.nodes.at(id).pins;
        pin_sets.push_back(ids);
        ++done["pin"];
        tree.Touch(ids, now);
        for (SegmentId id : ids) {
          ref.nodes.at(id).last = now;
          ++ref.nodes.at(id).count;
        }
      } else {
        ASSERT_EQ(st.code(), absl::StatusCode::kNotFound);
      }
    } else if (op < 72) {
      // A request finishes (or a buggy double unpin).
      if (pin_sets.empty() || rng.Bernoulli(0.1)) {
        std::vector<SegmentId> ids = {random_known_id()};
        absl::StatusCode expect = !ref.nodes.count(ids[0]) ? absl::StatusCode::kNotFound
                                  : ref.nodes.at(ids[0]).pins == 0
                                      ? absl::StatusCode::kFailedPrecondition
                                      : absl::StatusCode::kOk;
        ASSERT_EQ(tree.Unpin(ids).code(), expect);
        if (expect == absl::StatusCode::kOk) {
          --ref.nodes.at(ids[0]).pins;
          // Keep pin_sets consistent: remove one occurrence from some set holding it.
          for (auto& set : pin_sets) {
            auto it = std::find(set.begin(), set.end(), ids[0]);
            if (it != set.end()) {
              set.erase(it);
              break;
            }
          }
        }
        continue;
      }
      const size_t k = static_cast<size_t>(rng.UniformInt(0, pin_sets.size() - 1));
      ASSERT_TRUE(tree.Unpin(pin_sets[k]).ok());
      for (SegmentId id : pin_sets[k]) --ref.nodes.at(id).pins;
      pin_sets.erase(pin_sets.begin() + k);
    } else if (op < 80) {
      std::vector<SegmentId> ids;
      for (int i = 0; i < 3; ++i) ids.push_back(random_known_id());
      int32_t expect = 0;
      for (SegmentId id : ids) {
        if (auto it = ref.nodes.find(id); it != ref.nodes.end()) {
          it->second.last = now;
          ++it->second.count;
          ++expect;
        }
      }
      ASSERT_EQ(tree.Touch(ids, now), expect);
    } else if (op < 90) {
      // Cluster-wide eviction of the LRU leaf, or of an arbitrary id.
      SegmentId id;
      if (rng.Bernoulli(0.7)) {
        const auto expect = ref.LruLeaf();
        const auto got = tree.LruEvictableLeaf();
        ASSERT_EQ(got, expect);
        if (!got) continue;
        id = *got;
      } else {
        id = random_known_id();
      }
      absl::StatusCode expect = !ref.nodes.count(id) ? absl::StatusCode::kNotFound
                                : (ref.nodes.at(id).pins > 0 || !ref.Leaf(id))
                                    ? absl::StatusCode::kFailedPrecondition
                                    : absl::StatusCode::kOk;
      auto r = tree.Evict(id);
      ASSERT_EQ(r.status().code(), expect) << r.status();
      if (r.ok()) {
        std::set<int32_t> freed;
        for (InstanceId x : r->freed_on) freed.insert(x.value());
        ASSERT_EQ(freed, ref.nodes.at(id).replicas);
        ASSERT_EQ(r->freed_on.size(), freed.size());
        ref.nodes.erase(id);
        free_slots(*r);
        ++done["evict"];
      }
    } else if (op < 99) {
      // Match queries (read-only).
      if (seqs.empty()) continue;
      const auto& seq = seqs[rng.UniformInt(0, seqs.size() - 1)];
      const int32_t m = ref.Match(seq);
      int64_t tokens = 0;
      for (int32_t i = 0; i < m; ++i) tokens += seq[i].num_tokens;
      const MatchResult got = tree.Match(absl::Span<const SegmentKey>(seq));
      ASSERT_EQ(got.matched_segments, m);
      ASSERT_EQ(got.matched_tokens, tokens);
      ASSERT_EQ(tree.Match(IdsOf(seq)).matched_segments, m);
      ++done[m > 0 ? "match_hit" : "match_miss"];
    } else {
      // An instance is lost.
      const int32_t x = static_cast<int32_t>(rng.UniformInt(0, n - 1));
      auto r = tree.DropInstance(InstanceId(x));
      ASSERT_TRUE(r.ok());
      // Reference: lost = nodes whose only replica is x; doomed = lost and descendants.
      std::set<SegmentId> doomed;
      for (const auto& [id, v] : ref.nodes) {
        SegmentId cur = id;
        while (cur.valid()) {
          const RefNode& c = ref.nodes.at(cur);
          if (c.replicas.size() == 1 && c.replicas.count(x)) {
            doomed.insert(id);
            break;
          }
          cur = c.parent;
        }
      }
      int64_t elsewhere = 0;
      for (SegmentId id : doomed) {
        for (int32_t y : ref.nodes.at(id).replicas) elsewhere += (y != x);
      }
      ASSERT_EQ(r->erased_segments, static_cast<int64_t>(doomed.size()));
      ASSERT_EQ(static_cast<int64_t>(r->freed_elsewhere.size()), elsewhere);
      ASSERT_EQ(r->dropped_replicas, ref.On(x));
      int64_t pinned_copies = 0;  // x's copies of pinned survivors, every copy of a pinned doomed
      for (const auto& [id, v] : ref.nodes) {
        if (v.pins == 0) continue;
        pinned_copies += doomed.count(id) ? static_cast<int64_t>(v.replicas.size())
                                          : static_cast<int64_t>(v.replicas.count(x));
      }
      ASSERT_EQ(r->dropped_pinned_replicas, pinned_copies);
      for (const FreedReplica& f : r->freed_elsewhere) --used[f.instance.value()];
      used[x] = 0;
      ++done["drop_instance"];
      for (SegmentId id : doomed) ref.nodes.erase(id);
      for (auto& [id, v] : ref.nodes) v.replicas.erase(x);
      // Requests pinning lost segments fail; forget their pins on survivors too.
      for (size_t k = 0; k < pin_sets.size();) {
        bool hit = false;
        for (SegmentId id : pin_sets[k]) hit |= doomed.count(id) > 0;
        if (!hit) {
          ++k;
          continue;
        }
        std::vector<SegmentId> survivors;
        for (SegmentId id : pin_sets[k]) {
          if (!doomed.count(id)) survivors.push_back(id);
        }
        ASSERT_TRUE(tree.Unpin(survivors).ok());
        for (SegmentId id : survivors) --ref.nodes.at(id).pins;
        pin_sets.erase(pin_sets.begin() + k);
      }
    }

    // ---- Compare with the reference and check conservation after every step.
    ASSERT_TRUE(tree.CheckIntegrity().ok()) << tree.CheckIntegrity();
    {
      // The subtree of a random id (stored or not): the nodes whose path up reaches it, each
      // listed after its descendants.
      const SegmentId root = random_known_id();
      std::set<SegmentId> under;
      for (const auto& [id, v] : ref.nodes) {
        for (SegmentId cur = id; cur.valid(); cur = ref.nodes.at(cur).parent) {
          if (cur == root) {
            under.insert(id);
            break;
          }
        }
      }
      const std::vector<SegmentId> got = tree.SubtreeDeepestFirst(root);
      ASSERT_EQ(std::set<SegmentId>(got.begin(), got.end()), under);
      ASSERT_EQ(got.size(), under.size());
      std::map<SegmentId, size_t> position;
      for (size_t i = 0; i < got.size(); ++i) position[got[i]] = i;
      for (SegmentId id : got) {
        if (id == root) continue;
        ASSERT_LT(position.at(id), position.at(ref.nodes.at(id).parent)) << id;
      }
    }
    ASSERT_EQ(tree.num_segments(), static_cast<int64_t>(ref.nodes.size()));
    int64_t replicas = 0;
    for (const auto& [id, v] : ref.nodes) {
      const PrefixTree::Node* node = tree.Find(id);
      ASSERT_NE(node, nullptr) << id;
      ASSERT_EQ(node->parent, v.parent);
      ASSERT_EQ(node->num_tokens, v.num_tokens);
      ASSERT_EQ(node->depth, v.depth);
      ASSERT_EQ(node->num_children, ref.Children(id));
      ASSERT_EQ(node->pin_count, v.pins);
      ASSERT_EQ(node->last_access_us, v.last);
      ASSERT_EQ(node->access_count, v.count);
      std::set<int32_t> reps;
      for (InstanceId x : node->replicas) reps.insert(x.value());
      ASSERT_EQ(reps, v.replicas);
      ASSERT_LE(static_cast<int32_t>(v.replicas.size()), n);        // replicas <= instances
      ASSERT_TRUE(!v.parent.valid() || ref.nodes.count(v.parent));  // parent stored or root child
      replicas += static_cast<int64_t>(v.replicas.size());
    }
    ASSERT_EQ(tree.num_replicas(), replicas);
    ASSERT_TRUE(observer_ok);
    std::set<std::pair<SegmentId, int32_t>> placed;
    std::vector<int64_t> tokens_on(static_cast<size_t>(n), 0);
    for (const auto& [id, v] : ref.nodes) {
      for (int32_t x : v.replicas) {
        placed.insert({id, x});
        tokens_on[static_cast<size_t>(x)] += v.num_tokens;
      }
    }
    ASSERT_EQ(observed, placed);
    for (int32_t x = 0; x < n; ++x) {
      ASSERT_EQ(tree.TokensOn(InstanceId(x)), tokens_on[static_cast<size_t>(x)]) << x;
    }
    ASSERT_EQ(tree.LruEvictableLeaf(), ref.LruLeaf());
    for (int32_t x = 0; x < n; ++x) {
      // Conservation: slots used (from what the tree reported) == replicas held, within capacity.
      ASSERT_EQ(tree.SegmentsOn(InstanceId(x)), used[x]) << "instance " << x;
      ASSERT_EQ(used[x], ref.On(x));
      ASSERT_LE(used[x], p.capacity_per_instance);
      ASSERT_EQ(tree.LruExtraReplicaOn(InstanceId(x)), ref.Extra(x));
      ASSERT_EQ(tree.LruLastCopyLeafOn(InstanceId(x)), ref.LastCopy(x));
    }
    max_segments = std::max<int64_t>(max_segments, tree.num_segments());
    max_replicated = std::max<int64_t>(max_replicated, tree.num_replicas() - tree.num_segments());
    // Every pinned segment is still stored.
    for (const auto& set : pin_sets) {
      for (SegmentId id : set) ASSERT_NE(tree.Find(id), nullptr);
    }
  }
  std::cout << "max_segments=" << max_segments << " max_extra_replicas=" << max_replicated;
  for (const auto& [what, count] : done) std::cout << " " << what << "=" << count;
  std::cout << "\n";
  EXPECT_GT(done["insert_chain"], 0);
  EXPECT_GT(done["evict"] + done["evict_on_last_copy"], 0);
  EXPECT_GT(done["match_hit"], 0);
}

INSTANTIATE_TEST_SUITE_P(Sizes, PrefixTreeModelTest,
                         ::testing::Values(ModelParams{1, 2, 12, 1}, ModelParams{2, 3, 20, 2},
                                           ModelParams{4, 2, 30, 3}, ModelParams{4, 4, 16, 4},
                                           ModelParams{8, 2, 10, 5}, ModelParams{3, 1, 25, 6}));

}  // namespace
}  // namespace tokenlake::index
