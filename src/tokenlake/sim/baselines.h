// The baseline policies, each as published (TOKENLAKE.md 5.2), on the shared Simulator:
//
// - RoundRobinPolicy / LeastLoadPolicy: route in turn / to the instance with the fewest
//   requests in flight; each instance caches prefixes itself (vLLM automatic prefix caching:
//   BlockCache with LRU eviction).
// - CacheAwarePolicy: SGLang router's `cache_aware` policy: an approximate prefix tree per
//   worker of what was sent there (kept at block granularity: a chained block id stands for
//   its whole prefix), load = requests in flight; imbalance (max - min > balance_abs and
//   max > min * balance_rel) -> least loaded; else longest match if match ratio >
//   cache_threshold, else the worker with the smallest tree. Trees are trimmed by LRU to
//   max_tree_size every eviction_interval. Workers cache with their own BlockCache.
// - PdDisaggPolicy: Mooncake's conductor (FAST'25 section 4, Algorithm 1) over separate
//   prefill and decode pools; see the class comment.
//
// Every choice between instances that ties on the policy's own rule goes to the less loaded
// one (LocalCachePolicy::LessLoaded), never to the lowest index alone. No policy rejects a
// request by an SLO estimate unless asked (PdDisaggOptions::slo_rejection); the simulator
// rejects, for every policy alike, only a request that cannot fit in an idle instance's memory.
//
// Thread-safety: not thread-safe (driven by one Simulator).
#ifndef TOKENLAKE_SIM_BASELINES_H_
#define TOKENLAKE_SIM_BASELINES_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "tokenlake/sim/simulator.h"

namespace tokenlake::sim {

// A policy whose instances each keep their own vLLM-style prefix cache.
class LocalCachePolicy : public Policy {
 public:
  absl::Status Init(Simulator& sim) override {
    (void)sim;
    return absl::OkStatus();
  }
  bool Admit(Simulator& sim, Job& job) override;
  void OnPrefillDone(Simulator& sim, Job& job) override;
  void OnJobDone(Simulator& sim, Job& job) override { sim.ReleaseLocal(job); }
  // Policy::PoolStats, kept up to date as the instances' caches change (IdCopyCounter) rather
  // than recounted at every sample.
  void PoolStats(Simulator& sim, int64_t* copies, int64_t* distinct) override;

  // The load order that breaks every tie between instances: fewer requests in flight, then
  // fewer tokens of work queued and running (prompt still to compute + output still to
  // generate), then less busy time so far; the index decides only between instances equal in
  // all three (in practice only before any work has run).
  static bool LessLoaded(const Instance& a, const Instance& b);
  // Of `ids` (non-empty), the least loaded by LessLoaded.
  static int LeastLoaded(const std::vector<Instance>& instances, const std::vector<int>& ids);

 protected:
  // Routes `request` to an instance (the subclass's rule).
  virtual int Route(Simulator& sim, int64_t request) = 0;
  void OnArrival(Simulator& sim, int64_t request) override;

 private:
  // Attached to the instances' caches at the first PoolStats call of the run.
  std::unique_ptr<IdCopyCounter> copy_counter_;
};

class RoundRobinPolicy final : public LocalCachePolicy {
 public:
  std::string name() const override { return "round-robin"; }

 protected:
  int Route(Simulator& sim, int64_t request) override;

 private:
  int next_ = 0;
};

class LeastLoadPolicy final : public LocalCachePolicy {
 public:
  std::string name() const override { return "least-load"; }

 protected:
  int Route(Simulator& sim, int64_t request) override;
};

struct CacheAwareOptions {
  // Route by prefix when matched / request tokens exceeds this.
  double cache_threshold = 0.3;
  // Imbalanced when max - min load exceeds this (requests in flight)...
  int64_t balance_abs_threshold = 64;
  // ... and max load exceeds min load times this.
  double balance_rel_threshold = 1.5;
  // How often trees are trimmed, seconds.
  double eviction_interval_s = 60;
  // Trim each tree to this many tokens (LRU first).
  int64_t max_tree_size = int64_t{1} << 26;
};

class CacheAwarePolicy final : public LocalCachePolicy {
 public:
  explicit CacheAwarePolicy(CacheAwareOptions options = {}) : options_(options) {}
  std::string name() const override { return "cache-aware"; }
  absl::Status Init(Simulator& sim) override;
  void OnSample(Simulator& sim) override;

 protected:
  int Route(Simulator& sim, int64_t request) override;

