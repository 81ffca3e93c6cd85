// Tokenizers as a Hugging Face checkpoint folder ships them, and per-request incremental
// decoding.
//
//   auto tok = Tokenizer::FromDir("/models/llama-3-8b");          // tokenizer.json / .model
//   auto ids = (*tok)->Encode("Hello", /*add_special_tokens=*/true);  // [BOS, ...]
//   auto stream = (*tok)->NewDecodeStream(/*skip_special_tokens=*/true);
//   for (int32_t id : generated) stream->Push(id, &text_so_far);   // never half a character
//   stream->Finish(&text_so_far);
//
// Two kinds are read (tokenizer_json.h and sentencepiece_model.h say exactly what of each):
// `tokenizer.json` with a byte-level BPE model (GPT-2, Llama-3, Qwen style), and SentencePiece
// `tokenizer.model` files (Llama-2, LWM). `tokenizer_config.json`, when present, gives the BOS /
// EOS token strings and the chat template (chat_template.h renders it).
//
// Decoding is defined token by token: Decode(ids) is what a DecodeStream fed `ids` one at a
// time emits in total, so streamed and whole answers are equal by construction. Ids the
// tokenizer does not know (a model's embedding rows past the vocabulary) decode to nothing, as
// in Hugging Face's tokenizers.
//
// Thread-safety: a Tokenizer is immutable after creation and safe to share between threads; a
// DecodeStream belongs to one request and is not thread-safe.
#ifndef TOKENLAKE_TOKENIZER_TOKENIZER_H_
#define TOKENLAKE_TOKENIZER_TOKENIZER_H_

#include <cstdint>
#include <memory>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"

namespace tokenlake::tokenizer {

// Per-request decoder: fed token ids one at a time, emits text that never ends inside a UTF-8
// character (bytes of a character split across tokens are held until it is complete; bytes
// that cannot become a character are emitted as U+FFFD as soon as that is certain).
class DecodeStream {
 public:
  virtual ~DecodeStream() = default;
  // Appends to `*out` the text that `id` makes final (possibly nothing).
  virtual void Push(int32_t id, std::string* out) = 0;
  // Appends what is held back; an incomplete character at the end becomes U+FFFD. The stream
  // may be fed again afterwards, as a new sequence.
  virtual void Finish(std::string* out) = 0;
};

// What tokenizer_config.json (and generation_config.json) add to a tokenizer.
struct TokenizerConfig {
  // The BOS / EOS token strings (as chat templates use them); empty when not given.
  std::string bos_token;
  std::string eos_token;
  // Their ids, when the tokenizer knows the strings.
  std::optional<int32_t> bos_token_id;
  std::optional<int32_t> eos_token_id;
  // Ids that end generation: eos_token_id plus generation_config.json's eos_token_id(s).
  std::vector<int32_t> stop_token_ids;
  // The Jinja chat template: chat_template.jinja, else tokenizer_config.json's chat_template
  // (a string, or the entry named "default" of a list); empty when none.
  std::string chat_template;
  // Where chat_template came from (a file name), for error messages.
  std::string chat_template_source;
};

class Tokenizer {
 public:
  virtual ~Tokenizer() = default;

  // Loads the tokenizer of a checkpoint folder: tokenizer.json when present and of a kind this
  // module reads; otherwise tokenizer.model (a folder holding both, as Llama-2's do with a
  // SentencePiece-converted tokenizer.json, is read through tokenizer.model). Then
  // tokenizer_config.json, chat_template.jinja and generation_config.json if present.
  // Errors: NotFound (no tokenizer file), InvalidArgument (a file that is not what its name
  // says: bad JSON, a field of the wrong type; the message names the file and field),
  // Unimplemented (a feature this module does not implement: another model type, a normalizer,
  // a pre-tokenizer kind; named with its field).
  static absl::StatusOr<std::unique_ptr<Tokenizer>> FromDir(const std::string& dir);

  // Token ids of UTF-8 `text`. Added and special tokens written in the text are kept whole.
  // With `add_special_tokens`, the post-processor's tokens (BOS) are added.
  // Errors: InvalidArgument when `text` is not valid UTF-8 (naming the byte offset).
  virtual absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                                      bool add_special_tokens) const = 0;

  // A new per-request decoder. With `skip_special_tokens`, special tokens decode to nothing.
  virtual std::unique_ptr<DecodeStream> NewDecodeStream(bool skip_special_tokens) const = 0;

  // The text of `ids` (everything a DecodeStream emits for them, Finish included).
  std::string Decode(absl::Span<const int32_t> ids, bool skip_special_tokens) const;

  // One past the largest id the tokenizer knows (added tokens included).
  virtual int32_t vocab_size() const = 0;
  // The id of a token given as the tokenizer spells it (e.g. "<|eot_id|>", "Ġthe", "▁the").
  virtual std::optional<int32_t> TokenToId(std::string_view token) const = 0;
  // The token spelling of `id`, or nullopt for an id the tokenizer does not know.
  virtual std::optional<std::string> IdToToken(int32_t id) const = 0;
  // Whether `id` is a special token (skipped by skip_special_tokens).
  virtual bool IsSpecial(int32_t id) const = 0;

  const TokenizerConfig& config() const { return config_; }
  // Which file the tokenizer was read from.
  const std::string& source() const { return source_; }

 protected:
  TokenizerConfig config_;
  std::string source_;

  friend absl::StatusOr<std::unique_ptr<Tokenizer>> LoadWithConfig(std::unique_ptr<Tokenizer> tok,
                                                                   const std::string& dir);
};

// Reads tokenizer_config.json / chat_template.jinja / generation_config.json of `dir` into
// `tok`'s config (FromDir does this; exposed for tests that build a tokenizer from text).
// Errors: InvalidArgument naming the file and field.
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadWithConfig(std::unique_ptr<Tokenizer> tok,
                                                          const std::string& dir);

}  // namespace tokenlake::tokenizer

#endif  // TOKENLAKE_TOKENIZER_TOKENIZER_H_
