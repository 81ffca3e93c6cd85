// The engine against Hugging Face transformers: tests/fixtures/llama_tiny (made by
// tools/make_llama_fixture.py) holds two tiny random-init Llama checkpoints, prompts with shared
// prefixes, and transformers' greedy tokens and logits (CPU, float32). The engine must give the
// same greedy tokens and logits within 1e-4, without the pool and with it across 1, 2 and 4
// instances, and with the pool it must serve repeated prefixes from the cache.
#include <algorithm>
#include <cmath>
#include <iostream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/fixture_test_util.h"
#include "tokenlake/engine/llama_model.h"

namespace tokenlake::engine {
namespace {

using json = nlohmann::json;

using testing_fixture::ExpectedCachedTokens;

using Fixture = testing_fixture::LlamaTinyFixture;
std::string FixtureDir() { return testing_fixture::LlamaTinyDir(); }
const Fixture& LoadFixture() { return testing_fixture::LoadLlamaTinyFixture(); }

struct Case {
  std::string model;
  bool use_pool;
  int32_t num_instances;
  int32_t segment_tokens;
  bool rotate = false;
};

std::string CaseName(const testing::TestParamInfo<Case>& info) {
  const Case& c = info.param;
  if (!c.use_pool) return c.model + "_NoPool";
  return absl::StrFormat("%s_Pool%dInstances_S%d%s", c.model, c.num_instances, c.segment_tokens,
                         c.rotate ? "_Rotating" : "");
}

class EngineFixtureTest : public testing::TestWithParam<Case> {};

TEST_P(EngineFixtureTest, MatchesTransformersGreedyTokensAndLogits) {
  const Case& c = GetParam();
  const Fixture& fx = LoadFixture();
  ASSERT_FALSE(fx.prompts.empty()) << "fixture not found under " << FixtureDir();
  auto model = LlamaModel::Load(FixtureDir() + "/" + c.model);
  ASSERT_TRUE(model.ok()) << model.status();
  EngineOptions options{.use_pool = c.use_pool,
                        .num_instances = c.num_instances,
                        .segment_tokens = c.segment_tokens,
                        .slots_per_instance = 256,
                        .rotate_compute_instance = c.rotate};
  auto engine = Engine::Create(model->get(), options);
  ASSERT_TRUE(engine.ok()) << engine.status();
  const json& exp = fx.expected["models"][c.model];
  const int32_t max_new = fx.expected["max_new_tokens"].get<int32_t>();
  std::vector<std::vector<int32_t>> histories;
  int64_t total_cached = 0;
  float worst_last = 0, worst_dec = 0;
  int64_t remote_attends = 0, pulls = 0, stored = 0, remote_stored = 0;
  for (size_t i = 0; i < fx.prompts.size(); ++i) {
    SCOPED_TRACE(testing::Message() << "prompt " << i);
    const auto& prompt = fx.prompts[i];
    auto result = (*engine)->Generate(prompt, max_new);
    ASSERT_TRUE(result.ok()) << result.status();
    EXPECT_EQ(result->tokens, exp["greedy"][i].get<std::vector<int32_t>>());
    const auto last = exp["last_logits"][i].get<std::vector<float>>();
    const auto dec = exp["decode_logits"][i].get<std::vector<float>>();
    ASSERT_EQ(result->last_logits.size(), last.size());
    ASSERT_EQ(result->decode_logits.size(), dec.size());
    float max_err = 0, max_dec_err = 0;
    for (size_t v = 0; v < last.size(); ++v) {
      max_err = std::max(max_err, std::abs(result->last_logits[v] - last[v]));
      max_dec_err = std::max(max_dec_err, std::abs(result->decode_logits[v] - dec[v]));
    }
    worst_last = std::max(worst_last, max_err);
    worst_dec = std::max(worst_dec, max_dec_err);
    EXPECT_LE(max_err, 1e-4f);
    EXPECT_LE(max_dec_err, 1e-4f);
    if (c.use_pool) {
      EXPECT_EQ(result->cached_tokens, ExpectedCachedTokens(prompt, histories, c.segment_tokens));
    } else {
      EXPECT_EQ(result->cached_tokens, 0);
    }
    total_cached += result->cached_tokens;
    remote_attends += result->remote_attend_calls;
    pulls += result->pulled_segments;
    stored += result->stored_segments;
    remote_stored += result->remote_stored_segments;
    std::vector<int32_t> h = prompt;
    h.insert(h.end(), result->tokens.begin(), result->tokens.end() - 1);
    histories.push_back(std::move(h));
  }
  if (c.use_pool) {
    EXPECT_GT(total_cached, 0);
    EXPECT_GT(stored, 0);
    EXPECT_TRUE((*engine)->lake()->CheckIntegrity().ok()) << (*engine)->lake()->CheckIntegrity();
    // The data plane's stores hold exactly the lake's replicas.
    int64_t data_segments = 0;
    for (int32_t i = 0; i < c.num_instances; ++i) {
      data_segments += (*engine)->instance_pool()->store(InstanceId(i)).used();
    }
    EXPECT_EQ(data_segments, (*engine)->lake()->Stats().replicas);
  }
  if (c.rotate && c.num_instances > 1) {
    EXPECT_GT(remote_attends + pulls, 0) << "cached segments were never served by another instance";
  }
  std::cout << CaseName({c, 0}) << ": worst |logit - transformers| last " << worst_last
            << " decode " << worst_dec << ", cached tokens " << total_cached
            << ", remote attend calls " << remote_attends << ", pulled segments " << pulls
            << ", stored segments " << stored << " (" << remote_stored << " remote)\n";
}

// Every prompt submitted at once (continuous batching: prompts prefilled in chunks under a
// small token budget, beside other requests' decodes), in the fixture's order and reversed:
// each request's tokens and logits still equal transformers'.
class EngineFixtureBatchTest : public testing::TestWithParam<Case> {};

TEST_P(EngineFixtureBatchTest, AllPromptsAtOnceMatchTransformersWhateverTheBatch) {
  const Case& c = GetParam();
  const Fixture& fx = LoadFixture();
  ASSERT_FALSE(fx.prompts.empty()) << "fixture not found under " << FixtureDir();
  auto model = LlamaModel::Load(FixtureDir() + "/" + c.model);
  ASSERT_TRUE(model.ok()) << model.status();
  const json& exp = fx.expected["models"][c.model];
  const int32_t max_new = fx.expected["max_new_tokens"].get<int32_t>();
  for (const int64_t budget : {int64_t{2048}, int64_t{7}}) {
    for (const bool reversed : {false, true}) {
      SCOPED_TRACE(testing::Message() << "budget " << budget << (reversed ? " reversed" : ""));
      auto engine = Engine::Create(model->get(), {.use_pool = true,
                                                  .num_instances = c.num_instances,
                                                  .segment_tokens = c.segment_tokens,
                                                  .slots_per_instance = 256,
                                                  .rotate_compute_instance = c.rotate,
                                                  .max_batch_tokens = budget});
      ASSERT_TRUE(engine.ok()) << engine.status();
      std::vector<GenerateRequest> requests;
      std::vector<size_t> index;
      for (size_t k = 0; k < fx.prompts.size(); ++k) {
        const size_t i = reversed ? fx.prompts.size() - 1 - k : k;
        requests.push_back({.prompt = fx.prompts[i], .max_new_tokens = max_new});
        index.push_back(i);
      }
      std::vector<absl::StatusOr<GenerateResult>> results = (*engine)->GenerateBatch(requests);
      ASSERT_EQ(results.size(), requests.size());
      float worst = 0;
      for (size_t k = 0; k < results.size(); ++k) {
        const size_t i = index[k];
        SCOPED_TRACE(testing::Message() << "prompt " << i);
        ASSERT_TRUE(results[k].ok()) << results[k].status();
        EXPECT_EQ(results[k]->tokens, exp["greedy"][i].get<std::vector<int32_t>>());
        const auto last = exp["last_logits"][i].get<std::vector<float>>();
        const auto dec = exp["decode_logits"][i].get<std::vector<float>>();
        ASSERT_EQ(results[k]->last_logits.size(), last.size());
        ASSERT_EQ(results[k]->decode_logits.size(), dec.size());
        for (size_t v = 0; v < last.size(); ++v) {
          worst = std::max(worst, std::abs(results[k]->last_logits[v] - last[v]));
          worst = std::max(worst, std::abs(results[k]->decode_logits[v] - dec[v]));
        }
      }
      EXPECT_LE(worst, 1e-4f);
      EXPECT_GT((*engine)->max_batch_requests_seen(), 1);
      EXPECT_TRUE((*engine)->lake()->CheckIntegrity().ok());
      EXPECT_EQ((*engine)->lake()->Stats().pinned_segments, 0);
      std::cout << CaseName({c, 0}) << " all at once, budget " << budget
                << (reversed ? ", reversed" : "") << ": worst |logit - transformers| " << worst
                << ", most requests in one iteration " << (*engine)->max_batch_requests_seen()
                << "\n";
    }
  }
}

std::vector<Case> Cases() {
  std::vector<Case> cases;
  for (const char* m : {"model", "tied_bf16"}) {
    cases.push_back({m, false, 1, 16});
    for (int n : {1, 2, 4}) cases.push_back({m, true, n, 16});
    cases.push_back({m, true, 3, 5});
    cases.push_back({m, true, 2, 16, true});
    cases.push_back({m, true, 4, 8, true});
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Fixture, EngineFixtureTest, testing::ValuesIn(Cases()), CaseName);

// Batching is the pool path's: the pool cases only.
std::vector<Case> PoolCases() {
  std::vector<Case> cases;
  for (const Case& c : Cases()) {
    if (c.use_pool) cases.push_back(c);
  }
  return cases;
}

INSTANTIATE_TEST_SUITE_P(Fixture, EngineFixtureBatchTest, testing::ValuesIn(PoolCases()), CaseName);

}  // namespace
}  // namespace tokenlake::engine
