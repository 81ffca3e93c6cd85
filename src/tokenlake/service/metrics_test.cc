#include "tokenlake/service/metrics.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

TEST(HistogramTest, CountsCumulativelyAndEstimatesQuantiles) {
  Histogram h({1, 2, 5});
  for (double v : {0.5, 1.0, 1.5, 3.0, 10.0}) h.Observe(v);
  Histogram::Snapshot s = h.Read();
  EXPECT_EQ(s.cumulative_counts, (std::vector<int64_t>{2, 3, 4, 5}));
  EXPECT_EQ(s.count, 5);
  EXPECT_DOUBLE_EQ(s.sum, 16.0);
  EXPECT_DOUBLE_EQ(h.Quantile(0.4), 1);
  EXPECT_DOUBLE_EQ(h.Quantile(0.6), 2);
  EXPECT_DOUBLE_EQ(h.Quantile(1.0), 10);  // +Inf bucket: the largest value
  EXPECT_DOUBLE_EQ(Histogram({1}).Quantile(0.5), 0);
}

TEST(PrometheusWriterTest, WritesFamiliesSamplesAndHistograms) {
  PrometheusWriter w;
  w.Family("x_total", "counter", "Things.");
  w.Sample("x_total", {{"instance", "0"}, {"name", "a\"b\\c\nd"}}, 3);
  Histogram h({0.5});
  h.Observe(0.25);
  h.Observe(0.75);
  w.Family("lat_seconds", "histogram", "Latency.");
  w.HistogramSamples("lat_seconds", {}, h.Read());
  const std::string& t = w.text();
  EXPECT_THAT(t, HasSubstr("# HELP x_total Things.\n# TYPE x_total counter\n"));
  EXPECT_THAT(t, HasSubstr("x_total{instance=\"0\",name=\"a\\\"b\\\\c\\nd\"} 3\n"));
  EXPECT_THAT(t, HasSubstr("lat_seconds_bucket{le=\"0.5\"} 1\n"));
  EXPECT_THAT(t, HasSubstr("lat_seconds_bucket{le=\"+Inf\"} 2\n"));
  EXPECT_THAT(t, HasSubstr("lat_seconds_sum 1\n"));
  EXPECT_THAT(t, HasSubstr("lat_seconds_count 2\n"));
}

}  // namespace
}  // namespace tokenlake::service
