// The float32 CPU building blocks of the Llama forward pass, matching Hugging Face transformers'
// LlamaForCausalLM numerics (float32):
//   RMSNorm  y = w * (x * rsqrt(mean(x^2) + eps))
//   RoPE     the "rotate_half" (non-interleaved) form: for i < d/2, with
//            inv_freq_i = 1 / theta^(2i/d) and angle = pos * inv_freq_i (both in float32),
//            y_i = x_i cos - x_{i+d/2} sin,  y_{i+d/2} = x_{i+d/2} cos + x_i sin
//   Linear   y = x W^T, W row-major [out][in] (the PyTorch nn.Linear layout)
//   SiLU     x / (1 + exp(-x)); SwiGLU MLP = down(silu(gate(x)) * up(x))
//
// Thread-safety: pure functions over caller buffers.
#ifndef TOKENLAKE_ENGINE_OPS_H_
#define TOKENLAKE_ENGINE_OPS_H_

#include <cstdint>
#include <vector>

#include "absl/types/span.h"

namespace tokenlake::engine {

// y[t] = RMSNorm(x[t]) * weight for each of the x.size() / weight.size() rows.
// REQUIRES: x.size() == y.size(), a multiple of weight.size() > 0. y may alias x.
void RmsNorm(absl::Span<const float> x, absl::Span<const float> weight, float eps,
             absl::Span<float> y);

// The RoPE inverse frequencies for head_dim (head_dim / 2 values), in float32 as transformers
// computes them. REQUIRES: head_dim even, > 0.
std::vector<float> RopeInvFreq(int32_t head_dim, double theta);

// Rotates, in place, x [num_tokens][num_heads][head_dim] where token t has position
// start_pos + t. REQUIRES: inv_freq.size() == head_dim / 2, x.size() == num_tokens * num_heads *
// head_dim.
void ApplyRope(absl::Span<float> x, int32_t num_tokens, int32_t num_heads, int32_t head_dim,
               int64_t start_pos, absl::Span<const float> inv_freq);

// y [n][out] = x [n][in] * W^T with W [out][in]. REQUIRES: sizes consistent; y does not alias x.
void Linear(absl::Span<const float> x, int32_t n, int32_t in, absl::Span<const float> w,
            int32_t out, absl::Span<float> y);

// silu(x)
float Silu(float x);

// Index of the largest value (the first one on ties). REQUIRES: !x.empty().
int32_t Argmax(absl::Span<const float> x);

}  // namespace tokenlake::engine

#endif  // TOKENLAKE_ENGINE_OPS_H_
