// Added tokens (special and not): found in text before any other tokenization and kept whole,
// as Hugging Face's AddedVocabulary does: leftmost-longest matches, `lstrip` / `rstrip` absorb
// the whitespace beside a match, `single_word` matches only between non-word characters.
//
// Thread-safety: immutable after construction.
#ifndef TOKENLAKE_TOKENIZER_ADDED_VOCABULARY_H_
#define TOKENLAKE_TOKENIZER_ADDED_VOCABULARY_H_

#include <cstdint>
#include <optional>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"

namespace tokenlake::tokenizer {

struct AddedToken {
  int32_t id = 0;
  std::string content;
  // Skipped by skip_special_tokens when decoding.
  bool special = false;
  // Absorb the whitespace on the left / right of a match.
  bool lstrip = false;
  bool rstrip = false;
  // Match only when not inside a word.
  bool single_word = false;
};

class AddedVocabulary {
 public:
  AddedVocabulary() = default;
  // Tokens with empty content are ignored.
  explicit AddedVocabulary(std::vector<AddedToken> tokens);

  // A stretch of text: an added token (id >= 0) or ordinary text (id == -1).
  struct Piece {
    std::string_view text;
    int32_t id = -1;
  };
  // Splits `text` (valid UTF-8) into added tokens and the ordinary text between them; empty
  // stretches of ordinary text are left out.
  std::vector<Piece> Split(std::string_view text) const;

  const AddedToken* FindId(int32_t id) const;
  std::optional<int32_t> FindContent(std::string_view content) const;
  const std::vector<AddedToken>& tokens() const { return tokens_; }

 private:
  std::vector<AddedToken> tokens_;
  absl::flat_hash_map<int32_t, size_t> by_id_;
  absl::flat_hash_map<std::string, size_t> by_content_;
  // For each first byte, the tokens starting with it, longest first.
  std::vector<std::vector<size_t>> by_first_byte_;
};

// Whether `cp` has Unicode's White_Space property (what Rust's char::is_whitespace tests).
bool IsUnicodeWhitespace(uint32_t cp);

}  // namespace tokenlake::tokenizer

#endif  // TOKENLAKE_TOKENIZER_ADDED_VOCABULARY_H_
