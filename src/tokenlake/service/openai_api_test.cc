#include "tokenlake/service/openai_api.h"

#include <string>

#include "absl/strings/str_cat.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenlake::service {
namespace {

using nlohmann::json;
using testing::HasSubstr;

constexpr CompletionLimits kLimits{
    .vocab_size = 512, .context_tokens = 64, .max_tokens_limit = 32, .default_max_tokens = 16};

absl::StatusOr<OpenAiRequest> Completion(const std::string& body) {
  return ParseOpenAiRequest(body, OpenAiEndpoint::kCompletions, kLimits);
}
absl::StatusOr<OpenAiRequest> Chat(const std::string& body) {
  return ParseOpenAiRequest(body, OpenAiEndpoint::kChatCompletions, kLimits);
}
absl::Status CompletionError(const std::string& body) {
  absl::StatusOr<OpenAiRequest> r = Completion(body);
  EXPECT_FALSE(r.ok()) << body;
  return r.status();
}
absl::Status ChatError(const std::string& body) {
  absl::StatusOr<OpenAiRequest> r = Chat(body);
  EXPECT_FALSE(r.ok()) << body;
  return r.status();
}

TEST(OpenAiApiTest, ParsesPromptsAsTextTokenIdsOrListsOfEither) {
  auto text = Completion(R"({"prompt": "Hello", "model": "m"})");
  ASSERT_TRUE(text.ok()) << text.status();
  ASSERT_EQ(text->prompts.size(), 1u);
  EXPECT_TRUE(text->prompts[0].is_text);
  EXPECT_EQ(text->prompts[0].text, "Hello");
  EXPECT_EQ(text->model, "m");
  EXPECT_FALSE(text->max_tokens.has_value());
  EXPECT_EQ(text->temperature, 0.0f);  // greedy unless asked

  auto ids = Completion(R"({"prompt": [1, 2, 511], "max_tokens": 5})");
  ASSERT_TRUE(ids.ok()) << ids.status();
  EXPECT_FALSE(ids->prompts[0].is_text);
  EXPECT_EQ(ids->prompts[0].ids, (std::vector<int32_t>{1, 2, 511}));
  EXPECT_EQ(ids->max_tokens, 5);

  auto list = Completion(R"({"prompt": ["a", [3, 4], "b"]})");
  ASSERT_TRUE(list.ok()) << list.status();
  ASSERT_EQ(list->prompts.size(), 3u);
  EXPECT_EQ(list->prompts[1].ids, (std::vector<int32_t>{3, 4}));
  EXPECT_EQ(list->prompts[2].text, "b");
}

TEST(OpenAiApiTest, ParsesSamplingStopAndStreamOptions) {
  auto r = Chat(R"({"messages": [{"role": "system", "content": "Be brief."},
                                  {"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
                    "max_completion_tokens": 7, "temperature": 0.8, "top_p": 0.9, "top_k": 40,
                    "seed": -3, "stop": ["\n\n", "END"], "stream": true,
                    "stream_options": {"include_usage": true}, "n": 1, "user": "u",
                    "frequency_penalty": 0, "presence_penalty": 0.0, "logit_bias": {},
                    "logprobs": false, "tool_choice": "none",
                    "response_format": {"type": "text"}})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->max_tokens, 7);
  EXPECT_FLOAT_EQ(r->temperature, 0.8f);
  EXPECT_FLOAT_EQ(r->top_p, 0.9f);
  EXPECT_EQ(r->top_k, 40);
  EXPECT_EQ(r->seed, static_cast<uint64_t>(int64_t{-3}));
  EXPECT_EQ(r->stop, (std::vector<std::string>{"\n\n", "END"}));
  EXPECT_TRUE(r->stream);
  EXPECT_TRUE(r->include_usage);
  EXPECT_EQ(r->messages.size(), 2u);
  auto one_stop = Completion(R"({"prompt": "x", "stop": "###", "top_k": -1})");
  ASSERT_TRUE(one_stop.ok());
  EXPECT_EQ(one_stop->stop, std::vector<std::string>{"###"});
  EXPECT_EQ(one_stop->top_k, 0);
}

TEST(OpenAiApiTest, ParsesCacheSaltAndRefusesBadOnes) {
  absl::StatusOr<OpenAiRequest> r = Completion(R"({"prompt": "hi", "cache_salt": "tenant-7"})");
  ASSERT_TRUE(r.ok()) << r.status();
  EXPECT_EQ(r->cache_salt, "tenant-7");
  EXPECT_EQ(Completion(R"({"prompt": "hi"})")->cache_salt, "");
  for (const char* bad :
       {R"({"prompt": "hi", "cache_salt": 7})", R"({"prompt": "hi", "cache_salt": ""})"}) {
    absl::StatusOr<OpenAiRequest> b = Completion(bad);
    ASSERT_FALSE(b.ok()) << bad;
    EXPECT_EQ(ParamOf(b.status()), "cache_salt") << bad;
  }
  EXPECT_FALSE(
      Completion(absl::StrCat(R"({"prompt": "hi", "cache_salt": ")", std::string(513, 'x'), "\"}"))
          .ok());
}

