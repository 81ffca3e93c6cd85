#include "tokenlake/service/completion_api.h"

#include <string>

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;

CompletionLimits Limits() {
  return {.vocab_size = 512, .context_tokens = 64, .max_tokens_limit = 32, .default_max_tokens = 4};
}

absl::Status ParseError(const std::string& body) {
  return ParseCompletionRequest(body, Limits()).status();
}

TEST(CompletionApiTest, ParsesAValidRequest) {
  auto r = ParseCompletionRequest(
      R"({"prompt": [1, 2, 511], "max_tokens": 5, "model": "tiny", "temperature": 0,
          "stream": false})",
      Limits());
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->prompt, (std::vector<int32_t>{1, 2, 511}));
  EXPECT_EQ(r->max_tokens, 5);
}

TEST(CompletionApiTest, MaxTokensDefaults) {
  auto r = ParseCompletionRequest(R"({"prompt": [7]})", Limits());
  ASSERT_TRUE(r.ok());
  EXPECT_EQ(r->max_tokens, 4);
}

TEST(CompletionApiTest, RejectsMalformedJson) {
  for (const char* body : {"", "{", "{\"prompt\": [1,2", "nul", "{\"prompt\": [1,]}", "\xff\xfe"}) {
    absl::Status s = ParseError(body);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << body;
    EXPECT_THAT(s.message(), HasSubstr("not valid JSON")) << body;
  }
  EXPECT_THAT(ParseError("[1, 2]").message(), HasSubstr("must be a JSON object"));
}

TEST(CompletionApiTest, RejectsUnknownFieldsNamingThem) {
  absl::Status s = ParseError(R"({"prompt": [1], "max_tokenz": 3})");
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(s.message(), HasSubstr("unknown field 'max_tokenz'"));
}

TEST(CompletionApiTest, RejectsTokenIdsOutOfRangeNamingTheIndex) {
  EXPECT_THAT(ParseError(R"({"prompt": [1, 512]})").message(),
              HasSubstr("prompt[1] = 512 is outside the vocabulary [0, 512)"));
  EXPECT_THAT(ParseError(R"({"prompt": [-1]})").message(), HasSubstr("prompt[0] = -1"));
  EXPECT_THAT(ParseError(R"({"prompt": [1, 99999999999999999999]})").message(),
              HasSubstr("prompt[1]"));
  EXPECT_THAT(ParseError(R"({"prompt": [1.5]})").message(),
              HasSubstr("prompt[0] must be an integer"));
  EXPECT_THAT(ParseError(R"({"prompt": ["a"]})").message(),
              HasSubstr("prompt[0] must be an integer"));
  EXPECT_THAT(ParseError(R"({"prompt": "hello"})").message(), HasSubstr("array of token ids"));
  EXPECT_THAT(ParseError(R"({"prompt": []})").message(), HasSubstr("must not be empty"));
  EXPECT_THAT(ParseError(R"({"max_tokens": 3})").message(), HasSubstr("'prompt' is required"));
}

TEST(CompletionApiTest, RejectsPromptsLongerThanTheContext) {
  std::string long_prompt = "{\"prompt\": [";
  for (int i = 0; i < 64; ++i) long_prompt += (i ? ",1" : "1");
  long_prompt += "]}";
  EXPECT_THAT(ParseError(long_prompt).message(), HasSubstr("context of 64 tokens"));
  std::string fits_alone = "{\"max_tokens\": 8, \"prompt\": [";
  for (int i = 0; i < 60; ++i) fits_alone += (i ? ",1" : "1");
  fits_alone += "]}";
  EXPECT_THAT(ParseError(fits_alone).message(), HasSubstr("plus max_tokens 8 exceeds"));
}

TEST(CompletionApiTest, RejectsNegativeZeroHugeOrNonIntegerMaxTokens) {
  for (const char* v :
       {"-1", "0", "33", "1000000000000", "2.5", "\"4\"", "null", "-99999999999999999999"}) {
    absl::Status s = ParseError(std::string(R"({"prompt": [1], "max_tokens": )") + v + "}");
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << v;
    EXPECT_THAT(s.message(), HasSubstr("max_tokens")) << v;
  }
}

TEST(CompletionApiTest, RejectsSamplingAndStreaming) {
  EXPECT_THAT(ParseError(R"({"prompt": [1], "temperature": 0.7})").message(),
              HasSubstr("temperature"));
  EXPECT_THAT(ParseError(R"({"prompt": [1], "stream": true})").message(), HasSubstr("stream"));
  EXPECT_THAT(ParseError(R"({"prompt": [1], "model": 3})").message(), HasSubstr("'model'"));
}

TEST(CompletionApiTest, ResponseAndErrorBodiesAreJson) {
  CompletionRequest req{.prompt = {1, 2}, .max_tokens = 2};
  CompletionResult res{.tokens = {5, 6}, .cached_tokens = 0, .instance = 1, .attempts = 1};
  const std::string body = CompletionResponseJson(req, res, 7);
  EXPECT_THAT(body, HasSubstr("\"tokens\":[5,6]"));
  EXPECT_THAT(body, HasSubstr("\"cmpl-7\""));
  EXPECT_THAT(body, HasSubstr("\"completion_tokens\":2"));
  const std::string err = ErrorJson(absl::InvalidArgumentError("bad \"x\"\n"));
  EXPECT_THAT(err, HasSubstr("\"code\":400"));
  EXPECT_THAT(err, HasSubstr("invalid_request_error"));
  EXPECT_EQ(HttpStatusFor(absl::UnavailableError("")), 503);
  EXPECT_EQ(HttpStatusFor(absl::DeadlineExceededError("")), 504);
  EXPECT_EQ(HttpStatusFor(absl::InternalError("")), 500);
  EXPECT_EQ(HttpStatusFor(absl::OkStatus()), 200);
}

}  // namespace
}  // namespace tokenlake::service
