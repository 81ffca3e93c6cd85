// PagedAttention's dispatcher: validation, the launch configuration (kernel, tiling, splits,
// workspace) chosen from the call's shape and the device, and the launch sequence (kernel,
// then the split merge or the fold of extra partials where the kernel does not do it). The
// kernels live by family: prefill_mma.cu, prefill_sm90.cu, decode_mma.cu, decode_cuda_core.cu,
// merge.cu, small_head.cu (kernels.h lists their entry points).
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/decode_common.cuh"
#include "tokenlake/attention/cuda/kernels.h"
#include "tokenlake/attention/cuda/paged_attention.h"
#include "tokenlake/attention/cuda/prefill_sm90.h"

namespace tokenlake::attention::cuda {
namespace internal {

absl::StatusOr<DeviceInfo> GetDeviceInfo() {
  static std::mutex mu;
  static std::vector<DeviceInfo> cache;
  int device = 0;
  cudaError_t err = cudaGetDevice(&device);
  if (err != cudaSuccess) {
    return absl::InternalError(absl::StrFormat("cudaGetDevice: %s", cudaGetErrorString(err)));
  }
  std::lock_guard<std::mutex> lock(mu);
  if (static_cast<int>(cache.size()) <= device) cache.resize(device + 1);
  if (cache[device].num_sms == 0) {
    DeviceInfo info;
    err = cudaDeviceGetAttribute(&info.num_sms, cudaDevAttrMultiProcessorCount, device);
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&info.max_smem_optin, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                   device);
    }
    if (err == cudaSuccess) {
      err = cudaDeviceGetAttribute(&info.cc_major, cudaDevAttrComputeCapabilityMajor, device);
    }
    if (err != cudaSuccess) {
      return absl::InternalError(
          absl::StrFormat("cudaDeviceGetAttribute: %s", cudaGetErrorString(err)));
    }
    cache[device] = info;
  }
  return cache[device];
}

absl::Status LaunchStatus(const char* what) {
  cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return absl::InternalError(absl::StrFormat("%s launch: %s", what, cudaGetErrorString(err)));
  }
  return absl::OkStatus();
}

}  // namespace internal

