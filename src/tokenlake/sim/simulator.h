// The trace-driven cluster simulator: an event loop over simulated time that runs one
// continuous-batching engine per instance (chunked prefill, vLLM-V1-style scheduling) and asks
// a Policy where each request goes, how much of its prompt is cached, and what memory and
// communication it costs. Every policy runs on the same engine and the same CostModel.
//
// Scheduling per instance and iteration (stated defaults, SimOptions): a budget of
// `token_budget` (8192) tokens per iteration; running decodes first (1 token each), then
// running prefills (chunks), then waiting requests first-come-first-served while the budget,
// `max_running` (256) and memory allow (Policy::Admit). Memory for a request (prompt + output)
// is reserved at admission, so there is no preemption. Decode-only stretches are simulated in
// bulk (exact: a decode iteration's time is linear in the batch's context) and cut at the
// iteration boundary when new work reaches the instance.
//
// Instants: an idle instance that receives work (a delivered job, charged work, a Poke) starts
// its step once every arrival and event at the current simulated time is handled (requests
// arriving together, the jobs of one prefill batch), as an engine's scheduler builds its batch
// from every request that is in: work delivered at one instant shares a step.
//
// Cache access (the paper's load-balance quantity: cached context tokens attended): every
// iteration adds, for each sequence in it, its local context tokens (Job::Context(): the tokens
// before this iteration's new ones whose attention runs here) to its instance; a policy adds the
// attention it causes elsewhere (TokenLake's holders) with AddCacheAccess. They are summed per
// sampling window (sample_period_s; a bulk decode step counts in the window where it ends) into
// SimResult::cache_access.
//
// Session turns (Request::previous_turn >= 0) arrive closed-loop: think_s after the previous
// turn finished or was rejected, not at their nominal arrival_s.
//
// Thread-safety: not thread-safe; one Simulator per thread.
#ifndef TOKENLAKE_SIM_SIMULATOR_H_
#define TOKENLAKE_SIM_SIMULATOR_H_

#include <cstdint>
#include <deque>
#include <functional>
#include <map>
#include <memory>
#include <queue>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tokenlake/sched/cost_model.h"
#include "tokenlake/sim/block_cache.h"
#include "tokenlake/sim/workload.h"

namespace tokenlake::sim {

struct SimOptions {
  // Serving instances (GPUs), each a full model replica.
  int num_instances = 16;
  // Max tokens batched in one iteration (chunked prefill budget).
  int64_t token_budget = 8192;
  // Max requests running on one instance.
  int max_running = 256;
  // TTFT SLO (seconds) for --max-rate and, when asked, PD's early rejection.
  double slo_ttft_s = 5.0;
  // TPOT SLO (seconds) for --max-rate and, when asked, PD's early rejection.
  double slo_tpot_s = 0.2;
  // Sampling period of per-instance load and pool statistics, seconds.
  double sample_period_s = 10.0;
  // KV bytes each instance may use; 0 = CostModel::KvCapacityBytes().
  int64_t kv_capacity_bytes = 0;
  // Called with the share of requests arrived so far (0..1), at most ~200 times; may be null.
  std::function<void(double)> progress;
};

enum class Phase { kQueued, kPrefill, kDecode, kDone };

// One request's work on one instance (a PD request has a prefill job and a decode job).
struct Job {
  int64_t request = 0;  // index into the workload
  const Request* r = nullptr;
  int instance = -1;
  Phase phase = Phase::kQueued;
  bool prefill_only = false;  // PD prefill: hand over after the first token
  bool decode_only = false;   // PD decode: the prompt's KV arrives by transfer
  bool continuation = false;  // continues a request already running here: queued first
  int64_t cached_tokens = 0;  // prompt tokens whose KV is reused (set by Admit)
  int64_t prompt_end = -1;    // this job prefills the prompt up to here (-1: the whole prompt)
  int64_t prefilled = 0;      // prompt tokens computed so far, beyond cached_tokens
  int64_t decoded = 0;        // output tokens produced
  // Context tokens whose attention runs elsewhere (TokenLake holders); not in local attention.
  int64_t remote_context_tokens = 0;
  // (holder instance, cached tokens it serves) for those remote tokens.
  std::vector<std::pair<int, int64_t>> remote_holders;
  // False when the policy records the first token and the finish itself (parallel prefill
  // parts of one request).
  bool owns_record = true;
  double prefill_start_s = -1;
  // Memory held (baselines): referenced cached block ids and private blocks.
  std::vector<uint64_t> held_ids;
  int64_t private_blocks = 0;
  double est_prefill_s = 0;  // PD: the estimate added to its instance's queue
  int64_t policy_tag = 0;    // free for the policy

