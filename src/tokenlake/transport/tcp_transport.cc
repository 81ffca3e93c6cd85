#include "tokenlake/transport/tcp_transport.h"

#include <arpa/inet.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <poll.h>
#include <sys/socket.h>
#include <unistd.h>

#include <algorithm>
#include <cerrno>
#include <cstring>
#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "tokenlake/transport/cluster_secret.h"
#include "tokenlake/transport/socket_stream.h"

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

constexpr uint32_t kHandshakeMagic = 0x31484C54;  // "TLH1"
constexpr size_t kNonceBytes = 16;
constexpr size_t kIncarnationBytes = 16;
constexpr size_t kMacBytes = 32;
constexpr size_t kChallengeBytes = 4 + kNonceBytes;            // magic | Na
constexpr size_t kAnswerBytes = kNonceBytes + kMacBytes;       // Nd | MAC
constexpr size_t kProofBytes = kIncarnationBytes + kMacBytes;  // I | MAC
constexpr size_t kReadChunk = size_t{64} << 10;
constexpr absl::Duration kHealthWindow = absl::Seconds(2);
// Connections accepted in one round of the accept loop before it looks at handshakes again.
constexpr int kAcceptBatch = 64;
constexpr char kClientLabel[] = "tokenlake transport handshake client";
constexpr char kServerLabel[] = "tokenlake transport handshake server";

using Io = SocketStream::Io;

std::string_view AsView(const unsigned char* p, size_t n) {
  return {reinterpret_cast<const char*>(p), n};
}

std::string RandomIncarnation() {
  unsigned char bytes[kIncarnationBytes];
  RandomBytes(bytes, sizeof(bytes));
  return std::string(AsView(bytes, sizeof(bytes)));
}

// The acceptor's challenge: magic | a fresh nonce Na.
void MakeChallenge(unsigned char* hello) {
  PutU32(reinterpret_cast<std::byte*>(hello), kHandshakeMagic);
  RandomBytes(hello + 4, kNonceBytes);
}

// The acceptor's check of the dialler's `answer` to `hello`, and its proof: its incarnation I
// and HMAC(secret, server | Na | Nd | I), written to `proof` (kProofBytes).
// Errors: Unauthenticated (the dialler does not know the secret).
absl::Status MakeProof(const std::string& secret, const unsigned char* hello,
                       const unsigned char* answer, const std::string& incarnation,
                       unsigned char* proof) {
  unsigned char signed_bytes[2 * kNonceBytes + kIncarnationBytes];
  std::memcpy(signed_bytes, hello + 4, kNonceBytes);
  std::memcpy(signed_bytes + kNonceBytes, answer, kNonceBytes);
  Mac got;
  std::memcpy(got.data(), answer + kNonceBytes, got.size());
  if (!MacEqual(got, HmacSha256(secret, kClientLabel, AsView(signed_bytes, 2 * kNonceBytes)))) {
    return absl::UnauthenticatedError(
        "handshake: the peer does not know the cluster secret (wrong MAC)");
  }
  std::memcpy(signed_bytes + 2 * kNonceBytes, incarnation.data(), kIncarnationBytes);
  const Mac mine = HmacSha256(secret, kServerLabel, AsView(signed_bytes, sizeof(signed_bytes)));
  std::memcpy(proof, incarnation.data(), kIncarnationBytes);
  std::memcpy(proof + kIncarnationBytes, mine.data(), mine.size());
  return absl::OkStatus();
}

// The acceptor's side of the handshake (see the header), on a connection's own thread.
absl::Status ServerHandshake(SocketStream& stream, const std::string& secret,
                             const std::string& incarnation, absl::Time deadline) {
  unsigned char hello[kChallengeBytes];
  MakeChallenge(hello);
  if (!stream.WriteAll(hello, sizeof(hello), deadline - absl::Now())) {
    return absl::UnavailableError("handshake: cannot write the challenge");
  }
  unsigned char answer[kAnswerBytes];
  const Io r = stream.ReadExact(answer, sizeof(answer), deadline);
  if (r == Io::kTimeout) return absl::UnauthenticatedError("handshake: no answer in time");
  if (r != Io::kOk) return absl::UnauthenticatedError("handshake: the peer hung up");
  unsigned char proof[kProofBytes];
  if (absl::Status s = MakeProof(secret, hello, answer, incarnation, proof); !s.ok()) return s;
  if (!stream.WriteAll(proof, sizeof(proof), deadline - absl::Now())) {
    return absl::UnavailableError("handshake: cannot write the proof");
  }
  return absl::OkStatus();
}

