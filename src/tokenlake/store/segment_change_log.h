// SegmentChangeLog: the numbered changes of what one instance's store holds, kept until its
// control plane acknowledges them, so that the instance reports only what changed since its
// last acknowledged report instead of everything it holds (service/reconciler.h is the other
// side).
//
// Every store (new or overwrite) and every free of a segment takes the next change number
// (1, 2, ...). Since(from) returns changes from + 1 .. last() in order when the log still holds
// them all; Trim(through) forgets the changes up to `through` (acknowledged). A log that would
// hold more than `max_entries` unacknowledged changes forgets them all: until the next Trim at
// or past last(), Since answers nullopt for anything before last() and the reader sends a full
// report instead (a reader that cannot reach its control plane for a long time costs bounded
// memory). With max_entries 0 the log only numbers changes (last() is the store's generation)
// and keeps none.
//
// Invariant: the log holds exactly the changes first() + 1 .. last(), where first() <= last().
//
// Thread-safety: not thread-safe (the store's owner serialises it with the store).
#ifndef TOKENLAKE_STORE_SEGMENT_CHANGE_LOG_H_
#define TOKENLAKE_STORE_SEGMENT_CHANGE_LOG_H_

#include <cstdint>
#include <deque>
#include <optional>
#include <vector>

#include "tokenlake/base/ids.h"

namespace tokenlake::store {

// One change of what a store holds.
struct SegmentChange {
  SegmentId id;
  // true: stored (with its parent in the chain, invalid for a root child, and its token count);
  // false: freed.
  bool stored = true;
  SegmentId parent;
  int32_t num_tokens = 0;
  friend bool operator==(const SegmentChange&, const SegmentChange&) = default;
};

class SegmentChangeLog {
 public:
  // REQUIRES: max_entries >= 0.
  explicit SegmentChangeLog(int64_t max_entries);

  // Numbers `change` (returns last() + 1, the new last()) and keeps it.
  uint64_t Record(const SegmentChange& change);

  // The number of the latest change (0 before the first).
  uint64_t last() const { return last_; }
  // Changes up to first() are forgotten (acknowledged, or dropped when the log overflowed).
  uint64_t first() const { return first_; }
  // Changes kept.
  int64_t size() const { return static_cast<int64_t>(entries_.size()); }

  // Changes from + 1 .. last(), in order; nullopt when some of them are forgotten
  // (from < first()) or `from` is in the future (from > last()).
  std::optional<std::vector<SegmentChange>> Since(uint64_t from) const;

  // Forgets the changes up to min(through, last()).
  void Trim(uint64_t through);

 private:
  const int64_t max_entries_;
  std::deque<SegmentChange> entries_;  // changes first_ + 1 .. last_
  uint64_t first_ = 0;
  uint64_t last_ = 0;
};

}  // namespace tokenlake::store

#endif  // TOKENLAKE_STORE_SEGMENT_CHANGE_LOG_H_
