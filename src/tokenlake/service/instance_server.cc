#include "tokenlake/service/instance_server.h"

#include <grpcpp/grpcpp.h>

#include <atomic>
#include <cstring>
#include <thread>
#include <utility>
#include <vector>

#include "absl/base/thread_annotations.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/transport/tcp_transport.h"
#include "tokenlake/v1/tokenlake.grpc.pb.h"

namespace tokenlake::service {

class InstanceServer::Impl {
 public:
  Impl(const engine::LlamaModel* model, const InstanceServerOptions& options)
      : model_(model), options_(options) {}
  ~Impl() { Shutdown(); }

  absl::Status Start() {
    engine::EngineOptions eo{.use_pool = true,
                             .num_instances = 1,
                             .segment_tokens = options_.segment_tokens,
                             .slots_per_instance = options_.slots,
                             .kv_dtype = options_.kv_dtype,
                             .namespace_name = options_.namespace_name};
    auto eng = engine::Engine::Create(model_, eo);
    if (!eng.ok()) return eng.status();
    engine_ = std::move(*eng);
    std::vector<InstanceId> endpoints;
    for (int32_t i = 1; i <= kMaxInstances; ++i) endpoints.push_back(InstanceId(i));
    auto tcp = transport::TcpTransport::Create({.num_endpoints = kMaxInstances + 1,
                                                .local_endpoints = endpoints,
                                                .port = options_.transport_port});
    if (!tcp.ok()) return tcp.status();
    tcp_ = std::move(*tcp);
    RefreshState();
    channel_ = grpc::CreateChannel(absl::StrCat("127.0.0.1:", options_.coordinator_port),
                                   grpc::InsecureChannelCredentials());
    stub_ = v1::Coordinator::NewStub(channel_);
    control_ = std::thread([this] { ControlLoop(); });
    worker_ = std::thread([this] { WorkLoop(); });
    return absl::OkStatus();
  }

  void Shutdown() {
    if (stopping_.exchange(true)) return;
    if (tcp_ != nullptr) tcp_->Shutdown();
    if (control_.joinable()) control_.join();
    if (worker_.joinable()) worker_.join();
  }

  // The engine's segments and slot use (called by the worker thread, or before it starts).
  void RefreshState() {
    v1::InstanceState state;
    const lake::Lake* lk = engine_->lake();
    lk->prefix_tree().ForEachNode([&](const index::PrefixTree::Node& node) {
      v1::Segment* s = state.add_segments();
      s->set_id(node.id.value());
      s->set_num_tokens(node.num_tokens);
    });
    const lake::LakeStats stats = lk->Stats();
    if (!stats.instances.empty()) {
      state.set_used_slots(stats.instances[0].used_slots);
      state.set_capacity_slots(stats.instances[0].capacity_slots);
    }
    state.set_slot_bytes(engine_->instance_pool()->layout().SlotBytes());
    state.set_requests_served(served_.load());
    absl::MutexLock lock(&mu_);
    state_ = std::move(state);
  }

  v1::InstanceState State() const {
    absl::MutexLock lock(&mu_);
    return state_;
  }

