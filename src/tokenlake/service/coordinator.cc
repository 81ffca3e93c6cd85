#include "tokenlake/service/coordinator.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/service/call_auth.h"
#include "tokenlake/service/coordinator_metrics.h"
#include "tokenlake/service/grpc_listener.h"
#include "tokenlake/service/http_front_end.h"
#include "tokenlake/service/lake_service.h"
#include "tokenlake/service/membership.h"
#include "tokenlake/service/membership_service.h"
#include "tokenlake/service/openai_front_end.h"
#include "tokenlake/service/rebalancer.h"
#include "tokenlake/service/reconciler.h"
#include "tokenlake/service/request_path.h"
#include "tokenlake/service/router.h"
#include "tokenlake/transport/tcp_transport.h"

namespace tokenlake::service {
namespace {

absl::Status CheckOptions(const CoordinatorOptions& o) {
  auto bad = [](const std::string& m) { return absl::InvalidArgumentError("Coordinator: " + m); };
  for (const auto& [what, host] :
       {std::pair<std::string, std::string>{"HTTP", o.http_host}, {"gRPC", o.grpc_host}}) {
    if (absl::Status s = CheckExposure("Coordinator: " + what, host, o.tls, o.allow_insecure);
        !s.ok()) {
      return s;
    }
  }
  if (o.limits.vocab_size < 1) return bad("limits.vocab_size must be >= 1");
  if (o.limits.context_tokens < 2) return bad("limits.context_tokens must be >= 2");
  if (o.limits.max_tokens_limit < 1) return bad("limits.max_tokens_limit must be >= 1");
  if (o.segment_tokens < 1) return bad("segment_tokens must be >= 1");
  for (int32_t p : {o.http_port, o.grpc_port, o.transport_port}) {
    if (p < 0 || p > 65535) return bad(absl::StrFormat("port %d outside [0, 65535]", p));
  }
  if (o.heartbeat_interval <= absl::ZeroDuration()) return bad("heartbeat_interval must be > 0");
  if (o.dead_after <= o.heartbeat_interval) return bad("dead_after must exceed heartbeat_interval");
  if (o.request_timeout <= absl::ZeroDuration() || o.attempt_timeout <= absl::ZeroDuration()) {
    return bad("request_timeout and attempt_timeout must be > 0");
  }
  if (o.max_attempts < 1) return bad("max_attempts must be >= 1");
  if (o.balance_abs_threshold < 0) return bad("balance_abs_threshold must be >= 0");
  if (!(o.slo_tpot_s > 0) || !(o.decode_budget_share > 0 && o.decode_budget_share <= 1)) {
    return bad(
        absl::StrFormat("slo_tpot_s must be > 0 and decode_budget_share in (0, 1], got %g and %g",
                        o.slo_tpot_s, o.decode_budget_share));
  }
  if (o.routing_gpu.dense_ms.empty()) return bad("routing_gpu.dense_ms must not be empty");
  if (o.routing_model.num_kv_heads < 1) return bad("routing_model.num_kv_heads must be >= 1");
  if (o.lake_instances < 1 || o.lake_instances > kMaxInstances) {
    return bad(
        absl::StrFormat("lake_instances %d outside [1, %d]", o.lake_instances, kMaxInstances));
  }
  if (o.slots_per_instance < 1) return bad("slots_per_instance must be >= 1");
  if (o.rebalance_every_requests < 0) return bad("rebalance_every_requests must be >= 0");
  if (o.retry_backoff < absl::ZeroDuration()) return bad("retry_backoff must be >= 0");
  if (o.max_body_bytes < 64) return bad("max_body_bytes must be >= 64");
  if (o.http_threads < 1) return bad("http_threads must be >= 1");
  if (o.http_header_timeout <= absl::ZeroDuration() ||
      o.http_read_timeout <= absl::ZeroDuration() || o.http_idle_timeout <= absl::ZeroDuration()) {
    return bad("http_header_timeout, http_read_timeout and http_idle_timeout must be > 0");
  }
  if (o.http_max_queued_requests < 1 || o.http_max_connections < 1 || o.http_listen_backlog < 1) {
    return bad("http_max_queued_requests, http_max_connections, http_listen_backlog must be >= 1");
  }
  if (o.grpc_max_threads < 4 || o.grpc_memory_bytes < (int64_t{64} << 20)) {
    return bad("grpc_max_threads must be >= 4 and grpc_memory_bytes >= 64 MiB");
  }
  if (!(o.grpc_max_new_connections_per_s > 0) || o.grpc_new_connection_burst < 1) {
    return bad("grpc_max_new_connections_per_s must be > 0 and grpc_new_connection_burst >= 1");
  }
  if (o.http_max_buffered_bytes < o.max_body_bytes) {
    return bad("http_max_buffered_bytes must be >= max_body_bytes");
  }
  return absl::OkStatus();
}

}  // namespace

// Owns the parts and wires them; the parts hold borrowed pointers to each other, so members are
// declared in the order they are built and destroyed in reverse (Shutdown stops every thread
// first).
class Coordinator::Impl {
 public:
  explicit Impl(const CoordinatorOptions& options)
      : options_(options),
        epoch_(std::random_device{}() | (uint64_t{std::random_device{}()} << 32)),
        started_(absl::Now()),
        auth_(options.cluster_secret),
        membership_(options.lake_instances, options.dead_after),
        reconciler_(&lake_, {.num_instances = options.lake_instances,
                             .started = started_,
                             .restore_window = options.restore_window}),
        routing_cost_(options.routing_model, options.routing_gpu, sched::InterconnectSpec{}),
        routing_batch_cost_(routing_cost_, options.model),
        router_({.num_instances = options.lake_instances,
                 .balance_abs_threshold = options.balance_abs_threshold,
                 .rotate = options.rotate_compute_instance,
                 .rule = options.routing,
                 .decode_budget_s = options.slo_tpot_s * options.decode_budget_share,
                 .cost = &routing_batch_cost_},
                &lake_, &membership_),
        lake_service_(&lake_, &membership_, &reconciler_, &auth_),
        gate_(options.start_as_follower ? LeaderGate::State::kFollower
                                        : LeaderGate::State::kLeader) {
    lake_service_.set_gate(&gate_);
  }

