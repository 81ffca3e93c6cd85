// Coordinator: the control process of a TokenLake cluster.
//
//   - the control plane of the pool: the coordinator owns the cluster's one lake::Lake (prefix
//     tree, heavy-hitter tracker, balancer, planner) over `lake_instances` instances, and serves
//     the engines' per-iteration calls over gRPC (service Lake: PlanIteration = match + plan +
//     admit, Commit, Release, and ReleaseAndPlan = an iteration's Release with the next one's
//     PlanIteration under one hold of the lake lock, so that an engine makes one round trip per
//     iteration; lake/control_plane.h; counted in tokenlake_lake_rpcs_total{call}). Every
//     instance's engine runs the lake's plans over the cluster-wide pool: queries go to remote
//     holders, KV is pulled or stored across processes on the instances' data-plane transports
//     (design note below);
//   - membership: instances Register and Heartbeat over gRPC (proto/tokenlake/v1/
//     tokenlake.proto); an instance without a heartbeat for `dead_after` is marked dead and
//     Lake::DropInstance removes its replicas (segments whose last copy it held leave the tree
//     with their subtrees), requests waiting on it fail over; a restarted instance rejoins empty
//     under its name, once its old incarnation is proven gone (incarnation.h: lease expired,
//     or its transport port no longer answers; ALREADY_EXISTS until then); an instance that
//     reports a broken transport (InstanceState.transport_error) gets no requests and is named
//     on /healthz. Every gRPC call carries a token made with the cluster secret
//     (call_auth.h). Register / Heartbeat replies carry the data-plane ports of the live
//     instances (peers), so that instances route attend / pull / store / free to each other;
//   - rebuild: after a coordinator restart the instances re-register with what they hold
//     (each segment with its parent and token count) and Lake::RestoreReplicas rebuilds the tree
//     (parents first; orphans are retried on heartbeats while restore_window lasts, then
//     freed);
//   - reconciliation on every heartbeat, from what changed (reconciler.h): an instance reports
//     the changes of what it holds since the report the coordinator acknowledged (a full list
//     after a gap), the coordinator keeps a view of each instance and where it disagrees with
//     the lake (kept up to date by both sides' changes, never by a walk of the tree), and
//     applies them in short batches under the lake's lock. Segments an instance holds that the
//     lake does not list are freed on the instance (reply free_segments; the instance frees
//     only copies it has not stored again since the view's change number); replicas the lake
//     lists that the instance does not hold over two heartbeats in a row are dropped from the
//     lake (Lake::DropReplica; never a pinned one; over four, Lake::LoseReplica);
//   - rebalancing: every rebalance_interval (and/or every rebalance_every_requests requests)
//     Lake::Rebalance runs and its actions are sent to the instances that carry them out
//     (replicate / move: the receiving instance pulls the KV from the source over the data
//     plane and stores it; a dropped copy is freed by reconciliation), so heavy hitters get
//     real replicas. Until the
//     receiver's heartbeat reports the new copy, plans that name it read from the source
//     instead, and the source keeps its copy (for a move it is freed afterwards by
//     reconciliation);
//   - routing: the computing instance of a request is the one the lake's plan for its prefill
//     names (GenPlans, not admitted), unless it is not live or busier than the least busy live
//     instance by more than balance_abs_threshold requests (then the least busy one); with
//     rotate_compute_instance, live instances take turns instead (forces cross-process traffic).
//     An instance gets requests only once every live instance has been sent its data port
//     (membership versions), so that every holder can answer it;
//   - the data path: the request (with a lake request id the coordinator assigns, unique across
//     instances, and a random correlation id) goes to the computing instance over the host
//     transport (TcpTransport, wrapped in a FaultTransport so tests can drop, delay or cut), with
//     a deadline; the coordinator dials every instance (authenticated with the cluster secret)
//     and accepts an instance's reply only on the connection it opened to that instance. An
//     instance that does not answer is excluded and the request fails over; an instance that
//     answers with an error (e.g. a holder of the plan died: unreachable or past its deadline) is
//     retried after retry_backoff x attempt (by then the dead holder is usually marked dead), up to
//     max_attempts within request_timeout. The coordinator releases the failed attempt's pins.
//     Generation is deterministic, so a retried request gets the same answer;
//   - the HTTP front end (http_front_end.h): the OpenAI-compatible API (openai_front_end.h:
//     POST /v1/completions, POST /v1/chat/completions, GET /v1/models; streamed answers come
//     from CompleteStreaming, and a client that goes away cancels its request on the
//     instance), GET /metrics (Prometheus text, from counters kept up to date: no walk of the
//     tree per scrape), GET /healthz. Bad input gets a 4xx with
//     OpenAI's error body naming the problem; slow, idle or too many clients and oversized
//     bodies are bounded (503 with Retry-After on overload, never a reset).
//
// Listeners are on 127.0.0.1 unless http_host / grpc_host say otherwise (beyond loopback only
// with TLS or allow_insecure); ports 0 mean "any free port" (see the accessors). With TLS, gRPC
// is mutual TLS with the cluster's identities and the coordinator dials the instances' transports
// under TLS too.
//
// The parts, each with its own contract, that this class wires together: membership.h (the
// member table and its life cycle), membership_service.h (Register / Heartbeat over gRPC),
// reconciler.h (the lake under its lock; instance reports reconciled with it), router.h (the
// computing instance), request_path.h (send, deadline, retry / failover, replies),
// rebalancer.h, lake_service.h (the Lake RPCs), http_front_end.h (the HTTP server; the route
// table is in coordinator.cc) and coordinator_metrics.h (/metrics and /healthz).
//
// Thread-safety: thread-safe. Shutdown (or the destructor) stops every thread.
#ifndef TOKENLAKE_SERVICE_COORDINATOR_H_
#define TOKENLAKE_SERVICE_COORDINATOR_H_

