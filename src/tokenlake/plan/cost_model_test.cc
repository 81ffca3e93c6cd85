#include "tokenlake/plan/cost_model.h"

#include "gtest/gtest.h"

namespace tokenlake::plan {
namespace {

// One layer of a Llama-3-8B-like shape: 32 query heads, 8 KV heads, head_dim 128, bf16.
ModelShape OneLayer() { return ModelShape{1, 32, 8, 128, 2}; }

TEST(CostModelTest, BytesMatchHandComputedFigures) {
  const ModelShape s = OneLayer();
  // Queries: q x 32 x 128 x 2 = 8192 q.
  EXPECT_EQ(QueryBytes(s, 1), 8192);
  // Results: q x 32 x (128 x 2 + 4) = 8320 q.
  EXPECT_EQ(PartialResultBytes(s, 1), 8320);
  EXPECT_EQ(MoveQueriesBytes(s, 10), 165120);
  // KV: 2 x T x 8 x 128 x 2 = 4096 T.
  EXPECT_EQ(KvBytes(s, 512), 2097152);
  // 4 x q x T x H x D.
  EXPECT_DOUBLE_EQ(AttentionFlops(s, 2, 3), 4.0 * 2 * 3 * 32 * 128);
  ModelShape s32 = s;
  s32.num_layers = 32;
  EXPECT_EQ(KvBytes(s32, 512), 32 * 2097152);
}

TEST(CostModelTest, QueryVersusPullFlipsAtTheBreakEvenPoint) {
  const ModelShape s = OneLayer();
  // Moving q=128 queries costs 16512 x 128 = 2113536 bytes; pulling T tokens costs 4096 T.
  // Break-even at T = 2113536 / 4096 = 516 tokens exactly.
  EXPECT_TRUE(PreferMoveQueries(s, 128, 516));   // equal: move the queries
  EXPECT_FALSE(PreferMoveQueries(s, 128, 515));  // pulling is cheaper
  EXPECT_TRUE(PreferMoveQueries(s, 128, 100000));
  // Decode (q = 1) moves queries for anything above 4.03 tokens.
  EXPECT_TRUE(PreferMoveQueries(s, 1, 5));
  EXPECT_FALSE(PreferMoveQueries(s, 1, 4));
}

TEST(CostModelTest, ValidateNamesTheBadField) {
  ModelShape s;
  EXPECT_TRUE(s.Validate().ok());
  s.num_kv_heads = 0;
  EXPECT_NE(s.Validate().message().find("num_kv_heads"), std::string::npos);
  s = {};
  s.num_heads = 30;  // not a multiple of 8
  EXPECT_NE(s.Validate().message().find("multiple"), std::string::npos);
  s = {};
  s.num_layers = -1;
  EXPECT_NE(s.Validate().message().find("num_layers"), std::string::npos);
}

}  // namespace
}  // namespace tokenlake::plan
