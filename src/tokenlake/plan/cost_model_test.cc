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
// The roofline of paper section 6.1, with values worked out by hand from the formula
// L = max(M / (M + N B T), F / (F + N P T)).
TEST(CostModelTest, CacheLoadIsThePaperRooflineByHand) {
  // The paper's LWM-7B (Llama-2-7B shape: multi-head, d = 4096, 32 layers, bf16).
  const ModelShape lwm{
      .num_layers = 32, .num_heads = 32, .num_kv_heads = 32, .head_dim = 128, .dtype_bytes = 2};
  // One request, 1,000 cached and 100 new tokens: M = 4 x 4096 x 1100 x 32 = 576,716,800 bytes,
  // F = 4 x 4096 x 1000 x 100 x 32 = 52,428,800,000 FLOPs.
  const CacheAccess a = CacheAccessOf(lwm, 1000, 100);
  EXPECT_EQ(a.kv_bytes, 576716800.0);
  EXPECT_EQ(a.attention_flops, 52428800000.0);
  // N = 4, B = 2 TB/s, P = 300 TFLOP/s, T = 10 ms: N B T = 8e10 bytes, N P T = 1.2e13 FLOPs.
  // Memory-bound: 576716800 / 80576716800 = 0.0071574 > 52428800000 / 12052428800000 = 0.00435.
  const InstanceRoofline hw{.kv_bytes_per_s = 2e12, .attention_flops_per_s = 3e14};
  EXPECT_NEAR(CacheLoad(a, 4, hw, 0.01), 0.00715736285745512, 1e-15);
  // Add a long one (100,000 cached, 8,000 new): M = 57,199,820,800 and F = 419,482,828,800,000
  // in all; now compute-bound: F / (F + 1.2e13) = 0.97219 > M / (M + 8e10) = 0.41691.
  CacheAccess b = a;
  b += CacheAccessOf(lwm, 100000, 8000);
  EXPECT_EQ(b.kv_bytes, 57199820800.0);
  EXPECT_EQ(b.attention_flops, 419482828800000.0);
  EXPECT_NEAR(CacheLoad(b, 4, hw, 0.01), 0.9721889280429229, 1e-15);
  // Grouped-query attention reads only the KV heads: Llama-3-8B (8 of 32), 5,000 + 10 tokens:
  // M = 2 x 8 x 128 x 2 x 32 x 5010 = 656,670,720, F = 4 x 32 x 128 x 32 x 5000 x 10.
  const CacheAccess g = CacheAccessOf(ModelShape{}, 5000, 10);
  EXPECT_EQ(g.kv_bytes, 656670720.0);
  EXPECT_EQ(g.attention_flops, 26214400000.0);
  const InstanceRoofline h100{.kv_bytes_per_s = 2.5e12, .attention_flops_per_s = 5e14};
  EXPECT_NEAR(CacheLoad(g, 16, h100, 0.02), 0.0008201651769284343, 1e-15);
  // No cached work at all: no load.
  EXPECT_EQ(CacheLoad(CacheAccess{}, 4, hw, 0.01), 0.0);
  // More instances or a longer batch dilute the same access.
  EXPECT_LT(CacheLoad(b, 8, hw, 0.01), CacheLoad(b, 4, hw, 0.01));
  EXPECT_LT(CacheLoad(b, 4, hw, 0.02), CacheLoad(b, 4, hw, 0.01));
}

}  // namespace tokenlake::plan
