#include "tokenlake/sim/simulator.h"

#include <algorithm>
#include <cmath>
#include <limits>
#include <utility>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::sim {

void Policy::PoolStats(Simulator& sim, int64_t* copies, int64_t* distinct) {
  absl::flat_hash_set<uint64_t> ids;
  *copies = 0;
  for (Instance& inst : sim.instances()) {
    if (!inst.cache) continue;
    *copies += inst.cache->cached_blocks();
    for (uint64_t id : inst.cache->CachedIds()) ids.insert(id);
  }
  *distinct = static_cast<int64_t>(ids.size());
}

Simulator::Simulator(SimOptions options, const Workload& workload, const sched::CostModel& cost,
                     Policy& policy)
    : options_(std::move(options)), workload_(workload), cost_(cost), policy_(policy) {
  TOKENLAKE_CHECK(options_.num_instances >= 1);
  TOKENLAKE_CHECK(options_.token_budget >= 1);
  const int64_t capacity_bytes =
      options_.kv_capacity_bytes > 0 ? options_.kv_capacity_bytes : cost_.KvCapacityBytes();
  capacity_blocks_ = capacity_bytes / (cost_.model().KvBytesPerToken() * kBlockTokens);
  instances_.resize(static_cast<size_t>(options_.num_instances));
  start_pending_.assign(static_cast<size_t>(options_.num_instances), false);
  for (int i = 0; i < options_.num_instances; ++i) {
    instances_[i].id = i;
    instances_[i].cache = std::make_unique<BlockCache>(capacity_blocks_);
  }
  records_.resize(workload_.requests.size());
  next_turn_.assign(workload_.requests.size(), -1);
  for (size_t i = 0; i < workload_.requests.size(); ++i) {
    const int64_t prev = workload_.requests[i].previous_turn;
    if (prev < 0) continue;
    TOKENLAKE_CHECK(prev < static_cast<int64_t>(i) && next_turn_[prev] < 0,
                    "a session turn must follow one earlier request, once");
    next_turn_[prev] = static_cast<int64_t>(i);
  }
}

void Simulator::Arrive(int64_t request) {
  const Request& r = workload_.requests[request];
  records_[request].arrival_s = now_s_;
  records_[request].input_tokens = r.input_tokens;
  records_[request].output_tokens = r.output_tokens;
  policy_.OnArrival(*this, request);
}

void Simulator::Defer(Instance& inst) {
  if (start_pending_[inst.id]) return;
  start_pending_[inst.id] = true;
  deferred_.push_back(inst.id);
}

void Simulator::StartDeferred() {
  std::vector<int> ids;
  while (!deferred_.empty()) {
    ids.clear();
    ids.swap(deferred_);
    for (int id : ids) {
      start_pending_[id] = false;
      if (!instances_[id].busy) StartStep(instances_[id]);
    }
  }
}

void Simulator::ReleaseNextTurn(int64_t request) {
  const int64_t next = next_turn_[request];
  const RequestRecord& rec = records_[request];
  if (next < 0 || !(rec.rejected || rec.finish_s >= 0)) return;
  next_turn_[request] = -1;
  Event e{now_s_ + workload_.requests[next].think_s, seq_++, 2, 0, 0, nullptr};
  e.request = next;
  events_.push(e);
}

Job* Simulator::NewJob(int64_t request, int instance) {
  Job& job = jobs_.emplace_back();
  job.request = request;
  job.r = &workload_.requests[request];
  job.instance = instance;
  return &job;
}

void Simulator::Push(double t, int kind, int instance, uint64_t generation, Job* job) {
  events_.push(Event{t, seq_++, kind, instance, generation, job});
}

void Simulator::Deliver(Job* job, double ready_s) {
  Instance& inst = instances_[job->instance];
  ++inst.in_flight;
  if (ready_s <= now_s_) {
    if (job->continuation) {
      inst.waiting.push_front(job);
    } else {
      inst.waiting.push_back(job);
    }
    Wake(inst);
  } else {
    Push(ready_s, 1, job->instance, 0, job);
  }
}

void Simulator::Reject(int64_t request) {
  records_[request].rejected = true;
  ReleaseNextTurn(request);
}

void Simulator::Poke(int instance) {
  Instance& inst = instances_[instance];
  if (!inst.busy && !inst.waiting.empty()) Defer(inst);
}

