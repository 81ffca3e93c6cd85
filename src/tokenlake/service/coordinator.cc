#include "tokenlake/service/coordinator.h"

#include <grpcpp/grpcpp.h>
#include <httplib.h>

#include <algorithm>
#include <atomic>
#include <cstring>
#include <map>
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
#include "tokenlake/index/segment_id.h"
#include "tokenlake/service/metrics.h"
#include "tokenlake/service/segment_directory.h"
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
  absl::Time last_heartbeat;
  int64_t in_flight = 0;
  int64_t routed = 0;
  int64_t used_slots = 0;
  int64_t capacity_slots = 0;
  int64_t slot_bytes = 0;
  int64_t incarnations = 0;
};

struct Pending {
  int32_t instance = -1;
  bool done = false;
  absl::Status status;
  v1::GenerateReply reply;
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
  if (o.heavy_hitter_min_requests < 1 || o.heavy_hitter_replicas < 1) {
    return bad("heavy_hitter_min_requests and heavy_hitter_replicas must be >= 1");
  }
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
        directory_(options.segment_tokens, kMaxInstances),
        members_(kMaxInstances),
        latency_(LatencyBoundsSeconds()),
        epoch_(std::random_device{}() | (uint64_t{std::random_device{}()} << 32)) {}

  ~Impl() override { Shutdown(); }