namespace {

using internal::DecodeArgs;
using internal::LaunchConfig;

// The checks of the shape fields (every field but the pointers; see PagedAttentionPlan).
absl::Status ValidateShape(const PagedAttentionParams& p, AttentionKernel kernel) {
  if (p.num_q_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedAttention: num_q_tokens = %d < 0", p.num_q_tokens));
  }
  if (p.num_blocks < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedAttention: num_blocks = %d < 0", p.num_blocks));
  }
  if (p.num_kv_heads <= 0 || p.num_heads <= 0 || p.num_heads % p.num_kv_heads != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: num_heads = %d must be a positive multiple of num_kv_heads = %d",
        p.num_heads, p.num_kv_heads));
  }
  if (p.head_dim != 16 && p.head_dim != 32 && p.head_dim != 64 && p.head_dim != 128) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedAttention: head_dim = %d, supported: 16, 32, 64, 128", p.head_dim));
  }
  if (p.num_blocks > 0 && p.max_block_tokens <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedAttention: max_block_tokens = %d must be > 0", p.max_block_tokens));
  }
  if (p.q_start_pos < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedAttention: q_start_pos = %d < 0", p.q_start_pos));
  }
  if (p.num_q_tokens > 65535 && kernel == AttentionKernel::kDecode) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: num_q_tokens = %d > 65535 with the decode kernel", p.num_q_tokens));
  }
  if (p.prefill_kernel < 0 || p.prefill_kernel > 2) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: prefill_kernel = %d, supported: 0 (auto), 1 (mma.sync), 2 (sm90 wgmma)",
        p.prefill_kernel));
  }
  if (p.prefill_warps != 0 && p.prefill_warps != 4 && p.prefill_warps != 8) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: prefill_warps = %d, supported: 0 (auto), 4, 8", p.prefill_warps));
  }
  if (p.decode_unroll != 0 && p.decode_unroll != 2 && p.decode_unroll != 4) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: decode_unroll = %d, supported: 0 (auto), 2, 4", p.decode_unroll));
  }
  if (p.decode_pipeline < 0 || p.decode_pipeline > 2) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: decode_pipeline = %d, supported: 0 (auto), 1, 2", p.decode_pipeline));
  }
  if (p.prefill_rows_per_warp != 0 && p.prefill_rows_per_warp != 16 &&
      p.prefill_rows_per_warp != 32) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedAttention: prefill_rows_per_warp = %d, supported: 0 (auto), 16, 32",
                        p.prefill_rows_per_warp));
  }
  if (p.q_block_offsets != nullptr) {
    if (p.causal) {
      return absl::InvalidArgumentError(
          "PagedAttention: q_block_offsets (batched decode) with causal = true is not supported");
    }
    if (kernel == AttentionKernel::kPrefill) {
      return absl::InvalidArgumentError(
          "PagedAttention: q_block_offsets (batched decode) needs the decode kernel, not prefill");
    }
    if (p.num_q_tokens > 65535) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "PagedAttention: num_q_tokens = %d > 65535 with q_block_offsets", p.num_q_tokens));
    }
  }
  if (p.decode_kernel < 0 || p.decode_kernel > 2) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: decode_kernel = %d, supported: 0 (auto), 1 (CUDA cores), 2 (tensor "
        "cores)",
        p.decode_kernel));
  }
  if (p.decode_mma_stages != 0 && (p.decode_mma_stages < 2 || p.decode_mma_stages > 4)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedAttention: decode_mma_stages = %d, supported: 0 (auto), 2, 3, 4",
                        p.decode_mma_stages));
  }
  if (p.pdl < 0 || p.pdl > 2) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: pdl = %d, supported: 0 (off), 1 (wait first), 2 (prefetch K/V, then "
        "wait)",
        p.pdl));
  }
  if (p.decode_mma_descriptors < 0 || p.decode_mma_descriptors > 2) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: decode_mma_descriptors = %d, supported: 0 (auto), 1 (cached), 2 (global)",
        p.decode_mma_descriptors));
  }
  if (p.decode_merge < 0 || p.decode_merge > 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: decode_merge = %d, supported: 0 (fused), 1 (separate kernel)",
        p.decode_merge));
  }
  if (p.num_splits < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedAttention: num_splits = %d < 0", p.num_splits));
  }
  if (p.num_extra < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedAttention: num_extra = %d < 0", p.num_extra));
  }
  return absl::OkStatus();
}

// The checks of the pointers a call with p's shape needs.
absl::Status ValidatePointers(const PagedAttentionParams& p) {
  if (p.num_extra > 0 && p.num_q_tokens > 0 && p.extra_out == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: extra_out must not be null with num_extra = %d", p.num_extra));
  }
  if (p.num_extra > 0 && p.num_q_tokens > 0 && p.extra_lse == nullptr) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: extra_lse must not be null with num_extra = %d", p.num_extra));
  }
  if (p.num_q_tokens > 0) {
    if (p.out == nullptr || p.lse == nullptr) {
      return absl::InvalidArgumentError("PagedAttention: out and lse must not be null");
    }
    if (p.num_blocks > 0 && (p.q == nullptr || p.blocks == nullptr)) {
      return absl::InvalidArgumentError("PagedAttention: q and blocks must not be null");
    }
  }
  return absl::OkStatus();
}