  bool RegisterOnce() {
    v1::RegisterRequest request;
    request.set_name(options_.name);
    request.set_preferred_id(options_.preferred_id);
    request.set_transport_port(tcp_->port());
    *request.mutable_state() = State();
    request.set_namespace_name(options_.namespace_name);
    request.set_segment_tokens(options_.segment_tokens);
    v1::RegisterReply reply;
    grpc::ClientContext ctx;
    ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(1)));
    grpc::Status s = stub_->Register(&ctx, request, &reply);
    if (!s.ok()) {
      if (s.error_code() == grpc::StatusCode::FAILED_PRECONDITION ||
          s.error_code() == grpc::StatusCode::INVALID_ARGUMENT) {
        std::fprintf(stderr, "tokenlake instance %s: registration refused: %s\n",
                     options_.name.c_str(), s.error_message().c_str());
      }
      return false;
    }
    if (!tcp_->SetPeer(InstanceId(0), reply.coordinator_transport_port()).ok()) return false;
    absl::MutexLock lock(&mu_);
    id_ = reply.instance_id();
    epoch_ = reply.coordinator_epoch();
    heartbeat_interval_ = absl::Milliseconds(std::max<int64_t>(10, reply.heartbeat_interval_ms()));
    ++registrations_;
    return true;
  }

  void ControlLoop() {
    bool registered = false;
    while (!stopping_.load()) {
      if (!registered) {
        registered = RegisterOnce();
        if (!registered) absl::SleepFor(options_.register_retry);
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
      absl::SleepFor(interval);
      *request.mutable_state() = State();
      v1::HeartbeatReply reply;
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + interval));
      grpc::Status s = stub_->Heartbeat(&ctx, request, &reply);
      if (s.error_code() == grpc::StatusCode::NOT_FOUND) registered = false;
      // Other errors (coordinator down): keep heartbeating; a restarted coordinator answers
      // NOT_FOUND and we register again.
    }
  }

  void WorkLoop() {
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
      absl::StatusOr<transport::Message> m =
          tcp_->Receive(InstanceId(id + 1), absl::Milliseconds(50));
      if (!m.ok()) {
        if (m.status().code() == absl::StatusCode::kCancelled) return;
        continue;
      }
      if (m->tag != kGenerateRequestTag) continue;
      v1::GenerateReply reply = Serve(*m);
      std::string bytes = reply.SerializeAsString();
      transport::Message out;
      out.from = m->to;
      out.to = InstanceId(0);
      out.tag = kGenerateReplyTag;
      out.correlation_id = m->correlation_id;
      out.payload.resize(bytes.size());
      std::memcpy(out.payload.data(), bytes.data(), bytes.size());
      tcp_->Send(std::move(out)).IgnoreError();  // the coordinator's deadline covers a loss
    }
  }

  v1::GenerateReply Serve(const transport::Message& m) {
    v1::GenerateReply reply;
    auto fail = [&](const absl::Status& s) {
      reply.set_status_code(static_cast<int32_t>(s.code()));
      reply.set_error_message(std::string(s.message()));
      *reply.mutable_state() = State();
      return reply;
    };
    v1::GenerateRequest request;
    if (!request.ParseFromArray(m.payload.data(), static_cast<int>(m.payload.size()))) {
      return fail(absl::InvalidArgumentError("malformed generate request"));
    }
    if (absl::ToUnixMillis(absl::Now()) > request.deadline_unix_ms()) {
      return fail(absl::DeadlineExceededError("request expired in the instance's queue"));
    }
    const engine::LlamaConfig& config = model_->config();
    const int64_t total = static_cast<int64_t>(request.prompt_size()) + request.max_tokens();
    if (request.prompt_size() == 0 || request.max_tokens() < 1 ||
        (config.max_position_embeddings > 0 && total > config.max_position_embeddings)) {
      return fail(absl::InvalidArgumentError(absl::StrFormat(
          "prompt of %d tokens with max_tokens %d does not fit the context of %d",
          request.prompt_size(), request.max_tokens(), config.max_position_embeddings)));
    }
    const absl::Time start = absl::Now();
    std::vector<int32_t> prompt(request.prompt().begin(), request.prompt().end());
    absl::StatusOr<engine::GenerateResult> r = engine_->Generate(prompt, request.max_tokens());
    served_.fetch_add(1);
    RefreshState();
    if (!r.ok()) return fail(r.status());
    reply.mutable_tokens()->Add(r->tokens.begin(), r->tokens.end());
    reply.set_cached_tokens(r->cached_tokens);
    reply.set_compute_us(absl::ToInt64Microseconds(absl::Now() - start));
    *reply.mutable_state() = State();
    return reply;
  }

  const engine::LlamaModel* model_;
  const InstanceServerOptions options_;
  std::unique_ptr<engine::Engine> engine_;  // used by the worker thread only (after Start)
  std::unique_ptr<transport::TcpTransport> tcp_;
  std::shared_ptr<grpc::Channel> channel_;
  std::unique_ptr<v1::Coordinator::Stub> stub_;
  std::thread control_, worker_;
  std::atomic<bool> stopping_{false};
  std::atomic<int64_t> served_{0};

  mutable absl::Mutex mu_;
  v1::InstanceState state_ ABSL_GUARDED_BY(mu_);
  int32_t id_ ABSL_GUARDED_BY(mu_) = -1;
  uint64_t epoch_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t registrations_ ABSL_GUARDED_BY(mu_) = 0;
  absl::Duration heartbeat_interval_ ABSL_GUARDED_BY(mu_) = absl::Milliseconds(200);
};

absl::StatusOr<std::unique_ptr<InstanceServer>> InstanceServer::Create(
    const engine::LlamaModel* model, const InstanceServerOptions& options) {
  if (model == nullptr) return absl::InvalidArgumentError("InstanceServer: model is null");
  if (options.name.empty()) return absl::InvalidArgumentError("InstanceServer: name is empty");
  if (options.coordinator_port < 1 || options.coordinator_port > 65535) {
    return absl::InvalidArgumentError(
        absl::StrFormat("InstanceServer: coordinator_port must be in [1, 65535], got %d",
                        options.coordinator_port));
  }
  if (options.slots < 1 || options.segment_tokens < 1) {
    return absl::InvalidArgumentError("InstanceServer: slots and segment_tokens must be >= 1");
  }
  auto impl = std::make_unique<Impl>(model, options);
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
int64_t InstanceServer::segments() const { return impl_->State().segments_size(); }
void InstanceServer::Shutdown() { impl_->Shutdown(); }

}  // namespace tokenlake::service
