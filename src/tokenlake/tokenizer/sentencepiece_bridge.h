// A narrow wrapper of SentencePiece's processor in standard types only. SentencePiece's header
// declares `absl::string_view` as std::string_view, which clashes with Abseil's own class, so
// the header is included in sentencepiece_bridge.cc alone, and that file includes no Abseil.
//
// Thread-safety: const methods are safe to call concurrently (as SentencePiece's are).
#ifndef TOKENLAKE_TOKENIZER_SENTENCEPIECE_BRIDGE_H_
#define TOKENLAKE_TOKENIZER_SENTENCEPIECE_BRIDGE_H_

#include <memory>
#include <string>
#include <string_view>
#include <vector>

namespace tokenlake::tokenizer {

class SentencePieceBridge {
 public:
  // Loads a serialized model; nullptr with `*error` set when it is not one.
  static std::unique_ptr<SentencePieceBridge> Load(const std::string& serialized,
                                                   std::string* error);
  ~SentencePieceBridge();

  // Ids of `text`; false with `*error` set on failure.
  bool Encode(std::string_view text, std::vector<int>* ids, std::string* error) const;
  // SentencePiece's own decoding of `ids`.
  std::string DecodeIds(const std::vector<int>& ids) const;
  int PieceSize() const;
  // -1 when the piece is not in the model.
  int PieceToId(std::string_view piece) const;
  const std::string& IdToPiece(int id) const;
  bool IsControl(int id) const;
  bool IsUnknown(int id) const;
  bool IsByte(int id) const;
  int bos_id() const;
  int eos_id() const;
  int unk_id() const;

 private:
  struct Impl;
  explicit SentencePieceBridge(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace tokenlake::tokenizer

#endif  // TOKENLAKE_TOKENIZER_SENTENCEPIECE_BRIDGE_H_
