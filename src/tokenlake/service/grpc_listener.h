// GrpcListener: the coordinator's gRPC port, accepted by a thread of its own and handed to the
// gRPC server one connection at a time (grpc::experimental::ExternalConnectionAcceptor).
//
// Why not gRPC's own listener: the gRPC library this project builds against accepts in a loop
// until the listen queue is empty, on whichever of its threads polled the listening socket, and
// runs the queued work of that poll (other connections' reads included) only after the loop.
// One client connecting and closing as fast as it can keeps the queue from ever emptying: in
// the in-process cluster test a single such thread at ~4,000 connections/s held a heartbeat
// call for 3-5 s, declared the instances dead, and left ~12,000 accepted descriptors waiting.
// Here the accept loop takes at most a batch per wake-up and gRPC sees only what passed these
// checks:
//   - a connection's first bytes must be what a gRPC client sends first: the HTTP/2 client
//     preface ("PRI * HTTP/2.0...") in the clear, a TLS handshake record under TLS. Anything
//     else is closed without reaching gRPC, and so is a connection that sent only part of them
//     within `first_bytes_timeout` (the oldest waiting one is closed when `max_waiting` wait).
//     One that sent nothing by then goes to gRPC (a gRPC client reconnecting after its server
//     died may wait for the server to speak first), which closes it if its HTTP/2 settings
//     never come;
//   - connections handed to gRPC: at most `max_new_per_s` a second on average with bursts of
//     `burst`; beyond that a connection is closed at once (gRPC clients reconnect with backoff),
//     so a flood of well-formed connections costs the server a bounded share of its time.
// Established connections are never touched: an instance's channel, made once, keeps its calls
// flowing whatever new connections do.
//
// Thread-safety: thread-safe. Stats may be read at any time.
#ifndef TOKENLAKE_SERVICE_GRPC_LISTENER_H_
#define TOKENLAKE_SERVICE_GRPC_LISTENER_H_

#include <grpcpp/server_builder.h>

#include <atomic>
#include <cstdint>
#include <memory>
#include <thread>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tokenlake/transport/socket_stream.h"

namespace tokenlake::service {

struct GrpcListenerOptions {
  // Where to listen (port 0: any free port) and the listen backlog.
  transport::HostPort address;
  int32_t backlog = 4096;
  // Whether clients speak TLS (the first bytes are a TLS record) or the clear (the HTTP/2
  // client preface).
  bool tls = false;
  // A connection must send its first bytes within this; at most max_waiting wait at once.
  absl::Duration first_bytes_timeout = absl::Milliseconds(250);
  int32_t max_waiting = 256;
  // Connections handed to gRPC: this many a second on average, bursts of `burst`.
  double max_new_per_s = 500;
  int32_t burst = 256;
};

class GrpcListener {
 public:
  // Binds and listens. Errors: InvalidArgument naming a bad option; Unavailable when the
  // address cannot be bound (naming it).
  static absl::StatusOr<std::unique_ptr<GrpcListener>> Listen(const GrpcListenerOptions& options);
  ~GrpcListener();
  GrpcListener(const GrpcListener&) = delete;
  GrpcListener& operator=(const GrpcListener&) = delete;

  // The bound port.
  int32_t port() const { return port_; }

  // Starts accepting; connections that pass go to `acceptor` (ServerBuilder::experimental().
  // AddExternalConnectionAcceptor of the server to serve them, which must be started or start
  // soon: gRPC closes connections handed to a server not yet started). REQUIRES: called once.
  void Start(std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor> acceptor);

  struct Stats {
    // Handed to gRPC.
    int64_t admitted = 0;
    // Closed here: first bytes not a gRPC client's, none in time (or pushed out of the waiting
    // set), over the rate.
    int64_t not_grpc = 0;
    int64_t timed_out = 0;
    // Handed to gRPC after saying nothing within first_bytes_timeout (not in `admitted`; in
    // `over_rate` instead when over the rate).
    int64_t silent = 0;
    int64_t over_rate = 0;
    // accept() failures (e.g. out of descriptors; the loop backs off).
    int64_t accept_errors = 0;
  };
  Stats stats() const;

  // Stops accepting and closes the listening socket and the waiting connections (connections
  // already handed to gRPC are the server's). Idempotent.
  void Shutdown();

 private:
  struct Waiting;
  GrpcListener(const GrpcListenerOptions& options, int fd, int32_t port, int wake_read,
               int wake_write);
  void Loop();
  // Reads what `w` sent so far; true when it is decided (handed over or closed).
  bool Advance(Waiting& w);
  void HandOver(Waiting& w, bool silent);
  bool TakeToken();

  const GrpcListenerOptions options_;
  const int listen_fd_;
  const int32_t port_;
  const int wake_read_;
  const int wake_write_;
  std::unique_ptr<grpc::experimental::ExternalConnectionAcceptor> acceptor_;
  std::thread thread_;
  std::atomic<bool> stopping_{false};
  // The token bucket (the loop's thread only).
  double tokens_ = 0;
  absl::Time refilled_;
  std::atomic<int64_t> admitted_{0};
  std::atomic<int64_t> not_grpc_{0};
  std::atomic<int64_t> timed_out_{0};
  std::atomic<int64_t> silent_{0};
  std::atomic<int64_t> over_rate_{0};
  std::atomic<int64_t> accept_errors_{0};
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_GRPC_LISTENER_H_
