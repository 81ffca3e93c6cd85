#include "tokenlake/service/grpc_listener.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <chrono>
#include <filesystem>
#include <memory>
#include <string>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tokenlake/service/grpc_credentials.h"
#include "tokenlake/transport/tls.h"
#include "tokenlake/v1/tokenlake.grpc.pb.h"

namespace tokenlake::service {
namespace {

// A Coordinator service whose Heartbeat answers with one free segment, 42.
class FakeCoordinator final : public v1::Coordinator::Service {
  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest*,
                         v1::HeartbeatReply* reply) override {
    reply->add_free_segments(42);
    return grpc::Status::OK;
  }
};

// A TCP connection to 127.0.0.1:port (-1 on failure).
int Connect(int32_t port) {
  const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(port));
  if (fd >= 0 && ::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) == 0) return fd;
  if (fd >= 0) ::close(fd);
  return -1;
}

// Whether the peer closes `fd` within `within` (reads until end of stream).
bool ClosedWithin(int fd, absl::Duration within) {
  const absl::Time deadline = absl::Now() + within;
  char buf[256];
  while (absl::Now() < deadline) {
    pollfd p{.fd = fd, .events = POLLIN, .revents = 0};
    const int ms = static_cast<int>(absl::ToInt64Milliseconds(deadline - absl::Now())) + 1;
    if (::poll(&p, 1, ms) <= 0) continue;
    const ssize_t r = ::recv(fd, buf, sizeof(buf), 0);
    if (r <= 0) return true;
  }
  return false;
}

class GrpcListenerTest : public ::testing::Test {
 protected:
  void TearDown() override {
    if (listener_ != nullptr) listener_->Shutdown();
    if (server_ != nullptr) server_->Shutdown();
    if (!dir_.empty()) std::filesystem::remove_all(dir_);
  }

  void Serve(GrpcListenerOptions options, const transport::TlsIdentity* tls = nullptr) {
    options.tls = tls != nullptr;
    auto l = GrpcListener::Listen(options);
    ASSERT_TRUE(l.ok()) << l.status();
    listener_ = std::move(*l);
    grpc::ServerBuilder builder;
    auto acceptor = builder.experimental().AddExternalConnectionAcceptor(
        grpc::ServerBuilder::experimental_type::ExternalConnectionType::FROM_FD,
        GrpcServerCredentials(tls));
    builder.RegisterService(&service_);
    server_ = builder.BuildAndStart();
    ASSERT_NE(server_, nullptr);
    listener_->Start(std::move(acceptor));
  }

  grpc::Status Call(const std::shared_ptr<grpc::Channel>& channel) {
    auto stub = v1::Coordinator::NewStub(channel);
    grpc::ClientContext context;
    context.set_deadline(std::chrono::system_clock::now() + std::chrono::seconds(5));
    v1::HeartbeatRequest request;
    v1::HeartbeatReply reply;
    grpc::Status s = stub->Heartbeat(&context, request, &reply);
    if (s.ok() && (reply.free_segments_size() != 1 || reply.free_segments(0) != 42)) {
      return {grpc::StatusCode::INTERNAL, "wrong reply"};
    }
    return s;
  }

  // A channel with a connection of its own (gRPC shares connections between channels of equal
  // arguments otherwise).
  std::shared_ptr<grpc::Channel> Channel(const transport::TlsIdentity* tls = nullptr) {
    grpc::ChannelArguments args;
    args.SetInt(GRPC_ARG_USE_LOCAL_SUBCHANNEL_POOL, 1);
    return grpc::CreateCustomChannel(absl::StrCat("127.0.0.1:", listener_->port()),
                                     GrpcChannelCredentials(tls), args);
  }

  std::string dir_;
  FakeCoordinator service_;
  std::unique_ptr<GrpcListener> listener_;
  std::unique_ptr<grpc::Server> server_;
};