  ~Impl() { Shutdown(); }

  absl::Status Start() {
    auto lk = lake::Lake::Create(options_.ToLakeOptions(), &lake_.clock);
    if (!lk.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("Coordinator: ", lk.status().message()));
    }
    {
      absl::MutexLock lock(&lake_.mu);
      lake_.lake = std::move(*lk);
      // Every change of the lake's placements reaches the reconciler's view (it runs under the
      // lake's lock, which every user of the lake holds).
      lake_.lake->SetReplicaObserver([this](SegmentId segment, InstanceId instance, bool added) {
        reconciler_.OnLakeChange(segment, instance, added);
      });
    }
    // The coordinator accepts no transport connections: it dials each instance and believes an
    // instance's replies only on the connection it opened to it.
    auto tcp = transport::TcpTransport::Create({.num_endpoints = kMaxInstances + 1,
                                                .local_endpoints = {InstanceId(0)},
                                                .tls = options_.tls.context,
                                                .secret = options_.cluster_secret,
                                                .listen = false});
    if (!tcp.ok()) return tcp.status();
    tcp_ = std::move(*tcp);
    auto fault = transport::FaultTransport::Create(tcp_.get(), options_.faults);
    if (!fault.ok()) return fault.status();
    fault_ = std::move(*fault);