// The dialler's side: returns the acceptor's incarnation. Errors: Unauthenticated when the
// acceptor answered as no member would (not the challenge; a proof with another secret),
// Unavailable when it did not answer (hung up, timed out).
absl::StatusOr<std::string> ClientHandshake(SocketStream& stream, const std::string& secret,
                                            absl::Time deadline) {
  unsigned char hello[kChallengeBytes];
  size_t got = 0;
  const Io r = stream.ReadExact(hello, sizeof(hello), deadline, &got);
  const bool bad_magic =
      got >= 4 && GetU32(reinterpret_cast<const std::byte*>(hello)) != kHandshakeMagic;
  if (bad_magic) {
    return absl::UnauthenticatedError(
        "handshake: no valid challenge (a peer without a cluster secret?)");
  }
  if (r != Io::kOk) {
    return absl::UnavailableError(
        r == Io::kTimeout ? "handshake: no challenge in time (a peer without a cluster secret?)"
                          : "handshake: the peer hung up before its challenge");
  }
  unsigned char signed_bytes[2 * kNonceBytes + kIncarnationBytes];
  std::memcpy(signed_bytes, hello + 4, kNonceBytes);
  RandomBytes(signed_bytes + kNonceBytes, kNonceBytes);
  unsigned char answer[kAnswerBytes];
  std::memcpy(answer, signed_bytes + kNonceBytes, kNonceBytes);
  const Mac mine = HmacSha256(secret, kClientLabel, AsView(signed_bytes, 2 * kNonceBytes));
  std::memcpy(answer + kNonceBytes, mine.data(), mine.size());
  if (!stream.WriteAll(answer, sizeof(answer), deadline - absl::Now())) {
    return absl::UnavailableError("handshake: cannot write the answer");
  }
  unsigned char proof[kProofBytes];
  if (stream.ReadExact(proof, sizeof(proof), deadline) != Io::kOk) {
    return absl::UnavailableError(
        "handshake: the peer refused the answer (a different cluster secret?)");
  }
  std::memcpy(signed_bytes + 2 * kNonceBytes, proof, kIncarnationBytes);
  Mac theirs;
  std::memcpy(theirs.data(), proof + kIncarnationBytes, theirs.size());
  if (!MacEqual(theirs,
                HmacSha256(secret, kServerLabel, AsView(signed_bytes, sizeof(signed_bytes))))) {
    return absl::UnauthenticatedError(
        "handshake: the peer does not know the cluster secret (wrong proof)");
  }
  return std::string(AsView(proof, kIncarnationBytes));
}

bool IsResourceError(int err) {
  return err == EMFILE || err == ENFILE || err == ENOBUFS || err == ENOMEM;
}

int64_t NowNs() { return absl::ToUnixNanos(absl::Now()); }

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
  if (options.io_timeout <= absl::ZeroDuration() || options.idle_timeout <= absl::ZeroDuration() ||
      options.frame_timeout <= absl::ZeroDuration() ||
      options.handshake_timeout <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError(
        "TcpTransport: io_timeout, idle_timeout, frame_timeout and handshake_timeout must be > 0");
  }
  if (options.listen && !IsLoopbackHost(options.listen_host) && options.tls == nullptr &&
      !options.allow_insecure) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "TcpTransport: listening on %s, beyond this machine, needs TLS (or allow_insecure)",
        options.listen_host));
  }
  if (options.max_connections < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "TcpTransport: max_connections must be >= 1, got %d", options.max_connections));
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
  for (InstanceId e : options.answer_on_incoming) {
    if (!e.valid() || e.value() < 0 || e.value() >= options.num_endpoints || seen[e.value()]) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "TcpTransport: answer_on_incoming endpoint %d is out of range [0, %d) or local",
          static_cast<int64_t>(e.value()), options.num_endpoints));
    }
  }
  std::unique_ptr<TcpTransport> t(new TcpTransport(options));
  if (absl::Status s = t->Listen(); !s.ok()) return s;
  t->acceptor_ = std::thread([p = t.get()] { p->AcceptLoop(); });
  return t;
}

