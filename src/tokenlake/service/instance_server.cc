#include "tokenlake/service/instance_server.h"

#include <grpcpp/grpcpp.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <optional>
#include <random>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "tokenlake/engine/pool_shape.h"
#include "tokenlake/service/call_auth.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/service/holdings_report.h"
#include "tokenlake/service/lake_rpc.h"
#include "tokenlake/service/protocol.h"
#include "tokenlake/transport/tcp_transport.h"
#include "tokenlake/v1/tokenlake.grpc.pb.h"

namespace tokenlake::service {
namespace {

struct DataPlane {
  int32_t id = -1;
  int32_t lake_instances = 0;
  std::unique_ptr<transport::TcpTransport> tcp;
  std::unique_ptr<RemoteControlPlane> control;
  // The hosted store and the engine over it (engine calls: the worker thread only).
  std::unique_ptr<InstanceBackend> backend;
  // Reports what the store holds (the control loop's).
  std::unique_ptr<HoldingsReporter> reporter;
  absl::Mutex peers_mu;
  // id -> data-plane address
  absl::flat_hash_map<int32_t, transport::HostPort> peers ABSL_GUARDED_BY(peers_mu);
  // id -> device-arena handle, as last given to the backend
  absl::flat_hash_map<int32_t, std::string> arenas ABSL_GUARDED_BY(peers_mu);

  ~DataPlane() {
    reporter.reset();
    backend.reset();  // the engine, then its store (whose server polls with a timeout)
    if (tcp != nullptr) tcp->Shutdown();
  }
};

}  // namespace

class InstanceServer::Impl {
 public:
  Impl(InstanceBackendSpec spec, InstanceServerOptions options)
      : spec_(std::move(spec)), options_(std::move(options)) {}
  ~Impl() { Shutdown(); }

  absl::Status Start() {
    std::vector<InstanceId> endpoints;
    for (int32_t i = 1; i <= kMaxInstances; ++i) endpoints.push_back(InstanceId(i));
    // The coordinator (endpoint 0) dials this transport and is answered on its connection.
    if (absl::Status s = CheckExposure("instance transports", options_.listen_host, options_.tls,
                                       options_.allow_insecure);
        !s.ok()) {
      return s;
    }
    auto tcp = transport::TcpTransport::Create({.num_endpoints = kMaxInstances + 1,
                                                .local_endpoints = endpoints,
                                                .listen_host = options_.listen_host,
                                                .port = options_.transport_port,
                                                .tls = options_.tls.context,
                                                .allow_insecure = options_.allow_insecure,
                                                .secret = options_.cluster_secret,
                                                .answer_on_incoming = {InstanceId(0)}});
    if (!tcp.ok()) return tcp.status();
    tcp_ = std::move(*tcp);
    layout_ = spec_.layout;
    if (absl::Status s = layout_.Validate(); !s.ok()) return s;
    RefreshState();
    // Without a fixed address (port 0, an elected leader only), nothing is dialled until
    // locate_coordinator names the leader (RegisterOnce).
    if (options_.coordinator_port != 0) {
      Follow(transport::HostPort{.host = options_.coordinator_host,
                                 .port = options_.coordinator_port});
    }
    control_ = std::thread([this] { ControlLoop(); });
    worker_ = std::thread([this] { WorkLoop(); });
    return absl::OkStatus();
  }

  void Shutdown() {
    if (stopping_.exchange(true)) return;
    if (tcp_ != nullptr) tcp_->Shutdown();
    if (control_.joinable()) control_.join();
    if (worker_.joinable()) worker_.join();
    absl::MutexLock lock(&mu_);
    data_.reset();
  }

  std::shared_ptr<DataPlane> Data() const {
    absl::MutexLock lock(&mu_);
    return data_;
  }

