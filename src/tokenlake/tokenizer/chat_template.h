// Chat templates: the Jinja template a checkpoint ships (chat_template.jinja, or chat_template in
// tokenizer_config.json) rendered over OpenAI-style messages, as transformers'
// apply_chat_template renders it. jinja.h lists the Jinja subset; a template outside it is
// refused when created, with the construct and its line and column.
//
//   auto tmpl = ChatTemplate::ForTokenizer(*tokenizer);
//   auto prompt = tmpl->Render(messages, {.add_generation_prompt = true,
//                                         .bos_token = "<|begin_of_text|>"});
//   auto ids = tokenizer->Encode(*prompt, /*add_special_tokens=*/false);
//
// Thread-safety: immutable after creation; Render may run concurrently.
#ifndef TOKENLAKE_TOKENIZER_CHAT_TEMPLATE_H_
#define TOKENLAKE_TOKENIZER_CHAT_TEMPLATE_H_

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "tokenlake/tokenizer/jinja.h"
#include "tokenlake/tokenizer/tokenizer.h"

namespace tokenlake::tokenizer {

struct ChatTemplateOptions {
  // End with the header that opens the assistant's turn.
  bool add_generation_prompt = true;
  // The template's bos_token / eos_token variables.
  std::string bos_token;
  std::string eos_token;
  // More variables (an object: tools, documents, template arguments); empty for none.
  jinja::Json extra_variables = jinja::Json::object();
};

class ChatTemplate {
 public:
  // Parses `source`; `source_name` (the file it came from) prefixes every error.
  // Errors: InvalidArgument (a syntax error), Unimplemented (Jinja outside the subset), both
  // naming line and column.
  static absl::StatusOr<ChatTemplate> Create(std::string_view source,
                                             const std::string& source_name);

  // The template of `tokenizer`'s folder. Errors: NotFound when it has none; else as Create.
  static absl::StatusOr<ChatTemplate> ForTokenizer(const Tokenizer& tokenizer);

  // Renders `messages` (an array of objects, each with a string "role" and a "content" that is
  // a string, null or an array of content parts; other fields are passed through).
  // Errors: InvalidArgument for messages of the wrong shape (naming the index and field), for a
  // template that calls raise_exception (the message is the template's own), or for an invalid
  // operation at run time (naming line and column).
  absl::StatusOr<std::string> Render(const jinja::Json& messages,
                                     const ChatTemplateOptions& options) const;

 private:
  explicit ChatTemplate(jinja::Template t) : template_(std::move(t)) {}
  jinja::Template template_;
};

}  // namespace tokenlake::tokenizer

#endif  // TOKENLAKE_TOKENIZER_CHAT_TEMPLATE_H_
