#include "tokenlake/sim/baselines.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::sim {
namespace {

int64_t BlocksFor(int64_t tokens) { return (tokens + kBlockTokens - 1) / kBlockTokens; }

// Prompt tokens covered by the first `blocks` blocks of `r`.
int64_t TokensOf(const Request& r, int64_t blocks) {
  return std::min(r.input_tokens, blocks * kBlockTokens);
}

// Tokens of work left on `inst`: prompt still to compute and output still to generate, over
// its waiting and running jobs.
int64_t QueuedTokens(const Instance& inst) {
  int64_t tokens = 0;
  auto add = [&](const Job* j) {
    const int64_t prompt_left =
        j->decode_only ? 0 : std::max<int64_t>(0, j->PromptNew() - j->prefilled);
    const int64_t output_left =
        j->prefill_only ? 0 : std::max<int64_t>(0, j->r->output_tokens - j->decoded);
    tokens += prompt_left + output_left;
  };
  for (const Job* j : inst.waiting) add(j);
  for (const Job* j : inst.running) add(j);
  return tokens;
}

}  // namespace

bool LocalCachePolicy::LessLoaded(const Instance& a, const Instance& b) {
  if (a.in_flight != b.in_flight) return a.in_flight < b.in_flight;
  const int64_t qa = QueuedTokens(a), qb = QueuedTokens(b);
  if (qa != qb) return qa < qb;
  if (a.busy_s != b.busy_s) return a.busy_s < b.busy_s;
  return a.id < b.id;
}

int LocalCachePolicy::LeastLoaded(const std::vector<Instance>& instances,
                                  const std::vector<int>& ids) {
  TOKENLAKE_CHECK(!ids.empty());
  int best = ids[0];
  for (size_t k = 1; k < ids.size(); ++k) {
    if (LessLoaded(instances[ids[k]], instances[best])) best = ids[k];
  }
  return best;
}

void LocalCachePolicy::PoolStats(Simulator& sim, int64_t* copies, int64_t* distinct) {
  auto& insts = sim.instances();
  if (copy_counter_ == nullptr) {
    copy_counter_ = std::make_unique<IdCopyCounter>();
    for (Instance& inst : insts) inst.cache->AttachCopyCounter(copy_counter_.get());
  }
  *copies = 0;
  for (const Instance& inst : insts) *copies += inst.cache->cached_blocks();
  *distinct = copy_counter_->distinct();
}

void LocalCachePolicy::OnArrival(Simulator& sim, int64_t request) {
  const int instance = Route(sim, request);
  Job* job = sim.NewJob(request, instance);
  sim.record(request).instance = instance;
  sim.Deliver(job, sim.now());
}

bool LocalCachePolicy::Admit(Simulator& sim, Job& job) {
  BlockCache& cache = *sim.instances()[job.instance].cache;
  const Request& r = *job.r;
  const int64_t total_blocks = BlocksFor(r.input_tokens + r.output_tokens);
  if (job.decode_only) {
    if (!cache.AllocatePrivate(total_blocks)) return false;
    job.private_blocks = total_blocks;
    return true;
  }
  const int64_t matched = cache.Match(r.block_ids);
  cache.Acquire(r.block_ids, matched);
  if (!cache.AllocatePrivate(total_blocks - matched)) {
    cache.Release(absl::MakeConstSpan(r.block_ids).first(static_cast<size_t>(matched)));
    return false;
  }
  job.held_ids.assign(r.block_ids.begin(), r.block_ids.begin() + matched);
  job.private_blocks = total_blocks - matched;
  // At least one prompt token is computed, to produce the first output token.
  job.cached_tokens = std::min(TokensOf(r, matched), r.input_tokens - 1);
  sim.record(job.request).cached_tokens = job.cached_tokens;
  return true;
}

void LocalCachePolicy::OnPrefillDone(Simulator& sim, Job& job) {
  BlockCache& cache = *sim.instances()[job.instance].cache;
  // The prompt's newly computed blocks become cached (shareable) blocks.
  for (size_t i = job.held_ids.size(); i < job.r->block_ids.size(); ++i) {
    if (job.private_blocks == 0) break;
    if (cache.Promote(job.r->block_ids[i])) {
      job.held_ids.push_back(job.r->block_ids[i]);
      --job.private_blocks;
    }
  }
}