  // (Re)builds the data plane for instance `id` of a lake of `n` instances.
  absl::Status BuildDataPlane(int32_t id, int32_t n) {
    auto dp = std::make_shared<DataPlane>();
    dp->id = id;
    dp->lake_instances = n;
    auto tcp =
        transport::TcpTransport::Create({.num_endpoints = 2 * n,
                                         .local_endpoints = {InstanceId(id), InstanceId(n + id)},
                                         .listen_host = options_.listen_host,
                                         .tls = options_.tls.context,
                                         .allow_insecure = options_.allow_insecure,
                                         .secret = options_.cluster_secret});
    if (!tcp.ok()) return tcp.status();
    dp->tcp = std::move(*tcp);
    auto control = RemoteControlPlane::Create({.coordinator_host = coordinator_.host,
                                               .coordinator_port = coordinator_.port,
                                               .tls = options_.tls.identity,
                                               .num_instances = n,
                                               .call_timeout = options_.control_timeout,
                                               .cluster_secret = options_.cluster_secret});
    if (!control.ok()) return control.status();
    dp->control = std::move(*control);
    auto backend = spec_.factory({.self = InstanceId(id),
                                  .lake_instances = n,
                                  .data_transport = dp->tcp.get(),
                                  .control = dp->control.get()});
    if (!backend.ok()) return backend.status();
    dp->backend = std::move(*backend);
    // A new, empty store: a new incarnation of what this instance holds.
    std::random_device rd;
    const uint64_t incarnation = ((uint64_t{rd()} << 32) | rd()) | 1;
    dp->reporter = std::make_unique<HoldingsReporter>(dp->backend->holdings(), incarnation);
    {
      absl::MutexLock lock(&mu_);
      data_ = std::move(dp);
    }
    RefreshState();
    return absl::OkStatus();
  }

  // Routes the data plane to the live instances' data ports (and forgets the others).
  void ApplyPeers(const google::protobuf::RepeatedPtrField<v1::Peer>& peers) {
    std::shared_ptr<DataPlane> dp = Data();
    if (dp == nullptr) return;
    const int32_t n = dp->lake_instances;
    absl::flat_hash_map<int32_t, transport::HostPort> next;
    absl::flat_hash_map<int32_t, std::string> arenas;
    for (const v1::Peer& p : peers) {
      if (p.instance_id() < 0 || p.instance_id() >= n || p.instance_id() == dp->id) continue;
      next[p.instance_id()] = transport::HostPort{
          .host = p.data_host().empty() ? "127.0.0.1" : p.data_host(), .port = p.data_port()};
      if (!p.arena_handle().empty()) arenas[p.instance_id()] = p.arena_handle();
    }
    absl::MutexLock lock(&dp->peers_mu);
    for (const auto& [id, port] : dp->peers) {
      if (!next.contains(id)) {
        dp->tcp->ClearPeer(InstanceId(id));
        dp->tcp->ClearPeer(InstanceId(n + id));
      }
    }
    for (const auto& [id, address] : next) {
      auto it = dp->peers.find(id);
      if (it != dp->peers.end() && it->second == address) continue;
      dp->tcp->SetPeer(InstanceId(id), address).IgnoreError();
      dp->tcp->SetPeer(InstanceId(n + id), address).IgnoreError();
    }
    dp->peers = std::move(next);
    if (arenas != dp->arenas) {
      dp->backend->SetPeerArenas(arenas);
      dp->arenas = std::move(arenas);
    }
  }

  // Frees what the coordinator found unlisted in its view of this instance at store generation
  // `generation` (a copy stored since, e.g. the same segment placed here again, stays).
  void FreeSegments(DataPlane& dp, const google::protobuf::RepeatedField<uint64_t>& segments,
                    uint64_t generation) {
    for (uint64_t seg : segments) {
      // A pinned copy (being read right now) stays; the next heartbeat asks again.
      if (dp.backend->FreeIfUnchangedSince(SegmentId(seg), generation).ok()) {
        reconcile_frees_.fetch_add(1);
      }
    }
  }

  // The host peers dial (see InstanceServerOptions::advertise_host); empty: let the coordinator
  // use the address this instance's calls come from.
  std::string AdvertiseHost() const {
    if (!options_.advertise_host.empty()) return options_.advertise_host;
    const std::string& h = options_.listen_host;
    if (h == "0.0.0.0" || h == "::" || h.empty()) return "";
    return h;
  }

