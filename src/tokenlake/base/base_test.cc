#include <cstdlib>
#include <set>
#include <sstream>
#include <string>

#include "absl/container/flat_hash_map.h"
#include "gtest/gtest.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/hash.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/base/random.h"
#include "tokenlake/base/random_testing.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake {
namespace {

TEST(StrongIdTest, DefaultIsInvalidAndIdsCompareByValue) {
  EXPECT_FALSE(SegmentId().valid());
  EXPECT_TRUE(SegmentId(0).valid());
  EXPECT_LT(InstanceId(1), InstanceId(2));
  EXPECT_EQ(SegmentId(7), SegmentId(7));
  std::ostringstream os;
  os << InstanceId(3) << " " << InstanceId();
  EXPECT_EQ(os.str(), "InstanceId(3) InstanceId(invalid)");
}

TEST(StrongIdTest, UsableAsAbslHashKey) {
  absl::flat_hash_map<SegmentId, int> map;
  map[SegmentId(1)] = 1;
  map[SegmentId(2)] = 2;
  EXPECT_EQ(map.at(SegmentId(2)), 2);
}

TEST(ManualClockTest, MovesOnlyWhenTold) {
  ManualClock clock(100);
  EXPECT_EQ(clock.NowUs(), 100);
  clock.AdvanceUs(5);
  EXPECT_EQ(clock.NowUs(), 105);
  clock.SetUs(200);
  EXPECT_EQ(clock.NowUs(), 200);
  EXPECT_DEATH(clock.SetUs(10), "cannot go backwards");
}

TEST(SystemClockTest, IsMonotonic) {
  const int64_t a = SystemClock::Default()->NowUs();
  const int64_t b = SystemClock::Default()->NowUs();
  EXPECT_LE(a, b);
}

TEST(RngTest, SameSeedSameStreamAndStdEngineOutput) {
  Rng a(42), b(42);
  for (int i = 0; i < 100; ++i) EXPECT_EQ(a.Next64(), b.Next64());
  // The standard fixes mt19937_64's 10000th output for the default seed.
  Rng c(5489);
  uint64_t x = 0;
  for (int i = 0; i < 10000; ++i) x = c.Next64();
  EXPECT_EQ(x, 9981545732273789042ULL);
}

TEST(RngTest, UniformIntStaysInRangeAndCoversIt) {
  Rng rng(1);
  std::set<int64_t> seen;
  for (int i = 0; i < 2000; ++i) {
    const int64_t v = rng.UniformInt(-3, 3);
    ASSERT_GE(v, -3);
    ASSERT_LE(v, 3);
    seen.insert(v);
  }
  EXPECT_EQ(seen.size(), 7u);
  EXPECT_EQ(rng.UniformInt(5, 5), 5);
}

TEST(RngTest, ExponentialHasTheRequestedMean) {
  Rng rng(7);
  double sum = 0;
  constexpr int kDraws = 200000;
  for (int i = 0; i < kDraws; ++i) sum += rng.Exponential(2.0);
  EXPECT_NEAR(sum / kDraws, 2.0, 0.05);
}

TEST(HashTest, KnownXxh3ValuesAndOrderSensitivity) {
  // XXH3_64bits of the empty input with seed 0 (the xxHash reference value).
  EXPECT_EQ(HashBytes("", 0, 0), 0x2D06800538D394C2ULL);
  EXPECT_NE(HashCombine(1, 2), HashCombine(2, 1));
  EXPECT_NE(HashString("a", 1), HashString("a", 2));
}

absl::StatusOr<int> ParsePositive(int x) {
  if (x <= 0) return absl::InvalidArgumentError("not positive");
  return x;
}

absl::Status Twice(int x, int* out) {
  TOKENLAKE_ASSIGN_OR_RETURN(const int v, ParsePositive(x));
  TOKENLAKE_RETURN_IF_ERROR(absl::OkStatus());
  *out = 2 * v;
  return absl::OkStatus();
}

TEST(StatusMacrosTest, PropagateErrorsAndValues) {
  int out = 0;
  EXPECT_TRUE(Twice(4, &out).ok());
  EXPECT_EQ(out, 8);
  EXPECT_EQ(Twice(-1, &out).code(), absl::StatusCode::kInvalidArgument);
}

TEST(CheckTest, FailureNamesTheCondition) {
  EXPECT_DEATH(TOKENLAKE_CHECK(1 + 1 == 3, "arithmetic"), "1 \\+ 1 == 3: arithmetic");
}

TEST(TestSeedTest, IsTheBaseMovedByTheEnvironment) {
  const char* before = std::getenv("TOKENLAKE_TEST_SEED");
  const std::string saved = before != nullptr ? before : "";
  unsetenv("TOKENLAKE_TEST_SEED");
  EXPECT_EQ(TestSeed(41), 41u);
  setenv("TOKENLAKE_TEST_SEED", "5", 1);
  EXPECT_EQ(TestSeed(41), 46u);
  EXPECT_EQ(TestSeed(0), 5u);
  if (before != nullptr) {
    setenv("TOKENLAKE_TEST_SEED", saved.c_str(), 1);
  } else {
    unsetenv("TOKENLAKE_TEST_SEED");
  }
}

}  // namespace
}  // namespace tokenlake
