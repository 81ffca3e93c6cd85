// SentencePiece `tokenizer.model` files (Llama-2, LWM): the model is read and encoded by
// spm_model.h (SentencePiece's BPE, reimplemented and checked against its own tools).
//
// Encoding: added tokens (tokenizer_config.json's added_tokens_decoder, else the model's BOS,
// EOS and UNK pieces) are split out of the text first and kept whole; each stretch between
// them is encoded by SentencePiece on its own (as transformers' LlamaTokenizer does in its
// legacy mode, the mode Llama-2 checkpoints ship). `add_bos_token` (default true) and
// `add_eos_token` (default false) from tokenizer_config.json apply with add_special_tokens.
//
// Decoding follows SentencePiece's own rules token by token: control pieces decode to nothing,
// the unknown piece to " ⁇ ", "▁" to a space (the first visible piece loses its leading one),
// and runs of byte pieces (<0xNN>) to their bytes, every byte of an ill-formed sequence becoming
// U+FFFD. Added tokens outside the model decode to their content.
//
// Thread-safety: the tokenizer is immutable and safe to share.
#ifndef TOKENLAKE_TOKENIZER_SENTENCEPIECE_MODEL_H_
#define TOKENLAKE_TOKENIZER_SENTENCEPIECE_MODEL_H_

#include <memory>
#include <string>
#include <vector>

#include "absl/status/statusor.h"
#include "tokenlake/tokenizer/added_vocabulary.h"
#include "tokenlake/tokenizer/tokenizer.h"

namespace tokenlake::tokenizer {

struct SentencePieceOptions {
  // Prepend BOS / append EOS when encoding with add_special_tokens.
  bool add_bos_token = true;
  bool add_eos_token = false;
  // Tokens split out before SentencePiece sees the text; empty: the model's BOS, EOS and UNK.
  std::vector<AddedToken> added_tokens;
};

// Loads the serialized model in `path`.
// Errors: NotFound (cannot read), InvalidArgument (not a SentencePiece model), Unimplemented
// (a model kind spm_model.h does not read, named with its field).
absl::StatusOr<std::unique_ptr<Tokenizer>> LoadSentencePieceModel(
    const std::string& path, const SentencePieceOptions& options);

}  // namespace tokenlake::tokenizer

#endif  // TOKENLAKE_TOKENIZER_SENTENCEPIECE_MODEL_H_
