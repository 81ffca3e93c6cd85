// End-to-end tests of a TokenLake cluster on loopback: a `tokenlake coordinator` and N
// `tokenlake instance` processes (LocalCluster; every child dies with this test process and is
// stopped in teardown). Every answer is checked against a single-process reference run of the
// same model (engine without the pool).
//
// Covered (tracker issue 5): correct answers; bad HTTP input gets a 4xx and does not disturb
// other requests; kill -9 of an instance during load (failover, recompute, replicated heavy
// hitters still hit, dead within the timeout, rejoins empty); a coordinator restart (instances
// re-register and the prefix tree is rebuilt); a lossy or slow transport (correct answer or a
// clear error, nothing past the deadline). The cluster runs TokenLake: the coordinator's lake
// plans every iteration of every instance's engine, and with rotated computing instances the
// query tensors and the KV really cross between the instance processes (remote attend calls,
// KV pulls and remote stores counted on /metrics), with every answer still equal to the
// single-process reference.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <signal.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <map>
#include <random>
#include <regex>
#include <sstream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/engine/prompts.h"
#include "tokenlake/service/cluster_testing.h"
#include "tokenlake/service/local_cluster.h"
#include "tokenlake/service/process.h"

#ifndef TOKENLAKE_BINARY
#error "TOKENLAKE_BINARY must name the tokenlake executable"
#endif

namespace tokenlake::service {
namespace {

using nlohmann::json;
using ::testing::HasSubstr;

constexpr int kMaxTokens = 4;

// The model and the reference answers (engine without the pool, one process), shared.
class Reference {
 public:
  static Reference& Get() {
    static Reference* r = new Reference();
    return *r;
  }
  std::vector<int32_t> Answer(const std::vector<int32_t>& prompt, int32_t max_tokens) {
    auto key = std::make_pair(prompt, max_tokens);
    auto it = cache_.find(key);
    if (it != cache_.end()) return it->second;
    auto r = engine_->Generate(prompt, max_tokens);
    EXPECT_TRUE(r.ok()) << r.status();
    return cache_[key] = r.ok() ? r->tokens : std::vector<int32_t>{};
  }

