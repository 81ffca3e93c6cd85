// The model's building blocks against values computed by hand (with the formulas of the ops.h
// comment, in double precision, outside this code).
#include "tokenlake/engine/ops.h"

#include <cmath>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace tokenlake::engine {
namespace {

TEST(OpsTest, RmsNormMatchesHandComputedValues) {
  // x = [1, 2, 3, 4]: mean(x^2) = 7.5; 1 / sqrt(7.5 + 1e-6) = 0.36514834...
  const std::vector<float> x = {1, 2, 3, 4, 1, 2, 3, 4};
  const std::vector<float> w = {1, 1, 2, 0.5f};
  std::vector<float> y(8);
  RmsNorm(x, w, 1e-6f, absl::MakeSpan(y));
  const float expected[4] = {0.36514835f, 0.73029669f, 2.19089008f, 0.73029669f};
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(y[i], expected[i % 4], 1e-6) << i;
  // In place, and eps matters for a zero row.
  std::vector<float> z = {0, 0, 0, 0};
  RmsNorm(z, w, 1e-5f, absl::MakeSpan(z));
  for (float v : z) EXPECT_EQ(v, 0.0f);
}

TEST(OpsTest, RopeInvFreqIsThetaPowers) {
  const std::vector<float> inv = RopeInvFreq(8, 500000.0);
  ASSERT_EQ(inv.size(), 4u);
  EXPECT_FLOAT_EQ(inv[0], 1.0f);
  EXPECT_FLOAT_EQ(inv[1], 0.037606031f);
  EXPECT_FLOAT_EQ(inv[2], 0.0014142136f);
  EXPECT_FLOAT_EQ(inv[3], 5.3182959e-05f);
}

TEST(OpsTest, RopeRotatesHalvesByPositionTimesFrequency) {
  // head_dim 4, theta 10000: inv_freq = [1, 0.01]. Pairs are (x0, x2) and (x1, x3).
  const std::vector<float> inv = RopeInvFreq(4, 10000.0);
  ASSERT_FLOAT_EQ(inv[1], 0.01f);
  // Two tokens with start_pos 1 (positions 1 and 2), two heads each.
  std::vector<float> x = {1, 2, 3, 4, 1, 2, 3, 4,   // token 0 (position 1), heads 0 and 1
                          1, 2, 3, 4, 1, 2, 3, 4};  // token 1 (position 2)
  ApplyRope(absl::MakeSpan(x), 2, 2, 4, 1, inv);
  const float pos1[4] = {-1.98411065f, 1.95990067f, 2.46237790f, 4.01979967f};
  for (int i = 0; i < 8; ++i) EXPECT_NEAR(x[i], pos1[i % 4], 2e-6) << i;
  // Position 2 = rotation by 2 * frequency.
  const float c1 = std::cos(2.0f), s1 = std::sin(2.0f), c2 = std::cos(0.02f), s2 = std::sin(0.02f);
  const float pos2[4] = {1 * c1 - 3 * s1, 2 * c2 - 4 * s2, 3 * c1 + 1 * s1, 4 * c2 + 2 * s2};
  for (int i = 8; i < 16; ++i) EXPECT_NEAR(x[i], pos2[i % 4], 2e-6) << i;
  // Position 0 is the identity; start_pos 3 matches the hand value.
  std::vector<float> y = {1, 2, 3, 4};
  ApplyRope(absl::MakeSpan(y), 1, 1, 4, 0, inv);
  EXPECT_EQ(y, (std::vector<float>{1, 2, 3, 4}));
  ApplyRope(absl::MakeSpan(y), 1, 1, 4, 3, inv);
  const float pos3[4] = {-1.41335252f, 1.87911807f, -2.82885748f, 4.05819114f};
  for (int i = 0; i < 4; ++i) EXPECT_NEAR(y[i], pos3[i], 2e-6) << i;
}

// Rows are computed in blocks of 4 (each weight row read once per block); a row's result must
// not depend on the rows batched with it: bit-identical to the same row alone.
TEST(OpsTest, LinearRowDoesNotDependOnItsBatch) {
  std::mt19937 rng(31);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  for (int32_t in : {5, 8, 37}) {
    const int32_t n = 11, out = 6;
    std::vector<float> x(static_cast<size_t>(n) * in), w(static_cast<size_t>(out) * in);
    for (float& v : x) v = u(rng);
    for (float& v : w) v = u(rng);
    std::vector<float> y(static_cast<size_t>(n) * out);
    Linear(x, n, in, w, out, absl::MakeSpan(y));
    for (int32_t t = 0; t < n; ++t) {
      std::vector<float> alone(static_cast<size_t>(out));
      Linear(absl::MakeConstSpan(x).subspan(static_cast<size_t>(t) * in, in), 1, in, w, out,
             absl::MakeSpan(alone));
      for (int32_t o = 0; o < out; ++o) {
        EXPECT_EQ(y[static_cast<size_t>(t) * out + o], alone[static_cast<size_t>(o)])
            << "row " << t << " out " << o << " in " << in;
        double ref = 0;
        for (int32_t i = 0; i < in; ++i) {
          ref += double{x[static_cast<size_t>(t) * in + i]} * w[static_cast<size_t>(o) * in + i];
        }
        EXPECT_NEAR(alone[static_cast<size_t>(o)], ref, 1e-5);
      }
    }
  }
}

TEST(OpsTest, LinearIsXTimesWTransposed) {
  // x [2][3], W [2][3] -> y [2][2]; also a long row (tail of the unrolled loop).
  const std::vector<float> x = {1, 2, 3, -1, 0, 2};
  const std::vector<float> w = {1, 0, 1, 2, -1, 0.5f};
  std::vector<float> y(4);
  Linear(x, 2, 3, w, 2, absl::MakeSpan(y));
  EXPECT_EQ(y, (std::vector<float>{4, 1.5f, 1, -1}));
  // x = 1..13, w = +1 at even indices, -0.5 at odd: (1+3+...+13) - 0.5 (2+4+...+12) = 49 - 21.
  std::vector<float> xl(13), wl(13);
  for (int i = 0; i < 13; ++i) {
    xl[i] = static_cast<float>(i + 1);
    wl[i] = (i % 2 == 0) ? 1.0f : -0.5f;
  }
  std::vector<float> yl(1);
  Linear(xl, 1, 13, wl, 1, absl::MakeSpan(yl));
  EXPECT_FLOAT_EQ(yl[0], 28.0f);
}

TEST(OpsTest, SiluAndArgmax) {
  EXPECT_EQ(Silu(0.0f), 0.0f);
  EXPECT_NEAR(Silu(1.0f), 0.73105858f, 1e-7);
  EXPECT_NEAR(Silu(-2.0f), -0.23840584f, 1e-7);
  const std::vector<float> v = {0.5f, 3.0f, -1.0f, 3.0f};
  EXPECT_EQ(Argmax(v), 1);  // first of the ties
  const std::vector<float> one = {-7.0f};
  EXPECT_EQ(Argmax(one), 0);
}

}  // namespace
}  // namespace tokenlake::engine
