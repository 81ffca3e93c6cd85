#include "tokenlake/engine/iteration_loop.h"

#include <algorithm>
#include <chrono>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/ops.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/prompt.h"

namespace tokenlake::engine {

namespace {

int64_t NowUs() {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

}  // namespace

struct IterationLoop::Active {
  LoopRequest req;
  std::vector<int32_t> seq;  // prompt + the tokens fed since (it only grows)
  // The chained keys of seq's first keys.size() full segments, extended as they are needed
  // (each segment is hashed once, not at every iteration).
  std::vector<index::SegmentKey> keys;
  int64_t pooled = 0;      // tokens of the sequence's prefix held by the pool (multiple of S)
  int64_t computed = 0;    // tokens whose KV exists (pool prefix + tail); tail = [pooled, computed)
  bool begun = false;      // the executor has its sequence
  bool fresh = true;       // the next plan is a prefill (prefill = true: start or restart)
  bool first_plan = true;  // count hits and report cached_tokens once
  bool holds_pins = false;  // an admitted plan not yet released
  bool has_tail = false;    // tails in the pool: the control plane may hold slots of its tail
  // The control plane holds something of it (pins or tail slots) that a release gives back.
  bool holds_pool() const { return holds_pins || has_tail; }
  // Its KV is dropped: the next plan prefills its whole sequence again from what the pool holds.
  void Restart() {
    fresh = true;
    pooled = computed = 0;
    ++result.restarts;
  }
  bool failed = false;  // its result went out with an error
  int64_t chunk = 0;    // tokens allotted in the iteration being planned
  InstanceId last_compute;
  std::unique_ptr<Sampler> sampler;
  bool stopped = false;  // produced a stop token
  LoopResult result;
};

int64_t IterationLoop::MaxTokens(const Active& a) {
  return static_cast<int64_t>(a.req.prompt.size()) + a.req.max_new_tokens;
}

int64_t IterationLoop::Remaining(const Active& a) {
  return static_cast<int64_t>(a.seq.size()) - (a.fresh ? 0 : a.computed);
}

bool IterationLoop::Decoding(const Active& a) { return !a.fresh && Remaining(a) == 1; }

LoopLoad IterationLoop::Load() const {
  LoopLoad load;
  for (const auto& a : requests_) {
    if (Decoding(*a)) {
      ++load.decode_requests;
      load.decode_context_tokens += a->computed;
    } else {
      ++load.prefill_requests;
      load.prefill_tokens += Remaining(*a);
      load.prefill_context_tokens += static_cast<int64_t>(a->seq.size());
    }
  }
  return load;
}

absl::StatusOr<std::unique_ptr<IterationLoop>> IterationLoop::Create(
    lake::ControlPlane* control, IterationExecutor* executor, const IterationLoopOptions& options) {
  if (control == nullptr || executor == nullptr) {
    return absl::InvalidArgumentError("IterationLoop: control plane and executor must be set");
  }
  if (options.segment_tokens < 1 || options.max_batch_tokens < 1 ||
      options.max_batch_requests < 1 || options.vocab_size < 1 || options.max_request_tokens < 0 ||
      options.pool_tokens < 0 || options.rotate_over_instances < 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "IterationLoop: segment_tokens %d, max_batch_tokens %d, max_batch_requests %d and "
        "vocab_size %d must be >= 1; max_request_tokens %d, pool_tokens %d and "
        "rotate_over_instances %d >= 0",
        options.segment_tokens, options.max_batch_tokens, options.max_batch_requests,
        options.vocab_size, options.max_request_tokens, options.pool_tokens,
        options.rotate_over_instances));
  }
  return std::unique_ptr<IterationLoop>(new IterationLoop(control, executor, options));
}

IterationLoop::IterationLoop(lake::ControlPlane* control, IterationExecutor* executor,
                             const IterationLoopOptions& options)
    : control_(control), executor_(executor), options_(options) {}

IterationLoop::~IterationLoop() {
  for (const auto& a : requests_) {
    if (a->holds_pool()) pending_release_.push_back(a->req.id);
    if (a->begun) executor_->EndSequence(a->req.id);
  }
  FlushReleases();
}

