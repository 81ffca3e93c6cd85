#include "tokenlake/sim/report.h"

#include <filesystem>
#include <fstream>
#include <sstream>
#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/sim/svg.h"

namespace tokenlake::sim {
namespace {

using ::testing::HasSubstr;

int Count(const std::string& s, const std::string& needle) {
  int n = 0;
  for (size_t p = s.find(needle); p != std::string::npos; p = s.find(needle, p + 1)) ++n;
  return n;
}

TEST(SvgTest, BarChartDrawsOneBarPerValueAndEscapesLabels) {
  const std::string s = svg::BarChart("T<1>", "rps", {{"a&b", 1.5}, {"c", 3}, {"d", 0}});
  EXPECT_EQ(s.rfind("<svg", 0), 0u);
  EXPECT_THAT(s, HasSubstr("</svg>"));
  EXPECT_THAT(s, HasSubstr("T&lt;1&gt;"));
  EXPECT_THAT(s, HasSubstr("a&amp;b"));
  EXPECT_EQ(Count(s, "<rect x="), 3);  // the background rect has no x
  EXPECT_THAT(s, HasSubstr(">1.5<"));
}

TEST(SvgTest, LongTitlesShrinkToFitTheWidthAndShortOnesKeepTheirSize) {
  EXPECT_THAT(svg::BarChart("Short", "rps", {{"a", 1}}),
              HasSubstr("font-size=\"15.0\" font-weight=\"bold\">Short<"));
  // 100 characters at 0.6 em each must fit in 640 - 20 px: 620 / 60 = 10.3 px.
  const std::string long_title(100, 'x');
  EXPECT_THAT(svg::BarChart(long_title, "rps", {{"a", 1}}),
              HasSubstr("font-size=\"10.3\" font-weight=\"bold\">" + long_title + "<"));
}

TEST(SvgTest, LineChartSkipsNonFiniteAndNonPositiveLogPoints) {
  svg::Series a{"a", {0.0, 1, 10, std::numeric_limits<double>::infinity()}, {0.1, 0.2, 0.5, 1}};
  svg::LineOptions o;
  o.log_x = true;
  const std::string s = svg::LineChart("cdf", {a}, o);
  EXPECT_EQ(Count(s, "<polyline"), 1);
  const size_t p = s.find("points=\"");
  ASSERT_NE(p, std::string::npos);
  const std::string points = s.substr(p + 8, s.find('"', p + 8) - p - 8);
  EXPECT_EQ(Count(points, ","), 2);  // only x = 1 and x = 10 are drawable
}

TEST(SvgTest, HeatmapHasOneCellPerValue) {
  const std::string s = svg::Heatmap("load", {{0, 0.5, 1}, {1, 1, 1}}, {"g0", "g1"}, "t", 30);
  EXPECT_EQ(Count(s, "<rect x="), 6);
  EXPECT_THAT(s, HasSubstr("g1"));
}

TEST(ReportTest, WritesPlotsAndIndexAndFailsCleanlyOnABadPath) {
  PolicyRun run;
  run.summary.policy = "round-robin";
  run.summary.max_rate_rps = 2.5;
  run.result.busy_s = {1, 2};
  run.result.load = {{0.1, 0.9}, {0.5, 0.5}};
  run.result.sample_period_s = 10;
  RequestRecord rec;
  rec.arrival_s = 0;
  rec.first_token_s = 0.5;
  run.result.records = {rec};
  const std::string dir =
      (std::filesystem::temp_directory_path() / "tokenlake_report_test").string();
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(WriteReport(dir, "unit", {run}, nlohmann::json::object()).ok());
  for (const char* f : {"index.html", "max_rate.svg", "ttft_cdf.svg", "hit_rate.svg",
                        "bytes_moved.svg", "load_round-robin.svg"}) {
    EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(dir) / f)) << f;
  }
  std::ifstream in(std::filesystem::path(dir) / "index.html");
  std::stringstream html;
  html << in.rdbuf();
  EXPECT_THAT(html.str(), HasSubstr("max_rate.svg"));
  EXPECT_THAT(FormatTable({run}), HasSubstr("2.500"));
  EXPECT_FALSE(WriteReport("/proc/no/such/dir", "x", {run}, {}).ok());
  std::filesystem::remove_all(dir);
}

