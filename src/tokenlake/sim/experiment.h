// Runs policies over one workload on one cost model: at one rate, or searching each policy's
// highest rate that meets the SLOs (--max-rate). This is what `tokenlake sim` drives.
//
// PD disaggregation has a free deployment choice, its prefill:decode split, so each PD policy
// (pd-disagg, pd-disagg+dram) runs at every split P:D with P + D = N (or the ones asked for),
// one row each, and the best split of each is marked (Summary::best_pd_split): with --max-rate
// the highest max rate, at a fixed rate the highest SLO attainment (share of requests meeting
// both SLOs); ties go to the lower P90 TTFT, then to the earlier row.
//
// Thread-safety: RunExperiment is not reentrant on the same options; it runs independent
// simulations on up to `threads` threads of its own.
#ifndef TOKENLAKE_SIM_EXPERIMENT_H_
#define TOKENLAKE_SIM_EXPERIMENT_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tokenlake/sched/cost_model.h"
#include "tokenlake/sim/baselines.h"
#include "tokenlake/sim/metrics.h"
#include "tokenlake/sim/simulator.h"
#include "tokenlake/sim/tokenlake_policy.h"
#include "tokenlake/sim/workload.h"

namespace tokenlake::sim {

// The policies `tokenlake sim` runs by default, in order.
const std::vector<std::string>& AllPolicyNames();

// Every policy name MakePolicy accepts (the defaults plus least-load, pd-disagg+dram and
// tokenlake-static).
const std::vector<std::string>& KnownPolicyNames();

// Creates a policy by name (KnownPolicyNames()). InvalidArgument for an unknown name, listing
// the valid ones.
absl::StatusOr<std::unique_ptr<Policy>> MakePolicy(const std::string& name,
                                                   const TokenLakePolicyOptions& tokenlake = {},
                                                   const BaselineOptions& baselines = {});

// True for the policies with a static prefill:decode split, which run once per split: the PD
// policies and tokenlake-static (TokenLake's pool with a fixed split, the paper's ablation).
bool IsSplitPolicy(const std::string& name);

// Parses "all" or "P:D[,P:D...]" for a cluster of `num_instances` into prefill counts, in the
// order given ("all": 1..N-1). Errors: InvalidArgument naming the bad entry and the valid range
// (P >= 1, D >= 1, P + D = N), or a split given twice.
absl::StatusOr<std::vector<int>> ParsePdSplits(const std::string& text, int num_instances);

// The max-rate search's stop rule on its way down (the SLO missed at a rate and at half of it):
// true when halving the rate from `rate` to `half_rate` no longer helps, so requests miss the
// SLO on their own at any rate and the search reports 0. That is: P90 TTFT and P90 TPOT within
// 1% of each other and, with `per_token` (the per-token SLO, met per request, so its attainment
// can rise while the P90s stay), the share of requests meeting it up by less than 1 point.
bool HalvingNoLongerHelps(const Summary& rate, const Summary& half_rate, bool per_token);

struct ExperimentOptions {
  // Engine and policy parameters shared by every policy.
  SimOptions sim;
  // The tokenlake policy's scheduler knobs.
  TokenLakePolicyOptions tokenlake;
  // The baselines' knobs (cache-aware's router thresholds, PD's options; the split is set per
  // run from pd_splits).
  BaselineOptions baselines;
  // PD splits to run, as prefill instance counts in [1, N - 1]; empty: every split.
  std::vector<int> pd_splits;
  // Simulations run at once (each on its own thread); 0: the hardware's thread count.
  int threads = 0;
  // Policies to run, by name.
  std::vector<std::string> policies = AllPolicyNames();
  // Offered request rate (arrivals scaled); 0 = the workload's own arrival times.
  double rate_rps = 0;
  // Search each policy's max rate meeting the SLOs: from the offered rate, double while the
  // SLOs are met (or halve until they are; when halving no longer moves P90 TTFT and TPOT by
  // 1%, requests miss them on their own and the max rate is 0), then bisect.
  bool max_rate = false;
  // The SLO that max_rate searches against (metrics.h): kP90Absolute uses sim.slo_ttft_s and
  // sim.slo_tpot_s; kPerToken the paper's per-token SLO at slo_factor x batch-1 (chunks of
  // sim.token_budget), met by a share >= goodput_quantile of requests (P90 goodput).
  SloMode slo_mode = SloMode::kP90Absolute;
  double slo_factor = 10;
  double goodput_quantile = 0.9;
  // Bisection steps after bracketing (each halves the interval).
  int bisection_steps = 6;
  // Called after each simulation with a one-line description; may be null.
  std::function<void(const std::string&)> log;
};

struct PolicyRun {
  Summary summary;
  SimResult result;  // at the offered rate (rate_rps or native)
};

// One PolicyRun per non-PD policy and one per PD policy and split, in the order of
// options.policies (splits in the order of pd_splits).
// Errors: InvalidArgument for an unknown policy or bad options (an empty workload, pd-disagg
// with one instance, a split out of range, a non-positive rate, no KV memory per instance).
absl::StatusOr<std::vector<PolicyRun>> RunExperiment(const Workload& workload,
                                                     const sched::CostModel& cost,
                                                     const ExperimentOptions& options);

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_EXPERIMENT_H_
