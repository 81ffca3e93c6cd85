#include "tokenlake/sim/tokenlake_policy.h"

#include <algorithm>
#include <cmath>
#include <iostream>
#include <limits>
#include <set>

#include "absl/container/flat_hash_map.h"
#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/plan/cost_model.h"
#include "tokenlake/sched/cost_model.h"
#include "tokenlake/sched/elastic_scheduler.h"
#include "tokenlake/sim/links.h"
#include "tokenlake/sim/metrics.h"

namespace tokenlake::sim {
namespace {

class TokenLakePolicy final : public Policy {
 public:
  explicit TokenLakePolicy(TokenLakePolicyOptions options) : options_(options) {}
  ~TokenLakePolicy() override {
    if (not_stored_ > 0) {
      std::cerr << "tokenlake policy: " << not_stored_
                << " segment(s) of running requests could not be stored\n";
    }
    if (lake_errors_ > 0) {
      std::cerr << "tokenlake policy: " << lake_errors_
                << " lake call(s) failed; first: " << first_error_ << "\n";
    }
  }

  std::string name() const override {
    if (options_.fixed_prefill_instances <= 0) return "tokenlake";
    return absl::StrFormat("tokenlake-static %dP:%dD", options_.fixed_prefill_instances,
                           num_instances_ - options_.fixed_prefill_instances);
  }

