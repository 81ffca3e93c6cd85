// InstanceServer: one TokenLake instance process's serving loop. It registers with the
// coordinator over gRPC (with every segment it holds, each with its parent and token count),
// heartbeats its state with what changed in what it holds since the report the coordinator
// acknowledged (holdings_report.h: the store numbers its stores and frees; a full list when the
// coordinator asks for one) and serves the coordinator's generate messages that arrive over the
// host transport (TcpTransport).
//
// Its part of the pool (design: coordinator.h): once registered (its instance id and the lake's
// size known), it builds its data plane: an engine::InstancePool that hosts only this instance
// (its segment store, its server thread, its driver endpoint) on a second TcpTransport (the
// data port it reports), the other instances being remote endpoints routed with the peers the
// coordinator sends in every Register / Heartbeat reply; and an engine::Engine over that pool
// and a RemoteControlPlane (the coordinator's lake over gRPC), computing every request on this
// instance. Requests are served with continuous batching: each generate message is submitted
// to the engine's iteration loop as it arrives (iteration_loop.h) and answered when its request
// finishes; every iteration plans its whole batch in one PlanBatch RPC to the cluster-wide
// lake: cached segments held here are read locally, the others by sending the queries to their
// holder or pulling their KV, and new segments are stored where the lake says, possibly on
// another instance.
//
// Streaming and cancellation: a generate message with `stream` gets a GenerateProgress message
// (tag kGenerateProgressTag) with its new tokens after every iteration that produced some,
// then the usual reply; a CancelGenerate (tag kCancelTag) drops the request from the engine
// (IterationLoop::Cancel: its lake pins and KV tail are released) and no reply is sent.
//
// Heartbeat replies may also name segments to free (the lake no longer lists them here; a copy
// stored again after the change number the coordinator decided at stays);
// rebalance orders (host-transport tag kRebalanceTag) make it copy a segment from another
// instance (pull + store here), move it (copy, then free at the source) or drop it.
//
// The coordinator dials this instance's host transport; replies go back on that connection.
//
// After a coordinator restart its heartbeat is refused (NOT_FOUND) and it registers again with
// everything it holds, which rebuilds the coordinator's prefix tree. A request whose deadline
// has passed when it is dequeued is answered DeadlineExceeded without being computed. If a
// later registration gives it another id or lake size, it rebuilds its data plane empty (the
// requests it was running are answered Unavailable).
//
// Thread-safety: thread-safe; Shutdown (or the destructor) stops its threads.
#ifndef TOKENLAKE_SERVICE_INSTANCE_SERVER_H_
#define TOKENLAKE_SERVICE_INSTANCE_SERVER_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/service/grpc_credentials.h"
#include "tokenlake/service/instance_backend.h"

