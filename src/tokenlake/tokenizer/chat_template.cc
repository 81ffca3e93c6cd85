#include "tokenlake/tokenizer/chat_template.h"

#include "absl/strings/str_cat.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::tokenizer {

absl::StatusOr<ChatTemplate> ChatTemplate::Create(std::string_view source,
                                                  const std::string& source_name) {
  TOKENLAKE_ASSIGN_OR_RETURN(jinja::Template t, jinja::Template::Parse(source, source_name));
  return ChatTemplate(std::move(t));
}

absl::StatusOr<ChatTemplate> ChatTemplate::ForTokenizer(const Tokenizer& tokenizer) {
  const TokenizerConfig& c = tokenizer.config();
  if (c.chat_template.empty()) {
    return absl::NotFoundError(
        absl::StrCat(tokenizer.source(),
                     ": the folder has no chat template (chat_template.jinja or "
                     "tokenizer_config.json's chat_template)"));
  }
  return Create(c.chat_template, c.chat_template_source);
}

absl::StatusOr<std::string> ChatTemplate::Render(const jinja::Json& messages,
                                                 const ChatTemplateOptions& options) const {
  if (!messages.is_array()) return absl::InvalidArgumentError("messages must be an array");
  for (size_t i = 0; i < messages.size(); ++i) {
    const jinja::Json& m = messages[i];
    if (!m.is_object()) {
      return absl::InvalidArgumentError(absl::StrCat("messages[", i, "] must be an object"));
    }
    if (!m.contains("role") || !m["role"].is_string()) {
      return absl::InvalidArgumentError(absl::StrCat("messages[", i, "].role must be a string"));
    }
    if (m.contains("content") && !m["content"].is_string() && !m["content"].is_null() &&
        !m["content"].is_array()) {
      return absl::InvalidArgumentError(
          absl::StrCat("messages[", i, "].content must be a string, null or an array"));
    }
  }
  if (!options.extra_variables.is_object()) {
    return absl::InvalidArgumentError("extra_variables must be an object");
  }
  jinja::Json context = options.extra_variables;
  context["messages"] = messages;
  context["add_generation_prompt"] = options.add_generation_prompt;
  context["bos_token"] = options.bos_token;
  context["eos_token"] = options.eos_token;
  return template_.Render(context);
}

}  // namespace tokenlake::tokenizer