TEST(OpenAiApiTest, BadInputNamesTheFieldAndParam) {
  struct Case {
    std::string body;
    std::string message;
    std::string param;
  };
  const Case cases[] = {
      {"{", "not valid JSON", ""},
      {"[1]", "must be a JSON object", ""},
      {std::string("{\"prompt\": \"a\xff\"}"), "not valid UTF-8 (byte 13)", ""},
      {std::string("{\"prompt\": \"\xed\xa0\x80\"}"), "not valid UTF-8", ""},  // a surrogate
      {R"({"max_tokens": 3})", "field 'prompt' is required", "prompt"},
      {R"({"prompt": ""})", "must not be empty", "prompt"},
      {R"({"prompt": []})", "must not be empty", "prompt"},
      {R"({"prompt": {"a": 1}})", "must be a string, an array of token ids", "prompt"},
      {R"({"prompt": [1, 600]})", "prompt[1] = 600 is outside the vocabulary [0, 512)", "prompt"},
      {R"({"prompt": ["a", 3]})", "prompt[1] must be a string or an array", "prompt"},
      {R"({"prompt": [[1], [-1]]})", "prompt[1][0] = -1 is outside", "prompt"},
      {R"({"prompt": "a", "max_tokens": 0})", "'max_tokens' = 0 must be in [1, 32]", "max_tokens"},
      {R"({"prompt": "a", "max_tokens": 33})", "must be in [1, 32]", "max_tokens"},
      {R"({"prompt": "a", "max_tokens": 1.5})", "'max_tokens' must be an integer", "max_tokens"},
      {R"({"prompt": "a", "temperature": 2.5})", "'temperature' = 2.5 must be in [0, 2]",
       "temperature"},
      {R"({"prompt": "a", "temperature": -0.1})", "must be in [0, 2]", "temperature"},
      {R"({"prompt": "a", "top_p": 0})", "'top_p' = 0 must be in (0, 1]", "top_p"},
      {R"({"prompt": "a", "top_p": 1.1})", "must be in (0, 1]", "top_p"},
      {R"({"prompt": "a", "top_k": -2})", "'top_k' = -2 must be in [-1,", "top_k"},
      {R"({"prompt": "a", "seed": "x"})", "'seed' must be an integer", "seed"},
      {R"({"prompt": "a", "stop": ""})", "must not be empty", "stop"},
      {R"({"prompt": "a", "stop": ["a", "b", "c", "d", "e"]})", "at most 4", "stop"},
      {R"({"prompt": "a", "stop": [1]})", "stop[0] must be a string", "stop"},
      {R"({"prompt": "a", "n": 2})", "'n' = 2 is not served", "n"},
      {R"({"prompt": "a", "best_of": 3})", "'best_of' = 3 is not served", "best_of"},
      {R"({"prompt": "a", "echo": true})", "the prompt is not echoed", "echo"},
      {R"({"prompt": "a", "logprobs": 2})", "log probabilities", "logprobs"},
      {R"({"prompt": "a", "frequency_penalty": 0.5})", "penalties are not implemented",
       "frequency_penalty"},
      {R"({"prompt": "a", "logit_bias": {"5": 100}})", "logit_bias is not implemented",
       "logit_bias"},
      {R"({"prompt": "a", "suffix": "b"})", "insertion is not served", "suffix"},
      {R"({"prompt": "a", "frobnicate": 1})", "unknown field 'frobnicate'", "frobnicate"},
      {R"({"prompt": "a", "tools": []})", "unknown field 'tools' for /v1/completions", "tools"},
      {R"({"prompt": "a", "stream": "yes"})", "'stream' must be a boolean", "stream"},
      {R"({"prompt": "a", "stream_options": {"include_usage": true}})",
       "only allowed with stream: true", "stream_options"},
      {R"({"prompt": "a", "stream": true, "stream_options": {"x": 1}})",
       "stream_options.x is not served", "stream_options"},
      {R"({"prompt": "a", "model": 3})", "'model' must be a string", "model"},
  };
  for (const Case& c : cases) {
    const absl::Status s = CompletionError(c.body);
    EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << c.body;
    EXPECT_THAT(s.message(), HasSubstr(c.message)) << c.body;
    EXPECT_EQ(ParamOf(s), c.param) << c.body;
    // The error body is OpenAI's, with the param.
    const json e = json::parse(OpenAiErrorJson(s));
    EXPECT_EQ(e["error"]["type"], "invalid_request_error");
    EXPECT_EQ(e["error"]["code"], "invalid_argument");
    EXPECT_EQ(e["error"]["message"], std::string(s.message()));
    if (c.param.empty()) {
      EXPECT_TRUE(e["error"]["param"].is_null());
    } else {
      EXPECT_EQ(e["error"]["param"], c.param);
    }
  }
}

