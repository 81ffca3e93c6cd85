#include "tokenlake/service/api_keys.h"

#include <openssl/crypto.h>

#include <fstream>
#include <sstream>

#include "absl/strings/ascii.h"
#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "tokenlake/service/openai_api.h"

namespace tokenlake::service {

absl::StatusOr<std::shared_ptr<const ApiKeys>> ApiKeys::Load(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat("API key file ", path, " cannot be read"));
  std::stringstream text;
  text << in.rdbuf();
  return Parse(text.str(), path);
}

absl::StatusOr<std::shared_ptr<const ApiKeys>> ApiKeys::Parse(absl::string_view text,
                                                              const std::string& name) {
  auto keys = std::shared_ptr<ApiKeys>(new ApiKeys());
  int line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty() || line[0] == '#') continue;
    const std::string where = absl::StrCat(name, ":", line_no);
    std::vector<absl::string_view> fields =
        absl::StrSplit(line, absl::ByAnyChar(" \t"), absl::SkipEmpty());
    ApiKey k;
    k.key = std::string(fields[0]);
    if (k.key.size() < 8) {
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": the key is shorter than 8 characters"));
    }
    for (size_t i = 1; i < fields.size(); ++i) {
      std::pair<absl::string_view, absl::string_view> kv = absl::StrSplit(fields[i], '=');
      if (kv.first == "tenant" && !kv.second.empty()) {
        k.tenant = std::string(kv.second);
      } else if (kv.first == "max_concurrent" && absl::SimpleAtoi(kv.second, &k.max_concurrent) &&
                 k.max_concurrent >= 0) {
      } else if (kv.first == "max_tokens_in_flight" &&
                 absl::SimpleAtoi(kv.second, &k.max_tokens_in_flight) &&
                 k.max_tokens_in_flight >= 0) {
      } else {
        return absl::InvalidArgumentError(absl::StrCat(
            where, ": '", kv.first,
            "' is not tenant=NAME, max_concurrent=N or max_tokens_in_flight=N (N >= 0) after "
            "the key"));
      }
    }
    for (const ApiKey& other : keys->keys_) {
      if (other.key == k.key) {
        return absl::InvalidArgumentError(absl::StrCat(where, ": the key is listed twice"));
      }
    }
    keys->keys_.push_back(std::move(k));
  }
  if (keys->keys_.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(name, ": no API key in the file"));
  }
  keys->in_flight_ = std::make_unique<std::atomic<int32_t>[]>(keys->keys_.size());
  keys->tokens_in_flight_ = std::make_unique<std::atomic<int64_t>[]>(keys->keys_.size());
  return std::shared_ptr<const ApiKeys>(std::move(keys));
}

int ApiKeys::Find(absl::string_view authorization) const {
  absl::string_view given = absl::StripAsciiWhitespace(authorization);
  if (!absl::ConsumePrefix(&given, "Bearer ") && !absl::ConsumePrefix(&given, "bearer ")) {
    return -1;
  }
  given = absl::StripAsciiWhitespace(given);
  int found = -1;
  // Every key is compared, each in constant time, so timing says nothing about the keys.
  for (size_t i = 0; i < keys_.size(); ++i) {
    const std::string& key = keys_[i].key;
    if (key.size() == given.size() && CRYPTO_memcmp(key.data(), given.data(), key.size()) == 0) {
      found = static_cast<int>(i);
    }
  }
  return found;
}

}  // namespace tokenlake::service

namespace tokenlake::service {

absl::Status ApiKeys::TakeTokens(int i, int64_t tokens) const {
  const int64_t limit = keys_[static_cast<size_t>(i)].max_tokens_in_flight;
  std::atomic<int64_t>& held = tokens_in_flight_[static_cast<size_t>(i)];
  if (limit <= 0) {
    held.fetch_add(tokens);
    return absl::OkStatus();
  }
  if (tokens > limit) {
    return absl::InvalidArgumentError(
        absl::StrCat("this request needs ", tokens,
                     " tokens (prompt + max_tokens), more than this API key's "
                     "max_tokens_in_flight of ",
                     limit));
  }
  int64_t now = held.load();
  while (true) {
    if (now + tokens > limit) {
      return absl::ResourceExhaustedError(
          absl::StrCat("this API key has ", now,
                       " tokens in flight (prompt + max_tokens of its running "
                       "requests); this request's ",
                       tokens, " more would exceed its max_tokens_in_flight of ", limit));
    }
    if (held.compare_exchange_weak(now, now + tokens)) return absl::OkStatus();
  }
}

void ApiKeys::ReturnTokens(int i, int64_t tokens) const {
  tokens_in_flight_[static_cast<size_t>(i)].fetch_sub(tokens);
}

std::vector<HttpRoute> WithApiKeys(std::vector<HttpRoute> routes,
                                   std::shared_ptr<const ApiKeys> keys, bool metrics_public) {
  for (HttpRoute& route : routes) {
    if (route.path == "/healthz" || (route.path == "/metrics" && metrics_public)) continue;
    route.handler = [keys, inner = std::move(route.handler)](const HttpRequest& req,
                                                             HttpResponse* res) {
      const int k = keys->Find(req.Header("Authorization"));
      if (k < 0) {
        res->status = 401;
        res->headers.emplace_back("WWW-Authenticate", "Bearer");
        res->body = OpenAiErrorJson(
            absl::UnauthenticatedError("a valid API key is required: Authorization: Bearer KEY"));
        return;
      }
      const ApiKey& key = keys->key(k);
      std::atomic<int32_t>& in_flight = keys->in_flight(k);
      if (key.max_concurrent > 0 && in_flight.fetch_add(1) >= key.max_concurrent) {
        in_flight.fetch_sub(1);
        res->status = 429;
        res->headers.emplace_back("Retry-After", "1");
        res->body = OpenAiErrorJson(absl::ResourceExhaustedError(
            absl::StrCat("this API key already has ", key.max_concurrent, " requests in flight")));
        return;
      }
      if (key.max_concurrent <= 0) in_flight.fetch_add(1);
      HttpRequest tenanted = req;
      tenanted.tenant = key.tenant;
      // The tokens this request took, given back when its answer is complete.
      auto taken = std::make_shared<std::atomic<int64_t>>(0);
      tenanted.reserve_tokens = [keys, k, taken](int64_t tokens) {
        absl::Status s = keys->TakeTokens(k, tokens);
        if (s.ok()) taken->fetch_add(tokens);
        return s;
      };
      inner(tenanted, res);
      if (!res->stream) {
        in_flight.fetch_sub(1);
        keys->ReturnTokens(k, taken->load());
        return;
      }
      // A streamed answer is in flight until its stream ends.
      res->stream = [keys, k, taken, &in_flight, stream = std::move(res->stream)](
                        const std::function<bool(std::string_view)>& write) {
        stream(write);
        in_flight.fetch_sub(1);
        keys->ReturnTokens(k, taken->load());
      };
    };
  }
  return routes;
}

}  // namespace tokenlake::service
