// Coordinator failover through a real etcd, in one process: two coordinators campaign, two
// instances follow the leader; the leader is cut off from etcd and shut down, the follower takes
// over, the instances re-register with it and it rebuilds the lake from their reports; every
// answer equals the single-engine reference.
#include "tokenlake/service/election.h"

#include <atomic>
#include <cstdio>
#include <memory>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/service/cluster_testing.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/service/etcd_testing.h"
#include "tokenlake/service/instance_server.h"
#include "tokenlake/service/local_cluster.h"
#include "tokenlake/transport/cluster_secret.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

TEST(LeaderRecordTest, RoundTripsAndRefusesMalformedRecords) {
  LeaderRecord r;
  r.grpc.host = "2001:db8::1";
  r.grpc.port = 7000;
  r.http_url = "http://[2001:db8::1]:8000";
  EXPECT_EQ(*DecodeLeader(EncodeLeader(r)), r);
  for (const char* bad :
       {"", "{}", "{\"grpc\": 1, \"http\": \"x\"}", "{\"grpc\": \"h\", \"http\": \"x\"}"}) {
    EXPECT_EQ(DecodeLeader(bad).status().code(), absl::StatusCode::kInvalidArgument) << bad;
  }
  EXPECT_EQ(LeaderKey("c1"), "/tokenlake/c1/leader");
  EXPECT_EQ(MemberKey("c1", "i-0"), "/tokenlake/c1/members/i-0");
}

class ElectionTest : public ::testing::Test {
 protected:
  void SetUp() override {
    absl::StatusOr<std::unique_ptr<EtcdTestServer>> etcd = EtcdTestServer::Start();
    ASSERT_TRUE(etcd.ok()) << etcd.status();
    etcd_server_ = *std::move(etcd);
    etcd_ = *EtcdClient::Create({.endpoint = etcd_server_->endpoint()});
    auto m = engine::LlamaModel::Load(TestModelDir());
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    options_ = SmallClusterOptions(model_->config(), secret_);
    options_.attempt_timeout = absl::Seconds(2);
    options_.start_as_follower = true;
  }

  // Coordinator `i` and its campaign.
  void StartCoordinator(int i) {
    auto c = Coordinator::Create(options_);
    ASSERT_TRUE(c.ok()) << c.status();
    const LeaderRecord self{.grpc = {"127.0.0.1", (*c)->grpc_port()},
                            .http_url = absl::StrCat("http://127.0.0.1:", (*c)->http_port())};
    auto e = CoordinatorElection::Start(
        etcd_.get(),
        {.cluster = "test", .self = self, .ttl = absl::Seconds(1), .retry = absl::Milliseconds(50)},
        (*c)->leader_gate(), [this, i] { ++deposed_[i]; });
    ASSERT_TRUE(e.ok()) << e.status();
    coordinators_[i] = std::move(*c);
    elections_[i] = std::move(*e);
  }

  int Leader() const {
    for (int i = 0; i < 2; ++i) {
      if (coordinators_[i] != nullptr && coordinators_[i]->leader_gate()->leading()) return i;
    }
    return -1;
  }

  std::vector<int32_t> Prompt(int r) const {
    std::vector<int32_t> p;
    for (int i = 0; i < 40; ++i) p.push_back((i * 37 + 11) % 512);
    for (int i = 0; i < 5; ++i) p.push_back((r * 101 + i * 13) % 512);
    return p;
  }

  std::unique_ptr<EtcdTestServer> etcd_server_;
  std::unique_ptr<EtcdClient> etcd_;
  std::unique_ptr<engine::LlamaModel> model_;
  const std::string secret_ = *transport::GenerateClusterSecret();
  CoordinatorOptions options_;
  std::unique_ptr<Coordinator> coordinators_[2];
  std::unique_ptr<CoordinatorElection> elections_[2];
  std::atomic<int> deposed_[2] = {0, 0};
  std::vector<std::unique_ptr<InstanceServer>> instances_;
};