absl::Status IterationLoop::Submit(LoopRequest r) {
  if (!r.id.valid()) return absl::InvalidArgumentError("Submit: invalid request id");
  TOKENLAKE_RETURN_IF_ERROR(StatusWithPrefix(
      lake::ValidatePrompt(
          r.prompt, r.max_new_tokens, r.force_tokens,
          {.vocab_size = options_.vocab_size, .context_tokens = options_.max_request_tokens}),
      absl::StrFormat("Submit: request %d: ", r.id.value())));
  if (absl::Status v = r.sampling.Validate(); !v.ok()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("Submit: request %d: %s", r.id.value(), v.message()));
  }
  for (size_t i = 0; i < r.stop_token_ids.size(); ++i) {
    if (r.stop_token_ids[i] < 0 || r.stop_token_ids[i] >= options_.vocab_size) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "Submit: request %d: stop token %d at index %d is outside the vocabulary [0, %d)",
          r.id.value(), r.stop_token_ids[i], i, options_.vocab_size));
    }
  }
  const int64_t total = static_cast<int64_t>(r.prompt.size()) + r.max_new_tokens;
  const int64_t s = options_.segment_tokens;
  if (options_.pool_tokens > 0 && (total + s - 1) / s * s > options_.pool_tokens) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "Submit: request %d: prompt of %d tokens plus %d new tokens needs %d segments of %d "
        "tokens; the whole pool holds %d",
        r.id.value(), r.prompt.size(), r.max_new_tokens, (total + s - 1) / s, s,
        options_.pool_tokens / s));
  }
  for (const auto& a : requests_) {
    if (a->req.id == r.id) {
      return absl::AlreadyExistsError(
          absl::StrFormat("Submit: request %d is already in the loop", r.id.value()));
    }
  }
  auto a = std::make_unique<Active>();
  a->seq = r.prompt;
  a->result.id = r.id;
  a->req = std::move(r);
  requests_.push_back(std::move(a));
  return absl::OkStatus();
}

absl::Status IterationLoop::Cancel(RequestId id) {
  for (auto it = requests_.begin(); it != requests_.end(); ++it) {
    Active& a = **it;
    if (a.req.id != id) continue;
    // Released now, not with the next PlanBatch: a cancelled request must not keep its prefix
    // pinned while the loop waits for other work. The copies it stored are confirmed first.
    if (a.holds_pool()) ReleaseNow({id});
    if (a.begun) executor_->EndSequence(id);
    requests_.erase(it);
    if (requests_.empty()) FlushReleases();
    return absl::OkStatus();
  }
  return absl::NotFoundError(absl::StrFormat("Cancel: request %d is not in the loop", id.value()));
}

const LoopResult* IterationLoop::Progress(RequestId id) const {
  for (const auto& a : requests_) {
    if (a->req.id == id) return &a->result;
  }
  return nullptr;
}

uint64_t IterationLoop::SaltOf(const Active& a) const {
  return a.req.segment_salt != 0 ? a.req.segment_salt : options_.salt;
}

std::vector<index::SegmentKey> IterationLoop::KeysOf(Active& a, size_t segments) const {
  const int32_t s = options_.segment_tokens;
  for (size_t k = a.keys.size(); k < segments; ++k) {
    const uint64_t parent = k == 0 ? SaltOf(a) : a.keys.back().id.value();
    a.keys.push_back(
        {index::ChainSegmentId(parent, absl::MakeConstSpan(a.seq).subspan(k * s, s)), s});
  }
  return {a.keys.begin(), a.keys.begin() + static_cast<ptrdiff_t>(segments)};
}