 private:
  Reference() {
    model_ = std::move(*engine::LlamaModel::Load(TestModelDir()));
    engine_ = std::move(*engine::Engine::Create(model_.get(), {.use_pool = false}));
  }
  std::unique_ptr<engine::LlamaModel> model_;
  std::unique_ptr<engine::Engine> engine_;
  std::map<std::pair<std::vector<int32_t>, int32_t>, std::vector<int32_t>> cache_;
};

// A shared 48-token system prompt (3 segments of 16) followed by a per-request suffix.
std::vector<int32_t> Prompt(uint64_t seed, int shared_tokens = 48, int suffix_tokens = 9) {
  std::vector<int32_t> p;
  std::mt19937_64 shared(12345);
  for (int i = 0; i < shared_tokens; ++i) p.push_back(static_cast<int32_t>(shared() % 512));
  std::mt19937_64 rng(seed);
  for (int i = 0; i < suffix_tokens; ++i) p.push_back(static_cast<int32_t>(rng() % 512));
  return p;
}

std::string Body(const std::vector<int32_t>& prompt, int max_tokens = kMaxTokens) {
  return json({{"prompt", prompt}, {"max_tokens", max_tokens}}).dump();
}

struct Answer {
  int status = 0;
  std::vector<int32_t> tokens;
  int64_t cached_tokens = 0;
  std::string body;
};

Answer Complete(const LocalCluster& c, const std::vector<int32_t>& prompt,
                absl::Duration timeout = absl::Seconds(60)) {
  Answer a;
  auto r = HttpPost(c.http_port(), "/v1/completions", Body(prompt), timeout);
  if (!r.ok()) {
    a.body = std::string(r.status().message());
    return a;
  }
  a.status = r->first;
  a.body = r->second;
  json j = json::parse(a.body, nullptr, false);
  if (a.status == 200 && !j.is_discarded()) {
    a.tokens = j["choices"][0]["tokens"].get<std::vector<int32_t>>();
    a.cached_tokens = j["usage"]["prompt_tokens_details"]["cached_tokens"].get<int64_t>();
  }
  return a;
}

// The value of a metric sample line `name{labels} v` (or `name v`) in /metrics; -1 if absent.
double Metric(const LocalCluster& c, const std::string& sample) {
  auto r = HttpGet(c.http_port(), "/metrics");
  if (!r.ok()) return -1;
  const std::string& text = r->second;
  size_t pos = 0;
  while ((pos = text.find(sample + " ", pos)) != std::string::npos) {
    if (pos == 0 || text[pos - 1] == '\n') return std::stod(text.substr(pos + sample.size() + 1));
    ++pos;
  }
  return -1;
}

LocalClusterOptions Options(int instances) {
  LocalClusterOptions o;
  o.binary = TOKENLAKE_BINARY;
  o.model = TestModelDir();
  o.instances = instances;
  o.heartbeat_ms = 100;
  o.dead_after_ms = 1000;
  o.work_dir = ::testing::TempDir();
  return o;
}

std::unique_ptr<LocalCluster> StartCluster(const LocalClusterOptions& o) {
  auto c = LocalCluster::Start(o);
  EXPECT_TRUE(c.ok()) << c.status();
  return c.ok() ? std::move(*c) : nullptr;
}

TEST(ServiceClusterTest, AnswersMatchTheSingleProcessReference) {
  auto c = StartCluster(Options(2));
  ASSERT_NE(c, nullptr);
  auto prompts =
      engine::LoadPromptsJsonl(TestSourceDir() + "/tests/fixtures/llama_tiny/prompts.jsonl");
  ASSERT_TRUE(prompts.ok()) << prompts.status();
  int64_t cached = 0;
  for (int round = 0; round < 2; ++round) {
    for (const engine::Prompt& p : *prompts) {
      SCOPED_TRACE(testing::Message() << "line " << p.line << " round " << round);
      Answer a = Complete(*c, p.input_ids);
      ASSERT_EQ(a.status, 200) << a.body;
      EXPECT_EQ(a.tokens, Reference::Get().Answer(p.input_ids, kMaxTokens));
      cached += a.cached_tokens;
    }
  }
  EXPECT_GT(cached, 0);  // the second round hits the pool
  EXPECT_GT(Metric(*c, "tokenlake_hit_rate"), 0);
  EXPECT_GT(Metric(*c, "tokenlake_pool_segments"), 0);
  EXPECT_GT(Metric(*c, "tokenlake_pool_bytes"), 0);
  auto health = HttpGet(c->http_port(), "/healthz");
  ASSERT_TRUE(health.ok());
  EXPECT_EQ(health->first, 200);
  auto missing = HttpGet(c->http_port(), "/nope");
  ASSERT_TRUE(missing.ok());
  EXPECT_EQ(missing->first, 404);
}

// Sends raw bytes and returns what the server answered before closing (empty on timeout).
std::string RawExchange(int32_t port, const std::string& bytes, bool half_close,
                        absl::Duration pause = absl::ZeroDuration()) {
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return "connect failed";
  }
  timeval tv{.tv_sec = 10, .tv_usec = 0};
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  ::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL);
  absl::SleepFor(pause);
  if (half_close) ::shutdown(fd, SHUT_WR);
  std::string out;
  char buf[4096];
  ssize_t n;
  while ((n = ::recv(fd, buf, sizeof(buf), 0)) > 0) out.append(buf, static_cast<size_t>(n));
  ::close(fd);
  return out;
}

