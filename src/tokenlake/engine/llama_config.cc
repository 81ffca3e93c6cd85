#include "tokenlake/engine/llama_config.h"

#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"

namespace tokenlake::engine {
namespace {

using json = nlohmann::json;

absl::Status Bad(const std::string& src, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(src, ": ", what));
}

// Reads a positive integer field. Missing -> NotFound-like InvalidArgument unless has_default.
absl::StatusOr<int64_t> IntField(const json& cfg, const std::string& src, const char* key,
                                 bool required, int64_t default_value, int64_t min_value) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) {
    if (required) return Bad(src, absl::StrCat("missing field '", key, "'"));
    return default_value;
  }
  if (!it->is_number_integer()) {
    return Bad(src, absl::StrCat("field '", key, "' must be an integer"));
  }
  const int64_t v = it->get<int64_t>();
  if (v < min_value || v > std::numeric_limits<int32_t>::max()) {
    return Bad(src, absl::StrCat("field '", key, "' = ", v, " is out of range"));
  }
  return v;
}

absl::StatusOr<double> NumberField(const json& obj, const std::string& src, const std::string& key,
                                   double default_value, bool* present) {
  auto it = obj.find(key);
  if (present != nullptr) *present = it != obj.end() && !it->is_null();
  if (it == obj.end() || it->is_null()) return default_value;
  if (!it->is_number()) return Bad(src, absl::StrCat("field '", key, "' must be a number"));
  return it->get<double>();
}

absl::Status CheckRopeType(const json& obj, const std::string& src, const std::string& field) {
  for (const char* key : {"rope_type", "type"}) {
    auto it = obj.find(key);
    if (it == obj.end() || it->is_null()) continue;
    if (!it->is_string()) return Bad(src, absl::StrCat("'", field, ".", key, "' must be a string"));
    if (it->get<std::string>() != "default") {
      return absl::UnimplementedError(absl::StrCat(src, ": ", field, ".", key, " '",
                                                   it->get<std::string>(),
                                                   "' is not supported (only 'default' RoPE)"));
    }
  }
  auto pr = obj.find("partial_rotary_factor");
  if (pr != obj.end() && !pr->is_null() && !(pr->is_number() && pr->get<double>() == 1.0)) {
    return absl::UnimplementedError(
        absl::StrCat(src, ": ", field, ".partial_rotary_factor other than 1 is not supported"));
  }
  return absl::OkStatus();
}

}  // namespace

