// The coordinator and instance servers in one process (real gRPC, HTTP and TCP on 127.0.0.1,
// no child processes), so that the daemons' code also runs under ASan/UBSan in CI (the
// process-level tests in tests/service_cluster_test.cc are labelled slow).
#include <arpa/inet.h>
#include <fcntl.h>
#include <httplib.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <deque>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/algorithm/container.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/match.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/random_testing.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/service/call_auth.h"
#include "tokenlake/service/cluster_inprocess_fixture.h"
#include "tokenlake/service/cluster_testing.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/service/instance_server.h"
#include "tokenlake/service/local_cluster.h"
#include "tokenlake/transport/cluster_secret.h"
#include "tokenlake/transport/tcp_transport.h"
#include "tokenlake/v1/tokenlake.grpc.pb.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

// A TCP connection to 127.0.0.1:port (-1 on failure).
int ConnectLoopback(int32_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) return fd;
  if (fd >= 0) ::close(fd);
  return -1;
}

// Descriptors open in this process.
int64_t OpenFds() {
  int64_t n = 0;
  for ([[maybe_unused]] const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) ++n;
  return n;
}

// This process's TCP sockets (from /proc/net/tcp and tcp6): those whose local port is one of
// `ports`, not listening, whose peer is not a socket of this process either, as "local->peer"
// (connections from elsewhere still open at these ports; here: ones a closed client left).
std::vector<std::string> OrphanedConnections(const std::vector<int32_t>& ports) {
  absl::flat_hash_set<std::string> inodes;
  for (const auto& e : std::filesystem::directory_iterator("/proc/self/fd")) {
    std::error_code ec;
    const std::string target = std::filesystem::read_symlink(e.path(), ec).string();
    if (!ec && absl::StartsWith(target, "socket:[")) {
      inodes.insert(target.substr(8, target.size() - 9));
    }
  }
  struct Conn {
    int32_t local = 0, peer = 0;
    bool listening = false;
  };
  std::vector<Conn> ours;
  for (const char* table : {"/proc/self/net/tcp", "/proc/self/net/tcp6"}) {
    std::ifstream in(table);
    std::string line;
    std::getline(in, line);  // the header
    while (std::getline(in, line)) {
      std::vector<std::string> f = absl::StrSplit(line, ' ', absl::SkipEmpty());
      if (f.size() < 10 || !inodes.contains(f[9])) continue;
      auto port = [](const std::string& a) {
        return static_cast<int32_t>(std::stoi(a.substr(a.rfind(':') + 1), nullptr, 16));
      };
      ours.push_back({port(f[1]), port(f[2]), f[3] == "0A"});
    }
  }
  absl::flat_hash_set<int32_t> local_ports;
  for (const Conn& c : ours) local_ports.insert(c.local);
  std::vector<std::string> orphans;
  for (const Conn& c : ours) {
    if (!c.listening && absl::c_linear_search(ports, c.local) && !local_ports.contains(c.peer)) {
      orphans.push_back(absl::StrCat(c.local, "->", c.peer));
    }
  }
  return orphans;
}

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

// Heartbeats carry what changed in what an instance holds (holdings_report.h), and the lake comes
// to list exactly what the instances hold: its per-instance segment gauges equal the
// instances' own counts once a few heartbeats have passed.
TEST_F(InProcessClusterTest, HeartbeatsReportChangesAndTheLakeFollowsTheInstances) {
  for (int i = 0; i < 6; ++i) {
    auto r = coordinator_->Complete({.prompt = Prompt(i), .max_tokens = 3});
    ASSERT_TRUE(r.ok()) << r.status();
  }
  auto sample = [](const std::string& text, const std::string& series) -> double {
    const size_t pos = text.find("\n" + series + " ");
    return pos == std::string::npos ? -1 : std::stod(text.substr(pos + series.size() + 2));
  };
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  std::string m;
  bool settled = false;
  while (!settled && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(100));
    m = coordinator_->MetricsText();
    settled = true;
    for (int i = 0; i < 2; ++i) {
      const double listed =
          sample(m, absl::StrCat("tokenlake_instance_segments{instance=\"", i, "\"}"));
      settled &= listed == static_cast<double>(instances_[i]->segments());
    }
  }
  EXPECT_TRUE(settled) << m;
  EXPECT_GT(instances_[0]->segments() + instances_[1]->segments(), 0);
  EXPECT_GT(sample(m, "tokenlake_reconcile_reports_total{kind=\"changes\"}"), 0) << m;
  EXPECT_GT(sample(m, "tokenlake_reconcile_changes_total"), 0) << m;
  EXPECT_EQ(sample(m, "tokenlake_reconcile_reports_total{kind=\"gap\"}"), 0) << m;
}

