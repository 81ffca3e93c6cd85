#include "tokenlake/sim/experiment.h"

#include <algorithm>
#include <cmath>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/sim/baselines.h"
#include "tokenlake/sim/tokenlake_policy.h"

namespace tokenlake::sim {

const std::vector<std::string>& AllPolicyNames() {
  static const auto* names =
      new std::vector<std::string>{"round-robin", "cache-aware", "pd-disagg", "tokenlake"};
  return *names;
}

absl::StatusOr<std::unique_ptr<Policy>> MakePolicy(const std::string& name,
                                                   const TokenLakePolicyOptions& tokenlake) {
  if (name == "tokenlake") return MakeTokenLakePolicy(tokenlake);
  if (auto p = MakeBaselinePolicy(name)) return p;
  return absl::InvalidArgumentError(absl::StrFormat(
      "unknown policy '%s' (expected round-robin, least-load, cache-aware, pd-disagg or "
      "tokenlake)",
      name));
}

namespace {

absl::StatusOr<SimResult> RunOnce(const Workload& workload, const CostModel& cost,
                                  const SimOptions& sim_options, const std::string& policy_name,
                                  const TokenLakePolicyOptions& tokenlake) {
  auto policy = MakePolicy(policy_name, tokenlake);
  if (!policy.ok()) return policy.status();
  Simulator sim(sim_options, workload, cost, **policy);
  return sim.Run();
}

}  // namespace

absl::StatusOr<std::vector<PolicyRun>> RunExperiment(const Workload& workload,
                                                     const CostModel& cost,
                                                     const ExperimentOptions& o) {
  if (workload.requests.empty()) return absl::InvalidArgumentError("the workload is empty");
  if (o.rate_rps < 0 || !std::isfinite(o.rate_rps)) {
    return absl::InvalidArgumentError("rate must be > 0");
  }
  if (!(o.slo_factor > 0) || !std::isfinite(o.slo_factor) || !(o.goodput_quantile > 0) ||
      o.goodput_quantile > 1) {
    return absl::InvalidArgumentError("slo_factor must be > 0 and goodput_quantile in (0, 1]");
  }
  const bool per_token = o.slo_mode == SloMode::kPerToken;
  auto meets = [&](const Summary& s) {
    return per_token ? s.slo_attainment.value_or(0) >= o.goodput_quantile
                     : MeetsSlo(s, o.sim.slo_ttft_s, o.sim.slo_tpot_s);
  };
  for (const std::string& name : o.policies) {
    auto p = MakePolicy(name, o.tokenlake);
    if (!p.ok()) return p.status();
    if (name == "pd-disagg" && o.sim.num_instances < 2) {
      return absl::InvalidArgumentError("pd-disagg needs at least 2 instances");
    }
  }
  const double native_rps = MeanRateRps(workload);
  const double base_scale = o.rate_rps > 0 && native_rps > 0 ? o.rate_rps / native_rps : 1.0;
  std::vector<PolicyRun> runs;
  for (const std::string& name : o.policies) {
    SimOptions sim_options = o.sim;
    auto run_at = [&](double scale) -> absl::StatusOr<std::pair<Summary, SimResult>> {
      const Workload scaled = ScaleArrivals(workload, scale);
      auto result = RunOnce(scaled, cost, sim_options, name, o.tokenlake);
      if (!result.ok()) return result.status();
      Summary s = Summarize(*result, native_rps * scale);
      if (per_token) {
        s.slo_attainment =
            PerTokenSloAttainment(result->records, cost, sim_options.token_budget, o.slo_factor);
      }
      if (o.log) {
        o.log(absl::StrFormat(
            "%s at %.3f rps: ttft p90 %.3f s, tpot p90 %.4f s, hit %.3f%s", name,
            native_rps * scale, s.ttft_p90_s, s.tpot_p90_s, s.hit_rate,
            per_token ? absl::StrFormat(", per-token SLO met by %.3f", *s.slo_attainment) : ""));
      }
      return std::make_pair(s, *std::move(result));
    };
    auto base = run_at(base_scale);
    if (!base.ok()) return base.status();
    PolicyRun run{base->first, std::move(base->second)};
    if (o.max_rate) {
      sim_options.progress = nullptr;
      const bool ok_at_base = meets(base->first);
      double lo = 0, hi = 0;
      if (ok_at_base) {
        lo = base_scale;
        hi = base_scale * 2;
        for (int i = 0; i < 12; ++i) {
          auto r = run_at(hi);
          if (!r.ok()) return r.status();
          if (!meets(r->first)) break;
          lo = hi;
          hi *= 2;
        }
      } else {
        hi = base_scale;
        lo = base_scale / 2;
        for (int i = 0; i < 12; ++i) {
          auto r = run_at(lo);
          if (!r.ok()) return r.status();
          if (meets(r->first)) break;
          hi = lo;
          lo /= 2;
          if (i == 11) lo = 0;
        }
      }
      for (int i = 0; i < o.bisection_steps && lo > 0; ++i) {
        const double mid = (lo + hi) / 2;
        auto r = run_at(mid);
        if (!r.ok()) return r.status();
        (meets(r->first) ? lo : hi) = mid;
      }
      run.summary.max_rate_rps = lo * native_rps;
      if (per_token) run.summary.goodput_rps = lo * native_rps;
    }
    runs.push_back(std::move(run));
  }
  return runs;
}

}  // namespace tokenlake::sim
