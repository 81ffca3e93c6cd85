// OpenAiFrontEnd over a fake backend (a fixed token sequence, handed to the sink one token at a
// time, stopping when the sink says so) on a real HTTP server: tokenization, chat templates,
// stop strings, streaming format, cancellation, and the refusals (no tokenizer, a template
// outside the Jinja subset, a tokenizer the vocabulary does not cover).
#include "tokenlake/service/openai_front_end.h"

#include <algorithm>
#include <atomic>
#include <filesystem>
#include <fstream>
#include <string>
#include <vector>

#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "nlohmann/json.hpp"
#include "tokenlake/service/local_cluster.h"

namespace tokenlake::service {
namespace {

using nlohmann::json;
using testing::HasSubstr;

std::string FixtureDir() {
  const char* d = std::getenv("TOKENLAKE_SOURCE_DIR");
  return std::string(d != nullptr ? d : ".") + "/tests/fixtures/tokenizer/bpe_gpt2";
}

constexpr char kAnswer[] = "Hello world, this is a test. END and more text after it.";

class FrontEndTest : public testing::Test {
 protected:
  // Serves a front end over `tokenizer` (null = none) on a free port.
  void Serve(std::shared_ptr<const tokenizer::Tokenizer> tok, int32_t vocab = 1024) {
    tok_ = tok;
    if (tok != nullptr) {
      auto ids = tok->Encode(kAnswer, /*add_special_tokens=*/false);
      ASSERT_TRUE(ids.ok());
      answer_ = *ids;
    } else {
      answer_ = {5, 6, 7, 8, 9, 10, 11, 12};
    }
    auto fe = OpenAiFrontEnd::Create(
        {.limits = {.vocab_size = vocab,
                    .context_tokens = 256,
                    .max_tokens_limit = 64,
                    .default_max_tokens = 16},
         .model_id = "fake",
         .tokenizer = tok},
        [this](const CompletionRequest& r, const OpenAiFrontEnd::TokenSink& sink) {
          return Generate(r, sink);
        },
        [this](int) { ++refused_; });
    ASSERT_TRUE(fe.ok()) << fe.status();
    front_end_ = std::move(*fe);
    auto http = HttpFrontEnd::Start({.port = 0}, front_end_->Routes());
    ASSERT_TRUE(http.ok()) << http.status();
    http_ = std::move(*http);
    port_ = http_->port();
  }
  void TearDown() override {
    if (http_ != nullptr) http_->Shutdown();
  }

  // The fake backend: the answer's tokens, one at a time, up to max_tokens.
  absl::StatusOr<CompletionResult> Generate(const CompletionRequest& r,
                                            const OpenAiFrontEnd::TokenSink& sink) {
    last_request_ = r;
    CompletionResult out;
    for (size_t i = 0; i < answer_.size() && static_cast<int32_t>(i) < r.max_tokens; ++i) {
      out.tokens.push_back(answer_[i]);
      if (sink && !sink(absl::MakeConstSpan(&answer_[i], 1))) {
        out.cancelled = true;
        ++cancelled_;
        break;
      }
    }
    out.finish_reason = "length";
    out.cached_tokens = 3;
    return out;
  }

  std::pair<int, std::string> Post(const std::string& path, const json& body) {
    auto r = HttpPost(port_, path, body.dump());
    EXPECT_TRUE(r.ok()) << r.status();
    return r.ok() ? *r : std::pair<int, std::string>{0, ""};
  }

  // The events of a streamed answer, as JSON ("[DONE]" as the string).
  static std::vector<json> Events(const std::string& body) {
    std::vector<json> out;
    size_t at = 0;
    while ((at = body.find("data: ", at)) != std::string::npos) {
      const size_t end = body.find("\n\n", at);
      const std::string data = body.substr(at + 6, end - at - 6);
      out.push_back(data == "[DONE]" ? json("[DONE]") : json::parse(data));
      at = end;
    }
    return out;
  }