  absl::Status Start() {
    auto tcp = transport::TcpTransport::Create({.num_endpoints = kMaxInstances + 1,
                                                .local_endpoints = {InstanceId(0)},
                                                .port = options_.transport_port});
    if (!tcp.ok()) return tcp.status();
    tcp_ = std::move(*tcp);
    auto fault = transport::FaultTransport::Create(tcp_.get(), options_.faults);
    if (!fault.ok()) return fault.status();
    fault_ = std::move(*fault);

    grpc::ServerBuilder builder;
    builder.AddListeningPort(absl::StrCat("127.0.0.1:", options_.grpc_port),
                             grpc::InsecureServerCredentials(), &grpc_port_);
    builder.RegisterService(this);
    grpc_server_ = builder.BuildAndStart();
    if (grpc_server_ == nullptr || grpc_port_ == 0) {
      return absl::UnavailableError(
          absl::StrFormat("Coordinator: cannot serve gRPC on 127.0.0.1:%d", options_.grpc_port));
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
  }

  // ---- gRPC ----

  grpc::Status Register(grpc::ServerContext*, const v1::RegisterRequest* request,
                        v1::RegisterReply* reply) override {
    if (request->namespace_name() != options_.namespace_name ||
        request->segment_tokens() != options_.segment_tokens) {
      return grpc::Status(
          grpc::StatusCode::FAILED_PRECONDITION,
          absl::StrFormat("instance '%s' uses namespace '%s' and %d-token "
                          "segments; the coordinator uses '%s' and %d",
                          request->name(), request->namespace_name(), request->segment_tokens(),
                          options_.namespace_name, options_.segment_tokens));
    }
    if (request->transport_port() < 1 || request->transport_port() > 65535) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, "transport_port outside [1, 65535]");
    }
    absl::MutexLock lock(&mu_);
    int32_t id = -1;
    for (int32_t i = 0; i < kMaxInstances; ++i) {
      if (members_[i].registered && members_[i].name == request->name()) id = i;
    }
    if (id < 0) {
      const int32_t preferred = request->preferred_id();
      if (preferred >= 0 && preferred < kMaxInstances && !members_[preferred].registered) {
        id = preferred;
      } else {
        for (int32_t i = 0; i < kMaxInstances && id < 0; ++i) {
          if (!members_[i].registered) id = i;
        }
      }
    }
    if (id < 0) {
      return grpc::Status(grpc::StatusCode::RESOURCE_EXHAUSTED,
                          absl::StrFormat("the cluster is full (%d instances)", kMaxInstances));
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
    m.last_heartbeat = absl::Now();
    ++m.incarnations;
    if (!tcp_->SetPeer(InstanceId(id + 1), m.transport_port).ok()) {
      return grpc::Status(grpc::StatusCode::INTERNAL, "cannot route to the instance");
    }
    if (absl::Status s = ApplyStateLocked(id, request->state()); !s.ok()) {
      m.registered = false;
      m.alive = false;
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(s.message()));
    }
    reply->set_instance_id(id);
    reply->set_endpoint(id + 1);
    reply->set_coordinator_transport_port(tcp_->port());
    reply->set_heartbeat_interval_ms(absl::ToInt64Milliseconds(options_.heartbeat_interval));
    reply->set_coordinator_epoch(epoch_);
    return grpc::Status::OK;
  }

  grpc::Status Heartbeat(grpc::ServerContext*, const v1::HeartbeatRequest* request,
                         v1::HeartbeatReply*) override {
    absl::MutexLock lock(&mu_);
    const int32_t id = request->instance_id();
    if (request->coordinator_epoch() != epoch_ || id < 0 || id >= kMaxInstances ||
        !members_[id].registered || !members_[id].alive) {
      return grpc::Status(grpc::StatusCode::NOT_FOUND, "unknown instance: register again");
    }
    members_[id].last_heartbeat = absl::Now();
    if (absl::Status s = ApplyStateLocked(id, request->state()); !s.ok()) {
      return grpc::Status(grpc::StatusCode::INVALID_ARGUMENT, std::string(s.message()));
    }
    return grpc::Status::OK;
  }

  // ---- requests ----

  absl::StatusOr<CompletionResult> Complete(const CompletionRequest& request) {
    const absl::Time start = absl::Now();
    absl::StatusOr<CompletionResult> r = CompleteInner(request, start);
    const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
    latency_.Observe(seconds);
    absl::MutexLock lock(&mu_);
    ++requests_by_code_[r.ok() ? 200 : HttpStatusFor(r.status())];
    if (r.ok()) {
      prompt_tokens_ += static_cast<int64_t>(request.prompt.size());
      cached_tokens_ += r->cached_tokens;
      generated_tokens_ += static_cast<int64_t>(r->tokens.size());
    }
    return r;
  }

  absl::StatusOr<CompletionResult> CompleteInner(const CompletionRequest& request,
                                                 absl::Time start) {
    if (request.prompt.empty() || request.max_tokens < 1 ||
        request.max_tokens > options_.limits.max_tokens_limit ||
        static_cast<int64_t>(request.prompt.size()) + request.max_tokens >
            options_.limits.context_tokens) {
      return absl::InvalidArgumentError("request does not fit the limits");
    }
    for (size_t i = 0; i < request.prompt.size(); ++i) {
      if (request.prompt[i] < 0 || request.prompt[i] >= options_.limits.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrFormat("prompt[%d] = %d is outside the vocabulary [0, %d)", i,
                            request.prompt[i], options_.limits.vocab_size));
      }
    }
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
    v1::GenerateRequest message;
    message.mutable_prompt()->Add(request.prompt.begin(), request.prompt.end());
    message.set_max_tokens(request.max_tokens);
    for (int32_t attempt = 1; attempt <= options_.max_attempts; ++attempt) {
      const absl::Time now = absl::Now();
      if (now >= deadline) break;
      const absl::Time attempt_deadline = std::min(deadline, now + options_.attempt_timeout);
      message.set_deadline_unix_ms(absl::ToUnixMillis(attempt_deadline));
      absl::StatusOr<int32_t> target = Route(*keys, excluded);
      if (!target.ok()) {
        if (failures.empty()) return target.status();
        break;
      }
      const int32_t id = *target;
      uint64_t ticket;
      {
        absl::MutexLock lock(&mu_);
        ticket = next_ticket_++;
        pending_[ticket].instance = id;
        ++members_[id].in_flight;
        ++members_[id].routed;
        if (attempt > 1) ++failovers_;
      }
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
      {
        absl::MutexLock lock(&mu_);
        if (sent.ok()) {
          bytes_sent_ += static_cast<int64_t>(bytes.size());
          Pending* p = &pending_[ticket];
          auto done = [p]() { return p->done; };
          mu_.AwaitWithDeadline(absl::Condition(&done), attempt_deadline);
          if (!p->done) {
            p->status = absl::DeadlineExceededError(
                absl::StrFormat("instance %d did not answer within %s", id,
                                absl::FormatDuration(attempt_deadline - now)));
          }
          result = std::move(*p);
        } else {
          result.status = sent;
        }
        pending_.erase(ticket);
        --members_[id].in_flight;
      }
      if (result.status.ok()) {
        const v1::GenerateReply& reply = result.reply;
        if (reply.status_code() != 0) {
          absl::Status s(static_cast<absl::StatusCode>(reply.status_code()),
                         absl::StrCat("instance ", id, ": ", reply.error_message()));
          // The instance judged the request itself: retrying elsewhere would not help, except
          // for an instance that ran out of time or room.
          if (s.code() != absl::StatusCode::kDeadlineExceeded &&
              s.code() != absl::StatusCode::kResourceExhausted) {
            return s;
          }
          result.status = s;
        } else {
          CompletionResult out;
          out.tokens.assign(reply.tokens().begin(), reply.tokens().end());
          out.cached_tokens = reply.cached_tokens();
          out.instance = id;
          out.attempts = attempt;
          if (static_cast<int32_t>(out.tokens.size()) != request.max_tokens) {
            return absl::InternalError(
                absl::StrFormat("instance %d returned %d tokens, expected %d", id,
                                out.tokens.size(), request.max_tokens));
          }
          return out;
        }
      }
      excluded.insert(id);
      absl::StrAppend(&failures, failures.empty() ? "" : "; ", "attempt ", attempt, " on instance ",
                      id, ": ", result.status.message());
    }
    if (absl::Now() >= deadline) {
      return absl::DeadlineExceededError(
          absl::StrFormat("request not served within %s (%s)",
                          absl::FormatDuration(options_.request_timeout), failures));
    }
    return absl::UnavailableError(absl::StrCat("request failed on every attempt: ", failures));
  }

  // Picks the instance for a request (see the file comment of coordinator.h).
  absl::StatusOr<int32_t> Route(absl::Span<const index::SegmentKey> keys,
                                const absl::flat_hash_set<int32_t>& excluded) {
    absl::MutexLock lock(&mu_);
    std::vector<int32_t> live;
    int64_t min_load = INT64_MAX;
    for (int32_t i = 0; i < kMaxInstances; ++i) {
      if (members_[i].alive && !excluded.contains(i)) {
        live.push_back(i);
        min_load = std::min(min_load, members_[i].in_flight);
      }
    }
    if (live.empty()) {
      return absl::UnavailableError(absl::StrFormat(
          "no live instance to serve the request (%d excluded after failures)", excluded.size()));
    }
    struct Candidate {
      int32_t id;
      int64_t matched;
      int64_t load;
      int64_t routed;
    };
    std::vector<Candidate> candidates;
    for (int32_t i : live) {
      if (members_[i].in_flight > min_load + options_.balance_abs_threshold) continue;
      candidates.push_back(
          {i, directory_.MatchedTokens(i, keys), members_[i].in_flight, members_[i].routed});
    }
    auto better = [](const Candidate& a, const Candidate& b) {
      if (a.matched != b.matched) return a.matched > b.matched;
      if (a.load != b.load) return a.load < b.load;
      if (a.routed != b.routed) return a.routed < b.routed;
      return a.id < b.id;
    };
    std::sort(candidates.begin(), candidates.end(), better);
    if (!keys.empty()) {
      const SegmentId head = keys.front().id;
      const int64_t seen = ++head_requests_[head];
      const int32_t want =
          std::min<int32_t>(options_.heavy_hitter_replicas, static_cast<int32_t>(live.size()));
      if (seen >= options_.heavy_hitter_min_requests && directory_.ReplicaCount(head) < want) {
        // Replicate the heavy hitter: the least loaded candidate that lacks it.
        for (const Candidate& c : candidates) {
          if (c.matched == 0 && c.load == min_load) {
            ++heavy_hitter_replications_;
            return c.id;
          }
        }
      }
    }
    return candidates.front().id;
  }

  void ReceiveLoop() {
    while (true) {
      absl::StatusOr<transport::Message> m =
          fault_->Receive(InstanceId(0), absl::Milliseconds(100));
      if (!m.ok()) {
        if (m.status().code() == absl::StatusCode::kCancelled) return;
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
        ApplyStateLocked(from, reply.state()).IgnoreError();
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

  void ReapLoop() {
    while (!stopping_.load()) {
      absl::SleepFor(std::min(options_.heartbeat_interval / 2, absl::Milliseconds(50)));
      absl::MutexLock lock(&mu_);
      const absl::Time now = absl::Now();
      for (int32_t i = 0; i < kMaxInstances; ++i) {
        Member& m = members_[i];
        if (!m.alive || now - m.last_heartbeat <= options_.dead_after) continue;
        m.alive = false;
        ++deaths_;
        directory_.DropInstance(i);
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

  absl::Status ApplyStateLocked(int32_t id, const v1::InstanceState& state)
      ABSL_EXCLUSIVE_LOCKS_REQUIRED(mu_) {
    std::vector<SegmentRecord> records;
    records.reserve(state.segments_size());
    for (const v1::Segment& s : state.segments()) {
      records.push_back({SegmentId(s.id()), s.num_tokens()});
    }
    if (absl::Status s = directory_.ReplaceInstance(id, records); !s.ok()) return s;
    Member& m = members_[id];
    m.used_slots = state.used_slots();
    m.capacity_slots = state.capacity_slots();
    m.slot_bytes = state.slot_bytes();
    return absl::OkStatus();
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
    http_->Post("/v1/completions", [this](const httplib::Request& req, httplib::Response& res) {
      absl::StatusOr<CompletionRequest> parsed = ParseCompletionRequest(req.body, options_.limits);
      if (!parsed.ok()) {
        {
          absl::MutexLock lock(&mu_);
          ++requests_by_code_[HttpStatusFor(parsed.status())];
        }
        res.status = HttpStatusFor(parsed.status());
        res.set_content(ErrorJson(parsed.status()), "application/json");
        return;
      }
      absl::StatusOr<CompletionResult> result = Complete(*parsed);
      if (!result.ok()) {
        res.status = HttpStatusFor(result.status());
        res.set_content(ErrorJson(result.status()), "application/json");
        return;
      }
      res.status = 200;
      res.set_content(CompletionResponseJson(*parsed, *result, next_response_id_.fetch_add(1)),
                      "application/json");
    });
    http_->Get("/metrics", [this](const httplib::Request&, httplib::Response& res) {
      res.set_content(MetricsText(), "text/plain; version=0.0.4");
    });
    http_->Get("/healthz", [this](const httplib::Request&, httplib::Response& res) {
      const int32_t live = LiveInstances();
      res.status = live > 0 ? 200 : 503;
      res.set_content(absl::StrFormat("{\"status\":\"%s\",\"live_instances\":%d}",
                                      live > 0 ? "ok" : "no live instance", live),
                      "application/json");
    });
    http_->set_error_handler([](const httplib::Request&, httplib::Response& res) {
      if (!res.body.empty()) return;
      absl::Status s;
      if (res.status == 404) {
        s = absl::NotFoundError(
            "no such endpoint (POST /v1/completions, GET /metrics, GET /healthz)");
      } else if (res.status == 413) {
        s = absl::InvalidArgumentError("request body too large");
      } else {
        s = absl::InvalidArgumentError(absl::StrFormat("HTTP error %d", res.status));
      }
      std::string body = ErrorJson(s);
      res.set_content(body, "application/json");
    });
  }

  std::string MetricsText() const {
    PrometheusWriter w;
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
    w.Family("tokenlake_pool_segments", "gauge", "Distinct segments in the cluster prefix tree.");
    w.Sample("tokenlake_pool_segments", {}, static_cast<double>(directory_.distinct_segments()));
    w.Family("tokenlake_pool_replicas", "gauge", "Stored segment copies in the cluster.");
    w.Sample("tokenlake_pool_replicas", {}, static_cast<double>(directory_.total_replicas()));
    int64_t pooled_bytes = 0;
    for (int32_t i = 0; i < kMaxInstances; ++i) {
      if (members_[i].alive) pooled_bytes += members_[i].used_slots * members_[i].slot_bytes;
    }
    w.Family("tokenlake_pool_bytes", "gauge",
             "KV bytes held in the pool (used slots x slot bytes).");
    w.Sample("tokenlake_pool_bytes", {}, static_cast<double>(pooled_bytes));
    w.Family("tokenlake_instance_alive", "gauge", "1 if the instance is alive.");
    for (int32_t i = 0; i < kMaxInstances; ++i) {
      if (!members_[i].registered) continue;
      w.Sample("tokenlake_instance_alive",
               {{"instance", absl::StrCat(i)}, {"name", members_[i].name}},
               members_[i].alive ? 1 : 0);
    }
    auto per_instance = [&](const char* name, const char* type, const char* help, auto value) {
      w.Family(name, type, help);
      for (int32_t i = 0; i < kMaxInstances; ++i) {
        if (!members_[i].registered) continue;
        w.Sample(name, {{"instance", absl::StrCat(i)}}, static_cast<double>(value(i)));
      }
    };
    per_instance("tokenlake_instance_segments", "gauge", "Segments (replicas) held per instance.",
                 [&](int32_t i) { return directory_.SegmentsOn(i); });
    per_instance("tokenlake_instance_tokens", "gauge", "Cached tokens held per instance.",
                 [&](int32_t i) { return directory_.TokensOn(i); });
    per_instance("tokenlake_instance_used_bytes", "gauge", "KV bytes held per instance.",
                 [&](int32_t i) { return members_[i].used_slots * members_[i].slot_bytes; });
    per_instance("tokenlake_instance_in_flight", "gauge", "Requests in flight per instance.",
                 [&](int32_t i) { return members_[i].in_flight; });
    per_instance("tokenlake_instance_routed_total", "counter", "Requests routed per instance.",
                 [&](int32_t i) { return members_[i].routed; });
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
    w.Family("tokenlake_heavy_hitter_replications_total", "counter",
             "Requests routed to replicate a heavy-hitter prefix.");
    w.Sample("tokenlake_heavy_hitter_replications_total", {},
             static_cast<double>(heavy_hitter_replications_));
    return w.text();
  }

  int32_t LiveInstances() const {
    absl::MutexLock lock(&mu_);
    int32_t n = 0;
    for (const Member& m : members_) n += m.alive ? 1 : 0;
    return n;
  }

  int64_t DistinctSegments() const {
    absl::MutexLock lock(&mu_);
    return directory_.distinct_segments();
  }

  const CoordinatorOptions options_;
  const uint64_t salt_;
  int grpc_port_ = 0;
  int http_port_ = 0;
  std::unique_ptr<transport::TcpTransport> tcp_;
  std::unique_ptr<transport::FaultTransport> fault_;
  std::unique_ptr<grpc::Server> grpc_server_;
  std::unique_ptr<httplib::Server> http_;
  std::thread http_thread_, receiver_, reaper_;
  std::atomic<bool> stopping_{false};
  std::atomic<uint64_t> next_response_id_{1};

  mutable absl::Mutex mu_;
  SegmentDirectory directory_ ABSL_GUARDED_BY(mu_);
  std::vector<Member> members_ ABSL_GUARDED_BY(mu_);
  // A std::map: a waiter's Pending* stays valid while other requests come and go.
  std::map<uint64_t, Pending> pending_ ABSL_GUARDED_BY(mu_);
  uint64_t next_ticket_ ABSL_GUARDED_BY(mu_) = 1;
  absl::flat_hash_map<SegmentId, int64_t> head_requests_ ABSL_GUARDED_BY(mu_);
  std::map<int, int64_t> requests_by_code_ ABSL_GUARDED_BY(mu_);
  int64_t prompt_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t cached_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t generated_tokens_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_sent_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t bytes_received_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t failovers_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t deaths_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t rejoins_ ABSL_GUARDED_BY(mu_) = 0;
  int64_t heavy_hitter_replications_ ABSL_GUARDED_BY(mu_) = 0;
  Histogram latency_;
  const uint64_t epoch_;
};

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
  return impl_->Complete(request);
}
std::string Coordinator::MetricsText() const { return impl_->MetricsText(); }
int32_t Coordinator::LiveInstances() const { return impl_->LiveInstances(); }
int64_t Coordinator::DistinctSegments() const { return impl_->DistinctSegments(); }
transport::FaultTransport* Coordinator::faults() { return impl_->fault_.get(); }
void Coordinator::Shutdown() { impl_->Shutdown(); }

}  // namespace tokenlake::service