absl::StatusOr<LlamaConfig> ParseLlamaConfig(const std::string& json_text, const std::string& src) {
  const json cfg = json::parse(json_text, nullptr, false);
  if (cfg.is_discarded()) return Bad(src, "not valid JSON");
  if (!cfg.is_object()) return Bad(src, "not a JSON object");

  // Architecture.
  bool is_llama = false;
  auto arch = cfg.find("architectures");
  if (arch != cfg.end() && !arch->is_null()) {
    if (!arch->is_array()) return Bad(src, "field 'architectures' must be an array");
    std::string names;
    for (const json& a : *arch) {
      if (a.is_string()) {
        if (a.get<std::string>() == "LlamaForCausalLM") is_llama = true;
        absl::StrAppend(&names, names.empty() ? "" : ", ", a.get<std::string>());
      }
    }
    if (!is_llama) {
      return absl::UnimplementedError(
          absl::StrCat(src, ": unsupported architecture [", names, "] (only LlamaForCausalLM)"));
    }
  } else {
    auto mt = cfg.find("model_type");
    if (mt == cfg.end() || !mt->is_string() || mt->get<std::string>() != "llama") {
      return absl::UnimplementedError(absl::StrCat(
          src, ": neither 'architectures' nor model_type 'llama' says this is a Llama model"));
    }
  }
  auto act = cfg.find("hidden_act");
  if (act != cfg.end() && !act->is_null() &&
      !(act->is_string() && act->get<std::string>() == "silu")) {
    return absl::UnimplementedError(
        absl::StrCat(src, ": hidden_act ", act->dump(), " is not supported (only \"silu\")"));
  }
  for (const char* key : {"attention_bias", "mlp_bias"}) {
    auto it = cfg.find(key);
    if (it != cfg.end() && !it->is_null()) {
      if (!it->is_boolean()) return Bad(src, absl::StrCat("field '", key, "' must be a boolean"));
      if (it->get<bool>()) {
        return absl::UnimplementedError(absl::StrCat(src, ": ", key, " = true is not supported"));
      }
    }
  }

  LlamaConfig c;
  auto get = [&](const char* key, bool required, int64_t def, int64_t min_value,
                 int32_t* out) -> absl::Status {
    auto v = IntField(cfg, src, key, required, def, min_value);
    if (!v.ok()) return v.status();
    *out = static_cast<int32_t>(*v);
    return absl::OkStatus();
  };
  absl::Status s;
  if (!(s = get("vocab_size", true, 0, 1, &c.vocab_size)).ok()) return s;
  if (!(s = get("hidden_size", true, 0, 1, &c.hidden_size)).ok()) return s;
  if (!(s = get("intermediate_size", true, 0, 1, &c.intermediate_size)).ok()) return s;
  if (!(s = get("num_hidden_layers", true, 0, 1, &c.num_layers)).ok()) return s;
  if (!(s = get("num_attention_heads", true, 0, 1, &c.num_heads)).ok()) return s;
  if (!(s = get("num_key_value_heads", false, c.num_heads, 1, &c.num_kv_heads)).ok()) return s;
  if (c.num_heads % c.num_kv_heads != 0) {
    return Bad(src, absl::StrCat("num_attention_heads = ", c.num_heads,
                                 " is not a multiple of num_key_value_heads = ", c.num_kv_heads));
  }
  const bool has_head_dim = cfg.contains("head_dim") && !cfg["head_dim"].is_null();
  if (!has_head_dim && c.hidden_size % c.num_heads != 0) {
    return Bad(src, absl::StrCat("hidden_size = ", c.hidden_size,
                                 " is not a multiple of num_attention_heads = ", c.num_heads,
                                 " and no head_dim is given"));
  }
  if (!(s = get("head_dim", false, c.hidden_size / c.num_heads, 1, &c.head_dim)).ok()) return s;
  if (c.head_dim % 2 != 0) {
    return Bad(src, absl::StrCat("head_dim = ", c.head_dim, " must be even for RoPE"));
  }
  int32_t max_pos = 0;
  if (!(s = get("max_position_embeddings", false, 0, 0, &max_pos)).ok()) return s;
  c.max_position_embeddings = max_pos;

  auto eps = NumberField(cfg, src, "rms_norm_eps", 1e-6, nullptr);
  if (!eps.ok()) return eps.status();
  if (!(*eps > 0.0) || *eps > 1.0) return Bad(src, "field 'rms_norm_eps' must be in (0, 1]");
  c.rms_norm_eps = static_cast<float>(*eps);

  auto tie = cfg.find("tie_word_embeddings");
  if (tie != cfg.end() && !tie->is_null()) {
    if (!tie->is_boolean()) return Bad(src, "field 'tie_word_embeddings' must be a boolean");
    c.tie_word_embeddings = tie->get<bool>();
  }

  // RoPE: rope_parameters (newer) or rope_theta + rope_scaling (older).
  bool have_theta = false;
  auto params = cfg.find("rope_parameters");
  if (params != cfg.end() && !params->is_null()) {
    if (!params->is_object()) return Bad(src, "field 'rope_parameters' must be an object");
    absl::Status rs = CheckRopeType(*params, src, "rope_parameters");
    if (!rs.ok()) return rs;
    auto theta = NumberField(*params, src, "rope_theta", 10000.0, &have_theta);
    if (!theta.ok()) return Bad(src, "field 'rope_parameters.rope_theta' must be a number");
    c.rope_theta = *theta;
  }
  auto scaling = cfg.find("rope_scaling");
  if (scaling != cfg.end() && !scaling->is_null()) {
    if (!scaling->is_object()) return Bad(src, "field 'rope_scaling' must be an object or null");
    absl::Status rs = CheckRopeType(*scaling, src, "rope_scaling");
    if (!rs.ok()) return rs;
  }
  bool top_theta = false;
  auto theta = NumberField(cfg, src, "rope_theta", c.rope_theta, &top_theta);
  if (!theta.ok()) return theta.status();
  if (top_theta) {
    if (have_theta && *theta != c.rope_theta) {
      return Bad(src, "'rope_theta' and 'rope_parameters.rope_theta' disagree");
    }
    c.rope_theta = *theta;
  }
  if (!(c.rope_theta > 1.0) || c.rope_theta > 1e12) {
    return Bad(src, absl::StrCat("rope_theta = ", c.rope_theta, " is out of range"));
  }
  return c;
}

