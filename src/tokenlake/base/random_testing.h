// Test-only (beside random.h, as lake_testing.h beside the lake): TestSeed, the seed of a
// randomised test, printed, and moved by the environment so that a failure can be replayed and
// other seeds explored without a rebuild.
//
// Thread-safety: reads the environment and writes stdout; call from the test's own thread.
#ifndef TOKENLAKE_BASE_RANDOM_TESTING_H_
#define TOKENLAKE_BASE_RANDOM_TESTING_H_

#include <cstdint>
#include <cstdio>
#include <cstdlib>

namespace tokenlake {

// Returns `base` plus TOKENLAKE_TEST_SEED when that is set (a decimal number), after printing
// "seed=N" to stdout. A test keeps its fixed base per case (its parameters' seed), so
// TOKENLAKE_TEST_SEED=k runs every case k seeds further on.
inline uint64_t TestSeed(uint64_t base) {
  uint64_t seed = base;
  if (const char* env = std::getenv("TOKENLAKE_TEST_SEED")) seed += std::strtoull(env, nullptr, 10);
  std::printf("seed=%llu\n", static_cast<unsigned long long>(seed));
  std::fflush(stdout);
  return seed;
}

}  // namespace tokenlake

#endif  // TOKENLAKE_BASE_RANDOM_TESTING_H_
