// LlamaConfig: the subset of a Hugging Face Llama `config.json` the engine needs, parsed and
// validated.
//
// Accepted: architectures containing "LlamaForCausalLM" (or, when absent, model_type "llama");
// hidden_act "silu"; no attention or MLP bias; RoPE "default" only, given either as
// `rope_theta` (with `rope_scaling` null or absent) or, as newer transformers write it, as
// `"rope_parameters": {"rope_theta": ..., "rope_type": "default"}`. Anything else (another
// architecture, rope scaling such as "llama3" or "yarn", biases) is Unimplemented with a message
// naming the field.
//
// Thread-safety: plain value type.
#ifndef TOKENLAKE_ENGINE_LLAMA_CONFIG_H_
#define TOKENLAKE_ENGINE_LLAMA_CONFIG_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"

namespace tokenlake::engine {

struct LlamaConfig {
  // Vocabulary size (rows of the embedding and of the LM head).
  int32_t vocab_size = 0;
  // Model width.
  int32_t hidden_size = 0;
  // Width of the SwiGLU MLP.
  int32_t intermediate_size = 0;
  // Transformer layers.
  int32_t num_layers = 0;
  // Query heads.
  int32_t num_heads = 0;
  // Key/value heads (GQA); defaults to num_heads when the config omits it.
  int32_t num_kv_heads = 0;
  // Elements per head; defaults to hidden_size / num_heads.
  int32_t head_dim = 0;
  // RMSNorm epsilon.
  float rms_norm_eps = 1e-6f;
  // RoPE base frequency.
  double rope_theta = 10000.0;
  // Longest position the model was trained for (informational; positions beyond are allowed).
  int64_t max_position_embeddings = 0;
  // The LM head shares the embedding matrix (no lm_head.weight tensor).
  bool tie_word_embeddings = false;
};

// Parses the text of a config.json. `source_name` (e.g. the file path) prefixes every message.
// Errors: InvalidArgument (not JSON, a required field missing or of the wrong type or out of
//   range, e.g. num_heads not a multiple of num_kv_heads), Unimplemented (an architecture or
//   feature the engine does not run).
absl::StatusOr<LlamaConfig> ParseLlamaConfig(const std::string& json_text,
                                             const std::string& source_name);

// Reads and parses `path`. Errors: NotFound (cannot read), then as ParseLlamaConfig.
absl::StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& path);

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_LLAMA_CONFIG_H_
