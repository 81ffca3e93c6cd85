// Workloads for the simulator: the Mooncake trace format and built-in seeded generators.
//
// A Request is what a serving cluster sees: an arrival time, a prompt of `input_tokens` tokens
// described by one chained block id per `kBlockTokens`-token block (equal ids mean an identical
// prefix up to and including that block, so its KV is reusable), and the number of tokens to
// generate. The last block may be partial.
//
// Thread-safety: plain values and pure functions.
#ifndef TOKENLAKE_SIM_WORKLOAD_H_
#define TOKENLAKE_SIM_WORKLOAD_H_

#include <cstdint>
#include <istream>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"

namespace tokenlake::sim {

// Tokens per block id, as in the Mooncake traces.
inline constexpr int64_t kBlockTokens = 512;

struct Request {
  // Arrival time in seconds from the start of the workload.
  double arrival_s = 0;
  // Prompt length in tokens (>= 1).
  int64_t input_tokens = 1;
  // Tokens to generate (>= 1).
  int64_t output_tokens = 1;
  // Chained block ids, ceil(input_tokens / kBlockTokens) of them (the last block may be partial).
  std::vector<uint64_t> block_ids;

  // Tokens covered by block `i` (kBlockTokens, or fewer for the last block).
  int64_t BlockTokens(size_t i) const;
};

// A workload: requests sorted by arrival time, and its name (for the output).
struct Workload {
  std::string name;
  std::vector<Request> requests;
};

// Parses Mooncake JSON lines from `in`. `source_name` is used in error messages.
// Each non-empty line must be a JSON object with `timestamp` (ms, number >= 0), `input_length`
// (integer >= 1), `output_length` (integer >= 1) and `hash_ids` (array of non-negative integers,
// exactly ceil(input_length / 512) of them). Requests are returned sorted by timestamp (stable).
// Errors: InvalidArgument naming `source_name:line` and the field; nothing is skipped.
absl::StatusOr<Workload> ParseMooncakeTrace(std::istream& in, std::string_view source_name);

// Reads a trace file, gzip-compressed when its name ends in ".gz". NotFound when it cannot be
// opened; DataLoss for a corrupt gzip stream; otherwise as ParseMooncakeTrace.
absl::StatusOr<Workload> ReadMooncakeTrace(const std::string& path);

// Built-in generator shapes.
enum class WorkloadKind {
  kChat,   // multi-turn chat sessions sharing a few system prompts
  kAgent,  // agents whose tool histories grow long, turn after turn (up to 128k tokens)
  kDocQa,  // questions over long documents, popularity Zipf-distributed
};

struct GeneratorOptions {
  // Which shape to generate.
  WorkloadKind kind = WorkloadKind::kChat;
  // Number of requests.
  int64_t num_requests = 2000;
  // Mean arrival rate in requests per second (Poisson arrivals of sessions/requests).
  double rate_rps = 4.0;
  // Seed of every random choice.
  uint64_t seed = 1;
};

// Generates a workload. Deterministic for the same options. InvalidArgument on bad options.
absl::StatusOr<Workload> GenerateWorkload(const GeneratorOptions& options);

// Parses "chat" / "agent" / "docqa". InvalidArgument otherwise.
absl::StatusOr<WorkloadKind> ParseWorkloadKind(std::string_view name);
std::string_view WorkloadKindName(WorkloadKind kind);

// Returns a copy with arrival times divided by `scale` (> 0): rate multiplied by `scale`.
Workload ScaleArrivals(const Workload& workload, double scale);

// Mean arrival rate (requests / span of arrivals); 0 for fewer than 2 requests.
double MeanRateRps(const Workload& workload);

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_WORKLOAD_H_
