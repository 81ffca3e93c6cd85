#include "tokenlake/service/incarnation.h"

#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <atomic>
#include <functional>
#include <memory>
#include <string>
#include <thread>

#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/transport/cluster_secret.h"
#include "tokenlake/transport/socket_stream.h"
#include "tokenlake/transport/tcp_transport.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;
using transport::HostPort;
using transport::TcpTransport;

// A raw listener on 127.0.0.1 that treats each accepted connection with `serve` (which owns
// the fd), or accepts nothing when `serve` is empty.
class RawListener {
 public:
  explicit RawListener(std::function<void(int)> serve) : serve_(std::move(serve)) {
    fd_ = *transport::ListenTcp(HostPort{.host = "127.0.0.1", .port = 0}, 16, &port_);
    if (serve_) {
      thread_ = std::thread([this] {
        while (!stop_.load()) {
          pollfd p{.fd = fd_, .events = POLLIN, .revents = 0};
          if (::poll(&p, 1, 20) <= 0) continue;
          const int c = ::accept(fd_, nullptr, nullptr);
          if (c >= 0) serve_(c);
        }
      });
    }
  }
  ~RawListener() {
    stop_.store(true);
    if (thread_.joinable()) thread_.join();
    ::close(fd_);
  }
  int32_t port() const { return port_; }

 private:
  std::function<void(int)> serve_;
  int fd_ = -1;
  int32_t port_ = 0;
  std::atomic<bool> stop_{false};
  std::thread thread_;
};

class IncarnationTest : public ::testing::Test {
 protected:
  LiveIncarnation Old(int32_t port, std::string incarnation) {
    return LiveIncarnation{.name = "instance-1",
                           .id = 1,
                           .transport_port = port,
                           .last_heartbeat = now_ - absl::Milliseconds(100),
                           .transport_incarnation = std::move(incarnation)};
  }
  absl::Status Check(const LiveIncarnation& old, int32_t new_port = 1) {
    return CheckIncarnationGone(old, HostPort{.host = "127.0.0.1", .port = new_port}, kLease,
                                secret_, now_, absl::Milliseconds(300));
  }

  const absl::Duration kLease = absl::Seconds(1);
  const absl::Time now_ = absl::Now();
  const std::string secret_ = *transport::GenerateClusterSecret();
};

TEST_F(IncarnationTest, ALiveMemberThatAnswersAsItselfKeepsItsName) {
  auto live = *TcpTransport::Create(
      {.num_endpoints = 2, .local_endpoints = {InstanceId(1)}, .secret = secret_});
  const absl::Status s = Check(Old(live->port(), live->incarnation()));
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
  EXPECT_THAT(s.message(), HasSubstr("instance 1 ('instance-1') is alive"));
  // Even when the newcomer says it listens on the old address.
  EXPECT_EQ(Check(Old(live->port(), live->incarnation()), live->port()).code(),
            absl::StatusCode::kAlreadyExists);
}

TEST_F(IncarnationTest, AnExpiredLeaseIsProofWithoutAProbe) {
  auto live = *TcpTransport::Create(
      {.num_endpoints = 2, .local_endpoints = {InstanceId(1)}, .secret = secret_});
  LiveIncarnation old = Old(live->port(), live->incarnation());
  old.last_heartbeat = now_ - 2 * kLease;
  EXPECT_TRUE(Check(old).ok());
}

TEST_F(IncarnationTest, DefiniteAnswersFromTheOldAddressAreProof) {
  // Nothing listens there any more (the connection is refused).
  int32_t port = 0;
  {
    auto gone = *TcpTransport::Create(
        {.num_endpoints = 2, .local_endpoints = {InstanceId(1)}, .secret = secret_});
    port = gone->port();
  }
  EXPECT_TRUE(Check(Old(port, std::string(16, 'a'))).ok());
  // A member that names another incarnation listens there (the old one's port is reused).
  auto other = *TcpTransport::Create(
      {.num_endpoints = 2, .local_endpoints = {InstanceId(1)}, .secret = secret_});
  EXPECT_TRUE(Check(Old(other->port(), std::string(16, 'a'))).ok());
  // A process that is no member: it answers with something other than the challenge.
  RawListener stranger([](int fd) {
    const char reply[] = "HTTP/1.1 400 Bad Request\r\n\r\n";
    ::send(fd, reply, sizeof(reply) - 1, MSG_NOSIGNAL);
    ::close(fd);
  });
  EXPECT_TRUE(Check(Old(stranger.port(), std::string(16, 'a'))).ok());
}

// What a flooded member's transport looks like: connections closed before the handshake, or
// no answer in time. Neither is proof that it is gone.
TEST_F(IncarnationTest, NoAnswerOrAHangUpIsNoProof) {
  RawListener hangs_up([](int fd) { ::close(fd); });
  absl::Status s = Check(Old(hangs_up.port(), std::string(16, 'a')));
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
  EXPECT_THAT(s.message(), HasSubstr("no definite answer"));
  RawListener never_accepts(nullptr);  // the kernel completes connections; nobody answers
  s = Check(Old(never_accepts.port(), std::string(16, 'a')));
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
  EXPECT_THAT(s.message(), HasSubstr("no challenge in time"));
  // A listener that refuses the answer (another secret, or a member over its limit).
  auto other_secret = *TcpTransport::Create({.num_endpoints = 2,
                                             .local_endpoints = {InstanceId(1)},
                                             .secret = *transport::GenerateClusterSecret()});
  s = Check(Old(other_secret->port(), std::string(16, 'a')));
  EXPECT_EQ(s.code(), absl::StatusCode::kAlreadyExists) << s;
}

TEST_F(IncarnationTest, WithoutASecretOnlyTheOldAddressItselfIsBelieved) {
  auto live = *TcpTransport::Create({.num_endpoints = 2, .local_endpoints = {InstanceId(1)}});
  const LiveIncarnation old = Old(live->port(), "");
  auto check = [&](int32_t new_port) {
    return CheckIncarnationGone(old, HostPort{.host = "127.0.0.1", .port = new_port}, kLease, "",
                                now_, absl::Milliseconds(300));
  };
  EXPECT_EQ(check(live->port() + 1).code(), absl::StatusCode::kAlreadyExists);
  EXPECT_TRUE(check(live->port()).ok());
}

}  // namespace
}  // namespace tokenlake::service