// The launch configuration of p's shape on the current device. With check_pointers the pointer
// errors come before any device access, as PagedAttention has always reported them.
absl::StatusOr<LaunchConfig> ChooseConfig(const PagedAttentionParams& p, AttentionKernel kernel,
                                          bool check_pointers) {
  if (absl::Status s = ValidateShape(p, kernel); !s.ok()) return s;
  if (check_pointers) {
    if (absl::Status s = ValidatePointers(p); !s.ok()) return s;
  }
  LaunchConfig c;
  if (p.num_q_tokens == 0 || p.num_blocks == 0) return c;
  if (p.head_dim < 64) return c;  // SmallHeadKernel: no workspace
  absl::StatusOr<internal::DeviceInfo> info = internal::GetDeviceInfo();
  if (!info.ok()) return info.status();
  const int num_sms = std::max(1, info->num_sms);
  if (kernel == AttentionKernel::kAuto) {
    kernel = p.num_q_tokens <= kDecodeMaxQueryTokens || p.q_block_offsets != nullptr
                 ? AttentionKernel::kDecode
                 : AttentionKernel::kPrefill;
  }
  c.kernel = kernel;
  const int group = p.num_heads / p.num_kv_heads;
  if (kernel == AttentionKernel::kPrefill) {
    c.prefill_warps = p.prefill_warps != 0 ? p.prefill_warps : (p.num_q_tokens >= 512 ? 8 : 4);
    // Two m-tiles per warp (32 rows) measured 11% faster on an H100 for 1024 x 32K
    // (docs/results-gpu.md); with few query tokens the larger tile wastes rows.
    c.prefill_mt =
        p.prefill_rows_per_warp == 32 || (p.prefill_rows_per_warp == 0 && p.num_q_tokens >= 512)
            ? 2
            : 1;
    const int br = 16 * c.prefill_mt * c.prefill_warps;
    // The wgmma kernel (prefill_sm90.cu) on Hopper for the shapes it supports, unless the
    // mma.sync kernel is asked for (prefill_kernel = 1): 994 us vs 1763 us on an H100 for 1024
    // new tokens over 32K cached (docs/results-gpu.md).
    c.prefill_sm90 =
        p.prefill_kernel != 1 && info->cc_major == 9 && internal::Sm90PrefillSupports(p);
    const int64_t ctas = c.prefill_sm90
                             ? internal::Sm90PrefillBlocksPerSplit(p)
                             : static_cast<int64_t>((p.num_q_tokens + br - 1) / br) * p.num_heads;
    absl::StatusOr<int> per_sm =
        c.prefill_sm90 ? 1
                       : internal::PrefillMmaBlocksPerSm(p.head_dim, c.prefill_warps, c.prefill_mt);
    if (!per_sm.ok()) return per_sm.status();
    const int64_t slots = static_cast<int64_t>(num_sms) * std::max(1, *per_sm);
    int splits = p.num_splits;
    if (splits == 0) {
      // Pick the split count with the best wave efficiency, preferring fewer splits.
      double best = 0.0;
      splits = 1;
      for (int s = 1; s <= 8; ++s) {
        const double waves = static_cast<double>(ctas * s) / static_cast<double>(slots);
        const double eff = waves / std::ceil(waves) - 0.02 * (s - 1);
        if (eff > best + 1e-9) {
          best = eff;
          splits = s;
        }
      }
    }
    splits = std::max(1, std::min(splits, p.num_blocks));
    const int bps = (p.num_blocks + splits - 1) / splits;
    c.splits = (p.num_blocks + bps - 1) / bps;
    if (c.splits > 1) {
      const int64_t rows = static_cast<int64_t>(p.num_q_tokens) * p.num_heads;
      c.workspace_bytes = static_cast<size_t>(c.splits) * rows * (p.head_dim + 1) * sizeof(float);
      c.workspace_bytes = kPagedAttentionCounterBytes + (c.workspace_bytes + 255) / 256 * 256;
    }
  } else {
    // (G = 8 would spill registers: a group of 8 uses two thread blocks of 4 heads.)
    c.decode_g = group % 4 == 0 ? 4 : group % 2 == 0 ? 2 : 1;
    c.decode_unroll = p.decode_unroll != 0 ? p.decode_unroll : 4;
    const bool batched = p.q_block_offsets != nullptr;
    c.decode_smem = p.decode_pipeline != 1 || batched;
    // The tensor-core kernel unless the CUDA-core kernels are asked for (decode_kernel = 1), for
    // the shapes it supports: 53-54 us against 57 us for one token over 32K pooled tokens on an
    // H100 (docs/results-gpu.md).
    c.decode_mma = p.decode_kernel != 1 && internal::DecodeMmaSupports(p);
    if (c.decode_mma) {
      c.decode_g = group;  // one thread block serves the whole group of a KV head
      c.decode_unroll = 4;
      c.decode_smem = true;
      // Default depth (measured on an H100, one token over 32K pooled tokens, 2-4 stages with and
      // without the descriptor cache in one run; docs/results-gpu.md): 4 stages (one
      // 128 KiB block per SM) for segments of 256 rows or more, else 2 (up to three 64 KiB blocks
      // per SM: more warps to cover the per-segment descriptor reads); 3 (two blocks per SM)
      // where the thread blocks of one split would not fit one per SM (batched decode of many
      // requests: 32 x 1K tokens took two waves with 4 stages).
      const int64_t mma_ctas = static_cast<int64_t>(p.num_kv_heads) * p.num_q_tokens;
      c.decode_mma_stages = p.decode_mma_stages != 0   ? p.decode_mma_stages
                            : p.max_block_tokens < 256 ? 2
                            : mma_ctas > num_sms       ? 3
                                                       : 4;
      if (p.head_dim != 128) c.decode_mma_stages = 3;  // (other depths instantiated for 128)
      // (Decided below for the default; the occupancy does not depend on it.)
      c.decode_mma_desc = p.decode_mma_descriptors != 0 ? p.decode_mma_descriptors : 1;
    }
    const int64_t ctas_per_item =
        static_cast<int64_t>(p.num_kv_heads) * (group / c.decode_g) * p.num_q_tokens;
    absl::StatusOr<int> per_sm =
        c.decode_mma ? internal::DecodeMmaBlocksPerSm(p.head_dim, c.decode_g, c.decode_mma_stages,
                                                      c.decode_mma_desc)
                     : internal::DecodeCudaCoreBlocksPerSm(p.head_dim, c.decode_g, c.decode_unroll,
                                                           c.decode_smem);
    if (!per_sm.ok()) return per_sm.status();
    // About two thread blocks per multiprocessor (capped by occupancy): measured on an H100
    // (docs/results-gpu.md) this beat both a full occupancy wave and finer splits, which only
    // add partials to merge and per-block start-up cost.
    const int64_t wave = static_cast<int64_t>(num_sms) * std::min(2, std::max(1, *per_sm));
    const int64_t target_items =
        p.num_splits > 0 ? p.num_splits : std::max<int64_t>(1, wave / ctas_per_item);
    int cpb = 1, bpi = 1;
    if (batched) {
      // Each request splits its own blocks into `items` runs (in the kernel); no chunks.
      bpi = 1;
    } else if (target_items >= p.num_blocks) {
      cpb = static_cast<int>(std::min<int64_t>(target_items / p.num_blocks, 1 << 16));
    } else {
      bpi = static_cast<int>((p.num_blocks + target_items - 1) / target_items);
    }
    // Chunks of at least 64 tokens, multiples of 16.
    int chunk = (p.max_block_tokens + cpb - 1) / cpb;
    chunk = std::max(64, (chunk + 15) / 16 * 16);
    chunk = std::min(chunk, p.max_block_tokens);
    c.chunk_tokens = chunk;
    c.chunks_per_block = (p.max_block_tokens + chunk - 1) / chunk;
    c.blocks_per_item = bpi;
    c.items = ((p.num_blocks + bpi - 1) / bpi) * c.chunks_per_block;
    if (batched) {
      c.chunk_tokens = p.max_block_tokens;
      c.chunks_per_block = 1;
      c.blocks_per_item = 0;  // per request, in the kernel
      c.items =
          static_cast<int>(std::max<int64_t>(1, std::min<int64_t>(target_items, p.num_blocks)));
    }
    // One merge counter per (query token, head group).
    const bool counters_fit = ctas_per_item <= internal::kMaxFusedCounters;
    if (c.items > 1) {
      const int64_t rows = static_cast<int64_t>(p.num_q_tokens) * p.num_heads;
      c.workspace_bytes = static_cast<size_t>(c.items) * rows * (p.head_dim + 1) * sizeof(float);
      c.workspace_bytes = kPagedAttentionCounterBytes + (c.workspace_bytes + 255) / 256 * 256;
      c.decode_fused = p.decode_merge == 0 && c.items <= internal::kMaxFusedItems && counters_fit;
    }
    if (c.decode_mma && p.decode_mma_descriptors == 0) {
      // The descriptor cache paid off only with 4 stages (4 warps per SM) and runs of more than
      // 4 segments per thread block (256-token segments: 52.6 vs 53.1 us back to back; 64: 53.4
      // vs 56.1); with 4 segments per block (512) or 2 stages (8 warps per SM) it cost 0.5 us.
      c.decode_mma_desc = c.decode_mma_stages == 4 && c.blocks_per_item > 4 ? 1 : 2;
    }
  }
  return c;
}

