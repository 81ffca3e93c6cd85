#include "tokenlake/store/segment_change_log.h"

#include <algorithm>

#include "tokenlake/base/check.h"

namespace tokenlake::store {

SegmentChangeLog::SegmentChangeLog(int64_t max_entries) : max_entries_(max_entries) {
  TOKENLAKE_CHECK(max_entries >= 0);
}

uint64_t SegmentChangeLog::Record(const SegmentChange& change) {
  ++last_;
  if (static_cast<int64_t>(entries_.size()) >= max_entries_) {
    // Full (or keeping nothing): everything unacknowledged is forgotten, this change included;
    // the reader's next report is a full one.
    entries_.clear();
    first_ = last_;
    return last_;
  }
  entries_.push_back(change);
  return last_;
}

std::optional<std::vector<SegmentChange>> SegmentChangeLog::Since(uint64_t from) const {
  if (from < first_ || from > last_) return std::nullopt;
  return std::vector<SegmentChange>(entries_.begin() + static_cast<int64_t>(from - first_),
                                    entries_.end());
}

void SegmentChangeLog::Trim(uint64_t through) {
  through = std::min(through, last_);
  while (first_ < through) {
    entries_.pop_front();
    ++first_;
  }
}

}  // namespace tokenlake::store