// Issue 15, finding 2 on the coordinator itself: 50 connections that trickle a header byte every
// half second (reconnecting when answered) and 40 idle keep-alive connections hold no HTTP
// worker, so 16 honest clients are all answered correctly within 2 s each.
TEST_F(InProcessClusterTest, SlowAndIdleHttpClientsDoNotHoldUpRequests) {
  const int port = coordinator_->http_port();
  auto connect = [port]() {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(port));
    EXPECT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    return fd;
  };
  std::vector<int> idle;
  for (int i = 0; i < 40; ++i) {
    const int fd = connect();
    const std::string get = "GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n";
    ::send(fd, get.data(), get.size(), MSG_NOSIGNAL);
    char buf[4096];
    EXPECT_GT(::recv(fd, buf, sizeof(buf), 0), 0);  // answered; the connection stays open
    idle.push_back(fd);
  }
  std::atomic<bool> stop{false};
  std::thread slow([&] {
    const std::string request = "POST /v1/completions HTTP/1.1\r\nHost: slow\r\n";
    std::vector<int> fds(50, -1);
    std::vector<size_t> sent(50, 0);
    while (!stop.load()) {
      for (size_t i = 0; i < fds.size(); ++i) {
        if (fds[i] < 0) {
          fds[i] = connect();
          sent[i] = 0;
        }
        pollfd p{fds[i], POLLIN, 0};
        const char byte = request[sent[i]++ % request.size()];
        if (::poll(&p, 1, 0) > 0 || ::send(fds[i], &byte, 1, MSG_NOSIGNAL) != 1) {
          ::close(fds[i]);  // answered (408) or closed: the attack goes on
          fds[i] = -1;
        }
      }
      absl::SleepFor(absl::Milliseconds(500));
    }
    for (int fd : fds) {
      if (fd >= 0) ::close(fd);
    }
  });
  absl::SleepFor(absl::Milliseconds(300));
  std::vector<std::vector<int32_t>> expected(48);
  for (int k = 0; k < 48; ++k) expected[static_cast<size_t>(k)] = Expected(Prompt(k), 2);
  std::atomic<int> correct{0};
  std::atomic<int64_t> slowest_ms{0};
  std::vector<std::thread> honest;
  honest.reserve(16);
  for (int c = 0; c < 16; ++c) {
    honest.emplace_back([&, c] {
      for (int i = 0; i < 3; ++i) {
        const std::vector<int32_t> prompt = Prompt(c * 3 + i);
        std::string body = "{\"prompt\": [";
        for (size_t t = 0; t < prompt.size(); ++t) {
          absl::StrAppend(&body, t > 0 ? "," : "", prompt[t]);
        }
        absl::StrAppend(&body, "], \"max_tokens\": 2}");
        const absl::Time start = absl::Now();
        auto r = HttpPost(port, "/v1/completions", body, absl::Seconds(30));
        const int64_t ms = absl::ToInt64Milliseconds(absl::Now() - start);
        int64_t seen = slowest_ms.load();
        while (ms > seen && !slowest_ms.compare_exchange_weak(seen, ms)) {
        }
        if (r.ok() && r->first == 200) {
          const auto j = nlohmann::json::parse(r->second);
          if (j["choices"][0]["tokens"].get<std::vector<int32_t>>() ==
              expected[static_cast<size_t>(c) * 3 + static_cast<size_t>(i)]) {
            ++correct;
          }
        }
      }
    });
  }
  for (std::thread& t : honest) t.join();
  stop = true;
  slow.join();
  EXPECT_EQ(correct.load(), 48);
  EXPECT_LT(slowest_ms.load(), 2000);
  for (int fd : idle) ::close(fd);
}

