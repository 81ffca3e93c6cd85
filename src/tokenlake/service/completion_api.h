// What the coordinator serves: a request of token ids with its sampling parameters, the result,
// the limits requests are checked against, and the HTTP status of an error. The HTTP formats
// are openai_api.h's.
//
// Thread-safety: plain values and a pure function.
#ifndef TOKENLAKE_SERVICE_COMPLETION_API_H_
#define TOKENLAKE_SERVICE_COMPLETION_API_H_

#include <cstdint>
#include <optional>
#include <string>
#include <vector>

#include "absl/status/status.h"

namespace tokenlake::service {

struct CompletionLimits {
  // Token ids must be in [0, vocab_size). >= 1.
  int32_t vocab_size = 1;
  // prompt tokens + max_tokens must be <= context_tokens. >= 2.
  int64_t context_tokens = 2;
  // Largest max_tokens accepted. >= 1.
  int32_t max_tokens_limit = 256;
  // Default max_tokens when the field is absent.
  int32_t default_max_tokens = 16;
};

struct CompletionRequest {
  std::vector<int32_t> prompt;
  int32_t max_tokens = 0;
  // How tokens are chosen (engine/sampler.h): temperature >= 0 (0 = greedy), top_k >= 0
  // (0 = all), top_p in (0, 1]; seed: none = the coordinator draws one per request, so that a
  // retried attempt produces the same tokens.
  float temperature = 0;
  int32_t top_k = 0;
  float top_p = 1;
  std::optional<uint64_t> seed;
  // Generation ends after one of these ids (the model's end-of-sequence tokens).
  std::vector<int32_t> stop_token_ids;
  // Who may share this request's cached segments: requests with equal cache salts only (the
  // caller's tenant and the body's cache_salt; index::TenantSalt). Empty: everyone.
  std::string cache_salt;
  // The computing instance reports each iteration's tokens as they come (for
  // Coordinator::CompleteStreaming's sink); otherwise they arrive with the final answer.
  bool stream = false;
};

struct CompletionResult {
  // Generated token ids: max_tokens of them, fewer when a stop token ended generation (it is
  // the last one) or the request was cancelled.
  std::vector<int32_t> tokens;
  // "length" (max_tokens produced) or "stop" (a stop token produced).
  std::string finish_reason = "length";
  // The caller's sink asked to stop (Coordinator::CompleteStreaming); tokens are those it got.
  bool cancelled = false;
  // Prompt tokens served from the cache pool.
  int64_t cached_tokens = 0;
  // Instance that computed the request.
  int32_t instance = -1;
  // Attempts it took (1 = no failover).
  int32_t attempts = 1;
};

// The HTTP status for an error: InvalidArgument/OutOfRange 400, NotFound 404,
// ResourceExhausted 429, Unavailable 503, DeadlineExceeded 504, others 500; OK is 200.
int HttpStatusFor(const absl::Status& status);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_COMPLETION_API_H_
