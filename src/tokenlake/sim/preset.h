// Named setups of `tokenlake sim` (--preset NAME): the values its flags take unless given
// explicitly on the command line.
//
// "paper": the evaluation setup of the TokenLake paper (TOKENLAKE.md 7; docs/paper-preset.md):
// one server of 8 A100-80GB as 4 instances of tensor parallel 2 (the "a100-80gb" profile, built
// from published specifications), LWM-7B ("lwm-7b"), NVLink 300 GB/s per direction per GPU
// (the A100 datasheet's 600 GB/s in total), chunked prefill with one chunk of 8,192 tokens for
// every policy, the paper's per-token SLO at 10x batch 1 with P90 goodput, the LooGLE workload,
// and the policies cache-aware, pd-disagg and tokenlake.
//
// Thread-safety: plain values and pure functions.
#ifndef TOKENLAKE_SIM_PRESET_H_
#define TOKENLAKE_SIM_PRESET_H_

#include <cstdint>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "tokenlake/sim/metrics.h"

namespace tokenlake::sim {

struct SimPreset {
  std::string name;
  // Serving instances (each a tensor-parallel group of `tensor_parallel` GPUs).
  int instances = 16;
  int tensor_parallel = 1;
  // Built-in model and GPU profile names (LoadModelSpec, LoadGpuProfile).
  std::string model = "llama-3-8b";
  std::string gpu = "h100";
  // NVLink bandwidth per GPU and direction, GB/s; GPUs per node.
  double intra_node_gbps = 300;
  int64_t gpus_per_node = 8;
  // Chunked-prefill chunk (tokens per iteration), the same for every policy.
  int64_t token_budget = 8192;
  // The SLO --max-rate searches against, its factor over batch 1 and the goodput quantile.
  SloMode slo_mode = SloMode::kP90Absolute;
  double slo_factor = 10;
  double goodput_quantile = 0.9;
  // Built-in workload (when no --trace is given) and policies.
  std::string workload = "chat";
  std::vector<std::string> policies;
};

// The preset names, in the order help texts list them.
const std::vector<std::string>& PresetNames();

// The preset called `name`. InvalidArgument (listing the valid names) for an unknown one.
absl::StatusOr<SimPreset> FindPreset(std::string_view name);

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_PRESET_H_
