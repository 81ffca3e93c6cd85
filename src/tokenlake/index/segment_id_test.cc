#include "tokenlake/index/segment_id.h"

#include <numeric>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "xxhash.h"

namespace tokenlake::index {
namespace {

using ::testing::HasSubstr;

std::vector<int32_t> Iota(int n, int32_t start = 0) {
  std::vector<int32_t> v(static_cast<size_t>(n));
  std::iota(v.begin(), v.end(), start);
  return v;
}

// Reference: the chain written out with the xxHash library directly.
uint64_t RefHash(uint64_t parent, const int32_t* tokens, size_t n) {
  return XXH3_64bits_withSeed(tokens, n * sizeof(int32_t), parent);
}

TEST(SegmentIdTest, ChainsXxh3OverTokensSeededByParent) {
  const uint64_t salt = NamespaceSalt("llama-3-8b");
  EXPECT_EQ(salt, XXH3_64bits_withSeed("llama-3-8b", 10, 0));
  const std::vector<int32_t> tokens = Iota(10);
  auto keys = ComputeSegmentKeys(salt, tokens, 4);
  ASSERT_TRUE(keys.ok()) << keys.status();
  ASSERT_EQ(keys->size(), 3u);
  const uint64_t id0 = RefHash(salt, tokens.data(), 4);
  const uint64_t id1 = RefHash(id0, tokens.data() + 4, 4);
  const uint64_t id2 = RefHash(id1, tokens.data() + 8, 2);
  EXPECT_EQ((*keys)[0], (SegmentKey{SegmentId(id0), 4}));
  EXPECT_EQ((*keys)[1], (SegmentKey{SegmentId(id1), 4}));
  EXPECT_EQ((*keys)[2], (SegmentKey{SegmentId(id2), 2}));
  EXPECT_EQ(ChainSegmentId(id1, absl::MakeConstSpan(tokens).subspan(8)), SegmentId(id2));
}

TEST(SegmentIdTest, SamePrefixGivesSameIds) {
  const uint64_t salt = NamespaceSalt("m");
  std::vector<int32_t> a = Iota(1000);
  std::vector<int32_t> b = Iota(1000);
  b.resize(700);  // a prefix of a, cut inside segment 5 (segments of 128)
  auto ka = ComputeSegmentKeys(salt, a, 128);
  auto kb = ComputeSegmentKeys(salt, b, 128);
  ASSERT_TRUE(ka.ok() && kb.ok());
  ASSERT_EQ(ka->size(), 8u);
  ASSERT_EQ(kb->size(), 6u);
  for (int i = 0; i < 5; ++i) EXPECT_EQ((*ka)[i], (*kb)[i]) << "segment " << i;
  // The part-segment (700 - 640 = 60 tokens) differs from the full segment 5 of `a`.
  EXPECT_EQ((*kb)[5].num_tokens, 60);
  EXPECT_EQ((*ka)[5].num_tokens, 128);
  EXPECT_NE((*kb)[5].id, (*ka)[5].id);
}

TEST(SegmentIdTest, OneDifferentTokenChangesThatSegmentAndAllLaterOnes) {
  const uint64_t salt = NamespaceSalt("m");
  std::vector<int32_t> a = Iota(64 * 6);
  std::vector<int32_t> b = a;
  b[64 * 2 + 17] += 1;  // inside segment 2
  auto ka = ComputeSegmentKeys(salt, a, 64);
  auto kb = ComputeSegmentKeys(salt, b, 64);
  ASSERT_TRUE(ka.ok() && kb.ok());
  ASSERT_EQ(ka->size(), 6u);
  for (int i = 0; i < 2; ++i) EXPECT_EQ((*ka)[i].id, (*kb)[i].id) << i;
  for (int i = 2; i < 6; ++i) EXPECT_NE((*ka)[i].id, (*kb)[i].id) << i;
}

TEST(SegmentIdTest, SameSegmentTokensUnderDifferentPrefixesGetDifferentIds) {
  const uint64_t salt = NamespaceSalt("m");
  std::vector<int32_t> a = {1, 2, 3, 4, 9, 9, 9, 9};
  std::vector<int32_t> b = {5, 6, 7, 8, 9, 9, 9, 9};
  auto ka = ComputeSegmentKeys(salt, a, 4);
  auto kb = ComputeSegmentKeys(salt, b, 4);
  ASSERT_TRUE(ka.ok() && kb.ok());
  EXPECT_NE((*ka)[1].id, (*kb)[1].id);
}

TEST(SegmentIdTest, DifferentNamespacesNeverShareIds) {
  const std::vector<int32_t> tokens = Iota(16);
  auto ka = ComputeSegmentKeys(NamespaceSalt("model-a"), tokens, 8);
  auto kb = ComputeSegmentKeys(NamespaceSalt("model-b"), tokens, 8);
  ASSERT_TRUE(ka.ok() && kb.ok());
  EXPECT_NE((*ka)[0].id, (*kb)[0].id);
  EXPECT_NE((*ka)[1].id, (*kb)[1].id);
}

TEST(SegmentIdTest, ExactMultipleHasNoPartSegment) {
  auto keys = ComputeSegmentKeys(1, Iota(512 * 3), 512);
  ASSERT_TRUE(keys.ok());
  ASSERT_EQ(keys->size(), 3u);
  for (const SegmentKey& k : *keys) EXPECT_EQ(k.num_tokens, 512);
}

TEST(SegmentIdTest, EmptyTokensGiveNoKeys) {
  auto keys = ComputeSegmentKeys(1, {}, 512);
  ASSERT_TRUE(keys.ok());
  EXPECT_TRUE(keys->empty());
}

TEST(SegmentIdTest, RejectsNonPositiveSegmentSize) {
  for (int32_t bad : {0, -1, -512}) {
    auto keys = ComputeSegmentKeys(1, Iota(10), bad);
    ASSERT_FALSE(keys.ok());
    EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(keys.status().message(), HasSubstr("segment_tokens must be > 0"));
  }
}

TEST(SegmentIdTest, BlockHashesChainWithHashCombineAndLastBlockGetsTheRemainder) {
  const uint64_t salt = NamespaceSalt("mooncake");
  const std::vector<uint64_t> blocks = {11, 22, 33};
  auto keys = KeysFromBlockHashes(salt, blocks, 512, 512 * 2 + 100);
  ASSERT_TRUE(keys.ok()) << keys.status();
  ASSERT_EQ(keys->size(), 3u);
  // Reference chain: XXH3 of the 16 bytes (parent, hash), as base's HashCombine documents.
  uint64_t parent = salt;
  for (size_t k = 0; k < blocks.size(); ++k) {
    const uint64_t buf[2] = {parent, blocks[k]};
    const uint64_t expected = XXH3_64bits(buf, sizeof(buf));
    EXPECT_EQ((*keys)[k].id, SegmentId(expected)) << k;
    parent = expected;
  }
  EXPECT_EQ((*keys)[0].num_tokens, 512);
  EXPECT_EQ((*keys)[1].num_tokens, 512);
  EXPECT_EQ((*keys)[2].num_tokens, 100);
}

TEST(SegmentIdTest, BlockHashKeysShareIdsExactlyOverSharedPrefix) {
  const uint64_t salt = NamespaceSalt("mooncake");
  auto a = KeysFromBlockHashes(salt, std::vector<uint64_t>{1, 2, 3, 4}, 512, 2048);
  auto b = KeysFromBlockHashes(salt, std::vector<uint64_t>{1, 2, 7, 4}, 512, 2048);
  ASSERT_TRUE(a.ok() && b.ok());
  EXPECT_EQ((*a)[0], (*b)[0]);
  EXPECT_EQ((*a)[1], (*b)[1]);
  EXPECT_NE((*a)[2].id, (*b)[2].id);
  EXPECT_NE((*a)[3].id, (*b)[3].id);  // same block hash, different prefix
}

TEST(SegmentIdTest, BlockHashesRejectTotalsThatDoNotFitTheBlocks) {
  const std::vector<uint64_t> blocks = {1, 2, 3};
  for (int64_t total : {int64_t{1024}, int64_t{1537}, int64_t{0}, int64_t{-5}}) {
    auto keys = KeysFromBlockHashes(1, blocks, 512, total);
    ASSERT_FALSE(keys.ok()) << total;
    EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument);
  }
  auto keys = KeysFromBlockHashes(1, blocks, 512, 1537);
  EXPECT_THAT(keys.status().message(), HasSubstr("1537"));
  EXPECT_THAT(keys.status().message(), HasSubstr("3 blocks"));
  EXPECT_TRUE(KeysFromBlockHashes(1, blocks, 512, 1025).ok());
  EXPECT_TRUE(KeysFromBlockHashes(1, blocks, 512, 1536).ok());
  EXPECT_FALSE(KeysFromBlockHashes(1, blocks, 0, 10).ok());
  EXPECT_FALSE(KeysFromBlockHashes(1, {}, 512, 1).ok());
  auto none = KeysFromBlockHashes(1, {}, 512, 0);
  ASSERT_TRUE(none.ok());
  EXPECT_TRUE(none->empty());
}

TEST(SegmentIdTest, IdsOfKeepsOrder) {
  auto keys = ComputeSegmentKeys(3, Iota(20), 8);
  ASSERT_TRUE(keys.ok());
  std::vector<SegmentId> ids = IdsOf(*keys);
  ASSERT_EQ(ids.size(), keys->size());
  for (size_t i = 0; i < ids.size(); ++i) EXPECT_EQ(ids[i], (*keys)[i].id);
}

TEST(TenantSaltTest, EmptySharesTheNamespaceAndEachSaltIsItsOwn) {
  const uint64_t ns = NamespaceSalt("model");
  EXPECT_EQ(TenantSalt(ns, ""), ns);
  EXPECT_NE(TenantSalt(ns, "a"), ns);
  EXPECT_NE(TenantSalt(ns, "a"), TenantSalt(ns, "b"));
  EXPECT_EQ(TenantSalt(ns, "a"), TenantSalt(ns, "a"));
  EXPECT_NE(TenantSalt(ns, "a"), TenantSalt(NamespaceSalt("other"), "a"));
  const std::vector<int32_t> tokens(32, 7);
  auto a = *ComputeSegmentKeys(TenantSalt(ns, "a"), tokens, 16);
  auto b = *ComputeSegmentKeys(TenantSalt(ns, "b"), tokens, 16);
  for (size_t i = 0; i < a.size(); ++i) EXPECT_NE(a[i].id, b[i].id) << i;
}

}  // namespace
}  // namespace tokenlake::index
