#include "tokenlake/service/coordinator.h"

#include <grpcpp/grpcpp.h>
#include <httplib.h>

#include <algorithm>
#include <array>
#include <atomic>
#include <cstdio>
#include <cstring>
#include <map>
#include <optional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/lake/prompt.h"
#include "tokenlake/service/call_auth.h"
#include "tokenlake/service/incarnation.h"
#include "tokenlake/service/lake_rpc.h"
#include "tokenlake/service/metrics.h"
#include "tokenlake/service/openai_api.h"
#include "tokenlake/service/openai_front_end.h"
#include "tokenlake/transport/cluster_secret.h"
#include "tokenlake/transport/tcp_transport.h"
#include "tokenlake/v1/tokenlake.grpc.pb.h"

namespace tokenlake::service {
namespace {

std::vector<double> LatencyBoundsSeconds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
}

struct Member {
  std::string name;
  bool registered = false;
  bool alive = false;
  int32_t transport_port = 0;
  // Data-plane port (0 until the instance built its data plane): routable when alive and > 0.
  int32_t data_port = 0;
  // Membership versions (Impl::membership_version_): the one at which this instance became
  // routable with its current data port, and the latest one it was sent the peers of.
  int64_t since_version = 0;
  int64_t seen_version = 0;
  // Replicas the lake lists on the instance that its last heartbeats did not report, with the
  // number of heartbeats in a row that missed them.
  absl::flat_hash_map<SegmentId, int32_t> missing;
  // Reported segments registration could not restore yet (orphans), retried on heartbeats
  // while the coordinator's restore_window lasts.
  absl::flat_hash_set<SegmentId> pending_restore;
  v1::InstanceTraffic traffic;
  absl::Time last_heartbeat;
  int64_t in_flight = 0;
  int64_t routed = 0;
  int64_t used_slots = 0;
  int64_t capacity_slots = 0;
  int64_t slot_bytes = 0;
  int64_t incarnations = 0;
  int64_t cancelled = 0;  // as the instance last reported
  int64_t running = 0;
  // Non-empty while the instance reports that its transport cannot accept or dial.
  std::string transport_error;
};

struct Pending {
  int32_t instance = -1;
  bool done = false;
  absl::Status status;
  v1::GenerateReply reply;
  // A streamed request's progress reports not yet taken by its waiter.
  std::vector<v1::GenerateProgress> progress;
};

absl::Status CheckOptions(const CoordinatorOptions& o) {
  auto bad = [](const std::string& m) { return absl::InvalidArgumentError("Coordinator: " + m); };
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
  if (o.lake_instances < 1 || o.lake_instances > kMaxInstances) {
    return bad(
        absl::StrFormat("lake_instances %d outside [1, %d]", o.lake_instances, kMaxInstances));
  }
  if (o.slots_per_instance < 1) return bad("slots_per_instance must be >= 1");
  if (o.rebalance_every_requests < 0) return bad("rebalance_every_requests must be >= 0");
  if (o.retry_backoff < absl::ZeroDuration()) return bad("retry_backoff must be >= 0");
  if (o.max_body_bytes < 64) return bad("max_body_bytes must be >= 64");
  if (o.http_threads < 1) return bad("http_threads must be >= 1");
  return absl::OkStatus();
}

}  // namespace

class Coordinator::Impl final : public v1::Coordinator::Service {
 public:
  explicit Impl(const CoordinatorOptions& options)
      : options_(options),
        salt_(index::NamespaceSalt(options.namespace_name)),
        members_(kMaxInstances),
        latency_(LatencyBoundsSeconds()),
        epoch_(std::random_device{}() | (uint64_t{std::random_device{}()} << 32)),
        started_(absl::Now()),
        lake_service_(this) {
    // Request ids differ across coordinator incarnations (an instance may still finish a
    // request of the previous one).
    next_request_id_ = ((epoch_ & 0xffff) << 40) + 1;
  }

  ~Impl() override { Shutdown(); }

  // The Lake RPCs served, by kind (tokenlake_lake_rpcs_total{call=...}).
  enum LakeRpc {
    kPlanIterationRpc,
    kCommitRpc,
    kReleaseRpc,
    kReleaseAndPlanRpc,
    kPlanBatchRpc,
    kNumLakeRpcs
  };

  // The engines' per-iteration calls (service Lake), forwarded to the Impl.
  class LakeService final : public v1::Lake::Service {
   public:
    explicit LakeService(Impl* impl) : impl_(impl) {}
    grpc::Status PlanIteration(grpc::ServerContext* ctx, const v1::PlanIterationRequest* request,
                               v1::PlanIterationReply* reply) override {
      if (grpc::Status a = impl_->Authenticate(ctx, "PlanIteration"); !a.ok()) return a;
      return impl_->PlanIteration(*request, reply);
    }
    grpc::Status Commit(grpc::ServerContext* ctx, const v1::CommitRequest* request,
                        v1::CommitReply* reply) override {
      if (grpc::Status a = impl_->Authenticate(ctx, "Commit"); !a.ok()) return a;
      return impl_->CommitIteration(*request, reply);
    }
    grpc::Status Release(grpc::ServerContext* ctx, const v1::ReleaseRequest* request,
                         v1::ReleaseReply*) override {
      if (grpc::Status a = impl_->Authenticate(ctx, "Release"); !a.ok()) return a;
      impl_->lake_rpcs_[kReleaseRpc].fetch_add(1, std::memory_order_relaxed);
      absl::MutexLock lock(&impl_->lake_mu_);
      return ToGrpc(impl_->lake_->Release(RequestId(request->request_id())));
    }
    grpc::Status ReleaseAndPlan(grpc::ServerContext* ctx, const v1::ReleaseAndPlanRequest* request,
                                v1::PlanIterationReply* reply) override {
      if (grpc::Status a = impl_->Authenticate(ctx, "ReleaseAndPlan"); !a.ok()) return a;
      return impl_->ReleaseAndPlan(*request, reply);
    }
    grpc::Status PlanBatch(grpc::ServerContext* ctx, const v1::PlanBatchRequest* request,
                           v1::PlanBatchReply* reply) override {
      if (grpc::Status a = impl_->Authenticate(ctx, "PlanBatch"); !a.ok()) return a;
      return impl_->PlanBatch(*request, reply);
    }

   private:
    Impl* impl_;
  };

  absl::Status Start() {
    auto lk = lake::Lake::Create(options_.ToLakeOptions(), &lake_clock_);
    if (!lk.ok()) {
      return absl::InvalidArgumentError(absl::StrCat("Coordinator: ", lk.status().message()));
    }
    lake_ = std::move(*lk);
    // The coordinator accepts no transport connections: it dials each instance and believes an
    // instance's replies only on the connection it opened to it.
    auto tcp = transport::TcpTransport::Create({.num_endpoints = kMaxInstances + 1,
                                                .local_endpoints = {InstanceId(0)},
                                                .secret = options_.cluster_secret,
                                                .listen = false});
    if (!tcp.ok()) return tcp.status();
    tcp_ = std::move(*tcp);
    auto fault = transport::FaultTransport::Create(tcp_.get(), options_.faults);
    if (!fault.ok()) return fault.status();
    fault_ = std::move(*fault);

    grpc::ServerBuilder builder;
    builder.AddListeningPort(absl::StrCat("127.0.0.1:", options_.grpc_port),
                             grpc::InsecureServerCredentials(), &grpc_port_);
    builder.RegisterService(this);
    builder.RegisterService(&lake_service_);
    grpc_server_ = builder.BuildAndStart();
    if (grpc_server_ == nullptr || grpc_port_ == 0) {
      return absl::UnavailableError(
          absl::StrFormat("Coordinator: cannot serve gRPC on 127.0.0.1:%d", options_.grpc_port));
    }

    auto front_end = OpenAiFrontEnd::Create(
        {.limits = options_.limits, .model_id = options_.model_id, .tokenizer = options_.tokenizer},
        [this](const CompletionRequest& r, const TokenSink& sink) { return Complete(r, sink); },
        [this](int http_status) {
          absl::MutexLock lock(&mu_);
          ++requests_by_code_[http_status];
        });
    if (!front_end.ok()) {
      return absl::InvalidArgumentError(
          absl::StrCat("Coordinator: ", front_end.status().message()));
    }
    front_end_ = std::move(*front_end);
    if (!front_end_->chat_unavailable().empty()) {
      std::fprintf(stderr, "tokenlake coordinator: %s\n", front_end_->chat_unavailable().c_str());
    }
    http_ = std::make_unique<httplib::Server>();
    SetUpHttp();
    if (options_.http_port == 0) {
      http_port_ = http_->bind_to_any_port("127.0.0.1");
    } else if (http_->bind_to_port("127.0.0.1", options_.http_port)) {
      http_port_ = options_.http_port;
    }
    if (http_port_ <= 0) {
      return absl::UnavailableError(
          absl::StrFormat("Coordinator: cannot serve HTTP on 127.0.0.1:%d", options_.http_port));
    }
    http_thread_ = std::thread([this] { http_->listen_after_bind(); });
    receiver_ = std::thread([this] { ReceiveLoop(); });
    reaper_ = std::thread([this] { ReapLoop(); });
    if (options_.rebalance_interval > absl::ZeroDuration()) {
      rebalancer_ = std::thread([this] { RebalanceLoop(); });
    }
    return absl::OkStatus();
  }

