// Prompts: the one check of a generation request's tokens against the model (ValidatePrompt),
// which every receiver runs (the CPU and GPU engines, the iteration loop, the coordinator), and
// reading the prompt files of `tokenlake generate`: JSON lines, one object per line with an
// "input_ids" array of token ids (other fields are ignored; blank lines are skipped).
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_ENGINE_PROMPTS_H_
#define TOKENLAKE_ENGINE_PROMPTS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tokenlake::engine {

// What a generation request must fit: the model's vocabulary and context.
struct PromptLimits {
  // Token ids lie in [0, vocab_size).
  int32_t vocab_size = 0;
  // Prompt plus new tokens may not exceed it; 0: no limit.
  int64_t context_tokens = 0;
};

// OK, or InvalidArgument naming the first problem: an empty prompt; max_new_tokens < 1; a
// prompt token outside the vocabulary (its value and index); force_tokens (teacher-forced
// decode inputs; empty: none) fewer than max_new_tokens - 1 or holding a token outside the
// vocabulary; prompt plus new tokens beyond the context. Callers prefix the message with
// who they are (StatusWithPrefix).
absl::Status ValidatePrompt(absl::Span<const int32_t> prompt, int64_t max_new_tokens,
                            absl::Span<const int32_t> force_tokens, const PromptLimits& limits);

// `status` with its message prefixed by `prefix` (OK stays OK).
absl::Status StatusWithPrefix(const absl::Status& status, absl::string_view prefix);

struct Prompt {
  // 1-based line number in the file.
  int64_t line = 0;
  std::vector<int32_t> input_ids;
};

// Parses JSON-lines text. `source_name` prefixes messages as "NAME:LINE: ...".
// Errors: InvalidArgument naming the line and the problem (not JSON, not an object, no
//   "input_ids", not an array, empty, an element that is not an integer in [0, 2^31) naming its
//   index). An input with no prompt at all is an error too.
absl::StatusOr<std::vector<Prompt>> ParsePromptsJsonl(const std::string& text,
                                                      const std::string& source_name);

// Reads and parses `path`. Errors: NotFound (cannot open), then as ParsePromptsJsonl.
absl::StatusOr<std::vector<Prompt>> LoadPromptsJsonl(const std::string& path);

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_PROMPTS_H_
