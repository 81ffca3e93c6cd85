// LocalKvBackend: the no-pool attention backend. The sequence's KV for every layer lives in one
// contiguous float32 buffer on the calling thread; attention is one causal partial-attention
// call (attention module) over all of it. This is the reference path the pool path must match.
//
// Thread-safety: not thread-safe (one sequence, one thread).
#ifndef TOKENLAKE_ENGINE_LOCAL_BACKEND_H_
#define TOKENLAKE_ENGINE_LOCAL_BACKEND_H_

#include <cstdint>
#include <vector>

#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/llama_model.h"

namespace tokenlake::engine {

class LocalKvBackend final : public AttentionBackend {
 public:
  explicit LocalKvBackend(const LlamaConfig& config);

  absl::Status Attend(int32_t layer, int32_t num_tokens, absl::Span<const float> q,
                      absl::Span<const float> k, absl::Span<const float> v,
                      absl::Span<float> out) override;

  // Tokens stored for layer 0 (the sequence length so far).
  int64_t num_tokens() const { return static_cast<int64_t>(k_[0].size()) / row_; }

 private:
  LlamaConfig config_;
  int64_t row_;                            // num_kv_heads * head_dim
  std::vector<std::vector<float>> k_, v_;  // per layer [tokens][num_kv_heads][head_dim]
  std::vector<float> lse_;
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_LOCAL_BACKEND_H_
