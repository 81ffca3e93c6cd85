#include "tokenlake/transport/tcp_transport.h"

#include <arpa/inet.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_format.h"

namespace tokenlake::transport {
namespace {

constexpr uint32_t kMagic = 0x314B4C54;  // "TLK1"
constexpr size_t kHeaderBytes = 4 + 4 + 4 + 4 + 8 + 8;

void PutU32(std::byte* p, uint32_t v) {
  for (int i = 0; i < 4; ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
}
void PutU64(std::byte* p, uint64_t v) {
  for (int i = 0; i < 8; ++i) p[i] = static_cast<std::byte>((v >> (8 * i)) & 0xff);
}
uint32_t GetU32(const std::byte* p) {
  uint32_t v = 0;
  for (int i = 0; i < 4; ++i) v |= static_cast<uint32_t>(p[i]) << (8 * i);
  return v;
}
uint64_t GetU64(const std::byte* p) {
  uint64_t v = 0;
  for (int i = 0; i < 8; ++i) v |= static_cast<uint64_t>(p[i]) << (8 * i);
  return v;
}

// Writes all of [data, data+size). False on error or timeout (SO_SNDTIMEO).
bool WriteAll(int fd, const std::byte* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::send(fd, data, size, MSG_NOSIGNAL);
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

// Reads exactly `size` bytes. False on EOF or error.
bool ReadAll(int fd, std::byte* data, size_t size) {
  while (size > 0) {
    const ssize_t n = ::recv(fd, data, size, 0);
    if (n == 0) return false;
    if (n < 0) {
      if (errno == EINTR) continue;
      return false;
    }
    data += n;
    size -= static_cast<size_t>(n);
  }
  return true;
}

void SetTimeouts(int fd, absl::Duration timeout) {
  const timeval tv = absl::ToTimeval(timeout);
  ::setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof(tv));
  const int one = 1;
  ::setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof(one));
}

}  // namespace

absl::StatusOr<std::unique_ptr<TcpTransport>> TcpTransport::Create(const Options& options) {
  if (options.num_endpoints < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TcpTransport: num_endpoints must be >= 1, got %d", options.num_endpoints));
  }
  if (options.max_payload_bytes < 0 || options.max_payload_bytes > (int64_t{1} << 40)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "TcpTransport: max_payload_bytes must be in [0, 2^40], got %d", options.max_payload_bytes));
  }
  if (options.port < 0 || options.port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TcpTransport: port must be in [0, 65535], got %d", options.port));
  }
  if (options.io_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("TcpTransport: io_timeout must be > 0");
  }
  std::vector<bool> seen(options.num_endpoints, false);
  for (InstanceId e : options.local_endpoints) {
    if (!e.valid() || e.value() < 0 || e.value() >= options.num_endpoints) {
      return absl::InvalidArgumentError(
          absl::StrFormat("TcpTransport: local endpoint %d out of range [0, %d)",
                          static_cast<int64_t>(e.value()), options.num_endpoints));
    }
    if (seen[e.value()]) {
      return absl::InvalidArgumentError(
          absl::StrFormat("TcpTransport: local endpoint %d listed twice", e.value()));
    }
    seen[e.value()] = true;
  }
  std::unique_ptr<TcpTransport> t(new TcpTransport(options));
  if (absl::Status s = t->Listen(); !s.ok()) return s;
  t->acceptor_ = std::thread([p = t.get()] { p->AcceptLoop(); });
  return t;
}

TcpTransport::TcpTransport(const Options& options)
    : options_(options), local_(options.num_endpoints, false) {
  for (InstanceId e : options.local_endpoints) local_[e.value()] = true;
  for (int32_t i = 0; i < options.num_endpoints; ++i) {
    mailboxes_.push_back(std::make_unique<Mailbox>());
    peers_.push_back(std::make_unique<Peer>());
  }
}

TcpTransport::~TcpTransport() { Shutdown(); }

