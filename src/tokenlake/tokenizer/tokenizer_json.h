// Hugging Face `tokenizer.json` with a byte-level BPE model (GPT-2, Llama-3, Qwen-2 without its
// NFC normalizer, and their kin).
//
// Read: `added_tokens` (all fields; all are matched on the text before normalization, as
// Hugging Face does for `normalized: false` ones, which special tokens are); `normalizer` null,
// NFC, NFD, NFKC, NFKD (through ICU) or a Sequence of them (Qwen's NFC); `pre_tokenizer` ByteLevel
// (its GPT-2 regex when use_regex, add_prefix_space), Split with a Regex or String pattern and
// behavior Isolated or Removed (not inverted), and Sequence of these, with a ByteLevel step
// required somewhere; `model` BPE with vocab and merges (either "a b" strings or ["a", "b"] pairs),
// ignore_merges, unk_token, and no dropout, byte_fallback, continuing_subword_prefix or
// end_of_word_suffix; `post_processor` null, ByteLevel, TemplateProcessing (its `single`
// template) or a Sequence of them; `decoder` ByteLevel (or null, read as ByteLevel). Anything
// else is refused (Unimplemented, naming the field and the value).
//
// Regular expressions run on PCRE2 with Unicode properties (tokenizers uses Oniguruma; the
// patterns real tokenizers ship mean the same in both).
//
// Thread-safety: the returned tokenizer is immutable and safe to share.
#ifndef TOKENLAKE_TOKENIZER_TOKENIZER_JSON_H_
#define TOKENLAKE_TOKENIZER_TOKENIZER_JSON_H_

#include <memory>
#include <string>

#include "absl/status/statusor.h"
#include "tokenlake/tokenizer/tokenizer.h"

namespace tokenlake::tokenizer {

// Parses the text of a tokenizer.json; `source_name` (the path) prefixes every message.
// Errors: InvalidArgument (not JSON, a missing or mistyped field, a merge naming a token not in
// the vocabulary, a regex that does not compile), Unimplemented (see above).
absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(const std::string& json_text,
                                                              const std::string& source_name);

}  // namespace tokenlake::tokenizer

#endif  // TOKENLAKE_TOKENIZER_TOKENIZER_JSON_H_