// The decode kernels' arguments for p under c, partials (several items) to out / lse.
DecodeArgs MakeDecodeArgs(const PagedAttentionParams& p, const LaunchConfig& c, float scale_log2,
                          float* out, float* lse) {
  DecodeArgs a;
  a.q = static_cast<const uint16_t*>(p.q);
  a.blocks = p.blocks;
  a.num_blocks = p.num_blocks;
  a.chunks_per_block = c.chunks_per_block;
  a.chunk_tokens = c.chunk_tokens;
  a.blocks_per_item = c.blocks_per_item;
  a.num_items = c.items;
  a.num_q = p.num_q_tokens;
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.group = p.num_heads / p.num_kv_heads;
  a.scale_log2 = scale_log2;
  a.causal = p.causal ? 1 : 0;
  a.q_start_pos = p.q_start_pos;
  a.out = out;
  a.lse = lse;
  a.counters = nullptr;
  a.final_out = p.out;
  a.final_lse = p.lse;
  a.q_block_offsets = p.q_block_offsets;
  a.extra_out = p.extra_out;
  a.extra_lse = p.extra_lse;
  a.num_extra = p.num_extra;
  a.extra_rows = static_cast<int64_t>(p.num_q_tokens) * p.num_heads;
  a.pdl = p.pdl;
  if (c.items > 1 && c.decode_fused) {
    a.counters = static_cast<unsigned int*>(p.workspace);
  }
  return a;
}