  // Its slot use, transport health and traffic (what it holds is reported by the control loop's
  // HoldingsReporter with Register and Heartbeat only).
  void RefreshState() {
    v1::InstanceState state;
    std::shared_ptr<DataPlane> dp = Data();
    if (dp != nullptr) {
      state.set_used_slots(dp->backend->used_slots());
      state.set_arena_handle(dp->backend->arena_handle());
      state.set_data_port(dp->tcp->port());
    }
    state.set_advertise_host(AdvertiseHost());
    // A transport that cannot accept or dial (e.g. out of descriptors) makes the instance
    // unusable however alive it looks: the coordinator stops routing to it.
    for (const transport::TcpTransport* t : {tcp_.get(), dp != nullptr ? dp->tcp.get() : nullptr}) {
      if (t == nullptr) continue;
      if (absl::Status h = t->Health(); !h.ok() && state.transport_error().empty()) {
        state.set_transport_error(std::string(h.message()));
      }
    }
    state.set_capacity_slots(options_.slots);
    state.set_slot_bytes(layout_.SlotBytes());
    state.set_requests_served(served_.load());
    state.set_requests_cancelled(cancelled_.load());
    state.set_requests_running(running_.load());
    {
      absl::MutexLock lock(&load_mu_);
      if (load_.snapshot() > 0) *state.mutable_load() = load_;
    }
    {
      absl::MutexLock lock(&traffic_mu_);
      *state.mutable_traffic() = traffic_;
    }
    state.mutable_traffic()->set_reconcile_frees(reconcile_frees_.load());
    if (dp != nullptr) {
      const DataPlaneTraffic d = dp->backend->data_plane_traffic();
      v1::InstanceTraffic* t = state.mutable_traffic();
      t->set_locate_messages(d.locate_messages);
      t->set_in_place_read_bytes(d.in_place_read_bytes);
      t->set_locate_micros(absl::ToInt64Microseconds(d.locate_time));
      t->set_store_messages(d.store_messages);
      t->set_store_micros(absl::ToInt64Microseconds(d.store_time));
      t->set_tail_messages(d.tail_messages);
      t->set_tail_micros(absl::ToInt64Microseconds(d.tail_time));
      t->set_fetch_messages(d.fetch_messages);
      t->set_fetched_bytes(d.fetched_bytes);
      t->set_fetch_micros(absl::ToInt64Microseconds(d.fetch_time));
    }
    absl::MutexLock lock(&mu_);
    state_ = std::move(state);
  }

  v1::InstanceState State() const {
    absl::MutexLock lock(&mu_);
    return state_;
  }

  // The state with what the instance holds, for a Register (`registration`: everything) or a
  // Heartbeat, from data plane `dp` (null: none yet, nothing held).
  v1::InstanceState Report(const std::shared_ptr<DataPlane>& dp, bool registration) {
    RefreshState();
    v1::InstanceState state = State();
    if (dp != nullptr) dp->reporter->Fill(registration, takes_holdings_changes_, &state);
    return state;
  }

  // Takes the holdings part of a Register / Heartbeat reply to a report of `dp` and frees what
  // the coordinator found unlisted.
  void TakeReply(const std::shared_ptr<DataPlane>& dp,
                 const google::protobuf::RepeatedField<uint64_t>& free_segments, uint64_t acked_seq,
                 bool full_wanted) {
    if (dp == nullptr) return;
    const uint64_t decided_at =
        dp->reporter->OnReply(takes_holdings_changes_, acked_seq, full_wanted);
    FreeSegments(*dp, free_segments, decided_at);
  }

  // Talks to the coordinator at `at` from now on (the control loop's channel and the data
  // plane's lake calls). Only the control loop calls it (and Start, before the loop runs).
  void Follow(const transport::HostPort& at, bool afresh = false) {
    coordinator_ = at;
    grpc::ChannelArguments args = GrpcChannelArguments();
    // A channel made afresh must not share the old one's connections (gRPC pools them by
    // target and arguments): its own argument keeps them apart.
    if (afresh) args.SetInt("tokenlake.fresh_channel", ++fresh_channels_);
    channel_ =
        grpc::CreateCustomChannel(at.ToString(), GrpcChannelCredentials(options_.tls.get()), args);
    stub_ = v1::Coordinator::NewStub(channel_);
    if (std::shared_ptr<DataPlane> dp = Data(); dp != nullptr) dp->control->Retarget(at);
  }

  // Asks where the leader is (when electing); returns true when it moved (and follows it).
  bool Relocate() {
    if (!options_.locate_coordinator) return false;
    absl::StatusOr<transport::HostPort> at = options_.locate_coordinator();
    if (!at.ok() || *at == coordinator_) return false;
    std::fprintf(stderr, "tokenlake instance %s: following the coordinator at %s\n",
                 options_.name.c_str(), at->ToString().c_str());
    Follow(*at);
    return true;
  }

