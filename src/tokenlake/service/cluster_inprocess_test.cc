// The coordinator and instance servers in one process (real gRPC, HTTP and TCP on 127.0.0.1,
// no child processes), so that the daemons' code also runs under ASan/UBSan in CI (the
// process-level tests in tests/service_cluster_test.cc are labelled slow).
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/engine/pool_shape.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/service/instance_server.h"
#include "tokenlake/service/local_cluster.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

std::string ModelDir() {
  const char* d = std::getenv("TOKENLAKE_SOURCE_DIR");
  return std::string(d != nullptr ? d : ".") + "/tests/fixtures/llama_tiny/model";
}

class InProcessClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = engine::LlamaModel::Load(ModelDir());
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    auto ref = engine::Engine::Create(model_.get(), {.use_pool = false});
    ASSERT_TRUE(ref.ok());
    reference_ = std::move(*ref);
    options_.limits = {.vocab_size = 512, .context_tokens = 4096, .max_tokens_limit = 64};
    options_.heartbeat_interval = absl::Milliseconds(50);
    options_.dead_after = absl::Milliseconds(400);
    options_.attempt_timeout = absl::Seconds(2);
    const engine::LlamaConfig& c = model_->config();
    options_.lake_instances = 2;
    options_.slots_per_instance = 256;
    options_.model = engine::PoolModelShape(c, attention::KvDtype::kFloat32);
    StartCoordinator();
    for (int i = 0; i < 2; ++i) {
      auto s = InstanceServer::Create(model_.get(), {.name = "in-process-" + std::to_string(i),
                                                     .preferred_id = i,
                                                     .coordinator_port = coordinator_->grpc_port(),
                                                     .slots = 256});
      ASSERT_TRUE(s.ok()) << s.status();
      instances_.push_back(std::move(*s));
    }
    WaitForLive(2);
  }

  void StartCoordinator() {
    auto c = Coordinator::Create(options_);
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = std::move(*c);
  }

  void WaitForLive(int32_t n) {
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    while (coordinator_->LiveInstances() != n && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    ASSERT_EQ(coordinator_->LiveInstances(), n);
  }

  std::vector<int32_t> Prompt(int seed) {
    std::vector<int32_t> p;
    for (int i = 0; i < 40; ++i) p.push_back((i * 37 + 11) % 512);  // shared prefix
    for (int i = 0; i < 7; ++i) p.push_back((seed * 101 + i * 13) % 512);
    return p;
  }

  std::vector<int32_t> Expected(const std::vector<int32_t>& prompt, int32_t n) {
    auto r = reference_->Generate(prompt, n);
    EXPECT_TRUE(r.ok());
    return r.ok() ? r->tokens : std::vector<int32_t>{};
  }

  std::unique_ptr<engine::LlamaModel> model_;
  std::unique_ptr<engine::Engine> reference_;
  CoordinatorOptions options_;
  std::unique_ptr<Coordinator> coordinator_;
  std::vector<std::unique_ptr<InstanceServer>> instances_;
};

TEST_F(InProcessClusterTest, ServesCorrectAnswersAndHitsThePool) {
  int64_t cached = 0;
  for (int i = 0; i < 6; ++i) {
    auto r = coordinator_->Complete({.prompt = Prompt(i), .max_tokens = 3});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens, Expected(Prompt(i), 3));
    cached += r->cached_tokens;
  }
  // Every request after the first hits the 32-token shared prefix: the lake is cluster-wide, so
  // wherever a request is computed, the prefix is served from its holders.
  EXPECT_EQ(cached, 32 * 5);
  const std::string metrics = coordinator_->MetricsText();
  EXPECT_THAT(metrics, HasSubstr("tokenlake_requests_total{code=\"200\"} 6"));
  EXPECT_THAT(metrics, HasSubstr("tokenlake_instance_segments{instance=\"0\"}"));
  auto health = HttpGet(coordinator_->http_port(), "/healthz");
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(health->first, 200);
  auto post = HttpPost(coordinator_->http_port(), "/v1/completions", "{\"prompt\": [1, 2, 3]}");
  ASSERT_TRUE(post.ok());
  EXPECT_EQ(post->first, 200) << post->second;
  auto bad = HttpPost(coordinator_->http_port(), "/v1/completions", "{\"prompt\": [1, 2, 3");
  ASSERT_TRUE(bad.ok());
  EXPECT_EQ(bad->first, 400);
}

