#include "tokenlake/tokenizer/added_vocabulary.h"

#include <algorithm>

#include "tokenlake/tokenizer/utf8.h"

namespace tokenlake::tokenizer {
namespace {

// The code point that ends at text[end) (text valid UTF-8, end > 0), and where it starts.
uint32_t LastCodePoint(std::string_view text, size_t end, size_t* start) {
  size_t s = end - 1;
  while (s > 0 && (static_cast<uint8_t>(text[s]) & 0xC0) == 0x80) --s;
  size_t pos = s;
  uint32_t cp = 0xFFFD;
  DecodeCodePoint(text, &pos, &cp);
  *start = s;
  return cp;
}

// A word character for single_word tokens: letters, digits and '_' (non-ASCII code points
// other than whitespace count as letters; single_word is rare in chat models' vocabularies).
bool IsWordChar(uint32_t cp) {
  if (cp < 0x80) {
    return (cp >= 'a' && cp <= 'z') || (cp >= 'A' && cp <= 'Z') || (cp >= '0' && cp <= '9') ||
           cp == '_';
  }
  return !IsUnicodeWhitespace(cp);
}

}  // namespace

bool IsUnicodeWhitespace(uint32_t cp) {
  return (cp >= 0x09 && cp <= 0x0D) || cp == 0x20 || cp == 0x85 || cp == 0xA0 || cp == 0x1680 ||
         (cp >= 0x2000 && cp <= 0x200A) || cp == 0x2028 || cp == 0x2029 || cp == 0x202F ||
         cp == 0x205F || cp == 0x3000;
}

AddedVocabulary::AddedVocabulary(std::vector<AddedToken> tokens) : by_first_byte_(256) {
  for (AddedToken& t : tokens) {
    if (t.content.empty()) continue;
    by_id_[t.id] = tokens_.size();
    by_content_.emplace(t.content, tokens_.size());
    tokens_.push_back(std::move(t));
  }
  for (size_t i = 0; i < tokens_.size(); ++i) {
    by_first_byte_[static_cast<uint8_t>(tokens_[i].content[0])].push_back(i);
  }
  for (auto& list : by_first_byte_) {
    std::stable_sort(list.begin(), list.end(), [this](size_t a, size_t b) {
      return tokens_[a].content.size() > tokens_[b].content.size();
    });
  }
}

std::vector<AddedVocabulary::Piece> AddedVocabulary::Split(std::string_view text) const {
  std::vector<Piece> pieces;
  if (tokens_.empty()) {
    if (!text.empty()) pieces.push_back({text, -1});
    return pieces;
  }
  size_t done = 0;  // text[0, done) is already in `pieces`
  size_t pos = 0;
  while (pos < text.size()) {
    const AddedToken* match = nullptr;
    for (size_t i : by_first_byte_[static_cast<uint8_t>(text[pos])]) {
      const AddedToken& t = tokens_[i];
      if (text.compare(pos, t.content.size(), t.content) != 0) continue;
      if (t.single_word) {
        size_t s = 0;
        const size_t end = pos + t.content.size();
        const bool left_ok = pos == 0 || !IsWordChar(LastCodePoint(text, pos, &s));
        uint32_t next = 0;
        size_t p = end;
        const bool right_ok =
            end == text.size() || !DecodeCodePoint(text, &p, &next) || !IsWordChar(next);
        if (!left_ok || !right_ok) continue;
      }
      match = &t;  // the longest (lists are longest first)
      break;
    }
    if (match == nullptr) {
      ++pos;
      continue;
    }
    size_t start = pos;
    size_t stop = pos + match->content.size();
    if (match->lstrip) {
      while (start > done) {
        size_t s = 0;
        if (!IsUnicodeWhitespace(LastCodePoint(text, start, &s))) break;
        start = s;
      }
    }
    if (match->rstrip) {
      while (stop < text.size()) {
        size_t p = stop;
        uint32_t cp = 0;
        if (!DecodeCodePoint(text, &p, &cp) || !IsUnicodeWhitespace(cp)) break;
        stop = p;
      }
    }
    if (start > done) pieces.push_back({text.substr(done, start - done), -1});
    pieces.push_back({text.substr(start, stop - start), match->id});
    done = stop;
    pos = stop;
  }
  if (done < text.size()) pieces.push_back({text.substr(done), -1});
  return pieces;
}

const AddedToken* AddedVocabulary::FindId(int32_t id) const {
  auto it = by_id_.find(id);
  return it == by_id_.end() ? nullptr : &tokens_[it->second];
}

std::optional<int32_t> AddedVocabulary::FindContent(std::string_view content) const {
  auto it = by_content_.find(std::string(content));
  if (it == by_content_.end()) return std::nullopt;
  return tokens_[it->second].id;
}

}  // namespace tokenlake::tokenizer
