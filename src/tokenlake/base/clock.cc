#include "tokenlake/base/clock.h"

#include <chrono>

#include "tokenlake/base/check.h"

namespace tokenlake {

int64_t SystemClock::NowUs() const {
  return std::chrono::duration_cast<std::chrono::microseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

SystemClock* SystemClock::Default() {
  static auto* clock = new SystemClock();
  return clock;
}

void ManualClock::SetUs(int64_t now_us) {
  TOKENLAKE_CHECK(now_us >= NowUs(), "ManualClock cannot go backwards");
  now_us_.store(now_us, std::memory_order_release);
}

void ManualClock::AdvanceUs(int64_t delta_us) {
  TOKENLAKE_CHECK(delta_us >= 0, "ManualClock cannot go backwards");
  now_us_.fetch_add(delta_us, std::memory_order_acq_rel);
}

}  // namespace tokenlake
