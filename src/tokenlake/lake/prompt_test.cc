#include "tokenlake/lake/prompt.h"

#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::lake {
namespace {

// The one check every receiver of a generation request runs (engines, loop, coordinator).
TEST(ValidatePromptTest, NamesTheFirstProblem) {
  const PromptLimits limits{.vocab_size = 100, .context_tokens = 8};
  EXPECT_TRUE(ValidatePrompt({1, 2, 99}, 5, {}, limits).ok());
  EXPECT_TRUE(ValidatePrompt({1}, 3, {7, 8}, limits).ok());
  EXPECT_TRUE(ValidatePrompt({1, 2}, 1000, {}, {.vocab_size = 100}).ok());  // no context limit
  struct Case {
    std::vector<int32_t> prompt;
    int64_t max_new;
    std::vector<int32_t> force;
    const char* message;
  };
  for (const Case& c : std::vector<Case>{
           {{}, 2, {}, "empty prompt"},
           {{1}, 0, {}, "max_new_tokens must be >= 1, got 0"},
           {{1, 100}, 2, {}, "prompt token 100 at index 1 is outside the vocabulary [0, 100)"},
           {{-3}, 2, {}, "prompt token -3 at index 0 is outside the vocabulary [0, 100)"},
           {{1}, 4, {5, 6}, "force_tokens has 2 tokens, needs max_new_tokens - 1 = 3"},
           {{1}, 2, {100}, "force_tokens[0] = 100 is outside the vocabulary [0, 100)"},
           {{1, 2, 3},
            6,
            {},
            "prompt of 3 tokens plus 6 new tokens does not fit the model's "
            "context of 8 tokens"},
       }) {
    const absl::Status s = ValidatePrompt(c.prompt, c.max_new, c.force, limits);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.message;
    EXPECT_EQ(s.message(), c.message);
  }
  EXPECT_EQ(StatusWithPrefix(ValidatePrompt({}, 1, {}, limits), "Generate: ").message(),
            "Generate: empty prompt");
  EXPECT_TRUE(StatusWithPrefix(absl::OkStatus(), "Generate: ").ok());
}

}  // namespace
}  // namespace tokenlake::lake
