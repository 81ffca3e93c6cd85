// The comparison table (stdout) and the --report DIR output: SVG plots and an index.html.
//
// Thread-safety: pure functions (WriteReport writes files).
#ifndef TOKENLAKE_SIM_REPORT_H_
#define TOKENLAKE_SIM_REPORT_H_

#include <string>
#include <vector>

#include "absl/status/status.h"
#include "nlohmann/json.hpp"
#include "tokenlake/sim/experiment.h"

namespace tokenlake::sim {

// A fixed-width comparison table, one row per policy (and PD split, the best marked "*"), then
// the KV memory every policy may use and any host-DRAM store a PD row uses besides.
std::string FormatTable(const std::vector<PolicyRun>& runs);

// {"results": [...], "config": config}.
nlohmann::json ResultsJson(const std::vector<PolicyRun>& runs, const nlohmann::json& config);

// Writes into `dir` (created if missing): max_rate.svg (when max rates exist) or
// throughput.svg, ttft_cdf.svg, hit_rate.svg, bytes_moved.svg, load_<policy>.svg (the policy's
// name with characters other than letters, digits, '+', '-', '.' as '_'; of the PD rows only
// the best split's) and index.html. Errors: the failing path (Internal / PermissionDenied from the
// filesystem).
absl::Status WriteReport(const std::string& dir, const std::string& title,
                         const std::vector<PolicyRun>& runs, const nlohmann::json& config);

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_REPORT_H_