TcpTransport::TcpTransport(const Options& options)
    : options_(options),
      incarnation_(RandomIncarnation()),
      local_(options.num_endpoints, false),
      incoming_(options.num_endpoints, false),
      incoming_routes_(options.num_endpoints) {
  for (InstanceId e : options.local_endpoints) local_[e.value()] = true;
  for (InstanceId e : options.answer_on_incoming) incoming_[e.value()] = true;
  for (int32_t i = 0; i < options.num_endpoints; ++i) {
    mailboxes_.push_back(std::make_unique<Mailbox>());
    peers_.push_back(std::make_unique<Peer>());
  }
}

TcpTransport::~TcpTransport() { Shutdown(); }

absl::Status TcpTransport::Listen() {
  if (!options_.listen) return absl::OkStatus();
  // A backlog for bursts of dialling peers (the kernel caps it at somaxconn).
  absl::StatusOr<int> fd =
      ListenTcp(HostPort{.host = options_.listen_host, .port = options_.port}, 4096, &port_);
  if (!fd.ok())
    return absl::UnavailableError(absl::StrCat("TcpTransport: ", fd.status().message()));
  listen_fd_ = *fd;
  // Non-blocking: the accept loop takes what is queued until accept4 says EAGAIN.
  ::fcntl(listen_fd_, F_SETFL, ::fcntl(listen_fd_, F_GETFL, 0) | O_NONBLOCK);
  return absl::OkStatus();
}

// A connection accepted in the clear with a secret whose handshake the accept loop runs: its
// challenge was sent, its answer is read as it arrives.
struct TcpTransport::PendingHandshake {
  int fd = -1;
  int64_t accepted_ns = 0;
  absl::Time deadline;
  unsigned char hello[kChallengeBytes];
  unsigned char answer[kAnswerBytes];
  size_t have = 0;
};

void TcpTransport::AcceptLoop() {
  absl::Duration backoff = absl::Milliseconds(10);
  std::deque<PendingHandshake> pending;  // oldest first
  std::vector<pollfd> polled;
  while (!shut_down_.load()) {
    Reap();
    if (listen_fd_ < 0) {
      absl::SleepFor(absl::Milliseconds(50));
      continue;
    }
    const absl::Time now = absl::Now();
    absl::Time wake = now + absl::Milliseconds(100);
    for (auto it = pending.begin(); it != pending.end();) {
      if (it->deadline <= now) {
        ::close(it->fd);
        NoteDrop(auth_failures_, "TcpTransport: connection refused: handshake: no answer in time");
        it = pending.erase(it);
      } else {
        wake = std::min(wake, it->deadline);
        ++it;
      }
    }
    polled.assign(1, pollfd{.fd = listen_fd_, .events = POLLIN, .revents = 0});
    for (const PendingHandshake& p : pending) {
      polled.push_back(pollfd{.fd = p.fd, .events = POLLIN, .revents = 0});
    }
    const int wait_ms =
        static_cast<int>(std::max<int64_t>(1, absl::ToInt64Milliseconds(wake - now) + 1));
    if (::poll(polled.data(), polled.size(), wait_ms) <= 0) continue;
    // Answers that arrived are taken before more connections are accepted.
    size_t i = 1;
    for (auto it = pending.begin(); it != pending.end(); ++i) {
      if (polled[i].revents != 0 && AdvanceHandshake(*it)) {
        it = pending.erase(it);
      } else {
        ++it;
      }
    }
    if (polled[0].revents == 0) continue;
    for (int n = 0; n < kAcceptBatch && !shut_down_.load(); ++n) {
      const int fd = ::accept4(listen_fd_, nullptr, nullptr, SOCK_CLOEXEC | SOCK_NONBLOCK);
      if (fd < 0) {
        const int err = errno;
        if (err == EAGAIN || err == EWOULDBLOCK) break;
        accept_errors_.fetch_add(1);
        if (IsResourceError(err)) {
          // The pending connection stays queued and the socket stays readable: without a pause
          // this loop would spin. Finished connections are reaped first (they may free fds).
          NoteResourceError("accept", err);
          Reap();
          for (absl::Duration slept; slept < backoff && !shut_down_.load();
               slept += absl::Milliseconds(10)) {
            absl::SleepFor(absl::Milliseconds(10));
          }
          backoff = std::min(2 * backoff, absl::Seconds(1));
        }
        break;
      }
      backoff = absl::Milliseconds(10);
      if (!TakeAccepted(fd, pending)) break;
    }
  }
  for (const PendingHandshake& p : pending) ::close(p.fd);
}

