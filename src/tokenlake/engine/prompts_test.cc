#include "tokenlake/engine/prompts.h"

#include <cstdlib>
#include <string>

#include "gtest/gtest.h"

namespace tokenlake::engine {
namespace {

void ExpectError(const std::string& text, const std::string& needle) {
  auto p = ParsePromptsJsonl(text, "p.jsonl");
  ASSERT_FALSE(p.ok());
  EXPECT_EQ(p.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(p.status().message().find(needle), std::string::npos)
      << "wanted '" << needle << "' in " << p.status();
}

TEST(PromptsTest, ParsesLinesSkippingBlanksAndExtraFields) {
  auto p = ParsePromptsJsonl(
      "{\"input_ids\": [1, 2, 3]}\n\n  \r\n{\"input_ids\": [7], \"note\": \"x\"}\n", "p.jsonl");
  ASSERT_TRUE(p.ok()) << p.status();
  ASSERT_EQ(p->size(), 2u);
  EXPECT_EQ((*p)[0].line, 1);
  EXPECT_EQ((*p)[0].input_ids, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ((*p)[1].line, 4);
  EXPECT_EQ((*p)[1].input_ids, (std::vector<int32_t>{7}));
}

TEST(PromptsTest, ErrorsNameTheLineAndTheField) {
  ExpectError("", "p.jsonl: no prompts");
  ExpectError("\n\n", "no prompts");
  ExpectError("{\"input_ids\": [1]}\n{oops\n", "p.jsonl:2: not valid JSON");
  ExpectError("[1, 2]", "p.jsonl:1: not a JSON object");
  ExpectError("{\"ids\": [1]}", "p.jsonl:1: missing field 'input_ids'");
  ExpectError("{\"input_ids\": 5}", "'input_ids' is not an array");
  ExpectError("{\"input_ids\": []}", "'input_ids' is empty");
  ExpectError("{\"input_ids\": [1, \"2\"]}", "input_ids[1] = \"2\"");
  ExpectError("{\"input_ids\": [1, 2, -3]}", "input_ids[2] = -3");
  ExpectError("{\"input_ids\": [1.5]}", "input_ids[0] = 1.5");
  ExpectError("{\"input_ids\": [4294967296]}", "input_ids[0] = 4294967296");
}

TEST(PromptsTest, LoadsTheFixtureAndReportsAMissingFile) {
  EXPECT_EQ(LoadPromptsJsonl("/nonexistent.jsonl").status().code(), absl::StatusCode::kNotFound);
  const char* src = std::getenv("TOKENLAKE_SOURCE_DIR");
  auto p = LoadPromptsJsonl(std::string(src != nullptr ? src : ".") +
                            "/tests/fixtures/llama_tiny/prompts.jsonl");
  ASSERT_TRUE(p.ok()) << p.status();
  EXPECT_EQ(p->size(), 12u);
  EXPECT_EQ(p->front().input_ids.size(), 44u);
}

}  // namespace
}  // namespace tokenlake::engine
