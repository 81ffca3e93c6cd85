// PlanStep / CommitStep over a real lake (no GPU needed): random requests with shared prefixes,
// a prefill and a few decode steps each, against a naive model of the cache (which prefixes are
// stored, and on which instances), with conservation checks after every step.
#include "tokenlake/engine/cuda/pool_steps.h"

#include <iostream>
#include <map>
#include <random>
#include <set>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/engine/control_plane.h"
#include "tokenlake/engine/cuda/gpu_test_util.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::engine::cuda {
namespace {

struct Params {
  int32_t num_instances;
  int32_t segment_tokens;
};

class PoolStepsTest : public testing::TestWithParam<Params> {};

TEST_P(PoolStepsTest, RandomRequestsMatchNaiveCacheModel) {
  const Params p = GetParam();
  const uint64_t seed = 1000 + p.num_instances * 31 + p.segment_tokens;
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  const int32_t s = p.segment_tokens;
  ManualClock clock(1);
  lake::LakeOptions lo;
  lo.num_instances = p.num_instances;
  lo.segment_tokens = s;
  lo.slots_per_instance = 4096;  // no eviction: the naive model need not follow the LRU
  lo.heavy_hitter.num_instances = p.num_instances;
  lo.model = plan::ModelShape{
      .num_layers = 2, .num_heads = 4, .num_kv_heads = 2, .head_dim = 16, .dtype_bytes = 2};
  auto lake = lake::Lake::Create(lo, &clock);
  ASSERT_TRUE(lake.ok()) << lake.status();
  LocalControlPlane control(lake->get(), &clock);
  const uint64_t salt = index::NamespaceSalt("pool-steps-test");

  std::vector<std::vector<int32_t>> docs(3);
  for (auto& d : docs) {
    d.resize(10 + rng() % 60);
    for (int32_t& t : d) t = static_cast<int32_t>(rng() % 50);
  }
  std::vector<std::vector<int32_t>> histories;      // computed tokens of earlier requests
  std::map<SegmentId, std::set<int32_t>> replicas;  // naive: where each segment is stored
  int64_t replica_count = 0;
  for (int r = 0; r < 25; ++r) {
    SCOPED_TRACE(testing::Message() << "request " << r);
    const auto& d = docs[rng() % docs.size()];
    std::vector<int32_t> seq(d.begin(), d.begin() + 1 + rng() % d.size());
    for (int k = static_cast<int>(rng() % 6); k > 0; --k) {
      seq.push_back(static_cast<int32_t>(rng() % 50));
    }
    const int64_t want_cached = testing_util::ExpectedCachedTokens(seq, histories, s);
    const RequestId id(r + 1);
    const InstanceId preferred(static_cast<int32_t>(rng() % p.num_instances));
    int64_t pooled = 0, computed = 0;
    const int steps = 1 + static_cast<int>(rng() % 4);
    for (int step = 0; step < steps; ++step) {
      const bool prefill = step == 0;
      if (!prefill) seq.push_back(static_cast<int32_t>(rng() % 50));
      auto sp = PlanStep(control, {.id = id,
                                   .salt = salt,
                                   .seq = seq,
                                   .prefill = prefill,
                                   .computed = computed,
                                   .segment_tokens = s,
                                   .preferred = preferred,
                                   .pooled = pooled});
      ASSERT_TRUE(sp.ok()) << sp.status();
      const int64_t end = static_cast<int64_t>(seq.size());
      if (prefill) {
        EXPECT_EQ(sp->plan.cached_tokens, want_cached);
        computed = sp->plan.cached_tokens;
      } else {
        EXPECT_GE(sp->plan.cached_tokens, pooled);
        EXPECT_LE(sp->plan.cached_tokens, computed / s * s);
      }
      EXPECT_EQ(sp->plan.new_tokens, end - computed);
      // The keys: all full segments, or cut to those before the first computed token.
      const int64_t first_new = prefill ? end - 1 : computed;
      const int64_t num_keys = static_cast<int64_t>(sp->keys.size());
      EXPECT_TRUE(num_keys == end / s || num_keys == first_new / s) << num_keys;
      // Every cached segment is served by an instance that holds it (naive model).
      ASSERT_EQ(static_cast<int64_t>(sp->plan.segments.size()) * s, sp->plan.cached_tokens);
      for (size_t j = 0; j < sp->plan.segments.size(); ++j) {
        const plan::SegmentAssignment& a = sp->plan.segments[j];
        EXPECT_EQ(a.segment, sp->keys[j].id);
        EXPECT_TRUE(replicas[a.segment].contains(a.holder.value()))
            << "segment " << j << " served by instance " << a.holder.value()
            << " which does not hold it";
      }
      auto commit = CommitStep(control, id, *sp, s);
      ASSERT_TRUE(commit.ok()) << commit.status();
      EXPECT_TRUE(commit->evicted.empty());
      size_t last_index = sp->plan.cached_tokens / s;
      for (const StepCommit::Store& st : commit->to_store) {
        EXPECT_GE(st.key_index, last_index);  // in key order, after the cached prefix
        last_index = st.key_index + 1;
        const SegmentId seg = sp->keys[st.key_index].id;
        EXPECT_TRUE(replicas[seg].empty()) << "stored twice";
        replicas[seg].insert(st.target.value());
        ++replica_count;
      }
      // Without eviction every full segment of the sequence is pooled after the commit.
      EXPECT_EQ(commit->pooled_tokens, static_cast<int64_t>(sp->keys.size()) * s);
      pooled = commit->pooled_tokens;
      computed = end;
      ASSERT_TRUE(control.Release(id).ok());
      // Conservation: the lake holds exactly the naive model's replicas.
      EXPECT_EQ((*lake)->Stats().replicas, replica_count);
      EXPECT_TRUE((*lake)->CheckIntegrity().ok()) << (*lake)->CheckIntegrity();
      EXPECT_EQ((*lake)->Stats().active_requests, 0);
    }
    histories.push_back(seq);  // every token of seq was computed by one of its steps
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, PoolStepsTest,
                         testing::Values(Params{1, 4}, Params{3, 4}, Params{2, 16}, Params{4, 5}),
                         [](const testing::TestParamInfo<Params>& param_info) {
                           return absl::StrFormat("N%d_S%d", param_info.param.num_instances,
                                                  param_info.param.segment_tokens);
                         });

TEST(PoolStepsTest, BadArgumentsNameTheField) {
  ManualClock clock(1);
  lake::LakeOptions lo;
  lo.num_instances = 1;
  lo.segment_tokens = 4;
  lo.slots_per_instance = 16;
  lo.heavy_hitter.num_instances = 1;
  lo.model = plan::ModelShape{
      .num_layers = 1, .num_heads = 1, .num_kv_heads = 1, .head_dim = 16, .dtype_bytes = 2};
  auto lake = lake::Lake::Create(lo, &clock);
  ASSERT_TRUE(lake.ok());
  LocalControlPlane control(lake->get(), &clock);
  const std::vector<int32_t> seq = {1, 2, 3, 4, 5};
  auto bad_s = PlanStep(control, {.id = RequestId(1), .seq = seq, .segment_tokens = 0});
  EXPECT_EQ(bad_s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_s.status().message().find("segment_tokens"), std::string::npos);
  auto empty = PlanStep(control, {.id = RequestId(1), .seq = {}, .segment_tokens = 4});
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(empty.status().message().find("empty"), std::string::npos);
  auto bad_computed = PlanStep(
      control,
      {.id = RequestId(1), .seq = seq, .prefill = false, .computed = 5, .segment_tokens = 4});
  EXPECT_EQ(bad_computed.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_computed.status().message().find("computed"), std::string::npos);
  EXPECT_EQ((*lake)->Stats().active_requests, 0);  // nothing stayed admitted
}

}  // namespace
}  // namespace tokenlake::engine::cuda
