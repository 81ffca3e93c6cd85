// A cluster across addresses under mutual TLS, in one process: the coordinator's gRPC and the
// instances' transports on different loopback addresses (127.0.0.0/8 is all loopback, so each
// "host" is a distinct address with its own certificate), requests answered as by one engine;
// and what is refused: a stranger's certificate, listening beyond loopback in the clear.
#include <cstdlib>
#include <filesystem>
#include <memory>
#include <string>
#include <vector>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/service/cluster_testing.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/service/grpc_credentials.h"
#include "tokenlake/service/instance_server.h"
#include "tokenlake/transport/cluster_secret.h"
#include "tokenlake/transport/tls.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

class ClusterTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tokenlake-cluster-tls-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    auto m = engine::LlamaModel::Load(TestModelDir());
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    options_ = SmallClusterOptions(model_->config(), secret_);
  }
  void TearDown() override {
    instances_.clear();
    coordinator_.reset();
    std::filesystem::remove_all(dir_);
  }

  // A host's TLS folder: signed by the cluster CA in dir_/ca (made on first use), or by a CA of
  // its own (a stranger).
  ClusterTls Tls(const std::string& name, const std::string& address, bool stranger = false) {
    if (!stranger && !std::filesystem::exists(dir_ + "/ca/ca-key.pem")) {
      EXPECT_TRUE(transport::MakeClusterCertificates({.out_dir = dir_ + "/ca"}).ok());
    }
    absl::StatusOr<transport::TlsIdentity> id = transport::MakeClusterCertificates(
        {.out_dir = dir_ + "/" + name, .hosts = {address}, .ca_dir = stranger ? "" : dir_ + "/ca"});
    EXPECT_TRUE(id.ok()) << id.status();
    absl::StatusOr<ClusterTls> tls = ClusterTls::FromDir(dir_ + "/" + name);
    EXPECT_TRUE(tls.ok()) << tls.status();
    return tls.ok() ? *tls : ClusterTls{};
  }

  absl::StatusOr<std::unique_ptr<InstanceServer>> StartInstance(int i, const std::string& address,
                                                                ClusterTls tls) {
    return InstanceServer::Create(model_.get(), {.name = "host-" + std::to_string(i),
                                                 .preferred_id = i,
                                                 .coordinator_host = "127.0.0.10",
                                                 .coordinator_port = coordinator_->grpc_port(),
                                                 .listen_host = address,
                                                 .tls = std::move(tls),
                                                 .slots = 256,
                                                 .register_retry = absl::Milliseconds(50),
                                                 .cluster_secret = secret_});
  }

  bool WaitForLive(int32_t n, absl::Duration timeout) {
    const absl::Time deadline = absl::Now() + timeout;
    while (coordinator_->LiveInstances() != n && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    return coordinator_->LiveInstances() == n;
  }

  std::string dir_;
  std::unique_ptr<engine::LlamaModel> model_;
  const std::string secret_ = *transport::GenerateClusterSecret();
  CoordinatorOptions options_;
  std::unique_ptr<Coordinator> coordinator_;
  std::vector<std::unique_ptr<InstanceServer>> instances_;
};

TEST_F(ClusterTlsTest, ServesCorrectAnswersAcrossAddressesUnderMutualTls) {
  options_.grpc_host = "127.0.0.10";
  options_.tls = Tls("coordinator", "127.0.0.10");
  options_.rotate_compute_instance = true;  // every request crosses the instances' data plane
  auto c = Coordinator::Create(options_);
  ASSERT_TRUE(c.ok()) << c.status();
  coordinator_ = std::move(*c);
  for (int i = 0; i < 2; ++i) {
    const std::string address = "127.0.0." + std::to_string(11 + i);
    auto s = StartInstance(i, address, Tls("host-" + std::to_string(i), address));
    ASSERT_TRUE(s.ok()) << s.status();
    instances_.push_back(std::move(*s));
  }
  ASSERT_TRUE(WaitForLive(2, absl::Seconds(20)));
  auto ref = engine::Engine::Create(model_.get(), {.use_pool = false});
  ASSERT_TRUE(ref.ok());
  std::vector<int32_t> shared;
  for (int i = 0; i < 40; ++i) shared.push_back((i * 37 + 11) % 512);
  int64_t cached = 0;
  for (int r = 0; r < 6; ++r) {
    std::vector<int32_t> prompt = shared;
    for (int i = 0; i < 5; ++i) prompt.push_back((r * 101 + i * 13) % 512);
    auto got = coordinator_->Complete({.prompt = prompt, .max_tokens = 3});
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->tokens, (*ref)->Generate(prompt, 3)->tokens);
    cached += got->cached_tokens;
  }
  // Every request after the first reads the shared prefix's two full segments from the pool,
  // on the other instance every other time.
  EXPECT_EQ(cached, 32 * 5);
}

TEST_F(ClusterTlsTest, AnInstanceWithAStrangersCertificateNeverJoins) {
  options_.tls = Tls("coordinator", "127.0.0.1");
  auto c = Coordinator::Create(options_);
  ASSERT_TRUE(c.ok()) << c.status();
  coordinator_ = std::move(*c);
  auto member = InstanceServer::Create(model_.get(), {.name = "member",
                                                      .preferred_id = 0,
                                                      .coordinator_port = coordinator_->grpc_port(),
                                                      .tls = Tls("member", "127.0.0.1"),
                                                      .slots = 256,
                                                      .cluster_secret = secret_});
  ASSERT_TRUE(member.ok()) << member.status();
  auto stranger =
      InstanceServer::Create(model_.get(), {.name = "stranger",
                                            .preferred_id = 1,
                                            .coordinator_port = coordinator_->grpc_port(),
                                            .tls = Tls("x", "127.0.0.1", true),
                                            .slots = 256,
                                            .cluster_secret = secret_});
  ASSERT_TRUE(stranger.ok()) << stranger.status();
  ASSERT_TRUE(WaitForLive(1, absl::Seconds(20)));
  absl::SleepFor(absl::Seconds(1));
  EXPECT_EQ(coordinator_->LiveInstances(), 1);
  EXPECT_EQ((*stranger)->registrations(), 0);
  EXPECT_EQ((*member)->registrations(), 1);
}

TEST_F(ClusterTlsTest, ListeningBeyondLoopbackInTheClearIsRefusedUnlessAllowed) {
  options_.http_host = "0.0.0.0";
  absl::StatusOr<std::unique_ptr<Coordinator>> open = Coordinator::Create(options_);
  ASSERT_FALSE(open.ok());
  EXPECT_EQ(open.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(open.status().message()), HasSubstr("--tls-dir"));
  options_.allow_insecure = true;
  auto allowed = Coordinator::Create(options_);
  ASSERT_TRUE(allowed.ok()) << allowed.status();
  coordinator_ = std::move(*allowed);
  auto instance =
      InstanceServer::Create(model_.get(), {.name = "open",
                                            .coordinator_port = coordinator_->grpc_port(),
                                            .listen_host = "0.0.0.0",
                                            .slots = 256});
  ASSERT_FALSE(instance.ok());
  EXPECT_THAT(std::string(instance.status().message()), HasSubstr("--insecure"));
}

}  // namespace
}  // namespace tokenlake::service