TEST_F(GrpcListenerTest, ServesGrpcAndClosesWhatIsNotAGrpcClient) {
  Serve({});
  ASSERT_GT(listener_->port(), 0);
  auto channel = Channel();
  grpc::Status s = Call(channel);
  ASSERT_TRUE(s.ok()) << s.error_message();
  // An HTTP/1.1 request, and a connection that closes before saying anything.
  const int http = Connect(listener_->port());
  ASSERT_GE(http, 0);
  const std::string get = "GET / HTTP/1.1\r\nHost: x\r\n\r\n";
  ASSERT_EQ(::send(http, get.data(), get.size(), MSG_NOSIGNAL), static_cast<ssize_t>(get.size()));
  EXPECT_TRUE(ClosedWithin(http, absl::Seconds(2)));
  ::close(http);
  const int quiet = Connect(listener_->port());
  ASSERT_GE(quiet, 0);
  ::close(quiet);
  const absl::Time deadline = absl::Now() + absl::Seconds(2);
  while (listener_->stats().not_grpc < 2 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  const GrpcListener::Stats st = listener_->stats();
  EXPECT_EQ(st.not_grpc, 2);
  EXPECT_EQ(st.admitted, 1);
  EXPECT_EQ(st.timed_out, 0);
  EXPECT_TRUE(Call(channel).ok());  // the established connection is untouched
}

// A connection that sends part of a preface and no more is closed; one that says nothing is
// handed to gRPC after the wait (a reconnecting gRPC client may wait for the server to speak
// first); with more waiting than `max_waiting`, the oldest is closed at once.
TEST_F(GrpcListenerTest, PartialFirstBytesAreClosedSilentConnectionsGoToGrpc) {
  Serve({.first_bytes_timeout = absl::Milliseconds(300), .max_waiting = 2});
  const int a = Connect(listener_->port());
  ASSERT_GE(a, 0);
  // Half the preface: still waiting for the rest.
  const std::string half = "PRI * HTTP/2.0\r\n";
  ASSERT_EQ(::send(a, half.data(), half.size(), MSG_NOSIGNAL), static_cast<ssize_t>(half.size()));
  EXPECT_TRUE(ClosedWithin(a, absl::Seconds(3)));
  ::close(a);
  EXPECT_EQ(listener_->stats().timed_out, 1);
  // Three silent connections with room for two: the oldest goes at once, the others to gRPC.
  int fds[3];
  for (int& fd : fds) {
    fd = Connect(listener_->port());
    ASSERT_GE(fd, 0);
    absl::SleepFor(absl::Milliseconds(20));
  }
  EXPECT_TRUE(ClosedWithin(fds[0], absl::Milliseconds(250)));
  const absl::Time deadline = absl::Now() + absl::Seconds(3);
  while (listener_->stats().silent < 2 && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(5));
  }
  for (int fd : fds) ::close(fd);
  const GrpcListener::Stats st = listener_->stats();
  EXPECT_EQ(st.timed_out, 2);
  EXPECT_EQ(st.silent, 2);
  EXPECT_EQ(st.admitted, 0);
  // gRPC clients still get through.
  EXPECT_TRUE(Call(Channel()).ok());
}

TEST_F(GrpcListenerTest, NewConnectionsBeyondTheRateAreClosedAndEstablishedOnesServed) {
  Serve({.max_new_per_s = 0.01, .burst = 2});
  auto channel = Channel();
  ASSERT_TRUE(Call(channel).ok());  // takes one of the burst
  const std::string preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
  int closed = 0;
  for (int i = 0; i < 5; ++i) {
    const int fd = Connect(listener_->port());
    ASSERT_GE(fd, 0);
    ASSERT_EQ(::send(fd, preface.data(), preface.size(), MSG_NOSIGNAL),
              static_cast<ssize_t>(preface.size()));
    // The first one is handed to gRPC (the last token), which waits for its settings.
    closed += ClosedWithin(fd, absl::Milliseconds(i == 0 ? 200 : 2000)) ? 1 : 0;
    ::close(fd);
  }
  EXPECT_EQ(closed, 4);
  const GrpcListener::Stats st = listener_->stats();
  EXPECT_EQ(st.admitted, 2);
  EXPECT_EQ(st.over_rate, 4);
  EXPECT_TRUE(Call(channel).ok());
  // A new channel cannot connect while the bucket is empty.
  auto late = Channel();
  auto stub = v1::Coordinator::NewStub(late);
  grpc::ClientContext context;
  context.set_deadline(std::chrono::system_clock::now() + std::chrono::milliseconds(500));
  v1::HeartbeatRequest request;
  v1::HeartbeatReply reply;
  EXPECT_FALSE(stub->Heartbeat(&context, request, &reply).ok());
}

TEST_F(GrpcListenerTest, HandsTlsConnectionsToTheServer) {
  char tmpl[] = "/tmp/tokenlake-grpc-listener-XXXXXX";
  ASSERT_NE(mkdtemp(tmpl), nullptr);
  dir_ = tmpl;
  auto cluster = transport::MakeClusterCertificates({.out_dir = dir_ + "/ca", .hosts = {"c"}});
  ASSERT_TRUE(cluster.ok()) << cluster.status();
  auto member = transport::MakeClusterCertificates(
      {.out_dir = dir_ + "/member", .hosts = {"member"}, .ca_dir = dir_ + "/ca"});
  ASSERT_TRUE(member.ok()) << member.status();
  Serve({}, &*cluster);
  grpc::Status s = Call(Channel(&*member));
  ASSERT_TRUE(s.ok()) << s.error_message();
  // A client in the clear sends the HTTP/2 preface, not a TLS record: closed here.
  EXPECT_FALSE(Call(Channel()).ok());
  EXPECT_GE(listener_->stats().not_grpc, 1);
  EXPECT_EQ(listener_->stats().admitted, 1);
}

TEST(GrpcListenerOptionsTest, BadOptionsAndAddressesAreRefusedByName) {
  EXPECT_EQ(GrpcListener::Listen({.burst = 0}).status().code(), absl::StatusCode::kInvalidArgument);
  auto l = GrpcListener::Listen({});
  ASSERT_TRUE(l.ok());
  auto again = GrpcListener::Listen({.address = {.host = "127.0.0.1", .port = (*l)->port()}});
  ASSERT_FALSE(again.ok());
  EXPECT_EQ(again.status().code(), absl::StatusCode::kUnavailable);
  EXPECT_NE(again.status().message().find(absl::StrCat(":", (*l)->port())), std::string::npos)
      << again.status();
}

}  // namespace
}  // namespace tokenlake::service
