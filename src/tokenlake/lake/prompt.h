// The one check of a generation request's tokens against the model, which every receiver of a
// request runs: the CPU and GPU engines, their iteration loop and the cluster's coordinator. It
// sits in the lake, below all of them, so that the coordinator needs no model runner for it.
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_LAKE_PROMPT_H_
#define TOKENLAKE_LAKE_PROMPT_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace tokenlake::lake {

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
// who they are (StatusWithPrefix, base/status_macros.h).
absl::Status ValidatePrompt(absl::Span<const int32_t> prompt, int64_t max_new_tokens,
                            absl::Span<const int32_t> force_tokens, const PromptLimits& limits);

}  // namespace tokenlake::lake

#endif  // TOKENLAKE_LAKE_PROMPT_H_
