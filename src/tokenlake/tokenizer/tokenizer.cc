#include "tokenlake/tokenizer/tokenizer.h"

#include <algorithm>
#include <filesystem>
#include <fstream>
#include <sstream>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/tokenizer/sentencepiece_model.h"
#include "tokenlake/tokenizer/tokenizer_json.h"

namespace tokenlake::tokenizer {
namespace {

using json = nlohmann::json;
namespace fs = std::filesystem;

absl::StatusOr<std::string> ReadFile(const fs::path& path) {
  std::ifstream in(path, std::ios::binary);
  if (!in) return absl::NotFoundError(absl::StrCat(path.string(), ": cannot read"));
  std::stringstream buf;
  buf << in.rdbuf();
  return buf.str();
}

absl::StatusOr<json> ReadJsonIfPresent(const fs::path& path) {
  if (!fs::exists(path)) return json();
  TOKENLAKE_ASSIGN_OR_RETURN(std::string text, ReadFile(path));
  json j = json::parse(text, nullptr, false);
  if (j.is_discarded() || !j.is_object()) {
    return absl::InvalidArgumentError(absl::StrCat(path.string(), ": not a JSON object"));
  }
  return j;
}

// A token given as a string or as an AddedToken object {"content": ...}; "" when absent.
absl::StatusOr<std::string> TokenString(const json& cfg, const char* key, const std::string& src) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return std::string();
  if (it->is_string()) return it->get<std::string>();
  if (it->is_object() && it->contains("content") && (*it)["content"].is_string()) {
    return (*it)["content"].get<std::string>();
  }
  return absl::InvalidArgumentError(
      absl::StrCat(src, ": field '", key, "' must be a string or an object with 'content'"));
}

absl::StatusOr<bool> BoolField(const json& cfg, const char* key, bool default_value,
                               const std::string& src) {
  auto it = cfg.find(key);
  if (it == cfg.end() || it->is_null()) return default_value;
  if (!it->is_boolean()) {
    return absl::InvalidArgumentError(absl::StrCat(src, ": field '", key, "' must be a boolean"));
  }
  return it->get<bool>();
}

// tokenizer_config.json's added_tokens_decoder: {"32000": {"content": ..., "special": ...}}.
absl::StatusOr<std::vector<AddedToken>> AddedTokensDecoder(const json& cfg,
                                                           const std::string& src) {
  std::vector<AddedToken> tokens;
  auto it = cfg.find("added_tokens_decoder");
  if (it == cfg.end() || it->is_null()) return tokens;
  if (!it->is_object()) {
    return absl::InvalidArgumentError(
        absl::StrCat(src, ": field 'added_tokens_decoder' must be an object"));
  }
  for (auto t = it->begin(); t != it->end(); ++t) {
    const std::string field = absl::StrCat("added_tokens_decoder['", t.key(), "']");
    AddedToken token;
    if (!absl::SimpleAtoi(t.key(), &token.id) || token.id < 0) {
      return absl::InvalidArgumentError(absl::StrCat(src, ": ", field, ": key is not an id"));
    }
    const json& v = t.value();
    if (!v.is_object() || !v.contains("content") || !v["content"].is_string()) {
      return absl::InvalidArgumentError(
          absl::StrCat(src, ": field '", field, "' needs a string 'content'"));
    }
    token.content = v["content"].get<std::string>();
    token.special = v.value("special", false);
    token.lstrip = v.value("lstrip", false);
    token.rstrip = v.value("rstrip", false);
    token.single_word = v.value("single_word", false);
    tokens.push_back(std::move(token));
  }
  return tokens;
}

}  // namespace

std::string Tokenizer::Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const {
  std::string out;
  auto stream = NewDecodeStream(skip_special_tokens);
  for (int32_t id : ids) stream->Push(id, &out);
  stream->Finish(&out);
  return out;
}

