// libFuzzer target: the HTTP front end's request-body parser (service/completion_api.h).
// Invariants checked on every input: no crash, no sanitizer report; an accepted request is
// within the limits; an error is InvalidArgument with a message and renders as JSON.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string_view>

#include "tokenlake/service/completion_api.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  const std::string_view body(reinterpret_cast<const char*>(data), size);
  const tokenlake::service::CompletionLimits limits{
      .vocab_size = 512, .context_tokens = 4096, .max_tokens_limit = 256, .default_max_tokens = 16};
  auto r = tokenlake::service::ParseCompletionRequest(body, limits);
  if (r.ok()) {
    if (r->prompt.empty() || r->max_tokens < 1 || r->max_tokens > limits.max_tokens_limit ||
        static_cast<int64_t>(r->prompt.size()) + r->max_tokens > limits.context_tokens) {
      std::abort();
    }
    for (int32_t t : r->prompt) {
      if (t < 0 || t >= limits.vocab_size) std::abort();
    }
  } else {
    if (r.status().code() != absl::StatusCode::kInvalidArgument || r.status().message().empty()) {
      std::abort();
    }
    if (tokenlake::service::ErrorJson(r.status()).empty()) std::abort();
  }
  return 0;
}