void Simulator::ChargeExtra(int instance, double seconds) {
  if (seconds <= 0) return;
  Instance& inst = instances_[instance];
  inst.extra_s += seconds;
  if (!inst.busy) Defer(inst);
}

void Simulator::ReleaseLocal(Job& job) {
  BlockCache& cache = *instances_[job.instance].cache;
  cache.Release(job.held_ids);
  cache.FreePrivate(job.private_blocks);
  job.held_ids.clear();
  job.private_blocks = 0;
}

void Simulator::AddCacheAccess(int instance, int64_t tokens) {
  TOKENLAKE_CHECK(instance >= 0 && instance < options_.num_instances);
  if (tokens > 0) instances_[instance].window_access_tokens += tokens;
}

double Simulator::StepEnd(const Instance& inst, int64_t iters) const {
  const double k = static_cast<double>(iters);
  return inst.step_start_s + inst.step_extra_s + k * inst.step_a_s +
         inst.step_b_s * k * (k - 1) / 2;
}

void Simulator::Wake(Instance& inst) {
  if (!inst.busy) {
    Defer(inst);
    return;
  }
  if (!inst.step_decode_only || inst.step_iters <= 1) return;
  // Cut the bulk decode step at the first iteration boundary at or after now.
  int64_t j = 1;
  while (j < inst.step_iters && StepEnd(inst, j) < now_s_) ++j;
  if (j < inst.step_iters) {
    inst.step_iters = j;
    ++inst.generation;
    Push(StepEnd(inst, j), 0, inst.id, inst.generation, nullptr);
  }
}

void Simulator::StartStep(Instance& inst) {
  TOKENLAKE_CHECK(!inst.busy);
  int64_t budget = options_.token_budget;
  std::vector<int64_t>& tokens = inst.step_tokens;
  tokens.clear();
  bool decode_only = true;
  for (Job* job : inst.running) {
    int64_t t = 0;
    if (job->phase == Phase::kDecode) {
      t = 1;
    } else {
      decode_only = false;
      t = std::min(job->PromptNew() - job->prefilled, std::max<int64_t>(budget, 0));
    }
    budget -= t;
    tokens.push_back(t);
  }
  while (!inst.waiting.empty() && budget > 0 &&
         static_cast<int>(inst.running.size()) < options_.max_running) {
    Job* job = inst.waiting.front();
    if (!policy_.Admit(*this, *job)) {
      if (inst.running.empty() && !policy_.WaitsForMemory(*this, *job)) {
        // Nothing running can ever free memory here: the request does not fit at all.
        inst.waiting.pop_front();
        --inst.in_flight;
        Reject(job->request);
        job->phase = Phase::kDone;
        continue;
      }
      break;
    }
    inst.waiting.pop_front();
    inst.running.push_back(job);
    if (job->decode_only) {
      job->phase = Phase::kDecode;
      tokens.push_back(1);
      budget -= 1;
    } else {
      job->phase = Phase::kPrefill;
      job->prefill_start_s = now_s_;
      decode_only = false;
      const int64_t t = std::min(job->PromptNew() - job->prefilled, budget);
      tokens.push_back(t);
      budget -= t;
    }
  }
  int64_t total = 0;
  for (int64_t t : tokens) total += t;
  if (total == 0 && inst.extra_s <= 0) {  // idle
    policy_.OnIdle(*this, inst);
    return;
  }

  inst.busy = true;
  ++inst.generation;
  inst.step_start_s = now_s_;
  const double extra = inst.extra_s;
  inst.extra_s = 0;
  if (decode_only && inst.waiting.empty() && total > 0) {
    int64_t k = std::numeric_limits<int64_t>::max();
    int64_t context = 0;
    for (Job* job : inst.running) {
      k = std::min(k, job->r->output_tokens - job->decoded);
      context += job->Context();
    }
    k = std::clamp<int64_t>(k, 1, 256);
    const double rate = cost_.DecodeSecondsPerContextToken();
    const double b = static_cast<double>(inst.running.size());
    const double compute = cost_.DenseSeconds(total) + rate * (static_cast<double>(context) + b);
    const double per_iter_extra =
        policy_.ExtraIterationSeconds(*this, inst, inst.running, tokens, compute);
    inst.step_decode_only = true;
    inst.step_iters = k;
    inst.step_a_s = compute + per_iter_extra;
    inst.step_b_s = rate * b;
    inst.step_extra_s = extra;  // the charged work runs first
    Push(StepEnd(inst, k), 0, inst.id, inst.generation, nullptr);
    return;
  }
  std::vector<sched::SeqWork> work;
  work.reserve(inst.running.size());
  for (size_t i = 0; i < inst.running.size(); ++i) {
    if (tokens[i] == 0) continue;
    const Job* job = inst.running[i];
    work.push_back({tokens[i], job->Context()});
  }
  inst.step_decode_only = false;
  inst.step_iters = 1;
  const double compute = cost_.IterationSeconds(work);
  const double duration =
      compute + extra + policy_.ExtraIterationSeconds(*this, inst, inst.running, tokens, compute);
  Push(now_s_ + duration, 0, inst.id, inst.generation, nullptr);
}

