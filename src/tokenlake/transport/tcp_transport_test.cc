#include "tokenlake/transport/tcp_transport.h"

#include <arpa/inet.h>
#include <dirent.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <random>
#include <thread>

#include "absl/strings/match.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/transport/cluster_secret.h"
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

// ---- Hardening: memory, timeouts, leaks, descriptor exhaustion ----

using ::testing::HasSubstr;

// A connected client socket to 127.0.0.1:port (-1 on failure).
int RawConnect(int32_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (fd < 0) return -1;
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
    ::close(fd);
    return -1;
  }
  return fd;
}

// A frame header as the wire format says (tcp_transport.h).
std::vector<unsigned char> Header(int32_t from, int32_t to, uint64_t payload_bytes) {
  std::vector<unsigned char> h(32, 0);
  auto put = [&h](size_t at, uint64_t v, int n) {
    for (int i = 0; i < n; ++i) h[at + i] = static_cast<unsigned char>(v >> (8 * i));
  };
  put(0, 0x314B4C54, 4);
  put(4, static_cast<uint32_t>(from), 4);
  put(8, static_cast<uint32_t>(to), 4);
  put(12, 1, 4);
  put(16, 99, 8);
  put(24, payload_bytes, 8);
  return h;
}

// True when the peer closes `fd` within `timeout` (recv sees EOF or an error).
bool ClosedByPeerWithin(int fd, absl::Duration timeout) {
  const timeval tv = absl::ToTimeval(timeout);
  ::setsockopt(fd, SOL_SOCKET, SO_RCVTIMEO, &tv, sizeof(tv));
  char buf[64];
  while (true) {
    const ssize_t n = ::recv(fd, buf, sizeof(buf), 0);
    if (n == 0) return true;
    if (n < 0) return errno != EAGAIN && errno != EWOULDBLOCK;
  }
}

int64_t CountDir(const char* path) {
  int64_t n = 0;
  DIR* d = ::opendir(path);
  if (d == nullptr) return -1;
  while (const dirent* e = ::readdir(d)) n += e->d_name[0] != '.' ? 1 : 0;
  ::closedir(d);
  return n;
}
int64_t OpenFds() { return CountDir("/proc/self/fd"); }
int64_t Threads() { return CountDir("/proc/self/task"); }
int64_t ResidentBytes() {
  std::ifstream statm("/proc/self/statm");
  int64_t size = 0, resident = 0;
  statm >> size >> resident;
  return resident * ::sysconf(_SC_PAGESIZE);
}

