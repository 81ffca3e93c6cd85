#include "tokenlake/engine/sampler.h"

#include <cmath>
#include <iostream>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace tokenlake::engine {
namespace {

// Logits ln 1, ln 2, ln 3: softmax probabilities 1/6, 2/6, 3/6.
const std::vector<float> kLogits = {0.0f, std::log(2.0f), std::log(3.0f)};

std::vector<double> Frequencies(const SamplingParams& p, int draws) {
  Sampler s(p);
  std::vector<double> f(kLogits.size());
  for (int i = 0; i < draws; ++i) f[static_cast<size_t>(s.Next(kLogits))] += 1;
  for (double& x : f) x /= draws;  // exact for 0 and all draws
  return f;
}

// Within 5 standard deviations of a binomial frequency.
void ExpectFrequency(double got, double want, int draws) {
  const double sd = std::sqrt(want * (1 - want) / draws);
  EXPECT_NEAR(got, want, 5 * sd + 1e-12);
}

TEST(SamplerTest, MatchesTheSoftmaxTopKAndTopP) {
  const uint64_t seed = std::random_device{}();
  std::cout << "seed=" << seed << "\n";
  constexpr int kDraws = 60000;
  auto f = Frequencies({.temperature = 1.0f, .seed = seed}, kDraws);
  ExpectFrequency(f[0], 1.0 / 6, kDraws);
  ExpectFrequency(f[1], 2.0 / 6, kDraws);
  ExpectFrequency(f[2], 3.0 / 6, kDraws);
  // top_k = 2 keeps ids 2 and 1: 3/5 and 2/5.
  f = Frequencies({.temperature = 1.0f, .top_k = 2, .seed = seed + 1}, kDraws);
  EXPECT_EQ(f[0], 0.0);
  ExpectFrequency(f[1], 2.0 / 5, kDraws);
  ExpectFrequency(f[2], 3.0 / 5, kDraws);
  // top_p = 0.5: id 2 alone reaches 1/2. top_p = 0.6: ids 2 and 1.
  f = Frequencies({.temperature = 1.0f, .top_p = 0.5f, .seed = seed + 2}, kDraws);
  EXPECT_EQ(f[2], 1.0);
  f = Frequencies({.temperature = 1.0f, .top_p = 0.6f, .seed = seed + 3}, kDraws);
  EXPECT_EQ(f[0], 0.0);
  ExpectFrequency(f[2], 3.0 / 5, kDraws);
  // temperature 0.5 squares the ratios: 1, 4, 9 (/14).
  f = Frequencies({.temperature = 0.5f, .seed = seed + 4}, kDraws);
  ExpectFrequency(f[0], 1.0 / 14, kDraws);
  ExpectFrequency(f[2], 9.0 / 14, kDraws);
}

TEST(SamplerTest, GreedyAndSeededRepeatability) {
  Sampler greedy({});
  EXPECT_EQ(greedy.Next(std::vector<float>{1.0f, 3.0f, 3.0f, 2.0f}), 1);  // first maximum
  Sampler k1({.temperature = 2.0f, .top_k = 1, .seed = 9});
  EXPECT_EQ(k1.Next(kLogits), 2);
  Sampler a({.temperature = 1.0f, .seed = 42}), b({.temperature = 1.0f, .seed = 42});
  Sampler c({.temperature = 1.0f, .seed = 43});
  std::vector<int32_t> ta, tb, tc;
  for (int i = 0; i < 64; ++i) {
    ta.push_back(a.Next(kLogits));
    tb.push_back(b.Next(kLogits));
    tc.push_back(c.Next(kLogits));
  }
  EXPECT_EQ(ta, tb);
  EXPECT_NE(ta, tc);
}

TEST(SamplerTest, BadParametersNameTheField) {
  EXPECT_NE(SamplingParams{.temperature = -1}.Validate().message().find("temperature"),
            std::string::npos);
  EXPECT_NE(SamplingParams{.temperature = INFINITY}.Validate().message().find("temperature"),
            std::string::npos);
  EXPECT_NE(SamplingParams{.top_k = -2}.Validate().message().find("top_k"), std::string::npos);
  EXPECT_NE(SamplingParams{.top_p = 0}.Validate().message().find("top_p"), std::string::npos);
  EXPECT_NE(SamplingParams{.top_p = 1.5f}.Validate().message().find("top_p"), std::string::npos);
  const SamplingParams good{.temperature = 0.7f, .top_k = 40, .top_p = 0.9f};
  EXPECT_TRUE(good.Validate().ok());
}

}  // namespace
}  // namespace tokenlake::engine