void Simulator::FinishStep(Instance& inst) {
  inst.busy_s += now_s_ - inst.step_start_s;
  inst.window_busy_s += std::max(0.0, now_s_ - std::max(inst.step_start_s, inst.accounted_s));
  inst.accounted_s = now_s_;
  iterations_ += inst.step_iters;
  // Stays busy while the finished jobs are processed (policies may deliver new work here,
  // which the StartStep at the end picks up).
  const int64_t iters = inst.step_iters;
  for (size_t i = 0; i < inst.running.size() && i < inst.step_tokens.size(); ++i) {
    if (inst.step_tokens[i] == 0) continue;
    // A bulk decode step's context grows by one token per iteration.
    const int64_t context = std::max<int64_t>(0, inst.running[i]->Context());
    inst.window_access_tokens +=
        inst.step_decode_only ? iters * context + iters * (iters - 1) / 2 : context;
  }
  policy_.OnIterationsDone(*this, inst, inst.running, inst.step_tokens, iters);
  std::vector<Job*> still;
  still.reserve(inst.running.size());
  for (size_t i = 0; i < inst.running.size(); ++i) {
    Job* job = inst.running[i];
    const int64_t t = i < inst.step_tokens.size() ? inst.step_tokens[i] : 0;
    bool done = false;
    RequestRecord& rec = records_[job->request];
    if (job->phase == Phase::kPrefill) {
      job->prefilled += t;
      if (job->prefilled >= job->PromptNew()) {
        job->decoded = 1;
        job->phase = Phase::kDecode;
        if (job->owns_record && rec.first_token_s < 0) rec.first_token_s = now_s_;
        policy_.OnPrefillDone(*this, *job);
        done = job->prefill_only || job->decoded >= job->r->output_tokens;
      }
    } else if (job->phase == Phase::kDecode) {
      job->decoded += t * (inst.step_decode_only ? iters : 1);
      done = job->decoded >= job->r->output_tokens;
    }
    if (done) {
      if (job->owns_record && job->decoded >= job->r->output_tokens) rec.finish_s = now_s_;
      job->phase = Phase::kDone;
      --inst.in_flight;
      policy_.OnJobDone(*this, *job);
      ReleaseNextTurn(job->request);
    } else {
      still.push_back(job);
    }
  }
  inst.running.swap(still);
  inst.busy = false;
  StartStep(inst);
}

void Simulator::Sample() {
  std::vector<double> loads;
  loads.reserve(instances_.size());
  for (Instance& inst : instances_) {
    if (inst.busy) {
      inst.window_busy_s += std::max(0.0, now_s_ - std::max(inst.step_start_s, inst.accounted_s));
      inst.accounted_s = now_s_;
    }
    loads.push_back(std::clamp(inst.window_busy_s / options_.sample_period_s, 0.0, 1.0));
    inst.window_busy_s = 0;
  }
  load_.push_back(std::move(loads));
  std::vector<int64_t> access;
  access.reserve(instances_.size());
  for (Instance& inst : instances_) {
    access.push_back(inst.window_access_tokens);
    inst.window_access_tokens = 0;
  }
  access_.push_back(std::move(access));
  int64_t copies = 0, distinct = 0;
  policy_.PoolStats(*this, &copies, &distinct);
  if (distinct > 0) {
    redundancy_sum_ += static_cast<double>(copies) / static_cast<double>(distinct);
    ++redundancy_samples_;
  }
  policy_.OnSample(*this);
}