  int64_t PromptNew() const {
    return (prompt_end < 0 ? r->input_tokens : prompt_end) - cached_tokens;
  }
  int64_t Context() const { return cached_tokens + prefilled + decoded - remote_context_tokens; }
};

struct Instance {
  int id = 0;
  std::unique_ptr<BlockCache> cache;  // baselines' per-instance prefix cache
  std::deque<Job*> waiting;
  std::vector<Job*> running;
  int64_t in_flight = 0;         // requests routed here and not finished
  double pending_prefill_s = 0;  // PD queue estimate
  double extra_s = 0;            // work charged by others, added to the next iteration
  // Current step (one iteration, or k decode iterations in bulk).
  bool busy = false;
  uint64_t generation = 0;
  double step_start_s = 0;
  int64_t step_iters = 1;
  bool step_decode_only = false;
  double step_a_s = 0, step_b_s = 0;  // decode bulk: iteration j (0-based) takes a + b*j
  double step_extra_s = 0;            // decode bulk: charged work done before the iterations
  double accounted_s = 0;             // busy time is attributed to windows up to here
  std::vector<int64_t> step_tokens;   // per running job: tokens processed this step (1 iteration)
  double busy_s = 0;                  // total busy time
  double window_busy_s = 0;           // busy time in the current sampling window
  int64_t window_access_tokens = 0;   // cache access in the current sampling window
};

struct RequestRecord {
  double arrival_s = 0;
  int64_t input_tokens = 0;
  int64_t output_tokens = 0;
  double first_token_s = -1;
  double finish_s = -1;
  int64_t cached_tokens = 0;
  bool rejected = false;
  int instance = -1;
};

class Simulator;

// A serving policy: routing, caching and the costs only it knows about.
class Policy {
 public:
  virtual ~Policy() = default;
  virtual std::string name() const = 0;
  // Called once before the run. Errors (InvalidArgument naming the setting) end the run:
  // Simulator::Run returns them. A policy refuses a setup it cannot serve here, not by CHECK.
  virtual absl::Status Init(Simulator& sim) = 0;
  // A request arrived: create a job and Simulator::Deliver it, or Simulator::Reject it.
  // Requests with the same arrival time arrive one after the other at that instant; an idle
  // instance a delivery wakes starts its step only after the last of them (and OnArrivalsDone).
  virtual void OnArrival(Simulator& sim, int64_t request) = 0;
  // The requests arriving at this instant have all arrived (each through OnArrival): a policy
  // that batches queued requests itself schedules them here. Default none.
  virtual void OnArrivalsDone(Simulator& sim) { (void)sim; }
  // May `job` start on its instance now? Sets job.cached_tokens and takes memory. False: it
  // waits (retried at later iterations).
  virtual bool Admit(Simulator& sim, Job& job) = 0;
  // The job's prompt is fully computed (its first token was just produced).
  virtual void OnPrefillDone(Simulator& sim, Job& job) = 0;
  // The job finished on its instance (last token, or hand-over for a prefill-only job).
  virtual void OnJobDone(Simulator& sim, Job& job) = 0;
  // Extra seconds each iteration of `inst` with these jobs and tokens takes (communication
  // and remote work not hidden by `compute_s`, the iteration's own compute time). Called when
  // a step starts; must not change the simulation. Default none.
  virtual double ExtraIterationSeconds(Simulator& sim, Instance& inst,
                                       const std::vector<Job*>& jobs,
                                       const std::vector<int64_t>& tokens, double compute_s) {
    (void)sim, (void)inst, (void)jobs, (void)tokens, (void)compute_s;
    return 0;
  }
  // `iters` iterations of `inst` with these jobs and tokens (per iteration) just completed,
  // before the jobs' progress is applied: the policy may charge work they caused to other
  // instances (Simulator::ChargeExtra) and count bytes. Default none.
  virtual void OnIterationsDone(Simulator& sim, Instance& inst, const std::vector<Job*>& jobs,
                                const std::vector<int64_t>& tokens, int64_t iters) {
    (void)sim, (void)inst, (void)jobs, (void)tokens, (void)iters;
  }
  // `inst` has nothing to run (no job, no charged work): the policy may Deliver work to it
  // (a global scheduler hands out its next batch here). Default none.
  virtual void OnIdle(Simulator& sim, Instance& inst) { (void)sim, (void)inst; }
  // Periodic hook (every sample period).
  virtual void OnSample(Simulator& sim) { (void)sim; }
  // Pool statistics at this moment: stored block copies and distinct blocks.
  virtual void PoolStats(Simulator& sim, int64_t* copies, int64_t* distinct);
  // `job` (a prefill whose Admit just said no) is at the head of an instance with nothing
  // running. False (the default): nothing here can ever free its memory, so it is rejected.
  // True: memory elsewhere will be released (the policy then calls Simulator::Poke), it waits.
  virtual bool WaitsForMemory(Simulator& sim, const Job& job) {
    (void)sim, (void)job;
    return false;
  }
  // Prompt segments of requests that ran although their KV could not be stored (no memory);
  // a faithful policy keeps this 0 by making requests wait. Default 0.
  virtual int64_t UnstoredSegments() const { return 0; }
  // Policy-specific counters at the end of the run, reported as they are (JSON
  // "policy_counters"; none by default).
  virtual std::map<std::string, double> Counters() const { return {}; }
};

struct SimResult {
  std::string policy;
  std::vector<RequestRecord> records;
  double makespan_s = 0;
  int64_t bytes_moved = 0;
  std::map<std::string, int64_t> bytes_by_kind;  // bytes_moved split by what moved
  double mean_redundancy = 1.0;                  // time-averaged copies / distinct blocks
  std::vector<double> busy_s;                    // per instance
  std::vector<std::vector<double>> load;         // [sample][instance] busy share in the window
  double sample_period_s = 0;
  int64_t kv_capacity_bytes_per_instance = 0;
  int64_t iterations = 0;
  int64_t unstored_segments = 0;  // Policy::UnstoredSegments() at the end of the run
  std::map<std::string, double> policy_counters;  // Policy::Counters() at the end of the run
  // [window][instance] cached context tokens attended in each sampling window (the last,
  // partial window included when it saw any access).
  std::vector<std::vector<int64_t>> cache_access;
};

class Simulator {
 public:
  // `workload`, `cost` and `policy` must outlive the simulator.
  Simulator(SimOptions options, const Workload& workload, const sched::CostModel& cost,
            Policy& policy);
  // Errors: Policy::Init's, unchanged; Internal when the policy left a request neither
  // finished nor rejected once nothing remained to happen (a policy bug), naming the first.
  absl::StatusOr<SimResult> Run();

