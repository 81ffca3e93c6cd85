// LlamaModel: a Llama-architecture decoder (Hugging Face LlamaForCausalLM) in float32 on the
// CPU. Weights are loaded from a checkpoint directory (config.json + model.safetensors, or
// model.safetensors.index.json + its shards; float32, or bfloat16/float16 converted at load). The
// model owns no KV cache: every layer's attention is delegated to an AttentionBackend, which is
// where the KV lives (a local contiguous cache for the no-pool path, the TokenLake pool otherwise).
//
// Forward pass per layer (transformers' numerics):
//   h = x + o_proj(Attn(RoPE(q_proj(n)), RoPE(k_proj(n)), v_proj(n)))   n = RMSNorm_in(x)
//   x' = h + down(silu(gate(m)) * up(m))                                m = RMSNorm_post(h)
// and logits = lm_head(RMSNorm_final(x)) (lm_head = embed_tokens when tied).
//
// Thread-safety: immutable after Load; Forward is const and may run concurrently for different
// backends.
#ifndef TOKENLAKE_ENGINE_LLAMA_MODEL_H_
#define TOKENLAKE_ENGINE_LLAMA_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/engine/checkpoint.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/safetensors.h"

namespace tokenlake::engine {

// Where a model's attention runs. One backend object serves one sequence.
class AttentionBackend {
 public:
  virtual ~AttentionBackend() = default;
  // Attention of `num_tokens` new tokens of the sequence (positions continue the sequence) at
  // layer `layer`. q [num_tokens][num_heads][head_dim], k and v [num_tokens][num_kv_heads]
  // [head_dim] (RoPE applied to q and k). The backend appends k and v to the sequence's KV for
  // this layer and writes out [num_tokens][num_heads][head_dim]: softmax(q K^T * scale) V over
  // all earlier tokens of the sequence and, causally, the new ones.
  // Errors: whatever the backend's storage or transport reports.
  virtual absl::Status Attend(int32_t layer, int32_t num_tokens, absl::Span<const float> q,
                              absl::Span<const float> k, absl::Span<const float> v,
                              absl::Span<float> out) = 0;
};

// One sequence's attention at one layer, as AttentionBackend::Attend's arguments.
struct AttendCall {
  int32_t num_tokens = 0;
  absl::Span<const float> q;
  absl::Span<const float> k;
  absl::Span<const float> v;
  absl::Span<float> out;
};

// The attention of a whole batch at one layer in one call (so that an implementation can move
// the batch's queries together, e.g. one message per holder of pooled KV). calls[i] is
// sequence i of the batch.
class BatchAttention {
 public:
  virtual ~BatchAttention() = default;
  virtual absl::Status AttendBatch(int32_t layer, absl::Span<const AttendCall> calls) = 0;
};

// One sequence of a ragged batch (LlamaModel::ForwardBatch): its new tokens, the position of
// the first, where its attention runs, and whether its last token's logits are wanted (a
// prefill chunk that does not end the prompt needs none).
struct BatchSequence {
  absl::Span<const int32_t> tokens;
  int64_t start_pos = 0;
  AttentionBackend* backend = nullptr;
  bool want_logits = true;
};

class LlamaModel {
 public:
  struct LayerWeights {
    std::vector<float> input_norm;  // [hidden]
    std::vector<float> q_proj;      // [num_heads * head_dim][hidden]
    std::vector<float> k_proj;      // [num_kv_heads * head_dim][hidden]
    std::vector<float> v_proj;      // [num_kv_heads * head_dim][hidden]
    std::vector<float> o_proj;      // [hidden][num_heads * head_dim]
    std::vector<float> post_norm;   // [hidden]
    std::vector<float> gate_proj;   // [intermediate][hidden]
    std::vector<float> up_proj;     // [intermediate][hidden]
    std::vector<float> down_proj;   // [hidden][intermediate]
  };

  // Loads `dir`/config.json and the checkpoint in `dir` (Checkpoint::Open: one file or shards).
  // Errors: those of LoadLlamaConfig / Checkpoint::Open, and of FromCheckpoint.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> Load(const std::string& dir);

  // Builds the model from a parsed config and an opened checkpoint (every tensor of
  // LlamaCheckpointTensors(config)).
  // Errors: NotFound naming the checkpoint and the missing tensor, InvalidArgument naming the
  //   shard and the tensor with the wrong shape, Unimplemented for a dtype other than
  //   F32/BF16/F16.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> FromCheckpoint(const LlamaConfig& config,
                                                                    const Checkpoint& checkpoint);
  // FromCheckpoint over one file. Errors: as FromCheckpoint.
  static absl::StatusOr<std::unique_ptr<LlamaModel>> FromSafetensors(const LlamaConfig& config,
                                                                     const SafetensorsFile& file);

  const LlamaConfig& config() const { return config_; }

  // Runs `tokens` (positions start_pos, start_pos + 1, ...) through the model with attention on
  // `backend`, and returns the logits [vocab_size] of the last token.
  // Errors: InvalidArgument (empty tokens, a token id outside [0, vocab_size) naming its index,
  //   start_pos < 0); any backend error.
  absl::StatusOr<std::vector<float>> Forward(absl::Span<const int32_t> tokens, int64_t start_pos,
                                             AttentionBackend& backend) const;

  // One forward over a ragged batch: the dense layers run once over all the batch's tokens
  // (one matmul per weight), attention runs per sequence on its own backend. Returns per
  // sequence the logits [vocab_size] of its last token (empty where want_logits is false).
  // Each sequence's result equals its own Forward (the dense ops are row-independent).
  // With `joint`, every layer's attention of the whole batch is one joint->AttendBatch call
  // (the sequences' backends are then unused and may be null).
  // Errors: InvalidArgument (empty batch, a sequence with no tokens or, without `joint`, a null
  //   backend, a bad token naming its sequence and index, start_pos < 0); any backend error.
  absl::StatusOr<std::vector<std::vector<float>>> ForwardBatch(
      absl::Span<const BatchSequence> batch, BatchAttention* joint = nullptr) const;

 private:
  explicit LlamaModel(const LlamaConfig& config) : config_(config) {}

  LlamaConfig config_;
  std::vector<float> embed_;  // [vocab][hidden]
  std::vector<LayerWeights> layers_;
  std::vector<float> final_norm_;  // [hidden]
  std::vector<float> lm_head_;     // [vocab][hidden]; empty when tied
  std::vector<float> inv_freq_;    // RoPE, [head_dim / 2]
};

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_LLAMA_MODEL_H_
