// Reading the prompt files of `tokenlake generate`: JSON lines, one object per line with an
// "input_ids" array of token ids (other fields are ignored; blank lines are skipped). (Checking
// a prompt against the model: lake/prompt.h.)
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_ENGINE_PROMPTS_H_
#define TOKENLAKE_ENGINE_PROMPTS_H_

#include <cstdint>
#include <string>
#include <vector>

#include "absl/status/statusor.h"

namespace tokenlake::engine {

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
