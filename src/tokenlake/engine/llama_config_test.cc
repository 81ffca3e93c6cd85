#include "tokenlake/engine/llama_config.h"

#include <cstdlib>
#include <string>

#include "gtest/gtest.h"
#include "nlohmann/json.hpp"

namespace tokenlake::engine {
namespace {

using json = nlohmann::json;

json BaseConfig() {
  return json{{"architectures", {"LlamaForCausalLM"}},
              {"vocab_size", 512},
              {"hidden_size", 64},
              {"intermediate_size", 128},
              {"num_hidden_layers", 3},
              {"num_attention_heads", 4},
              {"num_key_value_heads", 2},
              {"rms_norm_eps", 1e-5},
              {"rope_theta", 10000.0},
              {"max_position_embeddings", 4096},
              {"hidden_act", "silu"},
              {"tie_word_embeddings", false}};
}

absl::StatusOr<LlamaConfig> Parse(const json& j) { return ParseLlamaConfig(j.dump(), "cfg.json"); }

void ExpectError(const json& j, absl::StatusCode code, const std::string& needle) {
  auto c = Parse(j);
  ASSERT_FALSE(c.ok());
  EXPECT_EQ(c.status().code(), code) << c.status();
  EXPECT_NE(c.status().message().find("cfg.json"), std::string::npos) << c.status();
  EXPECT_NE(c.status().message().find(needle), std::string::npos)
      << "wanted '" << needle << "' in " << c.status();
}

TEST(LlamaConfigTest, ParsesEveryField) {
  auto c = Parse(BaseConfig());
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->vocab_size, 512);
  EXPECT_EQ(c->hidden_size, 64);
  EXPECT_EQ(c->intermediate_size, 128);
  EXPECT_EQ(c->num_layers, 3);
  EXPECT_EQ(c->num_heads, 4);
  EXPECT_EQ(c->num_kv_heads, 2);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_FLOAT_EQ(c->rms_norm_eps, 1e-5f);
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_EQ(c->max_position_embeddings, 4096);
  EXPECT_FALSE(c->tie_word_embeddings);
}

TEST(LlamaConfigTest, DefaultsKvHeadsHeadDimAndTheta) {
  json j = BaseConfig();
  j.erase("num_key_value_heads");
  j.erase("rope_theta");
  j["tie_word_embeddings"] = true;
  auto c = Parse(j);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->num_kv_heads, 4);
  EXPECT_EQ(c->head_dim, 16);
  EXPECT_EQ(c->rope_theta, 10000.0);
  EXPECT_TRUE(c->tie_word_embeddings);
  j["head_dim"] = 32;  // explicit head_dim wins over hidden / heads
  c = Parse(j);
  ASSERT_TRUE(c.ok());
  EXPECT_EQ(c->head_dim, 32);
}

TEST(LlamaConfigTest, AcceptsBothRopeForms) {
  json old_form = BaseConfig();
  old_form["rope_theta"] = 500000.0;
  old_form["rope_scaling"] = nullptr;
  auto a = Parse(old_form);
  ASSERT_TRUE(a.ok()) << a.status();
  EXPECT_EQ(a->rope_theta, 500000.0);
  json new_form = BaseConfig();
  new_form.erase("rope_theta");
  new_form["rope_parameters"] = {{"rope_theta", 50000.0}, {"rope_type", "default"}};
  auto b = Parse(new_form);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_EQ(b->rope_theta, 50000.0);
}

TEST(LlamaConfigTest, ReadsBothFixtureConfigs) {
  const char* src = std::getenv("TOKENLAKE_SOURCE_DIR");
  const std::string dir = std::string(src != nullptr ? src : ".") + "/tests/fixtures/llama_tiny";
  auto m = LoadLlamaConfig(dir + "/model/config.json");
  ASSERT_TRUE(m.ok()) << m.status();
  EXPECT_EQ(m->rope_theta, 10000.0);  // rope_parameters form
  EXPECT_EQ(m->num_layers, 3);
  auto t = LoadLlamaConfig(dir + "/tied_bf16/config.json");
  ASSERT_TRUE(t.ok()) << t.status();
  EXPECT_EQ(t->rope_theta, 50000.0);  // rope_theta form
  EXPECT_TRUE(t->tie_word_embeddings);
  EXPECT_EQ(t->num_kv_heads, 1);
  EXPECT_FLOAT_EQ(t->rms_norm_eps, 1e-6f);
  EXPECT_EQ(LoadLlamaConfig(dir + "/nope.json").status().code(), absl::StatusCode::kNotFound);
}

