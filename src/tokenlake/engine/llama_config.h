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
#include <string_view>
#include <vector>

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

// The configs of named published models, for benchmarks and tools that build random-init
// models of their shape: "llama2-7b" (Llama-2-7B: MHA 32 heads, MLP 11008, vocab 32000, context
// 4,096), "lwm-7b" (LWM-Text-1M: Llama-2-7B's shape, RoPE theta 5e7, context 2^20), "llama3-8b"
// (Llama-3-8B: GQA 32/8, MLP 14336, vocab 128256, RoPE theta 500,000, context 8,192).
// Errors: InvalidArgument naming the valid names.
absl::StatusOr<LlamaConfig> NamedLlamaConfig(std::string_view name);

// Reads and parses `path`. Errors: NotFound (cannot read), then as ParseLlamaConfig.
absl::StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& path);

// The text of a config.json that ParseLlamaConfig reads back as `config` (architectures
// LlamaForCausalLM, every field above), for tools and tests that write checkpoints.
std::string LlamaConfigJson(const LlamaConfig& config);

// The weights of a LlamaForCausalLM.
enum class LlamaWeight : uint8_t {
  kEmbed,      // model.embed_tokens.weight [vocab][hidden]
  kInputNorm,  // model.layers.L.input_layernorm.weight [hidden]
  kQ,          // model.layers.L.self_attn.q_proj.weight [num_heads * head_dim][hidden]
  kK,          // model.layers.L.self_attn.k_proj.weight [num_kv_heads * head_dim][hidden]
  kV,          // model.layers.L.self_attn.v_proj.weight [num_kv_heads * head_dim][hidden]
  kO,          // model.layers.L.self_attn.o_proj.weight [hidden][num_heads * head_dim]
  kPostNorm,   // model.layers.L.post_attention_layernorm.weight [hidden]
  kGate,       // model.layers.L.mlp.gate_proj.weight [intermediate][hidden]
  kUp,         // model.layers.L.mlp.up_proj.weight [intermediate][hidden]
  kDown,       // model.layers.L.mlp.down_proj.weight [hidden][intermediate]
  kFinalNorm,  // model.norm.weight [hidden]
  kLmHead,     // lm_head.weight [vocab][hidden] (absent with tied embeddings)
};

// One tensor of a Llama checkpoint: its Hugging Face name, shape, role and layer (-1 outside
// the decoder layers).
struct LlamaTensorSpec {
  std::string name;
  std::vector<int64_t> shape;
  LlamaWeight weight = LlamaWeight::kEmbed;
  int32_t layer = -1;

  // The RMSNorm weights (kept in float32 on every device).
  bool is_norm() const {
    return weight == LlamaWeight::kInputNorm || weight == LlamaWeight::kPostNorm ||
           weight == LlamaWeight::kFinalNorm;
  }
};

// Every tensor a checkpoint of `config` must hold, in the order embed_tokens, layers 0..L-1
// (input_layernorm, q/k/v/o_proj, post_attention_layernorm, gate/up/down_proj), norm, lm_head
// (left out with tied embeddings). The one list of names and shapes that every loader, writer
// and test uses.
std::vector<LlamaTensorSpec> LlamaCheckpointTensors(const LlamaConfig& config);

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_LLAMA_CONFIG_H_