int RoundRobinPolicy::Route(Simulator& sim, int64_t request) {
  (void)request;
  const int i = next_;
  next_ = (next_ + 1) % sim.options().num_instances;
  return i;
}

int LeastLoadPolicy::Route(Simulator& sim, int64_t request) {
  (void)request;
  const auto& insts = sim.instances();
  int best = 0;
  for (const Instance& inst : insts) {
    if (LessLoaded(inst, insts[best])) best = inst.id;
  }
  return best;
}

absl::Status CacheAwarePolicy::Init(Simulator& sim) {
  trees_.assign(static_cast<size_t>(sim.options().num_instances), Tree{});
  next_eviction_s_ = options_.eviction_interval_s;
  return absl::OkStatus();
}

void CacheAwarePolicy::Trim(Tree& tree) {
  if (tree.tokens <= options_.max_tree_size) return;
  std::vector<std::pair<double, uint64_t>> order;
  order.reserve(tree.nodes.size());
  for (const auto& [id, v] : tree.nodes) order.emplace_back(v.first, id);
  std::sort(order.begin(), order.end());
  for (const auto& [t, id] : order) {
    if (tree.tokens <= options_.max_tree_size) break;
    auto it = tree.nodes.find(id);
    tree.tokens -= it->second.second;
    tree.nodes.erase(it);
  }
}

void CacheAwarePolicy::OnSample(Simulator& sim) {
  if (sim.now() < next_eviction_s_) return;
  next_eviction_s_ = sim.now() + options_.eviction_interval_s;
  for (Tree& tree : trees_) Trim(tree);
}

int CacheAwarePolicy::Route(Simulator& sim, int64_t request) {
  const Request& r = sim.workload().requests[request];
  auto& insts = sim.instances();
  int64_t max_load = std::numeric_limits<int64_t>::min();
  int least = 0;
  for (const Instance& inst : insts) {
    max_load = std::max(max_load, inst.in_flight);
    if (LessLoaded(inst, insts[least])) least = inst.id;
  }
  const int64_t min_load = insts[least].in_flight;
  int chosen;
  const bool imbalanced = max_load - min_load > options_.balance_abs_threshold &&
                          static_cast<double>(max_load) >
                              static_cast<double>(min_load) * options_.balance_rel_threshold;
  if (imbalanced) {
    chosen = least;
  } else {
    // Longest match; equal matches go to the less loaded worker.
    std::vector<int> best;
    int64_t best_match = -1;
    for (size_t w = 0; w < trees_.size(); ++w) {
      int64_t m = 0;
      while (m < static_cast<int64_t>(r.block_ids.size()) &&
             trees_[w].nodes.contains(r.block_ids[m])) {
        ++m;
      }
      const int64_t tokens = TokensOf(r, m);
      if (tokens > best_match) {
        best_match = tokens;
        best.clear();
      }
      if (tokens == best_match) best.push_back(static_cast<int>(w));
    }
    const double ratio = static_cast<double>(best_match) / static_cast<double>(r.input_tokens);
    if (ratio > options_.cache_threshold) {
      chosen = LeastLoaded(insts, best);
    } else {
      // The smallest tree; equal sizes go to the less loaded worker.
      std::vector<int> smallest = {0};
      for (size_t w = 1; w < trees_.size(); ++w) {
        const int64_t t = trees_[w].tokens, s = trees_[smallest[0]].tokens;
        if (t < s) smallest.clear();
        if (t <= s) smallest.push_back(static_cast<int>(w));
      }
      chosen = LeastLoaded(insts, smallest);
    }
  }
  Tree& tree = trees_[chosen];
  for (size_t i = 0; i < r.block_ids.size(); ++i) {
    auto [it, inserted] = tree.nodes.try_emplace(r.block_ids[i], sim.now(), r.BlockTokens(i));
    if (inserted) {
      tree.tokens += r.BlockTokens(i);
    } else {
      it->second.first = sim.now();
    }
  }
  return chosen;
}

