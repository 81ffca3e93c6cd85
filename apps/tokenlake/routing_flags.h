// The routing flags that `tokenlake coordinator` takes and `tokenlake serve` passes on to its
// coordinator: which rule places a request (service/router.h) and the scheduler's cost model.
#ifndef TOKENLAKE_APPS_TOKENLAKE_ROUTING_FLAGS_H_
#define TOKENLAKE_APPS_TOKENLAKE_ROUTING_FLAGS_H_

#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "flag_checks.h"

namespace tokenlake::cli {

struct RoutingFlags {
  std::string routing = "plan";
  double slo_tpot = 0.2;
  double decode_budget = 0.5;
  std::string gpu = "h100";
};

inline void AddRoutingFlags(CLI::App* cmd, RoutingFlags* f) {
  cmd->add_option("--routing", f->routing,
                  "Which instance computes (and decodes) a request: scheduler (the elastic "
                  "scheduler's decode placement under the decode budget, service/router.h) or "
                  "plan (the lake's plan unless that instance is too busy)")
      ->capture_default_str()
      ->check(CLI::IsMember({"scheduler", "plan"}));
  cmd->add_option("--slo-tpot", f->slo_tpot,
                  "TPOT SLO in seconds; the scheduler's decode budget is --decode-budget x this")
      ->capture_default_str()
      ->check(Positive());
  cmd->add_option("--decode-budget", f->decode_budget,
                  "Share of --slo-tpot an instance's estimated decode iteration may take (as "
                  "`tokenlake sim --tl-decode-budget`)")
      ->capture_default_str()
      ->check(NumberIn(0, 1, /*open_lo=*/true));
  cmd->add_option("--gpu", f->gpu,
                  "The instances' GPU profile for the scheduler's cost model: h100, h100-paper, "
                  "a100-80gb or a profile JSON file (`tokenlake profile`; as `tokenlake sim "
                  "--gpu`); the model's shape is the checkpoint's")
      ->capture_default_str();
}

// The flags as `tokenlake coordinator` arguments (numbers with every digit a double holds, so
// the coordinator reads back the very values given).
inline std::vector<std::string> RoutingFlagArgs(const RoutingFlags& f) {
  return {"--routing",       f.routing,
          "--slo-tpot",      absl::StrFormat("%.17g", f.slo_tpot),
          "--decode-budget", absl::StrFormat("%.17g", f.decode_budget),
          "--gpu",           f.gpu};
}

}  // namespace tokenlake::cli

#endif  // TOKENLAKE_APPS_TOKENLAKE_ROUTING_FLAGS_H_
