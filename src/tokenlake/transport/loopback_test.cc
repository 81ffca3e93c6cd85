#include "tokenlake/transport/loopback.h"

#include <cstdint>
#include <deque>
#include <iostream>
#include <random>
#include <thread>
#include <vector>

#include "gtest/gtest.h"

namespace tokenlake::transport {
namespace {

std::unique_ptr<LoopbackTransport> MakeTransport(int32_t n, int64_t max_payload = 1 << 20) {
  auto t = LoopbackTransport::Create({.num_endpoints = n, .max_payload_bytes = max_payload});
  EXPECT_TRUE(t.ok()) << t.status();
  return *std::move(t);
}

Message Msg(int32_t from, int32_t to, uint32_t tag, uint64_t corr, std::vector<std::byte> p = {}) {
  return Message{.from = InstanceId(from),
                 .to = InstanceId(to),
                 .tag = tag,
                 .correlation_id = corr,
                 .payload = std::move(p)};
}

TEST(LoopbackTransportTest, CreateRejectsBadOptions) {
  EXPECT_EQ(LoopbackTransport::Create({.num_endpoints = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(
      LoopbackTransport::Create({.num_endpoints = 2, .max_payload_bytes = -1}).status().code(),
      absl::StatusCode::kInvalidArgument);
}

TEST(LoopbackTransportTest, ReportsCapabilities) {
  auto t = MakeTransport(3, 1000);
  const Capabilities c = t->capabilities();
  EXPECT_EQ(c.name, "loopback");
  EXPECT_TRUE(c.in_process);
  EXPECT_TRUE(c.ordered);
  EXPECT_TRUE(c.reliable);
  EXPECT_EQ(c.max_payload_bytes, 1000);
  EXPECT_EQ(t->num_endpoints(), 3);
}

TEST(LoopbackTransportTest, DeliversWholeMessageToTheAddressedEndpointOnly) {
  auto t = MakeTransport(3);
  std::vector<std::byte> payload = {std::byte{1}, std::byte{2}, std::byte{250}};
  ASSERT_TRUE(t->Send(Msg(0, 2, 7, 99, payload)).ok());
  EXPECT_EQ(t->Receive(InstanceId(1), absl::ZeroDuration()).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  auto m = t->Receive(InstanceId(2), absl::ZeroDuration());
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->from, InstanceId(0));
  EXPECT_EQ(m->to, InstanceId(2));
  EXPECT_EQ(m->tag, 7u);
  EXPECT_EQ(m->correlation_id, 99u);
  EXPECT_EQ(m->payload, payload);
  EXPECT_EQ(t->messages_sent(InstanceId(0)), 1);
  EXPECT_EQ(t->bytes_sent(InstanceId(0)), 3);
  EXPECT_EQ(t->messages_sent(InstanceId(2)), 0);
}

TEST(LoopbackTransportTest, RejectsBadEndpointsAndOversizedPayloadsWithoutQueueing) {
  auto t = MakeTransport(2, 4);
  auto s = t->Send(Msg(0, 2, 0, 0));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("to endpoint 2"), std::string::npos) << s;
  s = t->Send(Msg(-1, 0, 0, 0));
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("from endpoint"), std::string::npos) << s;
  EXPECT_EQ(t->Send(Message{}).code(), absl::StatusCode::kInvalidArgument);  // invalid ids
  EXPECT_EQ(t->Send(Msg(0, 1, 0, 0, std::vector<std::byte>(5))).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_TRUE(t->Send(Msg(0, 1, 0, 0, std::vector<std::byte>(4))).ok());
  EXPECT_EQ(t->queued(InstanceId(1)), 1);
  EXPECT_EQ(t->Receive(InstanceId(5), absl::ZeroDuration()).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(LoopbackTransportTest, ReceiveTimesOutWhenNothingArrives) {
  auto t = MakeTransport(1);
  auto m = t->Receive(InstanceId(0), absl::Milliseconds(5));
  EXPECT_EQ(m.status().code(), absl::StatusCode::kDeadlineExceeded);
}

TEST(LoopbackTransportTest, ShutdownWakesBlockedReceiverAfterDrainingQueue) {
  auto t = MakeTransport(2);
  ASSERT_TRUE(t->Send(Msg(0, 1, 1, 1)).ok());
  std::thread receiver([&] {
    auto first = t->Receive(InstanceId(1), absl::InfiniteDuration());
    EXPECT_TRUE(first.ok());
    auto second = t->Receive(InstanceId(1), absl::InfiniteDuration());
    EXPECT_EQ(second.status().code(), absl::StatusCode::kCancelled);
  });
  absl::SleepFor(absl::Milliseconds(10));
  t->Shutdown();
  receiver.join();
  EXPECT_EQ(t->Send(Msg(0, 1, 1, 1)).code(), absl::StatusCode::kUnavailable);
  t->Shutdown();  // idempotent
}

// Randomised: several sender threads send random messages to random endpoints; one receiver
// per endpoint drains. Checks against a model: every message is delivered exactly once, to the
// right endpoint, unmodified, and per (sender, receiver) in send order; counters add up.
class LoopbackRandomTest : public ::testing::TestWithParam<std::tuple<int, int>> {};

TEST_P(LoopbackRandomTest, EveryMessageArrivesOnceInPerSenderOrder) {
  // Plain ints, not a structured binding: the sender lambdas capture them (C++20 allows
  // capturing bindings, clang 14 does not).
  const int num_endpoints = std::get<0>(GetParam());
  const int messages_per_sender = std::get<1>(GetParam());
  const uint32_t seed = 12345u + static_cast<uint32_t>(num_endpoints * 31 + messages_per_sender);
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  auto t = MakeTransport(num_endpoints);
  // Model: what each sender sent to each endpoint, in order (payload encodes sender, seq).
  std::vector<std::vector<std::vector<uint64_t>>> sent(
      num_endpoints, std::vector<std::vector<uint64_t>>(num_endpoints));
  std::vector<int64_t> sent_bytes(num_endpoints, 0);
  std::vector<std::thread> senders;
  for (int s = 0; s < num_endpoints; ++s) {
    std::mt19937 rng(seed + s);
    for (int i = 0; i < messages_per_sender; ++i) {
      const int to = static_cast<int>(rng() % num_endpoints);
      sent[s][to].push_back(static_cast<uint64_t>(s) << 32 | i);
    }
  }
  for (int s = 0; s < num_endpoints; ++s) {
    senders.emplace_back([&, s] {
      std::mt19937 rng(seed + s);
      for (int i = 0; i < messages_per_sender; ++i) {
        const int to = static_cast<int>(rng() % num_endpoints);
        const uint64_t corr = static_cast<uint64_t>(s) << 32 | i;
        std::vector<std::byte> payload(i % 7);
        for (size_t b = 0; b < payload.size(); ++b) payload[b] = std::byte(corr + b);
        ASSERT_TRUE(t->Send(Msg(s, to, static_cast<uint32_t>(i), corr, payload)).ok());
      }
    });
    for (int i = 0; i < messages_per_sender; ++i) sent_bytes[s] += i % 7;
  }
  std::vector<std::vector<std::vector<uint64_t>>> got(
      num_endpoints, std::vector<std::vector<uint64_t>>(num_endpoints));
  std::vector<std::thread> receivers;
  for (int r = 0; r < num_endpoints; ++r) {
    int64_t expected = 0;
    for (int s = 0; s < num_endpoints; ++s) expected += sent[s][r].size();
    receivers.emplace_back([&, r, expected] {
      for (int64_t k = 0; k < expected; ++k) {
        auto m = t->Receive(InstanceId(r), absl::Seconds(30));
        ASSERT_TRUE(m.ok()) << m.status();
        ASSERT_EQ(m->to, InstanceId(r));
        const uint64_t corr = m->correlation_id;
        ASSERT_EQ(static_cast<int>(corr >> 32), m->from.value());
        ASSERT_EQ(m->tag, static_cast<uint32_t>(corr & 0xffffffffu));
        ASSERT_EQ(m->payload.size(), (corr & 0xffffffffu) % 7);
        for (size_t b = 0; b < m->payload.size(); ++b)
          ASSERT_EQ(m->payload[b], std::byte(corr + b));
        got[m->from.value()][r].push_back(corr);
      }
    });
  }
  for (auto& th : senders) th.join();
  for (auto& th : receivers) th.join();
  for (int s = 0; s < num_endpoints; ++s) {
    for (int r = 0; r < num_endpoints; ++r) EXPECT_EQ(got[s][r], sent[s][r]) << s << "->" << r;
    EXPECT_EQ(t->messages_sent(InstanceId(s)), messages_per_sender);
    EXPECT_EQ(t->bytes_sent(InstanceId(s)), sent_bytes[s]);
    EXPECT_EQ(t->queued(InstanceId(s)), 0);
  }
}

INSTANTIATE_TEST_SUITE_P(Sizes, LoopbackRandomTest,
                         ::testing::Combine(::testing::Values(1, 2, 5),
                                            ::testing::Values(1, 50, 400)));

}  // namespace
}  // namespace tokenlake::transport
