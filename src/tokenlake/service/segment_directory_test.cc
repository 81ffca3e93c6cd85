#include "tokenlake/service/segment_directory.h"

#include <iostream>
#include <map>
#include <random>
#include <set>

#include "gtest/gtest.h"

namespace tokenlake::service {
namespace {

std::vector<index::SegmentKey> Keys(std::initializer_list<int32_t> tokens, int32_t s) {
  return *index::ComputeSegmentKeys(7, std::vector<int32_t>(tokens), s);
}

TEST(SegmentDirectoryTest, MatchesPerInstanceAndAcrossTheCluster) {
  SegmentDirectory d(2, 3);
  auto keys = Keys({1, 2, 3, 4, 5, 6}, 2);
  ASSERT_TRUE(d.ReplaceInstance(0, {{keys[0].id, 2}, {keys[1].id, 2}}).ok());
  ASSERT_TRUE(d.ReplaceInstance(1, {{keys[0].id, 2}}).ok());
  EXPECT_EQ(d.MatchedTokens(0, keys), 4);
  EXPECT_EQ(d.MatchedTokens(1, keys), 2);
  EXPECT_EQ(d.MatchedTokens(2, keys), 0);
  EXPECT_EQ(d.ClusterMatchedTokens(keys), 4);
  EXPECT_EQ(d.ReplicaCount(keys[0].id), 2);
  EXPECT_EQ(d.distinct_segments(), 2);
  EXPECT_EQ(d.total_replicas(), 3);
  d.DropInstance(0);
  EXPECT_EQ(d.ClusterMatchedTokens(keys), 2);
  EXPECT_EQ(d.total_replicas(), 1);
}

TEST(SegmentDirectoryTest, RejectsBadReportsWithoutChangingAnything) {
  SegmentDirectory d(4, 2);
  auto keys = Keys({1, 2, 3, 4}, 4);
  ASSERT_TRUE(d.ReplaceInstance(0, {{keys[0].id, 4}}).ok());
  EXPECT_EQ(d.ReplaceInstance(2, {}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.ReplaceInstance(-1, {}).code(), absl::StatusCode::kInvalidArgument);
  absl::Status s = d.ReplaceInstance(0, {{keys[0].id, 4}, {SegmentId(5), 9}});
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("segments[1]"), std::string::npos) << s;
  EXPECT_EQ(d.ReplaceInstance(0, {{SegmentId(), 1}}).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(d.SegmentsOn(0), 1);
}

// Randomised test against a naive model (a set of (instance, id) pairs), with conservation
// checks after every step.
class SegmentDirectoryModelTest : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(SegmentDirectoryModelTest, AgreesWithANaiveModel) {
  const auto [instances, universe] = GetParam();
  for (uint64_t seed = 1; seed <= 5; ++seed) {
    SCOPED_TRACE(testing::Message() << "seed=" << seed);
    std::mt19937_64 rng(seed);
    SegmentDirectory d(4, instances);
    std::vector<std::set<uint64_t>> model(instances);
    // A universe of chained ids: prompts made of small tokens.
    std::vector<std::vector<index::SegmentKey>> prompts;
    for (int p = 0; p < universe; ++p) {
      std::vector<int32_t> tokens;
      const int n = 4 * (1 + rng() % 4);
      for (int i = 0; i < n; ++i) tokens.push_back(static_cast<int32_t>(rng() % 3));
      prompts.push_back(*index::ComputeSegmentKeys(1, tokens, 4));
    }
    for (int step = 0; step < 300; ++step) {
      const int32_t inst = static_cast<int32_t>(rng() % instances);
      if (rng() % 5 == 0) {
        d.DropInstance(inst);
        model[inst].clear();
      } else {
        std::vector<SegmentRecord> report;
        std::set<uint64_t> ids;
        for (int k = 0; k < static_cast<int>(rng() % 6); ++k) {
          const auto& keys = prompts[rng() % prompts.size()];
          const size_t upto = rng() % (keys.size() + 1);
          for (size_t j = 0; j < upto; ++j) {
            report.push_back({keys[j].id, keys[j].num_tokens});
            ids.insert(keys[j].id.value());
          }
        }
        ASSERT_TRUE(d.ReplaceInstance(inst, report).ok());
        model[inst] = ids;
      }
      // Conservation: replicas = sum of per-instance sets; distinct = size of the union.
      std::map<uint64_t, int> count;
      int64_t total = 0;
      for (int i = 0; i < instances; ++i) {
        ASSERT_EQ(d.SegmentsOn(i), static_cast<int64_t>(model[i].size()));
        ASSERT_EQ(d.TokensOn(i), 4 * static_cast<int64_t>(model[i].size()));
        for (uint64_t id : model[i]) ++count[id];
        total += static_cast<int64_t>(model[i].size());
      }
      ASSERT_EQ(d.total_replicas(), total);
      ASSERT_EQ(d.distinct_segments(), static_cast<int64_t>(count.size()));
      for (const auto& keys : prompts) {
        int64_t cluster = 0;
        for (const auto& k : keys) {
          if (!count.contains(k.id.value())) break;
          cluster += 4;
        }
        ASSERT_EQ(d.ClusterMatchedTokens(keys), cluster);
        for (int i = 0; i < instances; ++i) {
          int64_t mine = 0;
          for (const auto& k : keys) {
            if (!model[i].contains(k.id.value())) break;
            mine += 4;
          }
          ASSERT_EQ(d.MatchedTokens(i, keys), mine);
        }
        ASSERT_EQ(d.ReplicaCount(keys[0].id),
                  count.contains(keys[0].id.value()) ? count[keys[0].id.value()] : 0);
      }
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, SegmentDirectoryModelTest,
                         ::testing::Combine(::testing::Values(1, 3, 8), ::testing::Values(2, 20)));

}  // namespace
}  // namespace tokenlake::service