    rebalancer_ = std::make_unique<Rebalancer>(
        Rebalancer::Options{.interval = options_.rebalance_interval,
                            .every_requests = options_.rebalance_every_requests},
        &lake_, &membership_, &reconciler_,
        [this](int32_t instance, const v1::RebalanceOrder& order) { SendOrder(instance, order); });
    request_path_ = std::make_unique<RequestPath>(
        RequestPath::Options{.limits = options_.limits,
                             .segment_tokens = options_.segment_tokens,
                             .salt = index::NamespaceSalt(options_.namespace_name),
                             .request_timeout = options_.request_timeout,
                             .attempt_timeout = options_.attempt_timeout,
                             .max_attempts = options_.max_attempts,
                             .retry_backoff = options_.retry_backoff,
                             // Request ids differ across coordinator incarnations (an instance may
                             // still finish a request of the previous one).
                             .first_request_id = ((epoch_ & 0xffff) << 40) + 1},
        &lake_, &membership_, &router_, fault_.get(), [this] { rebalancer_->RequestServed(); });
    membership_service_ = std::make_unique<MembershipService>(
        MembershipService::Options{.namespace_name = options_.namespace_name,
                                   .segment_tokens = options_.segment_tokens,
                                   .slots_per_instance = options_.slots_per_instance,
                                   .heartbeat_interval = options_.heartbeat_interval,
                                   .dead_after = options_.dead_after,
                                   .cluster_secret = options_.cluster_secret,
                                   .epoch = epoch_,
                                   .tls = options_.tls.context},
        &lake_, &membership_, &reconciler_, &auth_, tcp_.get(),
        [this](int32_t id, const absl::Status& s) { request_path_->FailPendingOn(id, s); });

    if (absl::Status s = StartGrpc(); !s.ok()) return s;
    auto front_end = OpenAiFrontEnd::Create(
        {.limits = options_.limits, .model_id = options_.model_id, .tokenizer = options_.tokenizer},
        [this](const CompletionRequest& r, const OpenAiFrontEnd::TokenSink& sink) {
          return request_path_->Complete(r, sink);
        },
        [this](int http_status) { request_path_->CountAnswer(http_status); });
    if (!front_end.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Coordinator: ", front_end.status().message()));
    }
    openai_ = std::move(*front_end);
    if (!openai_->chat_unavailable().empty()) {
      std::fprintf(stderr, "tokenlake coordinator: %s\n", openai_->chat_unavailable().c_str());
    }
    auto http = HttpFrontEnd::Start({.host = options_.http_host,
                                     .port = options_.http_port,
                                     .max_body_bytes = options_.max_body_bytes,
                                     .header_timeout = options_.http_header_timeout,
                                     .read_timeout = options_.http_read_timeout,
                                     .idle_timeout = options_.http_idle_timeout,
                                     .threads = options_.http_threads,
                                     .max_queued_requests = options_.http_max_queued_requests,
                                     .max_connections = options_.http_max_connections,
                                     .max_buffered_bytes = options_.http_max_buffered_bytes,
                                     .listen_backlog = options_.http_listen_backlog},
                                    Routes());
    if (!http.ok()) {
      return absl::UnavailableError(absl::StrCat("Coordinator: ", http.status().message()));
    }
    http_ = std::move(*http);
    request_path_->Start();
    reaper_ = std::thread([this] { ReapLoop(); });
    return absl::OkStatus();
  }

