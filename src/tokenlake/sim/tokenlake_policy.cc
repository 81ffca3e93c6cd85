#include "tokenlake/sim/tokenlake_policy.h"

#include "absl/status/status.h"

namespace tokenlake::sim {

absl::StatusOr<std::unique_ptr<Policy>> MakeTokenLakePolicy() {
  return absl::UnimplementedError("the tokenlake policy waits for lake/lake.h");
}

}  // namespace tokenlake::sim
