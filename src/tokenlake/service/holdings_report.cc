#include "tokenlake/service/holdings_report.h"

#include <algorithm>

namespace tokenlake::service {

HoldingsReporter::HoldingsReporter(HoldingsSource* source, uint64_t incarnation)
    : source_(source), incarnation_(incarnation) {}

void HoldingsReporter::Fill(bool full, bool coordinator_takes_changes, v1::InstanceState* state) {
  state->clear_segments();
  state->clear_holdings_changes();
  state->set_holdings_incarnation(incarnation_);
  std::optional<std::vector<store::SegmentChange>> changes;
  if (!full && !full_wanted_ && coordinator_takes_changes) changes = source_->ChangesSince(acked_);
  if (changes.has_value()) {
    v1::HoldingsChanges* c = state->mutable_holdings_changes();
    c->set_from_seq(acked_);
    c->set_to_seq(acked_ + changes->size());
    for (const store::SegmentChange& change : *changes) {
      v1::SegmentChange* out = c->add_changes();
      out->mutable_segment()->set_id(change.id.value());
      if (change.stored) {
        out->mutable_segment()->set_parent(change.parent.value());
        out->mutable_segment()->set_num_tokens(change.num_tokens);
      } else {
        out->set_freed(true);
      }
    }
    state->set_holdings_seq(c->to_seq());
    last_filled_ = c->to_seq();
    return;
  }
  std::vector<lake::HeldSegment> held;
  last_filled_ = source_->Snapshot(&held);
  state->set_holdings_seq(last_filled_);
  state->mutable_segments()->Reserve(static_cast<int>(held.size()));
  for (const lake::HeldSegment& h : held) {
    v1::Segment* s = state->add_segments();
    s->set_id(h.id.value());
    s->set_parent(h.parent.value());
    s->set_num_tokens(h.num_tokens);
  }
}

uint64_t HoldingsReporter::OnReply(bool coordinator_takes_changes, uint64_t acked_seq,
                                   bool full_wanted) {
  if (!coordinator_takes_changes) {
    // An older coordinator compares every (full) report whole: its frees were decided at the
    // report's change number.
    full_wanted_ = true;
    return last_filled_;
  }
  full_wanted_ = full_wanted;
  if (full_wanted) return acked_seq;  // no view, no frees
  // Acknowledgements only grow within an incarnation (a late reply's is older).
  acked_ = std::max(acked_, std::min(acked_seq, last_filled_));
  source_->Forget(acked_);
  return acked_seq;
}

}  // namespace tokenlake::service