 private:
  struct Tree {
    absl::flat_hash_map<uint64_t, std::pair<double, int64_t>> nodes;  // id -> (last use, tokens)
    int64_t tokens = 0;
  };
  void Trim(Tree& tree);
  CacheAwareOptions options_;
  std::vector<Tree> trees_;
  double next_eviction_s_ = 0;
};

struct PdDisaggOptions {
  // Prefill instances (the first ones; the rest decode), in [1, N - 1]. 0: round(N x 0.75)
  // clamped to that range. Experiments run every split (ExperimentOptions::pd_splits).
  int num_prefill = 0;
  // Fetch from the best holder when best_len / own_len exceeds this ratio.
  double balance_ratio = 1.5;
  // Mooncake's host-DRAM KV store, bytes per prefill instance (0 = off: the policy caches in
  // GPU memory only, like every other policy). Prefilled prompt blocks are written to it; a
  // prefill instance may load a longer prefix from it at dram_gbps.
  int64_t dram_bytes = 0;
  // Bandwidth between the DRAM store and a GPU, GB/s.
  double dram_gbps = 25;
  // Mooncake's early rejection: refuse a request whose estimated TTFT or TBT exceeds the SLO
  // (SimOptions::slo_ttft_s / slo_tpot_s). Off by default, as for every other policy.
  bool slo_rejection = false;
  // Append " <P>P:<D>D" to name() (set when an experiment runs several splits).
  bool split_in_name = false;
};

// Mooncake's cache-centric PD disaggregation. The first `num_prefill` instances prefill, the
// rest decode. For each request the conductor computes, for every prefill instance, its own
// prefix match and the best match over all prefill instances (best_len); when best_len > own x
// balance_ratio the instance would first fetch the difference from the holder (network
// bandwidth; the fetched blocks then stay there: hot-block replication). Estimated TTFT =
// transfer + queue (sum of estimated prefill times queued there) + prefill of the uncached part;
// the instance of least TTFT wins. The decode instance is the one with the least estimated TBT.
// Ties (equal estimates, e.g. every queue empty and nothing cached) go to the less loaded
// instance (see LocalCachePolicy::LessLoaded), never to the lowest index alone. With
// slo_rejection the request is rejected when the estimated TTFT or TBT exceeds its SLO. After
// prefill the prompt's KV moves to the decode instance (streamed layer by layer: only the part
// of the transfer longer than the prefill adds delay). With dram_bytes > 0, Mooncake's
// host-DRAM store: every prefilled prompt block is written there (LRU, dram_bytes per prefill
// instance in total), and a prefill instance may load a prefix longer than its own from it at
// dram_gbps (the same ratio rule and TTFT estimate as a fetch from another instance).
class PdDisaggPolicy final : public LocalCachePolicy {
 public:
  explicit PdDisaggPolicy(PdDisaggOptions options = {}) : options_(options) {}
  // "pd-disagg", "+dram" with the DRAM store, "+reject" with SLO rejection, then " 12P:4D"
  // with split_in_name (known after Init; before it the split reads "0P:0D").
  std::string name() const override;
  // InvalidArgument unless there are at least 2 instances and num_prefill is in [0, N - 1].
  absl::Status Init(Simulator& sim) override;
  bool Admit(Simulator& sim, Job& job) override;
  void OnPrefillDone(Simulator& sim, Job& job) override;
  int num_prefill() const { return num_prefill_; }

 protected:
  int Route(Simulator& sim, int64_t request) override {
    (void)sim, (void)request;
    return 0;
  }
  void OnArrival(Simulator& sim, int64_t request) override;

 private:
  struct Plan {
    int decode = -1;
    int holder = -1;           // fetch source: an instance, kDram, or -1
    int64_t fetch_blocks = 0;  // blocks [own, own + fetch) come from the holder
  };
  static constexpr int kDram = -2;
  PdDisaggOptions options_;
  int num_prefill_ = 0;
  int num_decode_ = 0;
  std::vector<Plan> plans_;
  std::unique_ptr<BlockCache> dram_;  // the host-DRAM store (all prefill nodes), or null
};

// The baseline policy names MakeBaselinePolicy accepts.
const std::vector<std::string>& BaselinePolicyNames();

// Options of the baselines that have any (the published defaults unless set).
struct BaselineOptions {
  CacheAwareOptions cache_aware;
  // For pd-disagg and pd-disagg+dram (which sets dram_bytes to pd_dram_bytes).
  PdDisaggOptions pd;
  // pd-disagg+dram: the DRAM store's bytes per prefill instance.
  int64_t pd_dram_bytes = 128'000'000'000;
};

// Creates a policy by name: round-robin, least-load, cache-aware, pd-disagg, pd-disagg+dram
// (Mooncake with its host-DRAM store). (tokenlake is created by MakeTokenLakePolicy in
// tokenlake_policy.h.) Null for an unknown name.
std::unique_ptr<Policy> MakeBaselinePolicy(const std::string& name,
                                           const BaselineOptions& options = {});

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_BASELINES_H_
