// The paper preset's resolved values, and a small end-to-end run of it.
#include "tokenlake/sim/preset.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/sched/cost_model.h"
#include "tokenlake/sim/experiment.h"
#include "tokenlake/sim/workload.h"

namespace tokenlake::sim {
namespace {

using ::testing::HasSubstr;

TEST(PresetTest, PaperIsFourTp2A100InstancesOfLwm7bUnderThePerTokenSlo) {
  auto p = FindPreset("paper");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->instances, 4);
  EXPECT_EQ(p->tensor_parallel, 2);
  EXPECT_EQ(p->model, "lwm-7b");
  EXPECT_EQ(p->gpu, "a100-80gb");
  EXPECT_EQ(p->intra_node_gbps, 300);
  EXPECT_EQ(p->gpus_per_node, 8);
  EXPECT_EQ(p->token_budget, 8192);
  EXPECT_EQ(p->slo_mode, SloMode::kPerToken);
  EXPECT_EQ(p->slo_factor, 10);
  EXPECT_EQ(p->goodput_quantile, 0.9);
  EXPECT_EQ(p->workload, "loogle");
  EXPECT_EQ(p->policies, (std::vector<std::string>{"cache-aware", "pd-disagg", "tokenlake"}));
  // Its names resolve to built-ins, and the cost model they make is the paper's server: 8 GPUs
  // on one node, 2 x (81,920 MiB x 0.9 - 4 GiB) - 13.48 GB of weights per instance.
  auto model = sched::LoadModelSpec(p->model);
  auto gpu = sched::LoadGpuProfile(p->gpu);
  ASSERT_TRUE(model.ok() && gpu.ok());
  sched::InterconnectSpec net;
  net.intra_node_gbps = p->intra_node_gbps;
  net.gpus_per_node = p->gpus_per_node;
  const sched::CostModel cost(*model, *gpu, net, p->tensor_parallel);
  EXPECT_NEAR(static_cast<double>(cost.KvCapacityBytes()),
              2 * (85899345920.0 * 0.9 - 4294967296.0) - 2.0 * 6738149376, 1.0);
  EXPECT_TRUE(cost.SameNode(0, p->instances - 1));
}

TEST(PresetTest, UnknownNamesListTheValidOnes) {
  auto p = FindPreset("paper2");
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("'paper2'"));
  EXPECT_THAT(std::string(p.status().message()), HasSubstr("paper"));
}

TEST(PresetTest, SmallPaperRunEndToEnd) {
  auto p = FindPreset("paper");
  ASSERT_TRUE(p.ok());
  for (const char* workload : {"loogle", "sharegpt"}) {
    SCOPED_TRACE(workload);
    GeneratorOptions g;
    g.kind = *ParseWorkloadKind(workload);
    g.num_requests = 24;
    g.rate_rps = 0.5;
    auto w = GenerateWorkload(g);
    ASSERT_TRUE(w.ok());
    sched::InterconnectSpec net;
    net.intra_node_gbps = p->intra_node_gbps;
    const sched::CostModel cost(*sched::LoadModelSpec(p->model), *sched::LoadGpuProfile(p->gpu),
                                net, p->tensor_parallel);
    ExperimentOptions o;
    o.sim.num_instances = p->instances;
    o.sim.token_budget = p->token_budget;
    // 400K tokens of cache in all: 100K per instance.
    o.sim.kv_capacity_bytes = 100000 * cost.model().KvBytesPerToken();
    o.policies = p->policies;
    o.slo_mode = p->slo_mode;
    o.max_rate = true;
    o.bisection_steps = 2;
    auto runs = RunExperiment(*w, cost, o);
    ASSERT_TRUE(runs.ok()) << runs.status();
    ASSERT_EQ(runs->size(), 5u);  // cache-aware, pd-disagg at 1P:3D, 2P:2D and 3P:1D, tokenlake
    for (const PolicyRun& run : *runs) {
      SCOPED_TRACE(run.summary.policy);
      EXPECT_EQ(run.summary.completed + run.summary.rejected, 24);
      ASSERT_TRUE(run.summary.goodput_rps.has_value());
      EXPECT_GE(*run.summary.goodput_rps, 0);
      EXPECT_GE(run.summary.cv_cache_access, 0);
      // Every request carries the 6,000-token system prompt: some of it is reused.
      EXPECT_GT(run.summary.hit_rate, 0);
      EXPECT_EQ(run.summary.kv_capacity_bytes_per_instance,
                int64_t{195} * 512 * 524288);  // whole 512-token blocks
    }
  }
}

}  // namespace
}  // namespace tokenlake::sim
