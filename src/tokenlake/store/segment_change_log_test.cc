// SegmentChangeLog against a naive model: every change ever recorded, and the number up to which
// they are forgotten (trimmed, or dropped when the log overflowed).
#include "tokenlake/store/segment_change_log.h"

#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/random.h"
#include "tokenlake/base/random_testing.h"

namespace tokenlake::store {
namespace {

TEST(SegmentChangeLogTest, NumbersChangesAndReturnsThoseAfterANumber) {
  SegmentChangeLog log(8);
  EXPECT_EQ(log.last(), 0u);
  EXPECT_EQ(log.Since(0), std::vector<SegmentChange>{});
  const SegmentChange a{.id = SegmentId(1), .stored = true, .parent = SegmentId(), .num_tokens = 4};
  const SegmentChange b{.id = SegmentId(1), .stored = false};
  EXPECT_EQ(log.Record(a), 1u);
  EXPECT_EQ(log.Record(b), 2u);
  EXPECT_EQ(log.Since(0), (std::vector<SegmentChange>{a, b}));
  EXPECT_EQ(log.Since(1), std::vector<SegmentChange>{b});
  EXPECT_EQ(log.Since(2), std::vector<SegmentChange>{});
  EXPECT_EQ(log.Since(3), std::nullopt);  // the future
  log.Trim(1);
  EXPECT_EQ(log.Since(0), std::nullopt);  // forgotten
  EXPECT_EQ(log.Since(1), std::vector<SegmentChange>{b});
  log.Trim(99);  // past the end: up to last()
  EXPECT_EQ(log.first(), 2u);
  EXPECT_EQ(log.size(), 0);
}

TEST(SegmentChangeLogTest, AnOverflowForgetsEverythingUnacknowledged) {
  SegmentChangeLog log(2);
  log.Record({.id = SegmentId(1)});
  log.Record({.id = SegmentId(2)});
  log.Record({.id = SegmentId(3)});  // a third: all forgotten
  EXPECT_EQ(log.last(), 3u);
  EXPECT_EQ(log.Since(0), std::nullopt);
  EXPECT_EQ(log.Since(2), std::nullopt);
  EXPECT_EQ(log.Since(3), std::vector<SegmentChange>{});  // a full report at 3 catches up
  log.Record({.id = SegmentId(4)});
  EXPECT_EQ(log.Since(3), std::vector<SegmentChange>{SegmentChange{.id = SegmentId(4)}});
  // Keeping nothing: only numbers.
  SegmentChangeLog numbers(0);
  EXPECT_EQ(numbers.Record({.id = SegmentId(1)}), 1u);
  EXPECT_EQ(numbers.Record({.id = SegmentId(1), .stored = false}), 2u);
  EXPECT_EQ(numbers.size(), 0);
  EXPECT_EQ(numbers.Since(1), std::nullopt);
}

TEST(SegmentChangeLogTest, RandomRecordsTrimsAndReadsMatchAModel) {
  const uint64_t seed = TestSeed(77);
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  Rng rng(seed);
  for (int64_t max_entries : {0, 1, 5, 40}) {
    SegmentChangeLog log(max_entries);
    std::vector<SegmentChange> all;  // all[k] is change k + 1
    uint64_t forgotten = 0;          // changes 1 .. forgotten are gone
    for (int step = 0; step < 3000; ++step) {
      const double dice = rng.UniformDouble();
      if (dice < 0.6) {
        const SegmentChange c{.id = SegmentId(static_cast<uint64_t>(rng.UniformInt(1, 20))),
                              .stored = rng.Bernoulli(0.5),
                              .parent = SegmentId(static_cast<uint64_t>(rng.UniformInt(0, 20))),
                              .num_tokens = static_cast<int32_t>(rng.UniformInt(1, 16))};
        all.push_back(c);
        ASSERT_EQ(log.Record(c), all.size());
        if (static_cast<int64_t>(all.size() - forgotten) > max_entries) forgotten = all.size();
      } else if (dice < 0.75) {
        const uint64_t through = static_cast<uint64_t>(rng.UniformInt(0, all.size() + 2));
        log.Trim(through);
        forgotten = std::max<uint64_t>(forgotten, std::min<uint64_t>(through, all.size()));
      }
      const uint64_t from = static_cast<uint64_t>(rng.UniformInt(0, all.size() + 1));
      const std::optional<std::vector<SegmentChange>> got = log.Since(from);
      if (from < forgotten || from > all.size()) {
        ASSERT_EQ(got, std::nullopt) << "step " << step << " from " << from;
      } else {
        ASSERT_EQ(got,
                  std::vector<SegmentChange>(all.begin() + static_cast<int64_t>(from), all.end()))
            << "step " << step << " from " << from;
      }
      ASSERT_EQ(log.last(), all.size());
      ASSERT_EQ(log.first(), forgotten);
      ASSERT_EQ(log.size(), static_cast<int64_t>(all.size() - forgotten));
      ASSERT_LE(log.size(), max_entries);
    }
  }
}

}  // namespace
}  // namespace tokenlake::store
