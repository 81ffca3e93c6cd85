// CUDA partial attention over paged segment blocks, and the merge of partials (sm_90, bf16 KV).
//
// This is the GPU twin of the CPU kernels in attention/attention.h and follows the SAME
// conventions (see /work/shared/design/TOKENLAKE.md section 4.5 and the attention module):
//
// KV layout. A segment of S tokens keeps, per layer, a K block and a V block, each
//   `[S][num_kv_heads][head_dim]` bfloat16 (raw uint16 bits, RNE), row-major, token stride
//   num_kv_heads * head_dim elements. A `DeviceKvBlock` points at one layer's K and V block of one
//   segment (device memory, 16-byte aligned) and says how many leading token rows are valid
//   (a part-segment uses the first num_tokens rows).
// Keys. The keys of a call are the concatenation of its blocks' valid rows, in order, numbered
//   0, 1, ... (so a part-segment in the middle of the list is allowed).
// Queries. `q` is `[num_q_tokens][num_heads][head_dim]` bfloat16 bits, row-major (device).
//   GQA: query head h reads KV head h / (num_heads / num_kv_heads).
// Scores. s = softmax_scale * <q, k>; softmax_scale <= 0 means 1/sqrt(head_dim).
// Causal. With causal = true, key j is visible to query i iff j <= q_start_pos + i. Partials over
//   cached segments use causal = false; the partial over the new tokens' own KV uses causal = true
//   and q_start_pos = 0.
// Output of a partial. `out` is `[num_q_tokens][num_heads][head_dim]` float32, normalised within
//   the partial; `lse` is `[num_q_tokens][num_heads]` float32, NATURAL log:
//   lse = m + log(sum_j exp(s_j - m)). A query with no visible key gets out = 0 and lse = -inf.
// Arithmetic. bf16 operands, float32 accumulation (tensor cores for prefill), float32 softmax.
//   Results match a float64 reference to a relative L2 error of about 1e-3 (bf16 rounding of the
//   softmax probabilities before the P*V product, as flash-attention does).
//
// Kernels. Two implementations of the same function:
//   - prefill: flash-attention-2 tiling, mma.sync m16n8k16 bf16 tensor cores, 64-key tiles
//     double-buffered through cp.async, 16 or 32 query rows per warp, optional split over the
//     block list with a merge; for many query tokens.
//   - decode on tensor cores (the default for head_dim 64/128 and groups of 1, 2, 4 or 8): split-KV
//     as below, but the group's query heads are the rows of one mma.sync m16n8k16 tile (S = Q K^T
//     and O += P V on tensor cores, 16 keys at a time), and every warp of a thread block streams
//     its own 16-key slices through its own cp.async pipeline (no block barrier in the loop);
//     the splits are merged in the kernel as below. See decode_kernel.
//   - decode: split-KV, CUDA cores, every (run of segments or segment chunk, KV head) in its own
//     thread block serving up to 4 query heads of the group, K/V streamed through a 4-stage
//     cp.async shared-memory pipeline (or through registers); the splits are merged inside the
//     same kernel by the last thread block of each (query token, head group) to finish (an
//     atomic counter in the workspace), or by a second kernel; memory-bandwidth bound; for a few
//     query tokens, and the fallback for the shapes the tensor-core decode does not take.
//   - prefill on Hopper (prefill_sm90.cu): wgmma (warpgroup MMA), warp-specialised (a producer
//     warpgroup streams K/V with cp.async into 3 shared-memory stages, two consumer warpgroups
//     compute), 128 rows of (query token, query head of one KV head's group) per thread block,
//     128-key tiles; head_dim 128 and head groups up to 128.
//   Files by family: prefill_mma.cu, prefill_sm90.cu, decode_mma.cu, decode_cuda_core.cu, merge.cu
//   (the split merge and MergePartials*), small_head.cu (head_dim 16 and 32); paged_attention.cu
//   validates, plans and launches.
//   kAuto picks decode for num_q_tokens <= kDecodeMaxQueryTokens or a batched decode
//   (q_block_offsets), else prefill; prefill uses the Hopper kernel on a compute-capability-9
//   device for the shapes it supports (1.77x the mma.sync kernel on an H100 for 1024 new tokens
//   over 32K cached; docs/results-gpu.md), else the mma.sync kernel (see prefill_kernel).
//   The tuning fields below choose among the kernels and depths that the defaults use for some
//   shape; variants measured slower than the defaults and used by none are deleted
//   (docs/results-gpu.md, "Variants measured slower").
//
// Thread-safety: every function is thread-safe; calls on one stream run in stream order. No
// function synchronises the stream; errors of the asynchronous kernels show at the caller's next
// synchronisation. All pointers are device pointers and are borrowed for the duration of the
// enqueued work.
#ifndef TOKENLAKE_ATTENTION_CUDA_PAGED_ATTENTION_H_
#define TOKENLAKE_ATTENTION_CUDA_PAGED_ATTENTION_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"

