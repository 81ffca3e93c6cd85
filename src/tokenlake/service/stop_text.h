// StopText: OpenAI's `stop` sequences applied to streamed text. Generated text arrives in
// pieces (what a tokenizer::DecodeStream emits: whole UTF-8 characters); a piece may end with
// the start of a stop sequence whose rest comes later, so that much is held back until it is
// known whether the sequence completes. The emitted text is everything before the occurrence
// of a stop sequence that completes first (the smallest end offset; of those, the earliest
// start), never any of the stop text itself, whatever the pieces; each emitted piece
// ends on a character boundary when the input pieces do (a held-back suffix starts with a stop
// sequence's first byte, a character's first byte).
//
// Thread-safety: not thread-safe (one per answer).
#ifndef TOKENLAKE_SERVICE_STOP_TEXT_H_
#define TOKENLAKE_SERVICE_STOP_TEXT_H_

#include <string>
#include <string_view>
#include <vector>

namespace tokenlake::service {

class StopText {
 public:
  // REQUIRES: no stop sequence is empty.
  explicit StopText(std::vector<std::string> stops);

  // Takes the next piece of text and returns what can be emitted now. Once a stop sequence is
  // complete, returns the text before it and stopped() is true; later calls return "".
  std::string Push(std::string_view text);
  // The end of generation without a stop sequence: returns what was held back.
  std::string Finish();
  bool stopped() const { return stopped_; }

 private:
  std::vector<std::string> stops_;
  std::string pending_;  // received, not emitted: a possible start of a stop sequence
  bool stopped_ = false;
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_STOP_TEXT_H_
