#include "tokenlake/transport/tcp_transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstring>
#include <iostream>
#include <random>
#include <thread>

#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tokenlake/transport/fault_transport.h"
#include "tokenlake/transport/loopback.h"

namespace tokenlake::transport {
namespace {

std::vector<std::byte> Bytes(std::initializer_list<int> v) {
  std::vector<std::byte> out;
  for (int x : v) out.push_back(static_cast<std::byte>(x));
  return out;
}

// Two "processes" (transports) A hosts endpoint 0, B hosts endpoints 1 and 2.
struct Pair {
  std::unique_ptr<TcpTransport> a, b;
};

Pair MakePair(int64_t max_payload = int64_t{1} << 24) {
  Pair p;
  p.a = *TcpTransport::Create(
      {.num_endpoints = 3, .local_endpoints = {InstanceId(0)}, .max_payload_bytes = max_payload});
  p.b = *TcpTransport::Create({.num_endpoints = 3,
                               .local_endpoints = {InstanceId(1), InstanceId(2)},
                               .max_payload_bytes = max_payload});
  EXPECT_TRUE(p.a->SetPeer(InstanceId(1), p.b->port()).ok());
  EXPECT_TRUE(p.a->SetPeer(InstanceId(2), p.b->port()).ok());
  EXPECT_TRUE(p.b->SetPeer(InstanceId(0), p.a->port()).ok());
  return p;
}

TEST(TcpTransportTest, DeliversAcrossTransportsAndReplies) {
  Pair p = MakePair();
  EXPECT_GT(p.a->port(), 0);
  ASSERT_TRUE(p.a->Send({InstanceId(0), InstanceId(1), 7, 42, Bytes({1, 2, 3})}).ok());
  auto m = p.b->Receive(InstanceId(1), absl::Seconds(5));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->from, InstanceId(0));
  EXPECT_EQ(m->tag, 7u);
  EXPECT_EQ(m->correlation_id, 42u);
  EXPECT_EQ(m->payload, Bytes({1, 2, 3}));
  ASSERT_TRUE(p.b->Send({InstanceId(1), InstanceId(0), 8, 42, Bytes({9})}).ok());
  auto r = p.a->Receive(InstanceId(0), absl::Seconds(5));
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->payload, Bytes({9}));
  EXPECT_EQ(p.a->remote_messages_sent(), 1);
}

TEST(TcpTransportTest, LocalEndpointsUseTheMailboxAndEmptyPayloadsWork) {
  Pair p = MakePair();
  ASSERT_TRUE(p.b->Send({InstanceId(1), InstanceId(2), 1, 0, {}}).ok());
  auto m = p.b->Receive(InstanceId(2), absl::Seconds(1));
  ASSERT_TRUE(m.ok());
  EXPECT_TRUE(m->payload.empty());
  EXPECT_EQ(p.b->remote_messages_sent(), 0);
}

TEST(TcpTransportTest, KeepsOrderAndBytesForRandomMessages) {
  for (uint64_t seed : {1u, 2u, 3u}) {
    SCOPED_TRACE(testing::Message() << "seed=" << seed);
    Pair p = MakePair();
    std::mt19937_64 rng(seed);
    std::vector<std::vector<std::byte>> sent;
    for (int i = 0; i < 50; ++i) {
      std::vector<std::byte> payload(rng() % 70000);
      for (auto& b : payload) b = static_cast<std::byte>(rng());
      sent.push_back(payload);
      ASSERT_TRUE(
          p.a->Send({InstanceId(0), InstanceId(2), 1, static_cast<uint64_t>(i), payload}).ok());
    }
    for (int i = 0; i < 50; ++i) {
      auto m = p.b->Receive(InstanceId(2), absl::Seconds(5));
      ASSERT_TRUE(m.ok()) << m.status();
      EXPECT_EQ(m->correlation_id, static_cast<uint64_t>(i));
      EXPECT_EQ(m->payload, sent[i]);
    }
  }
}