bool TcpTransport::TakeAccepted(int fd, std::deque<PendingHandshake>& pending) {
  const int64_t now_ns = NowNs();
  auto open = static_cast<int64_t>(pending.size());
  std::shared_ptr<Conn> oldest_unauthenticated;
  {
    absl::MutexLock lock(&conn_mu_);
    for (const auto& c : conns_) {
      if (c->dialled || c->finished.load()) continue;
      ++open;
      if (!c->authenticated.load() && (oldest_unauthenticated == nullptr ||
                                       c->accepted_ns < oldest_unauthenticated->accepted_ns)) {
        oldest_unauthenticated = c;
      }
    }
  }
  if (open >= options_.max_connections) {
    // Make room by closing the connection that has been in its handshake longest; refuse this
    // one only when every connection is authenticated.
    int64_t since_ns = -1;
    if (!pending.empty()) {
      since_ns = pending.front().accepted_ns;
      ::close(pending.front().fd);
      pending.pop_front();
    } else if (oldest_unauthenticated != nullptr && !oldest_unauthenticated->authenticated.load()) {
      since_ns = oldest_unauthenticated->accepted_ns;
      CloseConn(*oldest_unauthenticated);
    }
    if (since_ns < 0) {
      ::close(fd);
      NoteDrop(refused_, absl::StrFormat("connection refused: %d accepted connections open",
                                         options_.max_connections));
      return true;
    }
    NoteDrop(refused_,
             absl::StrFormat("TcpTransport: closed a connection in its handshake for %s to make "
                             "room (%d accepted connections open)",
                             absl::FormatDuration(absl::Nanoseconds(now_ns - since_ns)),
                             options_.max_connections));
  }
  if (options_.tls == nullptr && !options_.secret.empty()) {
    PendingHandshake p;
    p.fd = fd;
    p.accepted_ns = now_ns;
    p.deadline = absl::FromUnixNanos(now_ns) + options_.handshake_timeout;
    MakeChallenge(p.hello);
    // A new connection's send buffer takes the challenge whole.
    if (::send(fd, p.hello, sizeof(p.hello), MSG_NOSIGNAL | MSG_DONTWAIT) !=
        static_cast<ssize_t>(sizeof(p.hello))) {
      ::close(fd);
      NoteDrop(auth_failures_,
               "TcpTransport: connection refused: handshake: cannot write the challenge");
      return true;
    }
    pending.push_back(p);
    return true;
  }
  auto conn = std::make_shared<Conn>();
  conn->stream = std::make_unique<SocketStream>(fd, options_.tls);
  conn->accepted_ns = now_ns;
  conn->last_activity_ns.store(now_ns);
  // Without TLS and secret there is no handshake.
  conn->authenticated.store(options_.tls == nullptr && options_.secret.empty());
  return Adopt(std::move(conn)).ok();
}

bool TcpTransport::AdvanceHandshake(PendingHandshake& p) {
  auto fail = [&](const std::string& why) {
    ::close(p.fd);
    NoteDrop(auth_failures_, absl::StrCat("TcpTransport: connection refused: handshake: ", why));
    return true;
  };
  const ssize_t n = ::recv(p.fd, p.answer + p.have, sizeof(p.answer) - p.have, MSG_DONTWAIT);
  if (n == 0) return fail("the peer hung up");
  if (n < 0) {
    if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return false;
    return fail(std::strerror(errno));
  }
  p.have += static_cast<size_t>(n);
  if (p.have < sizeof(p.answer)) return false;
  unsigned char proof[kProofBytes];
  if (absl::Status s = MakeProof(options_.secret, p.hello, p.answer, incarnation_, proof);
      !s.ok()) {
    ::close(p.fd);
    NoteDrop(auth_failures_, absl::StrCat("TcpTransport: connection refused: ", s.message()));
    return true;
  }
  // The dialler sends nothing before the proof has arrived: its send buffer is empty.
  if (::send(p.fd, proof, sizeof(proof), MSG_NOSIGNAL | MSG_DONTWAIT) !=
      static_cast<ssize_t>(sizeof(proof))) {
    return fail("cannot write the proof");
  }
  auto conn = std::make_shared<Conn>();
  conn->stream = std::make_unique<SocketStream>(p.fd, nullptr);
  conn->accepted_ns = p.accepted_ns;
  conn->last_activity_ns.store(NowNs());
  conn->authenticated.store(true);
  (void)Adopt(std::move(conn));  // fails only once shut down (the stream is then closed)
  return true;
}