namespace tokenlake::attention::cuda {

// One layer's K and V block of one segment, in device memory. 24 bytes, trivially copyable: the
// caller builds an array of these and copies it to the device.
struct DeviceKvBlock {
  // `[max_block_tokens][num_kv_heads][head_dim]` bf16 bits, 16-byte aligned, device memory.
  const void* k = nullptr;
  // Same shape, layout and dtype as k.
  const void* v = nullptr;
  // Valid leading token rows, 0 <= num_tokens <= max_block_tokens.
  int32_t num_tokens = 0;
  int32_t reserved = 0;
};
static_assert(sizeof(DeviceKvBlock) == 24);

// Which kernel computes a partial.
enum class AttentionKernel { kAuto, kPrefill, kDecode };

// kAuto uses the decode kernel up to this many query tokens.
inline constexpr int32_t kDecodeMaxQueryTokens = 8;

// Every non-empty workspace begins with this many bytes of completion counters (uint32) used by
// the decode kernel's fused split merge; partial results follow them. These bytes must be zero
// before a call that uses the workspace, and every call that completes leaves them zero again.
// So: zero a workspace once after allocating it (e.g. cudaMemsetAsync(ws, 0, bytes)) and reuse
// it in stream order without clearing. (Nothing else in the workspace needs initialising.)
inline constexpr size_t kPagedAttentionCounterBytes = 4096;

// The arguments of one partial attention: one request's query tokens over one list of blocks.
struct PagedAttentionParams {
  // `[num_q_tokens][num_heads][head_dim]` bf16 bits, device, 16-byte aligned.
  const void* q = nullptr;
  // Number of query tokens (>= 0; 0 enqueues nothing).
  int32_t num_q_tokens = 0;
  // Device array `[num_blocks]` of block descriptors.
  const DeviceKvBlock* blocks = nullptr;
  // Number of blocks (>= 0; 0 gives out = 0, lse = -inf everywhere).
  int32_t num_blocks = 0;
  // S: the capacity of every block in tokens; every blocks[i].num_tokens <= S.
  int32_t max_block_tokens = 0;
  // Query heads; a multiple of num_kv_heads.
  int32_t num_heads = 32;
  // KV heads.
  int32_t num_kv_heads = 8;
  // Elements per head: 64 or 128 (the tuned kernels), or 16 or 32 (a plain CUDA-core kernel,
  // one warp per query token and head, for small test models; no workspace, tuning ignored).
  int32_t head_dim = 128;
  // Score scale; <= 0 means 1/sqrt(head_dim).
  float softmax_scale = 0.0f;
  // Causal masking over the concatenated keys (see the file comment).
  bool causal = false;
  // Position of query 0 in key numbering, for causal masking (>= 0).
  int32_t q_start_pos = 0;
  // Output `[num_q_tokens][num_heads][head_dim]` float32, device. Fully written.
  float* out = nullptr;
  // Output `[num_q_tokens][num_heads]` float32 natural-log LSE, device. Fully written.
  float* lse = nullptr;
  // Caller-owned device scratch of at least PagedAttentionWorkspaceBytes(*this, kernel) bytes,
  // 16-byte aligned; may be null when that size is 0. Its first kPagedAttentionCounterBytes
  // bytes must be zero on entry and are zero again when the call's work completes (see
  // kPagedAttentionCounterBytes); the rest is scratch. Calls sharing one workspace must be
  // ordered (one stream).
  void* workspace = nullptr;
  size_t workspace_bytes = 0;
  // Number of KV splits (thread blocks along the block list) for each query tile; 0 = choose
  // from the device's multiprocessor count. Values above the number of work items are clamped.
  int32_t num_splits = 0;
  // Prefill tuning: warps per thread block, 4 or 8 (each warp takes prefill_rows_per_warp query
  // rows); 0 = choose by num_q_tokens (8 from 512 tokens, else 4).
  int32_t prefill_warps = 0;
  // Prefill tuning: query rows per warp, 16 (Q in registers) or 32 (two m-tiles, Q in shared
  // memory); 0 = default (32 from 512 query tokens, else 16).
  int32_t prefill_rows_per_warp = 0;
  // Prefill implementation: 0 = auto (the Hopper wgmma kernel where it applies, see kAuto in the
  // file comment), 1 = the mma.sync kernel (prefill_warps / prefill_rows_per_warp apply only to
  // it), 2 = the Hopper kernel (the same as 0 today; head_dim 128, a head group of at most 128
  // and a compute-capability-9 device only: other shapes and devices use the mma.sync kernel
  // whatever this says).
  int32_t prefill_kernel = 0;
  // Decode tuning: tokens each token group loads per step (2 or 4); 0 = default (4).
  int32_t decode_unroll = 0;
  // Decode tuning: 1 = loads through registers (one step prefetched), 2 = cp.async pipeline
  // through shared memory (4 stages); 0 = default (2).
  int32_t decode_pipeline = 0;
  // Decode: how the KV splits are merged. 0 = default: inside the decode kernel (the last thread
  // block of each query token and head group to finish merges; no second launch), unless there
  // are more than 64 splits or the counters do not fit in kPagedAttentionCounterBytes (one per
  // query token and thread-block head group, at most 512), then as 1; 1 = a separate merge
  // kernel after the decode kernel.
  int32_t decode_merge = 0;
  // Decode implementation: 0 = auto (the tensor-core kernel where it applies, else the CUDA-core
  // kernels), 1 = the CUDA-core kernels (decode_unroll and decode_pipeline apply to them),
  // 2 = the tensor-core kernel (the same as 0 today)
  // (mma.sync: the group's query heads are the rows of one 16-row tile; every warp streams its
  // own 16-key slices through its own cp.async pipeline; head_dim 64 or 128 and a group
  // (num_heads / num_kv_heads) of 1, 2, 4 or 8 only: other shapes use the CUDA-core kernels
  // whatever this says; decode_unroll and decode_pipeline are ignored by it).
  int32_t decode_kernel = 0;
  // Decode, tensor-core kernel: cp.async pipeline stages per warp (16 keys of K and V each),
  // 2, 3 or 4 (head_dim 128; always 3 for head_dim 64); 0 = default: 2 when max_block_tokens <
  // 256, else 4 (one thread block per multiprocessor), or 3 (two per multiprocessor) when
  // num_kv_heads * num_q_tokens exceeds the multiprocessor count (measured best on an H100).
  int32_t decode_mma_stages = 0;
  // Decode, tensor-core kernel: where the block descriptors are read in the load loop. 0 =
  // default: 1 with 4 stages and more than 4 segments per thread block, else 2 (measured on an
  // H100); 1 = the first 64 of each thread block's run copied into shared memory at the start;
  // 2 = from global memory at every segment (head_dim 128 and a group of 4 only: other shapes
  // use 1 whatever this says).
  int32_t decode_mma_descriptors = 0;
  // Programmatic dependent launch (PDL, compute capability 9): how the tensor-core decode kernel
  // may overlap the kernel before it on the stream. 0 = off (default): an ordinary launch.
  // 1 = launched with cudaLaunchAttributeProgrammaticStreamSerialization: its thread blocks may
  // be scheduled while the previous kernel drains (once every block of that kernel has executed
  // griddepcontrol.launch_dependents, as this kernel's blocks do after their key loop, or
  // exited), and each waits (griddepcontrol.wait: the previous kernel complete, its writes
  // visible) before its first global-memory access; this hides the launch and the previous
  // kernel's tail. 2 = as 1, but the caller promises that the kernel immediately before this
  // one on the stream writes neither `blocks`, `q_block_offsets` nor the K/V they point to
  // (pooled segments are immutable once stored), so each warp issues its first pipeline
  // stages' copies before waiting; q, out, lse, the extras and the workspace are still touched
  // only after the wait. Other kernels (prefill, CUDA-core decode, separate merges) launch as
  // usual whatever this says. On a stream whose previous kernel never signals, the kernel starts
  // when that kernel completes, as without PDL. In a CUDA graph the launch attribute becomes a
  // programmatic edge.
  int32_t pdl = 0;
  // Batched decode: null (every query token sees all blocks), or a device array of
  // num_q_tokens + 1 ascending offsets into `blocks`: query token i (one request's token) then
  // attends to blocks [q_block_offsets[i], q_block_offsets[i + 1]) only, so one launch serves
  // many requests, each with its own block list (q, out and lse rows are the requests). Uses the
  // decode kernels whatever num_q_tokens is (the CUDA-core ones with their shared-memory
  // pipeline: decode_pipeline is ignored); each request's blocks are cut into the same number of
  // splits. Not with causal (InvalidArgument).
  // REQUIRES: 0 <= offsets[0] <= ... <= offsets[num_q_tokens] <= num_blocks (device contents
  // are not checked).
  const int32_t* q_block_offsets = nullptr;
  // Extra partials to merge into the result (e.g. other instances' partials of the same query
  // tokens over other keys): 0 = none. With num_extra = N > 0, out / lse are the LSE merge of
  // this call's partial over `blocks` and the N extras, exactly what MergePartialsN over the N + 1
  // partials gives (an extra with lse -inf contributes nothing; all -inf: out 0, lse -inf).
  // The decode kernels fold the extras into their own merge (the fused split merge, the
  // separate split-merge kernel, or the single-split epilogue: no extra launch); prefill, the
  // small-head kernel and num_blocks == 0 add one merge launch after the kernel.
  int32_t num_extra = 0;
  // `[num_extra][num_q_tokens][num_heads][head_dim]` float32, device, 16-byte aligned; required
  // when num_extra > 0. Must not overlap out, lse or the workspace.
  const float* extra_out = nullptr;
  // `[num_extra][num_q_tokens][num_heads]` float32 natural-log LSE, device; required when
  // num_extra > 0. Must not overlap out, lse or the workspace.
  const float* extra_lse = nullptr;
};

namespace internal {

// How one call runs: the kernel, its tiling and splits, and its workspace. Plain data chosen by
// PagedAttentionPlan::Create from the call's shape and the device; private to the library (it
// is here so that a plan is a plain value; its fields may change with the kernels).
struct LaunchConfig {
  AttentionKernel kernel = AttentionKernel::kPrefill;
  int prefill_warps = 4;      // prefill, mma.sync: warps per thread block
  int prefill_mt = 1;         // prefill: 16-row m-tiles per warp
  int splits = 1;             // prefill: splits of the block list
  bool prefill_sm90 = false;  // prefill: the wgmma kernel of prefill_sm90.cu
  int chunks_per_block = 1;   // decode
  int chunk_tokens = 0;       // decode
  int items = 1;              // decode: num_blocks * chunks_per_block
  int decode_g = 1;
  int blocks_per_item = 1;     // decode
  int decode_unroll = 4;       // decode: tokens per token group per step
  bool decode_smem = true;     // decode: shared-memory pipeline kernel
  bool decode_fused = false;   // decode: splits merged inside the decode kernel
  bool decode_mma = false;     // decode: the tensor-core kernel (DecodeMmaKernel)
  int decode_mma_stages = 3;   // decode, tensor-core kernel: pipeline stages per warp
  int decode_mma_desc = 1;     // decode, tensor-core kernel: decode_mma_descriptors (1-2, resolved)
  size_t workspace_bytes = 0;  // kPagedAttentionCounterBytes + partials, or 0
};

}  // namespace internal

// A launch plan: what PagedAttention chooses for one shape of call (kernel, tiling, split
// counts, grid, workspace size), computed once and reused by every call of that shape, e.g. the
// layers of one forward pass, which differ only in their K/V descriptors, queries and outputs
// (FlashInfer's plan / run). Run enqueues exactly what PagedAttention would for the same params,
// so results are bit-identical. A plain value (cheap to copy); made for the device that is
// current at Create, and valid for calls on that device.
//
// Thread-safety: Create is thread-safe; Run is const and thread-safe (calls on one stream run in
// stream order, and calls sharing a workspace must be ordered, as for PagedAttention).
class PagedAttentionPlan {
 public:
  // Plans calls shaped like `shape`: every field of PagedAttentionParams counts except the
  // pointers q, blocks, out, lse, workspace, extra_out and extra_lse and workspace_bytes; of
  // q_block_offsets only whether it is null (a batched decode) counts. The pointers may be null
  // here; Run checks them.
  // Errors: InvalidArgument for an invalid shape (as PagedAttention, before any device access),
  // Internal on a CUDA error while reading the device properties.
  static absl::StatusOr<PagedAttentionPlan> Create(const PagedAttentionParams& shape,
                                                   AttentionKernel kernel = AttentionKernel::kAuto);

