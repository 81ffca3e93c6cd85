// Device domains (Lake::SetDeviceDomains): a tail's blocks are written by its computing
// instance's kernels, so they go only to instances of its device; admission checks that device's
// room. Examples, then a randomised test against a naive model of what drops can free.
#include <algorithm>
#include <iostream>
#include <map>
#include <optional>
#include <set>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/random.h"
#include "tokenlake/base/random_testing.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/lake/lake_testing.h"

namespace tokenlake::lake {
namespace {

constexpr int32_t kS = kTestSegmentTokens;

// Stores `keys` on `instance` through a request that ends at once.
void Store(Lake& lake, uint64_t id, const std::vector<index::SegmentKey>& keys, int32_t instance) {
  ASSERT_TRUE(lake.Admit({.id = RequestId(id), .keys = keys, .new_tokens = 1}).ok());
  ASSERT_TRUE(lake.CommitKeys(RequestId(id), keys, InstanceId(instance)).ok());
  ASSERT_TRUE(lake.Release(RequestId(id)).ok());
}

TEST(LakeDomainTest, SetDeviceDomainsChecksTheSize) {
  ManualClock clock(1);
  auto lake = MakeLake(&clock, 4, 2);
  EXPECT_EQ(lake->SetDeviceDomains({0, 1}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_TRUE(lake->SetDeviceDomains({0, 0, 1, 1}).ok());
  EXPECT_TRUE(lake->SetDeviceDomains({}).ok());
}

TEST(LakeDomainTest, TailsStayOnTheirDeviceAndWaitWhenItIsFull) {
  ManualClock clock(1);
  auto lake = MakeLake(&clock, 4, 2);
  ASSERT_TRUE(lake->SetDeviceDomains({7, 7, 3, 3}).ok());
  // Three blocks computed on 0: two there, the third on 1 (same device), not on 2 or 3.
  auto a = lake->TryAdmit(TailRequest(1, {}, int64_t{3} * kS, 0));
  ASSERT_TRUE(a.ok() && a->has_value()) << a.status();
  EXPECT_EQ((*a)->tail_slots,
            (std::vector<InstanceId>{InstanceId(0), InstanceId(0), InstanceId(1)}));
  // Two more on device 7: one slot is left there; the pool has 5. TryAdmit waits, Admit refuses
  // naming the device.
  auto b = lake->TryAdmit(TailRequest(2, {}, int64_t{2} * kS, 1));
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_FALSE(b->has_value());
  auto c = lake->Admit(TailRequest(2, {}, int64_t{2} * kS, 1));
  ASSERT_EQ(c.status().code(), absl::StatusCode::kResourceExhausted) << c.status();
  EXPECT_NE(c.status().message().find("device of instance 1"), std::string::npos) << c.status();
  // The same tail computed on device 3 fits there.
  auto d = lake->TryAdmit(TailRequest(3, {}, int64_t{2} * kS, 3));
  ASSERT_TRUE(d.ok() && d->has_value()) << d.status();
  EXPECT_EQ((*d)->tail_slots, (std::vector<InstanceId>{InstanceId(3), InstanceId(3)}));
  // One domain again: a tail goes anywhere (instance 2's free slots).
  ASSERT_TRUE(lake->SetDeviceDomains({}).ok());
  auto e = lake->TryAdmit(TailRequest(4, {}, int64_t{3} * kS, 1));
  ASSERT_TRUE(e.ok() && e->has_value()) << e.status();
  EXPECT_EQ((*e)->tail_slots.size(), 3u);
  EXPECT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
}

TEST(LakeDomainTest, TailsEvictOnlyOnTheirDevice) {
  ManualClock clock(1);
  auto lake = MakeLake(&clock, 2, 2);
  ASSERT_TRUE(lake->SetDeviceDomains({0, 1}).ok());
  Store(*lake, 100, Chain({1, 2}), 0);  // instance 0 full
  clock.AdvanceUs(10);
  Store(*lake, 101, Chain({5}), 1);  // older than nothing on 0, but on the other device
  clock.AdvanceUs(10);
  auto a = lake->TryAdmit(TailRequest(1, {}, int64_t{2} * kS, 0));
  ASSERT_TRUE(a.ok() && a->has_value()) << a.status();
  EXPECT_EQ((*a)->tail_slots, (std::vector<InstanceId>{InstanceId(0), InstanceId(0)}));
  // The leaf first, then its parent; segment 5 (another device) stays.
  EXPECT_EQ((*a)->evicted, (std::vector<StoredReplica>{{SegmentId(2), InstanceId(0)},
                                                       {SegmentId(1), InstanceId(0)}}));
  EXPECT_NE(lake->prefix_tree().Find(SegmentId(5)), nullptr);
  EXPECT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
}

TEST(LakeDomainTest, AnInteriorCopyWhoseChildIsElsewhereCannotMakeRoom) {
  ManualClock clock(1);
  auto lake = MakeLake(&clock, 2, 1);
  ASSERT_TRUE(lake->SetDeviceDomains({0, 1}).ok());
  // Segment 1 on instance 0, its child 2 on instance 1: 1 cannot go while 2 stays.
  Store(*lake, 100, Chain({1}), 0);
  Store(*lake, 101, Chain({1, 2}), 1);
  ASSERT_EQ(lake->prefix_tree().Find(SegmentId(2))->replicas, index::ReplicaList{InstanceId(1)});
  auto a = lake->TryAdmit(TailRequest(1, {}, kS, 0));
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_FALSE(a->has_value());
  // Computed on instance 1, the tail takes 2's slot (a leaf there).
  auto b = lake->TryAdmit(TailRequest(2, {}, kS, 1));
  ASSERT_TRUE(b.ok() && b->has_value()) << b.status();
  EXPECT_EQ((*b)->evicted, (std::vector<StoredReplica>{{SegmentId(2), InstanceId(1)}}));
  // Now 1 is a leaf: a tail computed on 0 can take its slot.
  auto c = lake->TryAdmit(TailRequest(3, {}, kS, 0));
  ASSERT_TRUE(c.ok() && c->has_value()) << c.status();
  EXPECT_EQ((*c)->evicted, (std::vector<StoredReplica>{{SegmentId(1), InstanceId(0)}}));
  EXPECT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
}

// ---------------------------------------------------------------------------------------------
// Randomised: documents stored on random instances (with extra copies), requests that pin
// prefixes, and tail requests computed on random instances under random domain partitions.
// Before every tail admission a naive model, built from the tree as it stands, drops copies on
// the computing instance's device one at a time (an extra copy of an unpinned segment, or the
// last copy of an unpinned leaf) until none can go; the tail is admitted exactly when the pool
// check passes and the device's free slots plus those drops cover its blocks. Then every new
// block is on the device and every copy evicted for it was too.
struct DomainParams {
  int32_t instances;
  int32_t slots;
  uint64_t seed;
};

class LakeDomainModelTest : public ::testing::TestWithParam<DomainParams> {};

// What repeated drops free on the instances of `device`, the segments `to_pin` counted as pinned.
int64_t NaiveDroppable(const index::PrefixTree& tree, const std::vector<int32_t>& domains,
                       int32_t device, const std::set<SegmentId>& to_pin) {
  struct Node {
    SegmentId parent;
    std::vector<InstanceId> replicas;
    bool pinned = false;
    int32_t children = 0;
  };
  std::map<SegmentId, Node> nodes;
  tree.ForEachNode([&](const index::PrefixTree::Node& n) {
    nodes[n.id] = Node{n.parent, std::vector<InstanceId>(n.replicas.begin(), n.replicas.end()),
                       n.is_pinned() || to_pin.contains(n.id), 0};
  });
  for (const auto& [id, n] : nodes) {
    if (n.parent.valid()) nodes[n.parent].children += 1;
  }
  int64_t dropped = 0;
  for (bool changed = true; changed;) {
    changed = false;
    for (auto it = nodes.begin(); it != nodes.end() && !changed; ++it) {
      Node& n = it->second;
      if (n.pinned) continue;
      for (size_t r = 0; r < n.replicas.size(); ++r) {
        if (domains[n.replicas[r].value()] != device) continue;
        if (n.replicas.size() >= 2) {
          n.replicas.erase(n.replicas.begin() + static_cast<std::ptrdiff_t>(r));
        } else if (n.children == 0) {
          if (n.parent.valid()) nodes[n.parent].children -= 1;
          nodes.erase(it);
        } else {
          continue;
        }
        ++dropped;
        changed = true;
        break;
      }
    }
  }
  return dropped;
}

TEST_P(LakeDomainModelTest, TailsStayOnTheirDeviceAndAdmissionMatchesTheModel) {
  DomainParams p = GetParam();
  p.seed = TestSeed(p.seed);
  SCOPED_TRACE(testing::Message() << "seed=" << p.seed);
  Rng rng(p.seed);
  ManualClock clock(1);
  auto lake = MakeLake(&clock, p.instances, p.slots);
  auto doc_key = [](int32_t doc, int32_t i) {
    return index::SegmentKey{SegmentId(static_cast<uint64_t>(doc) * 1000 + i + 1), kS};
  };
  std::vector<int32_t> domains(static_cast<size_t>(p.instances), 0);
  std::vector<uint64_t> tails;    // requests holding a tail
  std::vector<uint64_t> pinning;  // active requests without a tail (their prefixes pinned)
  uint64_t next_id = 1;
  int admitted = 0, waited = 0, evicted_for_tails = 0;
  for (int step = 0; step < 1200; ++step) {
    SCOPED_TRACE(testing::Message() << "step=" << step);
    clock.AdvanceUs(1000);
    const int64_t op = rng.UniformInt(0, 99);
    if (op < 5) {
      for (int32_t& d : domains) d = static_cast<int32_t>(rng.UniformInt(0, 2));
      ASSERT_TRUE(lake->SetDeviceDomains(domains).ok());
    } else if (op < 35) {
      // A document's prefix stored on an instance (a new node or an extra copy of a known one).
      const auto doc = static_cast<int32_t>(rng.UniformInt(0, 5));
      const auto n = static_cast<int32_t>(rng.UniformInt(1, 4));
      const auto at = static_cast<int32_t>(rng.UniformInt(0, p.instances - 1));
      std::vector<HeldSegment> held;
      held.reserve(static_cast<size_t>(n));
      for (int32_t i = 0; i < n; ++i) {
        held.push_back({doc_key(doc, i).id, i > 0 ? doc_key(doc, i - 1).id : SegmentId(), kS});
      }
      ASSERT_TRUE(lake->RestoreReplicas(InstanceId(at), held).ok());
    } else if (op < 45) {
      // A request pins a document's cached prefix for a while.
      const auto doc = static_cast<int32_t>(rng.UniformInt(0, 5));
      std::vector<index::SegmentKey> keys;
      keys.reserve(3);
      for (int32_t i = 0; i < 3; ++i) keys.push_back(doc_key(doc, i));
      const index::MatchResult m = lake->Match(keys);
      keys.resize(static_cast<size_t>(m.matched_segments));
      const uint64_t id = next_id++;
      if (lake->Admit({.id = RequestId(id), .keys = keys, .new_tokens = 0}).ok()) {
        pinning.push_back(id);
      }
    } else if (op < 55 && !pinning.empty()) {
      const auto k = static_cast<size_t>(rng.UniformInt(0, pinning.size() - 1));
      ASSERT_TRUE(lake->Release(RequestId(pinning[k])).ok());
      pinning.erase(pinning.begin() + static_cast<std::ptrdiff_t>(k));
    } else if (op < 65 && !tails.empty()) {
      const auto k = static_cast<size_t>(rng.UniformInt(0, tails.size() - 1));
      ASSERT_TRUE(lake->Release(RequestId(tails[k])).ok());
      lake->ReleaseTail(RequestId(tails[k]));
      tails.erase(tails.begin() + static_cast<std::ptrdiff_t>(k));
    } else {
      // A tail request over a document's cached prefix, computed on a random instance.
      const auto doc = static_cast<int32_t>(rng.UniformInt(0, 5));
      const auto compute = static_cast<int32_t>(rng.UniformInt(0, p.instances - 1));
      std::vector<index::SegmentKey> keys;
      keys.reserve(3);
      for (int32_t i = 0; i < 3; ++i) keys.push_back(doc_key(doc, i));
      const index::MatchResult m = lake->Match(keys);
      keys.resize(static_cast<size_t>(m.matched_segments));
      const int64_t end = m.matched_tokens + rng.UniformInt(1, int64_t{3} * kS);
      const int64_t need = (end + kS - 1) / kS - m.matched_tokens / kS;
      // The pool check (lake.h): growth and newly pinned copies within AvailableSlots.
      int64_t newly_pinned = 0;
      std::set<SegmentId> to_pin;
      for (const index::SegmentKey& k : keys) {
        to_pin.insert(k.id);
        const index::PrefixTree::Node* node = lake->prefix_tree().Find(k.id);
        if (!node->is_pinned()) newly_pinned += static_cast<int64_t>(node->replicas.size());
      }
      const bool pool_ok = need + newly_pinned <= lake->AvailableSlots();
      const LakeStats before = lake->Stats();
      int64_t device_room = NaiveDroppable(lake->prefix_tree(), domains, domains[compute], to_pin);
      for (int32_t i = 0; i < p.instances; ++i) {
        if (domains[i] == domains[compute]) {
          device_room += before.instances[i].capacity_slots - before.instances[i].used_slots;
        }
      }
      const uint64_t id = next_id++;
      auto t = lake->TryAdmit(TailRequest(id, keys, end, compute));
      ASSERT_TRUE(t.ok()) << t.status();
      ASSERT_EQ(t->has_value(), pool_ok && need <= device_room)
          << "need " << need << " device room " << device_room << " pool ok " << pool_ok;
      if (!t->has_value()) {
        ++waited;
        continue;
      }
      ++admitted;
      tails.push_back(id);
      ASSERT_EQ(static_cast<int64_t>((*t)->tail_slots.size()), need);
      for (InstanceId x : (*t)->tail_slots) ASSERT_EQ(domains[x.value()], domains[compute]);
      for (const StoredReplica& e : (*t)->evicted) {
        ASSERT_EQ(domains[e.instance.value()], domains[compute]);
        ++evicted_for_tails;
      }
    }
    ASSERT_TRUE(lake->CheckIntegrity().ok()) << lake->CheckIntegrity();
  }
  std::cout << "admitted=" << admitted << " waited=" << waited
            << " evicted_for_tails=" << evicted_for_tails << "\n";
  EXPECT_GT(admitted, 20);
  EXPECT_GT(waited, 5);
  EXPECT_GT(evicted_for_tails, 5);
}

INSTANTIATE_TEST_SUITE_P(Sizes, LakeDomainModelTest,
                         ::testing::Values(DomainParams{2, 4, 71}, DomainParams{3, 6, 72},
                                           DomainParams{4, 4, 73}, DomainParams{6, 3, 74}));

}  // namespace
}  // namespace tokenlake::lake
