// TcpTransport across hosts: addresses (IPv4, IPv6, names) and mutual TLS.
#include <arpa/inet.h>
#include <netinet/in.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cstdlib>
#include <filesystem>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/transport/socket_stream.h"
#include "tokenlake/transport/tcp_transport.h"
#include "tokenlake/transport/tls.h"

namespace tokenlake::transport {
namespace {

using ::testing::HasSubstr;

class TcpTransportTlsTest : public ::testing::Test {
 protected:
  void SetUp() override {
    char tmpl[] = "/tmp/tokenlake-tcp-tls-XXXXXX";
    ASSERT_NE(mkdtemp(tmpl), nullptr);
    dir_ = tmpl;
    ca_a_ = Identity("a", {"node-a"}, "");
    b_ = Identity("b", {"node-b"}, dir_ + "/a");
    other_ca_ = Identity("other", {"node-x"}, "");
  }
  void TearDown() override { std::filesystem::remove_all(dir_); }

  std::shared_ptr<const TlsContext> Identity(const std::string& name,
                                             std::vector<std::string> hosts,
                                             const std::string& ca_dir) {
    absl::StatusOr<TlsIdentity> id = MakeClusterCertificates(
        {.out_dir = dir_ + "/" + name, .hosts = std::move(hosts), .ca_dir = ca_dir});
    EXPECT_TRUE(id.ok()) << id.status();
    absl::StatusOr<std::shared_ptr<const TlsContext>> ctx = TlsContext::Create(*id);
    EXPECT_TRUE(ctx.ok()) << ctx.status();
    return ctx.ok() ? *ctx : nullptr;
  }

  static std::unique_ptr<TcpTransport> Make(int32_t endpoint, std::shared_ptr<const TlsContext> tls,
                                            const std::string& host = "127.0.0.1",
                                            const std::string& secret = "") {
    absl::StatusOr<std::unique_ptr<TcpTransport>> t =
        TcpTransport::Create({.num_endpoints = 2,
                              .local_endpoints = {InstanceId(endpoint)},
                              .max_payload_bytes = int64_t{64} << 20,
                              .listen_host = host,
                              .tls = std::move(tls),
                              .io_timeout = absl::Seconds(10),
                              .secret = secret,
                              .handshake_timeout = absl::Seconds(2)});
    EXPECT_TRUE(t.ok()) << t.status();
    return t.ok() ? *std::move(t) : nullptr;
  }

