#include "tokenlake/tokenizer/spm_model.h"

#include <algorithm>
#include <cstring>
#include <queue>

#include "absl/strings/str_cat.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::tokenizer {
namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // U+2581 "▁"

// Protobuf wire format, enough for ModelProto: varints, fixed32, length-delimited fields.
class WireReader {
 public:
  WireReader(std::string_view data, const std::string& src, std::string what)
      : data_(data), src_(src), what_(std::move(what)) {}

  bool done() const { return pos_ >= data_.size(); }

  absl::Status Key(uint32_t* field, int* wire) {
    uint64_t key = 0;
    TOKENLAKE_RETURN_IF_ERROR(Varint(&key));
    *field = static_cast<uint32_t>(key >> 3);
    *wire = static_cast<int>(key & 7);
    if (*field == 0) return Bad("field number 0");
    return absl::OkStatus();
  }
  absl::Status Varint(uint64_t* v) {
    *v = 0;
    for (int shift = 0; shift < 64; shift += 7) {
      if (pos_ >= data_.size()) return Bad("truncated varint");
      const auto b = static_cast<uint8_t>(data_[pos_++]);
      *v |= static_cast<uint64_t>(b & 0x7F) << shift;
      if ((b & 0x80) == 0) return absl::OkStatus();
    }
    return Bad("varint longer than 10 bytes");
  }
  absl::Status Bytes(std::string_view* v) {
    uint64_t n = 0;
    TOKENLAKE_RETURN_IF_ERROR(Varint(&n));
    if (n > data_.size() - pos_) return Bad("length-delimited field past the end");
    *v = data_.substr(pos_, n);
    pos_ += n;
    return absl::OkStatus();
  }
  absl::Status Fixed32(uint32_t* v) {
    if (data_.size() - pos_ < 4) return Bad("truncated fixed32");
    std::memcpy(v, data_.data() + pos_, 4);  // little-endian, as x86 and ARM hosts are
    pos_ += 4;
    return absl::OkStatus();
  }
  absl::Status Skip(int wire) {
    uint64_t u = 0;
    std::string_view s;
    switch (wire) {
      case 0:
        return Varint(&u);
      case 1:
        if (data_.size() - pos_ < 8) return Bad("truncated fixed64");
        pos_ += 8;
        return absl::OkStatus();
      case 2:
        return Bytes(&s);
      case 5: {
        uint32_t f = 0;
        return Fixed32(&f);
      }
      default:
        return Bad(absl::StrCat("unsupported wire type ", wire));
    }
  }
  // Reads a value of the expected wire type, or fails naming the field.
  absl::Status Expect(int wire, int want, const char* field) {
    if (wire != want) return Bad(absl::StrCat("field '", field, "' has the wrong wire type"));
    return absl::OkStatus();
  }
  absl::Status Bad(const std::string& what) const {
    return absl::InvalidArgumentError(absl::StrCat(src_, ": not a SentencePiece model (", what_,
                                                   ": ", what, " at byte ", pos_, ")"));
  }

 private:
  std::string_view data_;
  size_t pos_ = 0;
  const std::string& src_;
  std::string what_;
};

absl::Status Unsupported(const std::string& src, const std::string& what) {
  return absl::UnimplementedError(absl::StrCat(src, ": ", what));
}

}  // namespace