absl::Status TcpTransport::Adopt(std::shared_ptr<Conn> conn) {
  absl::MutexLock lock(&conn_mu_);
  if (shut_down_.load()) {
    conn->stream.reset();
    return absl::UnavailableError("TcpTransport: shut down");
  }
  Conn* raw = conn.get();
  raw->reader = std::thread([this, conn] { ReadLoop(conn); });
  conns_.push_back(std::move(conn));
  return absl::OkStatus();
}

void TcpTransport::Reap() {
  std::vector<std::shared_ptr<Conn>> done;
  {
    absl::MutexLock lock(&conn_mu_);
    auto keep = std::partition(conns_.begin(), conns_.end(),
                               [](const auto& c) { return !c->finished.load(); });
    done.assign(keep, conns_.end());
    conns_.erase(keep, conns_.end());
    for (auto& route : incoming_routes_) {
      if (route != nullptr && route->finished.load()) route.reset();
    }
  }
  for (auto& c : done) {
    if (c->reader.joinable()) c->reader.join();
    absl::MutexLock lock(&c->write_mu);
    c->closed = true;
    c->stream.reset();
  }
}

void TcpTransport::CloseConn(Conn& conn) {
  absl::MutexLock lock(&conn.write_mu);
  if (conn.closed) return;
  conn.closed = true;
  if (conn.stream != nullptr) conn.stream->Shutdown();
}

void TcpTransport::NoteDrop(std::atomic<int64_t>& counter, const std::string& why) {
  counter.fetch_add(1);
  absl::MutexLock lock(&error_mu_);
  last_error_ = why;
}

void TcpTransport::NoteResourceError(const char* what, int err) {
  absl::MutexLock lock(&error_mu_);
  last_resource_error_ = absl::Now();
  resource_error_ =
      absl::StrFormat("TcpTransport: cannot %s a connection: %s", what, std::strerror(err));
}

absl::Status TcpTransport::Health() const {
  absl::MutexLock lock(&error_mu_);
  if (absl::Now() - last_resource_error_ < kHealthWindow) {
    return absl::UnavailableError(resource_error_);
  }
  return absl::OkStatus();
}

int64_t TcpTransport::open_connections() const {
  absl::MutexLock lock(&conn_mu_);
  return static_cast<int64_t>(conns_.size());
}

std::string TcpTransport::last_error() const {
  absl::MutexLock lock(&error_mu_);
  return last_error_;
}

void TcpTransport::ReadLoop(const std::shared_ptr<Conn>& conn) {
  ReadFrames(conn);
  CloseConn(*conn);
  conn->finished.store(true);
}

