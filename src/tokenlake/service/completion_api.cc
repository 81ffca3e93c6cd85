#include "tokenlake/service/completion_api.h"

#include <limits>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace tokenlake::service {
namespace {

using nlohmann::json;

std::string TypeName(const json& j) { return j.type_name(); }

}  // namespace

absl::StatusOr<CompletionRequest> ParseCompletionRequest(std::string_view body,
                                                         const CompletionLimits& limits) {
  json j = json::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) {
    return absl::InvalidArgumentError("request body is not valid JSON");
  }
  if (!j.is_object()) {
    return absl::InvalidArgumentError(
        absl::StrFormat("request body must be a JSON object, got %s", TypeName(j)));
  }
  CompletionRequest request;
  request.max_tokens = limits.default_max_tokens;
  bool have_prompt = false;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const json& v = it.value();
    if (key == "prompt") {
      if (!v.is_array()) {
        return absl::InvalidArgumentError(
            absl::StrFormat("field 'prompt' must be an array of token ids, got %s", TypeName(v)));
      }
      if (v.empty()) return absl::InvalidArgumentError("field 'prompt' must not be empty");
      if (static_cast<int64_t>(v.size()) >= limits.context_tokens) {
        return absl::InvalidArgumentError(
            absl::StrFormat("prompt of %d tokens does not fit the model's context of %d tokens",
                            v.size(), limits.context_tokens));
      }
      request.prompt.reserve(v.size());
      for (size_t i = 0; i < v.size(); ++i) {
        const json& t = v[i];
        if (!t.is_number_integer()) {
          return absl::InvalidArgumentError(
              absl::StrFormat("prompt[%d] must be an integer token id, got %s", i, TypeName(t)));
        }
        const bool negative =
            t.is_number_integer() && !t.is_number_unsigned() && t.get<int64_t>() < 0;
        const uint64_t u = negative ? 0 : t.get<uint64_t>();
        if (negative || u >= static_cast<uint64_t>(limits.vocab_size)) {
          return absl::InvalidArgumentError(absl::StrFormat(
              "prompt[%d] = %s is outside the vocabulary [0, %d)", i, t.dump(), limits.vocab_size));
        }
        request.prompt.push_back(static_cast<int32_t>(u));
      }
      have_prompt = true;
    } else if (key == "max_tokens") {
      if (!v.is_number_integer()) {
        return absl::InvalidArgumentError(
            absl::StrFormat("field 'max_tokens' must be an integer, got %s", TypeName(v)));
      }
      const bool negative = !v.is_number_unsigned() && v.get<int64_t>() < 0;
      const uint64_t u = negative ? 0 : v.get<uint64_t>();
      if (negative || u < 1 || u > static_cast<uint64_t>(limits.max_tokens_limit)) {
        return absl::InvalidArgumentError(absl::StrFormat(
            "field 'max_tokens' = %s must be in [1, %d]", v.dump(), limits.max_tokens_limit));
      }
      request.max_tokens = static_cast<int32_t>(u);
    } else if (key == "model") {
      if (!v.is_string()) {
        return absl::InvalidArgumentError(
            absl::StrFormat("field 'model' must be a string, got %s", TypeName(v)));
      }
    } else if (key == "temperature") {
      if (!v.is_number() || v.get<double>() != 0.0) {
        return absl::InvalidArgumentError(
            "field 'temperature' must be 0 (only greedy decoding is served)");
      }
    } else if (key == "stream") {
      if (!v.is_boolean() || v.get<bool>()) {
        return absl::InvalidArgumentError("field 'stream' must be false (streaming is not served)");
      }
    } else {
      return absl::InvalidArgumentError(absl::StrFormat(
          "unknown field '%s' (accepted: prompt, max_tokens, model, temperature, stream)",
          key.substr(0, 64)));
    }
  }
  if (!have_prompt) return absl::InvalidArgumentError("field 'prompt' is required");
  if (static_cast<int64_t>(request.prompt.size()) + request.max_tokens > limits.context_tokens) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "prompt of %d tokens plus max_tokens %d exceeds the model's context of %d tokens",
        request.prompt.size(), request.max_tokens, limits.context_tokens));
  }
  return request;
}

std::string CompletionResponseJson(const CompletionRequest& request, const CompletionResult& result,
                                   uint64_t id) {
  json j = {
      {"id", absl::StrFormat("cmpl-%d", id)},
      {"object", "text_completion"},
      {"choices",
       json::array(
           {{{"index", 0}, {"tokens", result.tokens}, {"finish_reason", result.finish_reason}}})},
      {"usage",
       {{"prompt_tokens", request.prompt.size()},
        {"completion_tokens", result.tokens.size()},
        {"total_tokens", request.prompt.size() + result.tokens.size()},
        {"cached_tokens", result.cached_tokens}}},
      {"instance", result.instance},
      {"attempts", result.attempts}};
  return j.dump();
}

int HttpStatusFor(const absl::Status& status) {
  switch (status.code()) {
    case absl::StatusCode::kOk:
      return 200;
    case absl::StatusCode::kInvalidArgument:
    case absl::StatusCode::kOutOfRange:
      return 400;
    case absl::StatusCode::kNotFound:
      return 404;
    case absl::StatusCode::kResourceExhausted:
      return 429;
    case absl::StatusCode::kUnavailable:
      return 503;
    case absl::StatusCode::kDeadlineExceeded:
      return 504;
    default:
      return 500;
  }
}

std::string ErrorJson(const absl::Status& status) {
  const int http = HttpStatusFor(status);
  const char* type = http < 500 ? "invalid_request_error" : "server_error";
  json j = {{"error",
             {{"message", std::string(status.message())},
              {"type", type},
              {"status", absl::StatusCodeToString(status.code())},
              {"code", http}}}};
  return j.dump(-1, ' ', false, json::error_handler_t::replace);
}

}  // namespace tokenlake::service