TEST(LlamaConfigTest, RejectsMissingOrMistypedFields) {
  ExpectError(json::parse("[1]"), absl::StatusCode::kInvalidArgument, "not a JSON object");
  auto bad = ParseLlamaConfig("{oops", "cfg.json");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  for (const char* key : {"vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                          "num_attention_heads"}) {
    json j = BaseConfig();
    j.erase(key);
    ExpectError(j, absl::StatusCode::kInvalidArgument, std::string("missing field '") + key);
    j[key] = "12";
    ExpectError(j, absl::StatusCode::kInvalidArgument, std::string("'") + key + "' must be");
    j[key] = 0;
    ExpectError(j, absl::StatusCode::kInvalidArgument, "out of range");
  }
  json j = BaseConfig();
  j["num_key_value_heads"] = 3;
  ExpectError(j, absl::StatusCode::kInvalidArgument, "not a multiple of num_key_value_heads");
  j = BaseConfig();
  j["hidden_size"] = 66;
  ExpectError(j, absl::StatusCode::kInvalidArgument, "no head_dim");
  j = BaseConfig();
  j["head_dim"] = 15;
  ExpectError(j, absl::StatusCode::kInvalidArgument, "even");
  j = BaseConfig();
  j["rms_norm_eps"] = -1;
  ExpectError(j, absl::StatusCode::kInvalidArgument, "rms_norm_eps");
  j = BaseConfig();
  j["rope_theta"] = "big";
  ExpectError(j, absl::StatusCode::kInvalidArgument, "rope_theta");
  j = BaseConfig();
  j["tie_word_embeddings"] = 1;
  ExpectError(j, absl::StatusCode::kInvalidArgument, "tie_word_embeddings");
  j = BaseConfig();
  j["rope_parameters"] = {{"rope_theta", 20000.0}};
  ExpectError(j, absl::StatusCode::kInvalidArgument, "disagree");
}

TEST(LlamaConfigTest, RejectsUnsupportedArchitecturesAndFeatures) {
  json j = BaseConfig();
  j["architectures"] = {"MistralForCausalLM"};
  ExpectError(j, absl::StatusCode::kUnimplemented, "MistralForCausalLM");
  j.erase("architectures");
  ExpectError(j, absl::StatusCode::kUnimplemented, "Llama");
  j["model_type"] = "llama";
  EXPECT_TRUE(Parse(j).ok());
  j = BaseConfig();
  j["rope_scaling"] = {{"rope_type", "llama3"}, {"factor", 8.0}};
  ExpectError(j, absl::StatusCode::kUnimplemented, "llama3");
  j = BaseConfig();
  j["rope_parameters"] = {{"rope_theta", 10000.0}, {"rope_type", "yarn"}};
  ExpectError(j, absl::StatusCode::kUnimplemented, "yarn");
  j = BaseConfig();
  j["hidden_act"] = "gelu";
  ExpectError(j, absl::StatusCode::kUnimplemented, "hidden_act");
  j = BaseConfig();
  j["attention_bias"] = true;
  ExpectError(j, absl::StatusCode::kUnimplemented, "attention_bias");
  j = BaseConfig();
  j["mlp_bias"] = true;
  ExpectError(j, absl::StatusCode::kUnimplemented, "mlp_bias");
}

TEST(LlamaConfigTest, ConfigJsonReadsBackAsTheSameConfig) {
  for (bool tied : {false, true}) {
    const LlamaConfig c{.vocab_size = 32000,
                        .hidden_size = 4096,
                        .intermediate_size = 11008,
                        .num_layers = 32,
                        .num_heads = 32,
                        .num_kv_heads = 8,
                        .head_dim = 128,
                        .rms_norm_eps = 1e-5f,
                        .rope_theta = 500000.0,
                        .max_position_embeddings = 4096,
                        .tie_word_embeddings = tied};
    auto back = ParseLlamaConfig(LlamaConfigJson(c), "written");
    ASSERT_TRUE(back.ok()) << back.status();
    EXPECT_EQ(back->vocab_size, c.vocab_size);
    EXPECT_EQ(back->hidden_size, c.hidden_size);
    EXPECT_EQ(back->intermediate_size, c.intermediate_size);
    EXPECT_EQ(back->num_layers, c.num_layers);
    EXPECT_EQ(back->num_heads, c.num_heads);
    EXPECT_EQ(back->num_kv_heads, c.num_kv_heads);
    EXPECT_EQ(back->head_dim, c.head_dim);
    EXPECT_EQ(back->rms_norm_eps, c.rms_norm_eps);
    EXPECT_EQ(back->rope_theta, c.rope_theta);
    EXPECT_EQ(back->max_position_embeddings, c.max_position_embeddings);
    EXPECT_EQ(back->tie_word_embeddings, c.tie_word_embeddings);
    // The tensor list: 9 per layer, embed, norm and (untied) lm_head, shapes from the config.
    const std::vector<LlamaTensorSpec> specs = LlamaCheckpointTensors(c);
    EXPECT_EQ(specs.size(), 9u * 32 + 2 + (tied ? 0 : 1));
    EXPECT_EQ(specs[0].name, "model.embed_tokens.weight");
    EXPECT_EQ(specs[3].name, "model.layers.0.self_attn.k_proj.weight");
    EXPECT_EQ(specs[3].shape, (std::vector<int64_t>{1024, 4096}));
    EXPECT_EQ(specs[9].shape, (std::vector<int64_t>{4096, 11008}));  // down_proj
    EXPECT_TRUE(specs[1].is_norm());
    EXPECT_FALSE(specs[2].is_norm());
  }
}

}  // namespace
}  // namespace tokenlake::engine