TEST_F(InProcessClusterTest, RejectsBadRequestsBeforeRouting) {
  EXPECT_EQ(coordinator_->Complete({.prompt = {}, .max_tokens = 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(coordinator_->Complete({.prompt = {1, 600}, .max_tokens = 1}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(coordinator_->Complete({.prompt = {1}, .max_tokens = 65}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Coordinator::Create({.segment_tokens = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(InstanceServer::Create(model_.get(), {.coordinator_port = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST_F(InProcessClusterTest, LostInstanceFailsOverAndIsDeclaredDead) {
  ASSERT_TRUE(coordinator_->Complete({.prompt = Prompt(1), .max_tokens = 2}).ok());
  instances_[0]->Shutdown();
  instances_[1]->Shutdown();
  // Both gone: a clear Unavailable within the deadline, never a hang.
  const absl::Time start = absl::Now();
  auto none = coordinator_->Complete({.prompt = Prompt(2), .max_tokens = 2});
  EXPECT_FALSE(none.ok());
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  WaitForLive(0);
  instances_.clear();
  auto s = InstanceServer::Create(model_.get(), {.name = "in-process-1",
                                                 .preferred_id = 1,
                                                 .coordinator_port = coordinator_->grpc_port(),
                                                 .slots = 256});
  ASSERT_TRUE(s.ok());
  instances_.push_back(std::move(*s));
  WaitForLive(1);
  auto r = coordinator_->Complete({.prompt = Prompt(3), .max_tokens = 2});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens, Expected(Prompt(3), 2));
  EXPECT_EQ(r->cached_tokens, 0);  // the new instance rejoined empty
  EXPECT_THAT(coordinator_->MetricsText(), HasSubstr("tokenlake_instance_deaths_total 2"));
}

TEST_F(InProcessClusterTest, CoordinatorRestartRebuildsTheTreeFromInstances) {
  for (int i = 0; i < 3; ++i) {
    ASSERT_TRUE(coordinator_->Complete({.prompt = Prompt(i), .max_tokens = 2}).ok());
  }
  const int64_t segments = coordinator_->DistinctSegments();
  ASSERT_GT(segments, 0);
  options_.grpc_port = coordinator_->grpc_port();
  options_.transport_port = coordinator_->transport_port();
  coordinator_.reset();
  StartCoordinator();
  WaitForLive(2);
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (coordinator_->DistinctSegments() != segments && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(coordinator_->DistinctSegments(), segments);
  auto r = coordinator_->Complete({.prompt = Prompt(0), .max_tokens = 2});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_GE(r->cached_tokens, 32);
}

TEST_F(InProcessClusterTest, DroppedMessagesFailWithinTheDeadline) {
  ASSERT_TRUE(coordinator_->faults()->SetDropProbability(1.0).ok());
  const absl::Time start = absl::Now();
  auto r = coordinator_->Complete({.prompt = Prompt(1), .max_tokens = 2});
  ASSERT_FALSE(r.ok());
  EXPECT_THAT(r.status().message(), HasSubstr("did not answer within"));
  EXPECT_LT(absl::Now() - start, options_.request_timeout + absl::Seconds(2));
  ASSERT_TRUE(coordinator_->faults()->SetDropProbability(0).ok());
  auto ok = coordinator_->Complete({.prompt = Prompt(1), .max_tokens = 2});
  ASSERT_TRUE(ok.ok()) << ok.status();
  EXPECT_EQ(ok->tokens, Expected(Prompt(1), 2));
}

// The value of an unlabelled sample `name v` in the metrics text (-1 if absent).
double MetricValue(const std::string& text, const std::string& name) {
  const size_t pos = text.find("\n" + name + " ");
  if (pos == std::string::npos) return -1;
  return std::stod(text.substr(pos + name.size() + 2));
}

TEST_F(InProcessClusterTest, RotatedComputeMovesQueriesAndKvBetweenInstances) {
  // Restart the coordinator with computing instances taking turns.
  options_.rotate_compute_instance = true;
  options_.grpc_port = coordinator_->grpc_port();
  options_.transport_port = coordinator_->transport_port();
  coordinator_.reset();
  StartCoordinator();
  WaitForLive(2);
  int64_t cached = 0;
  for (int i = 0; i < 6; ++i) {
    auto r = coordinator_->Complete({.prompt = Prompt(i % 3), .max_tokens = 3});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens, Expected(Prompt(i % 3), 3)) << "request " << i;
    cached += r->cached_tokens;
  }
  EXPECT_GT(cached, 0);
  const std::string m = coordinator_->MetricsText();
  EXPECT_GT(MetricValue(m, "tokenlake_remote_attend_calls_total"), 0) << m;
  EXPECT_GT(MetricValue(m, "tokenlake_lake_plan_iterations_total"), 0);
}

TEST_F(InProcessClusterTest, RebalancedHeavyHitterSurvivesTheLossOfAHolder) {
  // The shared prefix's two segments (the fixture's Prompt: 40 shared tokens, 16-token
  // segments).
  auto keys = index::ComputeSegmentKeys(index::NamespaceSalt(options_.namespace_name),
                                        absl::MakeConstSpan(Prompt(0)).subspan(0, 32), 16);
  ASSERT_TRUE(keys.ok());
  auto replicated = [&] {
    for (const index::SegmentKey& k : *keys) {
      if (coordinator_->ReplicasOf(k.id.value()).size() < 2) return false;
    }
    return true;
  };
  for (int i = 0; i < 40 && !replicated(); ++i) {
    auto r = coordinator_->Complete({.prompt = Prompt(i), .max_tokens = 2});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens, Expected(Prompt(i), 2));
    if (i >= 2) {
      ASSERT_TRUE(coordinator_->RebalanceNow().ok());
    }
  }
  ASSERT_TRUE(replicated()) << "the heavy prefix was not replicated";
  // The copies are real: wait until both instances report them (heartbeats), then lose one.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (absl::Now() < deadline &&
         (instances_[0]->segments() < 2 || instances_[1]->segments() < 2)) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  instances_[0]->Shutdown();
  WaitForLive(1);
  for (const index::SegmentKey& k : *keys) {
    EXPECT_EQ(coordinator_->ReplicasOf(k.id.value()), std::vector<int32_t>{1});
  }
  auto r = coordinator_->Complete({.prompt = Prompt(77), .max_tokens = 3});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->tokens, Expected(Prompt(77), 3));
  EXPECT_EQ(r->cached_tokens, 32);  // served by the surviving replica
}

// The control plane's round trips per request served alone: one PlanBatch per iteration (each
// releasing the iteration before), one Release at the end, and a Commit only for the
// iterations that complete a segment (3 x 20 = 60 calls per request before).
TEST_F(InProcessClusterTest, OneLakeRpcPerIterationPlusTheFinalReleaseAndTheCommits) {
  auto rpcs = [&](const char* call) {
    return MetricValue(coordinator_->MetricsText(),
                       std::string("tokenlake_lake_rpcs_total{call=\"") + call + "\"}");
  };
  struct Counts {
    double plan, fused, batch, release, commit;
  };
  auto counts = [&] {
    return Counts{rpcs("plan_iteration"), rpcs("release_and_plan"), rpcs("plan_batch"),
                  rpcs("release"), rpcs("commit")};
  };
  const int32_t m = 20;
  // Request 1 on an empty pool: Prompt(0) has 47 tokens, 16-token segments. The prefill
  // commits the prompt's 2 full segments; of the decode iterations (ending at 48 .. 66
  // tokens), those ending at 48 and 64 complete a segment.
  // Request 2, Prompt(1): the 32-token shared prefix is cached, so the prefill commits
  // nothing; again the iterations ending at 48 and 64 complete a segment.
  const int32_t want_commits[] = {1 + 2, 2};
  for (int i = 0; i < 2; ++i) {
    SCOPED_TRACE(testing::Message() << "request " << i);
    const Counts before = counts();
    auto r = coordinator_->Complete({.prompt = Prompt(i), .max_tokens = m});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens, Expected(Prompt(i), m));
    EXPECT_EQ(r->cached_tokens, i == 0 ? 0 : 32);
    const Counts after = counts();
    EXPECT_EQ(after.batch - before.batch, m);
    EXPECT_EQ(after.plan - before.plan, 0);
    EXPECT_EQ(after.fused - before.fused, 0);
    EXPECT_EQ(after.release - before.release, 1);
    EXPECT_EQ(after.commit - before.commit, want_commits[i]);
  }
  const std::string metrics = coordinator_->MetricsText();
  EXPECT_EQ(MetricValue(metrics, "tokenlake_lake_active_requests"), 0);
  EXPECT_EQ(MetricValue(metrics, "tokenlake_pool_pinned_segments"), 0);
  EXPECT_EQ(MetricValue(metrics, "tokenlake_lake_plan_iterations_total"), 2 * m);
}

// Requests sent at once are batched on their instances (continuous batching): each answer is
// still the reference's, and the instances make fewer PlanBatch calls than the request
// iterations they plan (one call carries several requests).
TEST_F(InProcessClusterTest, ConcurrentRequestsAreBatchedAndStillCorrect) {
  auto rpcs = [&](const std::string& name) {
    return MetricValue(coordinator_->MetricsText(), name);
  };
  const double batches_before = rpcs("tokenlake_lake_rpcs_total{call=\"plan_batch\"}");
  const double iterations_before = rpcs("tokenlake_lake_plan_iterations_total");
  const int kRequests = 8;
  const int32_t m = 12;
  std::vector<absl::StatusOr<CompletionResult>> results(kRequests, absl::UnknownError("not run"));
  std::vector<std::thread> clients;
  for (int i = 0; i < kRequests; ++i) {
    clients.emplace_back([&, i] {
      results[static_cast<size_t>(i)] =
          coordinator_->Complete({.prompt = Prompt(100 + i), .max_tokens = m});
    });
  }
  for (std::thread& t : clients) t.join();
  for (int i = 0; i < kRequests; ++i) {
    SCOPED_TRACE(testing::Message() << "request " << i);
    ASSERT_TRUE(results[static_cast<size_t>(i)].ok()) << results[static_cast<size_t>(i)].status();
    EXPECT_EQ(results[static_cast<size_t>(i)]->tokens, Expected(Prompt(100 + i), m));
  }
  const double batches = rpcs("tokenlake_lake_rpcs_total{call=\"plan_batch\"}") - batches_before;
  const double iterations = rpcs("tokenlake_lake_plan_iterations_total") - iterations_before;
  std::cout << kRequests << " concurrent requests: " << iterations << " request iterations in "
            << batches << " PlanBatch calls\n";
  EXPECT_GE(iterations, kRequests * m);
  EXPECT_LT(batches, iterations);
  EXPECT_EQ(MetricValue(coordinator_->MetricsText(), "tokenlake_pool_pinned_segments"), 0);
}

}  // namespace
}  // namespace tokenlake::service
