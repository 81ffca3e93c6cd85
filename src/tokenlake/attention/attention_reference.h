// The naive, obviously-correct reference for attention.h: full materialised scores per
// (query, head), double accumulation, no tiling, no threads. Used by the tests of the fast CPU
// path and of the CUDA kernels. Slow: for tests only.
//
// Thread-safety: reentrant (no shared state).
#ifndef TOKENLAKE_ATTENTION_ATTENTION_REFERENCE_H_
#define TOKENLAKE_ATTENTION_ATTENTION_REFERENCE_H_

#include <cstdint>

#include "absl/status/status.h"
#include "absl/types/span.h"
#include "tokenlake/attention/attention.h"

namespace tokenlake::attention {

// Same contract, shapes and errors as PartialAttention (attention.h), computed naively: for each
// (query i, head h) the scores of every visible key are materialised in double, m = max,
// l = sum exp(s - m), out = sum exp(s - m) v / l, lse = m + log(l), then rounded to float.
absl::Status ReferencePartialAttention(const AttentionParams& params, int32_t num_q_tokens,
                                       absl::Span<const float> q, absl::Span<const KvBlock> blocks,
                                       absl::Span<float> out, absl::Span<float> lse);

}  // namespace tokenlake::attention

#endif  // TOKENLAKE_ATTENTION_ATTENTION_REFERENCE_H_