  absl::Status Init(Simulator& sim) override {
    sim_ = &sim;
    const int n = sim.options().num_instances;
    num_instances_ = n;
    if (options_.fixed_prefill_instances >= n) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tokenlake policy: fixed_prefill_instances %d leaves the decode phase with no "
          "instance: valid values are 1 to %d for %d instances (0 = elastic)",
          options_.fixed_prefill_instances, n - 1, n));
    }
    const sched::ModelSpec& m = sim.cost().model();
    // The pool counts slots and the model's shape in 32 bits.
    constexpr int64_t kMax32 = std::numeric_limits<int32_t>::max();
    const int64_t blocks = sim.kv_capacity_blocks();
    if (blocks > kMax32) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "tokenlake policy: the KV capacity per instance (SimOptions.kv_capacity_bytes, "
          "--kv-gb or --cache-tokens) holds %d blocks of %d tokens, more than the pool's limit "
          "of %d segments per instance",
          blocks, kBlockTokens, kMax32));
    }
    for (const auto& [field, value] : {std::pair<const char*, int64_t>{"num_layers", m.num_layers},
                                       {"num_heads", m.num_heads},
                                       {"num_kv_heads", m.num_kv_heads},
                                       {"head_dim", m.head_dim},
                                       {"dtype_bytes", m.dtype_bytes}}) {
      if (value > kMax32) {
        return absl::InvalidArgumentError(
            absl::StrFormat("tokenlake policy: model '%s' field %s is %d, more than the pool's "
                            "limit of %d",
                            m.name, field, value, kMax32));
      }
    }
    lake::LakeOptions lo;
    lo.num_instances = n;
    lo.segment_tokens = static_cast<int32_t>(kBlockTokens);
    lo.local_eviction_min_age_ratio = options_.local_eviction_min_age_ratio;
    lo.planner.dispatch = options_.dispatch;
    lo.planner.compare_dispatch = options_.compare_dispatch;
    lo.planner.access_slack = options_.access_slack;
    lo.hot_runs.enabled = options_.hot_runs;
    lo.slots_per_instance = static_cast<int32_t>(std::max<int64_t>(1, blocks));
    lo.model.num_layers = static_cast<int32_t>(m.num_layers);
    lo.model.num_heads = static_cast<int32_t>(m.num_heads);
    lo.model.num_kv_heads = static_cast<int32_t>(m.num_kv_heads);
    lo.model.head_dim = static_cast<int32_t>(m.head_dim);
    lo.model.dtype_bytes = static_cast<int32_t>(m.dtype_bytes);
    shape_ = lo.model;
    pool_slots_ = static_cast<int64_t>(lo.slots_per_instance) * n;
    auto lake = lake::Lake::Create(lo, &clock_);
    if (!lake.ok()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("tokenlake policy: cannot build the pool: %s", lake.status().message()));
    }
    lake_ = *std::move(lake);
    salt_ = index::NamespaceSalt(m.name);
    state_.assign(sim.workload().requests.size(), RequestState{});
    decodes_.assign(static_cast<size_t>(n), 0);
    decode_context_.assign(static_cast<size_t>(n), 0);
    chunks_on_.assign(static_cast<size_t>(n), 0);
    budgets_on_.assign(static_cast<size_t>(n), {});
    links_ = std::make_unique<LinkClock>(n);
    batch_cost_ = std::make_unique<sched::CostModelBatchCost>(sim.cost(), shape_);
    sched_.chunk_tokens = sim.options().token_budget;
    sched_.max_dop = options_.max_dop;
    sched_.align_tokens = kBlockTokens;
    // The DP charges a batch's context attention as the pool's cache load (Lake::GetCacheLoad's
    // roofline over all n instances, at the cost model's attention rates per instance).
    sched_.pool_instances = n;
    sched_.shape = shape_;
    const double tp = sim.cost().tensor_parallel();
    sched_.roofline.kv_bytes_per_s = sim.cost().gpu().attn_decode_gbps * 1e9 * tp;
    sched_.roofline.attention_flops_per_s = sim.cost().gpu().attn_prefill_tflops * 1e12 * tp;
    decode_budget_s_ = sim.options().slo_tpot_s * options_.decode_budget_share;
    if (absl::Status s = sched::ValidateOptions(sched_); !s.ok()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("tokenlake policy: scheduler: %s", s.message()));
    }
    return absl::OkStatus();
  }

  void OnArrival(Simulator& sim, int64_t request) override {
    const Request& r = sim.workload().requests[request];
    RequestState& st = state_[request];
    auto keys = index::KeysFromBlockHashes(salt_, r.block_ids, static_cast<int32_t>(kBlockTokens),
                                           r.input_tokens);
    if (!Ok(keys.status())) return sim.Reject(request);
    st.keys = *std::move(keys);
    st.extra_slots =
        std::max<int64_t>(0, (r.input_tokens + r.output_tokens + kBlockTokens - 1) / kBlockTokens -
                                 static_cast<int64_t>(st.keys.size()));
    // More segments than the whole pool can never be stored: like a baseline's request larger
    // than an instance's memory, it is rejected.
    if (static_cast<int64_t>(st.keys.size()) + st.extra_slots > pool_slots_) {
      st.keys.clear();
      return sim.Reject(request);
    }
    queue_.insert(request);
  }

  // Scheduled once every request of the instant is queued, so that requests arriving together
  // can share a batch.
  void OnArrivalsDone(Simulator& sim) override { Dispatch(sim); }

  bool Admit(Simulator& sim, Job& job) override {
    (void)sim, (void)job;
    return true;  // pool memory was taken when the request was scheduled
  }

  void OnIdle(Simulator& sim, Instance& inst) override {
    (void)inst;
    Dispatch(sim);
  }

  void OnPrefillDone(Simulator& sim, Job& job) override {
    if (job.policy_tag == kDecodeTag) return;
    chunks_on_[job.instance] -= 1;
    RequestState& st = state_[job.request];
    if (--st.parts_left > 0) return;
    Tick(sim);
    const RequestId id(static_cast<uint64_t>(job.request));
    // The plan's placements continue the chain as it was matched when the chunk was planned;
    // segments matched then beyond this request's pins (committed by others meanwhile) may have
    // been evicted since. Then the chunk's keys are committed against the chain as it is now
    // (the lake places them as the planner would), which re-stores what went.
    const bool chain_intact = st.placements.empty() || !st.placements.front().parent.valid() ||
                              lake_->prefix_tree().Contains(st.placements.front().parent);
    auto committed = chain_intact ? lake_->Commit(id, st.placements)
                                  : lake_->CommitKeys(id, KeysUpTo(st, *job.r, st.chunk_end),
                                                      InstanceId(st.producer));
    if (Ok(committed.status())) {
      sim.AddBytesMoved(committed->moved_bytes, "new_segments");
      not_stored_ += static_cast<int64_t>(committed->not_stored.size());
      // Segments stored away from the chunk's computing instance travel there over the links.
      for (const lake::StoredReplica& stored : committed->stored) {
        if (stored.instance.value() != st.producer) {
          CopySegment(sim, stored.segment, st.producer, stored.instance.value());
        }
      }
    }
    st.placements.clear();
    st.prefilled = st.chunk_end;
    const Request& r = *job.r;
    if (st.prefilled < r.input_tokens) {
      queue_.insert(job.request);  // its next chunk, in its arrival position
      Dispatch(sim);
      return;
    }
    RequestRecord& rec = sim.record(job.request);
    rec.first_token_s = sim.now();
    if (r.output_tokens <= 1) {
      rec.finish_s = sim.now();
      Finish(job.request);
      return;
    }
    StartDecode(sim, job.request, job.instance);
    // Its instance now holds a decode: queued prompts may mix into its next iteration (and an
    // instance that was not free for prefill may be now).
    Dispatch(sim);
  }

  void OnJobDone(Simulator& sim, Job& job) override {
    (void)sim;
    if (job.policy_tag != kDecodeTag) return;
    decodes_[job.instance] -= 1;
    decode_context_[job.instance] -= state_[job.request].decode_est_context;
    budgets_on_[job.instance].erase(
        budgets_on_[job.instance].find(state_[job.request].decode_budget_s));
    Finish(job.request);
  }

  double ExtraIterationSeconds(Simulator& sim, Instance& inst, const std::vector<Job*>& jobs,
                               const std::vector<int64_t>& tokens, double compute_s) override {
    // The computing instance merges the holders' partials, layer by layer: it waits for the
    // slowest holder, whose partial attention is the sum over all the batch's queries it serves,
    // plus their queries' and partials' transfer over its link and one round trip per layer,
    // beyond its own compute (overlapped). A chunk also waits for its slowest KV pull.
    const sched::CostModel& cost = sim.cost();
    holder_attention_s_.assign(sim.instances().size(), 0);
    holder_bytes_.assign(sim.instances().size(), 0);
    double worst = 0;
    for (size_t i = 0; i < jobs.size() && i < tokens.size(); ++i) {
      const int64_t t = tokens[i];
      if (t <= 0) continue;
      if (jobs[i]->policy_tag != kDecodeTag) {
        worst = std::max(worst, state_[jobs[i]->request].pull_s);
      }
      for (const auto& [holder, held] : jobs[i]->remote_holders) {
        holder_attention_s_[holder] += cost.CachedAttentionSeconds(t, held);
        holder_bytes_[holder] += plan::MoveQueriesBytes(shape_, t);
      }
    }
    const double round_trips_s =
        static_cast<double>(2 * shape_.num_layers - 1) * cost.net().latency_us * 1e-6;
    for (size_t h = 0; h < holder_bytes_.size(); ++h) {
      if (holder_bytes_[h] == 0) continue;
      const bool same_node = cost.SameNode(static_cast<int>(h), inst.id);
      worst =
          std::max(worst, holder_attention_s_[h] +
                              cost.TransferSeconds(holder_bytes_[h], same_node) + round_trips_s);
    }
    return std::max(0.0, worst - compute_s);
  }

  void OnIterationsDone(Simulator& sim, Instance& inst, const std::vector<Job*>& jobs,
                        const std::vector<int64_t>& tokens, int64_t iters) override {
    (void)inst;
    Tick(sim);
    const sched::CostModel& cost = sim.cost();
    // Query bytes are summed here and counted once per kind (the per-kind counter is a map).
    int64_t decode_query_bytes = 0, prefill_query_bytes = 0;
    for (size_t i = 0; i < jobs.size() && i < tokens.size(); ++i) {
      const int64_t t = tokens[i];
      if (t <= 0) continue;
      Job& job = *jobs[i];
      int64_t& query_bytes =
          job.policy_tag == kDecodeTag ? decode_query_bytes : prefill_query_bytes;
      for (const auto& [holder, held] : job.remote_holders) {
        // The holder computed the partial attention of these queries over its segments.
        sim.ChargeExtra(holder, cost.CachedAttentionSeconds(t, held) * static_cast<double>(iters));
        sim.AddCacheAccess(holder, held * iters);
        query_bytes += plan::MoveQueriesBytes(shape_, t) * iters;
      }
      if (job.policy_tag == kDecodeTag) {
        // Decode queries attend to the whole sequence: their load finds heavy hitters too. It
        // reaches the tracker every sample period (FlushDecodeLoad): the tracker's decay is
        // far slower than that.
        if (state_[job.request].decode_tokens_unrecorded == 0) decoding_.push_back(job.request);
        state_[job.request].decode_tokens_unrecorded += t * iters;
      }
    }
    if (decode_query_bytes > 0) sim.AddBytesMoved(decode_query_bytes, "decode_queries");
    if (prefill_query_bytes > 0) sim.AddBytesMoved(prefill_query_bytes, "prefill_queries");
  }

  void OnSample(Simulator& sim) override {
    Tick(sim);
    FlushDecodeLoad();
    auto rebalanced = lake_->Rebalance();
    if (Ok(rebalanced.status())) {
      sim.AddBytesMoved(rebalanced->bytes_moved, "rebalance");
      for (const balance::BalanceAction& a : rebalanced->actions) {
        if (a.kind == balance::ActionKind::kDrop) continue;
        CopySegment(sim, a.segment, a.from.value(), a.to.value());
      }
    }
    // Copies that have landed need no more tracking.
    absl::erase_if(landing_, [&](const auto& entry) { return entry.second <= sim.now(); });
    Dispatch(sim);
  }

  std::map<std::string, double> Counters() const override {
    if (!options_.compare_dispatch || lake_ == nullptr) return {};
    const plan::DispatchComparison c = lake_->dispatch_comparison();
    return {{"dispatch_batches", static_cast<double>(c.batches)},
            {"dispatch_query_bytes", static_cast<double>(c.query_bytes)},
            {"dispatch_other_query_bytes", static_cast<double>(c.other_query_bytes)},
            {"dispatch_holders", static_cast<double>(c.holders)},
            {"dispatch_other_holders", static_cast<double>(c.other_holders)},
            {"dispatch_new_segment_bytes", static_cast<double>(c.new_segment_bytes)},
            {"dispatch_other_new_segment_bytes", static_cast<double>(c.other_new_segment_bytes)}};
  }

  int64_t UnstoredSegments() const override { return not_stored_; }

  void PoolStats(Simulator& sim, int64_t* copies, int64_t* distinct) override {
    (void)sim;
    const lake::LakeStats stats = lake_->Stats();
    *copies = stats.replicas;
    *distinct = stats.segments;
  }

 private:
  static constexpr int64_t kDecodeTag = 2;

  struct RequestState {
    std::vector<index::SegmentKey> keys;                // the whole prompt's
    int64_t extra_slots = 0;                            // segments its generated tokens need
    std::vector<plan::NewSegmentPlacement> placements;  // of the chunk in flight
    int64_t prefilled = 0;  // prompt tokens whose KV exists (cached at admission + computed)
    int64_t chunk_end = 0;  // prefilled after the chunk in flight
    int parts_left = 0;     // parts of the chunk in flight still running
    int producer = 0;       // the chunk's computing instance
    double pull_s = 0;      // the chunk's slowest KV pull, seconds
    int64_t decode_tokens_unrecorded = 0;  // decode queries not yet in the tracker
    int64_t decode_est_context = 0;        // its share of decode_context_ (locally attended)
    double decode_budget_s = 0;            // its decode iteration budget (DecodeBudgetSeconds)
    bool admitted = false;                 // admitted to the pool (Lake) and not yet released
  };

  // Instances that may take prefill work now: nothing runs, waits or is on its way there.
  std::vector<int> FreeForPrefill(Simulator& sim) const {
    std::vector<int> free;
    for (Instance& inst : sim.instances()) {
      if (options_.fixed_prefill_instances > 0 && inst.id >= options_.fixed_prefill_instances) {
        continue;
      }
      if (!inst.busy && inst.in_flight == 0) free.push_back(inst.id);
    }
    return free;
  }

  // Admits the queue's head requests to the pool as far as memory allows, first come first
  // served; returns the requests that may be scheduled now (admitted, not running a chunk),
  // in queue order, enough to fill `free` instances' budget. A request that waits for memory
  // keeps every request behind it from being admitted, but not those admitted already (a
  // later turn of a session queues by its position in the workload, so it can sit ahead of a
  // request admitted before it arrived): they hold the memory the waiting one needs, and only
  // running them to the end frees it.
  std::vector<int64_t> Ready(Simulator& sim, int free) {
    if (options_.admit_longest_prefix_first) AdmitLongestPrefixFirst(sim);
    std::vector<int64_t> ready;
    const int64_t budget = static_cast<int64_t>(free) * sched_.chunk_tokens;
    int64_t tokens = 0;
    bool admitting = true;
    for (auto it = queue_.begin(); it != queue_.end() && tokens < budget;) {
      const int64_t request = *it;
      RequestState& st = state_[request];
      if (!st.admitted && (!admitting || !AdmitToPool(sim, request))) {
        if (!admitting || active_requests_ > 0) {  // waits for memory
          admitting = false;
          ++it;
          continue;
        }
        // Nothing holds pool memory and it still does not fit: it never will.
        it = queue_.erase(it);
        sim.Reject(request);
        st.keys.clear();
        continue;
      }
      ready.push_back(request);
      tokens += sim.workload().requests[request].input_tokens - st.prefilled;
      ++it;
    }
    return ready;
  }

  // TokenLakePolicyOptions::admit_longest_prefix_first: the first kLpmWindow queued requests
  // not yet admitted are admitted longest cached prefix first (ties in queue order) while they
  // fit; at the first that does not, this pass stops, and Ready's admission in queue order
  // follows as without the option.
  static constexpr int kLpmWindow = 128;
  void AdmitLongestPrefixFirst(Simulator& sim) {
    std::vector<std::pair<int64_t, int64_t>> window;  // (-matched tokens, request)
    for (auto it = queue_.begin();
         it != queue_.end() && static_cast<int>(window.size()) < kLpmWindow; ++it) {
      const RequestState& st = state_[*it];
      if (st.admitted) continue;
      window.emplace_back(-lake_->Match(st.keys).matched_tokens, *it);
    }
    if (window.size() < 2) return;  // queue order decides
    std::sort(window.begin(), window.end());
    for (const auto& [neg_matched, request] : window) {
      (void)neg_matched;
      if (!AdmitToPool(sim, request)) return;
    }
  }

  bool AdmitToPool(Simulator& sim, int64_t request) {
    Tick(sim);
    RequestState& st = state_[request];
    const Request& r = sim.workload().requests[request];
    lake::LakeRequest lr;
    lr.id = RequestId(static_cast<uint64_t>(request));
    lr.keys = st.keys;
    lr.new_tokens = r.input_tokens;
    lr.extra_slots = st.extra_slots;
    auto admitted = lake_->TryAdmit(lr);
    if (!Ok(admitted.status()) || !admitted->has_value()) return false;
    st.admitted = true;
    ++active_requests_;
    st.prefilled = std::min((*admitted)->matched_tokens, r.input_tokens - 1);
    sim.record(request).cached_tokens = st.prefilled;
    return true;
  }

  // The keys of the prompt's first `end` tokens (whole segments, or the whole prompt).
  std::vector<index::SegmentKey> KeysUpTo(const RequestState& st, const Request& r,
                                          int64_t end) const {
    const size_t n =
        end >= r.input_tokens ? st.keys.size() : static_cast<size_t>(end / kBlockTokens);
    return std::vector<index::SegmentKey>(st.keys.begin(), st.keys.begin() + n);
  }

  // Schedules this iteration's prefill batches on the instances free for prefill.
  void Dispatch(Simulator& sim) {
    if (dispatching_ || queue_.empty()) return;
    dispatching_ = true;
    std::vector<int> free = FreeForPrefill(sim);
    if (!free.empty()) {
      const std::vector<int64_t> ready = Ready(sim, static_cast<int>(free.size()));
      if (!ready.empty()) {
        std::vector<sched::PrefillCandidate> cands;
        cands.reserve(ready.size());
        for (int64_t request : ready) {
          const RequestState& st = state_[request];
          cands.push_back(
              {sim.workload().requests[request].input_tokens - st.prefilled, st.prefilled});
        }
        auto schedule =
            sched::SchedulePrefill(cands, static_cast<int32_t>(free.size()), *batch_cost_, sched_);
        if (Ok(schedule.status())) {
          for (const sched::PrefillBatch& batch : schedule->batches) {
            std::vector<int64_t> requests;
            for (int32_t item : batch.items) requests.push_back(ready[item]);
            RunBatch(sim, requests, batch.tokens, batch.dop, &free);
          }
        }
      }
    }
    if (options_.fixed_prefill_instances <= 0) MixIntoDecodes(sim);
    dispatching_ = false;
  }

  // Gives the decode instances with slack under the decode budget a chunk of the requests still
  // queued (sched::ScheduleMixedPrefill), one per instance at a time.
  void MixIntoDecodes(Simulator& sim) {
    if (queue_.empty()) return;
    std::vector<sched::DecodeInstance> view(sim.instances().size());
    int open = 0;
    for (Instance& inst : sim.instances()) {
      sched::DecodeInstance& v = view[inst.id];
      v.decodes = decodes_[inst.id];
      v.context_tokens = decode_context_[inst.id];
      v.budget_s = budgets_on_[inst.id].empty() ? 0 : *budgets_on_[inst.id].begin();
      // One chunk at a time, and room under the instance's running-request limit.
      v.eligible = v.decodes > 0 && chunks_on_[inst.id] == 0 &&
                   static_cast<int64_t>(inst.running.size() + inst.waiting.size()) <
                       sim.options().max_running;
      open += v.eligible ? 1 : 0;
    }
    if (open == 0) return;
    const std::vector<int64_t> ready = Ready(sim, open);
    if (ready.empty()) return;
    std::vector<sched::PrefillCandidate> cands;
    cands.reserve(ready.size());
    for (int64_t request : ready) {
      const RequestState& st = state_[request];
      cands.push_back({sim.workload().requests[request].input_tokens - st.prefilled, st.prefilled});
    }
    // The mixed iteration keeps the decodes' own budget: a larger one (measured: the whole TPOT
    // SLO) lengthens every iteration of the instance's decodes, so decode capacity drops, more
    // instances turn to decode, and on the conversation trace the queue ran away.
    // Under the per-token SLO each instance's own budget (its decodes' bars) is the limit.
    const double budget_s =
        options_.per_token_slo_factor > 0 ? std::numeric_limits<double>::max() : decode_budget_s_;
    auto mixed = sched::ScheduleMixedPrefill(cands, view, budget_s, *batch_cost_, sched_);
    if (!Ok(mixed.status())) return;
    // One batch per instance with the chunks it took (in the queue's order).
    std::vector<int> instances;
    for (const sched::MixedChunk& m : *mixed) {
      if (std::find(instances.begin(), instances.end(), m.instance) == instances.end()) {
        instances.push_back(m.instance);
      }
    }
    for (int instance : instances) {
      std::vector<int64_t> requests, tokens;
      for (const sched::MixedChunk& m : *mixed) {
        if (m.instance != instance) continue;
        requests.push_back(ready[m.candidate]);
        tokens.push_back(m.tokens);
      }
      std::vector<int> only = {instance};
      RunBatch(sim, requests, tokens, 1, &only);
    }
  }

  // Plans one prefill batch with the lake on `dop` of the free instances and delivers its parts.
  void RunBatch(Simulator& sim, const std::vector<int64_t>& requests,
                const std::vector<int64_t>& tokens, int dop, std::vector<int>* free) {
    Tick(sim);
    lake::Batch batch;
    batch.dop = dop;
    for (int f : *free) batch.candidates.push_back(InstanceId(f));
    for (size_t i = 0; i < requests.size(); ++i) {
      const RequestState& st = state_[requests[i]];
      const Request& r = sim.workload().requests[requests[i]];
      lake::LakeRequest lr;
      lr.id = RequestId(static_cast<uint64_t>(requests[i]));
      lr.keys = KeysUpTo(st, r, st.prefilled + tokens[i]);
      lr.new_tokens = tokens[i];
      batch.requests.push_back(std::move(lr));
    }
    auto plans = lake_->GenPlans(absl::MakeConstSpan(&batch, 1));
    if (!Ok(plans.status())) return;
    ReplicateHotRuns(sim, *plans);
    const plan::BatchPlan& plan = (*plans)[0];
    std::vector<int> group;
    for (InstanceId g : plan.instance_group) {
      group.push_back(g.value());
      free->erase(std::find(free->begin(), free->end(), g.value()));
    }
    for (size_t i = 0; i < requests.size(); ++i) {
      const int64_t request = requests[i];
      RequestState& st = state_[request];
      queue_.erase(request);
      const plan::RequestPlan& rp = plan.requests[i];
      st.chunk_end = st.prefilled + tokens[i];
      st.placements.clear();
      for (const plan::NewSegmentPlacement& p : plan.transfer.new_segments) {
        if (p.request == rp.request) st.placements.push_back(p);
      }
      st.producer = rp.compute_instance.value();
      sim.record(request).instance = rp.compute_instance.value();
      // KV pulled from holders streams in layer by layer while the chunk computes (the holders
      // send in parallel): the chunk's iteration lasts at least the slowest pull.
      const int computing = rp.compute_instance.value();
      st.pull_s = 0;
      for (const plan::HolderPlan& h : rp.holders) {
        if (h.action != plan::HolderAction::kPullKv) continue;
        sim.AddBytesMoved(h.bytes, "kv_pull");
        st.pull_s = std::max(
            st.pull_s,
            sim.cost().TransferSeconds(h.bytes, sim.cost().SameNode(h.holder.value(), computing)));
      }
      // The chunk starts when the segments it reads have landed where it reads them.
      const double ready = ReadyAt(sim, rp);
      // Sequence parallel: contiguous parts of the chunk, one per member.
      const int parts = static_cast<int>(group.size());
      st.parts_left = parts;
      int64_t offset = 0;
      for (int j = 0; j < parts; ++j) {
        const int64_t q = tokens[i] / parts + (j < tokens[i] % parts ? 1 : 0);
        Job* job = sim.NewJob(request, group[j]);
        job->prefill_only = true;
        job->owns_record = false;
        job->cached_tokens = st.prefilled + offset;
        job->prompt_end = st.prefilled + offset + q;
        job->continuation = true;
        // Holders other than this member serve their segments by moving the queries there
        // (pulled segments are local once pulled, to the computing member).
        int64_t remote_tokens = 0;
        for (const plan::HolderPlan& h : rp.holders) {
          const bool local =
              h.holder.value() == group[j] ||
              (h.action == plan::HolderAction::kPullKv && rp.compute_instance.value() == group[j]);
          if (local) continue;
          job->remote_holders.emplace_back(h.holder.value(), h.cached_tokens);
          remote_tokens += h.cached_tokens;
        }
        job->remote_context_tokens = std::min(remote_tokens, job->cached_tokens);
        offset += q;
        if (q == 0) {
          --st.parts_left;  // more members than tokens
          continue;
        }
        chunks_on_[group[j]] += 1;
        sim.Deliver(job, ready);
      }
    }
  }

  // The request's prompt is done (computed last on `last`): it decodes where PlaceDecode says.
  void StartDecode(Simulator& sim, int64_t request, int last) {
    const Request& r = sim.workload().requests[request];
    RequestState& st = state_[request];
    st.decode_budget_s = DecodeBudgetSeconds(sim, r);
    // Where its prompt's KV lives now: tokens held per instance (each replica counts).
    local_tokens_.assign(sim.instances().size(), 0);
    for (const index::SegmentKey& key : st.keys) {
      const index::PrefixTree::Node* node = lake_->prefix_tree().Find(key.id);
      if (node == nullptr) continue;
      for (InstanceId holder : node->replicas) local_tokens_[holder.value()] += node->num_tokens;
    }
    std::vector<sched::DecodeInstance> view(sim.instances().size());
    for (Instance& inst : sim.instances()) {
      sched::DecodeInstance& v = view[inst.id];
      v.decodes = decodes_[inst.id];
      v.context_tokens = decode_context_[inst.id];
      v.budget_s = budgets_on_[inst.id].empty() ? 0 : *budgets_on_[inst.id].begin();
      v.local_tokens = local_tokens_[inst.id];
      // The instance that just computed the prompt is about to be free; any other is idle if
      // nothing runs or waits there.
      v.idle = decodes_[inst.id] == 0 && (inst.id == last || (!inst.busy && inst.in_flight == 0));
      v.eligible =
          options_.fixed_prefill_instances <= 0 || inst.id >= options_.fixed_prefill_instances;
    }
    // A decode instance where it fits, holding most of its prompt (then the busiest); else the
    // idle instance holding most of it (usually the one that computed its last chunk).
    int target = sched::PlaceDecode(view, r.input_tokens, st.decode_budget_s, *batch_cost_,
                                    sim.options().max_running);
    // Every decode instance at its running-request limit and none idle: the least loaded one
    // queues it (the limit admits it when a decode there finishes).
    if (target < 0)
      target = sched::PlaceDecode(view, r.input_tokens, st.decode_budget_s, *batch_cost_);
    if (target < 0) target = last;
    budgets_on_[target].insert(st.decode_budget_s);
    decodes_[target] += 1;
    sim.record(request).instance = target;

    // The decode plan: one query token per iteration against the whole prompt.
    Tick(sim);
    lake::LakeRequest lr;
    lr.id = RequestId(static_cast<uint64_t>(request));
    lr.keys = st.keys;
    lr.new_tokens = 1;
    lr.count_hits = false;
    lake::Batch batch;
    batch.dop = 1;
    batch.candidates = {InstanceId(target)};
    batch.requests.push_back(std::move(lr));
    Job* decode = sim.NewJob(request, target);
    decode->decode_only = true;
    decode->cached_tokens = r.input_tokens;
    decode->decoded = 1;
    decode->continuation = true;
    decode->policy_tag = kDecodeTag;
    double ready = sim.now();
    auto plans = lake_->GenPlans(absl::MakeConstSpan(&batch, 1));
    if (Ok(plans.status())) {
      ReplicateHotRuns(sim, *plans);
      ready = ReadyAt(sim, (*plans)[0].requests[0]);
      for (const plan::HolderPlan& h : (*plans)[0].requests[0].holders) {
        if (h.holder.value() == target) continue;
        // A decode's query is tiny: it always moves to the holder.
        decode->remote_holders.emplace_back(h.holder.value(), h.cached_tokens);
        decode->remote_context_tokens += h.cached_tokens;
      }
    }
    decode->remote_context_tokens = std::min(decode->remote_context_tokens, r.input_tokens);
    // The instance's decode estimate counts the context it attends itself: the holders' part
    // runs on the holders, in parallel (charged to them), and the instance waits only for the
    // slowest (ExtraIterationSeconds), which the budget's headroom covers. Counting it as local
    // would leave a decode instance's slack unused: no prefill chunk would mix in.
    decode_context_[target] += r.input_tokens - decode->remote_context_tokens;
    st.decode_est_context = r.input_tokens - decode->remote_context_tokens;
    sim.Deliver(decode, ready);
  }

  // The lake's copies of hot runs read by `plans` (docs/adr/0020), moved over the links. The
  // plans themselves read the copies they named; later plans may read the new ones once landed.
  void ReplicateHotRuns(Simulator& sim, const std::vector<plan::BatchPlan>& plans) {
    if (!options_.hot_runs) return;
    auto copied = lake_->ReplicateHotRuns(plans);
    if (!Ok(copied.status())) return;
    if (copied->bytes_moved > 0) sim.AddBytesMoved(copied->bytes_moved, "hot_runs");
    for (const balance::BalanceAction& a : copied->actions) {
      if (a.kind == balance::ActionKind::kDrop) continue;
      CopySegment(sim, a.segment, a.from.value(), a.to.value());
    }
  }

  // Copies `segment`'s KV from `src` to `dst` over the links (LinkClock: serialised per link);
  // the replica on `dst` can be read once the copy lands.
  void CopySegment(Simulator& sim, SegmentId segment, int src, int dst) {
    const index::PrefixTree::Node* node = lake_->prefix_tree().Find(segment);
    const int64_t tokens = node != nullptr ? node->num_tokens : kBlockTokens;
    const double seconds =
        sim.cost().TransferSeconds(plan::KvBytes(shape_, tokens), sim.cost().SameNode(src, dst));
    const double lands = links_->Copy(src, dst, sim.now(), seconds);
    double& at = landing_[{segment.value(), dst}];
    at = std::max(at, lands);
  }

  // When every segment replica that `plan` reads has landed (now, if none is still in transit).
  double ReadyAt(Simulator& sim, const plan::RequestPlan& plan) const {
    double ready = sim.now();
    if (landing_.empty()) return ready;
    for (const plan::SegmentAssignment& a : plan.segments) {
      auto it = landing_.find({a.segment.value(), a.holder.value()});
      if (it != landing_.end()) ready = std::max(ready, it->second);
    }
    return ready;
  }

  void Tick(Simulator& sim) {
    const int64_t now_us = static_cast<int64_t>(std::llround(sim.now() * 1e6));
    if (now_us > clock_.NowUs()) clock_.SetUs(now_us);
  }

  bool Ok(const absl::Status& s) {
    if (s.ok()) return true;
    if (lake_errors_++ == 0) first_error_ = s.ToString();
    return false;
  }

  // A decode's iteration budget: decode_budget_share x its TPOT bar, which is the TPOT SLO, or
  // under the per-token SLO the request's own (factor x its batch-1 time per output token).
  double DecodeBudgetSeconds(Simulator& sim, const Request& r) const {
    if (options_.per_token_slo_factor <= 0) return decode_budget_s_;
    const Batch1Latency b1 =
        Batch1Latencies(sim.cost(), std::max<int64_t>(1, r.input_tokens),
                        std::max<int64_t>(1, r.output_tokens), sim.options().token_budget);
    if (!(b1.output_token_s > 0)) return decode_budget_s_;
    return options_.decode_budget_share * options_.per_token_slo_factor * b1.output_token_s;
  }

  // Records the decode load accumulated since the last flush.
  void FlushDecodeLoad() {
    for (int64_t request : decoding_) {
      RequestState& st = state_[request];
      if (st.admitted && st.decode_tokens_unrecorded > 0) {
        Ok(lake_->RecordQueryLoad(RequestId(static_cast<uint64_t>(request)),
                                  st.decode_tokens_unrecorded));
      }
      st.decode_tokens_unrecorded = 0;
    }
    decoding_.clear();
  }

  void Finish(int64_t request) {
    RequestState& st = state_[request];
    if (st.admitted && st.decode_tokens_unrecorded > 0) {
      Ok(lake_->RecordQueryLoad(RequestId(static_cast<uint64_t>(request)),
                                st.decode_tokens_unrecorded));
      st.decode_tokens_unrecorded = 0;
    }
    if (st.admitted) {
      Ok(lake_->Release(RequestId(static_cast<uint64_t>(request))));
      --active_requests_;
    }
    st.admitted = false;
    st.keys.clear();
    st.keys.shrink_to_fit();
    Dispatch(*sim_);  // pool memory was released
  }

  TokenLakePolicyOptions options_;
  Simulator* sim_ = nullptr;
  int num_instances_ = 0;
  ManualClock clock_;
  int64_t pool_slots_ = 0;
  int64_t active_requests_ = 0;  // requests admitted to the pool and not yet released
  int64_t not_stored_ = 0;       // segments of running requests that Commit could not store
  std::unique_ptr<lake::Lake> lake_;
  uint64_t salt_ = 0;
  plan::ModelShape shape_;
  std::unique_ptr<sched::CostModelBatchCost> batch_cost_;
  sched::ElasticSchedulerOptions sched_;
  double decode_budget_s_ = 0;
  // Requests waiting for their next prefill chunk, by position in the workload (its nominal
  // arrival order; a later session turn arrives when its previous one is answered, often long
  // before its nominal time, and queues behind requests of lower position). Queueing by actual
  // arrival instead interleaves the running sessions' turns, which then evict each other's
  // contexts (measured: docs/paper-reproduction.md, SCBench).
  std::set<int64_t> queue_;
  bool dispatching_ = false;
  std::vector<int64_t> decodes_;         // per instance: decodes placed there
  std::vector<int64_t> decode_context_;  // per instance: their prompt tokens attended there
  std::vector<int64_t> chunks_on_;       // per instance: prefill chunk parts in flight there
  // Per instance: the decode budgets of the decodes placed there (the smallest applies).
  std::vector<std::multiset<double>> budgets_on_;
  std::vector<int64_t> local_tokens_;  // StartDecode's per-instance scratch
  std::unique_ptr<LinkClock> links_;   // background copies (new segments, rebalancing)
  // (segment, instance) -> when its copy there lands, for copies that may still be in transit.
  absl::flat_hash_map<std::pair<uint64_t, int>, double> landing_;
  std::vector<RequestState> state_;
  std::vector<int64_t> decoding_;  // requests with decode load not yet recorded
  int64_t lake_errors_ = 0;
  std::string first_error_;
  // ExtraIterationSeconds' per-holder sums (kept to avoid reallocating).
  std::vector<double> holder_attention_s_;
  std::vector<int64_t> holder_bytes_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Policy>> MakeTokenLakePolicy(TokenLakePolicyOptions options) {
  if (options.max_dop < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tokenlake policy: max_dop must be >= 1, got %d", options.max_dop));
  }
  if (!(options.decode_budget_share > 0 && options.decode_budget_share <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tokenlake policy: decode_budget_share must be in (0, 1], got %g",
                        options.decode_budget_share));
  }
  if (!(options.local_eviction_min_age_ratio >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tokenlake policy: local_eviction_min_age_ratio must be >= 0, got %g",
                        options.local_eviction_min_age_ratio));
  }
  if (!(options.per_token_slo_factor >= 0)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tokenlake policy: per_token_slo_factor must be >= 0, got %g",
                        options.per_token_slo_factor));
  }
  if (options.fixed_prefill_instances < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("tokenlake policy: fixed_prefill_instances must be >= 0, got %d",
                        options.fixed_prefill_instances));
  }
  return std::unique_ptr<Policy>(new TokenLakePolicy(options));
}

}  // namespace tokenlake::sim