std::string PdDisaggPolicy::name() const {
  std::string name = "pd-disagg";
  if (options_.dram_bytes > 0) name += "+dram";
  if (options_.slo_rejection) name += "+reject";
  if (options_.split_in_name) name += absl::StrFormat(" %dP:%dD", num_prefill_, num_decode_);
  return name;
}

absl::Status PdDisaggPolicy::Init(Simulator& sim) {
  const int n = sim.options().num_instances;
  if (n < 2) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "pd-disagg needs at least 2 instances (one prefill, one decode), got %d", n));
  }
  if (options_.num_prefill < 0 || options_.num_prefill >= n) {
    return absl::InvalidArgumentError(
        absl::StrFormat("pd-disagg: num_prefill %d leaves a phase with no instance: valid "
                        "values are 1 to %d for %d instances (0 = the default split)",
                        options_.num_prefill, n - 1, n));
  }
  num_prefill_ = options_.num_prefill > 0
                     ? options_.num_prefill
                     : std::clamp(static_cast<int>(std::lround(n * 0.75)), 1, n - 1);
  num_decode_ = n - num_prefill_;
  plans_.assign(sim.workload().requests.size(), Plan{});
  if (options_.dram_bytes > 0) {
    const int64_t block_bytes = sim.cost().model().KvBytesPerToken() * kBlockTokens;
    dram_ = std::make_unique<BlockCache>(options_.dram_bytes / block_bytes * num_prefill_);
  }
  return absl::OkStatus();
}

