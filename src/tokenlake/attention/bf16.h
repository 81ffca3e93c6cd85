// bfloat16 <-> float32 conversion used by the KV storage (bf16 values are stored as their raw
// uint16 bit pattern: the top 16 bits of the IEEE-754 binary32 encoding).
//
// Conventions (identical in the CPU kernels, the CUDA kernels and the engine):
//   - float -> bf16 rounds to nearest, ties to even.
//   - NaN stays NaN (quiet, sign kept); +-inf stay +-inf; values that round past the largest finite
//     bf16 become +-inf (that is what round-to-nearest-even gives).
//   - bf16 -> float is exact (a 16-bit shift).
//
// Thread-safety: every function is pure and thread-safe.
#ifndef TOKENLAKE_ATTENTION_BF16_H_
#define TOKENLAKE_ATTENTION_BF16_H_

#include <bit>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"

namespace tokenlake::attention {

// Returns the bf16 bit pattern nearest to `value` (round to nearest, ties to even).
inline uint16_t FloatToBf16(float value) {
  const uint32_t bits = std::bit_cast<uint32_t>(value);
  if ((bits & 0x7f800000u) == 0x7f800000u && (bits & 0x007fffffu) != 0) {
    // NaN: keep the sign and force a quiet NaN so truncation cannot turn it into an infinity.
    return static_cast<uint16_t>((bits >> 16) | 0x0040u);
  }
  const uint32_t lsb = (bits >> 16) & 1u;
  const uint32_t rounded = bits + 0x7fffu + lsb;
  return static_cast<uint16_t>(rounded >> 16);
}

// Returns the float32 value of the bf16 bit pattern `bits` (exact).
inline float Bf16ToFloat(uint16_t bits) {
  return std::bit_cast<float>(static_cast<uint32_t>(bits) << 16);
}

// Converts every element of `in` into `out` (RNE).
// Returns InvalidArgument when in.size() != out.size().
absl::Status FloatToBf16(absl::Span<const float> in, absl::Span<uint16_t> out);

// Converts every element of `in` into `out` (exact).
// Returns InvalidArgument when in.size() != out.size().
absl::Status Bf16ToFloat(absl::Span<const uint16_t> in, absl::Span<float> out);

}  // namespace tokenlake::attention

#endif  // TOKENLAKE_ATTENTION_BF16_H_
