// Streaming and cancellation in the in-process cluster (InProcessClusterTest): tokens stream as
// they are made and equal the answer; a cancelled request, or a client that hangs up mid-stream,
// releases everything on its instance and in the lake; a stream that fails over sends every
// token once.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/service/cluster_inprocess_fixture.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

// The value of an unlabelled metric on the /metrics page (-1 when absent).
double Metric(const std::string& page, const std::string& name) {
  const std::string key = "\n" + name + " ";
  const size_t at = page.find(key);
  return at == std::string::npos ? -1 : std::stod(page.substr(at + key.size()));
}

// Waits until the lake pins nothing, reserves nothing, has no pending copy and no active
// request, and every instance runs nothing: what a finished or cancelled request must leave
// behind.
void ExpectEverythingReleased(Coordinator& c,
                              const std::vector<std::unique_ptr<InstanceServer>>& instances) {
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  std::string page;
  auto released = [&] {
    page = c.MetricsText();
    int64_t running = 0;
    for (const auto& i : instances) running += i->requests_running();
    return Metric(page, "tokenlake_pool_pinned_segments") == 0 &&
           Metric(page, "tokenlake_pool_reserved_slots") == 0 &&
           Metric(page, "tokenlake_pool_pending_copies") == 0 &&
           Metric(page, "tokenlake_lake_active_requests") == 0 && running == 0;
  };
  while (!released() && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_TRUE(released()) << page;
}

TEST_F(InProcessClusterTest, StreamedTokensComeAsTheyAreMadeAndEqualTheAnswer) {
  const std::vector<int32_t> prompt = Prompt(3);
  std::vector<std::vector<int32_t>> batches;
  CompletionRequest request{.prompt = prompt, .max_tokens = 12, .stream = true};
  auto r = coordinator_->CompleteStreaming(request, [&](absl::Span<const int32_t> tokens) {
    batches.emplace_back(tokens.begin(), tokens.end());
    return true;
  });
  ASSERT_TRUE(r.ok()) << r.status();
  std::vector<int32_t> streamed;
  for (const auto& b : batches) streamed.insert(streamed.end(), b.begin(), b.end());
  EXPECT_EQ(streamed, Expected(prompt, 12));
  EXPECT_EQ(r->tokens, streamed);
  EXPECT_EQ(r->finish_reason, "length");
  EXPECT_FALSE(r->cancelled);
  // One report per iteration (a decode makes one token), not one answer at the end.
  EXPECT_GE(batches.size(), 6u);
  // A stop token ends generation with it (finish_reason "stop").
  const std::vector<int32_t> want = Expected(prompt, 12);
  request.stop_token_ids = {want[4]};
  auto stopped = coordinator_->CompleteStreaming(request, nullptr);
  ASSERT_TRUE(stopped.ok()) << stopped.status();
  const auto first = std::find(want.begin(), want.end(), want[4]);
  EXPECT_EQ(stopped->tokens, std::vector<int32_t>(want.begin(), first + 1));
  EXPECT_EQ(stopped->finish_reason, "stop");
  // Seeded sampling: the same seed gives the same tokens.
  CompletionRequest sampled{.prompt = prompt, .max_tokens = 10, .temperature = 1.0f, .seed = 9};
  auto s1 = coordinator_->Complete(sampled);
  auto s2 = coordinator_->Complete(sampled);
  ASSERT_TRUE(s1.ok() && s2.ok());
  EXPECT_EQ(s1->tokens, s2->tokens);
  ExpectEverythingReleased(*coordinator_, instances_);
}

TEST_F(InProcessClusterTest, ACancelledRequestStopsOnItsInstanceAndReleasesEverything) {
  const std::vector<int32_t> prompt = Prompt(4);
  int64_t got = 0;
  auto r = coordinator_->CompleteStreaming(
      {.prompt = prompt, .max_tokens = 64, .stream = true}, [&](absl::Span<const int32_t> tokens) {
        got += static_cast<int64_t>(tokens.size());
        return got < 2;  // the client goes away after its second token
      });
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_TRUE(r->cancelled);
  EXPECT_EQ(static_cast<int64_t>(r->tokens.size()), got);
  EXPECT_LT(got, 64);
  // The cancel reached the instance: it dropped the request (no answer was computed to the end)
  // and nothing stays pinned, reserved or running.
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  auto cancelled = [&] {
    int64_t n = 0;
    for (const auto& i : instances_) n += i->requests_cancelled();
    return n;
  };
  while (cancelled() < 1 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(cancelled(), 1);
  ExpectEverythingReleased(*coordinator_, instances_);
  EXPECT_THAT(coordinator_->MetricsText(), HasSubstr("tokenlake_requests_cancelled_total 1"));
  // The pool still serves: the same prompt again hits its prefix and answers in full.
  auto again = coordinator_->Complete({.prompt = prompt, .max_tokens = 5});
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->tokens, Expected(prompt, 5));
  EXPECT_GE(again->cached_tokens, 32);
}

TEST_F(InProcessClusterTest, AClientThatHangsUpMidStreamFreesItsRequest) {
  // A raw HTTP client: sends a streamed request, reads the first event, closes.
  std::string body = "{\"prompt\": [";
  for (int32_t t : Prompt(5)) body += std::to_string(t) + ",";
  body.back() = ']';
  body += R"(, "max_tokens": 64, "stream": true})";
  const std::string request = absl::StrCat(
      "POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
      "Content-Length: ",
      body.size(), "\r\n\r\n", body);
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  ASSERT_GE(fd, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_port = htons(static_cast<uint16_t>(coordinator_->http_port()));
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  ASSERT_EQ(::send(fd, request.data(), request.size(), MSG_NOSIGNAL),
            static_cast<ssize_t>(request.size()));
  std::string got;
  char buf[4096];
  while (got.find("data: {") == std::string::npos) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    ASSERT_GT(n, 0) << got;
    got.append(buf, static_cast<size_t>(n));
  }
  EXPECT_THAT(got, HasSubstr("HTTP/1.1 200"));
  EXPECT_THAT(got, HasSubstr("text/event-stream"));
  EXPECT_THAT(got, ::testing::Not(HasSubstr("[DONE]")));
  // Close with a reset, so the server's next write fails at once.
  linger hard{.l_onoff = 1, .l_linger = 0};
  ::setsockopt(fd, SOL_SOCKET, SO_LINGER, &hard, sizeof(hard));
  ::close(fd);
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  auto cancelled = [&] {
    return Metric(coordinator_->MetricsText(), "tokenlake_requests_cancelled_total");
  };
  while (cancelled() < 1 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_EQ(cancelled(), 1) << coordinator_->MetricsText();
  ExpectEverythingReleased(*coordinator_, instances_);
}

TEST_F(InProcessClusterTest, AStreamThatFailsOverSendsEveryTokenOnce) {
  const std::vector<int32_t> prompt = Prompt(6);
  std::vector<int32_t> streamed;
  int32_t killed = -1;
  auto r = coordinator_->CompleteStreaming(
      {.prompt = prompt, .max_tokens = 40, .stream = true}, [&](absl::Span<const int32_t> tokens) {
        streamed.insert(streamed.end(), tokens.begin(), tokens.end());
        if (killed < 0 && streamed.size() >= 3) {
          // The computing instance dies mid-stream: the request fails over to the other one,
          // which regenerates the same tokens; those already sent must not come again.
          for (int32_t i = 0; i < 2 && killed < 0; ++i) {
            if (instances_[static_cast<size_t>(i)]->requests_running() > 0) {
              instances_[static_cast<size_t>(i)]->Shutdown();
              killed = i;
            }
          }
        }
        return true;
      });
  ASSERT_GE(killed, 0);
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->attempts, 2);
  EXPECT_NE(r->instance, killed);
  EXPECT_EQ(streamed, Expected(prompt, 40));
  EXPECT_EQ(r->tokens, streamed);
}

}  // namespace
}  // namespace tokenlake::service