void PdDisaggPolicy::OnArrival(Simulator& sim, int64_t request) {
  const Request& r = sim.workload().requests[request];
  const sched::CostModel& cost = sim.cost();
  const SimOptions& o = sim.options();
  auto& insts = sim.instances();
  const int64_t kv_block_bytes = cost.model().KvBytesPerToken() * kBlockTokens;
  std::vector<int64_t> own(static_cast<size_t>(num_prefill_));
  int64_t best_blocks = 0;
  int holder = -1;
  for (int i = 0; i < num_prefill_; ++i) {
    own[i] = insts[i].cache->Match(r.block_ids);
    if (own[i] > best_blocks) {
      best_blocks = own[i];
      holder = i;
    }
  }
  const int64_t dram_blocks = dram_ ? dram_->Match(r.block_ids) : 0;
  // Per prefill instance: its best option (own match; fetch from the best GPU holder; load
  // from the DRAM store) by estimated TTFT.
  struct Choice {
    double ttft = std::numeric_limits<double>::infinity();
    int64_t fetch = 0;
    int source = -1;
  };
  std::vector<Choice> choice(static_cast<size_t>(num_prefill_));
  double best_ttft = std::numeric_limits<double>::infinity();
  for (int i = 0; i < num_prefill_; ++i) {
    struct Option {
      int source;
      int64_t blocks;
      double transfer_s;
    };
    Option options[3] = {{-1, own[i], 0.0}};
    int num_options = 1;
    if (static_cast<double>(best_blocks) > static_cast<double>(own[i]) * options_.balance_ratio) {
      options[num_options++] = {
          holder, best_blocks,
          cost.TransferSeconds((best_blocks - own[i]) * kv_block_bytes, cost.SameNode(i, holder))};
    }
    if (static_cast<double>(dram_blocks) > static_cast<double>(own[i]) * options_.balance_ratio) {
      options[num_options++] = {kDram, dram_blocks,
                                cost.net().latency_us * 1e-6 +
                                    static_cast<double>((dram_blocks - own[i]) * kv_block_bytes) /
                                        (options_.dram_gbps * 1e9)};
    }
    for (int k = 0; k < num_options; ++k) {
      const Option& opt = options[k];
      const int64_t cached = std::min(TokensOf(r, opt.blocks), r.input_tokens - 1);
      const double ttft = opt.transfer_s + insts[i].pending_prefill_s +
                          cost.PrefillSeconds(r.input_tokens - cached, cached, o.token_budget);
      if (ttft < choice[i].ttft) choice[i] = {ttft, opt.blocks - own[i], opt.source};
    }
    best_ttft = std::min(best_ttft, choice[i].ttft);
  }
  std::vector<int> tied;
  for (int i = 0; i < num_prefill_; ++i) {
    if (choice[i].ttft == best_ttft) tied.push_back(i);
  }
  const int chosen = LeastLoaded(insts, tied);
  const int64_t chosen_fetch = choice[chosen].fetch;
  const int chosen_source = choice[chosen].source;
  // Decode instance: least estimated TBT with this request added; ties by load.
  double best_tbt = std::numeric_limits<double>::infinity();
  std::vector<double> tbt(static_cast<size_t>(o.num_instances));
  const double rate = cost.DecodeSecondsPerContextToken();
  for (int d = num_prefill_; d < o.num_instances; ++d) {
    int64_t batch = 1;
    int64_t context = r.input_tokens + r.output_tokens / 2;
    for (const Job* j : insts[d].running) {
      ++batch;
      context += j->Context();
    }
    for (const Job* j : insts[d].waiting) {
      ++batch;
      context += j->Context();
    }
    tbt[d] = cost.DenseSeconds(batch) + rate * static_cast<double>(context + batch);
    best_tbt = std::min(best_tbt, tbt[d]);
  }
  tied.clear();
  for (int d = num_prefill_; d < o.num_instances; ++d) {
    if (tbt[d] == best_tbt) tied.push_back(d);
  }
  const int decode = LeastLoaded(insts, tied);
  sim.record(request).instance = chosen;
  if (options_.slo_rejection && (best_ttft > o.slo_ttft_s || best_tbt > o.slo_tpot_s)) {
    sim.Reject(request);
    return;
  }
  Plan& plan = plans_[request];
  plan.decode = decode;
  plan.holder = chosen_fetch > 0 ? chosen_source : -1;
  plan.fetch_blocks = chosen_fetch;
  double ready = sim.now();
  if (chosen_fetch > 0 && chosen_source == kDram) {
    ready += cost.net().latency_us * 1e-6 +
             static_cast<double>(chosen_fetch * kv_block_bytes) / (options_.dram_gbps * 1e9);
  } else if (chosen_fetch > 0) {
    const bool same_node = cost.SameNode(chosen, holder);
    ready += cost.TransferSeconds(chosen_fetch * kv_block_bytes, same_node);
  }
  Job* job = sim.NewJob(request, chosen);
  job->prefill_only = true;
  const int64_t cached = std::min(TokensOf(r, own[chosen] + chosen_fetch), r.input_tokens - 1);
  job->est_prefill_s = cost.PrefillSeconds(r.input_tokens - cached, cached, o.token_budget);
  insts[chosen].pending_prefill_s += job->est_prefill_s;
  sim.Deliver(job, ready);
}

bool PdDisaggPolicy::Admit(Simulator& sim, Job& job) {
  if (job.decode_only) return LocalCachePolicy::Admit(sim, job);
  BlockCache& cache = *sim.instances()[job.instance].cache;
  const Request& r = *job.r;
  const Plan& plan = plans_[job.request];
  const int64_t total_blocks = BlocksFor(r.input_tokens + r.output_tokens);
  const int64_t matched = cache.Match(r.block_ids);
  int64_t fetched = 0;
  if (plan.holder >= 0 || plan.holder == kDram) {
    // What the source still has beyond our own match (it was read at routing time).
    const int64_t holder_has = plan.holder == kDram
                                   ? dram_->Match(r.block_ids)
                                   : sim.instances()[plan.holder].cache->Match(r.block_ids);
    fetched = std::max<int64_t>(0, std::min(holder_has, matched + plan.fetch_blocks) - matched);
  }
  cache.Acquire(r.block_ids, matched);
  if (!cache.AllocatePrivate(total_blocks - matched)) {
    cache.Release(absl::MakeConstSpan(r.block_ids).first(static_cast<size_t>(matched)));
    return false;
  }
  job.held_ids.assign(r.block_ids.begin(), r.block_ids.begin() + matched);
  job.private_blocks = total_blocks - matched;
  for (int64_t i = matched; i < matched + fetched; ++i) {
    if (!cache.Promote(r.block_ids[i])) break;
    job.held_ids.push_back(r.block_ids[i]);
    --job.private_blocks;
  }
  const int64_t have = static_cast<int64_t>(job.held_ids.size());
  sim.AddBytesMoved((have - matched) * sim.cost().model().KvBytesPerToken() * kBlockTokens,
                    plan.holder == kDram ? "kv_from_dram" : "kv_fetch");
  job.cached_tokens = std::min(TokensOf(r, have), r.input_tokens - 1);
  sim.record(job.request).cached_tokens = job.cached_tokens;
  return true;
}

