// TcpTransport: the host transport between processes, over TCP (IPv4 or IPv6), in the clear on
// loopback or under mutual TLS across hosts.
//
// Each process owns one TcpTransport. The endpoint space [0, num_endpoints) is shared by all the
// processes of a cluster; each endpoint is *hosted* by one process. A transport Receives only for
// the endpoints it hosts (Options::local_endpoints) and Sends to any endpoint: to a local one
// through an in-memory mailbox, to a remote one over a TCP connection to the process that hosts
// it, whose address (host and port) is set with SetPeer (typically learnt from a control-plane
// registration), or,
// for an endpoint listed in Options::answer_on_incoming, over the connection that endpoint opened
// to us (its latest one): such an endpoint is never dialled, so its process need not listen.
//
// Connections are bidirectional. On a connection this transport dialled for endpoint E, frames
// are accepted only from E (a reply is believed only on the connection opened to its sender);
// on an accepted connection, from any endpoint in range.
//
// TLS (Options::tls set): every connection is TLS 1.3 with both ends' certificates verified
// against the cluster CA (tls.h, socket_stream.h); the dialler also checks that the acceptor's
// certificate names the host it dialled. A connection that fails it is closed and counted in
// auth_failures.
//
// Authentication (Options::secret non-empty): every connection (inside TLS, when on) starts with a
// challenge-response handshake in both directions, HMAC-SHA256 under the cluster secret
// (cluster_secret.h); the acceptor's proof also names its incarnation (incarnation()):
//   acceptor -> dialler: u32 magic 'TLH1' | 16-byte nonce Na
//   dialler -> acceptor: 16-byte nonce Nd | HMAC(secret, "client" | Na | Nd)
//   acceptor -> dialler: 16-byte incarnation I | HMAC(secret, "server" | Na | Nd | I)
// A connection that fails it (or takes longer than handshake_timeout) is closed before any frame
// is read. TCP on loopback cannot be injected into by another unprivileged process, and TLS
// protects frames across hosts, so frames are not MACed one by one.
//
// Accepted connections hold no thread until they are authenticated: in the clear the acceptor
// runs the handshakes itself (one poll over the connections in their handshake), so a flood of
// connections that send garbage or hang up costs an accept and a close each; under TLS each
// accepted connection has its own reader thread from the start. Connections in their handshake
// and authenticated ones together are at most max_connections; when a new connection finds
// them full, the oldest connection still in its handshake is closed to make room (the new one
// is closed at once only when every connection is authenticated), so that connections which
// never complete a handshake cannot keep honest ones out for long.
//
// Wire format (one frame per message, integers little-endian):
//   u32 magic 'TLK1' | i32 from | i32 to | u32 tag | u64 correlation_id | u64 payload_bytes
//   | payload
// A frame with a bad magic, an endpoint that is not hosted here, or a payload over
// max_payload_bytes closes its connection (the sender sees its next Send fail); it never
// crashes the receiver. The reader grows the payload buffer as bytes arrive (an announced size
// allocates nothing), closes an accepted connection that stays idle for idle_timeout, and any
// connection whose frame does not complete within frame_timeout of its first byte. Finished
// connections are closed and their reader threads joined (within about 100 ms). When accepting
// fails for lack of descriptors or memory (EMFILE, ENFILE, ENOBUFS, ENOMEM) the acceptor backs
// off (10 ms doubling to 1 s) instead of spinning, and Health() reports it.
//
// Capabilities: not in_process, ordered (one connection per destination endpoint, writes
// serialised), NOT reliable: a message sent to a process that dies or a connection that breaks
// is lost (Send fails with Unavailable when the loss is visible at send time). Callers that need
// an answer wait with a deadline.
//
// Listening: Create binds Options::listen_host (default 127.0.0.1), port Options::port (0: any
// free port), and reports the port via port() (0 when Options::listen is false). A listen host
// beyond loopback is refused without TLS unless Options::allow_insecure.
//
// Thread-safety: thread-safe (see transport.h).
#ifndef TOKENLAKE_TRANSPORT_TCP_TRANSPORT_H_
#define TOKENLAKE_TRANSPORT_TCP_TRANSPORT_H_