namespace tokenlake::engine {
namespace {

// The published models' config.json values (Hugging Face meta-llama/Llama-2-7b-hf,
// LargeWorldModel/LWM-Text-1M, meta-llama/Meta-Llama-3-8B).
TEST(NamedLlamaConfigTest, PublishedShapesAndUnknownNames) {
  auto l2 = NamedLlamaConfig("llama2-7b");
  ASSERT_TRUE(l2.ok()) << l2.status();
  EXPECT_EQ(l2->vocab_size, 32000);
  EXPECT_EQ(l2->intermediate_size, 11008);
  EXPECT_EQ(l2->num_kv_heads, 32);
  EXPECT_EQ(l2->max_position_embeddings, 4096);
  auto lwm = NamedLlamaConfig("lwm-7b");
  ASSERT_TRUE(lwm.ok());
  EXPECT_EQ(lwm->hidden_size, 4096);
  EXPECT_EQ(lwm->num_layers, 32);
  EXPECT_EQ(lwm->max_position_embeddings, 1048576);
  EXPECT_EQ(lwm->rope_theta, 50000000.0);
  auto l3 = NamedLlamaConfig("llama3-8b");
  ASSERT_TRUE(l3.ok());
  EXPECT_EQ(l3->vocab_size, 128256);
  EXPECT_EQ(l3->intermediate_size, 14336);
  EXPECT_EQ(l3->num_heads, 32);
  EXPECT_EQ(l3->num_kv_heads, 8);
  EXPECT_EQ(l3->head_dim, 128);
  EXPECT_EQ(l3->rope_theta, 500000.0);
  const auto bad = NamedLlamaConfig("llama-9000");
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("valid: llama2-7b, lwm-7b, llama3-8b"), std::string::npos);
}

}  // namespace
}  // namespace tokenlake::engine