absl::StatusOr<std::unique_ptr<SpmModel>> SpmModel::Parse(std::string_view serialized,
                                                          const std::string& src) {
  auto m = std::unique_ptr<SpmModel>(new SpmModel());
  std::fill(std::begin(m->byte_ids_), std::end(m->byte_ids_), -1);
  int model_type = 1;  // UNIGRAM, the proto's default
  bool whitespace_as_suffix = false;
  std::string normalizer_name;
  bool has_charsmap = false;
  std::string unk_piece = "<unk>", bos_piece = "<s>", eos_piece = "</s>";

  WireReader top(serialized, src, "ModelProto");
  while (!top.done()) {
    uint32_t field = 0;
    int wire = 0;
    TOKENLAKE_RETURN_IF_ERROR(top.Key(&field, &wire));
    if (field != 1 && field != 2 && field != 3) {
      TOKENLAKE_RETURN_IF_ERROR(top.Skip(wire));
      continue;
    }
    std::string_view body;
    TOKENLAKE_RETURN_IF_ERROR(top.Expect(wire, 2,
                                         field == 1   ? "pieces"
                                         : field == 2 ? "trainer_spec"
                                                      : "normalizer_spec"));
    TOKENLAKE_RETURN_IF_ERROR(top.Bytes(&body));
    WireReader r(body, src,
                 field == 1   ? "pieces"
                 : field == 2 ? "trainer_spec"
                              : "normalizer_spec");
    Piece piece;
    while (!r.done()) {
      uint32_t f = 0;
      int w = 0;
      TOKENLAKE_RETURN_IF_ERROR(r.Key(&f, &w));
      uint64_t v = 0;
      std::string_view s;
      uint32_t bits = 0;
      if (field == 1 && f == 1) {  // SentencePiece.piece
        TOKENLAKE_RETURN_IF_ERROR(r.Expect(w, 2, "piece"));
        TOKENLAKE_RETURN_IF_ERROR(r.Bytes(&s));
        piece.piece = std::string(s);
      } else if (field == 1 && f == 2) {  // score
        TOKENLAKE_RETURN_IF_ERROR(r.Expect(w, 5, "score"));
        TOKENLAKE_RETURN_IF_ERROR(r.Fixed32(&bits));
        std::memcpy(&piece.score, &bits, 4);
      } else if (field == 1 && f == 3) {  // type
        TOKENLAKE_RETURN_IF_ERROR(r.Expect(w, 0, "type"));
        TOKENLAKE_RETURN_IF_ERROR(r.Varint(&v));
        if (v < 1 || v > 6) return r.Bad(absl::StrCat("piece type ", v));
        piece.type = static_cast<PieceType>(v);
      } else if (field == 2 && (f == 3 || f == 24 || f == 35) && w == 0) {
        TOKENLAKE_RETURN_IF_ERROR(r.Varint(&v));
        if (f == 3) model_type = static_cast<int>(v);
        if (f == 24) whitespace_as_suffix = v != 0;
        if (f == 35) m->byte_fallback_ = v != 0;
      } else if (field == 2 && f >= 44 && f <= 47 && w == 2) {
        TOKENLAKE_RETURN_IF_ERROR(r.Bytes(&s));
        std::string* target[] = {&m->unk_surface_, &unk_piece, &bos_piece, &eos_piece};
        *target[f - 44] = std::string(s);
      } else if (field == 3 && (f == 1 || f == 2) && w == 2) {
        TOKENLAKE_RETURN_IF_ERROR(r.Bytes(&s));
        if (f == 1) normalizer_name = std::string(s);
        if (f == 2) has_charsmap = !s.empty();
      } else if (field == 3 && f >= 3 && f <= 5 && w == 0) {
        TOKENLAKE_RETURN_IF_ERROR(r.Varint(&v));
        bool* target[] = {&m->add_dummy_prefix_, &m->remove_extra_whitespaces_,
                          &m->escape_whitespaces_};
        *target[f - 3] = v != 0;
      } else {
        TOKENLAKE_RETURN_IF_ERROR(r.Skip(w));
      }
    }
    if (field == 1) m->pieces_.push_back(std::move(piece));
  }

  if (m->pieces_.empty()) return top.Bad("no pieces");
  if (model_type != 2) {
    return Unsupported(src, absl::StrCat("trainer_spec.model_type ", model_type,
                                         " is not supported (BPE, 2, only)"));
  }
  if (whitespace_as_suffix) {
    return Unsupported(src, "trainer_spec.treat_whitespace_as_suffix is not supported");
  }
  if (has_charsmap) {
    return Unsupported(src, absl::StrCat("normalizer_spec.name '", normalizer_name,
                                         "' is not supported (the identity rule only)"));
  }
  for (int id = 0; id < m->PieceSize(); ++id) {
    const Piece& p = m->pieces_[id];
    const bool mergeable = p.type == PieceType::kNormal || p.type == PieceType::kUserDefined ||
                           p.type == PieceType::kUnused;
    if (!(mergeable ? m->mergeable_ : m->reserved_).emplace(p.piece, id).second) {
      return Unsupported(src, absl::StrCat("piece '", p.piece, "' appears twice"));
    }
    if (p.type == PieceType::kUserDefined) m->user_defined_.push_back(p.piece);
    if (p.type == PieceType::kByte) {
      // "<0xNN>"
      unsigned b = 0;
      if (p.piece.size() != 6 || std::sscanf(p.piece.c_str(), "<0x%2X>", &b) != 1) {
        return top.Bad(absl::StrCat("byte piece '", p.piece, "'"));
      }
      m->byte_ids_[b] = id;
    }
  }
  std::sort(m->user_defined_.begin(), m->user_defined_.end(),
            [](const std::string& a, const std::string& b) { return a.size() > b.size(); });
  auto find = [&](const std::string& piece, PieceType type) {
    auto it = m->reserved_.find(piece);
    return it != m->reserved_.end() && m->pieces_[it->second].type == type ? it->second : -1;
  };
  m->unk_id_ = find(unk_piece, PieceType::kUnknown);
  m->bos_id_ = find(bos_piece, PieceType::kControl);
  m->eos_id_ = find(eos_piece, PieceType::kControl);
  if (m->unk_id_ < 0) return top.Bad(absl::StrCat("no unknown piece '", unk_piece, "'"));
  if (m->byte_fallback_) {
    for (int b = 0; b < 256; ++b) {
      if (m->byte_ids_[b] < 0) return top.Bad("byte_fallback without all 256 byte pieces");
    }
  }
  return m;
}