#include <atomic>
#include <cstdint>
#include <deque>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"
#include "absl/synchronization/mutex.h"
#include "tokenlake/transport/socket_stream.h"
#include "tokenlake/transport/transport.h"

namespace tokenlake::transport {

class TcpTransport final : public Transport {
 public:
  struct Options {
    // Size of the shared endpoint space, >= 1.
    int32_t num_endpoints = 1;
    // Endpoints hosted (received) by this process; each in [0, num_endpoints), no duplicates.
    std::vector<InstanceId> local_endpoints;
    // Largest payload accepted by Send and by the frame reader, in bytes, in [0, 2^40].
    int64_t max_payload_bytes = int64_t{256} << 20;
    // Address to listen on: a host name or IPv4 / IPv6 literal ("0.0.0.0" / "::" for every
    // interface), and a port (0 = any free port; see port()).
    std::string listen_host = "127.0.0.1";
    int32_t port = 0;
    // The cluster's TLS context (socket_stream.h); null: connections are in the clear.
    std::shared_ptr<const TlsContext> tls;
    // Allows listening beyond loopback without TLS (anyone who can reach the port can then
    // connect; with a secret they still cannot pass the handshake, but can read the frames).
    bool allow_insecure = false;
    // How long a Send may block connecting or writing before failing with Unavailable.
    absl::Duration io_timeout = absl::Seconds(5);
    // The cluster secret (raw bytes; cluster_secret.h); empty = connections are not
    // authenticated (every peer must then use none).
    std::string secret;
    // Whether to accept connections at all (false: port() is 0; replies come back on the
    // connections this transport dials).
    bool listen = true;
    // Remote endpoints that are answered on the connection they opened to this transport
    // (never dialled; SetPeer refuses them). Each in range and not local.
    std::vector<InstanceId> answer_on_incoming;
    // An accepted connection without a frame for this long is closed (> 0). Senders redial a
    // connection idle for half of it, so that they do not write into one being closed.
    absl::Duration idle_timeout = absl::Seconds(60);
    // A frame (header and payload) must complete within this long of its first byte (> 0).
    absl::Duration frame_timeout = absl::Seconds(30);
    // The authentication handshake must complete within this long (> 0).
    absl::Duration handshake_timeout = absl::Seconds(2);
    // Accepted connections open at once, >= 1; beyond it new ones are closed at once.
    int32_t max_connections = 1024;
  };

  // Binds and starts listening. Errors: InvalidArgument naming a bad option, Unavailable when
  // the socket cannot be bound.
  static absl::StatusOr<std::unique_ptr<TcpTransport>> Create(const Options& options);

  ~TcpTransport() override;
  TcpTransport(const TcpTransport&) = delete;
  TcpTransport& operator=(const TcpTransport&) = delete;

  // The port this transport listens on (127.0.0.1).
  int32_t port() const { return port_; }

  // Routes messages for the remote endpoint `endpoint` to the process listening on `address`
  // (replacing a previous route and dropping its connection; resolved when dialled).
  // Errors: InvalidArgument (endpoint out of range or hosted here; no host; port not in
  // [1, 65535]).
  absl::Status SetPeer(InstanceId endpoint, const HostPort& address);
  // The same on 127.0.0.1.
  absl::Status SetPeer(InstanceId endpoint, int32_t port);
  // Forgets the route of `endpoint` (later Sends to it fail with Unavailable).
  void ClearPeer(InstanceId endpoint);

  Capabilities capabilities() const override;
  int32_t num_endpoints() const override { return options_.num_endpoints; }
  // Errors as transport.h; Unavailable also when `to` has no route or its connection fails
  // (the message names the endpoint and the port).
  absl::Status Send(Message message) override;
  // Errors as transport.h; InvalidArgument also when `self` is not hosted here.
  absl::StatusOr<Message> Receive(InstanceId self, absl::Duration timeout) override;
  void Shutdown() override;

