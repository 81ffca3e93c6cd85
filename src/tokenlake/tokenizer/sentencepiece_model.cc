#include "tokenlake/tokenizer/sentencepiece_model.h"

#include <fstream>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/tokenizer/spm_model.h"
#include "tokenlake/tokenizer/utf8.h"

namespace tokenlake::tokenizer {
namespace {

constexpr std::string_view kSpaceSymbol = "\xE2\x96\x81";  // U+2581 "▁"

class SentencePieceTokenizer : public Tokenizer {
 public:
  absl::Status Load(const std::string& path, const SentencePieceOptions& options) {
    std::ifstream in(path, std::ios::binary);
    if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot read"));
    std::stringstream buf;
    buf << in.rdbuf();
    TOKENLAKE_ASSIGN_OR_RETURN(sp_, SpmModel::Parse(buf.str(), path));
    piece_size_ = sp_->PieceSize();
    add_bos_ = options.add_bos_token;
    add_eos_ = options.add_eos_token;
    std::vector<AddedToken> added = options.added_tokens;
    if (added.empty()) {
      for (int id : {sp_->bos_id(), sp_->eos_id(), sp_->unk_id()}) {
        if (id >= 0) added.push_back({id, sp_->IdToPiece(id), /*special=*/true});
      }
    }
    vocab_size_ = piece_size_;
    for (const AddedToken& t : added) vocab_size_ = std::max(vocab_size_, t.id + 1);
    added_ = AddedVocabulary(std::move(added));

    return absl::OkStatus();
  }

  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens) const override {
    TOKENLAKE_RETURN_IF_ERROR(ValidateUtf8(text, "text to encode"));
    std::vector<int32_t> ids;
    if (add_special_tokens && add_bos_ && sp_->bos_id() >= 0) ids.push_back(sp_->bos_id());
    std::vector<int> piece_ids;
    for (const AddedVocabulary::Piece& piece : added_.Split(text)) {
      if (piece.id >= 0) {
        ids.push_back(piece.id);
        continue;
      }
      piece_ids = sp_->Encode(std::string_view(piece.text.data(), piece.text.size()));
      ids.insert(ids.end(), piece_ids.begin(), piece_ids.end());
    }
    if (add_special_tokens && add_eos_ && sp_->eos_id() >= 0) ids.push_back(sp_->eos_id());
    return ids;
  }

  std::unique_ptr<DecodeStream> NewDecodeStream(bool skip_special_tokens) const override;

  int32_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> TokenToId(std::string_view token) const override {
    if (auto id = added_.FindContent(token)) return id;
    const int id = sp_->PieceToId(token);
    if (id < 0 || id >= piece_size_) return std::nullopt;
    return id;
  }
  std::optional<std::string> IdToToken(int32_t id) const override {
    if (const AddedToken* t = added_.FindId(id)) return t->content;
    if (id < 0 || id >= piece_size_) return std::nullopt;
    return sp_->IdToPiece(id);
  }
  bool IsSpecial(int32_t id) const override {
    if (const AddedToken* t = added_.FindId(id)) return t->special;
    return id >= 0 && id < piece_size_ && (sp_->IsControl(id) || sp_->IsUnknown(id));
  }

 private:
  friend class SentencePieceStream;
  std::unique_ptr<SpmModel> sp_;
  int32_t piece_size_ = 0;
  int32_t vocab_size_ = 0;
  bool add_bos_ = true;
  bool add_eos_ = false;
  AddedVocabulary added_;
};

// SentencePiece's DecodeIds, one id at a time.
class SentencePieceStream : public DecodeStream {
 public:
  SentencePieceStream(const SentencePieceTokenizer* tok, bool skip_special)
      : tok_(tok), skip_(skip_special) {}

