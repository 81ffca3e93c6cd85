// libFuzzer target: encoding arbitrary bytes and decoding arbitrary ids with the fixture
// tokenizers (tests/fixtures/tokenizer: byte-level BPE, with NFC, and SentencePiece). Encoding must
// succeed or refuse invalid UTF-8 with an error; a decode stream must emit whole UTF-8 pieces
// that add up to Decode.
#include <cstddef>
#include <cstdint>
#include <cstdlib>
#include <memory>
#include <string>
#include <vector>

#include "tokenlake/tokenizer/tokenizer.h"
#include "tokenlake/tokenizer/utf8.h"

namespace {

using tokenlake::tokenizer::Tokenizer;

const Tokenizer* Load(const char* name) {
  auto tok = Tokenizer::FromDir(std::string(TOKENLAKE_TOKENIZER_FIXTURES) + "/" + name);
  if (!tok.ok()) std::abort();
  return tok->release();
}

void CheckStream(const Tokenizer& tok, const std::vector<int32_t>& ids, bool skip) {
  auto stream = tok.NewDecodeStream(skip);
  std::string all;
  for (int32_t id : ids) {
    std::string piece;
    stream->Push(id, &piece);
    if (!tokenlake::tokenizer::ValidateUtf8(piece, "piece").ok()) std::abort();
    all += piece;
  }
  stream->Finish(&all);
  if (all != tok.Decode(ids, skip)) std::abort();
}

}  // namespace

extern "C" int LLVMFuzzerTestOneInput(const uint8_t* data, size_t size) {
  static const Tokenizer* const tokenizers[] = {Load("bpe_llama3"), Load("bpe_gpt2"),
                                                Load("bpe_qwen2"), Load("spm_llama2")};
  if (size == 0) return 0;
  const Tokenizer& tok = *tokenizers[data[0] % 4];
  const bool as_ids = (data[0] / 4) % 2 == 1;
  const bool skip = (data[0] / 8) % 2 == 1;
  ++data;
  --size;
  if (as_ids) {
    std::vector<int32_t> ids;
    for (size_t i = 0; i + 1 < size; i += 2) {
      ids.push_back(static_cast<int32_t>(data[i] | (data[i + 1] << 8)) % (tok.vocab_size() + 8) -
                    4);
    }
    CheckStream(tok, ids, skip);
    return 0;
  }
  const std::string text(reinterpret_cast<const char*>(data), size);
  auto ids = tok.Encode(text, /*add_special_tokens=*/skip);
  if (!ids.ok()) {
    if (tokenlake::tokenizer::ValidateUtf8(text, "text").ok()) std::abort();
    return 0;
  }
  for (int32_t id : *ids) {
    if (id < 0 || id >= tok.vocab_size()) std::abort();
  }
  CheckStream(tok, *ids, skip);
  return 0;
}