  bool RegisterOnce() {
    Relocate();
    if (stub_ == nullptr) return false;  // no leader known yet (and no fixed address)
    std::shared_ptr<DataPlane> dp = Data();
    v1::RegisterRequest request;
    request.set_name(options_.name);
    request.set_preferred_id(options_.preferred_id);
    request.set_transport_port(tcp_->port());
    request.set_transport_incarnation(tcp_->incarnation());
    *request.mutable_state() = Report(dp, /*registration=*/true);
    request.set_namespace_name(options_.namespace_name);
    request.set_segment_tokens(options_.segment_tokens);
    if (const size_t bytes = request.ByteSizeLong(); bytes > size_t{kMaxGrpcMessageBytes}) {
      std::fprintf(stderr,
                   "tokenlake instance %s: cannot register: the report of the %d segments it "
                   "holds takes %zu bytes, over the cluster's gRPC message limit of %d\n",
                   options_.name.c_str(), request.state().segments_size(), bytes,
                   kMaxGrpcMessageBytes);
      return false;
    }
    v1::RegisterReply reply;
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(
        absl::Now() + RegisterDeadline(options_, request.state().segments_size())));
    AuthorizeCall(&ctx, options_.cluster_secret, "Register");
    grpc::Status s = stub_->Register(&ctx, request, &reply);
    if (!s.ok()) {
      if (s.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
          s.error_code() == grpc::StatusCode::INVALID_ARGUMENT ||
          s.error_code() == grpc::StatusCode::RESOURCE_EXHAUSTED ||
          s.error_code() == grpc::StatusCode::ALREADY_EXISTS ||
          s.error_code() == grpc::StatusCode::UNAUTHENTICATED) {
        std::fprintf(stderr, "tokenlake instance %s: registration refused: %s\n",
                     options_.name.c_str(), s.error_message().c_str());
      } else {
        const absl::Time now = absl::Now();
        if (failing_since_ == absl::InfinitePast()) failing_since_ = now;
        // A channel whose first connection failed (a partition that just healed: no route yet)
        // was seen to stay unable to finish a TLS handshake with a live coordinator for minutes;
        // a fresh channel (its own connections) connects at once.
        const bool afresh = now - failing_since_ >= kFreshChannelAfter;
        if (now - last_unreachable_log_ >= absl::Seconds(10)) {
          // Retried every period; said once in a while, so that an operator sees why it waits.
          last_unreachable_log_ = now;
          std::fprintf(stderr,
                       "tokenlake instance %s: cannot register with the coordinator at %s yet "
                       "(retrying%s): %s\n",
                       options_.name.c_str(), coordinator_.ToString().c_str(),
                       afresh ? " on a new connection" : "", s.error_message().c_str());
        }
        if (afresh) {
          failing_since_ = now;
          Follow(coordinator_, /*afresh=*/true);
        }
      }
      return false;
    }
    failing_since_ = absl::InfinitePast();
    takes_holdings_changes_ = reply.takes_holdings_changes();
    if (dp == nullptr || dp->id != reply.instance_id() ||
        dp->lake_instances != reply.lake_instances()) {
      if (absl::Status b = BuildDataPlane(reply.instance_id(), reply.lake_instances()); !b.ok()) {
        std::fprintf(stderr, "tokenlake instance %s: cannot build the data plane: %s\n",
                     options_.name.c_str(), std::string(b.message()).c_str());
        return false;
      }
    }
    ApplyPeers(reply.peers());
    // A rebuilt data plane holds nothing the report could name; its first report is full.
    if (Data() == dp) {
      TakeReply(dp, reply.free_segments(), reply.holdings_acked_seq(),
                reply.full_holdings_wanted());
    }
    absl::MutexLock lock(&mu_);
    id_ = reply.instance_id();
    epoch_ = reply.coordinator_epoch();
    heartbeat_interval_ = absl::Milliseconds(std::max<int64_t>(10, reply.heartbeat_interval_ms()));
    ++registrations_;
    return true;
  }