absl::StatusOr<LlamaConfig> NamedLlamaConfig(std::string_view name) {
  LlamaConfig c{.vocab_size = 32000,
                .hidden_size = 4096,
                .intermediate_size = 11008,
                .num_layers = 32,
                .num_heads = 32,
                .num_kv_heads = 32,
                .head_dim = 128,
                .rms_norm_eps = 1e-5f,
                .rope_theta = 10000.0,
                .max_position_embeddings = 4096,
                .tie_word_embeddings = false};
  if (name == "llama2-7b") return c;
  if (name == "lwm-7b") {
    c.rope_theta = 5e7;
    c.max_position_embeddings = int64_t{1} << 20;
    return c;
  }
  if (name == "llama3-8b") {
    c.vocab_size = 128256;
    c.intermediate_size = 14336;
    c.num_kv_heads = 8;
    c.rope_theta = 500000.0;
    c.max_position_embeddings = 8192;
    return c;
  }
  return absl::InvalidArgumentError(
      absl::StrFormat("unknown model '%s' (valid: llama2-7b, lwm-7b, llama3-8b)", name));
}

absl::StatusOr<LlamaConfig> LoadLlamaConfig(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open config file"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParseLlamaConfig(ss.str(), path);
}

std::string LlamaConfigJson(const LlamaConfig& c) {
  json cfg = {{"architectures", {"LlamaForCausalLM"}},
              {"model_type", "llama"},
              {"hidden_act", "silu"},
              {"attention_bias", false},
              {"mlp_bias", false},
              {"vocab_size", c.vocab_size},
              {"hidden_size", c.hidden_size},
              {"intermediate_size", c.intermediate_size},
              {"num_hidden_layers", c.num_layers},
              {"num_attention_heads", c.num_heads},
              {"num_key_value_heads", c.num_kv_heads},
              {"head_dim", c.head_dim},
              {"rms_norm_eps", static_cast<double>(c.rms_norm_eps)},
              {"rope_theta", c.rope_theta},
              {"rope_scaling", nullptr},
              {"max_position_embeddings", c.max_position_embeddings},
              {"tie_word_embeddings", c.tie_word_embeddings}};
  return cfg.dump(2) + "\n";
}

std::vector<LlamaTensorSpec> LlamaCheckpointTensors(const LlamaConfig& c) {
  const int64_t h = c.hidden_size;
  const int64_t qd = int64_t{c.num_heads} * c.head_dim;
  const int64_t kvd = int64_t{c.num_kv_heads} * c.head_dim;
  const int64_t inter = c.intermediate_size;
  std::vector<LlamaTensorSpec> out;
  out.push_back({"model.embed_tokens.weight", {c.vocab_size, h}, LlamaWeight::kEmbed});
  for (int32_t l = 0; l < c.num_layers; ++l) {
    const std::string p = absl::StrCat("model.layers.", l, ".");
    out.push_back({p + "input_layernorm.weight", {h}, LlamaWeight::kInputNorm, l});
    out.push_back({p + "self_attn.q_proj.weight", {qd, h}, LlamaWeight::kQ, l});
    out.push_back({p + "self_attn.k_proj.weight", {kvd, h}, LlamaWeight::kK, l});
    out.push_back({p + "self_attn.v_proj.weight", {kvd, h}, LlamaWeight::kV, l});
    out.push_back({p + "self_attn.o_proj.weight", {h, qd}, LlamaWeight::kO, l});
    out.push_back({p + "post_attention_layernorm.weight", {h}, LlamaWeight::kPostNorm, l});
    out.push_back({p + "mlp.gate_proj.weight", {inter, h}, LlamaWeight::kGate, l});
    out.push_back({p + "mlp.up_proj.weight", {inter, h}, LlamaWeight::kUp, l});
    out.push_back({p + "mlp.down_proj.weight", {h, inter}, LlamaWeight::kDown, l});
  }
  out.push_back({"model.norm.weight", {h}, LlamaWeight::kFinalNorm});
  if (!c.tie_word_embeddings) {
    out.push_back({"lm_head.weight", {c.vocab_size, h}, LlamaWeight::kLmHead});
  }
  return out;
}

}  // namespace tokenlake::engine