  // --- for policies ---
  double now() const { return now_s_; }
  const SimOptions& options() const { return options_; }
  const sched::CostModel& cost() const { return cost_; }
  const Workload& workload() const { return workload_; }
  std::vector<Instance>& instances() { return instances_; }
  int64_t kv_capacity_blocks() const { return capacity_blocks_; }
  RequestRecord& record(int64_t request) { return records_[request]; }
  // A new job for `request` on `instance`; owned by the simulator.
  Job* NewJob(int64_t request, int instance);
  // Makes `job` visible to its instance at `ready_s` (>= now), waking the instance (an idle one
  // starts its step at the end of that instant).
  void Deliver(Job* job, double ready_s);
  void Reject(int64_t request);
  // Adds work (seconds) to `instance`'s next iteration, starting one at the end of this instant
  // if it is idle.
  void ChargeExtra(int instance, double seconds);
  // Counts `bytes` moved between instances, under `kind` (e.g. "kv_to_decode").
  void AddBytesMoved(int64_t bytes, const std::string& kind) {
    bytes_moved_ += bytes;
    bytes_by_kind_[kind] += bytes;
  }
  // An idle instance with waiting jobs tries to admit them at the end of this instant (memory
  // was freed elsewhere).
  void Poke(int instance);
  // Releases a finished job's memory (baselines).
  void ReleaseLocal(Job& job);
  // Counts `tokens` (>= 0) of cached context attended on `instance` for work whose attention
  // the simulator does not run there itself (a holder's partial attention for another
  // instance's queries). Local attention is counted automatically.
  // REQUIRES: 0 <= instance < num_instances.
  void AddCacheAccess(int instance, int64_t tokens);

 private:
  struct Event {
    double t;
    uint64_t seq;
    int kind;  // 0 step done, 1 deliver, 2 arrival of a later session turn (`request`)
    int instance;
    uint64_t generation;
    Job* job;
    int64_t request = -1;
    bool operator>(const Event& o) const { return t != o.t ? t > o.t : seq > o.seq; }
  };
  void Push(double t, int kind, int instance, uint64_t generation, Job* job);
  void Wake(Instance& inst);
  void StartStep(Instance& inst);
  void FinishStep(Instance& inst);
  double StepEnd(const Instance& inst, int64_t iters) const;
  void Sample();
  // A request arrives now: its record starts and the policy routes it.
  void Arrive(int64_t request);
  // `inst` (idle) has work: its step starts at StartDeferred, once every arrival and event of
  // this instant is handled (see the file comment).
  void Defer(Instance& inst);
  void StartDeferred();
  // Sends `request`'s next session turn once `request` finished or was rejected (once).
  void ReleaseNextTurn(int64_t request);

  SimOptions options_;
  const Workload& workload_;
  const sched::CostModel& cost_;
  Policy& policy_;
  double now_s_ = 0;
  uint64_t seq_ = 0;
  int64_t capacity_blocks_ = 0;
  int64_t bytes_moved_ = 0;
  std::map<std::string, int64_t> bytes_by_kind_;
  int64_t iterations_ = 0;
  std::vector<Instance> instances_;
  std::vector<RequestRecord> records_;
  std::vector<int64_t> next_turn_;  // per request: the request of its next turn, or -1
  // Idle instances woken at this instant (ids, once each: start_pending_).
  std::vector<int> deferred_;
  std::vector<bool> start_pending_;
  std::deque<Job> jobs_;
  std::priority_queue<Event, std::vector<Event>, std::greater<>> events_;
  double next_sample_s_ = 0;
  std::vector<std::vector<double>> load_;
  std::vector<std::vector<int64_t>> access_;
  double redundancy_sum_ = 0;
  int64_t redundancy_samples_ = 0;
};

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_SIMULATOR_H_
