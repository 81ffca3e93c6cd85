// Golden test: the four policies on a 200-request excerpt of the Mooncake conversation trace
// (tests/fixtures/sim_conversation_200.jsonl), 4 instances, fixed options, the built-in (measured)
// H100 profile (GpuProfile{}). The JSON must equal
// tests/fixtures/sim_golden.json byte for byte, and two runs must give identical bytes.
// Regenerate after an intended change with TOKENLAKE_UPDATE_GOLDEN=1 (and say why in the commit).
#include <cstdlib>
#include <fstream>
#include <sstream>
#include <string>

#include "gtest/gtest.h"
#include "tokenlake/sim/experiment.h"
#include "tokenlake/sim/report.h"
#include "tokenlake/sim/workload.h"

namespace tokenlake::sim {
namespace {

std::string RunGolden(const Workload& w) {
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
  ExperimentOptions o;
  o.sim.num_instances = 4;
  o.rate_rps = 5;  // 200 requests in ~40 s
  auto runs = RunExperiment(w, cost, o);
  EXPECT_TRUE(runs.ok()) << runs.status();
  if (!runs.ok()) return "";
  nlohmann::json config;
  config["fixture"] = "sim_conversation_200.jsonl";
  config["instances"] = 4;
  config["rate_rps"] = 5;
  return ResultsJson(*runs, config).dump(2) + "\n";
}

TEST(GoldenTest, ConversationExcerptMatchesGoldenAndIsDeterministic) {
  const char* src = std::getenv("TOKENLAKE_SOURCE_DIR");
  if (src == nullptr) GTEST_SKIP() << "TOKENLAKE_SOURCE_DIR not set";
  const std::string dir = std::string(src) + "/tests/fixtures/";
  auto w = ReadMooncakeTrace(dir + "sim_conversation_200.jsonl");
  ASSERT_TRUE(w.ok()) << w.status();
  const std::string a = RunGolden(*w);
  const std::string b = RunGolden(*w);
  EXPECT_EQ(a, b) << "two runs with the same inputs differ";
  const std::string golden_path = dir + "sim_golden.json";
  if (std::getenv("TOKENLAKE_UPDATE_GOLDEN") != nullptr) {
    std::ofstream(golden_path) << a;
    GTEST_SKIP() << "golden updated: " << golden_path;
  }
  std::ifstream in(golden_path);
  ASSERT_TRUE(in.good()) << "missing " << golden_path;
  std::stringstream golden;
  golden << in.rdbuf();
  EXPECT_EQ(a, golden.str());
}

}  // namespace
}  // namespace tokenlake::sim