void PdDisaggPolicy::OnPrefillDone(Simulator& sim, Job& job) {
  LocalCachePolicy::OnPrefillDone(sim, job);
  Instance& inst = sim.instances()[job.instance];
  inst.pending_prefill_s = std::max(0.0, inst.pending_prefill_s - job.est_prefill_s);
  const Request& r = *job.r;
  if (dram_) {
    // Incremental prefill: the prompt's blocks are stored in the DRAM pool (an LRU touch for
    // the ones already there).
    const int64_t have = dram_->Match(r.block_ids);
    dram_->Acquire(r.block_ids, have);
    dram_->Release(absl::MakeConstSpan(r.block_ids).first(static_cast<size_t>(have)));
    int64_t written = 0;
    for (size_t i = static_cast<size_t>(have); i < r.block_ids.size(); ++i) {
      if (dram_->Contains(r.block_ids[i])) continue;
      if (!dram_->AllocatePrivate(1)) break;
      dram_->Promote(r.block_ids[i]);
      dram_->Release(absl::MakeConstSpan(&r.block_ids[i], 1));
      ++written;
    }
    sim.AddBytesMoved(written * sim.cost().model().KvBytesPerToken() * kBlockTokens, "kv_to_dram");
  }
  if (r.output_tokens <= 1) return;
  const Plan& plan = plans_[job.request];
  Job* decode = sim.NewJob(job.request, plan.decode);
  decode->decode_only = true;
  decode->cached_tokens = r.input_tokens;
  decode->decoded = 1;
  const int64_t bytes = r.input_tokens * sim.cost().model().KvBytesPerToken();
  sim.AddBytesMoved(bytes, "kv_to_decode");
  const double transfer =
      sim.cost().TransferSeconds(bytes, sim.cost().SameNode(job.instance, plan.decode));
  // Streamed layer by layer during the prefill: only the excess delays the decode.
  const double hidden = sim.now() - job.prefill_start_s;
  sim.Deliver(decode, sim.now() + std::max(sim.cost().net().latency_us * 1e-6, transfer - hidden));
}

const std::vector<std::string>& BaselinePolicyNames() {
  static const auto* names = new std::vector<std::string>{
      "round-robin", "least-load", "cache-aware", "pd-disagg", "pd-disagg+dram"};
  return *names;
}

std::unique_ptr<Policy> MakeBaselinePolicy(const std::string& name,
                                           const BaselineOptions& options) {
  if (name == "round-robin") return std::make_unique<RoundRobinPolicy>();
  if (name == "least-load") return std::make_unique<LeastLoadPolicy>();
  if (name == "cache-aware") return std::make_unique<CacheAwarePolicy>(options.cache_aware);
  if (name == "pd-disagg") {
    PdDisaggOptions pd = options.pd;
    pd.dram_bytes = 0;
    return std::make_unique<PdDisaggPolicy>(pd);
  }
  if (name == "pd-disagg+dram") {
    PdDisaggOptions pd = options.pd;
    pd.dram_bytes = options.pd_dram_bytes;
    return std::make_unique<PdDisaggPolicy>(pd);
  }
  return nullptr;
}

}  // namespace tokenlake::sim
