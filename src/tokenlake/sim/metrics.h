// Summary metrics of a simulation run and their JSON form.
//
// Definitions (TOKENLAKE.md 5.4):
// - makespan_s: last completion - first arrival (the run's completion time; for requests that
//   all arrive at once, the time to serve them all).
// - throughput_rps: completed requests / makespan_s.
// - hit_rate: cached prompt tokens / prompt tokens, over requests that were admitted.
// - TTFT: first token - arrival; TPOT: (finish - first token) / (output - 1), for requests with
//   more than one output token. Rejected or unfinished requests count as an infinite TTFT and
//   TPOT in the percentiles (they did not meet any SLO).
// - bytes_moved: KV or query/partial bytes moved between instances.
// - redundancy: time-averaged stored block copies / distinct stored blocks.
// - load_imbalance: max / mean instance busy time.
// - cv_cache_access (the paper's load imbalance): in each sampling window, the coefficient of
//   variation (population standard deviation / mean) across instances of the cached context
//   tokens attended there (SimResult::cache_access); the mean over windows weighted by each
//   window's total access (windows without access are skipped; 0 when none). Weighting keeps
//   near-idle windows, whose few tokens land on one instance by chance, from dominating.
// - Per-token SLO (the paper's; SloMode::kPerToken): input-token latency = TTFT / input tokens;
//   output-token latency = the request's mean time between output tokens (its TPOT, as above).
//   Each must be at most `factor` (10) x its batch-1 value: the same request alone on an idle
//   instance of the cost model, its whole prompt computed (no cache hit) in chunks of the
//   simulation's token budget. Without the hit, the bar is a property of the request alone, the
//   same for every policy, and not made stricter for requests a policy happens to serve from
//   cache. A rejected or unfinished request misses it. P90 goodput = the highest rate at which
//   a share >= `quantile` (0.9) of requests meets both.
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_SIM_METRICS_H_
#define TOKENLAKE_SIM_METRICS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "nlohmann/json.hpp"
#include "tokenlake/sched/cost_model.h"
#include "tokenlake/sim/simulator.h"

namespace tokenlake::sim {

// Which SLO --max-rate searches against.
enum class SloMode {
  kP90Absolute,  // P90 TTFT <= slo_ttft_s and P90 TPOT <= slo_tpot_s ("p90")
  kPerToken,     // the paper's per-token SLO and P90 goodput ("per-token")
};
// "p90" / "per-token"; InvalidArgument listing both otherwise.
absl::StatusOr<SloMode> ParseSloMode(std::string_view name);
std::string_view SloModeName(SloMode mode);

// A request's batch-1 latencies (see the per-token SLO above), seconds.
struct Batch1Latency {
  double input_token_s = 0;   // PrefillSeconds(input, 0, chunk) / input
  double output_token_s = 0;  // mean decode iteration of the request alone; 0 for one output
};
// REQUIRES: input_tokens >= 1, output_tokens >= 1, chunk_tokens >= 1.
Batch1Latency Batch1Latencies(const sched::CostModel& cost, int64_t input_tokens,
                              int64_t output_tokens, int64_t chunk_tokens);

// Whether `rec` met both per-token SLOs at `factor` x its batch-1 latencies.
bool MeetsPerTokenSlo(const RequestRecord& rec, const Batch1Latency& batch1, double factor);

// Share of `records` (all of them; 0 when empty) that met both per-token SLOs.
double PerTokenSloAttainment(const std::vector<RequestRecord>& records,
                             const sched::CostModel& cost, int64_t chunk_tokens, double factor);

// cv_cache_access as defined above, from SimResult::cache_access.
double CacheAccessCv(const std::vector<std::vector<int64_t>>& cache_access);

struct Summary {
  std::string policy;
  double offered_rps = 0;
  double throughput_rps = 0;
  double makespan_s = 0;
  std::optional<double> max_rate_rps;  // set by --max-rate
  double hit_rate = 0;
  double ttft_p50_s = 0, ttft_p90_s = 0;
  double tpot_p50_s = 0, tpot_p90_s = 0;
  int64_t bytes_moved = 0;
  std::map<std::string, int64_t> bytes_by_kind;
  std::map<std::string, double> policy_counters;  // SimResult::policy_counters
  double redundancy = 1;
  double load_imbalance = 1;
  int64_t completed = 0;
  int64_t rejected = 0;
  int64_t kv_capacity_bytes_per_instance = 0;
  int64_t kv_capacity_bytes_total = 0;
  double cv_cache_access = 0;
  // Share of requests meeting the SLO at offered_rps (set by RunExperiment): both absolute
  // SLOs per request (SloAttainment), or in the per-token mode both per-token SLOs
  // (PerTokenSloAttainment).
  double slo_attainment = 0;
  // Per-token SLO mode with --max-rate: the P90 goodput.
  std::optional<double> goodput_rps;
  // --max-rate, when some rate met the SLO: the run at max_rate_rps's cv_cache_access and
  // hit_rate (the fields above are the offered rate's; past the max rate queues, not
  // placement, decide where the cache is read).
  std::optional<double> cv_cache_access_at_max_rate;
  std::optional<double> hit_rate_at_max_rate;
  // PD rows: the split ("7P:9D"), and whether it is its policy's best (RunExperiment).
  std::string pd_split;
  bool best_pd_split = false;
  // pd-disagg+dram rows: the host-DRAM store per prefill instance, in total, and its bandwidth.
  int64_t dram_bytes_per_prefill_instance = 0;
  int64_t dram_bytes_total = 0;
  double dram_gbps = 0;
};

// Nearest-rank percentile (p in [0, 100]) of `values`; +inf entries count. 0 when empty.
double Percentile(std::vector<double> values, double p);

Summary Summarize(const SimResult& result, double offered_rps);

// Share of all requests whose TTFT <= slo_ttft_s and whose TPOT <= slo_tpot_s (requests with
// one output token: TTFT only); rejected and unfinished requests do not meet them. 0 when empty.
double SloAttainment(const SimResult& result, double slo_ttft_s, double slo_tpot_s);

// True when P90 TTFT and P90 TPOT meet the SLOs.
bool MeetsSlo(const Summary& s, double slo_ttft_s, double slo_tpot_s);

// {"policy": ..., ...}; infinities are written as null.
nlohmann::json ToJson(const Summary& s);

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_METRICS_H_