int SpmModel::PieceToId(std::string_view piece) const {
  const std::string key(piece);
  auto it = mergeable_.find(key);
  if (it != mergeable_.end()) return it->second;
  it = reserved_.find(key);
  return it != reserved_.end() ? it->second : -1;
}

std::string SpmModel::Normalize(std::string_view text) const {
  std::string s(text);
  if (remove_extra_whitespaces_) {
    std::string collapsed;
    for (char c : s) {
      if (c == ' ' && (collapsed.empty() || collapsed.back() == ' ')) continue;
      collapsed += c;
    }
    while (!collapsed.empty() && collapsed.back() == ' ') collapsed.pop_back();
    s = std::move(collapsed);
  }
  if (s.empty()) return s;
  std::string out;
  const std::string_view space = escape_whitespaces_ ? kSpaceSymbol : " ";
  if (add_dummy_prefix_) out.append(space);
  for (char c : s) {
    if (c == ' ') {
      out.append(space);
    } else {
      out += c;
    }
  }
  return out;
}

std::vector<int> SpmModel::Encode(std::string_view text) const {
  const std::string normalized = Normalize(text);
  std::vector<int> ids;
  if (normalized.empty()) return ids;
  // Symbols: spans of `normalized` in a linked list; a merged-away symbol has length 0.
  struct Symbol {
    size_t begin;
    size_t length;
    int prev;
    int next;
  };
  std::vector<Symbol> symbols;
  size_t pos = 0;
  while (pos < normalized.size()) {
    size_t length = 0;
    for (const std::string& u : user_defined_) {
      if (normalized.compare(pos, u.size(), u) == 0) {
        length = u.size();
        break;
      }
    }
    if (length == 0) {
      const auto b = static_cast<uint8_t>(normalized[pos]);
      length = b < 0x80 ? 1 : b < 0xE0 ? 2 : b < 0xF0 ? 3 : 4;
      length = std::min(length, normalized.size() - pos);
    }
    const int n = static_cast<int>(symbols.size());
    symbols.push_back({pos, length, n - 1, n + 1});
    pos += length;
  }
  symbols.back().next = -1;

  // Highest score first, then leftmost (SentencePiece's SymbolPairComparator).
  struct Pair {
    float score;
    int left;
    int right;
    size_t length;
  };
  auto lower = [](const Pair& a, const Pair& b) {
    return a.score != b.score ? a.score < b.score : a.left > b.left;
  };
  std::priority_queue<Pair, std::vector<Pair>, decltype(lower)> agenda(lower);
  auto maybe_add = [&](int left, int right) {
    if (left < 0 || right < 0) return;
    const size_t length = symbols[left].length + symbols[right].length;
    auto it = mergeable_.find(normalized.substr(symbols[left].begin, length));
    if (it == mergeable_.end()) return;
    agenda.push({pieces_[it->second].score, left, right, length});
  };
  for (size_t i = 1; i < symbols.size(); ++i)
    maybe_add(static_cast<int>(i) - 1, static_cast<int>(i));
  // Merged pieces that are "unused" are split back into what they were made of.
  absl::flat_hash_map<std::string, std::pair<std::string, std::string>> rev_merge;
  while (!agenda.empty()) {
    const Pair top = agenda.top();
    agenda.pop();
    Symbol& left = symbols[top.left];
    Symbol& right = symbols[top.right];
    if (left.length == 0 || right.length == 0 || left.length + right.length != top.length) {
      continue;
    }
    const std::string merged = normalized.substr(left.begin, top.length);
    const int merged_id = mergeable_.at(merged);
    if (pieces_[merged_id].type == PieceType::kUnused) {
      rev_merge[merged] = {normalized.substr(left.begin, left.length),
                           normalized.substr(right.begin, right.length)};
    }
    left.length = top.length;
    right.length = 0;
    left.next = right.next;
    if (right.next >= 0) symbols[right.next].prev = top.left;
    maybe_add(left.prev, top.left);
    maybe_add(top.left, left.next);
  }

  std::function<void(const std::string&)> emit = [&](const std::string& piece) {
    const int id = PieceToId(piece);
    if (id >= 0 && pieces_[id].type == PieceType::kUnused) {
      auto it = rev_merge.find(piece);
      if (it != rev_merge.end()) {
        emit(it->second.first);
        emit(it->second.second);
        return;
      }
    }
    if (id >= 0 && id != unk_id_) {
      ids.push_back(id);
    } else if (byte_fallback_) {
      for (char c : piece) ids.push_back(byte_ids_[static_cast<uint8_t>(c)]);
    } else {
      ids.push_back(unk_id_);
    }
  };
  for (int i = 0; i >= 0; i = symbols[i].next) {
    emit(normalized.substr(symbols[i].begin, symbols[i].length));
  }
  return ids;
}

}  // namespace tokenlake::tokenizer