  void ControlLoop() {
    bool registered = false;
    bool first_after_register = false;
    while (!stopping_.load()) {
      if (!registered) {
        registered = RegisterOnce();
        if (!registered) absl::SleepFor(options_.register_retry);
        first_after_register = registered;
        continue;
      }
      absl::Duration interval;
      v1::HeartbeatRequest request;
      {
        absl::MutexLock lock(&mu_);
        interval = heartbeat_interval_;
        request.set_instance_id(id_);
        request.set_coordinator_epoch(epoch_);
      }
      // The first heartbeat right away: it tells the coordinator the data port.
      if (!first_after_register) absl::SleepFor(interval);
      first_after_register = false;
      std::shared_ptr<DataPlane> dp = Data();
      *request.mutable_state() = Report(dp, /*registration=*/false);
      v1::HeartbeatReply reply;
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + interval));
      AuthorizeCall(&ctx, options_.cluster_secret, "Heartbeat");
      grpc::Status s = stub_->Heartbeat(&ctx, request, &reply);
      if (s.ok()) {
        ApplyPeers(reply.peers());
        TakeReply(dp, reply.free_segments(), reply.holdings_acked_seq(),
                  reply.full_holdings_wanted());
      } else if (s.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
        std::fprintf(stderr, "tokenlake instance %s: heartbeat refused: %s\n",
                     options_.name.c_str(), s.error_message().c_str());
      } else if (s.error_code() == grpc::StatusCode::NOT_FOUND) {
        registered = false;
      } else if (Relocate()) {
        registered = false;  // a new leader: register with it (it rebuilds from our report)
      }
      // Other errors (coordinator down): keep heartbeating; a restarted coordinator answers
      // NOT_FOUND and we register again.
    }
  }

  // The worker: takes generate requests off the transport into the engine's iteration loop
  // (continuous batching: requests join while others run) and steps the loop while it has
  // work, replying to each request when it finishes.
  void WorkLoop() {
    std::shared_ptr<DataPlane> active;  // the data plane whose engine holds in_flight_
    while (!stopping_.load()) {
      int32_t id;
      {
        absl::MutexLock lock(&mu_);
        id = id_;
      }
      if (id < 0) {
        absl::SleepFor(absl::Milliseconds(10));
        continue;
      }
      std::shared_ptr<DataPlane> dp = Data();
      if (dp != active) {
        // A rebuilt data plane: what the old engine held is gone with it.
        for (auto& [request, f] : in_flight_) {
          SendReply(f.message,
                    Failed(absl::UnavailableError("the instance's data plane was rebuilt")));
        }
        in_flight_.clear();
        active = dp;
      }
      const bool busy = dp != nullptr && !dp->backend->idle();
      // Take what has arrived (a bounded number, so that the loop keeps stepping), waiting only
      // when there is nothing to compute.
      for (int taken = 0; taken < 64; ++taken) {
        absl::StatusOr<transport::Message> m = tcp_->Receive(
            InstanceId(id + 1), busy || taken > 0 ? absl::ZeroDuration() : absl::Milliseconds(50));
        if (!m.ok()) {
          if (m.status().code() == absl::StatusCode::kCancelled) return;
          break;
        }
        if (m->tag == kRebalanceTag) {
          ApplyRebalance(*m);
        } else if (m->tag == kGenerateRequestTag) {
          Accept(*m);
        } else if (m->tag == kCancelTag) {
          CancelRequest(*m);
        }
      }
      if (dp == nullptr || dp->backend->idle()) {
        TakeLoad(dp.get());
        continue;
      }
      auto finished = dp->backend->Step();
      // Before the replies, which carry it (the finished requests are no longer counted).
      TakeLoad(dp.get());
      for (auto& [request, result] : finished) Complete(*dp, request, result);
      SendProgress(*dp);
      running_.store(static_cast<int64_t>(in_flight_.size()));
    }
  }

  // Snapshots what the engine holds (the worker's, while it waits for work and after every
  // Step) for the reports: RefreshState copies the latest. `request_ids` may still list
  // requests that finished in the Step (their replies follow); the coordinator ends those.
  void TakeLoad(const DataPlane* dp) {
    v1::InstanceLoad load;
    load.set_snapshot(++load_snapshots_);
    for (const auto& [request, f] : in_flight_) load.add_request_ids(request);
    if (dp != nullptr) {
      const engine::LoopLoad l = dp->backend->Load();
      load.set_decode_requests(l.decode_requests);
      load.set_decode_context_tokens(l.decode_context_tokens);
      load.set_prefill_requests(l.prefill_requests);
      load.set_prefill_tokens(l.prefill_tokens);
      load.set_prefill_context_tokens(l.prefill_context_tokens);
      load.set_max_batch_requests(dp->backend->max_batch_requests());
    }
    absl::MutexLock lock(&load_mu_);
    load_ = std::move(load);
  }

  struct InFlight {
    transport::Message message;  // the request (for the reply's addressing)
    absl::Time start;
    bool stream = false;     // report progress (GenerateProgress) as tokens come
    int32_t reported = 0;    // tokens reported so far
    absl::Time last_report;  // of any progress report (or the start)
  };

  // Reports the new tokens of every streamed request still running (the finished ones are
  // answered with all their tokens), and tells the coordinator that every other request it
  // has not heard of for progress_interval still runs (a report without tokens).
  void SendProgress(DataPlane& dp) {
    const absl::Time now = absl::Now();
    for (auto& [request, f] : in_flight_) {
      std::optional<engine::Engine::Progress> p;
      if (f.stream) p = dp.backend->ProgressOf(RequestId(request));
      const bool fresh = p.has_value() && static_cast<int32_t>(p->tokens.size()) > f.reported;
      if (!fresh && now - f.last_report < options_.progress_interval) continue;
      v1::GenerateProgress progress;
      progress.set_first_index(f.reported);
      if (fresh) {
        progress.set_cached_tokens(p->cached_tokens);
        progress.mutable_tokens()->Add(p->tokens.begin() + f.reported, p->tokens.end());
        f.reported = static_cast<int32_t>(p->tokens.size());
      }
      f.last_report = now;
      Send(f.message, kGenerateProgressTag, progress);
    }
  }

  // The coordinator gave up on a request (its client went away, a stop sequence ended it):
  // the engine drops it, releasing its pins and its KV tail; no reply is sent.
  void CancelRequest(const transport::Message& m) {
    v1::CancelGenerate cancel;
    if (!cancel.ParseFromArray(m.payload.data(), static_cast<int>(m.payload.size()))) return;
    auto it = in_flight_.find(cancel.request_id());
    if (it == in_flight_.end()) return;  // finished (its answer is on the way) or unknown
    std::shared_ptr<DataPlane> dp = Data();
    if (dp != nullptr) dp->backend->Cancel(RequestId(cancel.request_id())).IgnoreError();
    in_flight_.erase(it);
    cancelled_.fetch_add(1);
    running_.store(static_cast<int64_t>(in_flight_.size()));
    RefreshState();
  }

  void SendReply(const transport::Message& m, const v1::GenerateReply& reply) {
    Send(m, kGenerateReplyTag, reply);
  }

  // Sends `bytes` with `tag` to the coordinator, answering request message `m`.
  // Answers `m` (the coordinator's request) with `payload` under `tag`.
  void Send(const transport::Message& m, uint32_t tag,
            const google::protobuf::MessageLite& payload) {
    // The coordinator's deadline covers a loss.
    tcp_->Send(ProtocolMessage(m.to, InstanceId(0), tag, m.correlation_id, payload)).IgnoreError();
  }

  v1::GenerateReply Failed(const absl::Status& s) {
    v1::GenerateReply reply;
    reply.set_status_code(ToProto(s.code()));
    reply.set_error_message(std::string(s.message()));
    *reply.mutable_state() = State();
    return reply;
  }

  // Checks a generate request and submits it to the engine, or replies with its error.
  void Accept(const transport::Message& m) {
    auto fail = [&](const absl::Status& s) { SendReply(m, Failed(s)); };
    v1::GenerateRequest request;
    if (!request.ParseFromArray(m.payload.data(), static_cast<int>(m.payload.size()))) {
      return fail(absl::InvalidArgumentError("malformed generate request"));
    }
    if (absl::ToUnixMillis(absl::Now()) > request.deadline_unix_ms()) {
      return fail(absl::DeadlineExceededError("request expired in the instance's queue"));
    }
    const int64_t context = spec_.context_tokens;
    const int64_t total = static_cast<int64_t>(request.prompt_size()) + request.max_tokens();
    if (request.prompt_size() == 0 || request.max_tokens() < 1 ||
        (context > 0 && total > context)) {
      return fail(absl::InvalidArgumentError(
          absl::StrFormat("prompt of %d tokens with max_tokens %d does not fit the context of %d",
                          request.prompt_size(), request.max_tokens(), context)));
    }
    if (request.request_id() == 0) {
      return fail(absl::InvalidArgumentError("generate request without a lake request id"));
    }
    std::shared_ptr<DataPlane> dp = Data();
    if (dp == nullptr) return fail(absl::UnavailableError("the data plane is not ready yet"));
    std::vector<int32_t> prompt(request.prompt().begin(), request.prompt().end());
    const RequestId rid(request.request_id());
    if (in_flight_.contains(rid.value())) {
      return fail(absl::AlreadyExistsError(
          absl::StrFormat("request %d is already running here", rid.value())));
    }
    engine::GenerateRequest g{
        .id = rid,
        .prompt = std::move(prompt),
        .max_new_tokens = request.max_tokens(),
        .stop_token_ids = {request.stop_token_ids().begin(), request.stop_token_ids().end()}};
    g.sampling.temperature = request.temperature();
    g.sampling.top_k = request.top_k();
    if (request.has_top_p()) g.sampling.top_p = request.top_p();
    if (request.has_seed()) g.sampling.seed = request.seed();
    g.segment_salt = request.segment_salt();
    if (absl::Status s = dp->backend->Submit(g); !s.ok()) return fail(s);
    in_flight_[rid.value()] = InFlight{
        .message = m, .start = absl::Now(), .stream = request.stream(), .last_report = absl::Now()};
  }

  // Replies to a finished request and counts its traffic.
  void Complete(DataPlane& dp, RequestId request, const absl::StatusOr<engine::GenerateResult>& r) {
    (void)dp;
    auto it = in_flight_.find(request.value());
    if (it == in_flight_.end()) return;
    const InFlight f = std::move(it->second);
    in_flight_.erase(it);
    served_.fetch_add(1);
    if (r.ok()) {
      absl::MutexLock lock(&traffic_mu_);
      traffic_.set_remote_attend_calls(traffic_.remote_attend_calls() + r->remote_attend_calls);
      traffic_.set_query_bytes_out(traffic_.query_bytes_out() + r->query_bytes_out);
      traffic_.set_partial_bytes_back(traffic_.partial_bytes_back() + r->partial_bytes_back);
      traffic_.set_pulled_segments(traffic_.pulled_segments() + r->pulled_segments);
      traffic_.set_pulled_bytes(traffic_.pulled_bytes() + r->pulled_bytes);
      traffic_.set_remote_stored_segments(traffic_.remote_stored_segments() +
                                          r->remote_stored_segments);
      traffic_.set_remote_stored_bytes(traffic_.remote_stored_bytes() + r->remote_stored_bytes);
    }
    RefreshState();
    if (!r.ok()) return SendReply(f.message, Failed(r.status()));
    v1::GenerateReply reply;
    v1::InstanceTraffic* t = reply.mutable_traffic();
    t->set_remote_attend_calls(r->remote_attend_calls);
    t->set_query_bytes_out(r->query_bytes_out);
    t->set_partial_bytes_back(r->partial_bytes_back);
    t->set_pulled_segments(r->pulled_segments);
    t->set_pulled_bytes(r->pulled_bytes);
    t->set_remote_stored_segments(r->remote_stored_segments);
    t->set_remote_stored_bytes(r->remote_stored_bytes);
    reply.mutable_tokens()->Add(r->tokens.begin(), r->tokens.end());
    reply.set_finish_reason(r->finish_reason);
    reply.set_cached_tokens(r->cached_tokens);
    reply.set_compute_us(absl::ToInt64Microseconds(absl::Now() - f.start));
    *reply.mutable_state() = State();
    SendReply(f.message, reply);
  }

  // Carries out the coordinator's rebalance actions (errors are repaired by reconciliation).
  void ApplyRebalance(const transport::Message& m) {
    v1::RebalanceOrder order;
    std::shared_ptr<DataPlane> dp = Data();
    if (dp == nullptr ||
        !order.ParseFromArray(m.payload.data(), static_cast<int>(m.payload.size()))) {
      return;
    }
    InstanceBackend& backend = *dp->backend;
    for (const v1::RebalanceAction& a : order.actions()) {
      const SegmentId seg(a.segment());
      const InstanceId from = InstanceFromWire(a.from());
      if (a.kind() == v1::REBALANCE_KIND_DROP) {
        backend.Drop(seg).IgnoreError();
        continue;
      }
      // A kind this instance does not know (a newer coordinator's) is left undone: the lake's
      // reconciliation drops a replica that never appears.
      if (a.kind() != v1::REBALANCE_KIND_REPLICATE && a.kind() != v1::REBALANCE_KIND_MOVE) continue;
      absl::StatusOr<int64_t> bytes = backend.CopyForRebalance(from, seg, a.sequence());
      if (!bytes.ok()) continue;
      {
        absl::MutexLock lock(&traffic_mu_);
        traffic_.set_rebalance_copies(traffic_.rebalance_copies() + 1);
        traffic_.set_rebalance_copy_bytes(traffic_.rebalance_copy_bytes() + *bytes);
      }
      // A move's source keeps its copy until the coordinator has seen this one (plans read
      // from the source meanwhile); heartbeat reconciliation frees it there afterwards.
    }
    RefreshState();
  }

  const InstanceBackendSpec spec_;
  const InstanceServerOptions options_;
  attention::KvSlotLayout layout_;
  std::unique_ptr<transport::TcpTransport> tcp_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Coordinator::Stub> stub_;
  // The coordinator followed now, and when it was last said to be unreachable (the control
  // loop's).
  transport::HostPort coordinator_;
  absl::Time last_unreachable_log_ = absl::InfinitePast();
  // Since when registrations have failed to reach it (InfinitePast: the last one did), and how
  // long before the control loop gives up on its channel and makes a new one.
  absl::Time failing_since_ = absl::InfinitePast();
  static constexpr absl::Duration kFreshChannelAfter = absl::Seconds(5);
  int fresh_channels_ = 0;
  std::thread control_, worker_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> served_{0};
  std::atomic<int64_t> cancelled_{0};
  std::atomic<int64_t> running_{0};  // in_flight_.size(), for reports
  // Requests submitted to the engine and not yet answered, by lake request id (worker only).
  absl::flat_hash_map<uint64_t, InFlight> in_flight_;
  std::atomic<int64_t> reconcile_frees_{0};
  // The worker's snapshots of the engine's load (TakeLoad), numbered from 1.
  uint64_t load_snapshots_ = 0;  // worker only
  absl::Mutex load_mu_;
  v1::InstanceLoad load_ ABSL_GUARDED_BY(load_mu_);

  absl::Mutex traffic_mu_;
  v1::InstanceTraffic traffic_ ABSL_GUARDED_BY(traffic_mu_);

  mutable absl::Mutex mu_;
  std::shared_ptr<DataPlane> data_ ABSL_GUARDED_BY(mu_);
  v1::InstanceState state_ ABSL_GUARDED_BY(mu_);
  // The coordinator followed takes holdings changes (RegisterReply; the control loop's).
  bool takes_holdings_changes_ = false;
  int32_t id_ ABSL_GUARDED_BY(mu_) = -1;
  uint64_t epoch_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t registrations_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Duration heartbeat_interval_ ABSL_GUARDED_BY(mu_) = absl::Milliseconds(200);
};

