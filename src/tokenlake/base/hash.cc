#include "tokenlake/base/hash.h"

#include <xxhash.h>

namespace tokenlake {

uint64_t HashBytes(const void* data, size_t size, uint64_t seed) {
  return XXH3_64bits_withSeed(data, size, seed);
}

uint64_t HashCombine(uint64_t a, uint64_t b) {
  const uint64_t words[2] = {a, b};
  return XXH3_64bits(words, sizeof(words));
}

}  // namespace tokenlake