TEST(TcpTransportHardeningTest, AnAnnouncedPayloadAllocatesOnlyTheBytesThatArrive) {
  auto t = *TcpTransport::Create({.num_endpoints = 2,
                                  .local_endpoints = {InstanceId(1)},
                                  .max_payload_bytes = int64_t{1} << 30});
  const int64_t before = ResidentBytes();
  std::vector<int> fds;
  for (int i = 0; i < 2; ++i) {
    // 32 bytes announcing 400 MiB, then 1 KiB of it, then silence.
    const int fd = RawConnect(t->port());
    ASSERT_GE(fd, 0);
    std::vector<unsigned char> bytes = Header(0, 1, uint64_t{400} << 20);
    bytes.resize(bytes.size() + 1024, 7);
    ASSERT_EQ(::send(fd, bytes.data(), bytes.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(bytes.size()));
    fds.push_back(fd);
  }
  absl::SleepFor(absl::Milliseconds(300));
  const int64_t grown = ResidentBytes() - before;
  EXPECT_LT(grown, int64_t{32} << 20) << "resident memory grew by " << grown << " bytes";
  for (int fd : fds) ::close(fd);
  EXPECT_EQ(t->Receive(InstanceId(1), absl::Milliseconds(50)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
}

TEST(TcpTransportHardeningTest, FramesOverTheLimitCloseTheConnectionWithAClearError) {
  auto t = *TcpTransport::Create(
      {.num_endpoints = 2, .local_endpoints = {InstanceId(1)}, .max_payload_bytes = 1000});
  const int fd = RawConnect(t->port());
  ASSERT_GE(fd, 0);
  const std::vector<unsigned char> h = Header(0, 1, 1001);
  ASSERT_EQ(::send(fd, h.data(), h.size(), MSG_NOSIGNAL), 32);
  EXPECT_TRUE(ClosedByPeerWithin(fd, absl::Seconds(5)));
  ::close(fd);
  EXPECT_EQ(t->malformed_frames(), 1);
  EXPECT_THAT(t->last_error(), HasSubstr("1001 bytes announced, over the limit of 1000"));
}

TEST(TcpTransportHardeningTest, IdleAndIncompleteFramesAreClosedOnAcceptedConnections) {
  auto t = *TcpTransport::Create({.num_endpoints = 2,
                                  .local_endpoints = {InstanceId(1)},
                                  .idle_timeout = absl::Milliseconds(300),
                                  .frame_timeout = absl::Milliseconds(300)});
  const int idle = RawConnect(t->port());
  const int half_header = RawConnect(t->port());
  const int half_payload = RawConnect(t->port());
  ASSERT_GE(idle, 0);
  ASSERT_GE(half_header, 0);
  ASSERT_GE(half_payload, 0);
  std::vector<unsigned char> h = Header(0, 1, 1000);
  ASSERT_EQ(::send(half_header, h.data(), 10, MSG_NOSIGNAL), 10);
  h.resize(32 + 10, 1);
  ASSERT_EQ(::send(half_payload, h.data(), h.size(), MSG_NOSIGNAL), 42);
  for (int fd : {idle, half_header, half_payload}) {
    EXPECT_TRUE(ClosedByPeerWithin(fd, absl::Seconds(5)));
    ::close(fd);
  }
  EXPECT_EQ(t->timed_out_connections(), 3);
  EXPECT_THAT(t->last_error(), HasSubstr("TcpTransport: closed a connection"));
}

TEST(TcpTransportHardeningTest, MessagesKeepFlowingAcrossIdleTimeouts) {
  // Both sides close idle connections quickly; a sender redials instead of writing into a
  // connection being closed, so no message is lost.
  TcpTransport::Options o{.num_endpoints = 2, .idle_timeout = absl::Milliseconds(400)};
  o.local_endpoints = {InstanceId(0)};
  auto a = *TcpTransport::Create(o);
  o.local_endpoints = {InstanceId(1)};
  auto b = *TcpTransport::Create(o);
  ASSERT_TRUE(a->SetPeer(InstanceId(1), b->port()).ok());
  for (absl::Duration pause : {absl::ZeroDuration(), absl::Milliseconds(250),
                               absl::Milliseconds(700), absl::Milliseconds(150)}) {
    absl::SleepFor(pause);
    ASSERT_TRUE(a->Send({InstanceId(0), InstanceId(1), 1, 7, Bytes({1})}).ok());
    auto m = b->Receive(InstanceId(1), absl::Seconds(5));
    ASSERT_TRUE(m.ok()) << "after a pause of " << pause << ": " << m.status();
  }
}

// Connect-and-close cycles (every tenth sends one whole frame first) leave no descriptor, no
// thread and no open connection behind. `make test` runs 300 cycles; the slow-labelled stress
// binary (TOKENLAKE_CONNECT_CYCLES=3000) runs thousands.
TEST(TcpTransportHardeningTest, ConnectCloseCyclesLeaveNoDescriptorsOrThreads) {
  const char* env = std::getenv("TOKENLAKE_CONNECT_CYCLES");
  const int cycles = env != nullptr ? std::atoi(env) : 300;
  auto t = *TcpTransport::Create({.num_endpoints = 2, .local_endpoints = {InstanceId(1)}});
  const int64_t fds = OpenFds(), threads = Threads();
  auto connect_and_close = [&](bool with_frame, unsigned char fill) {
    const int fd = RawConnect(t->port());
    if (fd < 0) return false;
    bool sent = true;
    if (with_frame) {
      std::vector<unsigned char> h = Header(0, 1, 3);
      h.insert(h.end(), {fill, fill, fill});
      sent = ::send(fd, h.data(), h.size(), MSG_NOSIGNAL) == 35;
    }
    ::close(fd);
    return sent;
  };
  for (int i = 0; i < cycles; ++i) {
    ASSERT_TRUE(connect_and_close(i % 10 == 0, 1)) << "cycle " << i;
  }
  // The connections may still wait in the listen backlog (a loaded machine accepts slowly):
  // accept() takes them in order, so once a last connection's frame has arrived every one
  // before it has been accepted. Then their readers finish and are reaped.
  ASSERT_TRUE(connect_and_close(true, 9));
  int received = 0;
  bool last_arrived = false;
  const absl::Time deadline = absl::Now() + absl::Seconds(120);
  while (!last_arrived && absl::Now() < deadline) {
    absl::StatusOr<Message> m = t->Receive(InstanceId(1), absl::Milliseconds(100));
    if (!m.ok()) continue;
    if (m->payload.at(0) == std::byte{9}) {
      last_arrived = true;
    } else {
      ++received;
    }
  }
  ASSERT_TRUE(last_arrived) << "the last connection's frame did not arrive in 120 s";
  while (t->open_connections() > 0 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(20));
  }
  absl::SleepFor(absl::Milliseconds(200));  // the last reap closes fds after joining
  EXPECT_EQ(t->open_connections(), 0);
  EXPECT_LE(OpenFds(), fds + 2) << "after " << cycles << " cycles";
  EXPECT_LE(Threads(), threads + 1) << "after " << cycles << " cycles";
  while (t->Receive(InstanceId(1), absl::ZeroDuration()).ok()) ++received;
  EXPECT_EQ(received, (cycles + 9) / 10)
      << "refused " << t->refused_connections() << ", timed out " << t->timed_out_connections()
      << ", malformed " << t->malformed_frames() << ": " << t->last_error();
}

TEST(TcpTransportHardeningTest, RunningOutOfDescriptorsBacksOffAndIsReportedUnhealthy) {
  Pair p = MakePair();
  ASSERT_TRUE(p.a->Health().ok());
  rlimit old{};
  ASSERT_EQ(::getrlimit(RLIMIT_NOFILE, &old), 0);
  rlimit low = old;
  low.rlim_cur = static_cast<rlim_t>(OpenFds() + 64);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &low), 0);
  std::vector<int> filler;
  while (true) {
    const int fd = ::open("/dev/null", O_RDONLY | O_CLOEXEC);
    if (fd < 0) break;
    filler.push_back(fd);
  }
  const size_t filled = filler.size();
  // One slot for a client socket whose connection then waits in b's backlog: accept() fails
  // with EMFILE, repeatedly.
  if (!filler.empty()) {
    ::close(filler.back());
    filler.pop_back();
  }
  const int client = RawConnect(p.b->port());
  const int64_t errors_before = p.b->accept_errors();
  absl::SleepFor(absl::Milliseconds(600));
  const int64_t errors = p.b->accept_errors() - errors_before;
  const absl::Status accept_health = p.b->Health();
  // Dialling fails the same way and is reported too.
  const absl::Status sent = p.a->Send({InstanceId(0), InstanceId(1), 1, 0, Bytes({1})});
  const absl::Status dial_health = p.a->Health();
  // Checked once descriptors are free again (the checks themselves may need some).
  for (int fd : filler) ::close(fd);
  ASSERT_EQ(::setrlimit(RLIMIT_NOFILE, &old), 0);
  ASSERT_GT(filled, 2u);
  ASSERT_GE(client, 0);
  // With the backoff (10 ms doubling): a handful; a spinning loop makes thousands.
  EXPECT_LE(errors, 12);
  EXPECT_GE(p.b->accept_errors(), 1);
  EXPECT_THAT(accept_health.message(), HasSubstr("cannot accept a connection"));
  EXPECT_EQ(sent.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(dial_health.message(), HasSubstr("cannot open a connection"));
  // The waiting connection is accepted once descriptors are free again.
  std::vector<unsigned char> h = Header(0, 1, 1);
  h.push_back(5);
  ASSERT_EQ(::send(client, h.data(), h.size(), MSG_NOSIGNAL), 33);
  auto m = p.b->Receive(InstanceId(1), absl::Seconds(5));
  ASSERT_TRUE(m.ok()) << m.status();
  ::close(client);
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while ((!p.a->Health().ok() || !p.b->Health().ok()) && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(50));
  }
  EXPECT_TRUE(p.a->Health().ok()) << p.a->Health();
  EXPECT_TRUE(p.b->Health().ok()) << p.b->Health();
}