absl::Duration RegisterDeadline(const InstanceServerOptions& options, int64_t segments) {
  const absl::Duration most = absl::Minutes(10);
  const absl::Duration per = options.register_timeout_per_segment;
  if (per > absl::ZeroDuration() && segments > 0 && segments >= most / per) return most;
  return std::min(most, options.register_timeout + per * std::max<int64_t>(segments, 0));
}

absl::StatusOr<std::unique_ptr<InstanceServer>> InstanceServer::Create(
    const engine::LlamaModel* model, const InstanceServerOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("InstanceServer: model is null");
  if (options.slots < 1 || options.segment_tokens < 1) {
    return absl::InvalidArgumentError("InstanceServer: slots and segment_tokens must be >= 1");
  }
  const attention::KvSlotLayout layout =
      engine::PoolSlotLayout(model->config(), options.segment_tokens, options.kv_dtype);
  return Create({.layout = layout,
                 .context_tokens = model->config().max_position_embeddings,
                 .factory = HostBackendFactory({.model = model,
                                                .layout = layout,
                                                .slots = options.slots,
                                                .segment_tokens = options.segment_tokens,
                                                .namespace_name = options.namespace_name,
                                                .data_timeout = options.data_timeout,
                                                .max_batch_tokens = options.max_batch_tokens})},
                options);
}