// The name of the first shape field (see PagedAttentionPlan::Create) in which a and b differ,
// or null when they have the same shape.
const char* ShapeMismatch(const PagedAttentionParams& a, const PagedAttentionParams& b) {
  // A field added to PagedAttentionParams must be compared here (or named a pointer in
  // PagedAttentionPlan::Create's comment).
  static_assert(sizeof(PagedAttentionParams) == 168, "compare the new field below");
#define TOKENLAKE_SAME(field) \
  if (a.field != b.field) return #field
  TOKENLAKE_SAME(num_q_tokens);
  TOKENLAKE_SAME(num_blocks);
  TOKENLAKE_SAME(max_block_tokens);
  TOKENLAKE_SAME(num_heads);
  TOKENLAKE_SAME(num_kv_heads);
  TOKENLAKE_SAME(head_dim);
  TOKENLAKE_SAME(softmax_scale);
  TOKENLAKE_SAME(causal);
  TOKENLAKE_SAME(q_start_pos);
  TOKENLAKE_SAME(num_splits);
  TOKENLAKE_SAME(prefill_warps);
  TOKENLAKE_SAME(prefill_rows_per_warp);
  TOKENLAKE_SAME(prefill_kernel);
  TOKENLAKE_SAME(decode_unroll);
  TOKENLAKE_SAME(decode_pipeline);
  TOKENLAKE_SAME(decode_merge);
  TOKENLAKE_SAME(decode_kernel);
  TOKENLAKE_SAME(decode_mma_stages);
  TOKENLAKE_SAME(decode_mma_descriptors);
  TOKENLAKE_SAME(pdl);
  TOKENLAKE_SAME(num_extra);
#undef TOKENLAKE_SAME
  if ((a.q_block_offsets == nullptr) != (b.q_block_offsets == nullptr)) return "q_block_offsets";
  return nullptr;
}

