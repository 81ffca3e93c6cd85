#include "tokenlake/sim/metrics.h"

#include <algorithm>
#include <cmath>
#include <limits>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::sim {

absl::StatusOr<SloMode> ParseSloMode(std::string_view name) {
  if (name == "p90") return SloMode::kP90Absolute;
  if (name == "per-token") return SloMode::kPerToken;
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown SLO mode '%s' (expected p90 or per-token)", name));
}

std::string_view SloModeName(SloMode mode) {
  return mode == SloMode::kPerToken ? "per-token" : "p90";
}

Batch1Latency Batch1Latencies(const sched::CostModel& cost, int64_t input_tokens,
                              int64_t output_tokens, int64_t chunk_tokens) {
  TOKENLAKE_CHECK(input_tokens >= 1 && output_tokens >= 1 && chunk_tokens >= 1);
  Batch1Latency b;
  b.input_token_s =
      cost.PrefillSeconds(input_tokens, 0, chunk_tokens) / static_cast<double>(input_tokens);
  if (output_tokens > 1) {
    // Decode iteration j (1..output-1) attends input + j context tokens and itself:
    // DecodeSecondsPerContextToken() x (input + j + 1); their mean is at j = output / 2.
    b.output_token_s = cost.DenseSeconds(1) + cost.DecodeSecondsPerContextToken() *
                                                  (static_cast<double>(input_tokens) + 1 +
                                                   static_cast<double>(output_tokens) / 2);
  }
  return b;
}

bool MeetsPerTokenSlo(const RequestRecord& rec, const Batch1Latency& batch1, double factor) {
  if (rec.rejected || rec.first_token_s < 0 || rec.finish_s < 0 || rec.input_tokens < 1) {
    return false;
  }
  const double itl = (rec.first_token_s - rec.arrival_s) / static_cast<double>(rec.input_tokens);
  if (itl > factor * batch1.input_token_s) return false;
  if (rec.output_tokens <= 1) return true;
  const double otl =
      (rec.finish_s - rec.first_token_s) / static_cast<double>(rec.output_tokens - 1);
  return otl <= factor * batch1.output_token_s;
}

double PerTokenSloAttainment(const std::vector<RequestRecord>& records,
                             const sched::CostModel& cost, int64_t chunk_tokens, double factor) {
  if (records.empty()) return 0;
  int64_t met = 0;
  for (const RequestRecord& rec : records) {
    if (rec.input_tokens < 1 || rec.output_tokens < 1) continue;
    const Batch1Latency b =
        Batch1Latencies(cost, rec.input_tokens, rec.output_tokens, chunk_tokens);
    met += MeetsPerTokenSlo(rec, b, factor) ? 1 : 0;
  }
  return static_cast<double>(met) / static_cast<double>(records.size());
}

double CacheAccessCv(const std::vector<std::vector<int64_t>>& cache_access) {
  double weighted = 0, weight = 0;
  for (const std::vector<int64_t>& window : cache_access) {
    if (window.empty()) continue;
    double sum = 0;
    for (int64_t a : window) sum += static_cast<double>(a);
    if (sum <= 0) continue;
    const double n = static_cast<double>(window.size());
    const double mean = sum / n;
    double var = 0;
    for (int64_t a : window)
      var += (static_cast<double>(a) - mean) * (static_cast<double>(a) - mean);
    weighted += sum * std::sqrt(var / n) / mean;
    weight += sum;
  }
  return weight > 0 ? weighted / weight : 0;
}

double Percentile(std::vector<double> values, double p) {
  if (values.empty()) return 0;
  std::sort(values.begin(), values.end());
  const double rank = std::ceil(p / 100.0 * static_cast<double>(values.size()));
  const size_t index =
      static_cast<size_t>(std::clamp(rank, 1.0, static_cast<double>(values.size()))) - 1;
  return values[index];
}