#include <cstdint>
#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "absl/types/span.h"
#include "tokenlake/balance/balancer.h"
#include "tokenlake/balance/heavy_hitter.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/plan/cost_model.h"
#include "tokenlake/sched/cost_model.h"
#include "tokenlake/service/api_keys.h"
#include "tokenlake/service/completion_api.h"
#include "tokenlake/service/grpc_credentials.h"
#include "tokenlake/service/leader_gate.h"
#include "tokenlake/service/protocol.h"
#include "tokenlake/service/router.h"
#include "tokenlake/tokenizer/tokenizer.h"
#include "tokenlake/transport/fault_transport.h"

namespace tokenlake::service {

struct CoordinatorOptions {
  // Request limits (vocabulary, context, max_tokens) checked before anything is routed.
  CompletionLimits limits;
  // The served model's tokenizer (text prompts, chat, stop sequences, EOS; its ids must be
  // < limits.vocab_size) and the id GET /v1/models lists; null = token-id prompts only
  // (openai_front_end.h).
  std::shared_ptr<const tokenizer::Tokenizer> tokenizer;
  std::string model_id = "tokenlake";
  // Tokens per segment and the segment-id namespace; instances must use the same.
  int32_t segment_tokens = 16;
  std::string namespace_name = "tokenlake";
  // The lake: number of instances (ids [0, lake_instances), in [1, kMaxInstances]; run that
  // many instances), slots per instance (instances must have at least as many), the model's
  // shape (plan costs; must validate) and the heavy-hitter / balancer knobs.
  int32_t lake_instances = 4;
  int32_t slots_per_instance = 1024;
  plan::ModelShape model{
      .num_layers = 1, .num_heads = 1, .num_kv_heads = 1, .head_dim = 1, .dtype_bytes = 4};
  // Heavy hitters: the lake's clock advances 1 ms per planned iteration, so half_life_us counts
  // iterations x 1000. The defaults suit a small cluster (replicate a prefix shared by a few
  // recent requests).
  balance::HeavyHitterOptions heavy_hitter{.half_life_us = 50'000,
                                           .heavy_fraction = 0.2,
                                           .replica_target_fraction = 0.2,
                                           .track_fraction = 0.01,
                                           .min_heavy_load = 0};
  balance::BalancerOptions balancer;
  // Run Lake::Rebalance every this often (zero = never) and/or after every this many served
  // requests (0 = never).
  absl::Duration rebalance_interval = absl::Seconds(1);
  int32_t rebalance_every_requests = 0;
  // Routing (router.h): live instances take turns computing (instead of the rule below).
  bool rotate_compute_instance = false;
  // Routing: the rule; kScheduler places each request as the elastic scheduler places a decode
  // (sched::PlaceDecode) under a decode iteration budget of decode_budget_share x slo_tpot_s
  // seconds (> 0; share in (0, 1]; the simulator's --slo-tpot and --tl-decode-budget, whose
  // defaults these are), with the iteration costs of `routing_model` on `routing_gpu` (the
  // model's shape and the instances' GPU profile, the JSON `tokenlake sim --model / --gpu`
  // read: sched/cost_model.h; routing_gpu.dense_ms must not be empty). kPlan (the default): the
  // lake's plan.
  RoutingRule routing = RoutingRule::kPlan;
  double slo_tpot_s = 0.2;
  double decode_budget_share = 0.5;
  sched::ModelSpec routing_model;
  sched::GpuProfile routing_gpu;
  // After a restart, segments an instance reports whose parent is unknown are kept (and retried
  // on its heartbeats) for this long, while other instances re-register; later they are freed.
  absl::Duration restore_window = absl::Seconds(5);
  // Listen addresses (0 = any free port). transport_port is not used: the coordinator
  // accepts no host-transport connections (it dials the instances and reads their replies on
  // those connections), and transport_port() is 0.
  std::string http_host = "127.0.0.1";
  int32_t http_port = 0;
  std::string grpc_host = "127.0.0.1";
  int32_t grpc_port = 0;
  int32_t transport_port = 0;
  // The cluster's TLS (grpc_credentials.h; none: the clear), and whether listening beyond
  // loopback without it is allowed.
  ClusterTls tls;
  bool allow_insecure = false;
  // With several coordinators under an election (leader_gate.h): start as a follower, acting
  // only once leader_gate()->Lead() is called. False: lead from the start (one coordinator).
  bool start_as_follower = false;
  // API keys of the HTTP front end (api_keys.h); null: open. /healthz is always open, /metrics
  // too when metrics_public.
  std::shared_ptr<const ApiKeys> api_keys;
  bool metrics_public = false;
  // The cluster secret (raw bytes; transport/cluster_secret.h). Non-empty: every gRPC call must
  // carry a call token made with it (call_auth.h; UNAUTHENTICATED otherwise) and every
  // host-transport connection is authenticated with it. Empty: neither is (a warning-worthy
  // setup, for tests and manual runs).
  std::string cluster_secret;
  // Membership: the heartbeat period asked of instances, and the silence after which an
  // instance is declared dead (> heartbeat_interval).
  absl::Duration heartbeat_interval = absl::Milliseconds(200);
  absl::Duration dead_after = absl::Seconds(1);
  // Deadline of one request (all attempts), and how long an attempt may go without word from
  // its instance (which reports every running request at least every second) before it fails
  // over.
  absl::Duration request_timeout = absl::Seconds(30);
  absl::Duration attempt_timeout = absl::Seconds(10);
  // Attempts per request, >= 1, and the pause before retrying an attempt that an instance
  // answered with an error (x the attempt number).
  int32_t max_attempts = 4;
  absl::Duration retry_backoff = absl::Milliseconds(250);
  // Routing (see the file comment).
  int32_t balance_abs_threshold = 2;
  // The HTTP front end's bounds (http_front_end.h): largest request body after decoding (413
  // beyond); from a request's first byte, its headers within http_header_timeout and all of it
  // within http_read_timeout (408); keep-alive connections idle longer are closed; complete
  // requests waiting for a worker, connections and request bytes held (503 with Retry-After
  // beyond); the listen backlog.
  int64_t max_body_bytes = int64_t{1} << 20;
  absl::Duration http_header_timeout = absl::Seconds(2);
  absl::Duration http_read_timeout = absl::Seconds(10);
  absl::Duration http_idle_timeout = absl::Seconds(5);
  int32_t http_max_queued_requests = 256;
  int32_t http_max_connections = 1024;
  int64_t http_max_buffered_bytes = int64_t{64} << 20;
  int32_t http_listen_backlog = 4096;
  // HTTP worker threads (handlers; a request reaches one only once it has arrived whole), >= 1.
  int32_t http_threads = 32;
  // The gRPC server's bounds (grpc_listener.h): new connections handed to it at most this many
  // a second on average with bursts of this many (beyond that closed at once; established
  // connections are never affected), its threads and its memory.
  double grpc_max_new_connections_per_s = 500;
  int32_t grpc_new_connection_burst = 256;
  int32_t grpc_max_threads = 256;
  int64_t grpc_memory_bytes = int64_t{1} << 30;
  // Faults injected on the coordinator's host transport (tests).
  transport::FaultTransport::Options faults;