  // The scratch every Run needs (PagedAttentionWorkspaceBytes of the shape): params.workspace
  // of at least this many bytes, prepared as PagedAttentionParams::workspace says.
  size_t workspace_bytes() const { return config_.workspace_bytes; }

  // Enqueues params on `stream` as PagedAttention(params, kernel, stream) would.
  // Errors (nothing is enqueued): InvalidArgument naming the first field in which params'
  // shape differs from the planned one, a null pointer the call needs, or a workspace smaller
  // than workspace_bytes(); Internal when a launch fails.
  // REQUIRES: as PagedAttention.
  absl::Status Run(const PagedAttentionParams& params, cudaStream_t stream = nullptr) const;

 private:
  PagedAttentionPlan(const PagedAttentionParams& shape, const internal::LaunchConfig& config)
      : shape_(shape), config_(config) {}

  PagedAttentionParams shape_;  // (pointers as given to Create; only their shape fields count)
  internal::LaunchConfig config_;
};

// Returns the scratch size that PagedAttention(params, kernel) needs on the current device.
// Errors: InvalidArgument when params' shape is invalid (see PagedAttention), Internal on a
// CUDA error while reading the device properties.
absl::StatusOr<size_t> PagedAttentionWorkspaceBytes(
    const PagedAttentionParams& params, AttentionKernel kernel = AttentionKernel::kAuto);

// Enqueues the partial attention described by `params` on `stream`: the same as
// PagedAttentionPlan::Create(params, kernel) and Run(params, stream), planning at every call (a
// caller that makes many calls of one shape plans once).
// Errors (nothing is enqueued): InvalidArgument naming the field when a size is negative,
// num_heads is not a positive multiple of num_kv_heads, head_dim is not 16, 32, 64 or 128, a tuning
// field is out of range, a needed pointer is null, or the workspace is too small; Internal when
// a launch fails.
// REQUIRES: the device memory the pointers name is as documented above (the kernels cannot
// check device contents: a block with num_tokens > max_block_tokens reads out of bounds).
absl::Status PagedAttention(const PagedAttentionParams& params,
                            AttentionKernel kernel = AttentionKernel::kAuto,
                            cudaStream_t stream = nullptr);

// In-place merge of two partials over disjoint key sets: (out_a, lse_a) <- merge(a, b).
// out_* are `[num_rows][head_dim]` float32, lse_* `[num_rows]` float32 natural log (a row is
// one (query token, head) pair). lse = log(exp(lse_a) + exp(lse_b)) from the max;
// out = exp(lse_a - lse) out_a + exp(lse_b - lse) out_b; a -inf partial contributes nothing; two
// -inf partials give out 0 and lse -inf.
// Errors: InvalidArgument for num_rows < 0, head_dim not a positive multiple of 4, or a null
// pointer with num_rows > 0; Internal when the launch fails.
absl::Status MergePartials(float* out_a, float* lse_a, const float* out_b, const float* lse_b,
                           int64_t num_rows, int32_t head_dim, cudaStream_t stream = nullptr);

// N-way merge: `outs` is `[num_partials][num_rows][head_dim]` float32 and `lses`
// `[num_partials][num_rows]`; writes the merged `[num_rows][head_dim]` and `[num_rows]` to
// out and lse (which must not alias the inputs). num_partials == 0 gives out 0, lse -inf.
// Errors as MergePartials, plus InvalidArgument for num_partials < 0.
absl::Status MergePartialsN(const float* outs, const float* lses, int32_t num_partials,
                            int64_t num_rows, int32_t head_dim, float* out, float* lse,
                            cudaStream_t stream = nullptr);

}  // namespace tokenlake::attention::cuda

#endif  // TOKENLAKE_ATTENTION_CUDA_PAGED_ATTENTION_H_