TEST(TcpTransportTest, RejectsBadArgumentsWithClearErrors) {
  EXPECT_EQ(TcpTransport::Create({.num_endpoints = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(TcpTransport::Create({.num_endpoints = 2, .local_endpoints = {InstanceId(5)}})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  Pair p = MakePair(/*max_payload=*/16);
  EXPECT_EQ(p.a->Send({InstanceId(0), InstanceId(9), 1, 0, {}}).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.a->Send({InstanceId(0), InstanceId(1), 1, 0, std::vector<std::byte>(17)}).code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_EQ(p.a->Receive(InstanceId(1), absl::ZeroDuration()).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.a->SetPeer(InstanceId(0), 1000).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.a->SetPeer(InstanceId(1), 0).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(p.a->Receive(InstanceId(0), absl::Milliseconds(10)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST(TcpTransportTest, SendToADeadPeerFailsWithUnavailable) {
  Pair p = MakePair();
  const int32_t port = p.b->port();
  p.b.reset();  // the peer process is gone
  absl::Status s = p.a->Send({InstanceId(0), InstanceId(1), 1, 0, Bytes({1})});
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
  EXPECT_NE(s.message().find(std::to_string(port)), std::string::npos) << s;
  p.a->ClearPeer(InstanceId(1));
  EXPECT_EQ(p.a->Send({InstanceId(0), InstanceId(1), 1, 0, {}}).code(),
            absl::StatusCode::kUnavailable);
}

TEST(TcpTransportTest, ReconnectsAfterThePeerRestarts) {
  Pair p = MakePair();
  ASSERT_TRUE(p.a->Send({InstanceId(0), InstanceId(1), 1, 0, Bytes({1})}).ok());
  ASSERT_TRUE(p.b->Receive(InstanceId(1), absl::Seconds(5)).ok());
  p.b.reset();
  p.b = *TcpTransport::Create({.num_endpoints = 3, .local_endpoints = {InstanceId(1)}});
  ASSERT_TRUE(p.a->SetPeer(InstanceId(1), p.b->port()).ok());
  ASSERT_TRUE(p.a->Send({InstanceId(0), InstanceId(1), 1, 5, Bytes({2})}).ok());
  auto m = p.b->Receive(InstanceId(1), absl::Seconds(5));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->correlation_id, 5u);
}

TEST(TcpTransportTest, GarbageFramesCloseTheConnectionWithoutCrashing) {
  Pair p = MakePair();
  const int fd = ::socket(AF_INET, SOCK_STREAM, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(p.b->port()));
  ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
  const char garbage[64] = "GET / HTTP/1.1\r\nHost: x\r\n\r\n this is not a TokenLake frame";
  ASSERT_GT(::send(fd, garbage, sizeof(garbage), MSG_NOSIGNAL), 0);
  char buf[8];
  EXPECT_LE(::recv(fd, buf, sizeof(buf), 0), 0);  // the receiver hung up
  ::close(fd);
  EXPECT_EQ(p.b->malformed_frames(), 1);
  // Other traffic is unaffected.
  ASSERT_TRUE(p.a->Send({InstanceId(0), InstanceId(1), 1, 3, Bytes({1})}).ok());
  EXPECT_TRUE(p.b->Receive(InstanceId(1), absl::Seconds(5)).ok());
}

TEST(TcpTransportTest, ShutdownWakesReceiversAndRefusesSends) {
  Pair p = MakePair();
  std::thread waiter([&] {
    EXPECT_EQ(p.b->Receive(InstanceId(1), absl::InfiniteDuration()).status().code(),
              absl::StatusCode::kCancelled);
  });
  absl::SleepFor(absl::Milliseconds(20));
  p.b->Shutdown();
  waiter.join();
  EXPECT_EQ(p.b->Send({InstanceId(1), InstanceId(0), 1, 0, {}}).code(),
            absl::StatusCode::kUnavailable);
}

// ---- FaultTransport over the loopback transport ----

std::unique_ptr<LoopbackTransport> Loop() {
  return *LoopbackTransport::Create({.num_endpoints = 3});
}

TEST(FaultTransportTest, DropsAboutTheConfiguredShareAndReportsIt) {
  auto inner = Loop();
  auto t = *FaultTransport::Create(inner.get(), {.drop_probability = 0.5, .seed = 7});
  for (int i = 0; i < 400; ++i) ASSERT_TRUE(t->Send({InstanceId(0), InstanceId(1), 1, 0, {}}).ok());
  int received = 0;
  while (t->Receive(InstanceId(1), absl::ZeroDuration()).ok()) ++received;
  EXPECT_EQ(received + t->dropped(), 400);
  EXPECT_GT(t->dropped(), 120);
  EXPECT_LT(t->dropped(), 280);
}

TEST(FaultTransportTest, DelaysDeliveryInOrder) {
  auto inner = Loop();
  auto t = *FaultTransport::Create(inner.get(), {.delay = absl::Milliseconds(80)});
  const absl::Time start = absl::Now();
  for (uint64_t i = 0; i < 5; ++i)
    ASSERT_TRUE(t->Send({InstanceId(0), InstanceId(1), 1, i, {}}).ok());
  EXPECT_EQ(t->Receive(InstanceId(1), absl::Milliseconds(20)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  for (uint64_t i = 0; i < 5; ++i) {
    auto m = t->Receive(InstanceId(1), absl::Seconds(5));
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(m->correlation_id, i);
  }
  EXPECT_GE(absl::Now() - start, absl::Milliseconds(80));
  EXPECT_EQ(t->delayed(), 5);
}

TEST(FaultTransportTest, CutPeerRefusesSendsAndDiscardsItsInFlightMessages) {
  auto inner = Loop();
  auto t = *FaultTransport::Create(inner.get(), {});
  ASSERT_TRUE(t->Send({InstanceId(2), InstanceId(1), 1, 1, {}}).ok());  // in flight
  t->CutPeer(InstanceId(2));
  absl::Status s = t->Send({InstanceId(0), InstanceId(2), 1, 0, {}});
  EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(s.message().find("cut"), std::string::npos);
  EXPECT_EQ(t->Receive(InstanceId(1), absl::Milliseconds(10)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  t->RestorePeer(InstanceId(2));
  ASSERT_TRUE(t->Send({InstanceId(2), InstanceId(1), 1, 2, {}}).ok());
  auto m = t->Receive(InstanceId(1), absl::Seconds(1));
  ASSERT_TRUE(m.ok());
  EXPECT_EQ(m->correlation_id, 2u);
}

TEST(FaultTransportTest, RejectsBadFaultSettings) {
  auto inner = Loop();
  EXPECT_EQ(FaultTransport::Create(inner.get(), {.drop_probability = 1.5}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(FaultTransport::Create(nullptr, {}).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto t = *FaultTransport::Create(inner.get(), {});
  EXPECT_EQ(t->SetDelay(absl::Milliseconds(-1)).code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(t->SetDropProbability(-0.1).code(), absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tokenlake::transport