void TcpTransport::ReadFrames(const std::shared_ptr<Conn>& conn) {
  // The stream stays open until this thread is joined.
  SocketStream& stream = *conn->stream;
  if (!conn->dialled && !conn->authenticated.load()) {
    const absl::Time deadline = absl::FromUnixNanos(conn->accepted_ns) + options_.handshake_timeout;
    absl::Status h = stream.Accept(deadline);
    if (h.ok() && !options_.secret.empty()) {
      h = ServerHandshake(stream, options_.secret, incarnation_, deadline);
    }
    if (!h.ok()) {
      NoteDrop(auth_failures_, absl::StrCat("TcpTransport: connection refused: ", h.message()));
      return;
    }
    conn->authenticated.store(true);
  }
  std::byte header[kHeaderBytes];
  while (!shut_down_.load()) {
    // Wait for the next frame's first byte: an accepted connection only until it has been idle
    // for idle_timeout (activity includes frames written on it).
    if (!conn->dialled) {
      const absl::Time idle_deadline =
          absl::FromUnixNanos(conn->last_activity_ns.load()) + options_.idle_timeout;
      const Io w = stream.WaitReadable(idle_deadline);
      if (w == Io::kTimeout) {
        if (absl::FromUnixNanos(conn->last_activity_ns.load()) + options_.idle_timeout >
            absl::Now()) {
          continue;  // a frame was written meanwhile
        }
        NoteDrop(timed_out_, absl::StrFormat("TcpTransport: closed a connection idle for %s",
                                             absl::FormatDuration(options_.idle_timeout)));
        return;
      }
      if (w != Io::kOk) return;
    }
    size_t got = 0;
    const absl::Time frame_deadline =
        conn->dialled ? absl::InfiniteFuture() : absl::Now() + options_.frame_timeout;
    Io r = stream.ReadExact(header, 1, conn->dialled ? absl::InfiniteFuture() : frame_deadline);
    if (r != Io::kOk) return;  // an orderly close (or shutdown) between frames
    const absl::Time deadline =
        conn->dialled ? absl::Now() + options_.frame_timeout : frame_deadline;
    r = stream.ReadExact(header + 1, kHeaderBytes - 1, deadline, &got);
    auto incomplete = [&](Io io) {
      if (io == Io::kTimeout) {
        NoteDrop(timed_out_,
                 absl::StrFormat("TcpTransport: closed a connection whose frame did not "
                                 "complete within %s",
                                 absl::FormatDuration(options_.frame_timeout)));
      }
    };
    if (r != Io::kOk) {
      incomplete(r);
      return;
    }
    const uint32_t magic = GetU32(header);
    const int32_t from = static_cast<int32_t>(GetU32(header + 4));
    const int32_t to = static_cast<int32_t>(GetU32(header + 8));
    const uint64_t size = GetU64(header + 24);
    std::string bad;
    if (magic != kMagic) {
      bad = "bad magic";
    } else if (!IsLocal(InstanceId(to))) {
      bad = absl::StrFormat("destination endpoint %d is not hosted here", to);
    } else if (!InRange(InstanceId(from))) {
      bad = absl::StrFormat("source endpoint %d out of range", from);
    } else if (size > static_cast<uint64_t>(options_.max_payload_bytes)) {
      bad = absl::StrFormat("payload of %d bytes announced, over the limit of %d", size,
                            options_.max_payload_bytes);
    } else if (conn->dialled && InstanceId(from) != conn->expected_from) {
      bad = absl::StrFormat("frame from endpoint %d on the connection opened to endpoint %d", from,
                            static_cast<int64_t>(conn->expected_from.value()));
    }
    if (!bad.empty()) {
      NoteDrop(malformed_frames_, absl::StrCat("TcpTransport: malformed frame: ", bad));
      return;
    }
    Message m;
    m.from = InstanceId(from);
    m.to = InstanceId(to);
    m.tag = GetU32(header + 12);
    m.correlation_id = GetU64(header + 16);
    // The buffer grows with the bytes that arrive: an announced size alone allocates nothing.
    size_t have = 0;
    while (have < size) {
      if (m.payload.size() == have) {
        m.payload.resize(static_cast<size_t>(
            std::min<uint64_t>(size, std::max<uint64_t>(2 * have, have + kReadChunk))));
      }
      r = stream.ReadExact(m.payload.data() + have, m.payload.size() - have, deadline, &got);
      have += got;
      if (r != Io::kOk) {
        incomplete(r);
        return;
      }
    }
    conn->last_activity_ns.store(NowNs());
    if (!conn->dialled && AnsweredOnIncoming(m.from)) {
      absl::MutexLock lock(&conn_mu_);
      incoming_routes_[m.from.value()] = conn;
    }
    if (!Deliver(std::move(m)).ok()) return;
  }
}

absl::Status TcpTransport::Deliver(Message message) {
  Mailbox& box = *mailboxes_[message.to.value()];
  absl::MutexLock lock(&box.mu);
  if (box.shut_down) return absl::UnavailableError("TcpTransport: shut down");
  box.queue.push_back(std::move(message));
  return absl::OkStatus();
}

absl::Status TcpTransport::SetPeer(InstanceId endpoint, int32_t port) {
  return SetPeer(endpoint, HostPort{.host = "127.0.0.1", .port = port});
}