// Enqueues p under c: the kernel, then the split merge or the fold of extra partials where the
// kernel does not do them. REQUIRES: p valid (shape and pointers), c = ChooseConfig of p.
absl::Status Launch(const PagedAttentionParams& p, const LaunchConfig& c, cudaStream_t stream) {
  if (p.num_q_tokens == 0) return absl::OkStatus();
  const int64_t rows = static_cast<int64_t>(p.num_q_tokens) * p.num_heads;
  if (p.num_blocks == 0) {
    if (absl::Status s = internal::LaunchFillEmpty(p.out, p.lse, rows, p.head_dim, stream);
        !s.ok()) {
      return s;
    }
    return internal::LaunchMergeExtras(p, rows, stream);
  }
  if (c.workspace_bytes > 0 && (p.workspace == nullptr || p.workspace_bytes < c.workspace_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: workspace_bytes = %u, needs %u (see PagedAttentionWorkspaceBytes)",
        p.workspace_bytes, c.workspace_bytes));
  }
  const float scale =
      p.softmax_scale > 0.f ? p.softmax_scale : 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  if (p.head_dim < 64) {
    if (absl::Status s = internal::LaunchSmallHead(p, scale, stream); !s.ok()) return s;
    return internal::LaunchMergeExtras(p, rows, stream);
  }
  const float scale_log2 = scale * internal::kLog2e;
  const int d = p.head_dim;
  if (c.kernel == AttentionKernel::kPrefill) {
    float* out = p.out;
    float* lse = p.lse;
    if (c.splits > 1) {
      out = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + kPagedAttentionCounterBytes);
      lse = out + static_cast<int64_t>(c.splits) * rows * d;
    }
    absl::Status s;
    if (c.prefill_sm90) {
      s = internal::LaunchSm90Prefill(p, c.splits, scale_log2, out, lse, stream);
    } else {
      s = internal::LaunchPrefillMma(p, c, scale_log2, out, lse, stream);
    }
    if (!s.ok()) return s;
    if (c.splits == 1) return internal::LaunchMergeExtras(p, rows, stream);
    // Partials are [split][row][D] and [split][row]; the extras join the split merge.
    return internal::LaunchMergeSplits(out, rows * d, d, lse, rows, 1, c.splits, rows, d, p.out,
                                       p.lse, stream, p.extra_out, p.extra_lse, p.num_extra);
  }
  float* out = p.out;
  float* lse = p.lse;
  if (c.items > 1) {
    out = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + kPagedAttentionCounterBytes);
    lse = out + static_cast<int64_t>(c.items) * rows * d;
  }
  const DecodeArgs a = MakeDecodeArgs(p, c, scale_log2, out, lse);
  absl::Status s = c.decode_mma ? internal::LaunchDecodeMma(p, c, a, stream)
                                : internal::LaunchDecodeCudaCore(p, c, a, stream);
  if (!s.ok() || c.items == 1 || c.decode_fused) return s;
  // Partials are [row][item][D] and [row][item]; the extras join the split merge.
  return internal::LaunchMergeSplits(out, d, static_cast<int64_t>(c.items) * d, lse, 1, c.items,
                                     c.items, rows, d, p.out, p.lse, stream, p.extra_out,
                                     p.extra_lse, p.num_extra);
}

}  // namespace

absl::StatusOr<PagedAttentionPlan> PagedAttentionPlan::Create(const PagedAttentionParams& shape,
                                                              AttentionKernel kernel) {
  absl::StatusOr<LaunchConfig> c = ChooseConfig(shape, kernel, /*check_pointers=*/false);
  if (!c.ok()) return c.status();
  return PagedAttentionPlan(shape, *c);
}

absl::Status PagedAttentionPlan::Run(const PagedAttentionParams& params,
                                     cudaStream_t stream) const {
  if (const char* field = ShapeMismatch(params, shape_); field != nullptr) {
    return absl::InvalidArgumentError(
        absl::StrFormat("PagedAttentionPlan::Run: %s differs from the planned shape", field));
  }
  if (absl::Status s = ValidatePointers(params); !s.ok()) return s;
  return Launch(params, config_, stream);
}

absl::StatusOr<size_t> PagedAttentionWorkspaceBytes(const PagedAttentionParams& params,
                                                    AttentionKernel kernel) {
  absl::StatusOr<LaunchConfig> c = ChooseConfig(params, kernel, /*check_pointers=*/true);
  if (!c.ok()) return c.status();
  return c->workspace_bytes;
}

absl::Status PagedAttention(const PagedAttentionParams& p, AttentionKernel kernel,
                            cudaStream_t stream) {
  absl::StatusOr<LaunchConfig> c = ChooseConfig(p, kernel, /*check_pointers=*/true);
  if (!c.ok()) return c.status();
  return Launch(p, *c, stream);
}

}  // namespace tokenlake::attention::cuda