// Tenant isolation: equal prompts under different cache salts share no segment (no hit, and
// each tenant's first request computes everything); the same salt shares as before; the answers
// are the same tokens either way.
TEST_F(InProcessClusterTest, CacheSaltsSeparateTenantsAndTheSameSaltShares) {
  const std::vector<int32_t> prompt = Prompt(42);
  auto first_a = coordinator_->Complete({.prompt = prompt, .max_tokens = 3, .cache_salt = "a"});
  ASSERT_TRUE(first_a.ok()) << first_a.status();
  EXPECT_EQ(first_a->cached_tokens, 0);
  auto first_b = coordinator_->Complete({.prompt = prompt, .max_tokens = 3, .cache_salt = "b"});
  ASSERT_TRUE(first_b.ok()) << first_b.status();
  EXPECT_EQ(first_b->cached_tokens, 0);  // tenant a's segments are invisible to b
  auto shared = coordinator_->Complete({.prompt = prompt, .max_tokens = 3});
  ASSERT_TRUE(shared.ok()) << shared.status();
  EXPECT_EQ(shared->cached_tokens, 0);  // nor to requests without a salt
  auto again_a = coordinator_->Complete({.prompt = prompt, .max_tokens = 3, .cache_salt = "a"});
  ASSERT_TRUE(again_a.ok()) << again_a.status();
  EXPECT_EQ(again_a->cached_tokens, 32);  // the same salt shares
  const std::vector<int32_t> want = Expected(prompt, 3);
  for (const auto* r : {&*first_a, &*first_b, &*shared, &*again_a}) EXPECT_EQ(r->tokens, want);
}