  // The gRPC server (membership and the Lake RPCs) on a port that GrpcListener accepts for it
  // (grpc_listener.h says why), with its resources bounded: threads and memory (a
  // ResourceQuota), streams per connection, time to a client's first HTTP/2 settings, idle
  // connections closed, dead peers found by keepalive pings.
  absl::Status StartGrpc() {
    const transport::HostPort grpc_at{.host = options_.grpc_host, .port = options_.grpc_port};
    auto listener = GrpcListener::Listen({.address = grpc_at,
                                          .tls = options_.tls.get() != nullptr,
                                          .max_new_per_s = options_.grpc_max_new_connections_per_s,
                                          .burst = options_.grpc_new_connection_burst});
    if (!listener.ok()) {
      return absl::UnavailableError(absl::StrFormat("Coordinator: cannot serve gRPC on %s: %s",
                                                    grpc_at.ToString(),
                                                    listener.status().message()));
    }
    grpc_listener_ = std::move(*listener);
    grpc::ServerBuilder builder;
    auto acceptor = builder.experimental().AddExternalConnectionAcceptor(
        grpc::ServerBuilder::experimental_type::ExternalConnectionType::FROM_FD,
        GrpcServerCredentials(options_.tls.get()));
    grpc::ResourceQuota quota("tokenlake-coordinator");
    quota.SetMaxThreads(options_.grpc_max_threads);
    quota.Resize(static_cast<size_t>(options_.grpc_memory_bytes));
    builder.SetResourceQuota(quota);
    builder.SetMaxReceiveMessageSize(kMaxGrpcMessageBytes);
    builder.SetMaxSendMessageSize(kMaxGrpcMessageBytes);
    builder.AddChannelArgument(GRPC_ARG_MAX_CONCURRENT_STREAMS, 64);
    builder.AddChannelArgument(GRPC_ARG_SERVER_HANDSHAKE_TIMEOUT_MS, 5'000);
    builder.AddChannelArgument(GRPC_ARG_MAX_CONNECTION_IDLE_MS, 300'000);
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIME_MS, 30'000);
    builder.AddChannelArgument(GRPC_ARG_KEEPALIVE_TIMEOUT_MS, 10'000);
    membership_service_->set_gate(&gate_);
    builder.RegisterService(membership_service_.get());
    builder.RegisterService(&lake_service_);
    grpc_server_ = builder.BuildAndStart();
    if (grpc_server_ == nullptr) {
      return absl::UnavailableError(
          absl::StrFormat("Coordinator: cannot serve gRPC on %s", grpc_at.ToString()));
    }
    grpc_port_ = grpc_listener_->port();
    grpc_listener_->Start(std::move(acceptor));
    return absl::OkStatus();
  }

  void Shutdown() {
    if (stopping_.exchange(true)) return;
    if (http_ != nullptr) http_->Shutdown();
    // No connection may be handed to a server that is shut down (gRPC would neither serve nor
    // close it).
    if (grpc_listener_ != nullptr) grpc_listener_->Shutdown();
    if (grpc_server_ != nullptr) grpc_server_->Shutdown(absl::ToChronoTime(absl::Now()));
    if (request_path_ != nullptr) {
      request_path_->FailAll(absl::UnavailableError("coordinator shutting down"));
    }
    if (fault_ != nullptr) fault_->Shutdown();
    if (request_path_ != nullptr) request_path_->Join();
    if (reaper_.joinable()) reaper_.join();
    if (rebalancer_ != nullptr) rebalancer_->Stop();
  }

  // The HTTP front end's routes: the one place to add an endpoint.
  std::vector<HttpRoute> Routes() {
    // The OpenAI-compatible API (openai_front_end.h).
    std::vector<HttpRoute> routes = openai_->Routes();
    routes.push_back({"GET", "/metrics", [this](const HttpRequest&, HttpResponse* res) {
                        res->content_type = "text/plain; version=0.0.4";
                        res->body = MetricsText();
                      }});
    routes.push_back({"GET", "/healthz", [this](const HttpRequest&, HttpResponse* res) {
                        const HealthReport h =
                            CoordinatorHealth(membership_.Snapshot(), tcp_->Health());
                        res->status = h.http_status;
                        res->body = h.json;
                      }});
    // API keys (api_keys.h): every route but /healthz (and /metrics when public) needs one.
    if (options_.api_keys != nullptr) {
      routes = WithApiKeys(std::move(routes), options_.api_keys, options_.metrics_public);
    }
    // Only the leader serves requests; a follower sends clients to the leader (leader_gate.h).
    for (HttpRoute& route : routes) {
      if (route.path.rfind("/v1/", 0) != 0) continue;
      route.handler = [this, inner = std::move(route.handler)](const HttpRequest& req,
                                                               HttpResponse* res) {
        if (gate_.leading()) return inner(req, res);
        const std::string leader = gate_.leader_http();
        const absl::Status why = absl::UnavailableError(
            leader.empty() ? "this coordinator is not the leader and no leader is known yet"
                           : "this coordinator is not the leader; the leader is at " + leader);
        if (!leader.empty()) {
          // 307 keeps the method and body (OpenAI clients and `curl -L` follow it).
          res->status = 307;
          res->headers.emplace_back("Location", leader + req.path);
        } else {
          res->status = 503;
          res->headers.emplace_back("Retry-After", "1");
        }
        res->body = OpenAiErrorJson(why);
      };
    }
    return routes;
  }

  // Rebalance orders go straight to the TCP transport, not through the fault injector: a lost
  // order is repaired by heartbeat reconciliation, but the request-path fault tests should see
  // only their own faults.
  void SendOrder(int32_t instance, const v1::RebalanceOrder& order) {
    tcp_->Send(ProtocolMessage(InstanceId(0), InstanceId(instance + 1), kRebalanceTag, 0, order))
        .IgnoreError();
  }

  // Declares silent instances dead: their copies leave the lake and the requests waiting on
  // them fail over. Nothing may stay listed on an instance that is not running either (e.g. a
  // Commit that fell back to it).
  void ReapLoop() {
    while (!stopping_.load()) {
      absl::SleepFor(std::min(options_.heartbeat_interval / 2, absl::Milliseconds(50)));
      absl::MutexLock lake_lock(&lake_.mu);
      const Membership::Reaped reaped = membership_.Reap(absl::Now());
      for (int32_t i : reaped.not_alive) {
        if (lake_.lake->prefix_tree().SegmentsOn(InstanceId(i)) > 0) {
          lake_.lake->DropInstance(InstanceId(i)).IgnoreError();
        }
      }
      for (const auto& [id, why] : reaped.died) {
        request_path_->FailPendingOn(id, absl::UnavailableError(why));
      }
    }
  }

  // Every part's counters, kept up to date where they change: no walk of the tree nor of the
  // heavy-hitter tracker under the lake's lock (Stats without the scan is O(instances)).
  CoordinatorSnapshot Snapshot() const {
    CoordinatorSnapshot s;
    lake::LakeStats stats;
    {
      absl::MutexLock lake_lock(&lake_.mu);
      stats = lake_.lake->Stats(/*scan_heavy_hitters=*/false);
    }
    SetLakeGauges(std::move(stats), &s);
    s.reconcile = reconciler_.stats();
    s.members = membership_.Snapshot();
    s.deaths = membership_.deaths();
    s.rejoins = membership_.rejoins();
    s.requests = request_path_->stats();
    for (int c = 0; c < LakeService::kNumCalls; ++c) {
      s.lake_calls[static_cast<size_t>(c)] = lake_service_.calls(static_cast<LakeService::Call>(c));
    }
    s.plan_iterations = lake_service_.plan_iterations();
    s.refused_unauthenticated = auth_.refused();
    s.refused_live_name = membership_service_->refused_registrations();
    s.rebalance_actions = rebalancer_->actions();
    s.routing_overrides = router_.overrides();
    s.routes = router_.decisions();
    if (http_ != nullptr) s.http = http_->stats();
    s.grpc_connections = grpc_listener_->stats();
    return s;
  }

  std::string MetricsText() const { return CoordinatorMetricsText(Snapshot()); }

  int64_t DistinctSegments() const {
    absl::MutexLock lock(&lake_.mu);
    return lake_.lake->prefix_tree().num_segments();
  }

  std::vector<int32_t> ReplicasOf(uint64_t segment) const {
    absl::MutexLock lock(&lake_.mu);
    std::vector<int32_t> out;
    const index::PrefixTree::Node* node = lake_.lake->prefix_tree().Find(SegmentId(segment));
    if (node != nullptr) {
      for (InstanceId r : node->replicas) out.push_back(r.value());
    }
    return out;
  }

  const CoordinatorOptions options_;
  const uint64_t epoch_;
  const absl::Time started_;
  CallAuthenticator auth_;
  GuardedLake lake_;
  Membership membership_;
  Reconciler reconciler_;
  // The router's cost model (CoordinatorOptions::routing_model, routing_gpu).
  const sched::CostModel routing_cost_;
  const sched::CostModelBatchCost routing_batch_cost_;
  Router router_;
  LakeService lake_service_;
  LeaderGate gate_;
  int grpc_port_ = 0;
  std::unique_ptr<transport::TcpTransport> tcp_;
  std::unique_ptr<transport::FaultTransport> fault_;
  std::unique_ptr<Rebalancer> rebalancer_;
  std::unique_ptr<RequestPath> request_path_;
  std::unique_ptr<MembershipService> membership_service_;
  std::unique_ptr<GrpcListener> grpc_listener_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<OpenAiFrontEnd> openai_;  // its routes borrow it: declared before http_
  std::unique_ptr<HttpFrontEnd> http_;
  std::thread reaper_;
  std::atomic<bool> stopping_{false};
};

lake::LakeOptions CoordinatorOptions::ToLakeOptions() const {
  lake::LakeOptions lo;
  lo.num_instances = lake_instances;
  lo.segment_tokens = segment_tokens;
  lo.slots_per_instance = slots_per_instance;
  lo.model = model;
  lo.heavy_hitter = heavy_hitter;
  lo.heavy_hitter.num_instances = lake_instances;
  lo.balancer = balancer;
  // A segment takes at least one slot, so the tree never holds more nodes than the lake has
  // slots: reserving them up front means its table never rehashes (a pause of tens of ms at a
  // million segments) under the lock that plans need.
  lo.reserve_segments = int64_t{lake_instances} * slots_per_instance;
  return lo;
}

absl::StatusOr<std::unique_ptr<Coordinator>> Coordinator::Create(
    const CoordinatorOptions& options) {
  if (absl::Status s = CheckOptions(options); !s.ok()) return s;
  auto impl = std::make_unique<Impl>(options);
  if (absl::Status s = impl->Start(); !s.ok()) return s;
  return std::unique_ptr<Coordinator>(new Coordinator(std::move(impl)));
}

Coordinator::Coordinator(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
Coordinator::~Coordinator() { Shutdown(); }
int32_t Coordinator::http_port() const { return impl_->http_->port(); }
int32_t Coordinator::grpc_port() const { return impl_->grpc_port_; }
int32_t Coordinator::transport_port() const { return impl_->tcp_->port(); }
absl::StatusOr<CompletionResult> Coordinator::Complete(const CompletionRequest& request) {
  return impl_->request_path_->Complete(request);
}
absl::StatusOr<CompletionResult> Coordinator::CompleteStreaming(const CompletionRequest& request,
                                                                const TokenSink& sink) {
  return impl_->request_path_->Complete(request, sink);
}
std::string Coordinator::MetricsText() const { return impl_->MetricsText(); }
int32_t Coordinator::LiveInstances() const { return impl_->membership_.ReadyCount(); }
int64_t Coordinator::DistinctSegments() const { return impl_->DistinctSegments(); }
transport::FaultTransport* Coordinator::faults() { return impl_->fault_.get(); }
LeaderGate* Coordinator::leader_gate() { return &impl_->gate_; }
std::vector<int32_t> Coordinator::ReplicasOf(uint64_t segment) const {
  return impl_->ReplicasOf(segment);
}
absl::StatusOr<int64_t> Coordinator::RebalanceNow() { return impl_->rebalancer_->RebalanceNow(); }
void Coordinator::Shutdown() { impl_->Shutdown(); }

}  // namespace tokenlake::service