  void Shutdown() {
    if (stopping_.exchange(true)) return;
    if (http_ != nullptr) http_->stop();
    if (http_thread_.joinable()) http_thread_.join();
    if (grpc_server_ != nullptr) grpc_server_->Shutdown(absl::ToChronoTime(absl::Now()));
    {
      absl::MutexLock lock(&mu_);
      for (auto& [ticket, p] : pending_) {
        if (!p.done) {
          p.done = true;
          p.status = absl::UnavailableError("coordinator shutting down");
        }
      }
    }
    if (fault_ != nullptr) fault_->Shutdown();
    if (receiver_.joinable()) receiver_.join();
    if (reaper_.joinable()) reaper_.join();
    if (rebalancer_.joinable()) rebalancer_.join();
  }

  // ---- gRPC ----

  // Every call must carry a token made with the cluster secret (call_auth.h).
  grpc::Status Authenticate(const grpc::ServerContext* ctx, std::string_view method) {
    grpc::Status s = CheckCall(ctx, options_.cluster_secret, method);
    if (!s.ok()) unauthenticated_calls_.fetch_add(1, std::memory_order_relaxed);
    return s;
  }

  grpc::Status Register(grpc::ServerContext* ctx, const v1::RegisterRequest* request,
                        v1::RegisterReply* reply) override {
    if (grpc::Status a = Authenticate(ctx, "Register"); !a.ok()) return a;
    if (request->namespace_name() != options_.namespace_name ||
        request->segment_tokens() != options_.segment_tokens) {
      return grpc::Status(
          grpc::StatusCode::FAILED_PRECONDITION,
          absl::StrFormat("instance '%s' uses namespace '%s' and %d-token "
                          "segments; the coordinator uses '%s' and %d",
                          request->name(), request->namespace_name(), request->segment_tokens(),
                          options_.namespace_name, options_.segment_tokens));
    }
    if (request->state().capacity_slots() > 0 &&
        request->state().capacity_slots() < options_.slots_per_instance) {
      return grpc::Status(
          grpc::StatusCode::FAILED_PRECONDITION,
          absl::StrFormat("instance '%s' has %d slots; the lake counts %d per instance",
                          request->name(), request->state().capacity_slots(),
                          options_.slots_per_instance));
    }
    if (request->transport_port() < 1 || request->transport_port() > 65535) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "transport_port outside [1, 65535]");
    }
    // A live member's name is taken over only once its old incarnation is proven gone
    // (incarnation.h); checked without the locks (it may probe the old transport port).
    std::optional<LiveIncarnation> old;
    {
      absl::MutexLock lock(&mu_);
      for (int32_t i = 0; i < options_.lake_instances; ++i) {
        const Member& m = members_[i];
        if (m.registered && m.alive && m.name == request->name()) {
          old = LiveIncarnation{m.name, i, m.transport_port, m.last_heartbeat};
        }
      }
    }
    if (old.has_value()) {
      absl::Status gone = CheckIncarnationGone(*old, request->transport_port(), options_.dead_after,
                                               options_.cluster_secret, absl::Now());
      if (!gone.ok()) {
        refused_registrations_.fetch_add(1, std::memory_order_relaxed);
        return ToGrpc(gone);
      }
    }
    absl::MutexLock lake_lock(&lake_mu_);
    absl::MutexLock lock(&mu_);
    const int32_t n = options_.lake_instances;
    int32_t id = -1;
    for (int32_t i = 0; i < n; ++i) {
      if (members_[i].registered && members_[i].name == request->name()) id = i;
    }
    if (id < 0) {
      const int32_t preferred = request->preferred_id();
      if (preferred >= 0 && preferred < n && !members_[preferred].registered) {
        id = preferred;
      } else {
        for (int32_t i = 0; i < n && id < 0; ++i) {
          if (!members_[i].registered) id = i;
        }
      }
    }
    if (id < 0) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          absl::StrFormat("the cluster is full (%d instances)", n));
    }
    Member& m = members_[id];
    if (m.registered && m.name == request->name()) {
      // A new incarnation of a known instance (it restarted, possibly before it was declared
      // dead): what was sent to the old one will never be answered; fail it over now.
      ++rejoins_;
      for (auto& [ticket, p] : pending_) {
        if (p.instance == id && !p.done) {
          p.done = true;
          p.status = absl::UnavailableError(
              absl::StrFormat("instance %d ('%s') restarted", id, request->name()));
        }
      }
    }
    m.name = request->name();
    m.registered = true;
    m.alive = true;
    m.transport_port = request->transport_port();
    m.data_port = 0;  // until this incarnation reports its own
    ++membership_version_;
    m.last_heartbeat = absl::Now();
    m.missing.clear();
    m.pending_restore.clear();
    ++m.incarnations;
    if (!tcp_->SetPeer(InstanceId(id + 1), m.transport_port).ok()) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "cannot route to the instance");
    }
    // What the lake had on this id is replaced by what the instance reports now (empty after a
    // restart; everything it holds after a coordinator restart).
    if (absl::Status s = lake_->DropInstance(InstanceId(id)); !s.ok()) return ToGrpc(s);
    std::vector<uint64_t> to_free;
    ApplyStateLocked(id, request->state(), /*reconcile=*/false, &to_free);
    reply->set_instance_id(id);
    reply->set_endpoint(id + 1);
    reply->set_coordinator_transport_port(tcp_->port());
    reply->set_heartbeat_interval_ms(absl::ToInt64Milliseconds(options_.heartbeat_interval));
    reply->set_coordinator_epoch(epoch_);
    reply->set_lake_instances(n);
    AddPeersLocked(id, reply->mutable_peers());
    for (uint64_t seg : to_free) reply->add_free_segments(seg);
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext* ctx, const v1::HeartbeatRequest* request,
                         v1::HeartbeatReply* reply) override {
    if (grpc::Status a = Authenticate(ctx, "Heartbeat"); !a.ok()) return a;
    absl::MutexLock lake_lock(&lake_mu_);
    absl::MutexLock lock(&mu_);
    const int32_t id = request->instance_id();
    if (request->coordinator_epoch() != epoch_ || id < 0 || id >= options_.lake_instances ||
        !members_[id].registered || !members_[id].alive) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown instance: register again");
    }
    members_[id].last_heartbeat = absl::Now();
    std::vector<uint64_t> to_free;
    ApplyStateLocked(id, request->state(), /*reconcile=*/true, &to_free);
    AddPeersLocked(id, reply->mutable_peers());
    for (uint64_t seg : to_free) reply->add_free_segments(seg);
    return grpc::Status::OK;
  }

  void AddPeersLocked(int32_t to, google::protobuf::RepeatedPtrField<v1::Peer>* peers)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    members_[to].seen_version = membership_version_;
    for (int32_t i = 0; i < options_.lake_instances; ++i) {
      if (!Routable(i)) continue;
      v1::Peer* p = peers->Add();
      p->set_instance_id(i);
      p->set_data_port(members_[i].data_port);
    }
  }

  bool Routable(int32_t i) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    return i >= 0 && i < options_.lake_instances && members_[i].alive &&
           members_[i].data_port > 0 && members_[i].transport_error.empty();
  }

  // Routable, and every routable instance has been told its data port (so whoever it sends
  // queries to can reply): only then does it get requests.
  bool Ready(int32_t i) const ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    if (!Routable(i)) return false;
    for (int32_t j = 0; j < options_.lake_instances; ++j) {
      if (Routable(j) && members_[j].seen_version < members_[i].since_version) return false;
    }
    return true;
  }

  // ---- the lake's per-iteration calls ----

  grpc::Status PlanIteration(const v1::PlanIterationRequest& request,
                             v1::PlanIterationReply* reply) {
    lake_rpcs_[kPlanIterationRpc].fetch_add(1, std::memory_order_relaxed);
    absl::MutexLock lake_lock(&lake_mu_);
    return PlanIterationLocked(request, reply);
  }

  // Release, then (only if it succeeded) the same PlanIteration, under one hold of lake_mu_.
  // A failed Release (NotFound: the request is not active, e.g. the coordinator released a
  // failed attempt's id, or the call is a late duplicate) plans nothing, so no pin can be
  // left behind by a call that arrives after its attempt was given up.
  grpc::Status ReleaseAndPlan(const v1::ReleaseAndPlanRequest& request,
                              v1::PlanIterationReply* reply) {
    lake_rpcs_[kReleaseAndPlanRpc].fetch_add(1, std::memory_order_relaxed);
    absl::MutexLock lake_lock(&lake_mu_);
    if (absl::Status released = lake_->Release(RequestId(request.release_request_id()));
        !released.ok()) {
      return ToGrpc(released);
    }
    return PlanIterationLocked(request.plan(), reply);
  }

  // Under one hold of lake_mu_: the releases of ids not planned here, then per request its own
  // release (if listed) and its PlanIteration, so that no other request of the batch can evict
  // its prefix in between. A request whose own release failed (NotFound: not active any more,
  // e.g. a given-up attempt) is not planned, as in ReleaseAndPlan; a failed release of an id
  // not planned here is ignored.
  grpc::Status PlanBatch(const v1::PlanBatchRequest& request, v1::PlanBatchReply* reply) {
    lake_rpcs_[kPlanBatchRpc].fetch_add(1, std::memory_order_relaxed);
    absl::MutexLock lake_lock(&lake_mu_);
    absl::flat_hash_set<uint64_t> planned, own;
    for (const v1::PlanIterationRequest& plan : request.plans()) planned.insert(plan.request_id());
    for (uint64_t id : request.release_request_ids()) {
      if (planned.contains(id)) {
        own.insert(id);
      } else {
        lake_->Release(RequestId(id)).IgnoreError();
      }
    }
    for (const v1::PlanIterationRequest& plan : request.plans()) {
      v1::PlanBatchEntry* e = reply->add_entries();
      absl::Status s = absl::OkStatus();
      if (own.contains(plan.request_id())) s = lake_->Release(RequestId(plan.request_id()));
      if (s.ok()) {
        if (grpc::Status g = PlanIterationLocked(plan, e->mutable_plan()); !g.ok()) {
          s = absl::Status(static_cast<absl::StatusCode>(g.error_code()), g.error_message());
        }
      }
      if (!s.ok()) {
        e->clear_plan();
        e->set_status_code(ToProto(s.code()));
        e->set_error_message(std::string(s.message()));
      }
    }
    return grpc::Status::OK;
  }

  grpc::Status PlanIterationLocked(const v1::PlanIterationRequest& request,
                                   v1::PlanIterationReply* reply)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(lake_mu_) {
    lake::IterationRequest in = FromProto(request);
    absl::StatusOr<lake::IterationPlan> plan = lake::PlanIterationOnLake(*lake_, &lake_clock_, in);
    if (!plan.ok()) return ToGrpc(plan.status());
    // New segments go where the plan says, unless that instance is not live: then to the
    // computing instance (the caller), which holds their KV.
    {
      absl::MutexLock lock(&mu_);
      ++plan_iterations_;
      const int32_t caller = InstanceToWire(in.preferred_instance);
      for (plan::NewSegmentPlacement& p : plan->new_segments) {
        if (!Routable(InstanceToWire(p.target)) && Routable(caller)) {
          p.target = InstanceId(caller);
        }
      }
      // A copy the rebalancer just ordered may not be there yet: read from its source.
      for (plan::SegmentAssignment& a : plan->segments) {
        auto it = fresh_.find({a.segment.value(), InstanceToWire(a.holder)});
        if (it == fresh_.end() || !Routable(it->second.source)) continue;
        a.holder = InstanceId(it->second.source);
        if (a.action == plan::HolderAction::kLocal) a.action = plan::HolderAction::kMoveQueries;
        ++fresh_redirects_;
      }
    }
    ToProto(*plan, reply);
    return grpc::Status::OK;
  }

  grpc::Status CommitIteration(const v1::CommitRequest& request, v1::CommitReply* reply) {
    lake_rpcs_[kCommitRpc].fetch_add(1, std::memory_order_relaxed);
    const RequestId id(request.request_id());
    std::vector<plan::NewSegmentPlacement> placements;
    for (const v1::Placement& p : request.placements()) placements.push_back(FromProto(p, id));
    absl::MutexLock lake_lock(&lake_mu_);
    absl::StatusOr<lake::CommitResult> r = lake_->Commit(id, placements);
    if (!r.ok()) return ToGrpc(r.status());
    ToProto(*r, reply);
    return grpc::Status::OK;
  }

  // ---- requests ----

  absl::StatusOr<CompletionResult> Complete(const CompletionRequest& request,
                                            const TokenSink& sink) {
    const absl::Time start = absl::Now();
    absl::StatusOr<CompletionResult> r = CompleteInner(request, start, sink);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    latency_.Observe(seconds);
    absl::MutexLock lock(&mu_);
    ++requests_by_code_[r.ok() ? 200 : HttpStatusFor(r.status())];
    if (r.ok()) {
      prompt_tokens_ += static_cast<int64_t>(request.prompt.size());
      cached_tokens_ += r->cached_tokens;
      generated_tokens_ += static_cast<int64_t>(r->tokens.size());
      if (r->cancelled) ++cancelled_requests_;
    }
    return r;
  }

  // The tokens a request's sink has been given across its attempts; a retried attempt's
  // tokens that were given already must repeat them (generation is deterministic for a seed).
  struct Delivery {
    std::vector<int32_t> tokens;
    int64_t cached_tokens = -1;  // from the first report
    bool diverged = false;       // a retry produced other tokens than were given
    bool stop = false;           // the sink asked to stop

    // Takes tokens [first_index, first_index + n) of an attempt; hands the new ones to `sink`.
    // Returns false once the request must end (the sink said so, or the attempt diverged).
    bool Take(int64_t first_index, absl::Span<const int32_t> got, const TokenSink& sink) {
      std::vector<int32_t> fresh;
      for (size_t i = 0; i < got.size(); ++i) {
        const int64_t at = first_index + static_cast<int64_t>(i);
        if (at < static_cast<int64_t>(tokens.size())) {
          if (tokens[static_cast<size_t>(at)] != got[i]) diverged = true;
        } else if (at == static_cast<int64_t>(tokens.size())) {
          tokens.push_back(got[i]);
          fresh.push_back(got[i]);
        } else {
          diverged = true;  // a gap: reports are sent in order, so the attempt is broken
        }
        if (diverged) return false;
      }
      if (!fresh.empty() && sink && !sink(fresh)) stop = true;
      return !stop;
    }
  };

  // Tells instance `id` to stop serving lake request `request` (no reply comes).
  void SendCancel(int32_t id, RequestId request) {
    v1::CancelGenerate cancel;
    cancel.set_request_id(request.value());
    const std::string bytes = cancel.SerializeAsString();
    transport::Message m;
    m.from = InstanceId(0);
    m.to = InstanceId(id + 1);
    m.tag = kCancelTag;
    m.payload.resize(bytes.size());
    std::memcpy(m.payload.data(), bytes.data(), bytes.size());
    // A lost cancel costs the instance the rest of the generation, nothing more.
    fault_->Send(std::move(m)).IgnoreError();
  }

  // Waits for attempt `ticket` on instance `id` until it is answered or `deadline`, handing its
  // progress reports to `delivery` without the lock. Returns the attempt's outcome; with
  // *ended, the delivery asked to stop before the answer.
  Pending AwaitAttempt(uint64_t ticket, int32_t id, absl::Time deadline, absl::Time sent_at,
                       Delivery& delivery, const TokenSink& sink, bool* ended) {
    *ended = false;
    mu_.Lock();
    Pending* p = &pending_[ticket];  // a std::map: stable, and only this waiter erases it
    while (true) {
      auto ready = [p]() { return p->done || !p->progress.empty(); };
      mu_.AwaitWithDeadline(absl::Condition(&ready), deadline);
      if (p->progress.empty()) break;
      std::vector<v1::GenerateProgress> reports = std::move(p->progress);
      p->progress.clear();
      mu_.Unlock();
      bool go = true;
      for (const v1::GenerateProgress& g : reports) {
        if (delivery.cached_tokens < 0 && g.cached_tokens() >= 0) {
          delivery.cached_tokens = g.cached_tokens();
        }
        go = go && delivery.Take(g.first_index(), g.tokens(), sink);
      }
      mu_.Lock();
      if (!go) {
        *ended = true;
        break;
      }
    }
    if (!p->done && !*ended) {
      p->status = absl::DeadlineExceededError(absl::StrFormat(
          "instance %d did not answer within %s", id, absl::FormatDuration(deadline - sent_at)));
    }
    Pending result = std::move(*p);
    pending_.erase(ticket);
    --members_[id].in_flight;
    mu_.Unlock();
    return result;
  }

  absl::StatusOr<CompletionResult> CompleteInner(const CompletionRequest& request, absl::Time start,
                                                 const TokenSink& sink) {
    if (request.max_tokens > options_.limits.max_tokens_limit) {
      return absl::InvalidArgumentError(absl::StrFormat("max_tokens %d exceeds the limit of %d",
                                                        request.max_tokens,
                                                        options_.limits.max_tokens_limit));
    }
    TOKENLAKE_RETURN_IF_ERROR(
        lake::ValidatePrompt(request.prompt, request.max_tokens, {},
                             {.vocab_size = options_.limits.vocab_size,
                              .context_tokens = options_.limits.context_tokens}));
    // The full segments of the prompt, minus the last token (which is always computed).
    const int64_t usable = static_cast<int64_t>(request.prompt.size()) - 1;
    const int64_t full = usable / options_.segment_tokens * options_.segment_tokens;
    auto keys = index::ComputeSegmentKeys(
        salt_, absl::MakeConstSpan(request.prompt).subspan(0, static_cast<size_t>(full)),
        options_.segment_tokens);
    if (!keys.ok()) return keys.status();

    const absl::Time deadline = start + options_.request_timeout;
    absl::flat_hash_set<int32_t> excluded;
    std::string failures;
    v1::GenerateRequest message = ToGenerateMessage(request, sink != nullptr);
    Delivery delivery;
    const int64_t prompt_tokens = static_cast<int64_t>(request.prompt.size());
    for (int32_t attempt = 1; attempt <= options_.max_attempts; ++attempt) {
      const absl::Time now = absl::Now();
      if (now >= deadline) break;
      const absl::Time attempt_deadline = std::min(deadline, now + options_.attempt_timeout);
      message.set_deadline_unix_ms(absl::ToUnixMillis(attempt_deadline));
      absl::StatusOr<int32_t> target = Route(*keys, prompt_tokens, excluded);
      if (!target.ok()) {
        if (failures.empty()) return target.status();
        break;
      }
      const int32_t id = *target;
      uint64_t ticket;
      RequestId lake_request;
      {
        absl::MutexLock lock(&mu_);
        // Unpredictable, so that nobody can guess which reply a request waits for.
        do {
          ticket = transport::RandomU64();
        } while (ticket == 0 || pending_.count(ticket) > 0);
        lake_request = RequestId(next_request_id_++);
        pending_[ticket].instance = id;
        ++members_[id].in_flight;
        ++members_[id].routed;
        if (attempt > 1) ++failovers_;
      }
      message.set_request_id(lake_request.value());
      std::string bytes = message.SerializeAsString();
      transport::Message m;
      m.from = InstanceId(0);
      m.to = InstanceId(id + 1);
      m.tag = kGenerateRequestTag;
      m.correlation_id = ticket;
      m.payload.resize(bytes.size());
      std::memcpy(m.payload.data(), bytes.data(), bytes.size());
      absl::Status sent = fault_->Send(std::move(m));
      Pending result;
      bool ended = false;
      if (sent.ok()) {
        {
          absl::MutexLock lock(&mu_);
          bytes_sent_ += static_cast<int64_t>(bytes.size());
        }
        result = AwaitAttempt(ticket, id, attempt_deadline, now, delivery, sink, &ended);
      } else {
        absl::MutexLock lock(&mu_);
        result.status = sent;
        pending_.erase(ticket);
        --members_[id].in_flight;
      }
      if (ended) {
        // The sink stopped the request (or a retry diverged): the instance drops it and releases
        // its pins in the lake (Engine::Cancel). Released here instead, the instance's next plan
        // of it would fail first; a lost cancel costs only the rest of the generation, after
        // which the instance releases them as for any finished request.
        SendCancel(id, lake_request);
        if (delivery.diverged) return DivergedError(id);
        return Finished(delivery, id, attempt, "stop", /*cancelled=*/true);
      }
      bool answered_with_error = false;
      if (result.status.ok()) {
        const v1::GenerateReply& reply = result.reply;
        AddTraffic(reply.traffic());
        if (reply.status_code() != v1::STATUS_CODE_OK) {
          absl::Status s(FromProto(reply.status_code()),
                         absl::StrCat("instance ", id, ": ", reply.error_message()));
          // The instance judged the request itself: retrying would not help.
          if (s.code() == absl::StatusCode::kInvalidArgument) {
            ReleaseQuietly(lake_request);
            return s;
          }
          result.status = s;
          answered_with_error = true;
        } else {
          const bool stopped = reply.finish_reason() == "stop";
          if (reply.tokens_size() > request.max_tokens ||
              (!stopped && reply.tokens_size() != request.max_tokens)) {
            return absl::InternalError(
                absl::StrFormat("instance %d returned %d tokens (%s), expected %d", id,
                                reply.tokens_size(), reply.finish_reason(), request.max_tokens));
          }
          if (delivery.cached_tokens < 0) delivery.cached_tokens = reply.cached_tokens();
          const bool go = delivery.Take(0, reply.tokens(), sink);
          MaybeRebalanceAfterRequest();
          if (delivery.diverged) return DivergedError(id);
          return Finished(delivery, id, attempt, stopped ? "stop" : "length", !go);
        }
      }
      // The attempt failed: its pins in the lake go (the instance may have died holding them).
      ReleaseQuietly(lake_request);
      std::fprintf(stderr, "tokenlake coordinator: attempt %d of request %llu on instance %d: %s\n",
                   attempt, static_cast<unsigned long long>(lake_request.value()), id,
                   std::string(result.status.message()).c_str());
      absl::StrAppend(&failures, failures.empty() ? "" : "; ", "attempt ", attempt, " on instance ",
                      id, ": ", result.status.message());
      if (answered_with_error) {
        // The computing instance is alive; something its plan needed was not (a holder died,
        // a replica is not there yet). Retry after a pause, by when the membership and the
        // lake have caught up.
        const absl::Duration pause =
            std::min(options_.retry_backoff * attempt, deadline - absl::Now());
        if (pause > absl::ZeroDuration()) absl::SleepFor(pause);
      } else {
        excluded.insert(id);
      }
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrFormat("request not served within %s (%s)",
                          absl::FormatDuration(options_.request_timeout), failures));
    }
    return absl::UnavailableError(absl::StrCat("request failed on every attempt: ", failures));
  }

  // The generate message of `request` (without its per-attempt id and deadline). A request
  // without a seed gets one here, so that every attempt draws the same tokens.
  static v1::GenerateRequest ToGenerateMessage(const CompletionRequest& request, bool stream) {
    v1::GenerateRequest message;
    message.mutable_prompt()->Add(request.prompt.begin(), request.prompt.end());
    message.set_max_tokens(request.max_tokens);
    message.set_temperature(request.temperature);
    message.set_top_k(request.top_k);
    message.set_top_p(request.top_p);
    message.set_seed(request.seed.has_value() ? *request.seed : transport::RandomU64());
    message.mutable_stop_token_ids()->Add(request.stop_token_ids.begin(),
                                          request.stop_token_ids.end());
    message.set_stream(stream && request.stream);
    return message;
  }

  static absl::Status DivergedError(int32_t id) {
    return absl::InternalError(absl::StrFormat(
        "a retried attempt on instance %d produced other tokens than were already sent", id));
  }

  static CompletionResult Finished(Delivery& delivery, int32_t id, int32_t attempt,
                                   const char* finish_reason, bool cancelled) {
    CompletionResult out;
    out.tokens = std::move(delivery.tokens);
    out.cached_tokens = std::max<int64_t>(0, delivery.cached_tokens);
    out.instance = id;
    out.attempts = attempt;
    out.finish_reason = finish_reason;
    out.cancelled = cancelled;
    return out;
  }

  void ReleaseQuietly(RequestId request) {
    absl::MutexLock lake_lock(&lake_mu_);
    lake_->Release(request).IgnoreError();  // NotFound: the instance released it already
  }

  void AddTraffic(const v1::InstanceTraffic& t) {
    absl::MutexLock lock(&mu_);
    remote_attend_calls_ += t.remote_attend_calls();
    query_bytes_out_ += t.query_bytes_out();
    partial_bytes_back_ += t.partial_bytes_back();
    pulled_segments_ += t.pulled_segments();
    pulled_bytes_ += t.pulled_bytes();
    remote_stored_segments_ += t.remote_stored_segments();
    remote_stored_bytes_ += t.remote_stored_bytes();
  }

  // Picks the computing instance of a request (see the file comment of coordinator.h).
  absl::StatusOr<int32_t> Route(absl::Span<const index::SegmentKey> keys, int64_t prompt_tokens,
                                const absl::flat_hash_set<int32_t>& excluded) {
    absl::MutexLock lake_lock(&lake_mu_);
    absl::MutexLock lock(&mu_);
    std::vector<int32_t> live;
    int64_t min_load = INT64_MAX;
    for (int32_t i = 0; i < options_.lake_instances; ++i) {
      if (Ready(i) && !excluded.contains(i)) {
        live.push_back(i);
        min_load = std::min(min_load, members_[i].in_flight);
      }
    }
    if (live.empty()) {
      return absl::UnavailableError(absl::StrFormat(
          "no live instance to serve the request (%d excluded after failures)", excluded.size()));
    }
    auto least_busy = [&]() ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      int32_t best = live.front();
      for (int32_t i : live) {
        const Member& a = members_[i];
        const Member& b = members_[best];
        if (a.in_flight < b.in_flight || (a.in_flight == b.in_flight && a.routed < b.routed)) {
          best = i;
        }
      }
      return best;
    };
    if (options_.rotate_compute_instance) {
      return live[static_cast<size_t>(rotation_++ % live.size())];
    }
    // The lake's plan for the prefill (not admitted: nothing is pinned or counted).
    const index::MatchResult match = lake_->Match(keys);
    lake::LakeRequest lr{.id = RequestId(next_request_id_),
                         .keys = std::vector<index::SegmentKey>(keys.begin(), keys.end()),
                         .new_tokens = std::max<int64_t>(1, prompt_tokens - match.matched_tokens)};
    absl::StatusOr<std::vector<plan::BatchPlan>> plans =
        lake_->GenPlans({lake::Batch{.requests = {lr}, .dop = options_.lake_instances}});
    int32_t chosen = -1;
    if (plans.ok() && plans->size() == 1 && (*plans)[0].requests.size() == 1) {
      chosen = InstanceToWire((*plans)[0].requests[0].compute_instance);
    }
    if (chosen < 0 || !Ready(chosen) || excluded.contains(chosen) ||
        members_[chosen].in_flight > min_load + options_.balance_abs_threshold) {
      chosen = least_busy();
      ++routing_overrides_;
    }
    return chosen;
  }

  // ---- rebalancing ----

  void MaybeRebalanceAfterRequest() {
    if (options_.rebalance_every_requests <= 0) return;
    bool due;
    {
      absl::MutexLock lock(&mu_);
      due = ++served_since_rebalance_ >= options_.rebalance_every_requests;
      if (due) served_since_rebalance_ = 0;
    }
    if (due) RebalanceNow().IgnoreError();
  }

  void RebalanceLoop() {
    while (!stopping_.load()) {
      const absl::Time next = absl::Now() + options_.rebalance_interval;
      while (!stopping_.load() && absl::Now() < next) absl::SleepFor(absl::Milliseconds(20));
      if (!stopping_.load()) RebalanceNow().IgnoreError();
    }
  }

  absl::StatusOr<int64_t> RebalanceNow() {
    std::map<int32_t, v1::RebalanceOrder> orders;
    int64_t actions = 0;
    {
      absl::MutexLock lake_lock(&lake_mu_);
      absl::StatusOr<int64_t> n = RebalanceLocked(&orders);
      if (!n.ok()) return n.status();
      actions = *n;
    }
    // Sent without the locks (a send may wait for a connection).
    for (auto& [instance, order] : orders) {
      const std::string bytes = order.SerializeAsString();
      transport::Message m;
      m.from = InstanceId(0);
      m.to = InstanceId(instance + 1);
      m.tag = kRebalanceTag;
      m.payload.resize(bytes.size());
      std::memcpy(m.payload.data(), bytes.data(), bytes.size());
      // Not through the fault injector: a lost order is repaired by heartbeat reconciliation,
      // but the request-path fault tests should see only their own faults.
      tcp_->Send(std::move(m)).IgnoreError();
    }
    return actions;
  }

  // Runs Lake::Rebalance and turns its actions into one order per executing instance.
  absl::StatusOr<int64_t> RebalanceLocked(std::map<int32_t, v1::RebalanceOrder>* orders)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(lake_mu_) {
    absl::StatusOr<lake::RebalanceResult> r = lake_->Rebalance();
    if (!r.ok()) return r.status();
    absl::MutexLock lock(&mu_);
    absl::flat_hash_set<int32_t> not_routable;
    for (const balance::BalanceAction& a : r->actions) {
      const int32_t from = InstanceToWire(a.from), to = InstanceToWire(a.to);
      v1::RebalanceAction* x = nullptr;
      switch (a.kind) {
        case balance::ActionKind::kDrop:
          // No order: the copy is no longer listed, so the instance's next heartbeat frees it
          // (guarded by its store generation, so a copy placed there again meanwhile stays;
          // an order queued behind a long request could not tell).
          ++rebalance_actions_;
          break;
        case balance::ActionKind::kReplicate:
        case balance::ActionKind::kMove:
          if (!Routable(from) || !Routable(to)) {
            if (!Routable(to)) not_routable.insert(to);
            break;
          }
          x = (*orders)[to].add_actions();
          x->set_kind(a.kind == balance::ActionKind::kReplicate ? v1::REBALANCE_KIND_REPLICATE
                                                                : v1::REBALANCE_KIND_MOVE);
          fresh_[{a.segment.value(), to}] = Fresh{.source = from, .since = absl::Now()};
          break;
      }
      if (x == nullptr) continue;
      x->set_segment(a.segment.value());
      x->set_from(from);
      x->set_to(to);
      x->set_sequence(r->sequence);
      ++rebalance_actions_;
    }
    // The lake may have placed copies on an instance that is not running: take them back.
    for (int32_t i : not_routable) {
      if (i >= 0 && i < options_.lake_instances) lake_->DropInstance(InstanceId(i)).IgnoreError();
    }
    return static_cast<int64_t>(r->actions.size());
  }

  void ReceiveLoop() {
    while (true) {
      absl::StatusOr<transport::Message> m =
          fault_->Receive(InstanceId(0), absl::Milliseconds(100));
      if (!m.ok()) {
        if (m.status().code() == absl::StatusCode::kCancelled) return;
        continue;
      }
      if (m->tag == kGenerateProgressTag) {
        TakeProgress(*m);
        continue;
      }
      if (m->tag != kGenerateReplyTag) continue;
      v1::GenerateReply reply;
      const bool parsed =
          reply.ParseFromArray(m->payload.data(), static_cast<int>(m->payload.size()));
      absl::MutexLock lock(&mu_);
      bytes_received_ += static_cast<int64_t>(m->payload.size());
      const int32_t from = m->from.value() - 1;
      if (parsed && from >= 0 && from < kMaxInstances && members_[from].alive) {
        UpdateMemberLocked(from, reply.state());
      }
      auto it = pending_.find(m->correlation_id);
      if (it == pending_.end() || it->second.done || it->second.instance != from) continue;
      it->second.done = true;
      if (parsed) {
        it->second.reply = std::move(reply);
      } else {
        it->second.status = absl::DataLossError("malformed reply from the instance");
      }
    }
  }

  // A streamed request's progress report: queued for its waiter (reports of an attempt that
  // is not waited for any more, or from another instance than it was sent to, are dropped).
  void TakeProgress(const transport::Message& m) {
    v1::GenerateProgress progress;
    if (!progress.ParseFromArray(m.payload.data(), static_cast<int>(m.payload.size()))) return;
    absl::MutexLock lock(&mu_);
    bytes_received_ += static_cast<int64_t>(m.payload.size());
    auto it = pending_.find(m.correlation_id);
    if (it == pending_.end() || it->second.done || it->second.instance != m.from.value() - 1) {
      return;
    }
    it->second.progress.push_back(std::move(progress));
  }

  void ReapLoop() {
    while (!stopping_.load()) {
      absl::SleepFor(std::min(options_.heartbeat_interval / 2, absl::Milliseconds(50)));
      absl::MutexLock lake_lock(&lake_mu_);
      absl::MutexLock lock(&mu_);
      const absl::Time now = absl::Now();
      for (int32_t i = 0; i < options_.lake_instances; ++i) {
        Member& m = members_[i];
        if (!m.alive) {
          // Nothing may stay listed on an instance that is not running (e.g. a Commit that
          // fell back to it): its copies leave the lake.
          if (lake_->prefix_tree().SegmentsOn(InstanceId(i)) > 0) {
            lake_->DropInstance(InstanceId(i)).IgnoreError();
          }
          continue;
        }
        if (now - m.last_heartbeat <= options_.dead_after) continue;
        m.alive = false;
        m.data_port = 0;
        ++membership_version_;
        ++deaths_;
        lake_->DropInstance(InstanceId(i)).IgnoreError();
        m.used_slots = 0;
        for (auto& [ticket, p] : pending_) {
          if (p.instance == i && !p.done) {
            p.done = true;
            p.status = absl::UnavailableError(
                absl::StrFormat("instance %d ('%s') declared dead: no heartbeat for %s", i, m.name,
                                absl::FormatDuration(options_.dead_after)));
          }
        }
      }
    }
  }

  void UpdateMemberLocked(int32_t id, const v1::InstanceState& state)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    Member& m = members_[id];
    m.used_slots = state.used_slots();
    m.capacity_slots = state.capacity_slots();
    m.slot_bytes = state.slot_bytes();
    if (state.data_port() > 0 && state.data_port() <= 65535 && state.data_port() != m.data_port) {
      m.data_port = state.data_port();
      m.since_version = ++membership_version_;
    }
    m.traffic = state.traffic();
    m.cancelled = state.requests_cancelled();
    m.running = state.requests_running();
    if (state.transport_error() != m.transport_error) {
      m.transport_error = state.transport_error();
      ++membership_version_;
      std::fprintf(stderr, "tokenlake coordinator: instance %d ('%s') %s%s\n", id, m.name.c_str(),
                   m.transport_error.empty() ? "is healthy again" : "unhealthy: ",
                   m.transport_error.c_str());
    }
  }

  // Takes the instance's report into the lake: restores what it holds that the lake does not
  // list (at registration, and on heartbeats during restore_window) or tells it to free that;
  // with `reconcile`, drops from the lake the replicas it did not report in kMissesToDrop
  // heartbeats in a row (Lake::DropReplica: not while pinned), or in kMissesToLose heartbeats in
  // a row even if pinned (Lake::LoseReplica: under load a popular segment is always pinned, and
  // every request that reads the missing copy fails).
  void ApplyStateLocked(int32_t id, const v1::InstanceState& state, bool reconcile,
                        std::vector<uint64_t>* to_free)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(lake_mu_, mu_) {
    UpdateMemberLocked(id, state);
    Member& m = members_[id];
    const InstanceId inst(id);
    absl::flat_hash_set<SegmentId> listed;
    lake_->prefix_tree().ForEachNode([&](const index::PrefixTree::Node& node) {
      if (node.HasReplicaOn(inst)) listed.insert(node.id);
    });
    // Rebalance copies: confirmed once the receiver reports the segment (or the lake no longer
    // lists it there); while pending, the source keeps its copy (a move's source is no longer
    // listed, but plans read from it until the copy is confirmed).
    absl::flat_hash_set<SegmentId> protected_sources;
    const absl::Time now = absl::Now();
    for (auto it = fresh_.begin(); it != fresh_.end();) {
      auto cur = it++;
      if (now - cur->second.since > absl::Seconds(10)) {
        fresh_.erase(cur);
      } else if (cur->second.source == id) {
        protected_sources.insert(SegmentId(cur->first.first));
      }
    }
    absl::flat_hash_set<SegmentId> reported;
    for (const v1::Segment& seg : state.segments()) reported.insert(SegmentId(seg.id()));
    for (auto it = fresh_.begin(); it != fresh_.end();) {
      auto cur = it++;
      const SegmentId seg(cur->first.first);
      if (cur->first.second == id && (reported.contains(seg) || !listed.contains(seg))) {
        fresh_.erase(cur);
      }
    }
    absl::flat_hash_set<SegmentId> held;
    std::vector<lake::HeldSegment> unlisted;
    for (const v1::Segment& seg : state.segments()) {
      held.insert(SegmentId(seg.id()));
      if (protected_sources.contains(SegmentId(seg.id()))) continue;
      if (!listed.contains(SegmentId(seg.id()))) {
        unlisted.push_back({SegmentId(seg.id()), SegmentId(seg.parent()), seg.num_tokens()});
      }
    }
    const bool in_window = absl::Now() - started_ < options_.restore_window;
    if (!in_window) m.pending_restore.clear();
    // At registration everything unlisted is restored; on heartbeats only what registration
    // could not place yet (orphans whose parent is on an instance that had not re-registered):
    // any other unlisted copy is one the lake dropped or evicted, to be freed.
    std::vector<lake::HeldSegment> restore;
    for (const lake::HeldSegment& h : unlisted) {
      if (!reconcile || m.pending_restore.contains(h.id)) {
        restore.push_back(h);
      } else {
        to_free->push_back(h.id.value());
      }
    }
    if (!restore.empty()) {
      absl::StatusOr<lake::RestoreResult> r = lake_->RestoreReplicas(inst, restore);
      if (r.ok()) {
        restored_replicas_ += r->restored_replicas;
        m.pending_restore.clear();
        for (SegmentId seg : r->rejected) {
          if (in_window) {
            m.pending_restore.insert(seg);  // retried on the next heartbeats
          } else {
            to_free->push_back(seg.value());
          }
        }
      }
    }
    reconcile_frees_ += static_cast<int64_t>(to_free->size());
    if (!reconcile) return;
    constexpr int32_t kMissesToDrop = 2, kMissesToLose = 4;
    absl::flat_hash_map<SegmentId, int32_t> missing;
    for (SegmentId seg : listed) {
      if (held.contains(seg)) continue;
      auto it = m.missing.find(seg);
      const int32_t misses = 1 + (it == m.missing.end() ? 0 : it->second);
      if (misses >= kMissesToDrop && lake_->DropReplica(seg, inst).ok()) {
        ++reconcile_drops_;
        continue;
      }
      if (misses >= kMissesToLose && lake_->LoseReplica(seg, inst).ok()) {
        ++reconcile_drops_;
        continue;
      }
      missing[seg] = misses;
    }
    m.missing = std::move(missing);
  }

  // ---- HTTP ----

  void SetUpHttp() {
    const size_t threads = static_cast<size_t>(options_.http_threads);
    http_->new_task_queue = [threads] { return new httplib::ThreadPool(threads); };
    http_->set_payload_max_length(static_cast<size_t>(options_.max_body_bytes));
    http_->set_read_timeout(absl::ToChronoSeconds(options_.http_read_timeout) +
                            std::chrono::duration_cast<std::chrono::microseconds>(
                                absl::ToChronoMicroseconds(options_.http_read_timeout) -
                                absl::ToChronoSeconds(options_.http_read_timeout)));
    http_->set_write_timeout(std::chrono::seconds(5));
    front_end_->AddRoutes(*http_);
    http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(MetricsText(), "text/plain; version=0.0.4");
    });
    http_->Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
      const HealthReport h = Health();
      res.status = h.http_status;
      res.set_content(h.json, "application/json");
    });
    http_->set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      absl::Status s;
      if (res.status == 404) {
        s = absl::NotFoundError(
            "no such endpoint (POST /v1/completions, POST /v1/chat/completions, GET "
            "/v1/models, GET /metrics, GET /healthz)");
      } else if (res.status == 413) {
        s = absl::InvalidArgumentError("request body too large");
      } else {
        s = absl::InvalidArgumentError(absl::StrFormat("HTTP error %d", res.status));
      }
      std::string body = OpenAiErrorJson(s);
      res.set_content(body, "application/json");
    });
  }

  std::string MetricsText() const {
    PrometheusWriter w;
    absl::MutexLock lake_lock(&lake_mu_);
    const lake::LakeStats stats = lake_->Stats();
    std::vector<int64_t> segments_on(static_cast<size_t>(options_.lake_instances), 0);
    std::vector<int64_t> tokens_on(static_cast<size_t>(options_.lake_instances), 0);
    lake_->prefix_tree().ForEachNode([&](const index::PrefixTree::Node& node) {
      for (InstanceId r : node.replicas) {
        if (r.value() < 0 || r.value() >= options_.lake_instances) continue;
        segments_on[static_cast<size_t>(r.value())] += 1;
        tokens_on[static_cast<size_t>(r.value())] += node.num_tokens;
      }
    });
    absl::MutexLock lock(&mu_);
    w.Family("tokenlake_requests_total", "counter", "Completion requests by HTTP status.");
    for (const auto& [code, n] : requests_by_code_) {
      w.Sample("tokenlake_requests_total", {{"code", absl::StrCat(code)}}, static_cast<double>(n));
    }
    w.Family("tokenlake_request_latency_seconds", "histogram",
             "Latency of completion requests routed to instances.");
    w.HistogramSamples("tokenlake_request_latency_seconds", {}, latency_.Read());
    w.Family("tokenlake_prompt_tokens_total", "counter", "Prompt tokens of served requests.");
    w.Sample("tokenlake_prompt_tokens_total", {}, static_cast<double>(prompt_tokens_));
    w.Family("tokenlake_cached_tokens_total", "counter", "Prompt tokens served from the pool.");
    w.Sample("tokenlake_cached_tokens_total", {}, static_cast<double>(cached_tokens_));
    w.Family("tokenlake_generated_tokens_total", "counter", "Tokens generated.");
    w.Sample("tokenlake_generated_tokens_total", {}, static_cast<double>(generated_tokens_));
    w.Family("tokenlake_hit_rate", "gauge", "cached_tokens_total / prompt_tokens_total.");
    w.Sample("tokenlake_hit_rate", {},
             prompt_tokens_ > 0 ? static_cast<double>(cached_tokens_) / prompt_tokens_ : 0.0);
    w.Family("tokenlake_lake_hit_rate", "gauge",
             "The lake's hit rate: cached / prompt tokens over admitted prefills.");
    w.Sample("tokenlake_lake_hit_rate", {}, stats.hit_rate);
    w.Family("tokenlake_pool_segments", "gauge", "Distinct segments in the lake's prefix tree.");
    w.Sample("tokenlake_pool_segments", {}, static_cast<double>(stats.segments));
    w.Family("tokenlake_pool_replicas", "gauge", "Stored segment copies in the lake.");
    w.Sample("tokenlake_pool_replicas", {}, static_cast<double>(stats.replicas));
    w.Family("tokenlake_pool_heavy_hitters", "gauge", "Segments the lake counts as heavy.");
    w.Sample("tokenlake_pool_heavy_hitters", {}, static_cast<double>(stats.heavy_hitters));
    w.Family("tokenlake_pool_pinned_segments", "gauge", "Segments pinned by running iterations.");
    w.Sample("tokenlake_pool_pinned_segments", {}, static_cast<double>(stats.pinned_segments));
    w.Family("tokenlake_pool_reserved_slots", "gauge",
             "Slots the lake reserves for admitted requests' segments not yet committed.");
    w.Sample("tokenlake_pool_reserved_slots", {}, static_cast<double>(stats.reserved_slots));
    w.Family("tokenlake_requests_cancelled_total", "counter",
             "Requests ended early by their client (disconnected, or a stop sequence matched).");
    w.Sample("tokenlake_requests_cancelled_total", {}, static_cast<double>(cancelled_requests_));
    w.Family("tokenlake_lake_active_requests", "gauge",
             "Requests admitted in the lake (an iteration planned and not yet released).");
    w.Sample("tokenlake_lake_active_requests", {}, static_cast<double>(stats.active_requests));
    int64_t slot_bytes = 0;
    for (int32_t i = 0; i < options_.lake_instances; ++i) {
      slot_bytes = std::max(slot_bytes, members_[i].slot_bytes);
    }
    w.Family("tokenlake_pool_bytes", "gauge",
             "KV bytes held in the pool (the lake's replicas x slot bytes).");
    w.Sample("tokenlake_pool_bytes", {}, static_cast<double>(stats.replicas * slot_bytes));
    w.Family("tokenlake_instance_alive", "gauge", "1 if the instance is alive.");
    for (int32_t i = 0; i < kMaxInstances; ++i) {
      if (!members_[i].registered) continue;
      w.Sample("tokenlake_instance_alive",
               {{"instance", absl::StrCat(i)}, {"name", members_[i].name}},
               members_[i].alive ? 1 : 0);
    }
    auto per_instance = [&](const char* name, const char* type, const char* help,
                            auto value) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
      w.Family(name, type, help);
      for (int32_t i = 0; i < kMaxInstances; ++i) {
        if (!members_[i].registered) continue;
        w.Sample(name, {{"instance", absl::StrCat(i)}}, static_cast<double>(value(i)));
      }
    };
    auto on = [](const std::vector<int64_t>& v, int32_t i) {
      return i < static_cast<int32_t>(v.size()) ? v[static_cast<size_t>(i)] : 0;
    };
    per_instance("tokenlake_instance_segments", "gauge",
                 "Segment replicas the lake lists per instance.",
                 [&](int32_t i) { return on(segments_on, i); });
    per_instance("tokenlake_instance_tokens", "gauge", "Cached tokens the lake lists per instance.",
                 [&](int32_t i) { return on(tokens_on, i); });
    per_instance("tokenlake_instance_rebalance_copies_total", "counter",
                 "Segments the instance copied for rebalancing (this incarnation).",
                 [&](int32_t i) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
                   return members_[i].traffic.rebalance_copies();
                 });
    per_instance("tokenlake_instance_used_bytes", "gauge", "KV bytes held per instance.",
                 [&](int32_t i) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
                   return members_[i].used_slots * members_[i].slot_bytes;
                 });
    per_instance("tokenlake_instance_in_flight", "gauge", "Requests in flight per instance.",
                 [&](int32_t i)
                     ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return members_[i].in_flight; });
    per_instance("tokenlake_instance_cancelled_total", "counter",
                 "Requests cancelled on the instance (this incarnation).",
                 [&](int32_t i)
                     ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return members_[i].cancelled; });
    per_instance("tokenlake_instance_running", "gauge",
                 "Requests running in the instance's engine (as last reported).",
                 [&](int32_t i) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return members_[i].running; });
    per_instance("tokenlake_instance_routed_total", "counter", "Requests routed per instance.",
                 [&](int32_t i) ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) { return members_[i].routed; });
    w.Family("tokenlake_transport_bytes_sent_total", "counter",
             "Bytes the coordinator sent to instances over the host transport.");
    w.Sample("tokenlake_transport_bytes_sent_total", {}, static_cast<double>(bytes_sent_));
    w.Family("tokenlake_transport_bytes_received_total", "counter",
             "Bytes the coordinator received from instances over the host transport.");
    w.Sample("tokenlake_transport_bytes_received_total", {}, static_cast<double>(bytes_received_));
    w.Family("tokenlake_failovers_total", "counter", "Request attempts after the first.");
    w.Sample("tokenlake_failovers_total", {}, static_cast<double>(failovers_));
    w.Family("tokenlake_instance_deaths_total", "counter", "Instances declared dead.");
    w.Sample("tokenlake_instance_deaths_total", {}, static_cast<double>(deaths_));
    w.Family("tokenlake_instance_rejoins_total", "counter",
             "Registrations of an instance name already known (restarts).");
    w.Sample("tokenlake_instance_rejoins_total", {}, static_cast<double>(rejoins_));
    w.Family("tokenlake_remote_attend_calls_total", "counter",
             "Attend calls a computing instance sent to another instance (queries moved).");
    w.Sample("tokenlake_remote_attend_calls_total", {}, static_cast<double>(remote_attend_calls_));
    w.Family("tokenlake_data_plane_bytes_total", "counter",
             "Bytes moved between instances by served requests and rebalancing, by kind.");
    const std::pair<const char*, int64_t> kinds[] = {{"query_out", query_bytes_out_},
                                                     {"partial_back", partial_bytes_back_},
                                                     {"kv_pulled", pulled_bytes_},
                                                     {"kv_stored_remote", remote_stored_bytes_}};
    for (const auto& [kind, value] : kinds) {
      w.Sample("tokenlake_data_plane_bytes_total", {{"kind", kind}}, static_cast<double>(value));
    }
    int64_t rebalance_bytes = 0;
    for (int32_t i = 0; i < options_.lake_instances; ++i) {
      rebalance_bytes += members_[i].traffic.rebalance_copy_bytes();
    }
    w.Sample("tokenlake_data_plane_bytes_total", {{"kind", "rebalance_copy"}},
             static_cast<double>(rebalance_bytes));
    w.Family("tokenlake_kv_pulled_segments_total", "counter", "Segments pulled by requests.");
    w.Sample("tokenlake_kv_pulled_segments_total", {}, static_cast<double>(pulled_segments_));
    w.Family("tokenlake_kv_stored_remote_segments_total", "counter",
             "New segments stored on another instance than their computing one.");
    w.Sample("tokenlake_kv_stored_remote_segments_total", {},
             static_cast<double>(remote_stored_segments_));
    w.Family("tokenlake_lake_plan_iterations_total", "counter",
             "Iterations planned by the lake for the instances' engines.");
    w.Sample("tokenlake_lake_plan_iterations_total", {}, static_cast<double>(plan_iterations_));
    w.Family("tokenlake_lake_rpcs_total", "counter",
             "Lake RPCs served to the instances' engines, by call (one iteration makes one "
             "PlanIteration or ReleaseAndPlan; the last one a Release; Commit only when the "
             "iteration completed a segment).");
    const std::pair<const char*, LakeRpc> calls[] = {{"plan_iteration", kPlanIterationRpc},
                                                     {"release_and_plan", kReleaseAndPlanRpc},
                                                     {"plan_batch", kPlanBatchRpc},
                                                     {"commit", kCommitRpc},
                                                     {"release", kReleaseRpc}};
    for (const auto& [call, rpc] : calls) {
      w.Sample("tokenlake_lake_rpcs_total", {{"call", call}},
               static_cast<double>(lake_rpcs_[rpc].load(std::memory_order_relaxed)));
    }
    w.Family("tokenlake_refused_total", "counter",
             "Calls refused: without a valid cluster call token, and registrations under a live "
             "member's name.");
    w.Sample("tokenlake_refused_total", {{"kind", "unauthenticated"}},
             static_cast<double>(unauthenticated_calls_.load()));
    w.Sample("tokenlake_refused_total", {{"kind", "live_name"}},
             static_cast<double>(refused_registrations_.load()));
    w.Family("tokenlake_rebalance_actions_total", "counter",
             "Rebalance actions sent to instances (replicate, move, drop).");
    w.Sample("tokenlake_rebalance_actions_total", {}, static_cast<double>(rebalance_actions_));
    w.Family("tokenlake_routing_overrides_total", "counter",
             "Requests not computed where the lake's plan said (instance not live or too busy).");
    w.Sample("tokenlake_routing_overrides_total", {}, static_cast<double>(routing_overrides_));
    w.Family("tokenlake_reconcile_total", "counter",
             "Heartbeat reconciliation: segments freed on instances (the lake did not list them), "
             "replicas dropped from the lake (the instance did not hold them), replicas restored.");
    w.Sample("tokenlake_reconcile_total", {{"kind", "freed_on_instance"}},
             static_cast<double>(reconcile_frees_));
    w.Sample("tokenlake_reconcile_total", {{"kind", "dropped_from_lake"}},
             static_cast<double>(reconcile_drops_));
    w.Sample("tokenlake_reconcile_total", {{"kind", "restored"}},
             static_cast<double>(restored_replicas_));
    w.Family("tokenlake_rebalance_redirects_total", "counter",
             "Planned reads of a rebalance copy not yet confirmed, served by its source instead.");
    w.Sample("tokenlake_rebalance_redirects_total", {}, static_cast<double>(fresh_redirects_));
    return w.text();
  }

  // GET /healthz: 200 "ok" when every registered instance is live and healthy and the
  // coordinator's own transport works; 200 "degraded" (naming the problems) when some are not
  // but one can serve; 503 when none can (or the coordinator cannot reach instances).
  struct HealthReport {
    int http_status = 200;
    std::string json;
  };
  HealthReport Health() const {
    nlohmann::json problems = nlohmann::json::array();
    if (absl::Status own = tcp_->Health(); !own.ok()) {
      problems.push_back(absl::StrCat("coordinator: ", own.message()));
    }
    absl::MutexLock lock(&mu_);
    int32_t live = 0;
    for (int32_t i = 0; i < options_.lake_instances; ++i) {
      const Member& m = members_[i];
      live += Ready(i) ? 1 : 0;
      if (m.registered && m.alive && !m.transport_error.empty()) {
        problems.push_back(absl::StrFormat("instance %d ('%s'): %s", i, m.name, m.transport_error));
      }
    }
    const bool serving = live > 0 && tcp_->Health().ok();
    HealthReport r;
    r.http_status = serving ? 200 : 503;
    nlohmann::json j = {{"status", !serving ? (live > 0 ? "unhealthy" : "no live instance")
                                            : (problems.empty() ? "ok" : "degraded")},
                        {"live_instances", live}};
    if (!problems.empty()) j["problems"] = problems;
    r.json = j.dump();
    return r;
  }

  int32_t LiveInstances() const {
    absl::MutexLock lock(&mu_);
    int32_t n = 0;
    for (int32_t i = 0; i < options_.lake_instances; ++i) n += Ready(i) ? 1 : 0;
    return n;
  }

  int64_t DistinctSegments() const {
    absl::MutexLock lock(&lake_mu_);
    return lake_->prefix_tree().num_segments();
  }

  std::vector<int32_t> ReplicasOf(uint64_t segment) const {
    absl::MutexLock lock(&lake_mu_);
    std::vector<int32_t> out;
    const index::PrefixTree::Node* node = lake_->prefix_tree().Find(SegmentId(segment));
    if (node != nullptr) {
      for (InstanceId r : node->replicas) out.push_back(r.value());
    }
    return out;
  }

  const CoordinatorOptions options_;
  const uint64_t salt_;
  int grpc_port_ = 0;
  int http_port_ = 0;
  std::unique_ptr<transport::TcpTransport> tcp_;
  std::unique_ptr<transport::FaultTransport> fault_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<OpenAiFrontEnd> front_end_;  // outlives http_ (declared before it)
  std::unique_ptr<httplib::Server> http_;
  std::thread http_thread_, receiver_, reaper_, rebalancer_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> next_response_id_{1};

  // Lock order: lake_mu_ before mu_. lake_mu_ serialises every use of the lake (its methods are
  // thread-safe, but reading its prefix tree is not while another thread mutates it).
  mutable absl::Mutex lake_mu_;
  ManualClock lake_clock_{1};         // advanced 1 ms per planned iteration (lake/control_plane.h)
  std::unique_ptr<lake::Lake> lake_;  // guarded by lake_mu_ (set once in Start)

  mutable absl::Mutex mu_;
  std::vector<Member> members_ ABSL_GUARDED_BY(mu_);
  // A std::map: a waiter's Pending* stays valid while other requests come and go.
  std::map<uint64_t, Pending> pending_ ABSL_GUARDED_BY(mu_);
  uint64_t next_request_id_ ABSL_GUARDED_BY(mu_) = 1;
  // Bumped whenever an instance's data port appears, changes or goes (see Ready()).
  int64_t membership_version_ ABSL_GUARDED_BY(mu_) = 0;
  uint64_t rotation_ ABSL_GUARDED_BY(mu_) = 0;
  std::map<int, int64_t> requests_by_code_ ABSL_GUARDED_BY(mu_);
  int64_t prompt_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t cached_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t generated_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t cancelled_requests_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_sent_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_received_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t failovers_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t deaths_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t rejoins_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t remote_attend_calls_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t query_bytes_out_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t partial_bytes_back_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t pulled_segments_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t pulled_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t remote_stored_segments_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t remote_stored_bytes_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t plan_iterations_ ABSL_GUARDED_BY(mu_) = 0;
  std::array<std::atomic<int64_t>, kNumLakeRpcs> lake_rpcs_{};
  std::atomic<int64_t> unauthenticated_calls_{0};
  std::atomic<int64_t> refused_registrations_{0};
  int64_t rebalance_actions_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t routing_overrides_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reconcile_frees_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t reconcile_drops_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t restored_replicas_ ABSL_GUARDED_BY(mu_) = 0;
  int32_t served_since_rebalance_ ABSL_GUARDED_BY(mu_) = 0;
  // Rebalance copies ordered but not yet confirmed: (segment, receiving instance) -> source.
  struct Fresh {
    int32_t source = -1;
    absl::Time since;
  };
  absl::flat_hash_map<std::pair<uint64_t, int32_t>, Fresh> fresh_ ABSL_GUARDED_BY(mu_);
  int64_t fresh_redirects_ ABSL_GUARDED_BY(mu_) = 0;
  Histogram latency_;
  const uint64_t epoch_;
  const absl::Time started_;
  LakeService lake_service_;
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
int32_t Coordinator::http_port() const { return impl_->http_port_; }
int32_t Coordinator::grpc_port() const { return impl_->grpc_port_; }
int32_t Coordinator::transport_port() const { return impl_->tcp_->port(); }
absl::StatusOr<CompletionResult> Coordinator::Complete(const CompletionRequest& request) {
  return impl_->Complete(request, nullptr);
}
absl::StatusOr<CompletionResult> Coordinator::CompleteStreaming(const CompletionRequest& request,
                                                                const TokenSink& sink) {
  return impl_->Complete(request, sink);
}
std::string Coordinator::MetricsText() const { return impl_->MetricsText(); }
int32_t Coordinator::LiveInstances() const { return impl_->LiveInstances(); }
int64_t Coordinator::DistinctSegments() const { return impl_->DistinctSegments(); }
transport::FaultTransport* Coordinator::faults() { return impl_->fault_.get(); }
std::vector<int32_t> Coordinator::ReplicasOf(uint64_t segment) const {
  return impl_->ReplicasOf(segment);
}
absl::StatusOr<int64_t> Coordinator::RebalanceNow() { return impl_->RebalanceNow(); }
void Coordinator::Shutdown() { impl_->Shutdown(); }

}  // namespace tokenlake::service