// API keys: requests need a valid Bearer key (401 otherwise, the key never echoed), /healthz
// stays open and /metrics needs a key; a key's tenant salts its cache; max_concurrent and
// max_tokens_in_flight answer 429 beyond their limits.
TEST_F(InProcessClusterTest, ApiKeysGateTheFrontEndAndCarryTenantsAndLimits) {
  auto keys = ApiKeys::Parse(
      "sk-team-a-000001 tenant=a\nsk-team-b-000002 tenant=b\nsk-one-at-a-time max_concurrent=1\n"
      "sk-100-tokens-at-a-time max_tokens_in_flight=100\n",
      "keys");
  ASSERT_TRUE(keys.ok()) << keys.status();
  options_.grpc_port = coordinator_->grpc_port();
  options_.api_keys = *keys;
  coordinator_.reset();
  StartCoordinator();
  WaitForLive(2);
  const int port = coordinator_->http_port();
  const std::string body =
      R"({"prompt": [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23], "max_tokens": 2})";
  auto post = [&](const std::string& key, const std::string& b) {
    httplib::Client c("127.0.0.1", port);
    c.set_read_timeout(30, 0);
    httplib::Headers h;
    if (!key.empty()) h.emplace("Authorization", "Bearer " + key);
    auto r = c.Post("/v1/completions", h, b, "application/json");
    return r ? std::make_pair(r->status, r->body) : std::make_pair(-1, std::string());
  };
  auto [no_key, no_key_body] = post("", body);
  EXPECT_EQ(no_key, 401);
  EXPECT_THAT(no_key_body, HasSubstr("API key"));
  auto [wrong, wrong_body] = post("sk-team-a-000009", body);
  EXPECT_EQ(wrong, 401);
  EXPECT_THAT(wrong_body, Not(HasSubstr("sk-team-a")));
  EXPECT_EQ(HttpGet(port, "/healthz")->first, 200);
  EXPECT_EQ(HttpGet(port, "/metrics")->first, 401);
  // Tenants: a's second request hits a's cache; b's equal prompt hits nothing.
  EXPECT_EQ(post("sk-team-a-000001", body).first, 200);
  auto [a2, a2_body] = post("sk-team-a-000001", body);
  EXPECT_EQ(a2, 200);
  EXPECT_THAT(a2_body, HasSubstr("\"cached_tokens\":16"));
  auto [b1, b1_body] = post("sk-team-b-000002", body);
  EXPECT_EQ(b1, 200);
  EXPECT_THAT(b1_body, HasSubstr("\"cached_tokens\":0"));
  // One request at a time for that key: of 8 at once, some are refused with 429, none fail else.
  const std::string slow = R"({"prompt": [1, 2, 3], "max_tokens": 60})";
  std::vector<std::thread> clients;
  std::atomic<int> ok{0}, limited{0}, other{0};
  for (int i = 0; i < 8; ++i) {
    clients.emplace_back([&] {
      const int status = post("sk-one-at-a-time", slow).first;
      (status == 200 ? ok : status == 429 ? limited : other)++;
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_GE(ok.load(), 1);
  EXPECT_GE(limited.load(), 1);
  EXPECT_EQ(other.load(), 0);
  EXPECT_EQ(post("sk-one-at-a-time", slow).first, 200);  // the slot is free again
  // 100 tokens in flight for that key: each request takes 3 + 60, so one runs at a time; the
  // others are refused with 429 and Retry-After; a request of more than 100 is a 400.
  std::atomic<int> tok_ok{0}, tok_limited{0}, tok_other{0}, retry_after{0};
  clients.clear();
  for (int i = 0; i < 8; ++i) {
    clients.emplace_back([&] {
      httplib::Client c("127.0.0.1", port);
      c.set_read_timeout(30, 0);
      auto r = c.Post("/v1/completions", {{"Authorization", "Bearer sk-100-tokens-at-a-time"}},
                      slow, "application/json");
      const int status = r ? r->status : -1;
      (status == 200 ? tok_ok : status == 429 ? tok_limited : tok_other)++;
      if (status == 429 && r->get_header_value("Retry-After") == "1") ++retry_after;
    });
  }
  for (auto& t : clients) t.join();
  EXPECT_GE(tok_ok.load(), 1);
  EXPECT_GE(tok_limited.load(), 1);
  EXPECT_EQ(tok_other.load(), 0);
  EXPECT_EQ(retry_after.load(), tok_limited.load());
  // Two prompts of 3 + 60 tokens each: 126 tokens, more than the key ever allows.
  auto [big, big_body] =
      post("sk-100-tokens-at-a-time", R"({"prompt": [[1, 2, 3], [4, 5, 6]], "max_tokens": 60})");
  EXPECT_EQ(big, 400) << big_body;
  EXPECT_THAT(big_body, HasSubstr("max_tokens_in_flight of 100"));
  EXPECT_EQ(post("sk-100-tokens-at-a-time", slow).first, 200);  // the budget is free again
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
                                                 .slots = 256,
                                                 .cluster_secret = secret_});
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
    // One PlanBatch per iteration, and one more (no plans) that confirms the last stores and
    // releases the last pins when the instance's loop runs dry.
    EXPECT_EQ(after.batch - before.batch, m + 1);
    EXPECT_EQ(after.plan - before.plan, 0);
    EXPECT_EQ(after.fused - before.fused, 0);
    EXPECT_EQ(after.release - before.release, 0);
    EXPECT_EQ(after.commit - before.commit, want_commits[i]);
  }
  const std::string metrics = coordinator_->MetricsText();
  EXPECT_EQ(MetricValue(metrics, "tokenlake_lake_active_requests"), 0);
  EXPECT_EQ(MetricValue(metrics, "tokenlake_pool_pinned_segments"), 0);
  // Every copy the instances stored was confirmed: 2 + 2 + 2 segments, none dropped.
  EXPECT_EQ(MetricValue(metrics, "tokenlake_pool_pending_copies"), 0);
  EXPECT_EQ(MetricValue(metrics, "tokenlake_pool_confirmed_copies_total"), 6);
  EXPECT_EQ(MetricValue(metrics, "tokenlake_pool_dropped_pending_copies_total"), 0);
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

// An instance whose transport cannot accept connections (out of descriptors) reports it in its
// heartbeat: the coordinator stops routing to it and /healthz names it ("degraded"); once it
// can accept again it serves again.
TEST_F(InProcessClusterTest, AnInstanceThatCannotAcceptIsReportedUnhealthyAndGetsNoRequests) {
  const int32_t port = instances_[1]->transport_port();
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
  const int64_t open_fds = OpenFds();
  rlimit low = old;
  low.rlim_cur = static_cast<rlim_t>(open_fds + 64);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
  std::vector<int> filler;
  for (int fd; (fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC)) >= 0;) filler.push_back(fd);
  ::close(filler.back());
  filler.pop_back();
  // A connection the instance cannot accept: its acceptor fails with EMFILE.
  const int client = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  const bool connected =
      client >= 0 && ::connect(client, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0;
  // Heartbeats (on the established gRPC connection) carry the report.
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (coordinator_->LiveInstances() != 1 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  const int32_t live_while_exhausted = coordinator_->LiveInstances();
  for (int fd : filler) ::close(fd);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &old), 0);
  ASSERT_TRUE(connected);
  EXPECT_EQ(live_while_exhausted, 1);
  auto health = HttpGet(coordinator_->http_port(), "/healthz");
  ASSERT_TRUE(health.ok()) << health.status();
  EXPECT_EQ(health->first, 200);
  EXPECT_THAT(health->second, HasSubstr("degraded"));
  EXPECT_THAT(health->second, HasSubstr("instance 1 ('in-process-1')"));
  EXPECT_THAT(health->second, HasSubstr("cannot accept a connection"));
  // Meanwhile requests go to the healthy instance.
  auto r = coordinator_->Complete({.prompt = Prompt(5), .max_tokens = 2});
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->instance, 0);
  ::close(client);
  WaitForLive(2);
  health = HttpGet(coordinator_->http_port(), "/healthz");
  ASSERT_TRUE(health.ok());
  EXPECT_THAT(health->second, HasSubstr("\"ok\""));
}

