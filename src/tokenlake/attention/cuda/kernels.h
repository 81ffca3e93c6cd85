// Private to the attention_cuda library: what the kernel families (prefill_mma.cu,
// prefill_sm90.cu, decode_mma.cu, decode_cuda_core.cu, merge.cu, small_head.cu) share with the
// dispatcher (paged_attention.cu): the numerical constants, the device properties a launch
// configuration (internal::LaunchConfig, paged_attention.h) is chosen from, and each family's
// host entry points.
//
// Thread-safety: every function is thread-safe (the once-per-process kernel attributes and
// occupancy figures are function-local statics, the device properties a mutex-guarded cache).
#ifndef TOKENLAKE_ATTENTION_CUDA_KERNELS_H_
#define TOKENLAKE_ATTENTION_CUDA_KERNELS_H_

#include <cuda_runtime_api.h>

#include <cmath>
#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tokenlake/attention/cuda/paged_attention.h"

namespace tokenlake::attention::cuda::internal {

// Numerics: scores are kept in the log2 domain (s2 = s * scale * log2(e)) so that exp2f does the
// exponentials; the natural-log LSE written out is (m2 + log2(l)) * ln(2).
inline constexpr float kLog2e = 1.4426950408889634f;
inline constexpr float kLn2 = 0.6931471805599453f;
inline constexpr float kNegInf = -INFINITY;

// The fused split merge handles at most this many splits (more: a separate merge kernel).
inline constexpr int kMaxFusedItems = 64;
// ... and at most this many merge counters (one per query token and thread-block head group; the
// bound paged_attention.h documents for decode_merge).
inline constexpr int kMaxFusedCounters = static_cast<int>(kPagedAttentionCounterBytes / 8);

// Device properties, read once per device.
struct DeviceInfo {
  int num_sms = 0;
  int max_smem_optin = 0;
  int cc_major = 0;  // compute capability (9 = Hopper: the wgmma prefill kernel can run)
};

// The current device's properties. Errors: Internal on a CUDA error.
absl::StatusOr<DeviceInfo> GetDeviceInfo();

// OK, or Internal naming `what` when the last launch failed (clears CUDA's last error).
absl::Status LaunchStatus(const char* what);

// The arguments of the decode kernels (decode_common.cuh).
struct DecodeArgs;

// ---- prefill_mma.cu: the mma.sync prefill kernels.
// Thread blocks of the configuration's kernel per multiprocessor (head_dim 64 or 128, warps 4
// or 8, m_tiles 1 or 2). Errors: Internal on a CUDA error.
absl::StatusOr<int> PrefillMmaBlocksPerSm(int head_dim, int warps, int m_tiles);
// Enqueues the kernel of c (prefill_warps, prefill_mt, splits) writing out / lse (split s at
// out + s * rows * head_dim and lse + s * rows when c.splits > 1). scale_log2 = softmax scale *
// log2(e). Errors: Internal when the launch fails.
// REQUIRES: p validated, head_dim 64 or 128, num_q_tokens > 0, num_blocks > 0.
absl::Status LaunchPrefillMma(const PagedAttentionParams& p, const LaunchConfig& c,
                              float scale_log2, float* out, float* lse, cudaStream_t stream);

// ---- decode_mma.cu: the tensor-core decode kernel.
// True for the shapes it serves (head_dim 64 or 128, a group of 1, 2, 4 or 8).
bool DecodeMmaSupports(const PagedAttentionParams& p);
// Thread blocks per multiprocessor for a group g, `stages` pipeline stages and descriptor mode
// (1 cache, 2 global). Errors: Internal on a CUDA error.
absl::StatusOr<int> DecodeMmaBlocksPerSm(int head_dim, int g, int stages, int desc_mode);
// Enqueues the kernel of c with a (grid: c.items x num_kv_heads x num_q_tokens; with p.pdl > 0
// as a programmatic dependent launch). Errors: Internal when the launch fails.
// REQUIRES: c.decode_mma.
absl::Status LaunchDecodeMma(const PagedAttentionParams& p, const LaunchConfig& c,
                             const DecodeArgs& a, cudaStream_t stream);

// ---- decode_cuda_core.cu: the CUDA-core decode kernels.
// Thread blocks per multiprocessor for G = g query heads per block, `unroll` tokens per token
// group and step, and the shared-memory pipeline (smem) or registers. Errors: Internal.
absl::StatusOr<int> DecodeCudaCoreBlocksPerSm(int head_dim, int g, int unroll, bool smem);
// Enqueues the kernel of c (decode_g, decode_unroll, decode_smem) with a. Errors: Internal.
// REQUIRES: !c.decode_mma, head_dim 64 or 128.
absl::Status LaunchDecodeCudaCore(const PagedAttentionParams& p, const LaunchConfig& c,
                                  const DecodeArgs& a, cudaStream_t stream);

// ---- merge.cu: merges of partials.
// Merges `parts` partials of `rows` rows of d (64 or 128) floats into out / lse: partial p of row
// r at o + p * o_part_stride + r * o_row_stride and l + p * l_part_stride + r * l_row_stride,
// then the num_extra extras (extra e of row r at extra_out + (e * rows + r) * d, extra_lse +
// e * rows + r). Errors: Internal when the launch fails.
absl::Status LaunchMergeSplits(const float* o, int64_t o_part_stride, int64_t o_row_stride,
                               const float* l, int64_t l_part_stride, int64_t l_row_stride,
                               int parts, int64_t rows, int d, float* out, float* lse,
                               cudaStream_t stream, const float* extra_out = nullptr,
                               const float* extra_lse = nullptr, int num_extra = 0);
// Merges p's extra partials (num_extra > 0) into p.out / p.lse in place (paths that do not fold
// them into their own merge); nothing for num_extra == 0 or rows == 0. Errors: Internal.
absl::Status LaunchMergeExtras(const PagedAttentionParams& p, int64_t rows, cudaStream_t stream);
// Fills out `[rows][d]` with 0 and lse `[rows]` with -inf. Errors: Internal.
absl::Status LaunchFillEmpty(float* out, float* lse, int64_t rows, int d, cudaStream_t stream);

// ---- small_head.cu: head_dim 16 and 32.
// Enqueues the one-warp-per-(token, head) kernel writing p.out / p.lse (scale: the softmax
// scale, natural base). Errors: Internal. REQUIRES: p validated, head_dim 16 or 32,
// num_q_tokens > 0.
absl::Status LaunchSmallHead(const PagedAttentionParams& p, float scale, cudaStream_t stream);

}  // namespace tokenlake::attention::cuda::internal

#endif  // TOKENLAKE_ATTENTION_CUDA_KERNELS_H_
