// Per-instance links for the pool's background copies: new segments stored away from the
// instance that computed them, and rebalancing copies (replicate, move). A copy occupies the
// source's and the destination's link for its transfer time; each link carries one copy at a
// time, in the order they are issued (first come, first served), so a copy starts when both of
// its links are free and later copies queue behind it. What needs the copied data waits until
// the copy ends (the caller keeps those end times).
//
// Per-iteration traffic (queries and partial results to holders, KV pulled for a chunk) is not
// on these links: it is charged to the iteration that causes it (tokenlake_policy.h).
//
// Thread-safety: not thread-safe (one simulator).
#ifndef TOKENLAKE_SIM_LINKS_H_
#define TOKENLAKE_SIM_LINKS_H_

#include <vector>

namespace tokenlake::sim {

class LinkClock {
 public:
  // REQUIRES (CHECK): num_instances >= 1.
  explicit LinkClock(int num_instances);

  // A copy issued at `now_s` from `src` to `dst` (distinct, in [0, num_instances)) that takes
  // `seconds` (>= 0) on the wire: it starts at max(now_s, both links free) and occupies both
  // links until it ends. Returns its end time. REQUIRES (CHECK): the above.
  double Copy(int src, int dst, double now_s, double seconds);

  // When `instance`'s link is next free (0 before any copy).
  double free_at(int instance) const;
  int num_instances() const { return static_cast<int>(free_at_.size()); }

 private:
  std::vector<double> free_at_;
};

}  // namespace tokenlake::sim

#endif  // TOKENLAKE_SIM_LINKS_H_
