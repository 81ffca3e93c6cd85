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
  // A later turn of a session (closed loop): sent `think_s` after request `previous_turn` (an
  // earlier index) finished or was rejected; arrival_s is then only its nominal time (used for
  // the workload's rate and ordering). -1: an independent request, sent at arrival_s.
  int64_t previous_turn = -1;
  double think_s = 0;

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
  // The paper's evaluation workloads (TOKENLAKE.md 7), generated from their published
  // statistics, each prompt led by one shared system prompt (system_prompt_tokens, modelling
  // OpenAI o3's). Dataset statistics exclude that prompt. docs/paper-preset.md has the choices.
  //
  // LooGLE: 776 documents, lognormal lengths (mean 24,005 tokens, sigma 0.4, clamped to
  // [4,096, 131,072]); 516 arXiv papers with one summary request each (24-token instruction,
  // 150-350-token answer) and 260 Wikipedia/script documents with 5,932 questions (22 or 23
  // each; question 16-64 tokens, answer 16-128). The questions arrive in a seeded random order
  // (a document is asked about in proportion to its questions), as serving benchmarks sample a
  // dataset, or with QuestionOrder::kByDocument each document's questions one after another
  // (the documents in a seeded random order), as a client walking the dataset document by
  // document sends them; Poisson arrivals at rate_rps. More requests than 6,448: further
  // passes, each in a new order.
  kLoogle,
  // SCBench: sessions over one long shared context each (lognormal, mean 222,280 tokens so that
  // requests average 227K with their history, sigma 0.3, clamped to [32K, 768K]); 1 + Poisson(4.2)
  // turns (mean 5.2); question 32-256 tokens; output lognormal (mean 1,684, sigma 0.8, clamped
  // to [16, 16,384]). Turn k's prompt = context + earlier questions and answers + question k.
  // Sessions start as a Poisson process at rate_rps / 5.2; later turns are closed-loop
  // (Request::previous_turn): sent when the previous answer is back, with no think time, as
  // the benchmark's harness does. Their nominal arrival (for the workload's rate and order) is
  // 2 s + 0.05 s per output token after the previous turn's (about the answer's time at the
  // batch-1 output-token latency of a 227K context on the paper preset). Sessions are added
  // until num_requests turns exist (the last one cut there), so 4,841 requests make about 931
  // sessions, each complete.
  kScbench,
  // ShareGPT first turns: input lognormal with median 40 and sigma 2.07 clamped to [1, 16,384]
  // (mean ~300), output lognormal (mean 358, sigma 1.0, clamped to [1, 4,096]); independent
  // requests, Poisson arrivals at rate_rps.
  kShareGpt,
};

// kLoogle: the order of the questions (see kLoogle).
enum class QuestionOrder { kShuffled, kByDocument };
// Parses "shuffled" / "by-document". InvalidArgument listing both otherwise.
absl::StatusOr<QuestionOrder> ParseQuestionOrder(std::string_view name);

struct GeneratorOptions {
  // Which shape to generate.
  WorkloadKind kind = WorkloadKind::kChat;
  // Number of requests.
  int64_t num_requests = 2000;
  // Mean arrival rate in requests per second (Poisson arrivals of sessions/requests).
  double rate_rps = 4.0;
  // Seed of every random choice.
  uint64_t seed = 1;
  // kLoogle, kScbench, kShareGpt: tokens of the system prompt that leads every prompt (> 0).
  // 6,000: the middle of the 4-9K tokens the paper gives for OpenAI o3's system prompt.
  int64_t system_prompt_tokens = 6000;
  // kLoogle: the order of the questions.
  QuestionOrder question_order = QuestionOrder::kShuffled;
};

// Generates a workload. Deterministic for the same options. InvalidArgument on bad options.
absl::StatusOr<Workload> GenerateWorkload(const GeneratorOptions& options);

// Parses "chat" / "agent" / "docqa" / "loogle" / "scbench" / "sharegpt". InvalidArgument
// (listing them) otherwise.
absl::StatusOr<WorkloadKind> ParseWorkloadKind(std::string_view name);
std::string_view WorkloadKindName(WorkloadKind kind);

// Returns a copy with arrival times divided by `scale` (> 0): rate multiplied by `scale`.
// Think times of later turns are not scaled (they are the user's, not the offered load's).
Workload ScaleArrivals(const Workload& workload, double scale);

// Mean arrival rate (requests / span of arrivals); 0 for fewer than 2 requests.
double MeanRateRps(const Workload& workload);

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_WORKLOAD_H_