  // The options of the coordinator's lake: lake_instances, segment_tokens, slots_per_instance,
  // model, heavy_hitter and balancer above; tree nodes reserved for every slot.
  lake::LakeOptions ToLakeOptions() const;
};

class Coordinator {
 public:
  // Starts the gRPC server, the host transport, the HTTP server and the membership reaper.
  // Errors: InvalidArgument naming a bad option (e.g. a tokenizer whose ids the vocabulary
  // does not cover); Unavailable when a port cannot be bound.
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

  // Receives a streamed request's new tokens, in order, each token once; returns false to
  // cancel the request (its client went away, or the caller matched a stop sequence).
  using TokenSink = std::function<bool(absl::Span<const int32_t> tokens)>;
  // Complete, streaming: with request.stream the computing instance reports every iteration's
  // tokens and `sink` gets them as they come; without it, once at the end. Failover: a retried
  // attempt regenerates the same tokens (same seed); those `sink` already got are checked equal
  // and skipped (Internal error if a retry diverged). When `sink` returns false the instance is
  // told to stop (it releases the request's pins and pool slots) and the result has
  // cancelled = true with the tokens `sink` got.
  // `cached_tokens` is set from the instance's first report. Errors: as Complete.
  absl::StatusOr<CompletionResult> CompleteStreaming(const CompletionRequest& request,
                                                     const TokenSink& sink);

  // The /metrics page.
  std::string MetricsText() const;
  // Instances currently alive.
  int32_t LiveInstances() const;
  // Distinct segments in the cluster-wide prefix tree.
  int64_t DistinctSegments() const;
  // The instances holding a copy of the lake's segment
  // `segment` (empty when unknown). For tests.
  std::vector<int32_t> ReplicasOf(uint64_t segment) const;
  // Runs Lake::Rebalance now and sends the actions to the instances. Returns the number of
  // actions. Errors: the lake's.
  absl::StatusOr<int64_t> RebalanceNow();
  // Whether this coordinator acts (leader_gate.h); the election drives it. Never null.
  LeaderGate* leader_gate();
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
