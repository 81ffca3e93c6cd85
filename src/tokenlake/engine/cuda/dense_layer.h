// What the forward's dense-layer kernels (SmallBatchGemm, DecodeGemm) read and what they do with
// their sums, shared so that the forward picks a kernel without translating between them.
#ifndef TOKENLAKE_ENGINE_CUDA_DENSE_LAYER_H_
#define TOKENLAKE_ENGINE_CUDA_DENSE_LAYER_H_

#include <cstdint>

namespace tokenlake::engine::cuda {

// With s[t][o] = sum_i w[o][i] * x[t][i] for weight row o and input row t:
//   kStoreF32:     y[t][o]  = s[t][o]                       (float32 out)
//   kAddF32:       y[t][o] += s[t][o]                       (the residual add)
//   kSiluMulBf16:  y16[t][j] = bf16(silu(s[t][j]) * s[t][out + j])
//                  (w holds the gate rows, then the up rows: [2 out][in])
enum class DenseEpilogue : uint8_t { kStoreF32, kAddF32, kSiluMulBf16 };
// The input rows: bf16 bits, or float32 rounded to bf16 (to nearest even) as the kernel reads
// them (which saves the forward a conversion pass: the attention's float32 output feeds o_proj).
enum class DenseInput : uint8_t { kBf16, kF32 };

// Whether a pointer is 16-byte aligned (what the kernels' vector loads need).
inline bool Aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_DENSE_LAYER_H_
