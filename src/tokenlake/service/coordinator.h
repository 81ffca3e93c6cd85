// Coordinator: the control process of a TokenLake cluster.
//
//   - membership: instances Register and Heartbeat over gRPC (proto/tokenlake/v1/
//     tokenlake.proto); an instance without a heartbeat for `dead_after` is marked dead, its
//     segments leave the cluster-wide prefix tree and the requests waiting on it fail over;
//     a restarted instance rejoins (empty) under its name;
//   - the cluster-wide prefix tree (SegmentDirectory), rebuilt from the instances' reports, so a
//     coordinator restart loses nothing the instances still hold;
//   - routing: each request goes to the live instance holding the longest cached prefix of its
//     prompt, unless that instance is busier than the least busy one by more than
//     balance_abs_threshold requests; a heavy-hitter prefix (its first segment seen in
//     heavy_hitter_min_requests requests) is replicated by routing to an instance that lacks it
//     until heavy_hitter_replicas live instances hold it (replication by recompute);
//   - the data path: the request goes to the chosen instance over the host transport
//     (TcpTransport, wrapped in a FaultTransport so tests can drop, delay or cut), with a
//     deadline; a lost instance or a missed deadline fails over to another instance, up to
//     max_attempts; generation is deterministic, so a retried request gets the same answer;
//   - the HTTP front end (cpp-httplib): POST /v1/completions, GET /metrics (Prometheus text),
//     GET /healthz. Bad input gets a 4xx with a JSON error naming the problem.
//
// Everything listens on 127.0.0.1 only; ports 0 mean "any free port" (see the accessors).
//
// Thread-safety: thread-safe. Shutdown (or the destructor) stops every thread.
#ifndef TOKENLAKE_SERVICE_COORDINATOR_H_
#define TOKENLAKE_SERVICE_COORDINATOR_H_

#include <cstdint>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tokenlake/service/completion_api.h"
#include "tokenlake/transport/fault_transport.h"

namespace tokenlake::service {

// Instance ids are [0, kMaxInstances); instance i hosts host-transport endpoint i + 1 and the
// coordinator hosts endpoint 0.
inline constexpr int32_t kMaxInstances = 64;
// Host-transport message tags.
inline constexpr uint32_t kGenerateRequestTag = 1;
inline constexpr uint32_t kGenerateReplyTag = 2;

struct CoordinatorOptions {
  // Request limits (vocabulary, context, max_tokens) checked before anything is routed.
  CompletionLimits limits;
  // Tokens per segment and the segment-id namespace; instances must use the same.
  int32_t segment_tokens = 16;
  std::string namespace_name = "tokenlake";
  // Ports on 127.0.0.1 (0 = any free port).
  int32_t http_port = 0;
  int32_t grpc_port = 0;
  int32_t transport_port = 0;
  // Membership: the heartbeat period asked of instances, and the silence after which an
  // instance is declared dead (> heartbeat_interval).
  absl::Duration heartbeat_interval = absl::Milliseconds(200);
  absl::Duration dead_after = absl::Seconds(1);
  // Deadline of one request (all attempts) and of one attempt.
  absl::Duration request_timeout = absl::Seconds(30);
  absl::Duration attempt_timeout = absl::Seconds(10);
  // Attempts per request (instances tried), >= 1.
  int32_t max_attempts = 3;
  // Routing (see the file comment).
  int32_t balance_abs_threshold = 2;
  int32_t heavy_hitter_min_requests = 4;
  int32_t heavy_hitter_replicas = 2;
  // HTTP limits: largest request body (413 beyond) and how long a request may take to arrive.
  int64_t max_body_bytes = int64_t{1} << 20;
  absl::Duration http_read_timeout = absl::Seconds(2);
  // HTTP worker threads (each slow client holds one until http_read_timeout), >= 1.
  int32_t http_threads = 32;
  // Faults injected on the coordinator's host transport (tests).
  transport::FaultTransport::Options faults;
};

class Coordinator {
 public:
  // Starts the gRPC server, the host transport, the HTTP server and the membership reaper.
  // Errors: InvalidArgument naming a bad option; Unavailable when a port cannot be bound.
  static absl::StatusOr<std::unique_ptr<Coordinator>> Create(const CoordinatorOptions& options);
  ~Coordinator();
  Coordinator(const Coordinator&) = delete;
  Coordinator& operator=(const Coordinator&) = delete;

  int32_t http_port() const;
  int32_t grpc_port() const;
  int32_t transport_port() const;

  // Serves one validated request (what POST /v1/completions does after parsing).
  // Errors: InvalidArgument (the request does not fit the limits), Unavailable (no live
  // instance, or every attempt lost its instance), DeadlineExceeded (request_timeout passed),
  // or the instance's own error (e.g. ResourceExhausted when its pool is full of pins).
  absl::StatusOr<CompletionResult> Complete(const CompletionRequest& request);

  // The /metrics page.
  std::string MetricsText() const;
  // Instances currently alive.
  int32_t LiveInstances() const;
  // Distinct segments in the cluster-wide prefix tree.
  int64_t DistinctSegments() const;
  // The fault injector on the host transport (never null while running).
  transport::FaultTransport* faults();

  // Stops the servers and threads; pending requests fail with Unavailable. Idempotent.
  void Shutdown();

  class Impl;

 private:
  explicit Coordinator(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_COORDINATOR_H_
