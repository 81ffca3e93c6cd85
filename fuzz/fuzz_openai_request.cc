// libFuzzer target: the OpenAI-compatible API's request parser (service/openai_api.h), for both
// endpoints, and the error body. Invariants checked on every input: no crash, no sanitizer
// report; an accepted request is within the limits (token ids in the vocabulary, max_tokens in
// range, sampling parameters in range, stop sequences non-empty and at most 4); an error is
// InvalidArgument with a message and renders as JSON.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "nlohmann/json.hpp"
#include "tokenlake/service/openai_api.h"

namespace {

void Check(std::string_view body, tokenlake::service::OpenAiEndpoint endpoint) {
  using namespace tokenlake::service;
  const CompletionLimits limits{
      .vocab_size = 512, .context_tokens = 4096, .max_tokens_limit = 256, .default_max_tokens = 16};
  absl::StatusOr<OpenAiRequest> r = ParseOpenAiRequest(body, endpoint, limits);
  if (r.ok()) {
    if (r->max_tokens.has_value() && (*r->max_tokens < 1 || *r->max_tokens > 256)) std::abort();
    if (!(r->temperature >= 0 && r->temperature <= 2) || !(r->top_p > 0 && r->top_p <= 1) ||
        r->top_k < 0 || r->stop.size() > 4) {
      std::abort();
    }
    for (const std::string& s : r->stop) {
      if (s.empty()) std::abort();
    }
    if (endpoint == OpenAiEndpoint::kCompletions) {
      if (r->prompts.empty()) std::abort();
      for (const OpenAiPrompt& p : r->prompts) {
        if (p.is_text ? p.text.empty() : p.ids.empty()) std::abort();
        for (int32_t t : p.ids) {
          if (t < 0 || t >= limits.vocab_size) std::abort();
        }
      }
    } else if (!r->messages.is_array() || r->messages.empty()) {
      std::abort();
    }
  } else {
    if (r.status().code() != absl::StatusCode::kInvalidArgument || r.status().message().empty()) {
      std::abort();
    }
    if (nlohmann::json::parse(OpenAiErrorJson(r.status()), nullptr, false).is_discarded()) {
      std::abort();
    }
  }
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  Check(body, tokenlake::service::OpenAiEndpoint::kCompletions);
  Check(body, tokenlake::service::OpenAiEndpoint::kChatCompletions);
  return 0;
}