TEST(ServiceClusterTest, BadInputGetsAClear4xxAndDoesNotDisturbOtherRequests) {
  auto c = StartCluster(Options(1));
  ASSERT_NE(c, nullptr);
  const std::vector<int32_t> good = Prompt(1);
  const std::vector<int32_t> expected = Reference::Get().Answer(good, kMaxTokens);
  // A valid request runs concurrently with all the bad ones.
  std::atomic<int> good_ok{0};
  std::thread background([&] {
    for (int i = 0; i < 5; ++i) {
      Answer a = Complete(*c, good);
      if (a.status == 200 && a.tokens == expected) ++good_ok;
    }
  });
  struct Case {
    std::string body;
    int status;
    std::string message;
  };
  std::string too_long = "{\"prompt\": [1";
  for (int i = 1; i < 4096; ++i) too_long += ",1";
  too_long += "]}";
  const std::vector<Case> cases = {
      {"{\"prompt\": [1, 2", 400, "not valid JSON"},
      {"not json at all", 400, "not valid JSON"},
      {"{\"prompt\": [1], \"frobnicate\": 1}", 400, "unknown field 'frobnicate'"},
      {"{\"prompt\": [1, 512]}", 400, "prompt[1] = 512 is outside the vocabulary"},
      {"{\"prompt\": [-5]}", 400, "prompt[0] = -5"},
      {too_long, 400, "context of 4096 tokens"},
      {"{\"prompt\": [1], \"max_tokens\": -1}", 400, "max_tokens"},
      {"{\"prompt\": [1], \"max_tokens\": 0}", 400, "max_tokens"},
      {"{\"prompt\": [1], \"max_tokens\": 100000000000}", 400, "max_tokens"},
      {"{\"prompt\": [1], \"max_tokens\": 257}", 400, "max_tokens"},
      {"[]", 400, "JSON object"},
      {std::string(2 << 20, ' '), 413, ""},
  };
  for (const Case& k : cases) {
    SCOPED_TRACE(k.body.substr(0, 60));
    auto r = HttpPost(c->http_port(), "/v1/completions", k.body);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->first, k.status) << r->second;
    EXPECT_THAT(r->second, HasSubstr(k.message));
    if (k.status != 413) {
      EXPECT_THAT(r->second, HasSubstr("\"error\""));
    }
  }
  // A truncated request (Content-Length larger than what is sent, then the client closes).
  const std::string truncated =
      "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
      "Content-Length: 100\r\n\r\n{\"prompt\": [1,";
  EXPECT_THAT(RawExchange(c->http_port(), truncated, /*half_close=*/true),
              ::testing::Not(HasSubstr("200 OK")));
  // A slow request: headers never finish; the server gives up after its read timeout (2 s).
  const absl::Time start = absl::Now();
  const std::string slow = RawExchange(c->http_port(), "POST /v1/completions HTTP/1.1\r\nHost: x",
                                       /*half_close=*/false);
  EXPECT_THAT(slow, ::testing::Not(HasSubstr("200 OK")));
  EXPECT_LT(absl::Now() - start, absl::Seconds(8));
  // Garbage instead of HTTP.
  EXPECT_THAT(
      RawExchange(c->http_port(), std::string("\x16\x03\x01\x00\xff garbage\r\n\r\n"), true),
      ::testing::Not(HasSubstr("200 OK")));
  background.join();
  EXPECT_EQ(good_ok.load(), 5);
  // Many slow clients at once do not block a request.
  std::vector<int> slow_fds;
  for (int i = 0; i < 12; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(c->http_port()));
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    const std::string partial = "POST /v1/completions HTTP/1.1\r\nHost: x";
    ::send(fd, partial.data(), partial.size(), MSG_NOSIGNAL);
    slow_fds.push_back(fd);
  }
  absl::SleepFor(absl::Milliseconds(100));
  const absl::Time fast_start = absl::Now();
  Answer during = Complete(*c, good);
  EXPECT_EQ(during.status, 200) << during.body;
  EXPECT_LT(absl::Now() - fast_start, absl::Milliseconds(1500));
  for (int fd : slow_fds) ::close(fd);
  Answer after = Complete(*c, good);
  EXPECT_EQ(after.status, 200) << after.body;
  EXPECT_EQ(after.tokens, expected);
  EXPECT_GE(Metric(*c, "tokenlake_requests_total{code=\"400\"}"), 11);
}

// Instances the lake lists as holding at least `tokens` tokens (e.g. the shared prefix).
std::vector<int> Holders(const LocalCluster& c, int instances, int tokens) {
  std::vector<int> holders;
  for (int i = 0; i < instances; ++i) {
    if (Metric(c, absl::StrFormat("tokenlake_instance_tokens{instance=\"%d\"}", i)) >= tokens) {
      holders.push_back(i);
    }
  }
  return holders;
}