TEST(ReportTest, PdRowsAreMarkedStateTheirDramStoreAndGetSafeFileNames) {
  auto make = [](const std::string& policy, const std::string& split, bool best) {
    PolicyRun run;
    run.summary.policy = policy;
    run.summary.pd_split = split;
    run.summary.best_pd_split = best;
    run.summary.max_rate_rps = 1;
    run.summary.kv_capacity_bytes_per_instance = 2'000'000'000;
    run.summary.kv_capacity_bytes_total = 4'000'000'000;
    run.result.busy_s = {1, 1};
    run.result.load = {{0.5, 0.5}};
    run.result.sample_period_s = 10;
    return run;
  };
  std::vector<PolicyRun> runs = {make("pd-disagg 1P:1D", "1P:1D", true),
                                 make("pd-disagg+dram 1P:1D", "1P:1D", true)};
  runs[1].summary.dram_bytes_per_prefill_instance = 3'000'000'000;
  runs[1].summary.dram_bytes_total = 3'000'000'000;
  runs[1].summary.dram_gbps = 25;
  const std::string table = FormatTable(runs);
  EXPECT_THAT(table, HasSubstr("pd-disagg 1P:1D *"));
  EXPECT_THAT(table, HasSubstr("* the best prefill:decode split of its policy: highest max rate"));
  EXPECT_THAT(table, HasSubstr("2.0 GB (2 instances, 4.0 GB total), same for every policy"));
  EXPECT_THAT(table, HasSubstr("pd-disagg+dram 1P:1D also uses a host-DRAM KV store: 3.0 GB per "
                               "prefill instance (3.0 GB total) at 25 GB/s"));
  const nlohmann::json j = ResultsJson(runs, nlohmann::json::object());
  EXPECT_EQ(j["results"][0]["pd_split"], "1P:1D");
  EXPECT_EQ(j["results"][0]["best_pd_split"], true);
  EXPECT_FALSE(j["results"][0].contains("dram_bytes_total"));
  EXPECT_EQ(j["results"][1]["dram_bytes_total"], 3'000'000'000);
  EXPECT_EQ(j["results"][1]["dram_gbps"], 25);
  const std::string dir =
      (std::filesystem::temp_directory_path() / "tokenlake_report_pd_test").string();
  std::filesystem::remove_all(dir);
  ASSERT_TRUE(WriteReport(dir, "unit", runs, nlohmann::json::object()).ok());
  EXPECT_TRUE(std::filesystem::exists(std::filesystem::path(dir) / "load_pd-disagg_1P_1D.svg"));
  EXPECT_TRUE(
      std::filesystem::exists(std::filesystem::path(dir) / "load_pd-disagg+dram_1P_1D.svg"));
  std::filesystem::remove_all(dir);
}

TEST(MetricsTest, MakespanIsLastCompletionMinusFirstArrivalInJsonAndTable) {
  // Two requests arriving at 2 s and 3 s, finishing at 9.5 s and 7 s: makespan 7.5 s, two
  // requests completed in it.
  SimResult r;
  r.policy = "p";
  r.busy_s = {1};
  for (auto [arrival, finish] : {std::pair{2.0, 9.5}, std::pair{3.0, 7.0}}) {
    RequestRecord x;
    x.arrival_s = arrival;
    x.first_token_s = arrival + 1;
    x.finish_s = finish;
    x.output_tokens = 2;
    r.records.push_back(x);
  }
  r.makespan_s = 7.5;
  const Summary s = Summarize(r, 0);
  EXPECT_DOUBLE_EQ(s.makespan_s, 7.5);
  EXPECT_DOUBLE_EQ(s.throughput_rps, 2 / 7.5);
  EXPECT_DOUBLE_EQ(ToJson(s)["makespan_s"].get<double>(), 7.5);
  const std::string table = FormatTable({PolicyRun{s, r}});
  EXPECT_NE(table.find("makespan_s"), std::string::npos) << table;
  EXPECT_NE(table.find(" 7.500"), std::string::npos) << table;
}

TEST(MetricsTest, SloAttainmentCountsRequestsMeetingBothSlos) {
  SimResult r;
  auto rec = [](double ttft, double finish, int64_t out, bool rejected = false) {
    RequestRecord x;
    x.arrival_s = 0;
    x.first_token_s = ttft;
    x.finish_s = finish;
    x.output_tokens = out;
    x.rejected = rejected;
    return x;
  };
  r.records = {rec(1, 2, 11),        // TTFT 1 s, TPOT 0.1 s: meets both
               rec(6, 7, 11),        // TTFT over 5 s
               rec(1, 4, 11),        // TPOT 0.3 s over 0.2 s
               rec(1, 1, 1),         // one output token: TTFT only, meets
               rec(1, 2, 11, true),  // rejected
               rec(1, -1, 11)};      // unfinished
  EXPECT_DOUBLE_EQ(SloAttainment(r, 5, 0.2), 2.0 / 6.0);
  EXPECT_DOUBLE_EQ(SloAttainment(SimResult{}, 5, 0.2), 0);
}

}  // namespace
}  // namespace tokenlake::sim
