#include "tokenlake/tokenizer/sentencepiece_bridge.h"

#include <sentencepiece_processor.h>

namespace tokenlake::tokenizer {

struct SentencePieceBridge::Impl {
  sentencepiece::SentencePieceProcessor sp;
};

SentencePieceBridge::SentencePieceBridge(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
SentencePieceBridge::~SentencePieceBridge() = default;

std::unique_ptr<SentencePieceBridge> SentencePieceBridge::Load(const std::string& serialized,
                                                               std::string* error) {
  auto impl = std::make_unique<Impl>();
  const auto status = impl->sp.LoadFromSerializedProto(serialized);
  if (!status.ok()) {
    *error = status.ToString();
    return nullptr;
  }
  return std::unique_ptr<SentencePieceBridge>(new SentencePieceBridge(std::move(impl)));
}

bool SentencePieceBridge::Encode(std::string_view text, std::vector<int>* ids,
                                 std::string* error) const {
  const auto status = impl_->sp.Encode(text, ids);
  if (!status.ok()) *error = status.ToString();
  return status.ok();
}

std::string SentencePieceBridge::DecodeIds(const std::vector<int>& ids) const {
  return impl_->sp.DecodeIds(ids);
}
int SentencePieceBridge::PieceSize() const { return impl_->sp.GetPieceSize(); }
int SentencePieceBridge::PieceToId(std::string_view piece) const {
  const int id = impl_->sp.PieceToId(piece);
  return id >= 0 && impl_->sp.IdToPiece(id) == piece ? id : -1;
}
const std::string& SentencePieceBridge::IdToPiece(int id) const { return impl_->sp.IdToPiece(id); }
bool SentencePieceBridge::IsControl(int id) const { return impl_->sp.IsControl(id); }
bool SentencePieceBridge::IsUnknown(int id) const { return impl_->sp.IsUnknown(id); }
bool SentencePieceBridge::IsByte(int id) const { return impl_->sp.IsByte(id); }
int SentencePieceBridge::bos_id() const { return impl_->sp.bos_id(); }
int SentencePieceBridge::eos_id() const { return impl_->sp.eos_id(); }
int SentencePieceBridge::unk_id() const { return impl_->sp.unk_id(); }

}  // namespace tokenlake::tokenizer