absl::Status TcpTransport::Listen() {
  listen_fd_ = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
  if (listen_fd_ < 0) {
    return absl::UnavailableError(
        absl::StrFormat("TcpTransport: socket: %s", std::strerror(errno)));
  }
  const int one = 1;
  ::setsockopt(listen_fd_, SOL_SOCKET, SO_REUSEADDR, &one, sizeof(one));
  sockaddr_in addr{};
  addr.sin_family = AF_INET;
  addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
  addr.sin_port = htons(static_cast<uint16_t>(options_.port));
  if (::bind(listen_fd_, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0 ||
      ::listen(listen_fd_, 64) != 0) {
    const std::string err = std::strerror(errno);
    ::close(listen_fd_);
    listen_fd_ = -1;
    return absl::UnavailableError(
        absl::StrFormat("TcpTransport: cannot listen on 127.0.0.1:%d: %s", options_.port, err));
  }
  socklen_t len = sizeof(addr);
  ::getsockname(listen_fd_, reinterpret_cast<sockaddr*>(&addr), &len);
  port_ = ntohs(addr.sin_port);
  return absl::OkStatus();
}

void TcpTransport::AcceptLoop() {
  while (!shut_down_.load()) {
    pollfd p{.fd = listen_fd_, .events = POLLIN, .revents = 0};
    const int r = ::poll(&p, 1, 100);
    if (r <= 0) continue;
    const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC);
    if (fd < 0) continue;
    absl::MutexLock lock(&conn_mu_);
    if (shut_down_.load()) {
      ::close(fd);
      break;
    }
    auto conn = std::make_unique<Connection>();
    conn->fd = fd;
    conn->reader = std::thread([this, fd] { ReadLoop(fd); });
    connections_.push_back(std::move(conn));
  }
}

void TcpTransport::ReadLoop(int fd) {
  std::byte header[kHeaderBytes];
  while (!shut_down_.load()) {
    if (!ReadAll(fd, header, kHeaderBytes)) break;
    const uint32_t magic = GetU32(header);
    const int32_t from = static_cast<int32_t>(GetU32(header + 4));
    const int32_t to = static_cast<int32_t>(GetU32(header + 8));
    const uint64_t size = GetU64(header + 24);
    if (magic != kMagic || !IsLocal(InstanceId(to)) || !InRange(InstanceId(from)) ||
        size > static_cast<uint64_t>(options_.max_payload_bytes)) {
      malformed_frames_.fetch_add(1);
      break;
    }
    Message m;
    m.from = InstanceId(from);
    m.to = InstanceId(to);
    m.tag = GetU32(header + 12);
    m.correlation_id = GetU64(header + 16);
    m.payload.resize(size);
    if (size > 0 && !ReadAll(fd, m.payload.data(), size)) break;
    if (!Deliver(std::move(m)).ok()) break;
  }
  // The fd is closed by Shutdown (so that it is never reused while Shutdown may touch it).
  ::shutdown(fd, SHUT_RDWR);
}

absl::Status TcpTransport::Deliver(Message message) {
  Mailbox& box = *mailboxes_[message.to.value()];
  absl::MutexLock lock(&box.mu);
  if (box.shut_down) return absl::UnavailableError("TcpTransport: shut down");
  box.queue.push_back(std::move(message));
  return absl::OkStatus();
}

absl::Status TcpTransport::SetPeer(InstanceId endpoint, int32_t port) {
  if (!InRange(endpoint) || IsLocal(endpoint)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TcpTransport::SetPeer: endpoint %d is out of range [0, %d) or hosted here",
                        static_cast<int64_t>(endpoint.value()), options_.num_endpoints));
  }
  if (port < 1 || port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TcpTransport::SetPeer: port must be in [1, 65535], got %d", port));
  }
  Peer& peer = *peers_[endpoint.value()];
  absl::MutexLock lock(&peer.mu);
  if (peer.fd >= 0 && peer.port != port) {
    ::close(peer.fd);
    peer.fd = -1;
  }
  peer.port = port;
  return absl::OkStatus();
}

void TcpTransport::ClearPeer(InstanceId endpoint) {
  if (!InRange(endpoint) || IsLocal(endpoint)) return;
  Peer& peer = *peers_[endpoint.value()];
  absl::MutexLock lock(&peer.mu);
  if (peer.fd >= 0) ::close(peer.fd);
  peer.fd = -1;
  peer.port = 0;
}

Capabilities TcpTransport::capabilities() const {
  return Capabilities{.name = "tcp",
                      .in_process = false,
                      .ordered = true,
                      .reliable = false,
                      .max_payload_bytes = options_.max_payload_bytes};
}