namespace tokenlake::service {

struct InstanceServerOptions {
  // Stable name (a restarted instance reuses its coordinator slot), non-empty.
  std::string name = "instance-0";
  // Instance id asked of the coordinator (-1 = any free one).
  int32_t preferred_id = -1;
  // The coordinator's gRPC address: host (name or address) and port in [1, 65535]. Port 0: no
  // fixed address, allowed only with locate_coordinator (the instance registers nowhere until
  // that names a leader).
  std::string coordinator_host = "127.0.0.1";
  int32_t coordinator_port = 0;
  // With several coordinators under an election: where the leader is now (e.g. read from etcd),
  // asked before every registration and whenever the coordinator stops answering; the instance
  // follows it (registers with the new leader, its lake calls go there). A fixed address above
  // is used only while this names none. Null: the fixed address above, which is then required.
  std::function<absl::StatusOr<transport::HostPort>()> locate_coordinator;
  // Where this instance's transports (host and data plane) listen: a host name or IPv4 / IPv6
  // literal ("0.0.0.0" / "::": every interface), and the host transport's port (0 = any free
  // port; the data plane's is always chosen freely).
  std::string listen_host = "127.0.0.1";
  int32_t transport_port = 0;
  // The host other processes dial to reach those transports; empty: listen_host, or, when that
  // is a wildcard, the address the coordinator sees this instance's calls come from.
  std::string advertise_host;
  // The cluster's TLS (grpc_credentials.h; none: the clear), and whether listening beyond
  // loopback without it is allowed.
  ClusterTls tls;
  bool allow_insecure = false;
  // Segment size and namespace (must match the coordinator's).
  int32_t segment_tokens = 16;
  std::string namespace_name = "tokenlake";
  // Segment slots of this instance's store, >= 1.
  int32_t slots = 1024;
  // Element type of the stored KV.
  attention::KvDtype kv_dtype = attention::KvDtype::kFloat32;
  // How often to retry registration while the coordinator is unreachable.
  absl::Duration register_retry = absl::Milliseconds(100);
  // Deadline of one Register call: the base plus the allowance per segment reported, since the
  // coordinator restores every reported segment into its prefix tree inside the call (about
  // 2 us a segment in a release build, 65 us under AddressSanitizer). A deadline shorter than
  // the restore would make the instance register again and again. See RegisterDeadline.
  absl::Duration register_timeout = absl::Seconds(1);
  absl::Duration register_timeout_per_segment = absl::Microseconds(100);
  // How long the engine waits for another instance's data-plane reply (attend, pull, store);
  // a holder that died after accepting the message costs the request this much before it is
  // retried.
  absl::Duration data_timeout = absl::Seconds(2);
  // Tokens the CPU engine computes per iteration (HostBackendOptions::max_batch_tokens).
  int64_t max_batch_tokens = 2048;
  // Every request this instance runs is reported to the coordinator at least this often (its
  // new tokens, or none: it still runs), so that the coordinator's attempt timeout measures
  // silence, not a long request's length. Well under the coordinator's attempt timeout.
  absl::Duration progress_interval = absl::Seconds(1);
  // Deadline of one call to the coordinator's lake.
  absl::Duration control_timeout = absl::Seconds(5);
  // The cluster secret (raw bytes; transport/cluster_secret.h), the coordinator's: it
  // authenticates this instance's gRPC calls and its transports' connections. Empty = none.
  std::string cluster_secret;
};

// The deadline of a Register call that reports `segments` segments: options.register_timeout
// + segments * options.register_timeout_per_segment, at most 10 minutes.
absl::Duration RegisterDeadline(const InstanceServerOptions& options, int64_t segments);

// What an instance serves with: the slot layout of its store (reported to the coordinator),
// the longest sequence it computes (prompt + new tokens; 0 = no limit) and the factory of its
// backend (instance_backend.h), called at each registration.
struct InstanceBackendSpec {
  attention::KvSlotLayout layout;
  int64_t context_tokens = 0;
  BackendFactory factory;
};

class InstanceServer {
 public:
  // The CPU engine over a host pool (HostBackendFactory). `model` is borrowed and must outlive
  // the server. Starts the transport and the threads; registration proceeds in the background
  // (see registered()).
  // Errors: InvalidArgument naming a bad option; errors creating the engine or transport.
  static absl::StatusOr<std::unique_ptr<InstanceServer>> Create(
      const engine::LlamaModel* model, const InstanceServerOptions& options);
  // An instance serving with the backends `spec` makes (of `options`, slots and
  // segment_tokens must be the backend's). Errors: as above; InvalidArgument without a factory.
  static absl::StatusOr<std::unique_ptr<InstanceServer>> Create(
      InstanceBackendSpec spec, const InstanceServerOptions& options);
  ~InstanceServer();
  InstanceServer(const InstanceServer&) = delete;
  InstanceServer& operator=(const InstanceServer&) = delete;

  int32_t transport_port() const;
  // The id the coordinator gave (-1 before the first registration).
  int32_t instance_id() const;
  // Registrations so far (grows after a coordinator restart).
  int64_t registrations() const;
  // Requests computed so far.
  int64_t requests_served() const;
  // Requests the coordinator cancelled here, and requests running now (submitted to the
  // engine, not yet answered; updated after every iteration).
  int64_t requests_cancelled() const;
  int64_t requests_running() const;
  // Segments this instance holds.
  int64_t segments() const;

  void Shutdown();

  class Impl;

 private:
  explicit InstanceServer(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_INSTANCE_SERVER_H_
