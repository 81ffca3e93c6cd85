// Test- and benchmark-only: a Llama checkpoint image (safetensors bytes, float32, the Hugging
// Face tensor names and shapes of a LlamaForCausalLM) with values from the caller, so that tests
// and benchmarks build random models through the real loader.
//
// Thread-safety: a pure function (the fill callback's own state aside).
#ifndef TOKENLAKE_ENGINE_CHECKPOINT_TESTING_H_
#define TOKENLAKE_ENGINE_CHECKPOINT_TESTING_H_

#include <cstdint>
#include <cstring>
#include <functional>
#include <string>
#include <utility>
#include <vector>

#include "absl/strings/str_cat.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/safetensors.h"

namespace tokenlake::engine::testing_checkpoint {

// Fills `values` (already sized to the tensor's element count) of a tensor of `shape`; `norm`
// is true for the RMSNorm weights.
using TensorFill =
    std::function<void(const std::vector<int64_t>& shape, bool norm, std::vector<float>& values)>;

// Every tensor of `c` in the order embed_tokens, layers 0..L-1 (input_layernorm, q/k/v/o_proj,
// post_attention_layernorm, gate/up/down_proj), norm, lm_head (absent with tied embeddings),
// each filled by `fill` in that order; the tensor named `skip` (if any) is left out, without
// calling `fill` for it.
inline std::string LlamaCheckpointImage(const LlamaConfig& c, const TensorFill& fill,
                                        const std::string& skip = "") {
  std::vector<TensorToWrite> tensors;
  auto add = [&](const std::string& name, std::vector<int64_t> shape, bool norm = false) {
    if (name == skip) return;
    int64_t n = 1;
    for (int64_t d : shape) n *= d;
    std::vector<float> v(static_cast<size_t>(n));
    fill(shape, norm, v);
    std::string bytes(v.size() * 4, '\0');
    std::memcpy(bytes.data(), v.data(), bytes.size());
    tensors.push_back({name, TensorDtype::kF32, std::move(shape), std::move(bytes)});
  };
  const int64_t h = c.hidden_size, qd = c.num_heads * c.head_dim, kvd = c.num_kv_heads * c.head_dim;
  add("model.embed_tokens.weight", {c.vocab_size, h});
  for (int l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    add(p + "input_layernorm.weight", {h}, true);
    add(p + "self_attn.q_proj.weight", {qd, h});
    add(p + "self_attn.k_proj.weight", {kvd, h});
    add(p + "self_attn.v_proj.weight", {kvd, h});
    add(p + "self_attn.o_proj.weight", {h, qd});
    add(p + "post_attention_layernorm.weight", {h}, true);
    add(p + "mlp.gate_proj.weight", {c.intermediate_size, h});
    add(p + "mlp.up_proj.weight", {c.intermediate_size, h});
    add(p + "mlp.down_proj.weight", {h, c.intermediate_size});
  }
  add("model.norm.weight", {h}, true);
  if (!c.tie_word_embeddings) add("lm_head.weight", {c.vocab_size, h});
  return SerializeSafetensors(tensors);
}

}  // namespace tokenlake::engine::testing_checkpoint

#endif  // TOKENLAKE_ENGINE_CHECKPOINT_TESTING_H_