// ---- Authentication with the cluster secret ----

TEST(TcpTransportAuthTest, PeersWithTheSecretTalkAndOthersAreRefused) {
  const std::string secret = *GenerateClusterSecret();
  TcpTransport::Options o{.num_endpoints = 3, .secret = secret};
  o.local_endpoints = {InstanceId(0)};
  auto a = *TcpTransport::Create(o);
  o.local_endpoints = {InstanceId(1)};
  auto b = *TcpTransport::Create(o);
  ASSERT_TRUE(a->SetPeer(InstanceId(1), b->port()).ok());
  ASSERT_TRUE(b->SetPeer(InstanceId(0), a->port()).ok());
  ASSERT_TRUE(a->Send({InstanceId(0), InstanceId(1), 1, 5, Bytes({1, 2})}).ok());
  ASSERT_TRUE(b->Receive(InstanceId(1), absl::Seconds(5)).ok());
  ASSERT_TRUE(b->Send({InstanceId(1), InstanceId(0), 2, 5, Bytes({3})}).ok());
  ASSERT_TRUE(a->Receive(InstanceId(0), absl::Seconds(5)).ok());

  // A transport with another secret, and one with none: their Sends fail, nothing arrives.
  for (const std::string& other : {*GenerateClusterSecret(), std::string()}) {
    TcpTransport::Options f{.num_endpoints = 3,
                            .local_endpoints = {InstanceId(2)},
                            .secret = other,
                            .handshake_timeout = absl::Milliseconds(300)};
    auto forger = *TcpTransport::Create(f);
    ASSERT_TRUE(forger->SetPeer(InstanceId(1), b->port()).ok());
    absl::Status s = forger->Send({InstanceId(0), InstanceId(1), 1, 5, Bytes({9})});
    if (!other.empty()) {
      EXPECT_EQ(s.code(), absl::StatusCode::kUnavailable) << s;
      EXPECT_THAT(s.message(), HasSubstr("cluster secret"));
    }
    // (Without a secret the forger writes its frame blindly; b reads it as a bad answer.)
  }
  // A raw frame without any handshake: refused, and the refusal names the secret. The forgers'
  // connections closing may be handled after it and overwrite last_error with their hang-up,
  // so a second raw frame is sent if the first one's error was overwritten.
  for (int attempt = 0; attempt < 2; ++attempt) {
    const int fd = RawConnect(b->port());
    ASSERT_GE(fd, 0);
    std::vector<unsigned char> h = Header(0, 1, 1);
    h.push_back(7);
    h.resize(64, 0);  // as long as an answer to the challenge
    ASSERT_EQ(::send(fd, h.data(), h.size(), MSG_NOSIGNAL), 64);
    EXPECT_TRUE(ClosedByPeerWithin(fd, absl::Seconds(5)));
    ::close(fd);
    if (absl::StrContains(b->last_error(), "cluster secret")) break;
  }
  EXPECT_EQ(b->Receive(InstanceId(1), absl::Milliseconds(300)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_GE(b->auth_failures(), 3);
  EXPECT_THAT(b->last_error(), HasSubstr("cluster secret"));

  using Kind = TcpTransport::ProbeResult::Kind;
  TcpTransport::ProbeResult probe = TcpTransport::Probe(b->port(), secret, absl::Seconds(2));
  EXPECT_EQ(probe.kind, Kind::kMember) << probe.detail;
  EXPECT_EQ(probe.incarnation, b->incarnation());
  // With another secret the acceptor hangs up on the answer: not a definite answer.
  probe = TcpTransport::Probe(b->port(), *GenerateClusterSecret(), absl::Seconds(2));
  EXPECT_EQ(probe.kind, Kind::kNoAnswer) << probe.detail;
  const int32_t port = b->port();
  b.reset();
  probe = TcpTransport::Probe(port, secret, absl::Seconds(2));
  EXPECT_EQ(probe.kind, Kind::kNoMember) << probe.detail;
  EXPECT_THAT(probe.detail, HasSubstr("refused"));
}

// Connections that never finish their handshake (a flood that connects and holds, or sends
// garbage) hold no thread and cannot keep a member out: when the accepted connections are
// full, the one longest in its handshake is closed to make room.
TEST(TcpTransportAuthTest, UnfinishedHandshakesHoldNoThreadAndCannotKeepMembersOut) {
  const std::string secret = *GenerateClusterSecret();
  auto b = *TcpTransport::Create({.num_endpoints = 2,
                                  .local_endpoints = {InstanceId(1)},
                                  .secret = secret,
                                  .handshake_timeout = absl::Seconds(60),
                                  .max_connections = 64});
  const int64_t threads = Threads();
  std::vector<int> held;
  for (int i = 0; i < 3 * 64; ++i) {
    const int fd = RawConnect(b->port());
    ASSERT_GE(fd, 0) << "connection " << i;
    held.push_back(fd);
    if (i % 2 == 0) {
      const int garbage = RawConnect(b->port());
      ASSERT_GE(garbage, 0);
      std::vector<unsigned char> h = Header(0, 1, 0);
      h.resize(64, 0x5a);
      ::send(garbage, h.data(), h.size(), MSG_NOSIGNAL);
      ::close(garbage);
    }
  }
  // The first 128 held connections were closed to make room for later ones.
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (b->refused_connections() < int64_t{2} * 64 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_GE(b->refused_connections(), int64_t{2} * 64);
  EXPECT_TRUE(ClosedByPeerWithin(held.front(), absl::Seconds(5)));
  EXPECT_LE(Threads(), threads + 1);
  // A member gets in while the flood still holds every slot, and a probe names the listener.
  auto a = *TcpTransport::Create(
      {.num_endpoints = 2, .local_endpoints = {InstanceId(0)}, .secret = secret, .listen = false});
  ASSERT_TRUE(a->SetPeer(InstanceId(1), b->port()).ok());
  ASSERT_TRUE(a->Send({InstanceId(0), InstanceId(1), 1, 5, Bytes({4})}).ok());
  absl::StatusOr<Message> m = b->Receive(InstanceId(1), absl::Seconds(5));
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->payload, Bytes({4}));
  TcpTransport::ProbeResult probe = TcpTransport::Probe(b->port(), secret, absl::Seconds(5));
  EXPECT_EQ(probe.kind, TcpTransport::ProbeResult::Kind::kMember) << probe.detail;
  EXPECT_EQ(probe.incarnation, b->incarnation());
  for (int fd : held) ::close(fd);
}

// The coordinator's shape: it does not listen, it dials the instance, and the instance answers
// on that connection. A frame on that connection claiming another sender is dropped.
TEST(TcpTransportAuthTest, RepliesComeBackOnlyOnTheConnectionOpenedToTheSender) {
  const std::string secret = *GenerateClusterSecret();
  auto coordinator = *TcpTransport::Create(
      {.num_endpoints = 3, .local_endpoints = {InstanceId(0)}, .secret = secret, .listen = false});
  EXPECT_EQ(coordinator->port(), 0);
  auto instance = *TcpTransport::Create({.num_endpoints = 3,
                                         .local_endpoints = {InstanceId(1), InstanceId(2)},
                                         .secret = secret,
                                         .answer_on_incoming = {InstanceId(0)}});
  EXPECT_EQ(instance->SetPeer(InstanceId(0), 1234).code(), absl::StatusCode::kInvalidArgument);
  // Nothing to answer on before the coordinator has connected.
  EXPECT_EQ(instance->Send({InstanceId(1), InstanceId(0), 2, 1, {}}).code(),
            absl::StatusCode::kUnavailable);
  ASSERT_TRUE(coordinator->SetPeer(InstanceId(1), instance->port()).ok());
  for (uint64_t id = 1; id <= 3; ++id) {
    ASSERT_TRUE(coordinator->Send({InstanceId(0), InstanceId(1), 1, id, Bytes({1})}).ok());
    auto request = instance->Receive(InstanceId(1), absl::Seconds(5));
    ASSERT_TRUE(request.ok()) << request.status();
    ASSERT_TRUE(instance->Send({InstanceId(1), InstanceId(0), 2, id, Bytes({2})}).ok());
    auto reply = coordinator->Receive(InstanceId(0), absl::Seconds(5));
    ASSERT_TRUE(reply.ok()) << reply.status();
    EXPECT_EQ(reply->from, InstanceId(1));
    EXPECT_EQ(reply->correlation_id, id);
  }
  // Endpoint 2 is hosted by the same process but the connection was opened to endpoint 1.
  ASSERT_TRUE(instance->Send({InstanceId(2), InstanceId(0), 2, 9, Bytes({3})}).ok());
  EXPECT_EQ(coordinator->Receive(InstanceId(0), absl::Milliseconds(500)).status().code(),
            absl::StatusCode::kDeadlineExceeded);
  EXPECT_EQ(coordinator->malformed_frames(), 1);
  EXPECT_THAT(coordinator->last_error(),
              HasSubstr("frame from endpoint 2 on the connection opened to endpoint 1"));
}

TEST(ClusterSecretTest, CallTokensVerifyOnlyWithTheSameSecretMethodAndTime) {
  const std::string key = *GenerateClusterSecret();
  EXPECT_EQ(key.size(), kClusterSecretBytes);
  EXPECT_NE(key, *GenerateClusterSecret());
  auto parsed = ClusterSecretFromHex(ToHex(key));
  ASSERT_TRUE(parsed.ok());
  EXPECT_EQ(*parsed, key);
  EXPECT_EQ(ClusterSecretFromHex("abc").status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(ClusterSecretFromHex(std::string(64, 'z')).status().code(),
            absl::StatusCode::kInvalidArgument);
  const absl::Time now = absl::Now();
  const std::string token = CallToken(key, "Register", now);
  EXPECT_TRUE(VerifyCallToken(key, token, "Register", now + absl::Seconds(5)).ok());
  EXPECT_NE(token, CallToken(key, "Register", now));  // a fresh nonce each time
  auto code = [](const absl::Status& s) { return s.code(); };
  EXPECT_EQ(code(VerifyCallToken(key, token, "Heartbeat", now)),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(code(VerifyCallToken(*GenerateClusterSecret(), token, "Register", now)),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(code(VerifyCallToken(key, token, "Register", now + absl::Minutes(5))),
            absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(code(VerifyCallToken(key, "", "Register", now)), absl::StatusCode::kUnauthenticated);
  EXPECT_EQ(code(VerifyCallToken(key, "1.2.3", "Register", now)),
            absl::StatusCode::kUnauthenticated);
  std::string tampered = token;
  tampered.back() = tampered.back() == '0' ? '1' : '0';
  EXPECT_EQ(code(VerifyCallToken(key, tampered, "Register", now)),
            absl::StatusCode::kUnauthenticated);
  // HMAC-SHA256("Jefe", "what do ya want" 0x00 " for nothing?"), computed independently
  // (Python: hmac.new(b"Jefe", b"what do ya want\x00 for nothing?", hashlib.sha256)).
  const Mac mac = HmacSha256("Jefe", "what do ya want", " for nothing?");
  EXPECT_EQ(ToHex(std::string_view(reinterpret_cast<const char*>(mac.data()), mac.size())),
            "cabaac5fb4a7102cd287cc98924c8a618112e35ac4016fa3e84e1eaf13e0ea8e");
  EXPECT_FALSE(MacEqual(mac, HmacSha256("Jefe", "what do ya want", " for nothing!")));
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
