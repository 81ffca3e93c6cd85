// The coordinator routes by the elastic scheduler in a running cluster (coordinator and two
// instance servers in one process, real gRPC and TCP on 127.0.0.1): requests that arrive
// together spread as sched::PlaceDecode places decodes, over the requests the coordinator routed
// itself and the loads the instances report, with a cost model in which one decode fits an
// instance's decode budget and two do not.
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/sched/cost_model.h"
#include "tokenlake/service/cluster_testing.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/service/instance_server.h"
#include "tokenlake/transport/cluster_secret.h"

namespace tokenlake::service {
namespace {

// The value of the sample `sample` (name with its labels) on a /metrics page; -1 if absent.
double Sample(const std::string& page, const std::string& sample) {
  const std::string key = "\n" + sample + " ";
  const size_t at = page.find(key);
  return at == std::string::npos ? -1 : std::stod(page.substr(at + key.size()));
}

// Waits up to 20 s for `done`; returns its last answer.
template <typename F>
bool Eventually(F done) {
  const absl::Time deadline = absl::Now() + absl::Seconds(20);
  while (!done() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(2));
  return done();
}

TEST(ClusterRoutingTest, RequestsArrivingTogetherSpreadAsTheSchedulerPlacesDecodes) {
  auto model = engine::LlamaModel::Load(TestModelDir());
  ASSERT_TRUE(model.ok()) << model.status();
  auto reference = engine::Engine::Create(model->get(), {.use_pool = false});
  ASSERT_TRUE(reference.ok());
  const std::string secret = *transport::GenerateClusterSecret();
  CoordinatorOptions o = SmallClusterOptions((*model)->config(), secret);
  // 10 ms of dense work per token (the reference model's table: no rescaling), attention next to
  // free, a decode budget of 0.5 x 30 ms: one decode fits an instance (10 ms), two do not.
  o.routing = RoutingRule::kScheduler;
  o.routing_model = sched::ModelSpec{};
  o.routing_gpu.dense_ms = {{1, 10}, {2, 20}};
  o.routing_gpu.attn_prefill_tflops = 1e9;
  o.routing_gpu.attn_decode_gbps = 1e12;
  o.slo_tpot_s = 0.03;
  o.decode_budget_share = 0.5;
  // Requests reach their instance 1 s after they are routed, so that the instances report
  // nothing of them while the next ones are routed: only the coordinator's own record of what
  // it routed tells it where the earlier ones went.
  o.faults.delay = absl::Seconds(1);
  o.attempt_timeout = absl::Seconds(20);
  o.request_timeout = absl::Seconds(60);
  auto coordinator = Coordinator::Create(o);
  ASSERT_TRUE(coordinator.ok()) << coordinator.status();
  std::vector<std::unique_ptr<InstanceServer>> instances;
  for (int i = 0; i < 2; ++i) {
    auto s = InstanceServer::Create(model->get(), {.name = absl::StrCat("routing-", i),
                                                   .preferred_id = i,
                                                   .coordinator_port = (*coordinator)->grpc_port(),
                                                   .slots = 256,
                                                   .cluster_secret = secret});
    ASSERT_TRUE(s.ok()) << s.status();
    instances.push_back(std::move(*s));
  }
  ASSERT_TRUE(Eventually([&] { return (*coordinator)->LiveInstances() == 2; }));

  auto metrics = [&] { return (*coordinator)->MetricsText(); };
  auto routed_to = [&](int i) {
    return Sample(metrics(), absl::StrCat("tokenlake_instance_routed_total{instance=\"", i, "\"}"));
  };
  auto by_scheduler = [&] {
    return Sample(metrics(), "tokenlake_routes_total{rule=\"scheduler\"}");
  };
  // Three prompts of one length (equal contexts), sent one after another once the previous one
  // is routed.
  std::vector<std::vector<int32_t>> prompts;
  for (int r = 0; r < 3; ++r) {
    std::vector<int32_t> p;
    p.reserve(21);
    for (int t = 0; t < 21; ++t) p.push_back((r * 131 + t * 17 + 5) % 512);
    prompts.push_back(p);
  }
  std::vector<absl::StatusOr<CompletionResult>> results(3, absl::UnknownError("not run"));
  std::vector<std::thread> clients;
  std::vector<std::vector<double>> routed_after;  // per request: routed_total of 0 and 1
  for (int r = 0; r < 3; ++r) {
    clients.emplace_back([&, r] {
      results[static_cast<size_t>(r)] =
          (*coordinator)->Complete({.prompt = prompts[static_cast<size_t>(r)], .max_tokens = 4});
    });
    // Sent (counted per instance once routed): the next one may go.
    const bool sent = Eventually([&] { return routed_to(0) + routed_to(1) == r + 1; });
    EXPECT_TRUE(sent) << metrics();
    if (!sent) break;
    EXPECT_EQ(by_scheduler(), r + 1);
    routed_after.push_back({routed_to(0), routed_to(1)});
  }
  for (std::thread& t : clients) t.join();
  ASSERT_EQ(routed_after.size(), 3u);
  // 1st: both idle: the first idle instance. 2nd: 0 runs one decode, two exceed the budget: the
  // idle 1. 3rd: none fits and none is idle: the least loaded, a tie of equal decodes: 0.
  EXPECT_EQ(routed_after[0], (std::vector<double>{1, 0}));
  EXPECT_EQ(routed_after[1], (std::vector<double>{1, 1}));
  EXPECT_EQ(routed_after[2], (std::vector<double>{2, 1}));
  for (int r = 0; r < 3; ++r) {
    const auto& got = results[static_cast<size_t>(r)];
    ASSERT_TRUE(got.ok()) << got.status();
    auto want = (*reference)->Generate(prompts[static_cast<size_t>(r)], 4);
    ASSERT_TRUE(want.ok());
    EXPECT_EQ(got->tokens, want->tokens) << r;
  }
  const std::string page = metrics();
  EXPECT_EQ(Sample(page, "tokenlake_routes_total{rule=\"scheduler\"}"), 3) << page;
  EXPECT_EQ(Sample(page, "tokenlake_routes_total{rule=\"plan\"}"), 0) << page;
  EXPECT_EQ(Sample(page, "tokenlake_routes_total{rule=\"plan_fallback\"}"), 0) << page;
  // Once they are done, the instances' reports bring the view back to idle.
  for (int i = 0; i < 2; ++i) {
    const std::string gauge =
        absl::StrCat("tokenlake_instance_load_requests{instance=\"", i, "\"}");
    EXPECT_TRUE(Eventually([&] { return Sample(metrics(), gauge) == 0; })) << metrics();
  }
  // An idle cluster again: the scheduler places the next request too (an idle instance).
  auto again = (*coordinator)->Complete({.prompt = prompts[0], .max_tokens = 2});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(by_scheduler(), 4);
  for (auto& s : instances) s->Shutdown();
  (*coordinator)->Shutdown();
}

}  // namespace
}  // namespace tokenlake::service
