#include "tokenlake/tokenizer/utf8.h"

#include "absl/strings/str_cat.h"

namespace tokenlake::tokenizer {
namespace {

// The well-formed byte sequences (Unicode table 3-7): the lead byte fixes the length and the
// allowed range of the second byte; later bytes are 80..BF.
struct Lead {
  int length;  // 0: not a lead byte
  uint8_t second_lo;
  uint8_t second_hi;
};

Lead LeadOf(uint8_t b) {
  if (b < 0x80) return {1, 0, 0};
  if (b < 0xC2) return {0, 0, 0};
  if (b < 0xE0) return {2, 0x80, 0xBF};
  if (b == 0xE0) return {3, 0xA0, 0xBF};
  if (b == 0xED) return {3, 0x80, 0x9F};
  if (b < 0xF0) return {3, 0x80, 0xBF};
  if (b == 0xF0) return {4, 0x90, 0xBF};
  if (b < 0xF4) return {4, 0x80, 0xBF};
  if (b == 0xF4) return {4, 0x80, 0x8F};
  return {0, 0, 0};
}

// How the bytes at text[pos] read: kComplete (a whole character of `*length` bytes),
// kInvalid (an ill-formed subpart of `*length` bytes), kTruncated (`*length` bytes that are a
// well-formed prefix cut by the end of `text`).
enum class Read { kComplete, kInvalid, kTruncated };

Read ReadAt(std::string_view text, size_t pos, size_t* length, uint32_t* cp) {
  const auto b0 = static_cast<uint8_t>(text[pos]);
  const Lead lead = LeadOf(b0);
  if (lead.length == 0) {
    *length = 1;
    return Read::kInvalid;
  }
  if (lead.length == 1) {
    *length = 1;
    *cp = b0;
    return Read::kComplete;
  }
  uint32_t value = b0 & (0xFF >> (lead.length + 1));
  for (int i = 1; i < lead.length; ++i) {
    if (pos + i >= text.size()) {
      *length = i;
      return Read::kTruncated;
    }
    const auto b = static_cast<uint8_t>(text[pos + i]);
    const uint8_t lo = i == 1 ? lead.second_lo : 0x80;
    const uint8_t hi = i == 1 ? lead.second_hi : 0xBF;
    if (b < lo || b > hi) {
      *length = i;
      return Read::kInvalid;
    }
    value = (value << 6) | (b & 0x3F);
  }
  *length = lead.length;
  *cp = value;
  return Read::kComplete;
}

}  // namespace

absl::Status ValidateUtf8(std::string_view text, std::string_view what) {
  size_t pos = 0;
  while (pos < text.size()) {
    size_t length = 0;
    uint32_t cp = 0;
    if (ReadAt(text, pos, &length, &cp) != Read::kComplete) {
      return absl::InvalidArgumentError(
          absl::StrCat(std::string(what),
                       " is not valid UTF-8 (ill-formed byte sequence at byte offset ", pos, ")"));
    }
    pos += length;
  }
  return absl::OkStatus();
}

void AppendCodePoint(uint32_t cp, std::string* out) {
  if (cp < 0x80) {
    out->push_back(static_cast<char>(cp));
  } else if (cp < 0x800) {
    out->push_back(static_cast<char>(0xC0 | (cp >> 6)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else if (cp < 0x10000) {
    out->push_back(static_cast<char>(0xE0 | (cp >> 12)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  } else {
    out->push_back(static_cast<char>(0xF0 | (cp >> 18)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 12) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | ((cp >> 6) & 0x3F)));
    out->push_back(static_cast<char>(0x80 | (cp & 0x3F)));
  }
}

bool DecodeCodePoint(std::string_view text, size_t* pos, uint32_t* code_point) {
  size_t length = 0;
  const Read r = ReadAt(text, *pos, &length, code_point);
  *pos += length;
  return r == Read::kComplete;
}

void AppendLossy(std::string_view bytes, std::string* out) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t length = 0;
    uint32_t cp = 0;
    if (ReadAt(bytes, pos, &length, &cp) == Read::kComplete) {
      out->append(bytes.substr(pos, length));
    } else {
      out->append(kReplacementChar);
    }
    pos += length;
  }
}

size_t FinalPrefixLength(std::string_view bytes) {
  size_t pos = 0;
  while (pos < bytes.size()) {
    size_t length = 0;
    uint32_t cp = 0;
    if (ReadAt(bytes, pos, &length, &cp) == Read::kTruncated) return pos;
    pos += length;
  }
  return pos;
}

}  // namespace tokenlake::tokenizer