absl::StatusOr<SimResult> Simulator::Run() {
  if (absl::Status s = policy_.Init(*this); !s.ok()) return s;
  const auto& reqs = workload_.requests;
  const size_t n = reqs.size();
  size_t next = 0;
  const double inf = std::numeric_limits<double>::infinity();
  next_sample_s_ = (n > 0 ? reqs.front().arrival_s : 0) + options_.sample_period_s;
  size_t progress_every = std::max<size_t>(1, n / 200);
  bool arrived = false;  // a request arrived at the instant now_s_
  while (true) {
    // Later session turns arrive by event (ReleaseNextTurn), not at their nominal time.
    while (next < n && reqs[next].previous_turn >= 0) ++next;
    double ta = next < n ? reqs[next].arrival_s : inf;
    double te = events_.empty() ? inf : events_.top().t;
    if (std::min(ta, te) > now_s_) {
      // The instant now_s_ is over (every arrival and event at it handled): the policy
      // schedules what arrived, then the instances woken start their steps, each with all the
      // work that reached it at this instant (as an engine's scheduler sees every request that
      // is in when it builds a batch).
      if (arrived) policy_.OnArrivalsDone(*this);
      arrived = false;
      StartDeferred();
      ta = next < n ? reqs[next].arrival_s : inf;
      te = events_.empty() ? inf : events_.top().t;
    }
    if (next >= n && events_.empty()) break;
    const double t = std::min(ta, te);
    while (next_sample_s_ <= t) {
      now_s_ = next_sample_s_;
      Sample();
      StartDeferred();
      next_sample_s_ += options_.sample_period_s;
    }
    now_s_ = t;
    if (ta <= te) {
      Arrive(static_cast<int64_t>(next));
      arrived = true;
      ++next;
      if (options_.progress && next % progress_every == 0) {
        options_.progress(static_cast<double>(next) / static_cast<double>(n));
      }
      continue;
    }
    const Event e = events_.top();
    events_.pop();
    if (e.kind == 2) {
      Arrive(e.request);
      arrived = true;
      continue;
    }
    Instance& inst = instances_[e.instance];
    if (e.kind == 0) {
      if (e.generation == inst.generation && inst.busy) FinishStep(inst);
    } else {
      if (e.job->continuation) {
        inst.waiting.push_front(e.job);
      } else {
        inst.waiting.push_back(e.job);
      }
      Wake(inst);
    }
  }
  {
    std::vector<int64_t> tail;
    int64_t sum = 0;
    for (const Instance& inst : instances_) {
      tail.push_back(inst.window_access_tokens);
      sum += inst.window_access_tokens;
    }
    if (sum > 0) access_.push_back(std::move(tail));
  }
  // Every request ends done or rejected: one left waiting when nothing remains to happen was
  // lost by the policy (a bug, never a result to report).
  int64_t unfinished = 0, first_unfinished = -1;
  for (size_t i = 0; i < records_.size(); ++i) {
    if (records_[i].rejected || records_[i].finish_s >= 0) continue;
    if (unfinished++ == 0) first_unfinished = static_cast<int64_t>(i);
  }
  if (unfinished > 0) {
    return absl::InternalError(absl::StrFormat(
        "policy %s left %d of %d requests neither finished nor rejected when the simulation "
        "ran out of events (the first: request %d)",
        policy_.name(), unfinished, records_.size(), first_unfinished));
  }
  SimResult result;
  result.policy = policy_.name();
  result.records = records_;
  double first = inf, last = 0;
  for (const RequestRecord& r : records_) {
    first = std::min(first, r.arrival_s);
    last = std::max(last, r.finish_s);
  }
  result.makespan_s = last > first ? last - first : 0;
  result.bytes_moved = bytes_moved_;
  result.bytes_by_kind = bytes_by_kind_;
  result.mean_redundancy =
      redundancy_samples_ > 0 ? redundancy_sum_ / static_cast<double>(redundancy_samples_) : 1.0;
  for (const Instance& inst : instances_) result.busy_s.push_back(inst.busy_s);
  result.load = load_;
  result.sample_period_s = options_.sample_period_s;
  result.kv_capacity_bytes_per_instance =
      capacity_blocks_ * cost_.model().KvBytesPerToken() * kBlockTokens;
  result.iterations = iterations_;
  result.unstored_segments = policy_.UnstoredSegments();
  result.policy_counters = policy_.Counters();
  result.cache_access = access_;
  return result;
}

}  // namespace tokenlake::sim
