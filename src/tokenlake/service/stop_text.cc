#include "tokenlake/service/stop_text.h"

#include <algorithm>
#include <utility>

#include "tokenlake/base/check.h"

namespace tokenlake::service {

StopText::StopText(std::vector<std::string> stops) : stops_(std::move(stops)) {
  for (const std::string& s : stops_) TOKENLAKE_CHECK(!s.empty());
}

std::string StopText::Push(std::string_view text) {
  if (stopped_) return "";
  pending_.append(text);
  // The stop sequence that completes first (the smallest end; then the earliest start) ends
  // the text: as if the text came one byte at a time, so the answer does not depend on how it
  // was cut into pieces.
  size_t first = std::string::npos, first_end = std::string::npos;
  for (const std::string& s : stops_) {
    const size_t at = pending_.find(s);
    if (at == std::string::npos) continue;
    if (at + s.size() < first_end || (at + s.size() == first_end && at < first)) {
      first = at;
      first_end = at + s.size();
    }
  }
  if (first != std::string::npos) {
    stopped_ = true;
    std::string out = pending_.substr(0, first);
    pending_.clear();
    return out;
  }
  // Hold back the longest suffix that is a proper prefix of a stop sequence: any occurrence
  // still to come starts inside it (an earlier start would make a longer such suffix).
  size_t hold = 0;
  for (const std::string& s : stops_) {
    const size_t most = std::min(s.size() - 1, pending_.size());
    for (size_t n = most; n > hold; --n) {
      if (std::string_view(pending_).substr(pending_.size() - n) ==
          std::string_view(s).substr(0, n)) {
        hold = n;
        break;
      }
    }
  }
  std::string out = pending_.substr(0, pending_.size() - hold);
  pending_.erase(0, pending_.size() - hold);
  return out;
}

std::string StopText::Finish() {
  if (stopped_) return "";
  std::string out = std::move(pending_);
  pending_.clear();
  return out;
}

}  // namespace tokenlake::service
