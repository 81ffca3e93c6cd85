// Clock: the source of time for every TokenLake module. Production uses SystemClock; the
// simulator and the tests use ManualClock, whose time only moves when told to. Time is in
// microseconds since an arbitrary epoch, monotonic.
//
// Thread-safety: SystemClock and ManualClock are thread-safe.
#ifndef TOKENLAKE_BASE_CLOCK_H_
#define TOKENLAKE_BASE_CLOCK_H_

#include <atomic>
#include <cstdint>

namespace tokenlake {

class Clock {
 public:
  virtual ~Clock() = default;
  // Monotonic time in microseconds.
  virtual int64_t NowUs() const = 0;
};

// Wall-clock monotonic time (std::chrono::steady_clock). A process-wide instance is available.
class SystemClock final : public Clock {
 public:
  int64_t NowUs() const override;
  // Never destroyed; safe to use from static initialisers and at exit.
  static SystemClock* Default();
};

// Time that moves only through Set/Advance. Starts at `start_us`.
class ManualClock final : public Clock {
 public:
  explicit ManualClock(int64_t start_us = 0) : now_us_(start_us) {}
  int64_t NowUs() const override { return now_us_.load(std::memory_order_acquire); }
  // REQUIRES: now_us >= NowUs() (time never goes backwards).
  void SetUs(int64_t now_us);
  // REQUIRES: delta_us >= 0.
  void AdvanceUs(int64_t delta_us);

 private:
  std::atomic<int64_t> now_us_;
};

}  // namespace tokenlake

#endif  // TOKENLAKE_BASE_CLOCK_H_
