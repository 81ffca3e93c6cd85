// Runs policies over one workload on one cost model: at one rate, or searching each policy's
// highest rate that meets the SLOs (--max-rate). This is what `tokenlake sim` drives.
//
// Thread-safety: not thread-safe.
#ifndef TOKENLAKE_SIM_EXPERIMENT_H_
#define TOKENLAKE_SIM_EXPERIMENT_H_

#include <functional>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tokenlake/sim/cost_model.h"
#include "tokenlake/sim/metrics.h"
#include "tokenlake/sim/simulator.h"
#include "tokenlake/sim/tokenlake_policy.h"
#include "tokenlake/sim/workload.h"

namespace tokenlake::sim {

// The policy names `tokenlake sim --policies` accepts, in the default order.
const std::vector<std::string>& AllPolicyNames();

// Creates a policy by name (round-robin, least-load, cache-aware, pd-disagg, tokenlake).
// InvalidArgument for an unknown name.
absl::StatusOr<std::unique_ptr<Policy>> MakePolicy(const std::string& name,
                                                   const TokenLakePolicyOptions& tokenlake = {});

struct ExperimentOptions {
  // Engine and policy parameters shared by every policy.
  SimOptions sim;
  // The tokenlake policy's scheduler knobs.
  TokenLakePolicyOptions tokenlake;
  // Policies to run, by name.
  std::vector<std::string> policies = AllPolicyNames();
  // Offered request rate (arrivals scaled); 0 = the workload's own arrival times.
  double rate_rps = 0;
  // Search each policy's max rate meeting the SLOs (bisection over the arrival scale).
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

// Errors: InvalidArgument for an unknown policy or bad options (an empty workload, pd-disagg
// with one instance, a non-positive rate).
absl::StatusOr<std::vector<PolicyRun>> RunExperiment(const Workload& workload,
                                                     const CostModel& cost,
                                                     const ExperimentOptions& options);

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_EXPERIMENT_H_