Summary Summarize(const SimResult& r, double offered_rps) {
  Summary s;
  s.policy = r.policy;
  s.offered_rps = offered_rps;
  const double inf = std::numeric_limits<double>::infinity();
  std::vector<double> ttft, tpot;
  ttft.reserve(r.records.size());
  tpot.reserve(r.records.size());
  int64_t prompt = 0, cached = 0;
  for (const RequestRecord& rec : r.records) {
    const bool finished = rec.finish_s >= 0 && !rec.rejected;
    if (rec.rejected) ++s.rejected;
    if (finished) ++s.completed;
    ttft.push_back(rec.first_token_s >= 0 && !rec.rejected ? rec.first_token_s - rec.arrival_s
                                                           : inf);
    if (rec.output_tokens > 1) {
      tpot.push_back(finished ? (rec.finish_s - rec.first_token_s) /
                                    static_cast<double>(rec.output_tokens - 1)
                              : inf);
    }
    if (!rec.rejected) {
      prompt += rec.input_tokens;
      cached += rec.cached_tokens;
    }
  }
  s.ttft_p50_s = Percentile(ttft, 50);
  s.ttft_p90_s = Percentile(ttft, 90);
  s.tpot_p50_s = Percentile(tpot, 50);
  s.tpot_p90_s = Percentile(tpot, 90);
  s.hit_rate = prompt > 0 ? static_cast<double>(cached) / static_cast<double>(prompt) : 0;
  s.makespan_s = r.makespan_s;
  s.throughput_rps = r.makespan_s > 0 ? static_cast<double>(s.completed) / r.makespan_s : 0;
  s.bytes_moved = r.bytes_moved;
  s.bytes_by_kind = r.bytes_by_kind;
  s.policy_counters = r.policy_counters;
  s.redundancy = r.mean_redundancy;
  double max_busy = 0, sum_busy = 0;
  for (double b : r.busy_s) {
    max_busy = std::max(max_busy, b);
    sum_busy += b;
  }
  s.load_imbalance =
      sum_busy > 0 ? max_busy / (sum_busy / static_cast<double>(r.busy_s.size())) : 1;
  s.kv_capacity_bytes_per_instance = r.kv_capacity_bytes_per_instance;
  s.kv_capacity_bytes_total =
      r.kv_capacity_bytes_per_instance * static_cast<int64_t>(r.busy_s.size());
  s.cv_cache_access = CacheAccessCv(r.cache_access);
  return s;
}

double SloAttainment(const SimResult& r, double slo_ttft_s, double slo_tpot_s) {
  if (r.records.empty()) return 0;
  int64_t met = 0;
  for (const RequestRecord& rec : r.records) {
    if (rec.rejected || rec.finish_s < 0 || rec.first_token_s < 0) continue;
    if (rec.first_token_s - rec.arrival_s > slo_ttft_s) continue;
    if (rec.output_tokens > 1 &&
        (rec.finish_s - rec.first_token_s) / static_cast<double>(rec.output_tokens - 1) >
            slo_tpot_s) {
      continue;
    }
    ++met;
  }
  return static_cast<double>(met) / static_cast<double>(r.records.size());
}

bool MeetsSlo(const Summary& s, double slo_ttft_s, double slo_tpot_s) {
  return s.ttft_p90_s <= slo_ttft_s && s.tpot_p90_s <= slo_tpot_s;
}

nlohmann::json ToJson(const Summary& s) {
  auto num = [](double v) -> nlohmann::json {
    if (!std::isfinite(v)) return nullptr;
    return v;
  };
  nlohmann::json j;
  j["policy"] = s.policy;
  j["offered_rps"] = num(s.offered_rps);
  j["throughput_rps"] = num(s.throughput_rps);
  j["makespan_s"] = num(s.makespan_s);
  if (s.max_rate_rps) j["max_rate_rps"] = num(*s.max_rate_rps);
  j["hit_rate"] = num(s.hit_rate);
  j["ttft_p50_s"] = num(s.ttft_p50_s);
  j["ttft_p90_s"] = num(s.ttft_p90_s);
  j["tpot_p50_s"] = num(s.tpot_p50_s);
  j["tpot_p90_s"] = num(s.tpot_p90_s);
  j["bytes_moved"] = s.bytes_moved;
  j["bytes_moved_by_kind"] = nlohmann::json::object();
  for (const auto& [kind, bytes] : s.bytes_by_kind) j["bytes_moved_by_kind"][kind] = bytes;
  if (!s.policy_counters.empty()) {
    j["policy_counters"] = nlohmann::json::object();
    for (const auto& [name, value] : s.policy_counters) j["policy_counters"][name] = num(value);
  }
  j["redundancy"] = num(s.redundancy);
  j["load_imbalance"] = num(s.load_imbalance);
  j["completed"] = s.completed;
  j["rejected"] = s.rejected;
  j["kv_capacity_bytes_per_instance"] = s.kv_capacity_bytes_per_instance;
  j["kv_capacity_bytes_total"] = s.kv_capacity_bytes_total;
  j["cv_cache_access"] = num(s.cv_cache_access);
  if (s.goodput_rps) j["goodput_rps"] = num(*s.goodput_rps);
  if (s.cv_cache_access_at_max_rate) {
    j["cv_cache_access_at_max_rate"] = num(*s.cv_cache_access_at_max_rate);
  }
  if (s.hit_rate_at_max_rate) j["hit_rate_at_max_rate"] = num(*s.hit_rate_at_max_rate);
  j["slo_attainment"] = num(s.slo_attainment);
  if (!s.pd_split.empty()) {
    j["pd_split"] = s.pd_split;
    j["best_pd_split"] = s.best_pd_split;
  }
  if (s.dram_bytes_total > 0) {
    j["dram_bytes_per_prefill_instance"] = s.dram_bytes_per_prefill_instance;
    j["dram_bytes_total"] = s.dram_bytes_total;
    j["dram_gbps"] = num(s.dram_gbps);
  }
  return j;
}

}  // namespace tokenlake::sim