  void Push(int32_t id, std::string* out) override {
    const SpmModel& sp = *tok_->sp_;
    if (id >= 0 && id < tok_->piece_size_ && sp.IsByte(id)) {
      // "<0xNN>"
      const std::string& p = sp.IdToPiece(id);
      auto hex = [](char c) { return c <= '9' ? c - '0' : (c | 0x20) - 'a' + 10; };
      bytes_.push_back(static_cast<char>(hex(p[3]) * 16 + hex(p[4])));
      EmitBytes(/*final=*/false, out);
      return;
    }
    std::string surface;
    bool has_bos_ws = false;
    const AddedToken* added = tok_->added_.FindId(id);
    if (skip_ && tok_->IsSpecial(id)) return;
    if (added != nullptr && (id >= tok_->piece_size_ || !sp.IsControl(id))) {
      surface = added->content;
    } else if (id < 0 || id >= tok_->piece_size_) {
      return;  // unknown id: nothing
    } else if (sp.IsControl(id)) {
      surface.clear();
    } else if (sp.IsUnknown(id)) {
      surface = sp.unk_surface();
    } else {
      std::string_view piece = sp.IdToPiece(id);
      EmitBytes(/*final=*/true, out);
      if (bos_ws_seen_ || emitted_) is_bos_ws_ = false;
      if (is_bos_ws_ && sp.strip_first_space() &&
          piece.substr(0, kSpaceSymbol.size()) == kSpaceSymbol) {
        piece.remove_prefix(kSpaceSymbol.size());
        has_bos_ws = !sp.keep_stripping();
      }
      for (size_t at = piece.find(kSpaceSymbol); at != std::string_view::npos;
           at = piece.find(kSpaceSymbol)) {
        surface.append(piece.substr(0, at));
        surface += ' ';
        piece.remove_prefix(at + kSpaceSymbol.size());
      }
      surface.append(piece);
      Append(surface, out);
      bos_ws_seen_ = has_bos_ws;
      return;
    }
    EmitBytes(/*final=*/true, out);
    if (bos_ws_seen_ || emitted_) is_bos_ws_ = false;
    Append(surface, out);
    bos_ws_seen_ = false;
  }

  void Finish(std::string* out) override {
    EmitBytes(/*final=*/true, out);
    is_bos_ws_ = true;
    bos_ws_seen_ = false;
    emitted_ = false;
  }

 private:
  void Append(std::string_view s, std::string* out) {
    if (s.empty()) return;
    out->append(s);
    emitted_ = true;
  }
  // Emits the complete characters at the front of the byte run; a byte that cannot start one
  // becomes U+FFFD. A truncated character waits unless `final`, when each of its bytes becomes
  // U+FFFD (SentencePiece replaces ill-formed bytes one at a time).
  void EmitBytes(bool final, std::string* out) {
    size_t pos = 0;
    while (pos < bytes_.size()) {
      size_t p = pos;
      uint32_t cp = 0;
      if (DecodeCodePoint(bytes_, &p, &cp)) {
        Append(std::string_view(bytes_).substr(pos, p - pos), out);
        pos = p;
        continue;
      }
      if (!final && FinalPrefixLength(std::string_view(bytes_).substr(pos)) == 0) break;
      Append(kReplacementChar, out);
      ++pos;
    }
    bytes_.erase(0, pos);
  }

  const SentencePieceTokenizer* tok_;
  bool skip_;
  std::string bytes_;      // a run of byte pieces not yet emitted
  bool is_bos_ws_ = true;  // the next visible piece may lose its leading "▁"
  bool bos_ws_seen_ = false;
  bool emitted_ = false;
};

std::unique_ptr<DecodeStream> SentencePieceTokenizer::NewDecodeStream(
    bool skip_special_tokens) const {
  return std::make_unique<SentencePieceStream>(this, skip_special_tokens);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePieceModel(
    const std::string& path, const SentencePieceOptions& options) {
  auto tok = std::make_unique<SentencePieceTokenizer>();
  TOKENLAKE_RETURN_IF_ERROR(tok->Load(path, options));
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace tokenlake::tokenizer
