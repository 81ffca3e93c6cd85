// UTF-8 helpers shared by the tokenizers, the incremental decoder and the chat templates.
//
// Invalid input is replaced the way Python's `bytes.decode(errors="replace")` and Rust's
// `String::from_utf8_lossy` do it (and so Hugging Face's tokenizers): every maximal subpart of
// an ill-formed sequence becomes one U+FFFD (Unicode's recommended practice, chapter 3.9).
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_TOKENIZER_UTF8_H_
#define TOKENLAKE_TOKENIZER_UTF8_H_

#include <cstddef>
#include <cstdint>
#include <string>
#include <string_view>

#include "absl/status/status.h"

namespace tokenlake::tokenizer {

// U+FFFD REPLACEMENT CHARACTER, UTF-8 encoded.
inline constexpr std::string_view kReplacementChar = "\xEF\xBF\xBD";

// OK when `text` is well-formed UTF-8; otherwise InvalidArgument naming `what` and the byte
// offset of the first ill-formed sequence.
absl::Status ValidateUtf8(std::string_view text, std::string_view what);

// Appends `code_point` (REQUIRES: <= 0x10FFFF and not a surrogate) UTF-8 encoded to `out`.
void AppendCodePoint(uint32_t code_point, std::string* out);

// Decodes the code point starting at text[*pos] and advances *pos past it. Returns false (and
// advances *pos by the length of the maximal ill-formed subpart, at least 1) when the bytes there
// are not a well-formed character, including a sequence truncated by the end of `text`.
// REQUIRES: *pos < text.size().
bool DecodeCodePoint(std::string_view text, size_t* pos, uint32_t* code_point);

// Appends `bytes` to `out` with every maximal ill-formed subpart replaced by U+FFFD.
void AppendLossy(std::string_view bytes, std::string* out);

// The length of the longest prefix of `bytes` that is final: every character in it is
// complete, or ill-formed whatever bytes might follow. The rest (at most 3 bytes) is a
// well-formed but truncated sequence that later bytes may complete.
size_t FinalPrefixLength(std::string_view bytes);

}  // namespace tokenlake::tokenizer

#endif  // TOKENLAKE_TOKENIZER_UTF8_H_