absl::StatusOr<lake::IterationRequest> IterationLoop::MakeRequest(Active& a, int64_t chunk) const {
  const int32_t s = options_.segment_tokens;
  const int64_t size = static_cast<int64_t>(a.seq.size());
  // A prefill asks for the whole sequence and lets the control plane cut the chunk after the
  // cached prefix (only it knows how much is cached); a continuation names its end itself.
  const int64_t end = a.fresh ? size : std::min(size, a.computed + chunk);
  // Segments that may be served from the pool: only those before the first token to compute.
  const int64_t first_new = a.fresh ? size - 1 : a.computed;
  std::vector<index::SegmentKey> keys = KeysOf(a, static_cast<size_t>(end / s));
  InstanceId preferred = a.last_compute;
  if (options_.fixed_compute.valid()) {
    preferred = options_.fixed_compute;
  } else if (a.fresh) {
    preferred = options_.rotate_over_instances > 0
                    ? InstanceId(static_cast<int32_t>(
                          a.req.id.value() % static_cast<uint64_t>(options_.rotate_over_instances)))
                    : InstanceId();
  }
  return lake::IterationRequest{.request = a.req.id,
                                .keys = std::move(keys),
                                .max_cached_segments = static_cast<int32_t>(first_new / s),
                                .end_tokens = end,
                                .prefill = a.fresh,
                                .computed_tokens = a.fresh ? 0 : a.computed,
                                .preferred_instance = preferred,
                                .count_hits = a.fresh && a.first_plan,
                                .max_new_tokens = a.fresh ? chunk : 0,
                                .try_admit = options_.memory_admission,
                                .tail_in_pool = options_.tails_in_pool};
}

void IterationLoop::Preempt(Active& victim) {
  // Its tail's slots go back now (the starving request asks again next iteration); the pins
  // of an admitted plan it holds go with its next plan, as for any request.
  if (absl::Status s = control_->ReleaseTail(victim.req.id); !s.ok()) return;
  victim.has_tail = false;
  if (victim.begun) {
    victim.result.data_plane = executor_->EndSequence(victim.req.id);
    victim.begun = false;
  }
  victim.Restart();
}

void IterationLoop::Fail(Active& a, absl::Status status, std::vector<LoopResult>& done) {
  if (a.holds_pool()) {
    ReleaseNow({a.req.id});  // the copies it stored before failing stay (confirmed first)
    a.holds_pins = false;
    a.has_tail = false;
  }
  if (a.begun) {
    a.result.data_plane = executor_->EndSequence(a.req.id);
    a.begun = false;
  }
  a.result.status = std::move(status);
  a.failed = true;
  done.push_back(std::move(a.result));
}

void IterationLoop::FlushReleases() {
  if (pending_release_.empty() && to_confirm_.empty()) return;
  ReleaseNow(pending_release_);
  pending_release_.clear();
}

void IterationLoop::ReleaseNow(absl::Span<const RequestId> ids) {
  // One call: confirm what was stored, then release (a release drops unconfirmed copies).
  // Answers for ids no longer active (NotFound) are ignored by PlanBatch itself.
  absl::StatusOr<std::vector<lake::BatchPlanEntry>> r =
      control_->PlanBatch(to_confirm_, ids, {}, 0);
  // Failed on the wire: the confirmations go again with the next call (harmless if applied).
  if (r.ok() || !lake::FailedOnTheWire(r.status())) to_confirm_.clear();
}