TEST(ServiceClusterTest, KillNineDuringLoadKeepsAnswersCorrectAndReplicasHit) {
  LocalClusterOptions o = Options(3);
  // Rebalancing after every 2 requests only (not on a timer), so that nothing is copied to the
  // restarted instance before the test sees it rejoin empty.
  o.coordinator_flags = {"--rebalance-every", "2", "--rebalance-interval-ms", "0"};
  auto c = StartCluster(o);
  ASSERT_NE(c, nullptr);
  // Make the shared prefix a heavy hitter: the lake's rebalancing replicates it (the receiving
  // instance pulls its KV from the holder over the data plane).
  std::vector<int> holders;
  for (uint64_t i = 0; i < 40 && holders.size() < 2; ++i) {
    Answer a = Complete(*c, Prompt(100 + i));
    ASSERT_EQ(a.status, 200) << a.body;
    ASSERT_EQ(a.tokens, Reference::Get().Answer(Prompt(100 + i), kMaxTokens));
    if (i >= 3) holders = Holders(*c, 3, 48);
  }
  ASSERT_GE(holders.size(), 2u) << "the heavy hitter was not replicated";
  EXPECT_GT(Metric(*c, "tokenlake_rebalance_actions_total"), 0);
  // The copies are real: the receiving instances pulled the KV (reported with heartbeats).
  absl::Time until = absl::Now() + absl::Seconds(5);
  while (Metric(*c, "tokenlake_data_plane_bytes_total{kind=\"rebalance_copy\"}") <= 0 &&
         absl::Now() < until) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_GT(Metric(*c, "tokenlake_data_plane_bytes_total{kind=\"rebalance_copy\"}"), 0);
  const int victim = holders[0];

  // Load: 4 clients x 10 requests with the shared prefix; kill -9 a holder in the middle.
  constexpr int kClients = 4, kRequests = 10;
  std::atomic<int> done{0}, wrong{0}, failed{0};
  std::vector<std::thread> clients;
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < kClients * kRequests; ++i) {
    prompts.push_back(Prompt(1000 + i));
    Reference::Get().Answer(prompts.back(), kMaxTokens);  // computed before the load starts
  }
  for (int k = 0; k < kClients; ++k) {
    clients.emplace_back([&, k] {
      for (int i = 0; i < kRequests; ++i) {
        const auto& p = prompts[k * kRequests + i];
        Answer a = Complete(*c, p);
        if (a.status != 200) {
          ++failed;
          std::cerr << "request failed: " << a.status << " " << a.body << "\n";
        } else if (a.tokens != Reference::Get().Answer(p, kMaxTokens)) {
          ++wrong;
        }
        ++done;
      }
    });
  }
  while (done.load() < kClients * kRequests / 4) absl::SleepFor(absl::Milliseconds(5));
  const absl::Time killed_at = absl::Now();
  c->KillInstance(victim);
  for (auto& t : clients) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(failed.load(), 0);
  // Marked dead within the timeout (plus scheduling slack on a loaded machine).
  ASSERT_TRUE(c->WaitForLive(2, absl::Seconds(5)).ok());
  EXPECT_LT(absl::Now() - killed_at, absl::Milliseconds(o.dead_after_ms) + absl::Seconds(5));
  EXPECT_EQ(
      Metric(*c, absl::StrFormat("tokenlake_instance_alive{instance=\"%d\",name=\"instance-%d\"}",
                                 victim, victim)),
      0);
  EXPECT_GE(Metric(*c, "tokenlake_instance_deaths_total"), 1);
  std::cout << "kill -9: failovers " << Metric(*c, "tokenlake_failovers_total") << "\n";
  // The replicated heavy hitter still hits.
  Answer hit = Complete(*c, Prompt(5000));
  ASSERT_EQ(hit.status, 200) << hit.body;
  EXPECT_EQ(hit.tokens, Reference::Get().Answer(Prompt(5000), kMaxTokens));
  EXPECT_GE(hit.cached_tokens, 48);
  // The instance restarts and rejoins empty.
  ASSERT_TRUE(c->RestartInstance(victim).ok());
  ASSERT_TRUE(c->WaitForLive(3, absl::Seconds(30)).ok());
  EXPECT_EQ(Metric(*c, absl::StrFormat("tokenlake_instance_segments{instance=\"%d\"}", victim)), 0);
  for (uint64_t i = 0; i < 6; ++i) {
    Answer a = Complete(*c, Prompt(6000 + i));
    ASSERT_EQ(a.status, 200) << a.body;
    EXPECT_EQ(a.tokens, Reference::Get().Answer(Prompt(6000 + i), kMaxTokens));
  }
}