absl::Status TcpTransport::WriteFrameLocked(Peer& peer, InstanceId to, const Message& message) {
  if (peer.port == 0) {
    return absl::UnavailableError(absl::StrFormat("TcpTransport::Send: no route to endpoint %d",
                                                  static_cast<int64_t>(to.value())));
  }
  if (peer.fd < 0) {
    const int fd = ::socket(AF_INET, SOCK_STREAM | SOCK_CLOEXEC, 0);
    if (fd < 0) return absl::UnavailableError("TcpTransport::Send: socket failed");
    SetTimeouts(fd, options_.io_timeout);
    sockaddr_in addr{};
    addr.sin_family = AF_INET;
    addr.sin_addr.s_addr = htonl(INADDR_LOOPBACK);
    addr.sin_port = htons(static_cast<uint16_t>(peer.port));
    if (::connect(fd, reinterpret_cast<sockaddr*>(&addr), sizeof(addr)) != 0) {
      const std::string err = std::strerror(errno);
      ::close(fd);
      return absl::UnavailableError(
          absl::StrFormat("TcpTransport::Send: cannot connect to endpoint %d at 127.0.0.1:%d: %s",
                          static_cast<int64_t>(to.value()), peer.port, err));
    }
    peer.fd = fd;
  }
  std::byte header[kHeaderBytes];
  PutU32(header, kMagic);
  PutU32(header + 4, static_cast<uint32_t>(message.from.value()));
  PutU32(header + 8, static_cast<uint32_t>(message.to.value()));
  PutU32(header + 12, message.tag);
  PutU64(header + 16, message.correlation_id);
  PutU64(header + 24, message.payload.size());
  if (!WriteAll(peer.fd, header, kHeaderBytes) ||
      !WriteAll(peer.fd, message.payload.data(), message.payload.size())) {
    const std::string err = std::strerror(errno);
    ::close(peer.fd);
    peer.fd = -1;
    return absl::UnavailableError(
        absl::StrFormat("TcpTransport::Send: write to endpoint %d at 127.0.0.1:%d failed: %s",
                        static_cast<int64_t>(to.value()), peer.port, err));
  }
  return absl::OkStatus();
}

absl::Status TcpTransport::Send(Message message) {
  if (!InRange(message.from)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TcpTransport::Send: from endpoint %d out of range [0, %d)",
                        static_cast<int64_t>(message.from.value()), options_.num_endpoints));
  }
  if (!InRange(message.to)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TcpTransport::Send: to endpoint %d out of range [0, %d)",
                        static_cast<int64_t>(message.to.value()), options_.num_endpoints));
  }
  const int64_t bytes = static_cast<int64_t>(message.payload.size());
  if (bytes > options_.max_payload_bytes) {
    return absl::ResourceExhaustedError(
        absl::StrFormat("TcpTransport::Send: payload of %d bytes exceeds the limit of %d", bytes,
                        options_.max_payload_bytes));
  }
  if (shut_down_.load()) return absl::UnavailableError("TcpTransport::Send: shut down");
  if (IsLocal(message.to)) return Deliver(std::move(message));
  Peer& peer = *peers_[message.to.value()];
  absl::MutexLock lock(&peer.mu);
  absl::Status s = WriteFrameLocked(peer, message.to, message);
  if (!s.ok() && peer.port != 0) {
    // A cached connection may be stale (the peer restarted): reconnect once.
    s = WriteFrameLocked(peer, message.to, message);
  }
  if (s.ok()) {
    remote_messages_.fetch_add(1);
    remote_bytes_.fetch_add(bytes);
  }
  return s;
}

absl::StatusOr<Message> TcpTransport::Receive(InstanceId self, absl::Duration timeout) {
  if (!IsLocal(self)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TcpTransport::Receive: endpoint %d is not hosted by this transport",
                        static_cast<int64_t>(self.value())));
  }
  Mailbox& box = *mailboxes_[self.value()];
  absl::MutexLock lock(&box.mu);
  auto ready = [&box]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(box.mu) {
    return !box.queue.empty() || box.shut_down;
  };
  if (timeout == absl::InfiniteDuration()) {
    box.mu.Await(absl::Condition(&ready));
  } else {
    box.mu.AwaitWithTimeout(absl::Condition(&ready), timeout);
  }
  if (!box.queue.empty()) {
    Message m = std::move(box.queue.front());
    box.queue.pop_front();
    return m;
  }
  if (box.shut_down) return absl::CancelledError("TcpTransport::Receive: shut down");
  return absl::DeadlineExceededError(
      absl::StrFormat("TcpTransport::Receive: nothing for endpoint %d within %s",
                      static_cast<int64_t>(self.value()), absl::FormatDuration(timeout)));
}

void TcpTransport::Shutdown() {
  if (shut_down_.exchange(true)) return;
  for (auto& box : mailboxes_) {
    absl::MutexLock lock(&box->mu);
    box->shut_down = true;
  }
  if (acceptor_.joinable()) acceptor_.join();
  if (listen_fd_ >= 0) ::close(listen_fd_);
  listen_fd_ = -1;
  std::vector<std::unique_ptr<Connection>> conns;
  {
    absl::MutexLock lock(&conn_mu_);
    conns.swap(connections_);
  }
  for (auto& c : conns) ::shutdown(c->fd, SHUT_RDWR);
  for (auto& c : conns) {
    if (c->reader.joinable()) c->reader.join();
    ::close(c->fd);
  }
  for (auto& peer : peers_) {
    absl::MutexLock lock(&peer->mu);
    if (peer->fd >= 0) ::close(peer->fd);
    peer->fd = -1;
    peer->port = 0;
  }
}

}  // namespace tokenlake::transport
