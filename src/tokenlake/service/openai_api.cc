#include "tokenlake/service/openai_api.h"

#include <cmath>
#include <limits>
#include <utility>

#include "absl/strings/ascii.h"
#include "absl/strings/cord.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"

namespace tokenlake::service {
namespace {

using nlohmann::json;
using ojson = nlohmann::ordered_json;

constexpr char kParamPayload[] = "tokenlake.openai/param";

// An InvalidArgument error about `param`.
absl::Status Bad(std::string_view param, std::string message) {
  absl::Status s = absl::InvalidArgumentError(std::move(message));
  s.SetPayload(kParamPayload, absl::Cord(absl::string_view(param.data(), param.size())));
  return s;
}

std::string TypeName(const ojson& j) { return j.type_name(); }

// The offset of the first byte that is not part of well-formed UTF-8, or npos.
size_t FirstInvalidUtf8(std::string_view s) {
  size_t i = 0;
  while (i < s.size()) {
    const auto c = static_cast<unsigned char>(s[i]);
    size_t n = 0;
    uint32_t lo = 0x80, hi = 0xBF;  // the range of the second byte
    if (c < 0x80) {
      ++i;
      continue;
    } else if (c >= 0xC2 && c <= 0xDF) {
      n = 1;
    } else if (c >= 0xE0 && c <= 0xEF) {
      n = 2;
      if (c == 0xE0) lo = 0xA0;  // no overlong forms
      if (c == 0xED) hi = 0x9F;  // no surrogates
    } else if (c >= 0xF0 && c <= 0xF4) {
      n = 3;
      if (c == 0xF0) lo = 0x90;
      if (c == 0xF4) hi = 0x8F;  // <= U+10FFFF
    } else {
      return i;
    }
    for (size_t k = 1; k <= n; ++k) {
      if (i + k >= s.size()) return i;
      const auto b = static_cast<unsigned char>(s[i + k]);
      const uint32_t l = k == 1 ? lo : 0x80, h = k == 1 ? hi : 0xBF;
      if (b < l || b > h) return i;
    }
    i += n + 1;
  }
  return std::string_view::npos;
}

// An integer field's value in [min, max].
absl::StatusOr<int64_t> IntIn(const ojson& v, std::string_view name, int64_t min, int64_t max) {
  if (!v.is_number_integer()) {
    return Bad(name, absl::StrFormat("field '%s' must be an integer, got %s", name, TypeName(v)));
  }
  const bool negative = !v.is_number_unsigned() && v.get<int64_t>() < 0;
  if (negative ? v.get<int64_t>() < min
               : v.get<uint64_t>() > static_cast<uint64_t>(std::max<int64_t>(max, 0))) {
    return Bad(name,
               absl::StrFormat("field '%s' = %s must be in [%d, %d]", name, v.dump(), min, max));
  }
  const int64_t x = negative ? v.get<int64_t>() : static_cast<int64_t>(v.get<uint64_t>());
  if (x < min || x > max) {
    return Bad(name,
               absl::StrFormat("field '%s' = %s must be in [%d, %d]", name, v.dump(), min, max));
  }
  return x;
}

absl::StatusOr<double> Number(const ojson& v, std::string_view name) {
  if (!v.is_number()) {
    return Bad(name, absl::StrFormat("field '%s' must be a number, got %s", name, TypeName(v)));
  }
  const double x = v.get<double>();
  if (!std::isfinite(x)) return Bad(name, absl::StrFormat("field '%s' must be finite", name));
  return x;
}

absl::StatusOr<std::vector<int32_t>> TokenIds(const ojson& v, std::string_view name,
                                              const CompletionLimits& limits) {
  if (v.empty()) return Bad("prompt", absl::StrFormat("field '%s' must not be empty", name));
  if (static_cast<int64_t>(v.size()) >= limits.context_tokens) {
    return Bad("prompt",
               absl::StrFormat("%s of %d tokens does not fit the model's context of %d tokens",
                               name, v.size(), limits.context_tokens));
  }
  std::vector<int32_t> ids;
  ids.reserve(v.size());
  for (size_t i = 0; i < v.size(); ++i) {
    const ojson& t = v[i];
    if (!t.is_number_integer()) {
      return Bad("prompt", absl::StrFormat("%s[%d] must be an integer token id, got %s", name, i,
                                           TypeName(t)));
    }
    const bool negative = !t.is_number_unsigned() && t.get<int64_t>() < 0;
    const uint64_t u = negative ? 0 : t.get<uint64_t>();
    if (negative || u >= static_cast<uint64_t>(limits.vocab_size)) {
      return Bad("prompt", absl::StrFormat("%s[%d] = %s is outside the vocabulary [0, %d)", name, i,
                                           t.dump(), limits.vocab_size));
    }
    ids.push_back(static_cast<int32_t>(u));
  }
  return ids;
}

// prompt: a string, an array of token ids, or a list of strings / token-id arrays.
absl::Status ParsePrompt(const ojson& v, const CompletionLimits& limits, OpenAiRequest* r) {
  auto one = [&](const ojson& p, const std::string& name) -> absl::Status {
    OpenAiPrompt prompt;
    if (p.is_string()) {
      prompt.is_text = true;
      prompt.text = p.get<std::string>();
      if (prompt.text.empty()) return Bad("prompt", name + " must not be empty");
    } else if (p.is_array()) {
      absl::StatusOr<std::vector<int32_t>> ids = TokenIds(p, name, limits);
      if (!ids.ok()) return ids.status();
      prompt.ids = *std::move(ids);
    } else {
      return Bad("prompt", absl::StrFormat("%s must be a string or an array of token ids, got %s",
                                           name, TypeName(p)));
    }
    r->prompts.push_back(std::move(prompt));
    return absl::OkStatus();
  };
  if (v.is_string()) return one(v, "prompt");
  if (!v.is_array()) {
    return Bad("prompt",
               absl::StrFormat("field 'prompt' must be a string, an array of token ids or a list "
                               "of either, got %s",
                               TypeName(v)));
  }
  if (v.empty()) return Bad("prompt", "field 'prompt' must not be empty");
  // A list of prompts when its first element is a string or an array; else one id array.
  if (!v[0].is_string() && !v[0].is_array()) return one(v, "prompt");
  constexpr size_t kMaxPrompts = 16;
  if (v.size() > kMaxPrompts) {
    return Bad("prompt",
               absl::StrFormat("at most %d prompts per request, got %d", kMaxPrompts, v.size()));
  }
  for (size_t i = 0; i < v.size(); ++i) {
    if (absl::Status s = one(v[i], absl::StrFormat("prompt[%d]", i)); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// The text of a message's content: a string, null, or an array of text parts.
absl::Status CheckContent(const ojson& content, size_t i) {
  if (content.is_string() || content.is_null()) return absl::OkStatus();
  if (!content.is_array()) {
    return Bad("messages", absl::StrFormat("messages[%d].content must be a string, null or an "
                                           "array of text parts, got %s",
                                           i, TypeName(content)));
  }
  for (size_t k = 0; k < content.size(); ++k) {
    const ojson& part = content[k];
    if (!part.is_object() || !part.contains("type") || part["type"] != "text" ||
        !part.contains("text") || !part["text"].is_string()) {
      return Bad("messages",
                 absl::StrFormat("messages[%d].content[%d] must be {\"type\": \"text\", \"text\": "
                                 "string} (only text is served)",
                                 i, k));
    }
  }
  return absl::OkStatus();
}

absl::Status ParseMessages(const ojson& v, OpenAiRequest* r) {
  if (!v.is_array()) {
    return Bad("messages",
               absl::StrFormat("field 'messages' must be an array, got %s", TypeName(v)));
  }
  if (v.empty()) return Bad("messages", "field 'messages' must not be empty");
  for (size_t i = 0; i < v.size(); ++i) {
    const ojson& m = v[i];
    if (!m.is_object()) {
      return Bad("messages",
                 absl::StrFormat("messages[%d] must be an object, got %s", i, TypeName(m)));
    }
    if (!m.contains("role") || !m["role"].is_string()) {
      return Bad("messages", absl::StrFormat("messages[%d].role must be a string", i));
    }
    const std::string role = m["role"].get<std::string>();
    if (role != "system" && role != "developer" && role != "user" && role != "assistant" &&
        role != "tool") {
      return Bad("messages",
                 absl::StrFormat("messages[%d].role '%s' is not one of system, developer, user, "
                                 "assistant, tool",
                                 i, role.substr(0, 64)));
    }
    if (!m.contains("content")) {
      return Bad("messages", absl::StrFormat("messages[%d].content is required", i));
    }
    if (absl::Status s = CheckContent(m["content"], i); !s.ok()) return s;
    for (auto it = m.begin(); it != m.end(); ++it) {
      const std::string& key = it.key();
      if (key == "role" || key == "content") continue;
      if (key == "name" && it.value().is_string()) continue;
      if (key == "tool_call_id" && it.value().is_string()) continue;
      return Bad("messages",
                 absl::StrFormat("messages[%d].%s is not served", i, key.substr(0, 64)));
    }
  }
  r->messages = v;
  return absl::OkStatus();
}

absl::Status ParseStop(const ojson& v, OpenAiRequest* r) {
  if (v.is_null()) return absl::OkStatus();
  constexpr size_t kMaxStops = 4;
  auto add = [&](const ojson& s, const std::string& name) -> absl::Status {
    if (!s.is_string()) {
      return Bad("stop", absl::StrFormat("%s must be a string, got %s", name, TypeName(s)));
    }
    if (s.get<std::string>().empty()) return Bad("stop", name + " must not be empty");
    r->stop.push_back(s.get<std::string>());
    return absl::OkStatus();
  };
  if (v.is_string()) return add(v, "field 'stop'");
  if (!v.is_array()) {
    return Bad("stop", absl::StrFormat("field 'stop' must be a string or a list of strings, got %s",
                                       TypeName(v)));
  }
  if (v.size() > kMaxStops) {
    return Bad("stop",
               absl::StrFormat("field 'stop' has %d sequences; at most %d", v.size(), kMaxStops));
  }
  for (size_t i = 0; i < v.size(); ++i) {
    if (absl::Status s = add(v[i], absl::StrFormat("stop[%d]", i)); !s.ok()) return s;
  }
  return absl::OkStatus();
}

// Fields that are accepted only at the value that leaves the answer unchanged.
absl::Status RequireNeutral(const std::string& key, const ojson& v) {
  auto refuse = [&](std::string_view why) {
    return Bad(key, absl::StrFormat(
                        "field '%s' = %s is not served (%s)", key,
                        v.dump(-1, ' ', false, json::error_handler_t::replace).substr(0, 64), why));
  };
  if (key == "n" || key == "best_of") {
    if (v.is_null() || (v.is_number_integer() && v.get<int64_t>() == 1)) return absl::OkStatus();
    return refuse("one choice per prompt: send n = 1");
  }
  if (key == "frequency_penalty" || key == "presence_penalty") {
    if (v.is_null() || (v.is_number() && v.get<double>() == 0.0)) return absl::OkStatus();
    return refuse("penalties are not implemented: send 0");
  }
  if (key == "logit_bias") {
    if (v.is_null() || (v.is_object() && v.empty())) return absl::OkStatus();
    return refuse("logit_bias is not implemented");
  }
  if (key == "logprobs" || key == "top_logprobs") {
    if (v.is_null() || (v.is_boolean() && !v.get<bool>()) ||
        (v.is_number_integer() && v.get<int64_t>() == 0)) {
      return absl::OkStatus();
    }
    return refuse("log probabilities are not returned");
  }
  if (key == "echo") {
    if (v.is_null() || (v.is_boolean() && !v.get<bool>())) return absl::OkStatus();
    return refuse("the prompt is not echoed");
  }
  if (key == "suffix") {
    if (v.is_null()) return absl::OkStatus();
    return refuse("insertion is not served");
  }
  if (key == "tools" || key == "functions") {
    if (v.is_null() || (v.is_array() && v.empty())) return absl::OkStatus();
    return refuse("tool calls are not served");
  }
  if (key == "tool_choice") {
    if (v.is_null() || v == "none") return absl::OkStatus();
    return refuse("tool calls are not served");
  }
  if (key == "response_format") {
    if (v.is_null() ||
        (v.is_object() && v.contains("type") && v["type"] == "text" && v.size() == 1)) {
      return absl::OkStatus();
    }
    return refuse("only text responses are served");
  }
  return absl::UnknownError("not a neutral-only field");
}

}  // namespace

absl::Status WithParam(absl::Status status, std::string_view param) {
  status.SetPayload(kParamPayload, absl::Cord(absl::string_view(param.data(), param.size())));
  return status;
}

std::string ParamOf(const absl::Status& status) {
  const auto p = status.GetPayload(kParamPayload);
  return p.has_value() ? std::string(*p) : std::string();
}

absl::StatusOr<OpenAiRequest> ParseOpenAiRequest(std::string_view body, OpenAiEndpoint endpoint,
                                                 const CompletionLimits& limits) {
  if (const size_t bad = FirstInvalidUtf8(body); bad != std::string_view::npos) {
    return Bad("", absl::StrFormat("request body is not valid UTF-8 (byte %d)", bad));
  }
  ojson j = ojson::parse(body.begin(), body.end(), nullptr, /*allow_exceptions=*/false);
  if (j.is_discarded()) return Bad("", "request body is not valid JSON");
  if (!j.is_object()) {
    return Bad("", absl::StrFormat("request body must be a JSON object, got %s", TypeName(j)));
  }
  const bool chat = endpoint == OpenAiEndpoint::kChatCompletions;
  OpenAiRequest r;
  r.endpoint = endpoint;
  bool have_input = false;
  bool have_stream_options = false;
  for (auto it = j.begin(); it != j.end(); ++it) {
    const std::string& key = it.key();
    const ojson& v = it.value();
    if (!chat && key == "prompt") {
      if (absl::Status s = ParsePrompt(v, limits, &r); !s.ok()) return s;
      have_input = true;
    } else if (chat && key == "messages") {
      if (absl::Status s = ParseMessages(v, &r); !s.ok()) return s;
      have_input = true;
    } else if (key == "max_tokens" || (chat && key == "max_completion_tokens")) {
      if (v.is_null()) continue;
      absl::StatusOr<int64_t> n = IntIn(v, key, 1, limits.max_tokens_limit);
      if (!n.ok()) return n.status();
      r.max_tokens = static_cast<int32_t>(*n);
    } else if (key == "model") {
      if (!v.is_string()) {
        return Bad(key, absl::StrFormat("field 'model' must be a string, got %s", TypeName(v)));
      }
      r.model = v.get<std::string>();
    } else if (key == "temperature") {
      if (v.is_null()) continue;
      absl::StatusOr<double> t = Number(v, key);
      if (!t.ok()) return t.status();
      if (*t < 0 || *t > 2) {
        return Bad(key, absl::StrFormat("field 'temperature' = %s must be in [0, 2]", v.dump()));
      }
      r.temperature = static_cast<float>(*t);
    } else if (key == "top_p") {
      if (v.is_null()) continue;
      absl::StatusOr<double> p = Number(v, key);
      if (!p.ok()) return p.status();
      if (!(*p > 0 && *p <= 1)) {
        return Bad(key, absl::StrFormat("field 'top_p' = %s must be in (0, 1]", v.dump()));
      }
      r.top_p = static_cast<float>(*p);
    } else if (key == "top_k") {
      if (v.is_null()) continue;
      absl::StatusOr<int64_t> k = IntIn(v, key, -1, std::numeric_limits<int32_t>::max());
      if (!k.ok()) return k.status();
      r.top_k = static_cast<int32_t>(std::max<int64_t>(0, *k));
    } else if (key == "seed") {
      if (v.is_null()) continue;
      if (!v.is_number_integer()) {
        return Bad(key, absl::StrFormat("field 'seed' must be an integer, got %s", TypeName(v)));
      }
      r.seed = v.is_number_unsigned() ? v.get<uint64_t>() : static_cast<uint64_t>(v.get<int64_t>());
    } else if (key == "stop") {
      if (absl::Status s = ParseStop(v, &r); !s.ok()) return s;
    } else if (key == "cache_salt") {
      if (v.is_null()) continue;
      if (!v.is_string() || v.get<std::string>().empty() || v.get<std::string>().size() > 512) {
        return Bad(key, absl::StrFormat(
                            "field 'cache_salt' must be a non-empty string of at most 512 bytes, "
                            "got %s",
                            TypeName(v)));
      }
      r.cache_salt = v.get<std::string>();
    } else if (key == "stream") {
      if (v.is_null()) continue;
      if (!v.is_boolean()) {
        return Bad(key, absl::StrFormat("field 'stream' must be a boolean, got %s", TypeName(v)));
      }
      r.stream = v.get<bool>();
    } else if (key == "stream_options") {
      if (v.is_null()) continue;
      if (!v.is_object()) {
        return Bad(
            key, absl::StrFormat("field 'stream_options' must be an object, got %s", TypeName(v)));
      }
      for (auto o = v.begin(); o != v.end(); ++o) {
        if (o.key() != "include_usage" || !o.value().is_boolean()) {
          return Bad(key, absl::StrFormat("stream_options.%s is not served (include_usage: "
                                          "boolean is)",
                                          o.key().substr(0, 64)));
        }
        r.include_usage = o.value().get<bool>();
      }
      have_stream_options = true;
    } else if (key == "user") {
      if (!v.is_string() && !v.is_null()) {
        return Bad(key, absl::StrFormat("field 'user' must be a string, got %s", TypeName(v)));
      }
    } else if (chat && key == "parallel_tool_calls") {
      if (!v.is_boolean() && !v.is_null()) {
        return Bad(key, "field 'parallel_tool_calls' must be a boolean");
      }
    } else if (absl::Status n = RequireNeutral(key, v); n.code() != absl::StatusCode::kUnknown) {
      if (!n.ok()) return n;
      if (!chat && (key == "tools" || key == "functions" || key == "tool_choice" ||
                    key == "response_format" || key == "top_logprobs")) {
        return Bad(key, absl::StrFormat("unknown field '%s' for /v1/completions", key));
      }
      if (chat && (key == "echo" || key == "suffix" || key == "best_of")) {
        return Bad(key, absl::StrFormat("unknown field '%s' for /v1/chat/completions", key));
      }
    } else {
      return Bad(key, absl::StrFormat("unknown field '%s'", key.substr(0, 64)));
    }
  }
  if (!have_input) {
    return chat ? Bad("messages", "field 'messages' is required")
                : Bad("prompt", "field 'prompt' is required");
  }
  if (have_stream_options && !r.stream) {
    return Bad("stream_options", "field 'stream_options' is only allowed with stream: true");
  }
  return r;
}

namespace {

const char* ObjectName(OpenAiEndpoint e, bool chunk) {
  if (e == OpenAiEndpoint::kCompletions) return "text_completion";
  return chunk ? "chat.completion.chunk" : "chat.completion";
}

ojson UsageJson(const OpenAiUsage& u) {
  return {{"prompt_tokens", u.prompt_tokens},
          {"completion_tokens", u.completion_tokens},
          {"total_tokens", u.prompt_tokens + u.completion_tokens},
          {"prompt_tokens_details", {{"cached_tokens", u.cached_tokens}}}};
}

ojson HeaderJson(const OpenAiAnswerHeader& h, bool chunk) {
  return {{"id", h.id},
          {"object", ObjectName(h.endpoint, chunk)},
          {"created", h.created_unix_s},
          {"model", h.model}};
}

std::string Dump(const ojson& j) { return j.dump(-1, ' ', false, json::error_handler_t::replace); }

std::string Event(const ojson& j) { return absl::StrCat("data: ", Dump(j), "\n\n"); }

std::string CodeName(absl::StatusCode code) {
  std::string s = absl::StatusCodeToString(code);
  absl::AsciiStrToLower(&s);
  return s;
}

ojson ErrorObject(const absl::Status& status) {
  const int http = HttpStatusFor(status);
  const std::string param = ParamOf(status);
  return {{"error",
           {{"message", std::string(status.message())},
            {"type", http < 500 ? "invalid_request_error" : "server_error"},
            {"param", param.empty() ? ojson(nullptr) : ojson(param)},
            {"code", CodeName(status.code())}}}};
}

}  // namespace

std::string OpenAiResponseJson(const OpenAiAnswerHeader& header,
                               const std::vector<OpenAiChoice>& choices, const OpenAiUsage& usage,
                               const json& extra) {
  ojson j = HeaderJson(header, /*chunk=*/false);
  ojson out = ojson::array();
  for (const OpenAiChoice& c : choices) {
    if (header.endpoint == OpenAiEndpoint::kCompletions) {
      out.push_back({{"index", c.index},
                     {"text", c.text},
                     {"tokens", c.tokens},
                     {"logprobs", nullptr},
                     {"finish_reason", c.finish_reason}});
    } else {
      out.push_back({{"index", c.index},
                     {"message", {{"role", "assistant"}, {"content", c.text}}},
                     {"logprobs", nullptr},
                     {"finish_reason", c.finish_reason}});
    }
  }
  j["choices"] = std::move(out);
  j["usage"] = UsageJson(usage);
  if (extra.is_object()) {
    for (auto it = extra.begin(); it != extra.end(); ++it) j[it.key()] = ojson::parse(it->dump());
  }
  return Dump(j);
}

std::string OpenAiChunkEvent(const OpenAiAnswerHeader& header, int32_t index, std::string_view text,
                             std::string_view finish_reason, bool role_delta,
                             const std::vector<int32_t>& tokens) {
  ojson j = HeaderJson(header, /*chunk=*/true);
  const ojson finish = finish_reason.empty() ? ojson(nullptr) : ojson(std::string(finish_reason));
  if (header.endpoint == OpenAiEndpoint::kCompletions) {
    j["choices"] = ojson::array({{{"index", index},
                                  {"text", std::string(text)},
                                  {"logprobs", nullptr},
                                  {"finish_reason", finish}}});
    if (!tokens.empty()) j["choices"][0]["tokens"] = tokens;
  } else {
    ojson delta = ojson::object();
    if (role_delta) {
      delta = {{"role", "assistant"}, {"content", ""}};
    } else if (!text.empty() || finish_reason.empty()) {
      delta = {{"content", std::string(text)}};
    }
    j["choices"] = ojson::array(
        {{{"index", index}, {"delta", delta}, {"logprobs", nullptr}, {"finish_reason", finish}}});
  }
  return Event(j);
}

std::string OpenAiUsageEvent(const OpenAiAnswerHeader& header, const OpenAiUsage& usage) {
  ojson j = HeaderJson(header, /*chunk=*/true);
  j["choices"] = ojson::array();
  j["usage"] = UsageJson(usage);
  return Event(j);
}

std::string OpenAiDoneEvent() { return "data: [DONE]\n\n"; }

std::string OpenAiErrorEvent(const absl::Status& status) { return Event(ErrorObject(status)); }

std::string OpenAiErrorJson(const absl::Status& status) { return Dump(ErrorObject(status)); }

std::string OpenAiModelsJson(std::string_view model_id, int64_t created_unix_s) {
  ojson j = {{"object", "list"},
             {"data", ojson::array({{{"id", std::string(model_id)},
                                     {"object", "model"},
                                     {"created", created_unix_s},
                                     {"owned_by", "tokenlake"}}})}};
  return Dump(j);
}

}  // namespace tokenlake::service