  std::string dir_;
  std::shared_ptr<const TlsContext> ca_a_, b_, other_ca_;
};

std::vector<std::byte> RandomBytes(std::mt19937_64& rng, size_t n) {
  std::vector<std::byte> out(n);
  for (auto& b : out) b = static_cast<std::byte>(rng());
  return out;
}

// Both transports send large frames to each other at the same time on one connection each way:
// readers and writers of a TLS connection must not wait for each other with both directions
// full.
TEST_F(TcpTransportTlsTest, LargeFramesFlowBothWaysAtOnceUnderTls) {
  const std::string secret(32, 's');
  auto a = Make(0, ca_a_, "127.0.0.1", secret);
  auto b = Make(1, b_, "127.0.0.1", secret);
  ASSERT_TRUE(a->SetPeer(InstanceId(1), HostPort{"127.0.0.1", b->port()}).ok());
  ASSERT_TRUE(b->SetPeer(InstanceId(0), HostPort{"localhost", a->port()}).ok());
  const uint64_t seed = std::random_device{}();
  SCOPED_TRACE(absl::StrCat("seed ", seed));
  std::mt19937_64 rng(seed);
  constexpr int kMessages = 6;
  std::vector<std::vector<std::byte>> to_b, to_a;
  for (int i = 0; i < kMessages; ++i) {
    to_b.push_back(RandomBytes(rng, (size_t{4} << 20) + rng() % 1000));
    to_a.push_back(RandomBytes(rng, (size_t{4} << 20) + rng() % 1000));
  }
  std::thread send_a([&] {
    for (int i = 0; i < kMessages; ++i) {
      EXPECT_TRUE(a->Send({InstanceId(0), InstanceId(1), 1, uint64_t(i), to_b[i]}).ok());
    }
  });
  std::thread send_b([&] {
    for (int i = 0; i < kMessages; ++i) {
      EXPECT_TRUE(b->Send({InstanceId(1), InstanceId(0), 2, uint64_t(i), to_a[i]}).ok());
    }
  });
  for (int i = 0; i < kMessages; ++i) {
    absl::StatusOr<Message> mb = b->Receive(InstanceId(1), absl::Seconds(30));
    ASSERT_TRUE(mb.ok()) << mb.status();
    EXPECT_EQ(mb->correlation_id, uint64_t(i));
    EXPECT_TRUE(mb->payload == to_b[i]) << i;
    absl::StatusOr<Message> ma = a->Receive(InstanceId(0), absl::Seconds(30));
    ASSERT_TRUE(ma.ok()) << ma.status();
    EXPECT_TRUE(ma->payload == to_a[i]) << i;
  }
  send_a.join();
  send_b.join();
  EXPECT_EQ(a->auth_failures() + b->auth_failures(), 0);
}

TEST_F(TcpTransportTlsTest, APeerWhoseCertificateIsFromAnotherCaIsRefused) {
  auto a = Make(0, ca_a_);
  auto stranger = Make(1, other_ca_);
  // The stranger dials a: a's certificate does not verify for it, nor its for a.
  ASSERT_TRUE(stranger->SetPeer(InstanceId(0), a->port()).ok());
  absl::Status sent = stranger->Send({InstanceId(1), InstanceId(0), 1, 1, {}});
  EXPECT_EQ(sent.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(sent.message()), HasSubstr("certificate"));
  // a dials the stranger: the same, seen from the other side.
  ASSERT_TRUE(a->SetPeer(InstanceId(1), stranger->port()).ok());
  EXPECT_FALSE(a->Send({InstanceId(0), InstanceId(1), 1, 1, {}}).ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (a->auth_failures() < 2 && absl::Now() < deadline) absl::SleepFor(absl::Milliseconds(10));
  EXPECT_GE(a->auth_failures(), 2);  // its own failed dial and the stranger's refused accept
  EXPECT_FALSE(a->Receive(InstanceId(0), absl::Milliseconds(200)).ok());
}

TEST_F(TcpTransportTlsTest, ACertificateThatDoesNotNameTheDialledAddressIsRefused) {
  // b listens on 127.0.0.2 (still loopback), which its certificate does not name.
  auto a = Make(0, ca_a_);
  auto b = Make(1, b_, "127.0.0.2");
  ASSERT_TRUE(a->SetPeer(InstanceId(1), HostPort{"127.0.0.2", b->port()}).ok());
  absl::Status sent = a->Send({InstanceId(0), InstanceId(1), 1, 1, {}});
  EXPECT_EQ(sent.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(sent.message()), HasSubstr("mismatch"));
  // With a certificate that names it, the same address works.
  auto named = Identity("named", {"127.0.0.2"}, dir_ + "/a");
  auto c = Make(1, named, "127.0.0.2");
  ASSERT_TRUE(a->SetPeer(InstanceId(1), HostPort{"127.0.0.2", c->port()}).ok());
  ASSERT_TRUE(a->Send({InstanceId(0), InstanceId(1), 1, 1, {}}).ok());
  EXPECT_TRUE(c->Receive(InstanceId(1), absl::Seconds(5)).ok());
}

TEST_F(TcpTransportTlsTest, TlsAndClearPeersDoNotTalkAndSaySo) {
  auto tls = Make(0, ca_a_);
  auto clear = Make(1, nullptr);
  // TLS dialler, clear acceptor: the handshake fails on the dialler's side.
  ASSERT_TRUE(tls->SetPeer(InstanceId(1), clear->port()).ok());
  absl::Status sent = tls->Send({InstanceId(0), InstanceId(1), 1, 1, {}});
  EXPECT_EQ(sent.code(), absl::StatusCode::kUnavailable);
  EXPECT_THAT(std::string(sent.message()), HasSubstr("TLS handshake"));
  EXPECT_FALSE(clear->Receive(InstanceId(1), absl::Milliseconds(200)).ok());
  // Clear dialler, TLS acceptor: nothing is delivered, the acceptor counts a refused peer.
  ASSERT_TRUE(clear->SetPeer(InstanceId(0), tls->port()).ok());
  (void)clear->Send({InstanceId(1), InstanceId(0), 1, 1, {std::byte{1}}});
  EXPECT_FALSE(tls->Receive(InstanceId(0), absl::Milliseconds(500)).ok());
  const absl::Time deadline = absl::Now() + absl::Seconds(5);
  while (tls->auth_failures() < 2 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_GE(tls->auth_failures(), 2);
}

TEST_F(TcpTransportTlsTest, ListeningBeyondLoopbackNeedsTlsOrAnExplicitOptOut) {
  absl::StatusOr<std::unique_ptr<TcpTransport>> open = TcpTransport::Create(
      {.num_endpoints = 1, .local_endpoints = {InstanceId(0)}, .listen_host = "0.0.0.0"});
  ASSERT_FALSE(open.ok());
  EXPECT_EQ(open.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(std::string(open.status().message()), HasSubstr("needs TLS"));
  EXPECT_TRUE(TcpTransport::Create({.num_endpoints = 1,
                                    .local_endpoints = {InstanceId(0)},
                                    .listen_host = "0.0.0.0",
                                    .allow_insecure = true})
                  .ok());
  EXPECT_TRUE(TcpTransport::Create({.num_endpoints = 1,
                                    .local_endpoints = {InstanceId(0)},
                                    .listen_host = "0.0.0.0",
                                    .tls = ca_a_})
                  .ok());
  absl::StatusOr<std::unique_ptr<TcpTransport>> unresolvable =
      TcpTransport::Create({.num_endpoints = 1,
                            .local_endpoints = {InstanceId(0)},
                            .listen_host = "no-such-host.invalid",
                            .tls = ca_a_});
  ASSERT_FALSE(unresolvable.ok());
  EXPECT_THAT(std::string(unresolvable.status().message()), HasSubstr("no-such-host.invalid"));
}

TEST_F(TcpTransportTlsTest, Ipv6LoopbackWorksInTheClearAndUnderTls) {
  for (bool use_tls : {false, true}) {
    SCOPED_TRACE(use_tls ? "tls" : "clear");
    auto a = Make(0, use_tls ? ca_a_ : nullptr, "::1");
    auto b = Make(1, use_tls ? b_ : nullptr, "::1");
    ASSERT_TRUE(a->SetPeer(InstanceId(1), HostPort{"::1", b->port()}).ok());
    ASSERT_TRUE(a->Send({InstanceId(0), InstanceId(1), 3, 9, {std::byte{7}}}).ok());
    absl::StatusOr<Message> m = b->Receive(InstanceId(1), absl::Seconds(5));
    ASSERT_TRUE(m.ok()) << m.status();
    EXPECT_EQ(m->payload, std::vector<std::byte>{std::byte{7}});
    EXPECT_EQ(TcpTransport::Probe(HostPort{"::1", b->port()}, "", use_tls ? ca_a_ : nullptr,
                                  absl::Seconds(2))
                  .kind,
              TcpTransport::ProbeResult::Kind::kMember);
  }
}

TEST_F(TcpTransportTlsTest, ProbeChecksTheTlsIdentity) {
  using Kind = TcpTransport::ProbeResult::Kind;
  auto b = Make(1, b_);
  EXPECT_EQ(TcpTransport::Probe(HostPort{"127.0.0.1", b->port()}, "", ca_a_, absl::Seconds(2)).kind,
            Kind::kMember);
  // A TLS failure proves nothing either way (a listener over its limit fails it too).
  TcpTransport::ProbeResult stranger =
      TcpTransport::Probe(HostPort{"127.0.0.1", b->port()}, "", other_ca_, absl::Seconds(2));
  EXPECT_EQ(stranger.kind, Kind::kNoAnswer);
  EXPECT_THAT(stranger.detail, HasSubstr("certificate"));
}

// Under TLS each accepted connection has its thread from the start; connections that never
// send a ClientHello still cannot keep a member out (the one longest in its handshake is closed
// to make room).
TEST_F(TcpTransportTlsTest, ConnectionsThatNeverStartTlsCannotKeepMembersOut) {
  auto b = *TcpTransport::Create({.num_endpoints = 2,
                                  .local_endpoints = {InstanceId(1)},
                                  .tls = b_,
                                  .handshake_timeout = absl::Seconds(60),
                                  .max_connections = 16});
  std::vector<int> held;
  for (int i = 0; i < 48; ++i) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(b->port()));
    ASSERT_EQ(::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)), 0);
    held.push_back(fd);
  }
  const absl::Time deadline = absl::Now() + absl::Seconds(10);
  while (b->refused_connections() < 32 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_GE(b->refused_connections(), 32);
  auto a = Make(0, ca_a_);
  ASSERT_TRUE(a->SetPeer(InstanceId(1), HostPort{"127.0.0.1", b->port()}).ok());
  ASSERT_TRUE(a->Send({InstanceId(0), InstanceId(1), 1, 5, {std::byte{8}}}).ok());
  absl::StatusOr<Message> m = b->Receive(InstanceId(1), absl::Seconds(5));
  ASSERT_TRUE(m.ok()) << m.status();
  for (int fd : held) ::close(fd);
}

TEST(HostPortTest, ParsesNamesAndAddressesAndRefusesTheRest) {
  EXPECT_EQ(*ParseHostPort("node-1:7000"), (HostPort{"node-1", 7000}));
  EXPECT_EQ(*ParseHostPort("198.51.100.4:80"), (HostPort{"198.51.100.4", 80}));
  EXPECT_EQ(*ParseHostPort("[2001:db8::1]:9"), (HostPort{"2001:db8::1", 9}));
  EXPECT_EQ(*ParseHostPort("[::1]", 5), (HostPort{"::1", 5}));
  EXPECT_EQ(*ParseHostPort("host", 0), (HostPort{"host", 0}));
  EXPECT_EQ((HostPort{"2001:db8::1", 9}).ToString(), "[2001:db8::1]:9");
  for (const char* bad : {"host", "2001:db8::1:80", "[::1", "[::1]x", "host:99999", ":80", "h:p"}) {
    absl::StatusOr<HostPort> parsed = ParseHostPort(bad);
    ASSERT_FALSE(parsed.ok()) << bad;
    EXPECT_THAT(std::string(parsed.status().message()), HasSubstr(bad));
  }
  EXPECT_TRUE(IsLoopbackHost("127.0.0.2"));
  EXPECT_TRUE(IsLoopbackHost("::1"));
  EXPECT_TRUE(IsLoopbackHost("localhost"));
  EXPECT_FALSE(IsLoopbackHost("0.0.0.0"));
  EXPECT_FALSE(IsLoopbackHost("198.51.100.4"));
  EXPECT_FALSE(IsLoopbackHost("node-1"));
}

}  // namespace
}  // namespace tokenlake::transport