absl::StatusOr<std::unique_ptr<Tokenizer>> Tokenizer::FromDir(const std::string& dir) {
  const fs::path root(dir);
  const fs::path json_path = root / "tokenizer.json";
  const fs::path model_path = root / "tokenizer.model";
  const fs::path config_path = root / "tokenizer_config.json";
  TOKENLAKE_ASSIGN_OR_RETURN(json cfg, ReadJsonIfPresent(config_path));
  if (cfg.is_null()) cfg = json::object();

  std::unique_ptr<Tokenizer> tok;
  if (fs::exists(json_path)) {
    TOKENLAKE_ASSIGN_OR_RETURN(std::string text, ReadFile(json_path));
    auto parsed = ParseTokenizerJson(text, json_path.string());
    if (parsed.ok()) {
      tok = std::move(parsed).value();
      tok->source_ = json_path.string();
    } else if (!absl::IsUnimplemented(parsed.status()) || !fs::exists(model_path)) {
      return parsed.status();
    }  // else a kind this module does not read: tokenizer.model is read instead
  }
  if (tok == nullptr) {
    if (!fs::exists(model_path)) {
      return absl::NotFoundError(
          absl::StrCat(dir, ": no tokenizer.json or tokenizer.model in the folder"));
    }
    SentencePieceOptions options;
    const std::string src = config_path.string();
    TOKENLAKE_ASSIGN_OR_RETURN(options.add_bos_token, BoolField(cfg, "add_bos_token", true, src));
    TOKENLAKE_ASSIGN_OR_RETURN(options.add_eos_token, BoolField(cfg, "add_eos_token", false, src));
    TOKENLAKE_ASSIGN_OR_RETURN(options.added_tokens, AddedTokensDecoder(cfg, src));
    TOKENLAKE_ASSIGN_OR_RETURN(tok, LoadSentencePieceModel(model_path.string(), options));
    tok->source_ = model_path.string();
  }
  return LoadWithConfig(std::move(tok), dir);
}

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadWithConfig(std::unique_ptr<Tokenizer> tok,
                                                          const std::string& dir) {
  const fs::path root(dir);
  const fs::path config_path = root / "tokenizer_config.json";
  const std::string src = config_path.string();
  TOKENLAKE_ASSIGN_OR_RETURN(json cfg, ReadJsonIfPresent(config_path));
  if (cfg.is_null()) cfg = json::object();
  TokenizerConfig& c = tok->config_;
  TOKENLAKE_ASSIGN_OR_RETURN(c.bos_token, TokenString(cfg, "bos_token", src));
  TOKENLAKE_ASSIGN_OR_RETURN(c.eos_token, TokenString(cfg, "eos_token", src));
  if (!c.bos_token.empty()) c.bos_token_id = tok->TokenToId(c.bos_token);
  if (!c.eos_token.empty()) c.eos_token_id = tok->TokenToId(c.eos_token);
  if (c.eos_token_id) c.stop_token_ids.push_back(*c.eos_token_id);

  const fs::path gen_path = root / "generation_config.json";
  TOKENLAKE_ASSIGN_OR_RETURN(json gen, ReadJsonIfPresent(gen_path));
  if (gen.is_object() && gen.contains("eos_token_id") && !gen["eos_token_id"].is_null()) {
    const json& e = gen["eos_token_id"];
    std::vector<json> ids = e.is_array() ? std::vector<json>(e.begin(), e.end()) : std::vector{e};
    for (const json& id : ids) {
      if (!id.is_number_integer()) {
        return absl::InvalidArgumentError(absl::StrCat(
            gen_path.string(), ": field 'eos_token_id' must be an integer or a list of them"));
      }
      const auto v = id.get<int32_t>();
      if (std::find(c.stop_token_ids.begin(), c.stop_token_ids.end(), v) ==
          c.stop_token_ids.end()) {
        c.stop_token_ids.push_back(v);
      }
    }
  }

  const fs::path jinja_path = root / "chat_template.jinja";
  if (fs::exists(jinja_path)) {
    TOKENLAKE_ASSIGN_OR_RETURN(c.chat_template, ReadFile(jinja_path));
    c.chat_template_source = jinja_path.string();
  } else if (cfg.contains("chat_template") && !cfg["chat_template"].is_null()) {
    const json& t = cfg["chat_template"];
    c.chat_template_source = src;
    if (t.is_string()) {
      c.chat_template = t.get<std::string>();
    } else if (t.is_array()) {
      std::string names;
      for (const json& entry : t) {
        if (!entry.is_object() || !entry.contains("name") || !entry.contains("template") ||
            !entry["name"].is_string() || !entry["template"].is_string()) {
          return absl::InvalidArgumentError(absl::StrCat(
              src, ": field 'chat_template' entries need a string 'name' and 'template'"));
        }
        if (entry["name"] == "default") c.chat_template = entry["template"].get<std::string>();
        absl::StrAppend(&names, names.empty() ? "" : ", ", entry["name"].get<std::string>());
      }
      if (c.chat_template.empty()) {
        return absl::InvalidArgumentError(absl::StrCat(
            src, ": field 'chat_template' has no template named 'default' (has: ", names, ")"));
      }
    } else {
      return absl::InvalidArgumentError(
          absl::StrCat(src, ": field 'chat_template' must be a string or a list"));
    }
  }
  return tok;
}

}  // namespace tokenlake::tokenizer