  std::shared_ptr<const tokenizer::Tokenizer> tok_;
  std::vector<int32_t> answer_;
  CompletionRequest last_request_;
  std::atomic<int> refused_{0};
  std::atomic<int> cancelled_{0};
  std::unique_ptr<OpenAiFrontEnd> front_end_;
  std::unique_ptr<HttpFrontEnd> http_;
  int port_ = 0;
};

std::shared_ptr<const tokenizer::Tokenizer> Load(const std::string& dir) {
  auto t = tokenizer::Tokenizer::FromDir(dir);
  EXPECT_TRUE(t.ok()) << t.status();
  return t.ok() ? std::shared_ptr<const tokenizer::Tokenizer>(std::move(*t)) : nullptr;
}

TEST_F(FrontEndTest, TextPromptsAreTokenizedAndAnswersDecoded) {
  Serve(Load(FixtureDir()));
  auto [status, body] = Post("/v1/completions", {{"prompt", "Hi there"}, {"max_tokens", 64}});
  ASSERT_EQ(status, 200) << body;
  const json j = json::parse(body);
  // The tokenizer's own decoding of the answer (this byte-level BPE adds a prefix space).
  const std::string decoded = tok_->Decode(answer_, /*skip_special_tokens=*/true);
  EXPECT_THAT(decoded, HasSubstr(kAnswer));
  EXPECT_EQ(j["choices"][0]["text"], decoded);
  EXPECT_EQ(j["usage"]["completion_tokens"], answer_.size());
  EXPECT_EQ(j["usage"]["prompt_tokens_details"]["cached_tokens"], 3);
  EXPECT_EQ(j["model"], "fake");
  auto want = tok_->Encode("Hi there", /*add_special_tokens=*/true);
  EXPECT_EQ(last_request_.prompt, *want);
  EXPECT_EQ(last_request_.stop_token_ids, tok_->config().stop_token_ids);
  EXPECT_FALSE(last_request_.stream);  // nothing to stream and no stop string
  // Chat: rendered with the template, generation prompt included.
  auto [cs, cbody] =
      Post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}});
  ASSERT_EQ(cs, 200) << cbody;
  EXPECT_EQ(json::parse(cbody)["choices"][0]["message"]["content"], decoded);
  const std::string rendered = tok_->Decode(last_request_.prompt, false);
  EXPECT_THAT(rendered, HasSubstr("user\nHi<|im_end|>"));
  EXPECT_THAT(rendered, testing::EndsWith("assistant\n"));
  const int32_t im_start = *tok_->TokenToId("<|im_start|>");
  EXPECT_EQ(std::count(last_request_.prompt.begin(), last_request_.prompt.end(), im_start), 3);
  // Chat's default max_tokens: as many as fit, up to the limit.
  EXPECT_EQ(last_request_.max_tokens, 64);
}

TEST_F(FrontEndTest, StopStringsCutTheTextAndCancelTheBackend) {
  Serve(Load(FixtureDir()));
  auto [status, body] =
      Post("/v1/completions", {{"prompt", "x"}, {"max_tokens", 64}, {"stop", {"END", "zzz"}}});
  ASSERT_EQ(status, 200) << body;
  const json j = json::parse(body);
  const std::string decoded = tok_->Decode(answer_, /*skip_special_tokens=*/true);
  const std::string before = decoded.substr(0, decoded.find("END"));
  EXPECT_EQ(j["choices"][0]["text"], before);
  EXPECT_EQ(j["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(cancelled_.load(), 1);  // the backend stopped early
  EXPECT_LT(j["usage"]["completion_tokens"].get<size_t>(), answer_.size());
  // Streamed: the same text in pieces, never the stop string, then stop and [DONE].
  auto [ss, sbody] = Post("/v1/completions", {{"prompt", "x"},
                                              {"max_tokens", 64},
                                              {"stop", "END"},
                                              {"stream", true},
                                              {"stream_options", {{"include_usage", true}}}});
  ASSERT_EQ(ss, 200);
  const std::vector<json> events = Events(sbody);
  ASSERT_GE(events.size(), 4u) << sbody;
  std::string text;
  for (size_t i = 0; i + 3 < events.size(); ++i) text += events[i]["choices"][0]["text"];
  EXPECT_EQ(text, before);
  EXPECT_EQ(events[events.size() - 3]["choices"][0]["finish_reason"], "stop");
  EXPECT_EQ(events[events.size() - 2]["choices"], json::array());
  EXPECT_GT(events[events.size() - 2]["usage"]["completion_tokens"], 0);
  EXPECT_EQ(events.back(), "[DONE]");
}

TEST_F(FrontEndTest, ChatStreamsStartWithTheRoleAndEndWithTheFinishReason) {
  Serve(Load(FixtureDir()));
  auto [status, body] =
      Post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Hi"}}}},
                                    {"max_completion_tokens", 4},
                                    {"stream", true}});
  ASSERT_EQ(status, 200);
  const std::vector<json> events = Events(body);
  ASSERT_GE(events.size(), 3u);
  EXPECT_EQ(events[0]["object"], "chat.completion.chunk");
  EXPECT_EQ(events[0]["choices"][0]["delta"]["role"], "assistant");
  std::string text;
  for (const json& e : events) {
    if (e.is_object()) text += e["choices"][0]["delta"].value("content", "");
  }
  EXPECT_EQ(text, tok_->Decode(absl::MakeConstSpan(answer_).subspan(0, 4), true));
  EXPECT_EQ(events[events.size() - 2]["choices"][0]["finish_reason"], "length");
  EXPECT_EQ(events.back(), "[DONE]");
}

