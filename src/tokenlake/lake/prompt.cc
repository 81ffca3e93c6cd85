#include "tokenlake/lake/prompt.h"

#include "absl/strings/str_format.h"

namespace tokenlake::lake {

absl::Status ValidatePrompt(absl::Span<const int32_t> prompt, int64_t max_new_tokens,
                            absl::Span<const int32_t> force_tokens, const PromptLimits& limits) {
  if (prompt.empty()) return absl::InvalidArgumentError("empty prompt");
  if (max_new_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("max_new_tokens must be >= 1, got %d", max_new_tokens));
  }
  for (size_t i = 0; i < prompt.size(); ++i) {
    if (prompt[i] < 0 || prompt[i] >= limits.vocab_size) {
      return absl::InvalidArgumentError(
          absl::StrFormat("prompt token %d at index %d is outside the vocabulary [0, %d)",
                          prompt[i], i, limits.vocab_size));
    }
  }
  if (!force_tokens.empty()) {
    if (static_cast<int64_t>(force_tokens.size()) < max_new_tokens - 1) {
      return absl::InvalidArgumentError(
          absl::StrFormat("force_tokens has %d tokens, needs max_new_tokens - 1 = %d",
                          force_tokens.size(), max_new_tokens - 1));
    }
    for (size_t i = 0; i < force_tokens.size(); ++i) {
      if (force_tokens[i] < 0 || force_tokens[i] >= limits.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrFormat("force_tokens[%d] = %d is outside the vocabulary [0, %d)", i,
                            force_tokens[i], limits.vocab_size));
      }
    }
  }
  const int64_t total = static_cast<int64_t>(prompt.size()) + max_new_tokens;
  if (limits.context_tokens > 0 && total > limits.context_tokens) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "prompt of %d tokens plus %d new tokens does not fit the model's context of %d tokens",
        prompt.size(), max_new_tokens, limits.context_tokens));
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::lake
