// Rng: the seeded source of randomness passed into every TokenLake component that needs one.
// Bit-for-bit reproducible across compilers and standard libraries for the same seed (it uses
// std::mt19937_64, whose output the standard fixes, and its own distributions, because the
// standard's distributions differ between library implementations).
//
// Thread-safety: not thread-safe; give each thread its own Rng (see Fork).
#ifndef TOKENLAKE_BASE_RANDOM_H_
#define TOKENLAKE_BASE_RANDOM_H_

#include <cstdint>
#include <random>

namespace tokenlake {

class Rng {
 public:
  explicit Rng(uint64_t seed) : engine_(seed) {}

  uint64_t Next64() { return engine_(); }

  // Uniform integer in [lo, hi]. REQUIRES: lo <= hi.
  int64_t UniformInt(int64_t lo, int64_t hi);

  // Uniform double in [0, 1).
  double UniformDouble() { return static_cast<double>(engine_() >> 11) * 0x1.0p-53; }

  // True with probability p.
  bool Bernoulli(double p) { return UniformDouble() < p; }

  // Exponential with the given mean (> 0).
  double Exponential(double mean);

  // A new generator whose stream is independent of this one's continuation.
  Rng Fork() { return Rng(engine_() ^ 0x9E3779B97F4A7C15ULL); }

 private:
  std::mt19937_64 engine_;
};

}  // namespace tokenlake

#endif  // TOKENLAKE_BASE_RANDOM_H_
