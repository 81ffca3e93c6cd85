#include "tokenlake/attention/bf16.h"

#include <cstddef>

#include "absl/strings/str_format.h"

namespace tokenlake::attention {

absl::Status FloatToBf16(absl::Span<const float> in, absl::Span<uint16_t> out) {
  if (in.size() != out.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "FloatToBf16: input has %d elements but output has %d", in.size(), out.size()));
  }
  for (size_t i = 0; i < in.size(); ++i) out[i] = FloatToBf16(in[i]);
  return absl::OkStatus();
}

absl::Status Bf16ToFloat(absl::Span<const uint16_t> in, absl::Span<float> out) {
  if (in.size() != out.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "Bf16ToFloat: input has %d elements but output has %d", in.size(), out.size()));
  }
  for (size_t i = 0; i < in.size(); ++i) out[i] = Bf16ToFloat(in[i]);
  return absl::OkStatus();
}

}  // namespace tokenlake::attention
