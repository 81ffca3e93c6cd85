#include "tokenlake/sim/block_cache.h"

#include <algorithm>
#include <iostream>
#include <list>
#include <map>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/random.h"

namespace tokenlake::sim {
namespace {

TEST(BlockCacheTest, MatchesLongestCachedPrefix) {
  BlockCache c(10);
  ASSERT_TRUE(c.AllocatePrivate(3));
  EXPECT_TRUE(c.Promote(1));
  EXPECT_TRUE(c.Promote(2));
  EXPECT_FALSE(c.Promote(2));  // already cached: the block stays private
  const std::vector<uint64_t> ids = {1, 2, 3};
  EXPECT_EQ(c.Match(ids), 2);
  EXPECT_EQ(c.Match(std::vector<uint64_t>{2, 1}), 2);
  EXPECT_EQ(c.Match(std::vector<uint64_t>{3, 1}), 0);
  EXPECT_EQ(c.private_blocks(), 1);
  EXPECT_EQ(c.cached_blocks(), 2);
  EXPECT_EQ(c.free_blocks(), 7);
  EXPECT_TRUE(c.CheckInvariants().ok());
}

TEST(BlockCacheTest, EvictsLeastRecentlyReleasedTailFirst) {
  BlockCache c(4);
  ASSERT_TRUE(c.AllocatePrivate(4));
  for (uint64_t id : {10, 11, 12, 13}) ASSERT_TRUE(c.Promote(id));
  c.Release(std::vector<uint64_t>{10, 11});  // queued tail first: 11 then 10
  c.Release(std::vector<uint64_t>{12, 13});  // then 13, 12
  EXPECT_EQ(c.evictable_blocks(), 4);
  ASSERT_TRUE(c.AllocatePrivate(1));  // evicts 11
  EXPECT_FALSE(c.Contains(11));
  EXPECT_TRUE(c.Contains(10));
  ASSERT_TRUE(c.AllocatePrivate(1));  // evicts 10
  EXPECT_FALSE(c.Contains(10));
  EXPECT_TRUE(c.Contains(13));
  EXPECT_EQ(c.evictions(), 2);
}

TEST(BlockCacheTest, ReferencedBlocksAreNeverEvictedAndAllocationFailsCleanly) {
  BlockCache c(3);
  ASSERT_TRUE(c.AllocatePrivate(2));
  ASSERT_TRUE(c.Promote(1));
  ASSERT_TRUE(c.Promote(2));
  c.Release(std::vector<uint64_t>{1, 2});
  c.Acquire(std::vector<uint64_t>{1, 2}, 1);  // 1 referenced again
  EXPECT_EQ(c.Obtainable(), 2);               // 1 free + block 2
  EXPECT_FALSE(c.AllocatePrivate(3));
  EXPECT_TRUE(c.Contains(2));  // nothing changed by the failed allocation
  ASSERT_TRUE(c.AllocatePrivate(2));
  EXPECT_TRUE(c.Contains(1));
  EXPECT_FALSE(c.Contains(2));
  EXPECT_TRUE(c.CheckInvariants().ok());
}

// Randomised test against a naive model: a vector of (id, refs) in LRU order for unreferenced
// blocks, plus counts.
class BlockCacheModelTest : public ::testing::TestWithParam<int> {};

TEST_P(BlockCacheModelTest, AgreesWithNaiveModel) {
  const int capacity = GetParam();
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    SCOPED_TRACE(::testing::Message() << "seed=" << seed << " capacity=" << capacity);
    Rng rng(seed * 7919 + static_cast<uint64_t>(capacity));
    BlockCache c(capacity);
    std::map<uint64_t, int> refs;  // cached id -> refcount
    std::list<uint64_t> lru;       // unreferenced, front oldest
    int64_t priv = 0;
    std::vector<uint64_t> held;  // ids we hold one reference on (multiset)
    IdCopyCounter counter;
    c.AttachCopyCounter(&counter);
    for (int step = 0; step < 2000; ++step) {
      const int op = static_cast<int>(rng.UniformInt(0, 4));
      if (op == 0) {  // allocate
        const int64_t n = rng.UniformInt(0, 3);
        const int64_t free = capacity - priv - static_cast<int64_t>(refs.size());
        const bool can = n <= free + static_cast<int64_t>(lru.size());
        ASSERT_EQ(c.AllocatePrivate(n), can);
        if (can) {
          int64_t need = n - free;
          while (need-- > 0) {
            refs.erase(lru.front());
            lru.pop_front();
          }
          priv += n;
        }
      } else if (op == 1 && priv > 0) {  // promote
        const uint64_t id = static_cast<uint64_t>(rng.UniformInt(1, 40));
        const bool fresh = !refs.contains(id);
        ASSERT_EQ(c.Promote(id), fresh);
        if (fresh) {
          refs[id] = 1;
          --priv;
          held.push_back(id);
        }
      } else if (op == 2 && !held.empty()) {  // release one held id
        const size_t k = static_cast<size_t>(rng.UniformInt(0, held.size() - 1));
        const uint64_t id = held[k];
        held.erase(held.begin() + static_cast<int64_t>(k));
        c.Release(std::vector<uint64_t>{id});
        if (--refs[id] == 0) lru.push_back(id);
      } else if (op == 3) {  // acquire a cached id
        const uint64_t id = static_cast<uint64_t>(rng.UniformInt(1, 40));
        const std::vector<uint64_t> one = {id};
        ASSERT_EQ(c.Match(one), refs.contains(id) ? 1 : 0);
        if (refs.contains(id)) {
          c.Acquire(one, 1);
          if (refs[id]++ == 0) lru.remove(id);
          held.push_back(id);
        }
      } else if (op == 4 && priv > 0) {
        const int64_t n = rng.UniformInt(1, priv);
        c.FreePrivate(n);
        priv -= n;
      }
      ASSERT_TRUE(c.CheckInvariants().ok()) << c.CheckInvariants();
      ASSERT_EQ(c.private_blocks(), priv);
      ASSERT_EQ(c.cached_blocks(), static_cast<int64_t>(refs.size()));
      ASSERT_EQ(c.evictable_blocks(), static_cast<int64_t>(lru.size()));
      ASSERT_EQ(c.free_blocks() + c.private_blocks() + c.cached_blocks(), capacity);
      ASSERT_EQ(counter.distinct(), static_cast<int64_t>(refs.size()));
    }
  }
}

TEST(IdCopyCounterTest, CountsCopiesAcrossCachesAsTheyChange) {
  // Two caches of 2 blocks; the counter is attached to the second after it holds an id.
  BlockCache a(2), b(2);
  IdCopyCounter counter;
  a.AttachCopyCounter(&counter);
  ASSERT_TRUE(a.AllocatePrivate(2) && b.AllocatePrivate(2));
  ASSERT_TRUE(b.Promote(7));
  b.AttachCopyCounter(&counter);
  EXPECT_EQ(counter.distinct(), 1);
  ASSERT_TRUE(a.Promote(7) && a.Promote(8));
  EXPECT_EQ(counter.distinct(), 2);        // 7 twice, 8 once
  a.Release(std::vector<uint64_t>{7, 8});  // tail first: 8 is now the older
  ASSERT_TRUE(a.AllocatePrivate(1));       // evicts 8
  EXPECT_EQ(counter.distinct(), 1);
  ASSERT_TRUE(a.AllocatePrivate(1));  // evicts 7 from a; b still holds it
  EXPECT_EQ(counter.distinct(), 1);
  b.Release(std::vector<uint64_t>{7});
  b.FreePrivate(1);
  ASSERT_TRUE(b.AllocatePrivate(2));  // evicts the last copy of 7
  EXPECT_EQ(counter.distinct(), 0);
}

INSTANTIATE_TEST_SUITE_P(Capacities, BlockCacheModelTest, ::testing::Values(1, 4, 16, 64));

}  // namespace
}  // namespace tokenlake::sim
