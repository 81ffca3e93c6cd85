#include "tokenlake/service/request_path.h"

#include <algorithm>
#include <cstdio>
#include <cstring>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/prompt.h"
#include "tokenlake/service/lake_rpc.h"
#include "tokenlake/transport/cluster_secret.h"

namespace tokenlake::service {
namespace {

std::vector<double> LatencyBoundsSeconds() {
  return {0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30};
}

}  // namespace

RequestPath::RequestPath(const Options& options, GuardedLake* lake, Membership* membership,
                         Router* router, transport::Transport* transport,
                         std::function<void()> on_served)
    : options_(options),
      lake_(lake),
      membership_(membership),
      router_(router),
      transport_(transport),
      on_served_(std::move(on_served)),
      latency_(LatencyBoundsSeconds()),
      next_request_id_(options.first_request_id) {}

RequestPath::~RequestPath() { Join(); }

void RequestPath::Start() {
  receiver_ = std::thread([this] { ReceiveLoop(); });
}

void RequestPath::Join() {
  if (receiver_.joinable()) receiver_.join();
}

void RequestPath::FailAll(const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  for (auto& [ticket, p] : pending_) {
    if (!p.done) {
      p.done = true;
      p.status = status;
    }
  }
}

void RequestPath::FailPendingOn(int32_t id, const absl::Status& status) {
  absl::MutexLock lock(&mu_);
  for (auto& [ticket, p] : pending_) {
    if (p.instance == id && !p.done) {
      p.done = true;
      p.status = status;
    }
  }
}

void RequestPath::CountAnswer(int http_status) {
  absl::MutexLock lock(&mu_);
  ++stats_.requests_by_code[http_status];
}

RequestPath::Stats RequestPath::stats() const {
  Stats s;
  {
    absl::MutexLock lock(&mu_);
    s = stats_;
  }
  s.latency = latency_.Read();
  return s;
}

absl::StatusOr<CompletionResult> RequestPath::Complete(const CompletionRequest& request) {
  return Complete(request, nullptr);
}

absl::StatusOr<CompletionResult> RequestPath::Complete(const CompletionRequest& request,
                                                       const TokenSink& sink) {
  const absl::Time start = absl::Now();
  absl::StatusOr<CompletionResult> r = CompleteInner(request, start, sink);
  latency_.Observe(absl::ToDoubleSeconds(absl::Now() - start));
  absl::MutexLock lock(&mu_);
  ++stats_.requests_by_code[r.ok() ? 200 : HttpStatusFor(r.status())];
  if (r.ok()) {
    stats_.prompt_tokens += static_cast<int64_t>(request.prompt.size());
    stats_.cached_tokens += r->cached_tokens;
    stats_.generated_tokens += static_cast<int64_t>(r->tokens.size());
    if (r->cancelled) ++stats_.cancelled_requests;
  }
  return r;
}

// The tokens a request's sink has been given across its attempts; a retried attempt's tokens
// that were given already must repeat them (generation is deterministic for a seed).
struct RequestPath::Delivery {
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