TEST_F(ElectionTest, TheFollowerTakesOverAndServesRightAnswersFromTheRebuiltLake) {
  StartCoordinator(0);
  StartCoordinator(1);
  const absl::Time elect_deadline = absl::Now() + absl::Seconds(10);
  while (Leader() < 0 && absl::Now() < elect_deadline) absl::SleepFor(absl::Milliseconds(10));
  const int first = Leader();
  ASSERT_GE(first, 0);
  const int second = 1 - first;
  // The follower learns the leader from etcd, refuses to act and sends clients there.
  const absl::Time learn_deadline = absl::Now() + absl::Seconds(5);
  while (coordinators_[second]->leader_gate()->leader_http().empty() &&
         absl::Now() < learn_deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(coordinators_[second]->leader_gate()->leader_http(),
            absl::StrCat("http://127.0.0.1:", coordinators_[first]->http_port()));
  auto redirected =
      HttpPost(coordinators_[second]->http_port(), "/v1/completions", "{\"prompt\": [1, 2, 3]}");
  ASSERT_TRUE(redirected.ok()) << redirected.status();
  EXPECT_EQ(redirected->first, 307) << redirected->second;
  EXPECT_THAT(redirected->second, HasSubstr("not the leader"));

  for (int i = 0; i < 2; ++i) {
    auto s = InstanceServer::Create(
        model_.get(), {.name = "instance-" + std::to_string(i),
                       .preferred_id = i,
                       // No fixed coordinator address: only the leader named in etcd.
                       .locate_coordinator = [this]() -> absl::StatusOr<transport::HostPort> {
                         absl::StatusOr<LeaderRecord> r = FindLeader(etcd_.get(), "test");
                         if (!r.ok()) return r.status();
                         return r->grpc;
                       },
                       .slots = 256,
                       .register_retry = absl::Milliseconds(20),
                       .cluster_secret = secret_});
    ASSERT_TRUE(s.ok()) << s.status();
    instances_.push_back(std::move(*s));
  }
  const absl::Time live_deadline = absl::Now() + absl::Seconds(20);
  while (coordinators_[first]->LiveInstances() != 2 && absl::Now() < live_deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  ASSERT_EQ(coordinators_[first]->LiveInstances(), 2);
  auto ref = engine::Engine::Create(model_.get(), {.use_pool = false});
  ASSERT_TRUE(ref.ok());
  for (int r = 0; r < 3; ++r) {
    auto got = coordinators_[first]->Complete({.prompt = Prompt(r), .max_tokens = 3});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->tokens, (*ref)->Generate(Prompt(r), 3)->tokens);
  }

  // The leader is cut off from etcd: it must stop acting before its lease can run out (the
  // follower can only take over after that), then it dies.
  const absl::Time cut = absl::Now();
  elections_[first]->SetPausedForTesting(true);
  while (coordinators_[first]->leader_gate()->leading()) {
    ASSERT_LT(absl::Now() - cut, absl::Seconds(2)) << "a cut-off leader kept leading";
    absl::SleepFor(absl::Milliseconds(5));
  }
  EXPECT_EQ(coordinators_[first]->leader_gate()->state(), LeaderGate::State::kDeposed);
  EXPECT_EQ(deposed_[first].load(), 1);
  EXPECT_EQ(coordinators_[first]->leader_gate()->leading(), false);
  coordinators_[first]->Shutdown();

  // The first request answered by the new leader, and every answer right.
  absl::Time first_answer;
  for (int r = 3; r < 8; ++r) {
    absl::StatusOr<CompletionResult> got;
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    do {
      got = coordinators_[second]->leader_gate()->leading()
                ? coordinators_[second]->Complete({.prompt = Prompt(r), .max_tokens = 3})
                : absl::UnavailableError("no leader yet");
      if (!got.ok()) absl::SleepFor(absl::Milliseconds(20));
    } while (!got.ok() && absl::Now() < deadline);
    ASSERT_TRUE(got.ok()) << got.status();
    if (r == 3) first_answer = absl::Now();
    EXPECT_EQ(got->tokens, (*ref)->Generate(Prompt(r), 3)->tokens);
  }
  std::printf("failover: first answer %.0f ms after the leader was cut off\n",
              absl::ToDoubleMilliseconds(first_answer - cut));
  EXPECT_EQ(coordinators_[second]->LiveInstances(), 2);
  // The new leader's lake was rebuilt from the instances' reports: the shared prefix is a hit.
  auto again = coordinators_[second]->Complete({.prompt = Prompt(9), .max_tokens = 3});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->cached_tokens, 32);
}

// An instance under an election needs no fixed coordinator address (coordinator_port 0): it
// dials nothing and registers nowhere until locate_coordinator names a leader, then registers
// there. Without a locator the port is required.
TEST(InstanceWithoutAFixedAddressTest, RegistersOnlyOnceTheLocatorNamesALeader) {
  auto model = engine::LlamaModel::Load(TestModelDir());
  ASSERT_TRUE(model.ok()) << model.status();
  absl::StatusOr<std::unique_ptr<InstanceServer>> bare =
      InstanceServer::Create(model->get(), {.coordinator_port = 0});
  EXPECT_EQ(bare.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(bare.status().message(), HasSubstr("coordinator_port"));
  auto nowhere = []() -> absl::StatusOr<transport::HostPort> {
    return absl::UnavailableError("no leader");
  };
  EXPECT_EQ(InstanceServer::Create(model->get(),
                                   {.coordinator_port = 70000, .locate_coordinator = nowhere})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);

  const std::string secret = *transport::GenerateClusterSecret();
  auto coordinator = Coordinator::Create(SmallClusterOptions((*model)->config(), secret));
  ASSERT_TRUE(coordinator.ok()) << coordinator.status();
  std::atomic<int> asked{0};
  std::atomic<int32_t> leader_port{0};  // 0: no leader named yet
  auto instance = InstanceServer::Create(
      model->get(), {.name = "located",
                     .preferred_id = 0,
                     .locate_coordinator = [&]() -> absl::StatusOr<transport::HostPort> {
                       ++asked;
                       if (leader_port.load() == 0) return absl::UnavailableError("no leader");
                       return transport::HostPort{.host = "127.0.0.1", .port = leader_port.load()};
                     },
                     .slots = 256,
                     .register_retry = absl::Milliseconds(10),
                     .cluster_secret = secret});
  ASSERT_TRUE(instance.ok()) << instance.status();
  const absl::Time ask_deadline = absl::Now() + absl::Seconds(10);
  while (asked.load() < 5 && absl::Now() < ask_deadline) absl::SleepFor(absl::Milliseconds(5));
  EXPECT_GE(asked.load(), 5);
  EXPECT_EQ((*instance)->registrations(), 0);
  EXPECT_EQ((*coordinator)->LiveInstances(), 0);

  leader_port = (*coordinator)->grpc_port();
  const absl::Time live_deadline = absl::Now() + absl::Seconds(20);
  while ((*coordinator)->LiveInstances() != 1 && absl::Now() < live_deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ((*coordinator)->LiveInstances(), 1);
  EXPECT_GE((*instance)->registrations(), 1);
  EXPECT_EQ((*instance)->instance_id(), 0);
  (*instance)->Shutdown();
}

}  // namespace
}  // namespace tokenlake::service