// Finding 1 of issue 15: a process without the cluster secret sprays forged GenerateReply
// frames (every plausible correlation id, claiming to be every instance) at every port of the
// cluster while honest requests run; it registers under a live instance's name and calls the
// lake. None of it is accepted: the coordinator has no transport port (it dials instances and
// believes replies only on those connections), instances refuse connections that fail the
// handshake, and gRPC calls without a valid token are UNAUTHENTICATED. A caller with the secret
// still cannot take over a live member's name. The forger connects as fast as it can at every
// port, the gRPC port included: the instances' heartbeats keep them members throughout, and
// every connection it made is closed once it stops.
TEST_F(InProcessClusterTest, ForgedRepliesAndCallsWithoutTheSecretAreRefused) {
  EXPECT_EQ(coordinator_->transport_port(), 0);
  std::vector<int32_t> ports = {coordinator_->http_port(), coordinator_->grpc_port()};
  for (const auto& i : instances_) ports.push_back(i->transport_port());
  // The connections that serving opens (instances' data planes to each other) are made first.
  for (int i = 0; i < 4; ++i) {
    ASSERT_TRUE(coordinator_->Complete({.prompt = Prompt(20 + i), .max_tokens = 2}).ok());
  }
  const int64_t fds_before = OpenFds();
  std::atomic<bool> stop{false};
  std::atomic<int64_t> frames{0};
  std::thread forger([&] {
    v1::GenerateReply forged;
    forged.add_tokens(0);
    forged.add_tokens(0);
    const std::string payload = forged.SerializeAsString();
    while (!stop.load()) {
      for (int32_t port : ports) {
        const int fd = ConnectLoopback(port);
        if (fd >= 0) {
          std::string bytes;
          for (uint64_t id = 1; id <= 64; ++id) {
            for (uint32_t from : {1u, 2u}) {
              unsigned char h[32] = {0x54, 0x4C, 0x4B, 0x31};  // "TLK1"
              std::memcpy(h + 4, &from, 4);
              const uint32_t to = 0, tag = kGenerateReplyTag;
              std::memcpy(h + 8, &to, 4);
              std::memcpy(h + 12, &tag, 4);
              std::memcpy(h + 16, &id, 8);
              const uint64_t size = payload.size();
              std::memcpy(h + 24, &size, 8);
              bytes.append(reinterpret_cast<char*>(h), 32).append(payload);
            }
          }
          ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
          ::close(fd);
          frames.fetch_add(128);
        }
      }
    }
  });
  for (int i = 0; i < 6; ++i) {
    auto r = coordinator_->Complete({.prompt = Prompt(i), .max_tokens = 2});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens, Expected(Prompt(i), 2)) << "request " << i;
  }
  stop.store(true);
  forger.join();
  EXPECT_GT(frames.load(), 0);
  // Every connection of the flood is closed soon after it ends, at every port (requests may
  // have opened connections of their own meanwhile).
  const absl::Time settle = absl::Now() + absl::Seconds(5);
  while (!OrphanedConnections(ports).empty() && absl::Now() < settle) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_THAT(OrphanedConnections(ports), ::testing::IsEmpty());
  EXPECT_LE(OpenFds(), fds_before + 8);

  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", coordinator_->grpc_port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::Coordinator::NewStub(channel);
  v1::RegisterRequest impostor;
  impostor.set_name("in-process-1");
  impostor.set_transport_port(instances_[0]->transport_port());  // any port that listens
  impostor.set_namespace_name(options_.namespace_name);
  impostor.set_segment_tokens(options_.segment_tokens);
  {
    grpc::ClientContext ctx;
    v1::RegisterReply reply;
    const grpc::Status s = stub->Register(&ctx, impostor, &reply);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  }
  {
    grpc::ClientContext ctx;
    AuthorizeCall(&ctx, *transport::GenerateClusterSecret(), "Register");  // a wrong secret
    v1::RegisterReply reply;
    const grpc::Status s = stub->Register(&ctx, impostor, &reply);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::UNAUTHENTICATED) << s.error_message();
  }
  {
    // With the secret, but the member is alive and its transport answers.
    grpc::ClientContext ctx;
    AuthorizeCall(&ctx, secret_, "Register");
    v1::RegisterReply reply;
    const grpc::Status s = stub->Register(&ctx, impostor, &reply);
    EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS) << s.error_message();
    EXPECT_THAT(s.error_message(), HasSubstr("is alive"));
  }
  {
    auto lake = v1::Lake::NewStub(channel);
    grpc::ClientContext ctx;
    v1::PlanBatchRequest in;
    in.add_release_request_ids(1);
    v1::PlanBatchReply out;
    EXPECT_EQ(lake->PlanBatch(&ctx, in, &out).error_code(), grpc::StatusCode::UNAUTHENTICATED);
  }
  const std::string m = coordinator_->MetricsText();
  // The flood at the gRPC port never reached the gRPC server (grpc_listener.h).
  EXPECT_GT(MetricValue(m, "tokenlake_grpc_connections_total{outcome=\"not_grpc\"}"), 0);
  EXPECT_EQ(MetricValue(m, "tokenlake_refused_total{kind=\"unauthenticated\"}"), 3);
  EXPECT_EQ(MetricValue(m, "tokenlake_refused_total{kind=\"live_name\"}"), 1);
  // Both instances are still members and serve.
  EXPECT_EQ(coordinator_->LiveInstances(), 2);
  EXPECT_EQ(instances_[1]->registrations(), 1);
  for (int i = 0; i < 4; ++i) {
    auto r = coordinator_->Complete({.prompt = Prompt(10 + i), .max_tokens = 2});
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens, Expected(Prompt(10 + i), 2));
  }
}

