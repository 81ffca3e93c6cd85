// `tokenlake tokenize --model DIR TEXT`: the token ids of TEXT under the checkpoint folder's
// tokenizer, as one JSON object ({"ids": [...]}). With --chat, TEXT is a JSON array of messages
// rendered by the folder's chat template first ({"prompt": "...", "ids": [...]}); with --decode,
// TEXT is a JSON array of ids ({"text": "..."}). Needs the tokenizer module (libpcre2-dev);
// without it the command prints an error and exits 1.
#include <cstdio>
#include <memory>
#include <string>

#include "CLI/CLI.hpp"
#include "command.h"
#include "nlohmann/json.hpp"

#ifdef TOKENLAKE_HAVE_TOKENIZER
#include "tokenlake/tokenizer/chat_template.h"
#include "tokenlake/tokenizer/tokenizer.h"
#endif

namespace {

struct TokenizeFlags {
  std::string model_dir;
  std::string text;
  bool chat = false;
  bool decode = false;
  bool no_special_tokens = false;
};

#ifdef TOKENLAKE_HAVE_TOKENIZER
int Fail(const std::string& what, int code) {
  std::fprintf(stderr, "tokenlake tokenize: %s\n", what.c_str());
  return code;
}

int RunTokenize(const TokenizeFlags& flags) {
  using tokenlake::tokenizer::ChatTemplate;
  using tokenlake::tokenizer::Tokenizer;
  auto tok = Tokenizer::FromDir(flags.model_dir);
  if (!tok.ok()) return Fail(tok.status().ToString(), 1);
  nlohmann::ordered_json out;
  if (flags.decode) {
    const auto ids = nlohmann::json::parse(flags.text, nullptr, false);
    if (!ids.is_array()) return Fail("--decode takes a JSON array of token ids", 2);
    std::vector<int32_t> v;
    for (const auto& id : ids) {
      if (!id.is_number_integer()) return Fail("--decode takes a JSON array of token ids", 2);
      v.push_back(id.get<int32_t>());
    }
    out["text"] = (*tok)->Decode(v, flags.no_special_tokens);
  } else {
    std::string text = flags.text;
    bool add_special = !flags.no_special_tokens;
    if (flags.chat) {
      const auto messages = nlohmann::ordered_json::parse(flags.text, nullptr, false);
      if (messages.is_discarded()) return Fail("--chat takes a JSON array of messages", 2);
      auto tmpl = ChatTemplate::ForTokenizer(**tok);
      if (!tmpl.ok()) return Fail(tmpl.status().ToString(), 1);
      tokenlake::tokenizer::ChatTemplateOptions options;
      options.bos_token = (*tok)->config().bos_token;
      options.eos_token = (*tok)->config().eos_token;
      auto prompt = tmpl->Render(messages, options);
      if (!prompt.ok()) return Fail(prompt.status().ToString(), 2);
      text = *prompt;
      add_special = false;  // the template writes BOS itself, as transformers assumes
      out["prompt"] = text;
    }
    auto ids = (*tok)->Encode(text, add_special);
    if (!ids.ok()) return Fail(ids.status().ToString(), 2);
    out["ids"] = *ids;
  }
  std::printf("%s\n", out.dump().c_str());
  return 0;
}
#else
int RunTokenize(const TokenizeFlags&) {
  std::fprintf(stderr,
               "tokenlake tokenize: this build has no tokenizer module; install libpcre2-dev "
               "(scripts/install-deps.sh) and rebuild\n");
  return 1;
}
#endif

void SetUpTokenize(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<TokenizeFlags>();
  CLI::App* cmd = app.add_subcommand(
      "tokenize", "Token ids of a text (or a chat) under a checkpoint folder's tokenizer");
  cmd->add_option("--model", flags->model_dir,
                  "Checkpoint folder (tokenizer.json or tokenizer.model, tokenizer_config.json)")
      ->required();
  cmd->add_option("text", flags->text,
                  "The text; with --chat a JSON array of messages; with "
                  "--decode a JSON array of ids")
      ->required();
  cmd->add_flag("--chat", flags->chat, "Render TEXT (messages) with the chat template first");
  cmd->add_flag("--decode", flags->decode, "Decode TEXT (ids) instead");
  cmd->add_flag("--no-special-tokens", flags->no_special_tokens,
                "Do not add BOS; with --decode, leave special tokens out");
  cmd->callback([flags, exit_code] { *exit_code = RunTokenize(*flags); });
}

}  // namespace

TOKENLAKE_REGISTER_COMMAND(tokenize, SetUpTokenize);
