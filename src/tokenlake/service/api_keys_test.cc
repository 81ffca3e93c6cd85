// API keys: the key file, the per-key budget of tokens in flight against a model, and the HTTP
// routes behind keys over an OpenAI front end with a backend that holds requests until told.
#include "tokenlake/service/api_keys.h"

#include <atomic>
#include <string>
#include <thread>
#include <vector>

#include "absl/synchronization/notification.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/base/random.h"
#include "tokenlake/base/random_testing.h"
#include "tokenlake/service/openai_front_end.h"

namespace tokenlake::service {
namespace {

using ::testing::HasSubstr;
using ::testing::Not;

TEST(ApiKeysTest, ParsesKeysTenantsAndLimitsAndFindsBearerKeys) {
  auto keys = ApiKeys::Parse(
      "# keys\n\nsk-aaaaaaaa tenant=team-a max_concurrent=2 max_tokens_in_flight=5000\n"
      "  sk-bbbbbbbb  \n",
      "keys.txt");
  ASSERT_TRUE(keys.ok()) << keys.status();
  ASSERT_EQ((*keys)->size(), 2);
  EXPECT_EQ((*keys)->key(0).tenant, "team-a");
  EXPECT_EQ((*keys)->key(0).max_concurrent, 2);
  EXPECT_EQ((*keys)->key(0).max_tokens_in_flight, 5000);
  EXPECT_EQ((*keys)->key(1).tenant, "");
  EXPECT_EQ((*keys)->key(1).max_tokens_in_flight, 0);
  EXPECT_EQ((*keys)->Find("Bearer sk-aaaaaaaa"), 0);
  EXPECT_EQ((*keys)->Find("Bearer sk-bbbbbbbb"), 1);
  EXPECT_EQ((*keys)->Find("Bearer sk-bbbbbbb"), -1);  // a prefix is not the key
  EXPECT_EQ((*keys)->Find("Bearer sk-bbbbbbbbX"), -1);
  EXPECT_EQ((*keys)->Find("sk-aaaaaaaa"), -1);  // no scheme
  EXPECT_EQ((*keys)->Find("Basic sk-aaaaaaaa"), -1);
  EXPECT_EQ((*keys)->Find(""), -1);
}

TEST(ApiKeysTest, BadFilesNameFileAndLineButNeverTheKey) {
  struct Case {
    const char* text;
    const char* want;
  } cases[] = {
      {"sk-secret-1 tenant=a\nshort\n", "keys.txt:2: the key is shorter"},
      {"sk-secret-1 colour=blue\n", "keys.txt:1: 'colour'"},
      {"sk-secret-1 max_concurrent=-1\n", "keys.txt:1: 'max_concurrent'"},
      {"sk-secret-1\nsk-secret-2 max_tokens_in_flight=many\n",
       "keys.txt:2: 'max_tokens_in_flight' is not tenant=NAME, max_concurrent=N or "
       "max_tokens_in_flight=N"},
      {"sk-secret-1 max_tokens_in_flight=-5\n", "keys.txt:1: 'max_tokens_in_flight'"},
      {"sk-secret-1\nsk-secret-1\n", "keys.txt:2: the key is listed twice"},
      {"# nothing\n", "keys.txt: no API key"},
  };
  for (const Case& c : cases) {
    auto keys = ApiKeys::Parse(c.text, "keys.txt");
    ASSERT_FALSE(keys.ok()) << c.text;
    EXPECT_EQ(keys.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_THAT(std::string(keys.status().message()), HasSubstr(c.want));
    EXPECT_THAT(std::string(keys.status().message()), Not(HasSubstr("sk-secret-1")));
  }
  EXPECT_EQ(ApiKeys::Load("/nonexistent/keys.txt").status().code(), absl::StatusCode::kNotFound);
}

// TakeTokens / ReturnTokens against a model (the sum of what is held): a take succeeds exactly
// when it fits, and the count never passes the limit, also with threads racing.
TEST(ApiKeysTest, TokensInFlightNeverExceedTheKeysLimit) {
  auto keys = ApiKeys::Parse("sk-limited-1 max_tokens_in_flight=100\nsk-open-key-2\n", "k");
  ASSERT_TRUE(keys.ok());
  const ApiKeys& k = **keys;
  const uint64_t seed = TestSeed(31);
  Rng rng(seed);
  std::vector<int64_t> held;
  int64_t sum = 0;
  for (int step = 0; step < 2000; ++step) {
    if (!held.empty() && rng.Bernoulli(0.4)) {
      const size_t i = static_cast<size_t>(rng.UniformInt(0, held.size() - 1));
      k.ReturnTokens(0, held[i]);
      sum -= held[i];
      held.erase(held.begin() + static_cast<int64_t>(i));
    } else {
      const int64_t t = rng.UniformInt(0, 120);
      const absl::Status s = k.TakeTokens(0, t);
      if (t > 100) {
        ASSERT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << step;
        EXPECT_THAT(s.message(), HasSubstr("more than this API key's max_tokens_in_flight of 100"));
      } else if (sum + t > 100) {
        ASSERT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << step;
      } else {
        ASSERT_TRUE(s.ok()) << step << ": " << s;
        held.push_back(t);
        sum += t;
      }
    }
    ASSERT_EQ(k.tokens_in_flight(0), sum) << step;
  }
  EXPECT_TRUE(k.TakeTokens(1, int64_t{1} << 40).ok());  // no limit on the other key
  // Racing threads: what they hold never passes the limit.
  for (int64_t t : held) k.ReturnTokens(0, t);
  std::atomic<bool> over{false};
  std::vector<std::thread> threads;
  for (int t = 0; t < 4; ++t) {
    threads.emplace_back([&, t] {
      Rng r(seed + 1 + static_cast<uint64_t>(t));
      for (int i = 0; i < 5000; ++i) {
        const int64_t n = r.UniformInt(1, 60);
        if (!k.TakeTokens(0, n).ok()) continue;
        if (k.tokens_in_flight(0) > 100) over = true;
        k.ReturnTokens(0, n);
      }
    });
  }
  for (std::thread& t : threads) t.join();
  EXPECT_FALSE(over.load());
  EXPECT_EQ(k.tokens_in_flight(0), 0);
}

// The routes behind keys, over an OpenAI front end whose backend holds a request whose prompt
// starts with token 1 until released: the budget of tokens in flight answers 429 with
// Retry-After while a request holds it, a request larger than the budget 400, and it is free
// again when the answer is complete (a streamed answer: when its stream ends).
class KeyedFrontEndTest : public testing::Test {
 protected:
  void SetUp() override {
    auto keys = ApiKeys::Parse("sk-budget-0001 tenant=t max_tokens_in_flight=100\nsk-free-000002\n",
                               "keys");
    ASSERT_TRUE(keys.ok());
    keys_ = *keys;
    auto fe = OpenAiFrontEnd::Create(
        {.limits = {.vocab_size = 64, .context_tokens = 1000, .max_tokens_limit = 200}},
        [this](const CompletionRequest& r,
               const OpenAiFrontEnd::TokenSink&) -> absl::StatusOr<CompletionResult> {
          tenant_salt_ = r.cache_salt;
          if (r.prompt[0] == 1) release_.WaitForNotification();
          return CompletionResult{.tokens = {7}};
        },
        nullptr);
    ASSERT_TRUE(fe.ok());
    front_end_ = std::move(*fe);
    for (HttpRoute& r : WithApiKeys(front_end_->Routes(), keys_, false)) {
      if (r.path == "/v1/completions") completions_ = r.handler;
    }
    ASSERT_TRUE(completions_);
  }
  HttpResponse Post(const std::string& key, const std::string& body) {
    HttpRequest req;
    req.method = "POST";
    req.path = "/v1/completions";
    if (!key.empty()) req.headers.emplace_back("Authorization", "Bearer " + key);
    req.body = body;
    HttpResponse res;
    completions_(req, &res);
    return res;
  }
  static std::string Header(const HttpResponse& res, const std::string& name) {
    for (const auto& [k, v] : res.headers) {
      if (k == name) return v;
    }
    return "";
  }
  std::shared_ptr<const ApiKeys> keys_;
  std::unique_ptr<OpenAiFrontEnd> front_end_;
  HttpHandler completions_;
  absl::Notification release_;
  std::string tenant_salt_;
};

TEST_F(KeyedFrontEndTest, ABudgetOfTokensInFlightAnswers429UntilTheHolderIsDone) {
  // 3 prompt tokens + 57 = 60 tokens, held by a request the backend keeps.
  HttpResponse first;
  std::thread holder(
      [&] { first = Post("sk-budget-0001", R"({"prompt": [1, 2, 3], "max_tokens": 57})"); });
  while (keys_->tokens_in_flight(0) != 60) absl::SleepFor(absl::Milliseconds(1));
  // 60 + 50 > 100: refused for now, with Retry-After and OpenAI's error body.
  HttpResponse busy = Post("sk-budget-0001", R"({"prompt": [5, 6], "max_tokens": 48})");
  EXPECT_EQ(busy.status, 429);
  EXPECT_EQ(Header(busy, "Retry-After"), "1");
  EXPECT_THAT(busy.body, HasSubstr("60 tokens in flight"));
  EXPECT_THAT(busy.body, HasSubstr("max_tokens_in_flight of 100"));
  // 60 + 40 fits; another key has no budget.
  EXPECT_EQ(Post("sk-budget-0001", R"({"prompt": [5, 6], "max_tokens": 38})").status, 200);
  EXPECT_THAT(tenant_salt_, HasSubstr("t"));  // the key's tenant reached the backend
  EXPECT_EQ(Post("sk-free-000002", R"({"prompt": [5, 6], "max_tokens": 190})").status, 200);
  // More than the whole budget: waiting cannot help.
  HttpResponse huge = Post("sk-budget-0001", R"({"prompt": [5, 6], "max_tokens": 99})");
  EXPECT_EQ(huge.status, 400);
  EXPECT_EQ(Header(huge, "Retry-After"), "");
  EXPECT_EQ(Post("", R"({"prompt": [5, 6]})").status, 401);
  release_.Notify();
  holder.join();
  EXPECT_EQ(first.status, 200) << first.body;
  EXPECT_EQ(keys_->tokens_in_flight(0), 0);
  EXPECT_EQ(Post("sk-budget-0001", R"({"prompt": [5, 6], "max_tokens": 48})").status, 200);
}

TEST_F(KeyedFrontEndTest, AStreamedAnswerHoldsItsTokensUntilItsStreamEnds) {
  release_.Notify();
  HttpResponse streamed =
      Post("sk-budget-0001", R"({"prompt": [5, 6, 7], "max_tokens": 57, "stream": true})");
  ASSERT_EQ(streamed.status, 200);
  ASSERT_TRUE(streamed.stream);
  EXPECT_EQ(keys_->tokens_in_flight(0), 60);
  EXPECT_EQ(Post("sk-budget-0001", R"({"prompt": [5, 6], "max_tokens": 48})").status, 429);
  std::string body;
  streamed.stream([&](std::string_view piece) {
    body += piece;
    return true;
  });
  EXPECT_THAT(body, HasSubstr("[DONE]"));
  EXPECT_EQ(keys_->tokens_in_flight(0), 0);
  EXPECT_EQ(keys_->in_flight(0).load(), 0);
}

}  // namespace
}  // namespace tokenlake::service