absl::Status TcpTransport::SetPeer(InstanceId endpoint, const HostPort& address) {
  if (!InRange(endpoint) || IsLocal(endpoint) || AnsweredOnIncoming(endpoint)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "TcpTransport::SetPeer: endpoint %d is out of range [0, %d), hosted here or answered on "
        "its own connections",
        static_cast<int64_t>(endpoint.value()), options_.num_endpoints));
  }
  if (address.port < 1 || address.port > 65535 || address.host.empty()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("TcpTransport::SetPeer: address %s needs a host and a port in [1, 65535]",
                        address.ToString()));
  }
  Peer& peer = *peers_[endpoint.value()];
  absl::MutexLock lock(&peer.mu);
  if (peer.conn != nullptr && !(peer.address == address)) {
    CloseConn(*peer.conn);
    peer.conn.reset();
  }
  peer.address = address;
  return absl::OkStatus();
}

void TcpTransport::ClearPeer(InstanceId endpoint) {
  if (!InRange(endpoint) || IsLocal(endpoint) || AnsweredOnIncoming(endpoint)) return;
  Peer& peer = *peers_[endpoint.value()];
  absl::MutexLock lock(&peer.mu);
  if (peer.conn != nullptr) CloseConn(*peer.conn);
  peer.conn.reset();
  peer.address.port = 0;
}

Capabilities TcpTransport::capabilities() const {
  return Capabilities{.name = "tcp",
                      .in_process = false,
                      .ordered = true,
                      .reliable = false,
                      .max_payload_bytes = options_.max_payload_bytes};
}

absl::StatusOr<std::shared_ptr<TcpTransport::Conn>> TcpTransport::Dial(const HostPort& address,
                                                                       InstanceId to) {
  const absl::Time deadline = absl::Now() + options_.io_timeout;
  absl::StatusOr<int> fd = ConnectTcp(address, deadline);
  if (!fd.ok()) {
    if (absl::IsResourceExhausted(fd.status())) NoteResourceError("open", errno);
    return absl::UnavailableError(absl::StrFormat("TcpTransport::Send: endpoint %d: %s",
                                                  static_cast<int64_t>(to.value()),
                                                  fd.status().message()));
  }
  auto stream = std::make_unique<SocketStream>(*fd, options_.tls);
  const absl::Time handshake_deadline = absl::Now() + options_.handshake_timeout;
  absl::Status h = stream->Connect(address.host, handshake_deadline);
  if (h.ok() && !options_.secret.empty()) {
    h = ClientHandshake(*stream, options_.secret, handshake_deadline).status();
  }
  if (!h.ok()) {
    auth_failures_.fetch_add(1);
    return absl::UnavailableError(absl::StrFormat("TcpTransport::Send: endpoint %d at %s: %s",
                                                  static_cast<int64_t>(to.value()),
                                                  address.ToString(), h.message()));
  }
  auto conn = std::make_shared<Conn>();
  conn->stream = std::move(stream);
  conn->dialled = true;
  conn->expected_from = to;
  conn->last_activity_ns.store(NowNs());
  if (absl::Status s = Adopt(conn); !s.ok()) return s;
  return conn;
}

