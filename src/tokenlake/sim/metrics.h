// Summary metrics of a simulation run and their JSON form.
//
// Definitions (TOKENLAKE.md 5.4):
// - throughput_rps: completed requests / (last completion - first arrival).
// - hit_rate: cached prompt tokens / prompt tokens, over requests that were admitted.
// - TTFT: first token - arrival; TPOT: (finish - first token) / (output - 1), for requests with
//   more than one output token. Rejected or unfinished requests count as an infinite TTFT and
//   TPOT in the percentiles (they did not meet any SLO).
// - bytes_moved: KV or query/partial bytes moved between instances.
// - redundancy: time-averaged stored block copies / distinct stored blocks.
// - load_imbalance: max / mean instance busy time.
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_SIM_METRICS_H_
#define TOKENLAKE_SIM_METRICS_H_

#include <cstdint>
#include <map>
#include <optional>
#include <string>
#include <vector>

#include "nlohmann/json.hpp"
#include "tokenlake/sim/simulator.h"

namespace tokenlake::sim {

struct Summary {
  std::string policy;
  double offered_rps = 0;
  double throughput_rps = 0;
  std::optional<double> max_rate_rps;  // set by --max-rate
  double hit_rate = 0;
  double ttft_p50_s = 0, ttft_p90_s = 0;
  double tpot_p50_s = 0, tpot_p90_s = 0;
  int64_t bytes_moved = 0;
  std::map<std::string, int64_t> bytes_by_kind;
  double redundancy = 1;
  double load_imbalance = 1;
  int64_t completed = 0;
  int64_t rejected = 0;
  int64_t kv_capacity_bytes_per_instance = 0;
  int64_t kv_capacity_bytes_total = 0;
  // Share of requests meeting both SLOs (SloAttainment); set by RunExperiment.
  double slo_attainment = 0;
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