absl::StatusOr<std::unique_ptr<InstanceServer>> InstanceServer::Create(
    InstanceBackendSpec spec, const InstanceServerOptions& options) {
  if (!spec.factory) return absl::InvalidArgumentError("InstanceServer: no backend factory");
  if (options.name.empty()) return absl::InvalidArgumentError("InstanceServer: name is empty");
  if (options.progress_interval <= absl::ZeroDuration()) {
    return absl::InvalidArgumentError("InstanceServer: progress_interval must be > 0");
  }
  const bool located = options.coordinator_port == 0 && options.locate_coordinator != nullptr;
  if (!located && (options.coordinator_port < 1 || options.coordinator_port > 65535)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "InstanceServer: coordinator_port must be in [1, 65535] (or 0 with locate_coordinator, "
        "which then names the leader), got %d",
        options.coordinator_port));
  }
  if (options.slots < 1 || options.segment_tokens < 1) {
    return absl::InvalidArgumentError("InstanceServer: slots and segment_tokens must be >= 1");
  }
  if (options.register_timeout <= absl::ZeroDuration() ||
      options.register_timeout_per_segment < absl::ZeroDuration()) {
    return absl::InvalidArgumentError(absl::StrCat(
        "InstanceServer: register_timeout must be > 0 and register_timeout_per_segment >= 0, "
        "got ",
        absl::FormatDuration(options.register_timeout), " and ",
        absl::FormatDuration(options.register_timeout_per_segment)));
  }
  auto impl = std::make_unique<Impl>(std::move(spec), options);
  if (absl::Status s = impl->Start(); !s.ok()) return s;
  return std::unique_ptr<InstanceServer>(new InstanceServer(std::move(impl)));
}

InstanceServer::InstanceServer(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
InstanceServer::~InstanceServer() { Shutdown(); }
int32_t InstanceServer::transport_port() const { return impl_->tcp_->port(); }
int32_t InstanceServer::instance_id() const {
  absl::MutexLock lock(&impl_->mu_);
  return impl_->id_;
}
int64_t InstanceServer::registrations() const {
  absl::MutexLock lock(&impl_->mu_);
  return impl_->registrations_;
}
int64_t InstanceServer::requests_served() const { return impl_->served_.load(); }
int64_t InstanceServer::requests_cancelled() const { return impl_->cancelled_.load(); }
int64_t InstanceServer::requests_running() const { return impl_->running_.load(); }
int64_t InstanceServer::segments() const { return impl_->State().used_slots(); }
void InstanceServer::Shutdown() { impl_->Shutdown(); }

}  // namespace tokenlake::service