absl::Status IterationLoop::Finish(Active& a, const lake::IterationPlan& plan, InstanceId compute,
                                   WorkOutput& output, bool want_logits, int64_t end) {
  const int32_t s = options_.segment_tokens;
  const bool external = options_.fixed_compute.valid();
  // Keys of the full segments up to the iteration's end, cut as the plan was.
  const std::vector<index::SegmentKey> keys =
      KeysOf(a, std::min(static_cast<size_t>(end / s), static_cast<size_t>(plan.num_keys)));
  a.computed = end;
  {
    TOKENLAKE_ASSIGN_OR_RETURN(lake::CommitResult commit,
                               control_->Commit(a.req.id, plan.new_segments));
    for (const lake::StoredReplica& e : commit.evicted) {
      // Only the evicted copy: the same segment placed there again since stays.
      absl::Status freed = executor_->FreeSegment(compute, e.instance, e.segment, commit.sequence);
      // Over an external pool the cluster reconciles stores with the lake: a copy already gone
      // is not this request's failure.
      if (!external) TOKENLAKE_RETURN_IF_ERROR(freed);
    }
    absl::flat_hash_map<SegmentId, InstanceId> stored_on;
    for (const lake::StoredReplica& st : commit.stored) stored_on[st.segment] = st.instance;
    const absl::flat_hash_set<SegmentId> dedup(commit.deduplicated.begin(),
                                               commit.deduplicated.end());
    int64_t now_pooled = a.pooled;
    bool contiguous = true;
    for (size_t j = static_cast<size_t>(a.pooled / s); j < keys.size(); ++j) {
      const SegmentId id = keys[j].id;
      auto it = stored_on.find(id);
      if (it != stored_on.end()) {
        const StoredMeta meta{j > 0 ? keys[j - 1].id : SegmentId(), keys[j].num_tokens,
                              commit.sequence};
        TOKENLAKE_ASSIGN_OR_RETURN(
            int64_t bytes,
            executor_->StoreSegment(a.req.id, compute, static_cast<int64_t>(j) * s - a.pooled,
                                    it->second, id, meta));
        // Stored: the copy becomes visible with the next control-plane call.
        to_confirm_.push_back({a.req.id, id, it->second});
        ++a.result.stored_segments;
        if (it->second != compute) {
          ++a.result.remote_stored_segments;
          a.result.remote_stored_bytes += bytes;
        }
      } else if (!dedup.contains(id)) {
        contiguous = false;  // not stored (no room): the tail keeps it
      }
      if (contiguous) now_pooled = static_cast<int64_t>(j + 1) * s;
    }
    TOKENLAKE_RETURN_IF_ERROR(executor_->DropTailRows(a.req.id, now_pooled - a.pooled));
    a.pooled = now_pooled;
  }
  if (!want_logits) return absl::OkStatus();
  const bool sampled = !a.req.sampling.greedy();
  const bool has_logits = output.logits.size() == static_cast<size_t>(options_.vocab_size);
  if (sampled && !has_logits) {
    return absl::InternalError(absl::StrFormat(
        "IterationLoop: request %d samples, the executor returned %d logits (vocabulary %d)",
        a.req.id.value(), output.logits.size(), options_.vocab_size));
  }
  if (!a.sampler) a.sampler = std::make_unique<Sampler>(a.req.sampling);
  const int32_t next = sampled ? a.sampler->Next(output.logits) : output.next_token;
  if (next < 0 || next >= options_.vocab_size) {
    return absl::InternalError(absl::StrFormat(
        "IterationLoop: request %d: the executor chose token %d", a.req.id.value(), next));
  }
  const bool first = a.result.tokens.empty();
  a.result.tokens.push_back(next);
  const auto& stops = a.req.stop_token_ids;
  a.stopped = std::find(stops.begin(), stops.end(), next) != stops.end();
  const bool last =
      a.stopped || static_cast<int32_t>(a.result.tokens.size()) == a.req.max_new_tokens;
  if (last) a.result.finish_reason = a.stopped ? "stop" : "length";
  // The executor returns full logits where want_full_logits asked (first and last steps of a
  // greedy request: a stop token can end it at a step that did not ask).
  const bool length_end = static_cast<int32_t>(a.result.tokens.size()) == a.req.max_new_tokens;
  if ((first || length_end) && !has_logits) {
    return absl::InternalError(absl::StrFormat(
        "IterationLoop: request %d: the executor returned %d logits, the vocabulary has %d",
        a.req.id.value(), output.logits.size(), options_.vocab_size));
  }
  if (first && last) {
    a.result.last_logits = output.logits;
    a.result.decode_logits = std::move(output.logits);
    return absl::OkStatus();
  }
  if (first) a.result.last_logits = std::move(output.logits);
  if (last) {
    a.result.decode_logits = std::move(output.logits);
    return absl::OkStatus();
  }
  const size_t step = a.result.tokens.size() - 1;
  a.seq.push_back(a.req.force_tokens.empty() ? next : a.req.force_tokens[step]);
  return absl::OkStatus();
}

