// A SentencePiece model (`tokenizer.model`): the serialized ModelProto read with a small
// protobuf wire-format reader, and SentencePiece's BPE encoding reimplemented. Debian's
// libsentencepiece bundles its own copy of protobuf and exports it, which breaks any process
// that also links libprotobuf (the service's gRPC); see docs/adr/0012-own-sentencepiece-reader.md.
//
// Read: pieces (piece, score, type), trainer_spec's model_type (BPE only), byte_fallback,
// treat_whitespace_as_suffix (false only), unk/bos/eos pieces and unk_surface, and
// normalizer_spec with the identity rule (an empty precompiled_charsmap), add_dummy_prefix,
// remove_extra_whitespaces and escape_whitespaces. Llama-2 and LWM models are of this kind;
// Unigram models and NFKC normalizers are refused (Unimplemented, naming the field).
//
// Thread-safety: immutable after Parse; safe to share.
#ifndef TOKENLAKE_TOKENIZER_SPM_MODEL_H_
#define TOKENLAKE_TOKENIZER_SPM_MODEL_H_

#include <cstdint>
#include <memory>
#include <string>
#include <string_view>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/status/statusor.h"

namespace tokenlake::tokenizer {

class SpmModel {
 public:
  // ModelProto.SentencePiece.Type.
  enum class PieceType : uint8_t {
    kNormal = 1,
    kUnknown = 2,
    kControl = 3,
    kUserDefined = 4,
    kUnused = 5,
    kByte = 6
  };

  // Parses a serialized ModelProto; `source_name` prefixes every message.
  // Errors: InvalidArgument (not a well-formed model), Unimplemented (see above).
  static absl::StatusOr<std::unique_ptr<SpmModel>> Parse(std::string_view serialized,
                                                         const std::string& source_name);

  // The ids of `text` (valid UTF-8), as SentencePiece's Encode gives them.
  std::vector<int> Encode(std::string_view text) const;

  int PieceSize() const { return static_cast<int>(pieces_.size()); }
  // -1 when the piece is not in the model.
  int PieceToId(std::string_view piece) const;
  // REQUIRES: 0 <= id < PieceSize().
  const std::string& IdToPiece(int id) const { return pieces_[id].piece; }
  bool IsControl(int id) const { return pieces_[id].type == PieceType::kControl; }
  bool IsUnknown(int id) const { return pieces_[id].type == PieceType::kUnknown; }
  bool IsByte(int id) const { return pieces_[id].type == PieceType::kByte; }
  // -1 when the model has none.
  int bos_id() const { return bos_id_; }
  int eos_id() const { return eos_id_; }
  int unk_id() const { return unk_id_; }
  // What the unknown piece decodes to.
  const std::string& unk_surface() const { return unk_surface_; }
  // Decoding drops the leading "▁" of the first visible piece (add_dummy_prefix or
  // remove_extra_whitespaces), and keeps dropping after a bare "▁" (remove_extra_whitespaces).
  bool strip_first_space() const { return add_dummy_prefix_ || remove_extra_whitespaces_; }
  bool keep_stripping() const { return remove_extra_whitespaces_; }

 private:
  struct Piece {
    std::string piece;
    float score = 0;
    PieceType type = PieceType::kNormal;
  };
  std::string Normalize(std::string_view text) const;

  std::vector<Piece> pieces_;
  // Pieces BPE may produce (normal, user-defined, unused) and the others, by spelling.
  absl::flat_hash_map<std::string, int> mergeable_;
  absl::flat_hash_map<std::string, int> reserved_;
  std::vector<std::string> user_defined_;  // longest first
  int byte_ids_[256];
  bool byte_fallback_ = false;
  bool add_dummy_prefix_ = true;
  bool remove_extra_whitespaces_ = true;
  bool escape_whitespaces_ = true;
  int unk_id_ = -1;
  int bos_id_ = -1;
  int eos_id_ = -1;
  std::string unk_surface_ = " \xE2\x81\x87 ";
};

}  // namespace tokenlake::tokenizer

#endif  // TOKENLAKE_TOKENIZER_SPM_MODEL_H_