TEST_F(FrontEndTest, WithoutATokenizerTokenIdsWorkAndTextIsRefusedClearly) {
  Serve(nullptr);
  auto [status, body] = Post("/v1/completions", {{"prompt", {1, 2, 3}}, {"max_tokens", 4}});
  ASSERT_EQ(status, 200) << body;
  EXPECT_EQ(json::parse(body)["choices"][0]["tokens"], json::array({5, 6, 7, 8}));
  auto [ts, tbody] = Post("/v1/completions", {{"prompt", "hello"}});
  EXPECT_EQ(ts, 400);
  EXPECT_THAT(tbody, HasSubstr("the served model has no tokenizer"));
  EXPECT_EQ(json::parse(tbody)["error"]["param"], "prompt");
  auto [cs, cbody] =
      Post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}});
  EXPECT_EQ(cs, 400);
  EXPECT_THAT(cbody, HasSubstr("no tokenizer"));
  // A stream of token ids carries them per chunk.
  auto [ss, sbody] =
      Post("/v1/completions", {{"prompt", {1, 2, 3}}, {"max_tokens", 3}, {"stream", true}});
  ASSERT_EQ(ss, 200);
  std::vector<int32_t> streamed;
  for (const json& e : Events(sbody)) {
    if (e.is_object() && e["choices"][0].contains("tokens")) {
      for (int32_t t : e["choices"][0]["tokens"]) streamed.push_back(t);
    }
  }
  EXPECT_EQ(streamed, (std::vector<int32_t>{5, 6, 7}));
  // Several prompts: one choice each.
  auto [ms, mbody] = Post("/v1/completions", {{"prompt", {{1, 2}, {3}}}, {"max_tokens", 2}});
  ASSERT_EQ(ms, 200) << mbody;
  const json m = json::parse(mbody);
  ASSERT_EQ(m["choices"].size(), 2u);
  EXPECT_EQ(m["choices"][1]["index"], 1);
  EXPECT_EQ(m["usage"]["prompt_tokens"], 3);
  EXPECT_EQ(m["usage"]["completion_tokens"], 4);
  EXPECT_GE(refused_.load(), 2);
  auto [gs, gbody] = HttpGet(port_, "/v1/models").value();
  EXPECT_EQ(gs, 200);
  EXPECT_EQ(json::parse(gbody)["data"][0]["id"], "fake");
}

TEST_F(FrontEndTest, AChatTemplateOutsideTheJinjaSubsetRefusesChatOnly) {
  const std::filesystem::path dir =
      std::filesystem::temp_directory_path() / ("openai_fe_" + std::to_string(::getpid()));
  std::filesystem::create_directories(dir);
  for (const char* f : {"tokenizer.json", "tokenizer_config.json"}) {
    std::filesystem::copy_file(FixtureDir() + "/" + f, dir / f,
                               std::filesystem::copy_options::overwrite_existing);
  }
  std::ofstream(dir / "chat_template.jinja") << "{% macro f(x) %}{{ x }}{% endmacro %}{{ f(1) }}";
  Serve(Load(dir.string()));
  std::filesystem::remove_all(dir);
  EXPECT_THAT(front_end_->chat_unavailable(), HasSubstr("unsupported tag 'macro'"));
  auto [cs, cbody] =
      Post("/v1/chat/completions", {{"messages", {{{"role", "user"}, {"content", "Hi"}}}}});
  EXPECT_EQ(cs, 400);
  EXPECT_THAT(cbody, HasSubstr("chat template cannot be used"));
  EXPECT_THAT(cbody, HasSubstr("macro"));
  auto [ts, tbody] = Post("/v1/completions", {{"prompt", "hello"}, {"max_tokens", 2}});
  EXPECT_EQ(ts, 200) << tbody;
}

TEST(OpenAiFrontEndCreateTest, TheVocabularyMustCoverTheTokenizer) {
  auto tok = Load(FixtureDir());
  auto fe = OpenAiFrontEnd::Create(
      {.limits = {.vocab_size = 512, .context_tokens = 256}, .tokenizer = tok},
      [](const CompletionRequest&, const OpenAiFrontEnd::TokenSink&)
          -> absl::StatusOr<CompletionResult> { return CompletionResult{}; },
      nullptr);
  ASSERT_FALSE(fe.ok());
  EXPECT_EQ(fe.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_THAT(fe.status().message(), HasSubstr("the model's vocabulary has only 512 rows"));
}

}  // namespace
}  // namespace tokenlake::service