std::vector<LoopResult> IterationLoop::Step() {
  std::vector<LoopResult> done;
  if (requests_.empty()) {
    FlushReleases();
    return done;
  }
  ++iterations_;
  const int64_t start_us = NowUs();
  // 1. The batch: decodes first, then prefill work in arrival order, under the budgets; a new
  // request is charged here as if nothing of it were cached. Only the control plane knows its
  // cached prefix: it cuts the chunk after that prefix to what the token budget has left
  // (PlanBatch's token_budget), so the budget is often not spent. New requests that did not fit
  // are then offered after the rest, for what is left, while the new requests' prompts offered
  // add up to at most kFreshOfferFactor budgets: mostly-cached prompts join many per iteration,
  // and the keys one call carries and matches stay bounded.
  std::vector<Active*> batch;
  const auto full = [&] {
    return static_cast<int32_t>(batch.size()) >= options_.max_batch_requests;
  };
  int64_t budget = options_.max_batch_tokens;
  int64_t offer = options_.max_batch_tokens * kFreshOfferFactor;
  // The prefill pass takes every non-decoding request before `stop` (arrival order).
  size_t stop = requests_.size();
  for (int pass = 0; pass < 2; ++pass) {
    for (size_t i = 0; i < requests_.size(); ++i) {
      if (budget < 1 || full()) {
        if (pass == 1) stop = i;
        break;
      }
      Active& a = *requests_[i];
      if (Decoding(a) != (pass == 0)) continue;
      const int64_t chunk = std::min(budget, Remaining(a));
      a.chunk = chunk;
      batch.push_back(&a);
      budget -= chunk;
      if (a.fresh) offer -= Remaining(a);
    }
  }
  for (size_t i = stop; i < requests_.size() && offer >= 1 && !full(); ++i) {
    Active& a = *requests_[i];
    if (!a.fresh) continue;
    a.chunk = options_.max_batch_tokens;
    batch.push_back(&a);
    offer -= Remaining(a);
  }
  // 2. One control-plane call: release what the batch's requests (and finished ones) pinned,
  // plan and admit the batch.
  std::vector<lake::IterationRequest> plan_requests;
  std::vector<RequestId> release = std::move(pending_release_);
  pending_release_.clear();
  std::vector<Active*> planned;
  for (size_t i = 0; i < batch.size(); ++i) {
    Active& a = *batch[i];
    absl::StatusOr<lake::IterationRequest> ir = MakeRequest(a, a.chunk);
    if (!ir.ok()) {
      Fail(a, ir.status(), done);
      continue;
    }
    if (a.holds_pins) release.push_back(a.req.id);
    a.holds_pins = false;
    plan_requests.push_back(*std::move(ir));
    planned.push_back(&a);
  }
  absl::StatusOr<std::vector<lake::BatchPlanEntry>> plans =
      control_->PlanBatch(to_confirm_, release, plan_requests, options_.max_batch_tokens);
  if (plans.ok() || !lake::FailedOnTheWire(plans.status())) to_confirm_.clear();
  const int64_t planned_us = NowUs();
  int64_t ran_us = planned_us;
  if (plans.ok() && plans->size() != planned.size()) {
    plans = absl::InternalError(absl::StrFormat("PlanBatch returned %d plans for %d requests",
                                                plans->size(), planned.size()));
  }
  if (!plans.ok()) {
    // The call may have applied nothing, the releases, or all of it: confirm and release every
    // id of it once more (NotFound, ignored, where nothing is pinned).
    absl::flat_hash_set<RequestId> again_set(release.begin(), release.end());
    for (Active* a : planned) again_set.insert(a->req.id);
    const std::vector<RequestId> again(again_set.begin(), again_set.end());
    ReleaseNow(again);
    for (Active* a : planned) Fail(*a, plans.status(), done);
  }
  // Admitted requests and their plans; waiting ones keep nothing pinned.
  struct Admitted {
    Active* a;
    lake::IterationPlan plan;
  };
  std::vector<Admitted> admitted;
  std::vector<Active*> deferred;
  if (plans.ok()) {
    for (size_t i = 0; i < planned.size(); ++i) {
      lake::BatchPlanEntry& e = (*plans)[i];
      if (!e.status.ok()) {
        Fail(*planned[i], e.status, done);
      } else if (!e.plan.admitted) {
        deferred.push_back(planned[i]);
      } else {
        planned[i]->holds_pins = true;
        admitted.push_back({planned[i], std::move(e.plan)});
      }
    }
  }
  if (admitted.empty() && !deferred.empty()) {
    // Nothing of the batch fits: admit the oldest anyway (the loop must not wait on itself);
    // its segments that find no slot stay in its tail.
    Active& a = *deferred.front();
    absl::StatusOr<lake::IterationRequest> ir = MakeRequest(a, a.chunk);
    absl::StatusOr<lake::IterationPlan> p = absl::UnknownError("not planned");
    if (ir.ok()) {
      ir->try_admit = false;
      p = control_->PlanIteration(*ir);
    } else {
      p = ir.status();
    }
    Active* victim = nullptr;
    if (!p.ok() && options_.tails_in_pool && absl::IsResourceExhausted(p.status())) {
      // Other requests' tails fill the pool: the youngest one makes room (it restarts).
      for (auto it = requests_.rbegin(); it != requests_.rend() && victim == nullptr; ++it) {
        // Only a tail with rows frees slots (a fresh or fully pooled one holds none).
        const Active& v = **it;
        if (&v != &a && v.has_tail && !v.failed && !v.fresh && v.computed > v.pooled) {
          victim = it->get();
        }
      }
    }
    if (victim != nullptr) {
      Preempt(*victim);  // `a` waits and asks again next iteration
    } else if (!p.ok()) {
      if (lake::FailedOnTheWire(p.status())) a.holds_pins = true;
      Fail(a, p.status(), done);
    } else {
      a.holds_pins = true;
      admitted.push_back({&a, *std::move(p)});
    }
  }

  // Copies the plans evicted to make room for tails are freed before any tail is written.
  for (auto it = admitted.begin(); it != admitted.end();) {
    Active& a = *it->a;
    if (!it->plan.tail_slots.empty()) a.has_tail = true;
    absl::Status freed = absl::OkStatus();
    for (const lake::StoredReplica& e : it->plan.evicted) {
      absl::Status f = executor_->FreeSegment(it->plan.compute_instance, e.instance, e.segment,
                                              it->plan.evicted_at);
      if (!options_.fixed_compute.valid() && freed.ok()) freed = f;
    }
    if (!freed.ok()) {
      Fail(a, freed, done);
      it = admitted.erase(it);
    } else {
      ++it;
    }
  }

  // 3. Check each plan against the request's state, then run the batch.
  std::vector<IterationWork> work;
  std::vector<int64_t> ends;
  std::vector<Admitted*> ready;
  for (Admitted& ad : admitted) {
    Active& a = *ad.a;
    const lake::IterationPlan& plan = ad.plan;
    absl::Status ok = absl::OkStatus();
    if (!a.begun) {
      ok = executor_->BeginSequence(a.req.id, MaxTokens(a));
      a.begun = ok.ok();
    }
    if (ok.ok() && !a.fresh && plan.cached_tokens < a.pooled) {
      // The pooled prefix was lost while the request held no pins: restart it from what the
      // pool still holds, as a prefill of its whole sequence next iteration (it keeps this
      // plan's pins until the next call releases them).
      a.result.data_plane = executor_->EndSequence(a.req.id);
      ok = executor_->BeginSequence(a.req.id, MaxTokens(a));
      a.begun = ok.ok();
      a.Restart();
      if (ok.ok()) continue;
    }
    if (ok.ok()) {
      if (a.fresh) {
        a.computed = plan.cached_tokens;
        if (a.first_plan) a.result.cached_tokens = plan.cached_tokens;
      } else if (plan.cached_tokens > a.pooled) {
        // Tokens in [pooled, cached) are in the tail and (identically: same ids, same prefix)
        // in the pool, committed by another request meanwhile: drop them from the tail.
        ok = executor_->DropTailRows(a.req.id, plan.cached_tokens - a.pooled);
      }
      a.pooled = plan.cached_tokens;
    }
    const int64_t end = plan.end_tokens > 0 ? plan.end_tokens : static_cast<int64_t>(a.seq.size());
    if (ok.ok() && (end > static_cast<int64_t>(a.seq.size()) ||
                    end - a.computed != plan.new_tokens || plan.new_tokens < 1)) {
      ok = absl::InternalError(absl::StrFormat(
          "IterationLoop: request %d: plan computes %d tokens to %d, the request has %d after %d",
          a.req.id.value(), plan.new_tokens, end, a.seq.size(), a.computed));
    }
    if (!ok.ok()) {
      Fail(a, ok, done);
      continue;
    }
    a.fresh = false;
    a.first_plan = false;
    a.last_compute =
        options_.fixed_compute.valid() ? options_.fixed_compute : plan.compute_instance;
    ++a.result.iterations;
    work.push_back({.request = a.req.id,
                    .tokens = absl::MakeConstSpan(a.seq).subspan(
                        static_cast<size_t>(a.computed), static_cast<size_t>(plan.new_tokens)),
                    .start_pos = a.computed,
                    .compute = a.last_compute,
                    .plan = &plan,
                    .want_logits = end == static_cast<int64_t>(a.seq.size()),
                    .want_full_logits = end == static_cast<int64_t>(a.seq.size()) &&
                                        (a.result.tokens.empty() || !a.req.sampling.greedy() ||
                                         static_cast<int32_t>(a.result.tokens.size()) + 1 ==
                                             a.req.max_new_tokens)});
    ends.push_back(end);
    ready.push_back(&ad);
  }
  max_batch_seen_ = std::max(max_batch_seen_, static_cast<int32_t>(work.size()));
  if (!work.empty()) {
    absl::StatusOr<std::vector<WorkOutput>> outputs = executor_->Run(work);
    ran_us = NowUs();
    if (outputs.ok() && outputs->size() != work.size()) {
      outputs = absl::InternalError("IterationLoop: the executor returned too few outputs");
    }
    for (size_t i = 0; i < ready.size(); ++i) {
      Active& a = *ready[i]->a;
      absl::Status s = outputs.ok() ? Finish(a, ready[i]->plan, work[i].compute, (*outputs)[i],
                                             work[i].want_logits, ends[i])
                                    : outputs.status();
      if (!s.ok()) Fail(a, s, done);
    }
  }

  const int64_t end_us = NowUs();
  const double took_us = static_cast<double>(end_us - start_us);
  if (timings_.size() >= 100'000) timings_.erase(timings_.begin(), timings_.begin() + 50'000);
  int64_t work_tokens = 0;
  for (const IterationWork& w : work) work_tokens += static_cast<int64_t>(w.tokens.size());
  timings_.push_back({.requests = static_cast<int32_t>(work.size()),
                      .tokens = work_tokens,
                      .plan_us = static_cast<double>(planned_us - start_us),
                      .run_us = static_cast<double>(ran_us - planned_us),
                      .finish_us = static_cast<double>(end_us - ran_us)});
  for (Admitted* ad : ready) {
    if (!ad->a->failed) ad->a->result.iteration_us.push_back(took_us);
  }

  // 4. Finished requests leave; their pins go with the next call (or now, if none follows).
  for (auto it = requests_.begin(); it != requests_.end();) {
    Active& a = **it;
    if (!a.failed &&
        (a.stopped || static_cast<int32_t>(a.result.tokens.size()) == a.req.max_new_tokens)) {
      if (a.holds_pool()) pending_release_.push_back(a.req.id);
      a.result.data_plane = executor_->EndSequence(a.req.id);
      done.push_back(std::move(a.result));
      it = requests_.erase(it);
    } else if (a.failed) {
      it = requests_.erase(it);
    } else {
      ++it;
    }
  }
  if (requests_.empty()) FlushReleases();
  return done;
}

std::vector<IterationTiming> IterationLoop::TakeTimings() {
  std::vector<IterationTiming> out;
  out.swap(timings_);
  return out;
}

}  // namespace tokenlake::engine