  CompletionResult Finish(int32_t id, int32_t attempt, const char* finish_reason, bool cancelled) {
    CompletionResult out;
    out.tokens = std::move(tokens);
    out.cached_tokens = std::max<int64_t>(0, cached_tokens);
    out.instance = id;
    out.attempts = attempt;
    out.finish_reason = finish_reason;
    out.cancelled = cancelled;
    return out;
  }
};

namespace {

// The generate message of `request` (without its per-attempt id and deadline). A request
// without a seed gets one here, so that every attempt draws the same tokens.
v1::GenerateRequest ToGenerateMessage(const CompletionRequest& request, bool stream) {
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

absl::Status DivergedError(int32_t id) {
  return absl::InternalError(absl::StrFormat(
      "a retried attempt on instance %d produced other tokens than were already sent", id));
}

}  // namespace

void RequestPath::SendCancel(int32_t id, RequestId request) {
  v1::CancelGenerate cancel;
  cancel.set_request_id(request.value());
  // A lost cancel costs the instance the rest of the generation, nothing more.
  transport_->Send(ProtocolMessage(InstanceId(0), InstanceId(id + 1), kCancelTag, 0, cancel))
      .IgnoreError();
}

RequestPath::Pending RequestPath::AwaitAttempt(uint64_t ticket, int32_t id,
                                               absl::Time request_deadline, absl::Time sent_at,
                                               Delivery& delivery, const TokenSink& sink,
                                               bool* ended) {
  *ended = false;
  absl::Time deadline = std::min(request_deadline, sent_at + options_.attempt_timeout);
  absl::Time heard = sent_at;
  mu_.Lock();
  Pending* p = &pending_[ticket];  // a std::map: stable, and only this waiter erases it
  while (true) {
    auto ready = [p]() { return p->done || !p->progress.empty(); };
    mu_.AwaitWithDeadline(absl::Condition(&ready), deadline);
    if (p->progress.empty()) break;
    std::vector<v1::GenerateProgress> reports = std::move(p->progress);
    p->progress.clear();
    // Word from the instance: the attempt lives on. Silence fails it, not its length.
    heard = absl::Now();
    deadline = std::min(request_deadline, heard + options_.attempt_timeout);
    mu_.Unlock();
    bool go = true;
    for (const v1::GenerateProgress& g : reports) {
      // A report before the first token (the instance saying it still runs the request) does
      // not know the request's hits yet.
      if (delivery.cached_tokens < 0 && g.tokens_size() > 0) {
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
    p->status = absl::DeadlineExceededError(
        deadline == request_deadline
            ? absl::StrFormat("instance %d did not answer within %s (the request's deadline)", id,
                              absl::FormatDuration(deadline - sent_at))
            : absl::StrFormat("instance %d did not answer within %s (nothing heard for %s)", id,
                              absl::FormatDuration(deadline - sent_at),
                              absl::FormatDuration(deadline - heard)));
  }
  Pending result = std::move(*p);
  pending_.erase(ticket);
  mu_.Unlock();
  return result;
}

absl::StatusOr<CompletionResult> RequestPath::CompleteInner(const CompletionRequest& request,
                                                            absl::Time start,
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
      index::TenantSalt(options_.salt, request.cache_salt),
      absl::MakeConstSpan(request.prompt).subspan(0, static_cast<size_t>(full)),
      options_.segment_tokens);
  if (!keys.ok()) return keys.status();

  const absl::Time deadline = start + options_.request_timeout;
  absl::flat_hash_set<int32_t> excluded;
  std::string failures;
  v1::GenerateRequest message = ToGenerateMessage(request, sink != nullptr);
  if (!request.cache_salt.empty()) {
    message.set_segment_salt(index::TenantSalt(options_.salt, request.cache_salt));
  }
  Delivery delivery;
  const int64_t prompt_tokens = static_cast<int64_t>(request.prompt.size());
  for (int32_t attempt = 1; attempt <= options_.max_attempts; ++attempt) {
    const absl::Time now = absl::Now();
    if (now >= deadline) break;
    const absl::Time attempt_deadline = std::min(deadline, now + options_.attempt_timeout);
    message.set_deadline_unix_ms(absl::ToUnixMillis(attempt_deadline));
    // The attempt's lake request id, taken before routing: the router records the request's
    // work under it (an attempt that finds no instance leaves its id unused).
    RequestId lake_request;
    {
      absl::MutexLock lock(&mu_);
      lake_request = RequestId(next_request_id_++);
    }
    absl::StatusOr<int32_t> target = router_->Route(*keys, prompt_tokens, excluded, lake_request);
    if (!target.ok()) {
      if (failures.empty()) return target.status();
      break;
    }
    const int32_t id = *target;
    uint64_t ticket;
    membership_->BeginRequest(id);
    {
      absl::MutexLock lock(&mu_);
      // Unpredictable, so that nobody can guess which reply a request waits for.
      do {
        ticket = transport::RandomU64();
      } while (ticket == 0 || pending_.count(ticket) > 0);
      pending_[ticket].instance = id;
      if (attempt > 1) ++stats_.failovers;
    }
    message.set_request_id(lake_request.value());
    transport::Message m =
        ProtocolMessage(InstanceId(0), InstanceId(id + 1), kGenerateRequestTag, ticket, message);
    const size_t bytes = m.payload.size();
    absl::Status sent = transport_->Send(std::move(m));
    Pending result;
    bool ended = false;
    if (sent.ok()) {
      {
        absl::MutexLock lock(&mu_);
        stats_.bytes_sent += static_cast<int64_t>(bytes);
      }
      result = AwaitAttempt(ticket, id, deadline, now, delivery, sink, &ended);
    } else {
      absl::MutexLock lock(&mu_);
      result.status = sent;
      pending_.erase(ticket);
    }
    membership_->EndRequest(id, lake_request);
    if (ended) {
      // The sink stopped the request (or a retry diverged): the instance drops it and releases
      // its pins in the lake (Engine::Cancel). Released here instead, the instance's next plan
      // of it would fail first; a lost cancel costs only the rest of the generation, after
      // which the instance releases them as for any finished request.
      SendCancel(id, lake_request);
      if (delivery.diverged) return DivergedError(id);
      return delivery.Finish(id, attempt, "stop", /*cancelled=*/true);
    }
    bool answered_with_error = false;
    if (result.status.ok()) {
      const v1::GenerateReply& reply = result.reply;
      {
        const v1::InstanceTraffic& t = reply.traffic();
        absl::MutexLock lock(&mu_);
        stats_.remote_attend_calls += t.remote_attend_calls();
        stats_.query_bytes_out += t.query_bytes_out();
        stats_.partial_bytes_back += t.partial_bytes_back();
        stats_.pulled_segments += t.pulled_segments();
        stats_.pulled_bytes += t.pulled_bytes();
        stats_.remote_stored_segments += t.remote_stored_segments();
        stats_.remote_stored_bytes += t.remote_stored_bytes();
      }
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
        if (on_served_) on_served_();
        if (delivery.diverged) return DivergedError(id);
        return delivery.Finish(id, attempt, stopped ? "stop" : "length", /*cancelled=*/!go);
      }
    }
    // The attempt failed: its pins in the lake go (the instance may have died holding them),
    // and an instance that went silent but may still run it is told to drop it.
    ReleaseQuietly(lake_request);
    if (sent.ok() && !answered_with_error) SendCancel(id, lake_request);
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

void RequestPath::ReleaseQuietly(RequestId request) {
  absl::MutexLock lake_lock(&lake_->mu);
  lake_->lake->Release(request).IgnoreError();  // NotFound: the instance released it already
}

void RequestPath::TakeProgress(const transport::Message& m) {
  v1::GenerateProgress progress;
  if (!progress.ParseFromArray(m.payload.data(), static_cast<int>(m.payload.size()))) return;
  absl::MutexLock lock(&mu_);
  stats_.bytes_received += static_cast<int64_t>(m.payload.size());
  auto it = pending_.find(m.correlation_id);
  if (it == pending_.end() || it->second.done || it->second.instance != m.from.value() - 1) {
    return;
  }
  it->second.progress.push_back(std::move(progress));
}

void RequestPath::ReceiveLoop() {
  while (true) {
    absl::StatusOr<transport::Message> m =
        transport_->Receive(InstanceId(0), absl::Milliseconds(100));
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
    const int32_t from = m->from.value() - 1;
    // Membership ignores the report of an instance that is not alive.
    if (parsed && from >= 0 && from < membership_->num_instances()) {
      membership_->Report(from, reply.state());
    }
    absl::MutexLock lock(&mu_);
    stats_.bytes_received += static_cast<int64_t>(m->payload.size());
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

}  // namespace tokenlake::service
