// TcpTransport: the host transport between processes, over TCP on loopback (127.0.0.1).
//
// Each process owns one TcpTransport. The endpoint space [0, num_endpoints) is shared by all the
// processes of a cluster; each endpoint is *hosted* by one process. A transport Receives only for
// the endpoints it hosts (Options::local_endpoints) and Sends to any endpoint: to a local one
// through an in-memory mailbox, to a remote one over a TCP connection to the process that hosts
// it, whose address is set with SetPeer (typically learnt from a control-plane registration).
//
// Wire format (one frame per message, integers little-endian):
//   u32 magic 'TLK1' | i32 from | i32 to | u32 tag | u64 correlation_id | u64 payload_bytes
//   | payload
// A frame with a bad magic, an endpoint that is not hosted here, or a payload over
// max_payload_bytes closes its connection (the sender sees its next Send fail); it never
// crashes the receiver.
//
// Capabilities: not in_process, ordered (one connection per destination endpoint, writes
// serialised), NOT reliable: a message sent to a process that dies or a connection that breaks
// is lost (Send fails with Unavailable when the loss is visible at send time). Callers that need
// an answer wait with a deadline.
//
// Listening: Create binds 127.0.0.1 port 0 (or Options::port) and reports the port via port().
// Only loopback addresses are used.
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
    // Port to listen on (127.0.0.1); 0 = any free port (see port()).
    int32_t port = 0;
    // How long a Send may block connecting or writing before failing with Unavailable.
    absl::Duration io_timeout = absl::Seconds(5);
  };

  // Binds and starts listening. Errors: InvalidArgument naming a bad option, Unavailable when
  // the socket cannot be bound.
  static absl::StatusOr<std::unique_ptr<TcpTransport>> Create(const Options& options);

  ~TcpTransport() override;
  TcpTransport(const TcpTransport&) = delete;
  TcpTransport& operator=(const TcpTransport&) = delete;

  // The port this transport listens on (127.0.0.1).
  int32_t port() const { return port_; }

  // Routes messages for the remote endpoint `endpoint` to the process listening on
  // 127.0.0.1:`port` (replacing a previous route and dropping its connection).
  // Errors: InvalidArgument (endpoint out of range or hosted here; port not in [1, 65535]).
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

  // Frames dropped by the reader because they were malformed (bad magic, size, endpoint).
  int64_t malformed_frames() const { return malformed_frames_.load(); }
  // Messages and payload bytes sent to remote endpoints (counted when written).
  int64_t remote_messages_sent() const { return remote_messages_.load(); }
  int64_t remote_bytes_sent() const { return remote_bytes_.load(); }

 private:
  struct Mailbox {
    absl::Mutex mu;
    std::deque<Message> queue ABSL_GUARDED_BY(mu);
    bool shut_down ABSL_GUARDED_BY(mu) = false;
  };
  struct Peer {
    absl::Mutex mu;  // serialises writes (keeps one sender's frames in order)
    int32_t port ABSL_GUARDED_BY(mu) = 0;
    int fd ABSL_GUARDED_BY(mu) = -1;
  };
  struct Connection {
    int fd = -1;
    std::thread reader;
  };

  explicit TcpTransport(const Options& options);
  bool InRange(InstanceId id) const {
    return id.valid() && id.value() >= 0 && id.value() < options_.num_endpoints;
  }
  bool IsLocal(InstanceId id) const { return InRange(id) && local_[id.value()]; }
  absl::Status Listen();
  void AcceptLoop();
  void ReadLoop(int fd);
  absl::Status Deliver(Message message);
  // Writes one frame to the peer (connecting if needed). REQUIRES: peer.mu held.
  absl::Status WriteFrameLocked(Peer& peer, InstanceId to, const Message& message)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(peer.mu);

  const Options options_;
  std::vector<bool> local_;
  std::vector<std::unique_ptr<Mailbox>> mailboxes_;
  std::vector<std::unique_ptr<Peer>> peers_;
  int listen_fd_ = -1;
  int32_t port_ = 0;
  std::atomic<bool> shut_down_{false};
  std::thread acceptor_;
  absl::Mutex conn_mu_;
  std::vector<std::unique_ptr<Connection>> connections_ ABSL_GUARDED_BY(conn_mu_);
  std::atomic<int64_t> malformed_frames_{0};
  std::atomic<int64_t> remote_messages_{0};
  std::atomic<int64_t> remote_bytes_{0};
};

}  // namespace tokenlake::transport

#endif  // TOKENLAKE_TRANSPORT_TCP_TRANSPORT_H_
