// The `tokenlake` policy: the simulator driving the real TokenLake pool (lake::Lake).
#ifndef TOKENLAKE_SIM_TOKENLAKE_POLICY_H_
#define TOKENLAKE_SIM_TOKENLAKE_POLICY_H_

#include <memory>

#include "absl/status/statusor.h"
#include "tokenlake/sim/simulator.h"

namespace tokenlake::sim {

absl::StatusOr<std::unique_ptr<Policy>> MakeTokenLakePolicy();

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_TOKENLAKE_POLICY_H_