TEST(ServiceClusterTest, InstanceRestartedBeforeItIsDeclaredDeadFailsOverAtOnce) {
  LocalClusterOptions o = Options(2);
  o.dead_after_ms = 5000;  // the restart re-registers long before the instance could be dead
  auto c = StartCluster(o);
  ASSERT_NE(c, nullptr);
  std::vector<std::vector<int32_t>> prompts;
  for (int i = 0; i < 30; ++i) {
    prompts.push_back(Prompt(7000 + i, 32, 40));
    Reference::Get().Answer(prompts.back(), kMaxTokens);
  }
  std::atomic<int> next{0}, wrong{0}, failed{0};
  std::atomic<int64_t> slowest_ms{0};
  std::vector<std::thread> clients;
  for (int k = 0; k < 3; ++k) {
    clients.emplace_back([&] {
      for (int i = next++; i < static_cast<int>(prompts.size()); i = next++) {
        const absl::Time t0 = absl::Now();
        Answer a = Complete(*c, prompts[i]);
        const int64_t ms = absl::ToInt64Milliseconds(absl::Now() - t0);
        int64_t prev = slowest_ms.load();
        while (ms > prev && !slowest_ms.compare_exchange_weak(prev, ms)) {
        }
        if (a.status != 200) {
          ++failed;
          std::cerr << "request failed: " << a.status << " " << a.body << "\n";
        } else if (a.tokens != Reference::Get().Answer(prompts[i], kMaxTokens)) {
          ++wrong;
        }
      }
    });
  }
  while (next.load() < 8) absl::SleepFor(absl::Milliseconds(2));
  ASSERT_TRUE(c->RestartInstance(0).ok());  // kill -9, then start again at once
  for (auto& t : clients) t.join();
  EXPECT_EQ(wrong.load(), 0);
  EXPECT_EQ(failed.load(), 0);
  // Requests sent to the dead incarnation failed over when it re-registered, not after the
  // 5 s death timeout.
  EXPECT_LT(slowest_ms.load(), 4000);
  ASSERT_TRUE(c->WaitForLive(2, absl::Seconds(30)).ok());
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (Metric(*c, "tokenlake_instance_rejoins_total") < 1 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_GE(Metric(*c, "tokenlake_instance_rejoins_total"), 1);
  EXPECT_EQ(Metric(*c, "tokenlake_instance_deaths_total"), 0);
}

TEST(ServiceClusterTest, CoordinatorRestartRebuildsThePrefixTreeFromTheInstances) {
  LocalClusterOptions o = Options(2);
  // Computing instances alternate, so a chain's segments are spread over both instances
  // (children stored on one instance under parents held by the other): the rebuild must put
  // parents first whatever the order in which the instances re-register.
  o.coordinator_flags = {"--rotate-compute", "--rebalance-interval-ms", "0"};
  auto c = StartCluster(o);
  ASSERT_NE(c, nullptr);
  for (uint64_t i = 0; i < 4; ++i) {
    ASSERT_EQ(Complete(*c, Prompt(200 + i, 48, 9 + 16 * static_cast<int>(i))).status, 200);
  }
  const double segments = Metric(*c, "tokenlake_pool_segments");
  const double replicas = Metric(*c, "tokenlake_pool_replicas");
  ASSERT_GT(segments, 0);
  ASSERT_GT(Metric(*c, "tokenlake_instance_segments{instance=\"0\"}"), 0);
  ASSERT_GT(Metric(*c, "tokenlake_instance_segments{instance=\"1\"}"), 0);
  const int32_t port = c->http_port();
  ASSERT_TRUE(c->RestartCoordinator().ok());
  EXPECT_EQ(c->http_port(), port);
  // Instances re-registered with everything they hold.
  absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (Metric(*c, "tokenlake_pool_segments") != segments && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_EQ(Metric(*c, "tokenlake_pool_segments"), segments);
  EXPECT_EQ(Metric(*c, "tokenlake_pool_replicas"), replicas);
  for (uint64_t i = 0; i < 4; ++i) {
    const std::vector<int32_t> p = Prompt(200 + i, 48, 9 + 16 * static_cast<int>(i));
    Answer a = Complete(*c, p);
    ASSERT_EQ(a.status, 200) << a.body;
    EXPECT_EQ(a.tokens, Reference::Get().Answer(p, kMaxTokens));
    // The whole prompt but its last part-segment was pooled before the restart.
    EXPECT_EQ(a.cached_tokens, static_cast<int64_t>((p.size() - 1) / 16 * 16));
  }
}

TEST(ServiceClusterTest, RotatedComputeInstancesMoveQueriesAndKvBetweenProcesses) {
  LocalClusterOptions o = Options(2);
  o.coordinator_flags = {"--rotate-compute"};
  auto c = StartCluster(o);
  ASSERT_NE(c, nullptr);
  int64_t cached = 0;
  for (uint64_t i = 0; i < 10; ++i) {
    // Prompts that share the 48-token prefix, some long enough to pull rather than move
    // queries, some re-using an earlier prompt whole.
    const std::vector<int32_t> p = Prompt(800 + i % 6, 48, 9 + 20 * static_cast<int>(i % 3));
    Answer a = Complete(*c, p);
    ASSERT_EQ(a.status, 200) << a.body;
    EXPECT_EQ(a.tokens, Reference::Get().Answer(p, kMaxTokens)) << "request " << i;
    cached += a.cached_tokens;
  }
  EXPECT_GT(cached, 0);
  const double remote_attends = Metric(*c, "tokenlake_remote_attend_calls_total");
  const double pulled = Metric(*c, "tokenlake_kv_pulled_segments_total");
  const double stored_remote = Metric(*c, "tokenlake_kv_stored_remote_segments_total");
  std::cout << "rotated compute: remote attend calls " << remote_attends << ", KV pulls " << pulled
            << ", remote stores " << stored_remote << ", query bytes "
            << Metric(*c, "tokenlake_data_plane_bytes_total{kind=\"query_out\"}") << "\n";
  EXPECT_GT(remote_attends, 0);
  EXPECT_GT(pulled + stored_remote, 0);
  EXPECT_GT(Metric(*c, "tokenlake_data_plane_bytes_total{kind=\"query_out\"}"), 0);
  EXPECT_GT(Metric(*c, "tokenlake_data_plane_bytes_total{kind=\"partial_back\"}"), 0);
  EXPECT_GT(Metric(*c, "tokenlake_lake_plan_iterations_total"), 0);
  EXPECT_GT(Metric(*c, "tokenlake_lake_hit_rate"), 0);
}

TEST(ServiceClusterTest, LossyTransportGivesCorrectAnswersOrClearErrorsWithinTheDeadline) {
  LocalClusterOptions o = Options(2);
  o.request_timeout_ms = 2500;
  o.attempt_timeout_ms = 700;
  o.coordinator_flags = {"--fault-drop", "0.4"};
  auto c = StartCluster(o);
  ASSERT_NE(c, nullptr);
  int ok = 0, errors = 0;
  for (uint64_t i = 0; i < 12; ++i) {
    const absl::Time start = absl::Now();
    Answer a = Complete(*c, Prompt(300 + i), absl::Seconds(20));
    EXPECT_LT(absl::Now() - start, absl::Milliseconds(o.request_timeout_ms) + absl::Seconds(2));
    if (a.status == 200) {
      ++ok;
      EXPECT_EQ(a.tokens, Reference::Get().Answer(Prompt(300 + i), kMaxTokens));
    } else {
      ++errors;
      EXPECT_TRUE(a.status == 503 || a.status == 504) << a.status << " " << a.body;
      EXPECT_THAT(a.body, HasSubstr("did not answer within"));
    }
  }
  EXPECT_GT(ok, 0);
  std::cout << "lossy transport: " << ok << " ok, " << errors << " clear errors\n";
}

TEST(ServiceClusterTest, SlowTransportStillAnswersCorrectly) {
  LocalClusterOptions o = Options(2);
  o.coordinator_flags = {"--fault-delay-ms", "150"};
  auto c = StartCluster(o);
  ASSERT_NE(c, nullptr);
  for (uint64_t i = 0; i < 4; ++i) {
    const absl::Time start = absl::Now();
    Answer a = Complete(*c, Prompt(400 + i));
    ASSERT_EQ(a.status, 200) << a.body;
    EXPECT_EQ(a.tokens, Reference::Get().Answer(Prompt(400 + i), kMaxTokens));
    EXPECT_GE(absl::Now() - start, absl::Milliseconds(150));
  }
}

// ---- `tokenlake serve` supervising its coordinator (issue 15, finding 5) ----

// The pids of `parent`'s children whose command line contains `word` (as one argument).
std::vector<pid_t> ChildrenOf(pid_t parent, const std::string& word) {
  std::vector<pid_t> out;
  for (const auto& e : std::filesystem::directory_iterator("/proc")) {
    const std::string name = e.path().filename().string();
    if (name.find_first_not_of("0123456789") != std::string::npos) continue;
    std::ifstream stat(e.path() / "stat");
    std::string line;
    std::getline(stat, line);
    const size_t close = line.rfind(')');
    if (close == std::string::npos) continue;
    std::istringstream rest(line.substr(close + 2));
    char state;
    pid_t ppid = 0;
    rest >> state >> ppid;
    if (ppid != parent) continue;
    std::ifstream cmd(e.path() / "cmdline");
    std::string args((std::istreambuf_iterator<char>(cmd)), std::istreambuf_iterator<char>());
    const std::string arg = std::string(1, '\0') + word + std::string(1, '\0');
    if (args.find(arg) != std::string::npos) out.push_back(std::stoi(name));
  }
  return out;
}

std::string ReadAll(const std::string& path) {
  std::ifstream f(path);
  return std::string((std::istreambuf_iterator<char>(f)), std::istreambuf_iterator<char>());
}

struct Serve {
  std::unique_ptr<ChildProcess> process;
  int32_t port = 0;
  std::string log;
};

Serve StartServe(const std::string& model, const std::string& tag) {
  Serve s;
  const std::string dir = ::testing::TempDir();
  const std::string port_file = absl::StrCat(dir, "/serve-", tag, "-", ::getpid(), ".port");
  s.log = absl::StrCat(dir, "/serve-", tag, "-", ::getpid(), ".log");
  ::unlink(port_file.c_str());
  ::unlink(s.log.c_str());
  auto p = ChildProcess::Spawn(
      {TOKENLAKE_BINARY, "serve", "--model", model, "--instances", "2", "--heartbeat-ms", "100",
       "--dead-after-ms", "1000", "--log-dir", dir, "--port-file", port_file},
      s.log);
  EXPECT_TRUE(p.ok()) << p.status();
  if (!p.ok()) return s;
  s.process = std::move(*p);
  auto port = WaitForFile(port_file, absl::Seconds(60));
  EXPECT_TRUE(port.ok()) << port.status() << "\n" << ReadAll(s.log);
  if (port.ok()) s.port = std::stoi(*port);
  return s;
}

bool Healthy(int32_t port, int32_t live, absl::Duration timeout) {
  const absl::Time deadline = absl::Now() + timeout;
  while (absl::Now() < deadline) {
    auto r = HttpGet(port, "/healthz", absl::Seconds(1));
    if (r.ok() && r->first == 200 &&
        r->second.find(absl::StrCat("\"live_instances\":", live)) != std::string::npos) {
      return true;
    }
    absl::SleepFor(absl::Milliseconds(50));
  }
  return false;
}

TEST(ServeSupervisionTest, AKilledCoordinatorIsRestartedAndServesAgain) {
  Serve serve = StartServe(TestModelDir(), "restart");
  ASSERT_GT(serve.port, 0);
  ASSERT_TRUE(Healthy(serve.port, 2, absl::Seconds(30)));
  const std::vector<int32_t> prompt = Prompt(500);
  auto first = HttpPost(serve.port, "/v1/completions", Body(prompt));
  ASSERT_TRUE(first.ok() && first->first == 200) << (first.ok() ? first->second : "");
  // The children carry the secret in their environment, never on their command lines.
  for (pid_t child : ChildrenOf(serve.process->pid(), "--model")) {
    const std::string cmdline = ReadAll(absl::StrCat("/proc/", child, "/cmdline"));
    EXPECT_EQ(cmdline.find("SECRET"), std::string::npos);
  }
  const std::vector<pid_t> coordinators = ChildrenOf(serve.process->pid(), "coordinator");
  ASSERT_EQ(coordinators.size(), 1u);
  ASSERT_EQ(::kill(coordinators[0], SIGKILL), 0);
  // Restarted on the same HTTP port, the instances re-register, and it answers correctly.
  EXPECT_TRUE(Healthy(serve.port, 2, absl::Seconds(30))) << ReadAll(serve.log);
  auto again = HttpPost(serve.port, "/v1/completions", Body(prompt));
  ASSERT_TRUE(again.ok()) << again.status();
  ASSERT_EQ(again->first, 200) << again->second;
  EXPECT_EQ(json::parse(again->second)["choices"][0]["tokens"].get<std::vector<int32_t>>(),
            Reference::Get().Answer(prompt, kMaxTokens));
  const std::vector<pid_t> now = ChildrenOf(serve.process->pid(), "coordinator");
  ASSERT_EQ(now.size(), 1u);
  EXPECT_NE(now[0], coordinators[0]);
  const std::string log = ReadAll(serve.log);
  EXPECT_THAT(log, HasSubstr("the coordinator exited (code 137); restarting it"));
  EXPECT_THAT(log, HasSubstr("restarted the coordinator"));
  serve.process->Signal(SIGTERM);
  auto code = serve.process->Wait(absl::Seconds(30));
  ASSERT_TRUE(code.ok());
  EXPECT_EQ(*code, 0);
}

TEST(ServeSupervisionTest, ServeExitsNonZeroWhenTheCoordinatorCannotBeRestarted) {
  // A copy of the model whose config then disappears: the running processes have loaded it,
  // but a new coordinator cannot start.
  const std::string model = absl::StrCat(::testing::TempDir(), "/serve-model-", ::getpid());
  std::filesystem::remove_all(model);
  std::filesystem::copy(TestModelDir(), model, std::filesystem::copy_options::recursive);
  Serve serve = StartServe(model, "giveup");
  ASSERT_GT(serve.port, 0);
  ASSERT_TRUE(Healthy(serve.port, 2, absl::Seconds(30)));
  std::filesystem::remove(model + "/config.json");
  const std::vector<pid_t> coordinators = ChildrenOf(serve.process->pid(), "coordinator");
  ASSERT_EQ(coordinators.size(), 1u);
  ASSERT_EQ(::kill(coordinators[0], SIGKILL), 0);
  // Five failed starts with pauses of 0.2 .. 1.6 s, then it gives up.
  auto code = serve.process->Wait(absl::Seconds(60));
  ASSERT_TRUE(code.ok()) << "serve still running:\n" << ReadAll(serve.log);
  EXPECT_EQ(*code, 1);
  const std::string log = ReadAll(serve.log);
  EXPECT_THAT(log, HasSubstr("cannot restart the coordinator (5 of 5)"));
  EXPECT_THAT(log, HasSubstr("giving up"));
  std::filesystem::remove_all(model);
}

}  // namespace
}  // namespace tokenlake::service
