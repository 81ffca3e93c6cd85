// SocketStream: one TCP connection's bytes, in the clear or under TLS, for the host transport
// (tcp_transport.h): reads with deadlines, whole writes, and the addresses to connect to and
// listen on (IPv4 and IPv6, by name or literal).
//
// TLS (TlsContext): TLS 1.3 with mutual authentication against the cluster CA (tls.h): the
// acceptor requires and verifies the dialler's certificate, and the dialler verifies that the
// acceptor's certificate names the host it dialled (its DNS name or IP address). The socket is
// non-blocking under TLS; one mutex serialises the TLS engine, and it is never held while
// waiting for the network, so that a reader and a writer of one connection never wait for each
// other while both directions are full.
//
// Thread-safety: a SocketStream may be read by one thread while another writes (writes must be
// serialised by the caller); Close may be called from any thread. TlsContext is immutable and
// thread-safe.
#ifndef TOKENLAKE_TRANSPORT_SOCKET_STREAM_H_
#define TOKENLAKE_TRANSPORT_SOCKET_STREAM_H_

#include <cstddef>
#include <cstdint>
#include <memory>
#include <string>

#include "absl/base/thread_annotations.h"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/time.h"
#include "tokenlake/transport/tls.h"

// OpenSSL's types, kept out of this header.
struct ssl_ctx_st;
struct ssl_st;

namespace tokenlake::transport {

// Where a peer listens: a DNS name or an IPv4 / IPv6 literal (without brackets), and a port.
struct HostPort {
  std::string host = "127.0.0.1";
  int32_t port = 0;

  // "host:port", with brackets around an IPv6 literal.
  std::string ToString() const;
  friend bool operator==(const HostPort&, const HostPort&) = default;
};

// Parses "HOST:PORT", "[IPV6]:PORT" or, when `default_port` >= 0, also a bare "HOST" / "[IPV6]".
// Errors: InvalidArgument naming the text.
absl::StatusOr<HostPort> ParseHostPort(const std::string& text, int32_t default_port = -1);

// Whether `host` is a loopback address or "localhost" (no resolution: literals and that name).
bool IsLoopbackHost(const std::string& host);

// The cluster's TLS configuration for the transport: built once from an identity.
class TlsContext {
 public:
  // Errors: InvalidArgument when OpenSSL refuses the identity's PEM text.
  static absl::StatusOr<std::shared_ptr<const TlsContext>> Create(const TlsIdentity& identity);
  ~TlsContext();
  TlsContext(const TlsContext&) = delete;
  TlsContext& operator=(const TlsContext&) = delete;

  ssl_ctx_st* server() const { return server_; }
  ssl_ctx_st* client() const { return client_; }

 private:
  TlsContext() = default;
  ssl_ctx_st* server_ = nullptr;
  ssl_ctx_st* client_ = nullptr;
};

class SocketStream {
 public:
  enum class Io { kOk, kEof, kTimeout, kError };

  // Takes ownership of a connected socket. `tls` null: the clear.
  SocketStream(int fd, std::shared_ptr<const TlsContext> tls);
  ~SocketStream();
  SocketStream(const SocketStream&) = delete;
  SocketStream& operator=(const SocketStream&) = delete;

  int fd() const { return fd_; }
  bool tls() const { return tls_ != nullptr; }

  // The TLS handshake, as acceptor or as dialler of `peer_host` (whose certificate must name it),
  // by `deadline`; a no-op in the clear. Errors: Unauthenticated saying what failed
  // (certificate not signed by the cluster CA, wrong name, no certificate, not TLS at all),
  // DeadlineExceeded.
  absl::Status Accept(absl::Time deadline);
  absl::Status Connect(const std::string& peer_host, absl::Time deadline);

  // Waits until bytes can be read (or the peer hung up) or `deadline` passes (InfiniteFuture:
  // no limit; Shutdown wakes it).
  Io WaitReadable(absl::Time deadline);
  // Reads exactly `size` bytes by `deadline`; *got = the bytes read, also on failure.
  Io ReadExact(void* data, size_t size, absl::Time deadline, size_t* got);
  Io ReadExact(void* data, size_t size, absl::Time deadline);
  // Writes all of [data, data + size). False on error, a closed peer, or no progress for
  // `stall_timeout` (a slow peer that keeps reading is not cut off).
  bool WriteAll(const void* data, size_t size, absl::Duration stall_timeout);

  // Shuts the socket down in both directions (wakes a blocked reader); the fd stays open until
  // destruction.
  void Shutdown();

 private:
  Io WaitFor(short events, absl::Time deadline);

  const int fd_;
  const std::shared_ptr<const TlsContext> tls_;
  absl::Mutex ssl_mu_;
  ssl_st* ssl_ ABSL_GUARDED_BY(ssl_mu_) = nullptr;
};

// Connects to `address` (each resolved address in turn) by `deadline`; TCP_NODELAY on.
// Returns the socket. Errors: Unavailable naming the address and the reason; ResourceExhausted
// (errno kept) when no socket can be opened for lack of descriptors or memory. On failure,
// `*refused` (when given) says whether every address refused the connection (ECONNREFUSED:
// nothing listens there), as opposed to a timeout or any other failure.
absl::StatusOr<int> ConnectTcp(const HostPort& address, absl::Time deadline,
                               bool* refused = nullptr);

// Binds and listens on `address` (port 0: any free port) with `backlog`. Returns the socket and
// sets *port to the bound port. Errors: Unavailable naming the address and the reason.
absl::StatusOr<int> ListenTcp(const HostPort& address, int backlog, int32_t* port);

}  // namespace tokenlake::transport

#endif  // TOKENLAKE_TRANSPORT_SOCKET_STREAM_H_
