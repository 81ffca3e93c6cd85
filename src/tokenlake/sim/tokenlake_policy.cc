#include "tokenlake/sim/tokenlake_policy.h"

#include <algorithm>
#include <cmath>
#include <iostream>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/plan/cost_model.h"

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

  std::string name() const override { return "tokenlake"; }

  void Init(Simulator& sim) override {
    sim_ = &sim;
    const int n = sim.options().num_instances;
    reserve_blocks_ = static_cast<int64_t>(static_cast<double>(sim.kv_capacity_blocks()) *
                                           options_.decode_reserve_fraction);
    reserve_used_.assign(static_cast<size_t>(n), 0);
    lake::LakeOptions lo;
    lo.num_instances = n;
    lo.segment_tokens = static_cast<int32_t>(kBlockTokens);
    lo.local_eviction_min_age_ratio = options_.local_eviction_min_age_ratio;
    lo.slots_per_instance =
        static_cast<int32_t>(std::max<int64_t>(1, sim.kv_capacity_blocks() - reserve_blocks_));
    const ModelSpec& m = sim.cost().model();
    lo.model.num_layers = static_cast<int32_t>(m.num_layers);
    lo.model.num_heads = static_cast<int32_t>(m.num_heads);
    lo.model.num_kv_heads = static_cast<int32_t>(m.num_kv_heads);
    lo.model.head_dim = static_cast<int32_t>(m.head_dim);
    lo.model.dtype_bytes = static_cast<int32_t>(m.dtype_bytes);
    shape_ = lo.model;
    pool_slots_ = static_cast<int64_t>(lo.slots_per_instance) * n;
    auto lake = lake::Lake::Create(lo, &clock_);
    TOKENLAKE_CHECK_OK(lake.status());
    lake_ = *std::move(lake);
    salt_ = index::NamespaceSalt(m.name);
    state_.assign(sim.workload().requests.size(), RequestState{});
  }

  void OnArrival(Simulator& sim, int64_t request) override {
    Tick(sim);
    const Request& r = sim.workload().requests[request];
    RequestState& st = state_[request];
    auto keys = index::KeysFromBlockHashes(salt_, r.block_ids, static_cast<int32_t>(kBlockTokens),
                                           r.input_tokens);
    if (!Ok(keys.status())) return sim.Reject(request);
    st.keys = *std::move(keys);
    // A prompt with more segments than the whole pool can never be stored: like a baseline's
    // request larger than an instance's memory, it is rejected.
    if (static_cast<int64_t>(st.keys.size()) > pool_slots_) {
      st.keys.clear();
      return sim.Reject(request);
    }
    if (StartSplit(sim, request)) return;
    // DoP 1: the request queues at the instance with the fewest requests in flight; it is
    // matched, planned and admitted to the pool when that instance admits it (Admit).
    const index::MatchResult match = lake_->Match(st.keys);
    const int inst = LeastLoaded(sim, st.keys, match.matched_segments);
    st.deferred = true;
    st.compute = inst;
    sim.record(request).instance = inst;
    Job* job = sim.NewJob(request, inst);
    job->prefill_only = true;
    job->owns_record = false;
    job->policy_tag = 1;
    sim.Deliver(job, sim.now());
  }

  // A long prefill over idle instances (elastic DoP > 1): admits `request` to the pool now
  // (Lake::TryAdmit: its matched prefix pinned and its new segments' slots reserved) and
  // delivers its parts, first in their instances' queues (they only go to idle instances).
  // False when the DoP is 1 or the pool cannot hold its new segments now (nothing changed).
  bool StartSplit(Simulator& sim, int64_t request) {
    const Request& r = sim.workload().requests[request];
    RequestState& st = state_[request];
    const index::MatchResult match = lake_->Match(st.keys);
    const int64_t cached = std::min(match.matched_tokens, r.input_tokens - 1);
    const int64_t new_tokens = r.input_tokens - cached;
    const int n = sim.options().num_instances;
    // Elastic DoP: spread a long prefill only over capacity that is idle now (at most as many
    // instances as have nothing in flight), so that splitting never queues parts behind others.
    int idle = 0;
    for (const Instance& inst : sim.instances()) idle += inst.in_flight == 0 ? 1 : 0;
    const int dop = static_cast<int>(
        std::clamp<int64_t>((new_tokens + options_.dop_tokens - 1) / options_.dop_tokens, 1,
                            std::max(1, std::min({options_.max_dop, n, idle}))));

    if (dop == 1) return false;
    lake::LakeRequest lr;
    lr.id = RequestId(static_cast<uint64_t>(request));
    lr.keys = st.keys;
    lr.new_tokens = new_tokens;
    lake::Batch batch;
    batch.dop = dop;
    batch.requests.push_back(lr);
    auto admitted = lake_->TryAdmit(lr);
    if (!Ok(admitted.status())) {
      sim.Reject(request);
      return true;
    }
    if (!admitted->has_value()) return false;  // queues with DoP 1 instead
    st.admitted = true;
    ++active_requests_;
    auto plans = lake_->GenPlans(absl::MakeConstSpan(&batch, 1));
    if (!Ok(plans.status())) {
      sim.Reject(request);
      Finish(request);
      return true;
    }
    const plan::BatchPlan& plan = (*plans)[0];
    const plan::RequestPlan& rp = plan.requests[0];
    st.compute = rp.compute_instance.value();
    st.placements = plan.transfer.new_segments;
    RequestRecord& rec = sim.record(request);
    rec.instance = st.compute;
    rec.cached_tokens = std::min((*admitted)->matched_tokens, r.input_tokens - 1);

    std::vector<int> group = {st.compute};
    for (InstanceId g : plan.instance_group) {
      if (g.value() != st.compute) group.push_back(g.value());
    }
    // Remote holders (queries move there) and pulled KV (moved here first).
    std::vector<std::pair<int, int64_t>> remote;
    int64_t remote_tokens = 0, pull_bytes = 0;
    for (const plan::HolderPlan& h : rp.holders) {
      if (h.action == plan::HolderAction::kMoveQueries) {
        remote.emplace_back(h.holder.value(), h.cached_tokens);
        remote_tokens += h.cached_tokens;
      } else if (h.action == plan::HolderAction::kPullKv) {
        pull_bytes += h.bytes;
      }
    }
    remote_tokens = std::min(remote_tokens, cached);
    double ready = sim.now();
    if (pull_bytes > 0) {
      sim.AddBytesMoved(pull_bytes, "kv_pull");
      ready += sim.cost().TransferSeconds(pull_bytes, /*same_node=*/false);
    }
    // Split the uncached prompt into `group.size()` contiguous parts.
    const int parts = static_cast<int>(group.size());
    st.parts_left = parts;
    int64_t offset = 0;
    for (int j = 0; j < parts; ++j) {
      const int64_t q = new_tokens / parts + (j < new_tokens % parts ? 1 : 0);
      Job* job = sim.NewJob(request, group[j]);
      job->prefill_only = true;
      job->owns_record = false;
      job->cached_tokens = cached + offset;
      job->prompt_end = cached + offset + q;
      job->remote_holders = remote;
      job->remote_context_tokens = remote_tokens;
      job->policy_tag = j == 0 ? 1 : 0;  // part 0 runs on the computing instance
      job->continuation = true;          // never queued behind a request waiting for memory
      offset += q;
      sim.Deliver(job, ready);
    }
    return true;
  }

  bool Admit(Simulator& sim, Job& job) override {
    (void)sim;
    // The prompt's KV lives in the pool. The computing part reserves the generated tokens'
    // memory on its instance (held until the request finishes), like the baselines reserve
    // prompt + output at admission; the decode continuation already holds it.
    if (job.decode_only || job.policy_tag != 1) return true;
    const int64_t blocks = (job.r->output_tokens + kBlockTokens - 1) / kBlockTokens + 1;
    if (reserve_used_[job.instance] + blocks > reserve_blocks_) {
      // A request needing more than the whole reserve runs alone.
      if (!(reserve_used_[job.instance] == 0 && blocks > reserve_blocks_)) return false;
    }
    RequestState& st = state_[job.request];
    if (st.deferred && !st.admitted && !AdmitToPool(sim, job)) return false;
    reserve_used_[job.instance] += blocks;
    state_[job.request].reserved_blocks = blocks;
    return true;
  }

  bool WaitsForMemory(Simulator& sim, const Job& job) override {
    (void)sim, (void)job;
    // Pool memory is shared: while any request holds pool memory, its release lets this one in.
    return active_requests_ > 0;
  }

  // A DoP-1 request at the head of its instance's queue: matches and plans it now, and admits
  // it to the pool if the pool can hold its new segments (Lake::TryAdmit). False: it waits.
  bool AdmitToPool(Simulator& sim, Job& job) {
    Tick(sim);
    const Request& r = *job.r;
    RequestState& st = state_[job.request];
    const index::MatchResult match = lake_->Match(st.keys);
    const int64_t cached = std::min(match.matched_tokens, r.input_tokens - 1);
    lake::LakeRequest lr;
    lr.id = RequestId(static_cast<uint64_t>(job.request));
    lr.keys = st.keys;
    lr.new_tokens = r.input_tokens - cached;
    lr.preferred_instance = InstanceId(job.instance);
    auto admitted = lake_->TryAdmit(lr);
    if (!Ok(admitted.status())) return false;
    if (!admitted->has_value()) return false;
    st.admitted = true;
    ++active_requests_;
    lake::Batch batch;
    batch.dop = sim.options().num_instances;
    batch.requests.push_back(lr);
    auto plans = lake_->GenPlans(absl::MakeConstSpan(&batch, 1));
    st.parts_left = 1;
    job.cached_tokens = std::min((*admitted)->matched_tokens, r.input_tokens - 1);
    job.prompt_end = r.input_tokens;
    RequestRecord& rec = sim.record(job.request);
    rec.cached_tokens = job.cached_tokens;
    if (!Ok(plans.status())) return true;  // runs without a plan: all local, nothing stored
    const plan::BatchPlan& plan = (*plans)[0];
    const plan::RequestPlan& rp = plan.requests[0];
    // The planner computes a lone request on its preferred instance (planner.h, step 2), so
    // the plan's holders and placements are this instance's.
    st.placements = plan.transfer.new_segments;
    int64_t remote_tokens = 0, pull_bytes = 0;
    for (const plan::HolderPlan& h : rp.holders) {
      if (h.action == plan::HolderAction::kMoveQueries) {
        job.remote_holders.emplace_back(h.holder.value(), h.cached_tokens);
        remote_tokens += h.cached_tokens;
      } else if (h.action == plan::HolderAction::kPullKv) {
        pull_bytes += h.bytes;
      }
    }
    job.remote_context_tokens = std::min(remote_tokens, job.cached_tokens);
    if (pull_bytes > 0) {
      // The pulled KV arrives before the prefill computes: this instance's iteration waits.
      sim.AddBytesMoved(pull_bytes, "kv_pull");
      sim.instances()[job.instance].extra_s +=
          sim.cost().TransferSeconds(pull_bytes, /*same_node=*/false);
    }
    return true;
  }

  void OnPrefillDone(Simulator& sim, Job& job) override {
    RequestState& st = state_[job.request];
    if (--st.parts_left > 0) return;
    Tick(sim);
    const Request& r = *job.r;
    RequestRecord& rec = sim.record(job.request);
    rec.first_token_s = sim.now();
    const RequestId id(static_cast<uint64_t>(job.request));
    auto committed = lake_->Commit(id, st.placements);
    if (Ok(committed.status())) {
      sim.AddBytesMoved(committed->moved_bytes, "new_segments");
      not_stored_ += static_cast<int64_t>(committed->not_stored.size());
    }
    st.placements.clear();
    PokeAll(sim);  // deduplicated placements gave back their reservations
    if (r.output_tokens <= 1) {
      rec.finish_s = sim.now();
      Finish(job.request);
      return;
    }
    // The decode plan: one query token per iteration against the whole prompt.
    lake::LakeRequest lr;
    lr.id = id;
    lr.keys = st.keys;
    lr.new_tokens = 1;
    lr.preferred_instance = InstanceId(st.compute);
    lr.count_hits = false;
    lake::Batch batch;
    batch.dop = sim.options().num_instances;
    batch.requests.push_back(lr);
    Job* decode = sim.NewJob(job.request, st.compute);
    decode->decode_only = true;
    decode->cached_tokens = r.input_tokens;
    decode->decoded = 1;
    decode->continuation = true;
    auto plans = lake_->GenPlans(absl::MakeConstSpan(&batch, 1));
    if (Ok(plans.status())) {
      for (const plan::HolderPlan& h : (*plans)[0].requests[0].holders) {
        if (h.action == plan::HolderAction::kMoveQueries && h.holder.value() != st.compute) {
          decode->remote_holders.emplace_back(h.holder.value(), h.cached_tokens);
          decode->remote_context_tokens += h.cached_tokens;
        }
      }
    }
    decode->remote_context_tokens = std::min(decode->remote_context_tokens, r.input_tokens);
    sim.Deliver(decode, sim.now());
  }

  void OnJobDone(Simulator& sim, Job& job) override {
    (void)sim;
    if (!job.decode_only) return;
    Finish(job.request);
  }

  double ExtraIterationSeconds(Simulator& sim, Instance& inst, const std::vector<Job*>& jobs,
                               const std::vector<int64_t>& tokens, double compute_s) override {
    // The computing instance merges the holders' partials: it waits for the slowest holder's
    // attention plus the query/partial transfer, beyond its own compute (overlapped).
    double worst = 0;
    const CostModel& cost = sim.cost();
    const int gpn = static_cast<int>(cost.net().gpus_per_node);
    for (size_t i = 0; i < jobs.size() && i < tokens.size(); ++i) {
      const int64_t t = tokens[i];
      if (t <= 0) continue;
      for (const auto& [holder, held] : jobs[i]->remote_holders) {
        const double attn = cost.CachedAttentionSeconds(t, held);
        const int64_t bytes = plan::MoveQueriesBytes(shape_, t);
        worst = std::max(worst, attn + cost.TransferSeconds(bytes, holder / gpn == inst.id / gpn));
      }
    }
    return std::max(0.0, worst - compute_s);
  }

  void OnIterationsDone(Simulator& sim, Instance& inst, const std::vector<Job*>& jobs,
                        const std::vector<int64_t>& tokens, int64_t iters) override {
    (void)inst;
    const CostModel& cost = sim.cost();
    for (size_t i = 0; i < jobs.size() && i < tokens.size(); ++i) {
      const int64_t t = tokens[i];
      if (t <= 0) continue;
      for (const auto& [holder, held] : jobs[i]->remote_holders) {
        // The holder computed the partial attention of these queries over its segments.
        sim.ChargeExtra(holder, cost.CachedAttentionSeconds(t, held) * static_cast<double>(iters));
        sim.AddBytesMoved(plan::MoveQueriesBytes(shape_, t) * iters,
                          jobs[i]->decode_only ? "decode_queries" : "prefill_queries");
      }
    }
  }

  void OnSample(Simulator& sim) override {
    Tick(sim);
    auto rebalanced = lake_->Rebalance();
    if (Ok(rebalanced.status())) sim.AddBytesMoved(rebalanced->bytes_moved, "rebalance");
    PokeAll(sim);
  }

  int64_t UnstoredSegments() const override { return not_stored_; }

  void PoolStats(Simulator& sim, int64_t* copies, int64_t* distinct) override {
    (void)sim;
    const lake::LakeStats stats = lake_->Stats();
    *copies = stats.replicas;
    *distinct = stats.segments;
  }

 private:
  struct RequestState {
    std::vector<index::SegmentKey> keys;
    std::vector<plan::NewSegmentPlacement> placements;
    int compute = -1;
    int parts_left = 0;
    int64_t reserved_blocks = 0;  // generated tokens' memory held on `compute`
    bool admitted = false;        // admitted to the pool (Lake) and not yet released
    bool deferred = false;        // DoP 1: admitted to the pool when its instance admits it
  };

  void Tick(Simulator& sim) {
    const int64_t now_us = static_cast<int64_t>(std::llround(sim.now() * 1e6));
    if (now_us > clock_.NowUs()) clock_.SetUs(now_us);
  }

  bool Ok(const absl::Status& s) {
    if (s.ok()) return true;
    if (lake_errors_++ == 0) first_error_ = s.ToString();
    return false;
  }

  void Finish(int64_t request) {
    RequestState& st = state_[request];
    if (st.compute >= 0) reserve_used_[st.compute] -= st.reserved_blocks;
    st.reserved_blocks = 0;
    if (st.admitted) {
      Ok(lake_->Release(RequestId(static_cast<uint64_t>(request))));
      --active_requests_;
    }
    st.admitted = false;
    st.keys.clear();
    st.keys.shrink_to_fit();
    PokeAll(*sim_);
  }

  // Pool memory was released: idle instances retry their waiting requests.
  void PokeAll(Simulator& sim) {
    for (Instance& inst : sim.instances()) {
      if (!inst.busy && !inst.waiting.empty()) sim.Poke(inst.id);
    }
  }

  // The instance with the fewest requests in flight; ties: most of the prefix held, lower id.
  int LeastLoaded(Simulator& sim, const std::vector<index::SegmentKey>& keys, int32_t matched) {
    auto& insts = sim.instances();
    std::vector<int64_t> held(insts.size(), 0);
    for (int32_t k = 0; k < matched; ++k) {
      const index::PrefixTree::Node* node = lake_->prefix_tree().Find(keys[k].id);
      if (node == nullptr) break;
      for (InstanceId rep : node->replicas) {
        if (rep.value() >= 0 && rep.value() < static_cast<int>(held.size())) {
          held[rep.value()] += node->num_tokens;
        }
      }
    }
    int best = 0;
    for (size_t i = 1; i < insts.size(); ++i) {
      if (insts[i].in_flight < insts[best].in_flight ||
          (insts[i].in_flight == insts[best].in_flight && held[i] > held[best])) {
        best = static_cast<int>(i);
      }
    }
    return best;
  }

  TokenLakePolicyOptions options_;
  Simulator* sim_ = nullptr;
  ManualClock clock_;
  int64_t pool_slots_ = 0;
  int64_t active_requests_ = 0;  // requests admitted to the pool and not yet released
  int64_t not_stored_ = 0;       // segments of running requests that Commit could not store
  std::unique_ptr<lake::Lake> lake_;
  uint64_t salt_ = 0;
  plan::ModelShape shape_;
  int64_t reserve_blocks_ = 0;
  std::vector<int64_t> reserve_used_;
  std::vector<RequestState> state_;
  int64_t lake_errors_ = 0;
  std::string first_error_;
};

}  // namespace

absl::StatusOr<std::unique_ptr<Policy>> MakeTokenLakePolicy(TokenLakePolicyOptions options) {
  if (options.dop_tokens < 1 || options.max_dop < 1 || options.decode_reserve_fraction < 0 ||
      options.decode_reserve_fraction >= 1 || !(options.local_eviction_min_age_ratio >= 0)) {
    return absl::InvalidArgumentError("bad TokenLakePolicyOptions");
  }
  return std::unique_ptr<Policy>(new TokenLakePolicy(options));
}

}  // namespace tokenlake::sim