TEST(OpenAiApiTest, BadChatMessagesAreRefusedNamingTheMessage) {
  EXPECT_THAT(ChatError(R"({"messages": []})").message(), HasSubstr("must not be empty"));
  EXPECT_THAT(ChatError(R"({"model": "m"})").message(), HasSubstr("'messages' is required"));
  EXPECT_THAT(ChatError(R"({"messages": [{"role": "wizard", "content": "x"}]})").message(),
              HasSubstr("messages[0].role 'wizard' is not one of system, developer, user"));
  EXPECT_THAT(ChatError(R"({"messages": [{"role": "user"}]})").message(),
              HasSubstr("messages[0].content is required"));
  EXPECT_THAT(ChatError(R"({"messages": [{"role": "user", "content": 5}]})").message(),
              HasSubstr("messages[0].content must be a string, null or an array"));
  EXPECT_THAT(ChatError(R"({"messages": [{"role": "user", "content": [{"type": "image_url"}]}]})")
                  .message(),
              HasSubstr("messages[0].content[0] must be {\"type\": \"text\""));
  EXPECT_THAT(
      ChatError(R"({"messages": [{"role": "user", "content": "x", "tool_calls": []}]})").message(),
      HasSubstr("messages[0].tool_calls is not served"));
  EXPECT_THAT(
      ChatError(R"({"messages": [{"role": "user", "content": "x"}], "prompt": "y"})").message(),
      HasSubstr("unknown field 'prompt'"));
  EXPECT_THAT(
      ChatError(R"({"messages": [{"role": "user", "content": "x"}], "echo": false})").message(),
      HasSubstr("unknown field 'echo' for /v1/chat/completions"));
  EXPECT_THAT(ChatError(R"({"messages": [{"role": "user", "content": "x"}],
                            "tools": [{"type": "function"}]})")
                  .message(),
              HasSubstr("tool calls are not served"));
  EXPECT_THAT(CompletionError(R"({"messages": [{"role": "user", "content": "x"}]})").message(),
              HasSubstr("unknown field 'messages'"));
}