  // Random bytes naming this transport, new on every Create: the incarnation of the process
  // that listens on port(). Diallers and Probe learn it from the handshake (with a secret).
  const std::string& incarnation() const { return incarnation_; }

  // What Probe found at an address.
  struct ProbeResult {
    enum class Kind {
      // A member of the cluster listens there: it completed the TLS and secret handshakes.
      kMember,
      // A definite answer that no member listens there: the connection was refused (nothing
      // listens on the port), or the listener answered the handshake as no member would (bytes
      // that are not its challenge, or a proof made with another secret).
      kNoMember,
      // Nothing definite: no answer in time, a connection closed before the handshake
      // completed (what a listener over its connection limit does), a TLS failure.
      kNoAnswer,
    };
    Kind kind = Kind::kNoAnswer;
    // kMember with a secret: the listener's incarnation(); empty otherwise.
    std::string incarnation;
    // What was seen (for messages).
    std::string detail;
  };
  // Connects to `address` and runs the TLS (with `tls`) and secret handshakes as a Send would,
  // then hangs up; blocks for at most `timeout`.
  static ProbeResult Probe(const HostPort& address, const std::string& secret,
                           std::shared_ptr<const TlsContext> tls, absl::Duration timeout);
  // The same on 127.0.0.1 without TLS.
  static ProbeResult Probe(int32_t port, const std::string& secret, absl::Duration timeout);

  // OK, or Unavailable saying why this transport could not accept or dial a connection for
  // lack of local resources (descriptors, memory) within the last 2 seconds.
  absl::Status Health() const;

  // Frames dropped by the reader because they were malformed (bad magic, size, endpoint, or
  // from an endpoint other than the one a dialled connection was opened to).
  int64_t malformed_frames() const { return malformed_frames_.load(); }
  // Connections that failed the authentication handshake.
  int64_t auth_failures() const { return auth_failures_.load(); }
  // Accepted connections closed because they stayed idle or a frame did not complete in time.
  int64_t timed_out_connections() const { return timed_out_.load(); }
  // Accepted connections closed at once because max_connections were open and authenticated,
  // or closed in their handshake to make room for a new one.
  int64_t refused_connections() const { return refused_.load(); }
  // Failed accept() calls (any reason).
  int64_t accept_errors() const { return accept_errors_.load(); }
  // Connections open now (accepted and dialled, readers not yet joined).
  int64_t open_connections() const;
  // The last reason a connection was dropped (malformed frame, failed handshake, timeout), for
  // logs and tests; empty if none.
  std::string last_error() const;
  // Messages and payload bytes sent to remote endpoints (counted when written).
  int64_t remote_messages_sent() const { return remote_messages_.load(); }
  int64_t remote_bytes_sent() const { return remote_bytes_.load(); }

 private:
  struct Mailbox {
    absl::Mutex mu;
    std::deque<Message> queue ABSL_GUARDED_BY(mu);
    bool shut_down ABSL_GUARDED_BY(mu) = false;
  };
  // One TCP connection, dialled or accepted, with its reader thread. The fd is closed only by
  // the reaper after the reader was joined, so it is never reused while anyone may touch it:
  // writers check `closed` under write_mu first.
  struct Conn {
    // Closed (destroyed) only by the reaper or Shutdown, after the reader was joined.
    std::unique_ptr<SocketStream> stream;
    bool dialled = false;
    // Dialled: the endpoint it was opened to (frames are accepted only from it).
    InstanceId expected_from;
    // Its handshakes are done (or there are none); set before its reader reads frames.
    std::atomic<bool> authenticated{false};
    // When it was accepted (absl::ToUnixNanos; accepted connections).
    int64_t accepted_ns = 0;
    std::thread reader;
    std::atomic<bool> finished{false};  // the reader returned
    // Last frame read or written (absl::ToUnixNanos), for the idle timeouts.
    std::atomic<int64_t> last_activity_ns{0};
    absl::Mutex write_mu;  // serialises writes (keeps one sender's frames in order)
    bool closed ABSL_GUARDED_BY(write_mu) = false;
  };
  struct Peer {
    absl::Mutex mu;                                                  // serialises dialling
    HostPort address ABSL_GUARDED_BY(mu) = {.host = "", .port = 0};  // port 0: no route
    std::shared_ptr<Conn> conn ABSL_GUARDED_BY(mu);
  };

