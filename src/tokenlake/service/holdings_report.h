// The instance's side of reporting what it holds (its holdings) to the coordinator; the
// coordinator's side is reconciler.h, the messages proto/tokenlake/v1/tokenlake.proto
// (InstanceState.segments / holdings_*).
//
// A report is either full (every segment held, at the store's change number then) or the
// changes after the change number the coordinator acknowledged last (store/
// segment_change_log.h numbers them). A full report goes with every Register, when the
// coordinator asks for one (it found a gap: changes lost, another incarnation, a view it no
// longer has), when the source no longer keeps every change since the acknowledged one, and
// always to a coordinator that does not take changes (an older one). After each reply the
// reporter tells the source which changes it may forget (those the coordinator acknowledged),
// and which change number the reply's frees were decided at, so that a copy stored since is
// not freed (engine::InstancePool::FreeIfUnchangedSince).
//
// Thread-safety: HoldingsReporter is not thread-safe (the instance's control loop owns it);
// a HoldingsSource must be safe to call while its store changes.
#ifndef TOKENLAKE_SERVICE_HOLDINGS_REPORT_H_
#define TOKENLAKE_SERVICE_HOLDINGS_REPORT_H_

#include <cstdint>
#include <optional>
#include <vector>

#include "tokenlake/lake/lake.h"
#include "tokenlake/store/segment_change_log.h"
#include "tokenlake/v1/tokenlake.pb.h"

namespace tokenlake::service {

// What one store holds and how it changed.
class HoldingsSource {
 public:
  virtual ~HoldingsSource() = default;
  // Every segment held and the change number that state reflects, taken together.
  virtual uint64_t Snapshot(std::vector<lake::HeldSegment>* held) const = 0;
  // Changes from + 1 .. now, in order; nullopt when they are not all kept.
  virtual std::optional<std::vector<store::SegmentChange>> ChangesSince(uint64_t from) const = 0;
  // Changes up to `through` have been acknowledged: they may be forgotten.
  virtual void Forget(uint64_t through) = 0;
};

class HoldingsReporter {
 public:
  // `source` is borrowed and outlives this; `incarnation` (non-zero, random) names its store:
  // a store that starts empty again gets a new reporter with a new incarnation.
  HoldingsReporter(HoldingsSource* source, uint64_t incarnation);

  uint64_t incarnation() const { return incarnation_; }

  // Fills the holdings of `state` (segments or holdings_changes, holdings_incarnation and
  // holdings_seq) with the next report: full when `full` (a Register) or as the file comment
  // says, else the changes since the acknowledged report.
  void Fill(bool full, bool coordinator_takes_changes, v1::InstanceState* state);

  // Takes the holdings fields of a Register / Heartbeat reply to the latest report Fill made.
  // Returns the change number the reply's free_segments were decided at.
  uint64_t OnReply(bool coordinator_takes_changes, uint64_t acked_seq, bool full_wanted);

  // Change number the coordinator acknowledged last (0: none yet).
  uint64_t acked() const { return acked_; }

 private:
  HoldingsSource* const source_;
  const uint64_t incarnation_;
  uint64_t acked_ = 0;
  bool full_wanted_ = true;   // the first report of a store is a full one
  uint64_t last_filled_ = 0;  // the change number the latest report went up to
};

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_HOLDINGS_REPORT_H_
