// InProcessClusterTest: a coordinator and two instance servers in one process (real gRPC, HTTP
// and TCP on 127.0.0.1) over the tiny fixture model, with a reference engine for the expected
// tokens. Shared by the in-process cluster tests (cluster_inprocess_test.cc,
// cluster_streaming_test.cc).
#ifndef TOKENLAKE_SERVICE_CLUSTER_INPROCESS_FIXTURE_H_
#define TOKENLAKE_SERVICE_CLUSTER_INPROCESS_FIXTURE_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/service/cluster_testing.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/service/instance_server.h"
#include "tokenlake/transport/cluster_secret.h"

namespace tokenlake::service {

class InProcessClusterTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = engine::LlamaModel::Load(TestModelDir());
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    auto ref = engine::Engine::Create(model_.get(), {.use_pool = false});
    ASSERT_TRUE(ref.ok());
    reference_ = std::move(*ref);
    options_ = SmallClusterOptions(model_->config(), secret_);
    options_.attempt_timeout = absl::Seconds(2);
    StartCoordinator();
    instances_.resize(2);
    for (int i = 0; i < 2; ++i) ASSERT_NO_FATAL_FAILURE(StartInstance(i));
    WaitForLive(2);
  }

  // Starts instance server `i` ("in-process-i", preferring id i) into instances_[i], replacing
  // whatever was there (a new process in a dead one's place).
  void StartInstance(int i) {
    auto s = InstanceServer::Create(model_.get(), {.name = "in-process-" + std::to_string(i),
                                                   .preferred_id = i,
                                                   .coordinator_port = coordinator_->grpc_port(),
                                                   .slots = 256,
                                                   .cluster_secret = secret_});
    ASSERT_TRUE(s.ok()) << s.status();
    instances_[static_cast<size_t>(i)] = std::move(*s);
  }

  void StartCoordinator() {
    auto c = Coordinator::Create(options_);
    // A restart on the ports of the last coordinator: another test running beside this one may
    // hold one of them for a moment (an outgoing connection's local port); wait for it.
    for (int i = 0; i < 100 && !c.ok() && absl::StrContains(c.status().message(), "in use"); ++i) {
      absl::SleepFor(absl::Milliseconds(100));
      c = Coordinator::Create(options_);
    }
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
    p.reserve(47);
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
  const std::string secret_ = *transport::GenerateClusterSecret();
  CoordinatorOptions options_;
  std::unique_ptr<Coordinator> coordinator_;
  std::vector<std::unique_ptr<InstanceServer>> instances_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_CLUSTER_INPROCESS_FIXTURE_H_