  explicit TcpTransport(const Options& options);
  bool InRange(InstanceId id) const {
    return id.valid() && id.value() >= 0 && id.value() < options_.num_endpoints;
  }
  bool IsLocal(InstanceId id) const { return InRange(id) && local_[id.value()]; }
  bool AnsweredOnIncoming(InstanceId id) const { return InRange(id) && incoming_[id.value()]; }
  absl::Status Listen();
  // Accepts connections and, in the clear with a secret, runs their handshakes (tcp_transport.cc
  // has the pending handshake's state).
  void AcceptLoop();
  struct PendingHandshake;
  // Takes a connection just accepted: counts it against max_connections (closing the oldest
  // connection still in its handshake, or this one, when they are full), then starts its
  // handshake in `pending` (in the clear with a secret) or its reader thread. False once
  // shut down.
  bool TakeAccepted(int fd, std::deque<PendingHandshake>& pending);
  // Reads what arrived for `p`'s handshake (poll said readable); true when it has ended, by
  // success (the connection then has its reader) or failure (it is closed).
  bool AdvanceHandshake(PendingHandshake& p);
  // Joins and closes the connections whose reader has returned.
  void Reap();
  void ReadLoop(const std::shared_ptr<Conn>& conn);
  // Handshake (accepted, with a secret), then frames until the connection ends; a drop is
  // counted and noted in last_error.
  void ReadFrames(const std::shared_ptr<Conn>& conn);
  absl::Status Deliver(Message message);
  // Starts `conn`'s reader and registers it. Errors: Unavailable (shut down).
  absl::Status Adopt(std::shared_ptr<Conn> conn);
  // Dials `address` for `to` (handshakes included). REQUIRES: peer.mu held.
  absl::StatusOr<std::shared_ptr<Conn>> Dial(const HostPort& address, InstanceId to);
  // Writes one frame on `conn` (`where` names the peer in errors); closes it on failure.
  absl::Status WriteFrame(Conn& conn, InstanceId to, const Message& message,
                          const std::string& where);
  static void CloseConn(Conn& conn);
  void NoteResourceError(const char* what, int err);
  void NoteDrop(std::atomic<int64_t>& counter, const std::string& why);

  const Options options_;
  const std::string incarnation_;
  std::vector<bool> local_;
  std::vector<bool> incoming_;
  std::vector<std::unique_ptr<Mailbox>> mailboxes_;
  std::vector<std::unique_ptr<Peer>> peers_;
  int listen_fd_ = -1;
  int32_t port_ = 0;
  std::atomic<bool> shut_down_{false};
  std::thread acceptor_;
  mutable absl::Mutex conn_mu_;
  std::vector<std::shared_ptr<Conn>> conns_ ABSL_GUARDED_BY(conn_mu_);
  // answer_on_incoming endpoints: the accepted connection each last sent a frame on.
  std::vector<std::shared_ptr<Conn>> incoming_routes_ ABSL_GUARDED_BY(conn_mu_);
  std::atomic<int64_t> malformed_frames_{0};
  std::atomic<int64_t> auth_failures_{0};
  std::atomic<int64_t> timed_out_{0};
  std::atomic<int64_t> refused_{0};
  std::atomic<int64_t> accept_errors_{0};
  std::atomic<int64_t> remote_messages_{0};
  std::atomic<int64_t> remote_bytes_{0};
  mutable absl::Mutex error_mu_;
  std::string last_error_ ABSL_GUARDED_BY(error_mu_);
  absl::Time last_resource_error_ ABSL_GUARDED_BY(error_mu_) = absl::InfinitePast();
  std::string resource_error_ ABSL_GUARDED_BY(error_mu_);
};

}  // namespace tokenlake::transport

#endif  // TOKENLAKE_TRANSPORT_TCP_TRANSPORT_H_
