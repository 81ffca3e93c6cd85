#include "tokenlake/service/grpc_listener.h"

#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <deque>
#include <string_view>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "absl/time/clock.h"

namespace tokenlake::service {
namespace {

// What a gRPC client sends first in the clear (RFC 9113, section 3.4).
constexpr std::string_view kHttp2Preface = "PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
// Under TLS: a handshake record (content type 22) of TLS 1.x (major version 3), whose minor
// version a ClientHello's record sets to 0-4.
constexpr size_t kTlsRecordPrefix = 3;
// Connections accepted per wake-up of the loop: the waiting ones and the wake-up pipe are
// looked at between batches.
constexpr int kAcceptBatch = 64;

bool IsResourceError(int err) {
  return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

}  // namespace

struct GrpcListener::Waiting {
  int fd = -1;
  absl::Time deadline;
  char bytes[kHttp2Preface.size()] = {};
  size_t have = 0;
};

absl::StatusOr<std::unique_ptr<GrpcListener>> GrpcListener::Listen(
    const GrpcListenerOptions& options) {
  if (options.backlog < 1 || options.max_waiting < 1 || options.burst < 1 ||
      !(options.max_new_per_s > 0) || options.first_bytes_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "GrpcListener: backlog, max_waiting, burst, max_new_per_s and first_bytes_timeout must "
        "be positive");
  }
  int32_t port = 0;
  absl::StatusOr<int> fd = transport::ListenTcp(options.address, options.backlog, &port);
  if (!fd.ok()) return fd.status();
  ::fcntl(*fd, F_SETFL, ::fcntl(*fd, F_GETFL) | O_NONBLOCK);
  int wake[2];
  if (::pipe2(wake, O_CLOEXEC | O_NONBLOCK) != 0) {
    const int err = errno;
    ::close(*fd);
    return absl::UnavailableError(
        absl::StrFormat("GrpcListener: cannot make a pipe: %s", std::strerror(err)));
  }
  return std::unique_ptr<GrpcListener>(new GrpcListener(options, *fd, port, wake[0], wake[1]));
}

GrpcListener::GrpcListener(const GrpcListenerOptions& options, int fd, int32_t port, int wake_read,
                           int wake_write)
    : options_(options),
      listen_fd_(fd),
      port_(port),
      wake_read_(wake_read),
      wake_write_(wake_write),
      tokens_(options.burst),
      refilled_(absl::Now()) {}

GrpcListener::~GrpcListener() {
  Shutdown();
  ::close(wake_read_);
  ::close(wake_write_);
}

void GrpcListener::Start(std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor> acceptor) {
  acceptor_ = std::move(acceptor);
  thread_ = std::thread([this] { Loop(); });
}

void GrpcListener::Shutdown() {
  if (stopping_.exchange(true)) return;
  const char b = 1;
  [[maybe_unused]] const ssize_t r = ::write(wake_write_, &b, 1);
  if (thread_.joinable()) thread_.join();
  ::close(listen_fd_);
}

GrpcListener::Stats GrpcListener::stats() const {
  return {.admitted = admitted_.load(),
          .not_grpc = not_grpc_.load(),
          .timed_out = timed_out_.load(),
          .silent = silent_.load(),
          .over_rate = over_rate_.load(),
          .accept_errors = accept_errors_.load()};
}

bool GrpcListener::TakeToken() {
  const absl::Time now = absl::Now();
  tokens_ = std::min<double>(
      options_.burst, tokens_ + absl::ToDoubleSeconds(now - refilled_) * options_.max_new_per_s);
  refilled_ = now;
  if (tokens_ < 1) return false;
  tokens_ -= 1;
  return true;
}

// Counters are bumped before a close, so that a peer that saw the close sees them.
bool GrpcListener::Advance(Waiting& w) {
  const size_t need = options_.tls ? kTlsRecordPrefix : kHttp2Preface.size();
  while (w.have < need) {
    const ssize_t r = ::recv(w.fd, w.bytes + w.have, need - w.have, MSG_DONTWAIT);
    if (r < 0 && errno == EINTR) continue;
    if (r < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) return false;
    if (r <= 0) {  // closed or failed before it said anything a gRPC client says
      not_grpc_.fetch_add(1, std::memory_order_relaxed);
      ::close(w.fd);
      return true;
    }
    const size_t from = w.have;
    w.have += static_cast<size_t>(r);
    bool ok = true;
    for (size_t i = from; i < w.have && ok; ++i) {
      const auto c = static_cast<unsigned char>(w.bytes[i]);
      if (!options_.tls) {
        ok = w.bytes[i] == kHttp2Preface[i];
      } else {
        ok = i == 0 ? c == 0x16 : i == 1 ? c == 0x03 : c <= 0x04;
      }
    }
    if (!ok) {
      not_grpc_.fetch_add(1, std::memory_order_relaxed);
      ::close(w.fd);
      return true;
    }
  }
  HandOver(w, /*silent=*/false);
  return true;
}

void GrpcListener::HandOver(Waiting& w, bool silent) {
  if (!TakeToken()) {
    over_rate_.fetch_add(1, std::memory_order_relaxed);
    ::close(w.fd);
    return;
  }
  const int one = 1;
  ::setsockopt(w.fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
  // gRPC reads the bytes taken here before the socket's (the server owns the fd from here on;
  // the buffer stays ours, and gRPC has moved its bytes out by the time the call returns).
  grpc::Slice first(w.bytes, w.have);
  grpc::experimental::ExternalConnectionAcceptor::NewConnectionParameters p;
  p.listener_fd = listen_fd_;
  p.fd = w.fd;
  p.read_buffer = grpc::ByteBuffer(&first, 1);
  acceptor_->HandleNewConnection(&p);
  (silent ? silent_ : admitted_).fetch_add(1, std::memory_order_relaxed);
}

void GrpcListener::Loop() {
  std::deque<Waiting> waiting;  // oldest first
  std::vector<pollfd> polled;
  absl::Duration backoff = absl::Milliseconds(10);
  while (!stopping_.load()) {
    const absl::Time now = absl::Now();
    absl::Time wake = now + absl::Milliseconds(100);
    for (auto it = waiting.begin(); it != waiting.end();) {
      if (it->deadline <= now) {
        if (it->have == 0) {
          // Silent: a gRPC client reconnecting after its server went away may wait for the
          // server to speak first. gRPC closes it if its HTTP/2 settings never come.
          HandOver(*it, /*silent=*/true);
        } else {
          timed_out_.fetch_add(1, std::memory_order_relaxed);
          ::close(it->fd);
        }
        it = waiting.erase(it);
      } else {
        wake = std::min(wake, it->deadline);
        ++it;
      }
    }
    polled.assign({pollfd{.fd = wake_read_, .events = POLLIN, .revents = 0},
                   pollfd{.fd = listen_fd_, .events = POLLIN, .revents = 0}});
    for (const Waiting& w : waiting) polled.push_back({.fd = w.fd, .events = POLLIN, .revents = 0});
    const int wait_ms =
        static_cast<int>(std::max<int64_t>(1, absl::ToInt64Milliseconds(wake - now) + 1));
    if (::poll(polled.data(), polled.size(), wait_ms) <= 0) continue;
    if (polled[0].revents != 0) break;  // Shutdown
    size_t i = 2;
    for (auto it = waiting.begin(); it != waiting.end(); ++i) {
      if (polled[i].revents != 0 && Advance(*it)) {
        it = waiting.erase(it);
      } else {
        ++it;
      }
    }
    if (polled[1].revents == 0) continue;
    for (int n = 0; n < kAcceptBatch; ++n) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        const int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK || err == EINTR) break;
        accept_errors_.fetch_add(1, std::memory_order_relaxed);
        if (IsResourceError(err)) {
          // The connection stays queued and the socket readable: without a pause this loop
          // would spin while descriptors are short.
          for (absl::Duration slept; slept < backoff && !stopping_.load();
               slept += absl::Milliseconds(10)) {
            absl::SleepFor(absl::Milliseconds(10));
          }
          backoff = std::min(2 * backoff, absl::Seconds(1));
        }
        break;
      }
      backoff = absl::Milliseconds(10);
      Waiting w{.fd = fd, .deadline = absl::Now() + options_.first_bytes_timeout};
      if (Advance(w)) continue;
      if (static_cast<int32_t>(waiting.size()) >= options_.max_waiting) {
        timed_out_.fetch_add(1, std::memory_order_relaxed);
        ::close(waiting.front().fd);
        waiting.pop_front();
      }
      waiting.push_back(w);
    }
  }
  for (const Waiting& w : waiting) ::close(w.fd);
}

}  // namespace tokenlake::service
