// Sampling the next token from a step's logits, as OpenAI's API and vLLM define the parameters:
// temperature (0 = greedy: the first index of the maximum), top_k (keep the k most likely; 0 =
// all), top_p (keep the smallest set of most likely tokens whose probability reaches p; 1 = all),
// and a seed: the same seed and logits give the same tokens.
//
// Order (vLLM's): logits / temperature -> top-k -> softmax -> top-p -> draw. Ties in the
// ordering are broken by the lower token id, so the kept set is deterministic.
//
// Thread-safety: SamplingParams is a plain value; Sampler is not thread-safe (one per request).
#ifndef TOKENLAKE_ENGINE_SAMPLER_H_
#define TOKENLAKE_ENGINE_SAMPLER_H_

#include <cstdint>
#include <optional>
#include <random>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace tokenlake::engine {

struct SamplingParams {
  // >= 0 and finite; 0 = greedy.
  float temperature = 0.0f;
  // >= 0; 0 = no limit.
  int32_t top_k = 0;
  // In (0, 1].
  float top_p = 1.0f;
  // The draw's seed; none = a fresh random seed per request.
  std::optional<uint64_t> seed;

  bool greedy() const { return temperature == 0.0f; }
  // InvalidArgument naming the field when a value is out of range.
  absl::Status Validate() const;
};

class Sampler {
 public:
  // REQUIRES: params.Validate() is OK.
  explicit Sampler(const SamplingParams& params);

  // The next token from `logits` (non-empty). Greedy: the first index of the maximum, and the
  // random stream is not advanced.
  int32_t Next(absl::Span<const float> logits);

 private:
  SamplingParams params_;
  std::mt19937_64 rng_;
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_SAMPLER_H_