TEST(OpenAiApiTest, FormatsAnswersChunksUsageAndModelsAsOpenAiDoes) {
  const OpenAiAnswerHeader completion{.endpoint = OpenAiEndpoint::kCompletions,
                                      .id = "cmpl-1",
                                      .created_unix_s = 100,
                                      .model = "tiny"};
  const OpenAiUsage usage{.prompt_tokens = 5, .completion_tokens = 2, .cached_tokens = 4};
  json j = json::parse(OpenAiResponseJson(
      completion, {{.index = 0, .text = "hi", .tokens = {7, 8}, .finish_reason = "stop"}}, usage,
      {{"instance", 1}}));
  EXPECT_EQ(j["object"], "text_completion");
  EXPECT_EQ(j["id"], "cmpl-1");
  EXPECT_EQ(j["created"], 100);
  EXPECT_EQ(j["model"], "tiny");
  EXPECT_EQ(j["choices"][0]["text"], "hi");
  EXPECT_EQ(j["choices"][0]["tokens"], json::array({7, 8}));
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(j["usage"]["prompt_tokens"], 5);
  EXPECT_EQ(j["usage"]["completion_tokens"], 2);
  EXPECT_EQ(j["usage"]["total_tokens"], 7);
  EXPECT_EQ(j["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
  EXPECT_EQ(j["instance"], 1);

  OpenAiAnswerHeader chat = completion;
  chat.endpoint = OpenAiEndpoint::kChatCompletions;
  chat.id = "chatcmpl-1";
  j = json::parse(OpenAiResponseJson(chat, {{.index = 0, .text = "yo"}}, usage));
  EXPECT_EQ(j["object"], "chat.completion");
  EXPECT_EQ(j["choices"][0]["message"]["role"], "assistant");
  EXPECT_EQ(j["choices"][0]["message"]["content"], "yo");
  EXPECT_EQ(j["choices"][0]["finish_reason"], "length");

  auto event = [](const std::string& e) {
    EXPECT_EQ(e.rfind("data: ", 0), 0u) << e;
    EXPECT_EQ(e.substr(e.size() - 2), "\n\n") << e;
    return json::parse(e.substr(6, e.size() - 8));
  };
  json role = event(OpenAiChunkEvent(chat, 0, "", "", /*role_delta=*/true));
  EXPECT_EQ(role["object"], "chat.completion.chunk");
  EXPECT_EQ(role["choices"][0]["delta"]["role"], "assistant");
  EXPECT_TRUE(role["choices"][0]["finish_reason"].is_null());
  json piece = event(OpenAiChunkEvent(chat, 0, "é", ""));
  EXPECT_EQ(piece["choices"][0]["delta"]["content"], "é");
  EXPECT_FALSE(piece["choices"][0]["delta"].contains("role"));
  json last = event(OpenAiChunkEvent(chat, 0, "", "stop"));
  EXPECT_EQ(last["choices"][0]["delta"], json::object());
  EXPECT_EQ(last["choices"][0]["finish_reason"], "stop");
  json text = event(OpenAiChunkEvent(completion, 2, "ab", "length"));
  EXPECT_EQ(text["object"], "text_completion");
  EXPECT_EQ(text["choices"][0]["index"], 2);
  EXPECT_EQ(text["choices"][0]["text"], "ab");
  EXPECT_FALSE(text["choices"][0].contains("tokens"));
  json ids = event(OpenAiChunkEvent(completion, 0, "", "", false, {4, 5}));
  EXPECT_EQ(ids["choices"][0]["tokens"], json::array({4, 5}));
  json u = event(OpenAiUsageEvent(chat, usage));
  EXPECT_EQ(u["choices"], json::array());
  EXPECT_EQ(u["usage"]["prompt_tokens_details"]["cached_tokens"], 4);
  EXPECT_EQ(OpenAiDoneEvent(), "data: [DONE]\n\n");
  json err = event(OpenAiErrorEvent(absl::UnavailableError("no live instance")));
  EXPECT_EQ(err["error"]["type"], "server_error");
  EXPECT_EQ(err["error"]["code"], "unavailable");

  json models = json::parse(OpenAiModelsJson("tiny", 5));
  EXPECT_EQ(models["object"], "list");
  EXPECT_EQ(models["data"][0]["id"], "tiny");
  EXPECT_EQ(models["data"][0]["object"], "model");
}

}  // namespace
}  // namespace tokenlake::service
