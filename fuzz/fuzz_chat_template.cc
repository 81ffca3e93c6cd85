// libFuzzer target: the chat templates' Jinja subset (tokenizer/jinja.h). Any input must parse
// or give a clear error, and a parsed template must render or give a clear error: no crash,
// no hang (the renderer bounds its steps and sizes).
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <string>

#include "tokenlake/tokenizer/chat_template.h"

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  using tokenlake::tokenizer::ChatTemplate;
  using tokenlake::tokenizer::jinja::Json;
  auto t = ChatTemplate::Create(std::string(reinterpret_cast<const char*>(data), size), "fuzz");
  if (!t.ok()) {
    if (t.status().message().empty()) std::abort();
    return 0;
  }
  static const Json* const messages = new Json(Json::parse(
      R"([{"role":"system","content":" Be brief. "},{"role":"user","content":"Hi 🙂"},
          {"role":"assistant","content":"Hello","meta":{"n":[1,2.5,null,true]}},
          {"role":"user","content":""}])"));
  tokenlake::tokenizer::ChatTemplateOptions options;
  options.bos_token = "<s>";
  options.eos_token = "</s>";
  auto out = t->Render(*messages, options);
  if (!out.ok() && out.status().message().empty()) std::abort();
  return 0;
}