absl::Status TcpTransport::WriteFrame(Conn& conn, InstanceId to, const Message& message,
                                      const std::string& where) {
  std::byte header[kHeaderBytes];
  PutU32(header, kMagic);
  PutU32(header + 4, static_cast<uint32_t>(message.from.value()));
  PutU32(header + 8, static_cast<uint32_t>(message.to.value()));
  PutU32(header + 12, message.tag);
  PutU64(header + 16, message.correlation_id);
  PutU64(header + 24, message.payload.size());
  absl::MutexLock lock(&conn.write_mu);
  if (conn.closed) {
    return absl::UnavailableError(
        absl::StrFormat("TcpTransport::Send: the connection to endpoint %d is closed",
                        static_cast<int64_t>(to.value())));
  }
  if (!conn.stream->WriteAll(header, kHeaderBytes, options_.io_timeout) ||
      !conn.stream->WriteAll(message.payload.data(), message.payload.size(), options_.io_timeout)) {
    const std::string err = errno != 0 ? std::strerror(errno) : "timed out";
    conn.closed = true;
    conn.stream->Shutdown();
    return absl::UnavailableError(
        absl::StrFormat("TcpTransport::Send: write to endpoint %d at %s failed: %s",
                        static_cast<int64_t>(to.value()), where, err));
  }
  conn.last_activity_ns.store(NowNs());
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
  absl::Status s;
  if (AnsweredOnIncoming(message.to)) {
    std::shared_ptr<Conn> conn;
    {
      absl::MutexLock lock(&conn_mu_);
      conn = incoming_routes_[message.to.value()];
    }
    if (conn == nullptr) {
      return absl::UnavailableError(
          absl::StrFormat("TcpTransport::Send: endpoint %d has no connection open to answer on",
                          static_cast<int64_t>(message.to.value())));
    }
    s = WriteFrame(*conn, message.to, message, "the connection it opened");
  } else {
    Peer& peer = *peers_[message.to.value()];
    absl::MutexLock lock(&peer.mu);
    if (peer.address.port == 0) {
      return absl::UnavailableError(absl::StrFormat("TcpTransport::Send: no route to endpoint %d",
                                                    static_cast<int64_t>(message.to.value())));
    }
    for (int attempt = 0; attempt < 2; ++attempt) {
      bool cached = false;
      if (peer.conn != nullptr) {
        // Redial a connection the peer may be closing as idle (or has closed: its reader saw
        // the end) rather than write into it and lose the frame.
        const absl::Time last = absl::FromUnixNanos(peer.conn->last_activity_ns.load());
        if (peer.conn->finished.load() || absl::Now() - last > options_.idle_timeout / 2) {
          CloseConn(*peer.conn);
          peer.conn.reset();
        } else {
          cached = true;
        }
      }
      if (peer.conn == nullptr) {
        absl::StatusOr<std::shared_ptr<Conn>> c = Dial(peer.address, message.to);
        if (!c.ok()) return c.status();
        peer.conn = std::move(*c);
      }
      s = WriteFrame(*peer.conn, message.to, message, peer.address.ToString());
      if (s.ok()) break;
      peer.conn.reset();
      // A cached connection may be stale (the peer restarted): reconnect once.
      if (!cached) break;
    }
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
  for (auto& peer : peers_) {
    absl::MutexLock lock(&peer->mu);
    if (peer->conn != nullptr) CloseConn(*peer->conn);
    peer->conn.reset();
    peer->address.port = 0;
  }
  std::vector<std::shared_ptr<Conn>> conns;
  {
    absl::MutexLock lock(&conn_mu_);
    conns.swap(conns_);
    for (auto& route : incoming_routes_) route.reset();
  }
  for (auto& c : conns) CloseConn(*c);
  for (auto& c : conns) {
    if (c->reader.joinable()) c->reader.join();
    absl::MutexLock lock(&c->write_mu);
    c->stream.reset();
  }
}

TcpTransport::ProbeResult TcpTransport::Probe(int32_t port, const std::string& secret,
                                              absl::Duration timeout) {
  return Probe(HostPort{.host = "127.0.0.1", .port = port}, secret, nullptr, timeout);
}

TcpTransport::ProbeResult TcpTransport::Probe(const HostPort& address, const std::string& secret,
                                              std::shared_ptr<const TlsContext> tls,
                                              absl::Duration timeout) {
  using Kind = ProbeResult::Kind;
  auto result = [&address](Kind kind, std::string incarnation, absl::string_view detail) {
    return ProbeResult{
        .kind = kind,
        .incarnation = std::move(incarnation),
        .detail = absl::StrFormat("TcpTransport::Probe: %s: %s", address.ToString(), detail)};
  };
  if (address.port < 1 || address.port > 65535) {
    return result(Kind::kNoAnswer, "", "bad port");
  }
  const absl::Time deadline = absl::Now() + timeout;
  bool refused = false;
  absl::StatusOr<int> fd = ConnectTcp(address, deadline, &refused);
  if (!fd.ok()) {
    return result(refused ? Kind::kNoMember : Kind::kNoAnswer, "", fd.status().message());
  }
  SocketStream stream(*fd, std::move(tls));
  // A TLS failure is no proof of a stranger: a listener over its limit also closes.
  if (absl::Status s = stream.Connect(address.host, deadline); !s.ok()) {
    return result(Kind::kNoAnswer, "", s.message());
  }
  if (secret.empty()) return result(Kind::kMember, "", "connected (no secret to check)");
  absl::StatusOr<std::string> incarnation = ClientHandshake(stream, secret, deadline);
  if (!incarnation.ok()) {
    return result(absl::IsUnauthenticated(incarnation.status()) ? Kind::kNoMember : Kind::kNoAnswer,
                  "", incarnation.status().message());
  }
  return result(Kind::kMember, *std::move(incarnation), "a member answered");
}

}  // namespace tokenlake::transport
