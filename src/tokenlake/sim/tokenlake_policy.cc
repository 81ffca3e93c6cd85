#include "tokenlake/sim/tokenlake_policy.h"

#include <algorithm>
#include <cmath>
#include <deque>
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
    pending_.push_back(request);
    Drain(sim);
  }

  // Starts waiting requests in arrival order while the pool can hold their new segments.
  void Drain(Simulator& sim) {
    if (draining_) return;
    draining_ = true;
    while (!pending_.empty() && Start(sim, pending_.front())) pending_.pop_front();
    draining_ = false;
  }

  // Admits `request` to the pool (Lake::TryAdmit: its matched prefix pinned and its new
  // segments' slots reserved) and delivers its prefill part(s). False when the pool cannot
  // hold its new segments now (nothing changed: it keeps waiting).
  bool Start(Simulator& sim, int64_t request) {
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

    lake::LakeRequest lr;
    lr.id = RequestId(static_cast<uint64_t>(request));
    lr.keys = st.keys;
    lr.new_tokens = new_tokens;
    lake::Batch batch;
    if (dop == 1) {
      lr.preferred_instance = InstanceId(LeastLoaded(sim, st.keys, match.matched_segments));
      batch.dop = n;
    } else {
      batch.dop = dop;
    }
    batch.requests.push_back(lr);
    auto admitted = lake_->TryAdmit(lr);
    if (!Ok(admitted.status())) {
      sim.Reject(request);
      return true;
    }
    if (!admitted->has_value()) return false;  // waits for memory
    st.admitted = true;
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
    if (dop > 1) {
      for (InstanceId g : plan.instance_group) {
        if (g.value() != st.compute) group.push_back(g.value());
      }
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
    reserve_used_[job.instance] += blocks;
    state_[job.request].reserved_blocks = blocks;
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
    Drain(sim);  // deduplicated placements gave back their reservations
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
    Drain(sim);
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
    bool admitted = false;
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
    if (st.admitted) Ok(lake_->Release(RequestId(static_cast<uint64_t>(request))));
    st.admitted = false;
    st.keys.clear();
    st.keys.shrink_to_fit();
    Drain(*sim_);
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
  std::deque<int64_t> pending_;  // arrived, waiting for pool memory (arrival order)
  bool draining_ = false;
  int64_t not_stored_ = 0;  // segments of running requests that Commit could not store
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
