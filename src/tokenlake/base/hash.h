// Fast non-cryptographic hashing (xxHash's XXH3, 64-bit), used for chained segment ids.
//
// Thread-safety: pure functions.
#ifndef TOKENLAKE_BASE_HASH_H_
#define TOKENLAKE_BASE_HASH_H_

#include <cstddef>
#include <cstdint>
#include <string_view>

namespace tokenlake {

// XXH3-64 of `size` bytes at `data`, with `seed`.
uint64_t HashBytes(const void* data, size_t size, uint64_t seed);

inline uint64_t HashString(std::string_view s, uint64_t seed = 0) {
  return HashBytes(s.data(), s.size(), seed);
}

// Combines two 64-bit values into one, order-sensitively (XXH3 of the 16 bytes).
uint64_t HashCombine(uint64_t a, uint64_t b);

}  // namespace tokenlake

#endif  // TOKENLAKE_BASE_HASH_H_
