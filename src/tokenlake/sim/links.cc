#include "tokenlake/sim/links.h"

#include <algorithm>

#include "tokenlake/base/check.h"

namespace tokenlake::sim {

LinkClock::LinkClock(int num_instances) : free_at_(static_cast<size_t>(num_instances), 0.0) {
  TOKENLAKE_CHECK(num_instances >= 1, "LinkClock needs at least one instance");
}

double LinkClock::Copy(int src, int dst, double now_s, double seconds) {
  const int n = num_instances();
  TOKENLAKE_CHECK(src >= 0 && src < n && dst >= 0 && dst < n && src != dst && seconds >= 0,
                  "LinkClock::Copy: bad endpoints or duration");
  const double start = std::max({now_s, free_at_[src], free_at_[dst]});
  const double end = start + seconds;
  free_at_[src] = end;
  free_at_[dst] = end;
  return end;
}

double LinkClock::free_at(int instance) const {
  TOKENLAKE_CHECK(instance >= 0 && instance < num_instances(), "LinkClock: bad instance");
  return free_at_[instance];
}

}  // namespace tokenlake::sim