// A registration carries everything the instance holds: over gRPC's default limit of 4 MiB
// (about 170,000 segments) it was refused before the coordinator saw it. 200,000 segments in
// 1,000 chains are taken whole and restored into the lake.
TEST(CoordinatorRegistrationTest, AFullReportAboveFourMebibytesIsTaken) {
  const std::string secret = *transport::GenerateClusterSecret();
  auto c = Coordinator::Create({.lake_instances = 1,
                                .slots_per_instance = 250'000,
                                .restore_window = absl::Seconds(30),
                                .cluster_secret = secret,
                                // No heartbeats follow: the member must outlive the restore.
                                .dead_after = absl::Seconds(120)});
  ASSERT_TRUE(c.ok()) << c.status();
  v1::RegisterRequest request;
  request.set_name("big");
  request.set_transport_port(1);
  request.set_namespace_name("tokenlake");
  request.set_segment_tokens(16);
  request.mutable_state()->set_capacity_slots(250'000);
  request.mutable_state()->set_used_slots(200'000);
  std::mt19937_64 rng(7);
  for (int chain = 0; chain < 1000; ++chain) {
    uint64_t parent = ~uint64_t{0};
    for (int k = 0; k < 200; ++k) {
      v1::Segment* seg = request.mutable_state()->add_segments();
      seg->set_id(rng() | 1);
      seg->set_num_tokens(16);
      seg->set_parent(parent);
      parent = seg->id();
    }
  }
  ASSERT_GT(request.ByteSizeLong(), size_t{4} << 20);
  auto channel =
      grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", (*c)->grpc_port()),
                                grpc::InsecureChannelCredentials(), GrpcChannelArguments());
  auto stub = v1::Coordinator::NewStub(channel);
  grpc::ClientContext ctx;
  AuthorizeCall(&ctx, secret, "Register");
  v1::RegisterReply reply;
  const grpc::Status s = stub->Register(&ctx, request, &reply);
  ASSERT_TRUE(s.ok()) << s.error_message();
  EXPECT_EQ(reply.instance_id(), 0);
  const absl::Time deadline = absl::Now() + absl::Seconds(60);
  while ((*c)->DistinctSegments() < 200'000 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ((*c)->DistinctSegments(), 200'000);
}

// The instance's Register deadline covers the coordinator's restore of what it reports, which
// runs inside the call: the 200,000 segments above took 13 s under AddressSanitizer, where a
// fixed 1 s deadline made the instance register again and again.
TEST(RegisterDeadlineTest, GrowsWithTheReportUpToTenMinutes) {
  const InstanceServerOptions o;
  EXPECT_EQ(RegisterDeadline(o, 0), absl::Seconds(1));
  EXPECT_EQ(RegisterDeadline(o, 10'000), absl::Seconds(2));
  EXPECT_GE(RegisterDeadline(o, 200'000), absl::Seconds(13));
  // The largest report that fits a gRPC message (about 2.7M segments), and beyond: capped.
  EXPECT_EQ(RegisterDeadline(o, 2'700'000), absl::Seconds(271));
  EXPECT_EQ(RegisterDeadline(o, 10'000'000), absl::Minutes(10));
  EXPECT_EQ(RegisterDeadline(o, std::numeric_limits<int64_t>::max()), absl::Minutes(10));
  InstanceServerOptions fixed;
  fixed.register_timeout = absl::Milliseconds(300);
  fixed.register_timeout_per_segment = absl::ZeroDuration();
  EXPECT_EQ(RegisterDeadline(fixed, 1'000'000), absl::Milliseconds(300));
}

// A flood of connections that send garbage or hold their slot at a live instance's transport
// used to make the coordinator's probe of it fail, and a failed probe counted as proof that the
// instance was gone: a caller with the cluster secret could take over its name. Only a definite
// answer counts: the name is refused while the instance lives (its lease is long here, so the
// probe decides) and taken once it has died.
TEST_F(InProcessClusterTest, AFloodedLiveInstanceKeepsItsNameUntilItDies) {
  options_.dead_after = absl::Seconds(60);
  options_.grpc_port = coordinator_->grpc_port();
  coordinator_.reset();
  StartCoordinator();
  WaitForLive(2);
  const int32_t port = instances_[1]->transport_port();
  std::atomic<bool> stop{false};
  std::atomic<int64_t> connections{0};
  std::vector<std::thread> flood;
  flood.reserve(4);
  for (int k = 0; k < 4; ++k) {
    flood.emplace_back([&, k] {
      std::deque<int> held;  // odd threads keep up to 700 connections open each
      const std::string garbage(64, 'x');
      while (!stop.load()) {
        const int fd = ConnectLoopback(port);
        if (fd < 0) continue;
        connections.fetch_add(1);
        if (k % 2 == 0) {
          ::send(fd, garbage.data(), garbage.size(), MSG_NOSIGNAL);
          ::close(fd);
          continue;
        }
        held.push_back(fd);
        if (held.size() > 700) {
          ::close(held.front());
          held.pop_front();
        }
      }
      for (int fd : held) ::close(fd);
    });
  }
  auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", coordinator_->grpc_port()),
                                     grpc::InsecureChannelCredentials());
  auto stub = v1::Coordinator::NewStub(channel);
  auto register_as_instance_1 = [&] {
    v1::RegisterRequest request;
    request.set_name("in-process-1");
    request.set_transport_port(instances_[0]->transport_port());  // any port that listens
    request.set_namespace_name(options_.namespace_name);
    request.set_segment_tokens(options_.segment_tokens);
    grpc::ClientContext ctx;
    AuthorizeCall(&ctx, secret_, "Register");
    v1::RegisterReply reply;
    return stub->Register(&ctx, request, &reply);
  };
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (connections.load() < 3000 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  int refused = 0, unanswered = 0;
  for (int i = 0; i < 20; ++i) {
    const grpc::Status s = register_as_instance_1();
    EXPECT_EQ(s.error_code(), grpc::StatusCode::ALREADY_EXISTS) << s.error_message();
    refused += s.error_code() == grpc::StatusCode::ALREADY_EXISTS ? 1 : 0;
    unanswered += absl::StrContains(s.error_message(), "no definite answer") ? 1 : 0;
    absl::SleepFor(absl::Milliseconds(20));
  }
  std::cout << connections.load() << " flood connections; " << unanswered
            << " of 20 probes got no definite answer\n";
  EXPECT_EQ(MetricValue(coordinator_->MetricsText(), "tokenlake_refused_total{kind=\"live_name\"}"),
            refused);
  EXPECT_EQ(coordinator_->LiveInstances(), 2);
  // Once it has died (its port refuses connections) the name is free, long before its lease
  // would expire.
  instances_[1]->Shutdown();
  grpc::Status taken = register_as_instance_1();
  for (int i = 0; i < 100 && !taken.ok(); ++i) {
    absl::SleepFor(absl::Milliseconds(50));
    taken = register_as_instance_1();
  }
  stop.store(true);
  for (std::thread& t : flood) t.join();
  EXPECT_TRUE(taken.ok()) << taken.error_message();
}

// Finding 9 of issue 15: under load a plan named a segment its holder did not have
// ("SegmentStore:: Pin ... is not stored on instance k"); the retry hid it. Many clients reach a
// new shared prefix at the same moment, round after round, so that plans read segments committed
// an instant earlier by another instance's request. Every answer is right on its first attempt.
// (The race's deterministic reproductions, which fail when a copy is listed at its Commit, are
// lake_pending_test and iteration_loop_test's AnotherEnginesPlanNeverReadsACopyWhoseStore...;
// this is the cluster end to end, with no holder-side wait any more.)
TEST_F(InProcessClusterTest, ConcurrentFirstUsesOfAPrefixAreServedOnTheFirstAttempt) {
  const uint64_t seed = TestSeed(915);
  std::mt19937_64 rng(seed);
  // Computing instances take turns: requests of one round run on both instances at once.
  options_.rotate_compute_instance = true;
  options_.grpc_port = coordinator_->grpc_port();
  coordinator_.reset();
  StartCoordinator();
  WaitForLive(2);
  const int kRounds = 30, kClients = 6;
  int64_t retried = 0, requests = 0;
  for (int round = 0; round < kRounds; ++round) {
    std::vector<int32_t> shared;
    for (int i = 0; i < 48; ++i) shared.push_back(static_cast<int32_t>(rng() % 512));
    std::vector<std::vector<int32_t>> prompts;
    for (int c = 0; c < kClients; ++c) {
      std::vector<int32_t> p = shared;
      for (int i = 0; i < 5 + c; ++i) p.push_back(static_cast<int32_t>(rng() % 512));
      prompts.push_back(std::move(p));
    }
    std::vector<absl::StatusOr<CompletionResult>> results(kClients, absl::UnknownError("not run"));
    std::vector<std::thread> clients;
    for (int c = 0; c < kClients; ++c) {
      clients.emplace_back([&, c] {
        results[static_cast<size_t>(c)] =
            coordinator_->Complete({.prompt = prompts[static_cast<size_t>(c)], .max_tokens = 3});
      });
    }
    for (std::thread& t : clients) t.join();
    for (int c = 0; c < kClients; ++c) {
      SCOPED_TRACE(testing::Message() << "seed=" << seed << " round " << round << " client " << c);
      const auto& r = results[static_cast<size_t>(c)];
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->tokens, Expected(prompts[static_cast<size_t>(c)], 3));
      retried += r->attempts > 1 ? 1 : 0;
      ++requests;
    }
  }
  std::cout << requests << " requests, " << retried << " needed a retry\n";
  EXPECT_EQ(retried, 0);
}

}  // namespace
}  // namespace tokenlake::service
