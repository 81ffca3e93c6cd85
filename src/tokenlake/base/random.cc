#include "tokenlake/base/random.h"

#include <cmath>

#include "tokenlake/base/check.h"

namespace tokenlake {

int64_t Rng::UniformInt(int64_t lo, int64_t hi) {
  TOKENLAKE_CHECK(lo <= hi);
  const uint64_t range = static_cast<uint64_t>(hi) - static_cast<uint64_t>(lo);
  if (range == UINT64_MAX) return static_cast<int64_t>(engine_());
  const uint64_t span = range + 1;
  // Rejection sampling: accept only draws below the largest multiple of span.
  const uint64_t limit = UINT64_MAX - (UINT64_MAX % span + 1) % span;
  uint64_t draw;
  do {
    draw = engine_();
  } while (draw > limit);
  return static_cast<int64_t>(static_cast<uint64_t>(lo) + draw % span);
}

double Rng::Exponential(double mean) {
  TOKENLAKE_CHECK(mean > 0);
  // 1 - U is in (0, 1], so the log is finite.
  return -mean * std::log(1.0 - UniformDouble());
}

}  // namespace tokenlake
