// The merges of partials: the split merge of the prefill kernels and of the decode kernels
// when they do not merge in the kernel (MergeSplitsKernel), the fold of extra partials into a
// result, the empty partial, and the public MergePartials / MergePartialsN.
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/kernels.h"
#include "tokenlake/attention/cuda/paged_attention.h"

namespace tokenlake::attention::cuda {
namespace internal {
namespace {

// Merges. MergeSplitsKernel: one thread block per row; partial p of row r at
// o + p * o_part_stride + r * o_row_stride (D contiguous floats) and lse + p * l_part_stride +
// r * l_row_stride. 256 threads: D/4 float4 lanes x (256 / (D/4)) partial groups.

constexpr int kMergeThreads = 256;

template <int D>
__global__ void __launch_bounds__(kMergeThreads)
    MergeSplitsKernel(const float* __restrict__ o, int64_t o_part_stride, int64_t o_row_stride,
                      const float* __restrict__ lse, int64_t l_part_stride, int64_t l_row_stride,
                      int num_parts, float* __restrict__ out, float* __restrict__ lse_out,
                      const float* __restrict__ xo, const float* __restrict__ xl, int num_extra,
                      int64_t x_rows) {
  // Partials num_parts .. num_parts + num_extra - 1 are the extras (PagedAttentionParams::
  // num_extra): extra e of this row at xo + (e * x_rows + row) * D and xl + e * x_rows + row.
  constexpr int kLanes = D / 4;
  constexpr int kPGroups = kMergeThreads / kLanes;
  __shared__ float red[kMergeThreads / 32];
  __shared__ float4 acc_sm[kPGroups][kLanes];
  __shared__ float w_sm[kPGroups];
  const int64_t row = blockIdx.x;
  const int tid = threadIdx.x;
  const float* lrow = lse + row * l_row_stride;

  // Max LSE over the parts.
  float mx = kNegInf;
  for (int p = tid; p < num_parts; p += kMergeThreads) mx = fmaxf(mx, lrow[p * l_part_stride]);
  for (int e = tid; e < num_extra; e += kMergeThreads) mx = fmaxf(mx, xl[e * x_rows + row]);
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, off));
  if ((tid & 31) == 0) red[tid >> 5] = mx;
  __syncthreads();
  mx = red[0];
#pragma unroll
  for (int i = 1; i < kMergeThreads / 32; ++i) mx = fmaxf(mx, red[i]);
  const float use = mx == kNegInf ? 0.f : mx;

  const int lane4 = tid % kLanes;
  const int pg = tid / kLanes;
  float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
  float wsum = 0.f;
  const float* orow = o + row * o_row_stride + lane4 * 4;
#pragma unroll 4
  for (int p = pg; p < num_parts; p += kPGroups) {
    const float w = __expf(lrow[p * l_part_stride] - use);
    const float4 v = *reinterpret_cast<const float4*>(orow + p * o_part_stride);
    a.x = fmaf(w, v.x, a.x);
    a.y = fmaf(w, v.y, a.y);
    a.z = fmaf(w, v.z, a.z);
    a.w = fmaf(w, v.w, a.w);
    wsum += w;
  }
  for (int e = pg; e < num_extra; e += kPGroups) {
    const int64_t er = e * x_rows + row;
    const float w = __expf(xl[er] - use);
    const float4 v = *reinterpret_cast<const float4*>(xo + er * D + lane4 * 4);
    a.x = fmaf(w, v.x, a.x);
    a.y = fmaf(w, v.y, a.y);
    a.z = fmaf(w, v.z, a.z);
    a.w = fmaf(w, v.w, a.w);
    wsum += w;
  }
  acc_sm[pg][lane4] = a;
  if (lane4 == 0) w_sm[pg] = wsum;
  __syncthreads();
  if (pg == 0) {
    float ws = 0.f;
    float4 t = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll
    for (int i = 0; i < kPGroups; ++i) {
      const float4 v = acc_sm[i][lane4];
      t.x += v.x;
      t.y += v.y;
      t.z += v.z;
      t.w += v.w;
      ws += w_sm[i];
    }
    const float inv = ws > 0.f ? 1.f / ws : 0.f;
    *reinterpret_cast<float4*>(out + row * D + lane4 * 4) =
        make_float4(t.x * inv, t.y * inv, t.z * inv, t.w * inv);
    if (lane4 == 0) lse_out[row] = ws > 0.f ? use + logf(ws) : kNegInf;
  }
}

// Generic-D n-way merge for head dims other than 64/128 (one thread per output element).
__global__ void MergeNGenericKernel(const float* __restrict__ o, const float* __restrict__ lse,
                                    int num_parts, int64_t num_rows, int d_size,
                                    float* __restrict__ out, float* __restrict__ lse_out) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx >= num_rows * d_size) return;
  const int64_t row = idx / d_size;
  const int d = static_cast<int>(idx % d_size);
  float mx = kNegInf;
  for (int p = 0; p < num_parts; ++p) mx = fmaxf(mx, lse[p * num_rows + row]);
  const float use = mx == kNegInf ? 0.f : mx;
  float ws = 0.f, acc = 0.f;
  for (int p = 0; p < num_parts; ++p) {
    const float w = __expf(lse[p * num_rows + row] - use);
    ws += w;
    acc = fmaf(w, o[(p * num_rows + row) * d_size + d], acc);
  }
  out[idx] = ws > 0.f ? acc / ws : 0.f;
  if (d == 0) lse_out[row] = ws > 0.f ? use + logf(ws) : kNegInf;
}

// In-place two-way merge: a <- merge(a, b). One thread per 4 elements; a row's threads are in
// one warp (D/4 <= 32 divides 32) or a row spans whole warps with a barrier-free layout where
// only lane 0 of the row's first warp writes the LSE after every reader of that row has read it.
__global__ void Merge2Kernel(float* __restrict__ out_a, float* __restrict__ lse_a,
                             const float* __restrict__ out_b, const float* __restrict__ lse_b,
                             int64_t num_rows, int d4) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = idx < num_rows * d4;
  const int64_t row = active ? idx / d4 : 0;
  const int c = active ? static_cast<int>(idx % d4) : 0;
  float la = kNegInf, lb = kNegInf;
  if (active) {
    la = lse_a[row];
    lb = lse_b[row];
  }
  const float mx = fmaxf(la, lb);
  const float use = mx == kNegInf ? 0.f : mx;
  const float wa = __expf(la - use);
  const float wb = __expf(lb - use);
  const float ws = wa + wb;
  const float inv = ws > 0.f ? 1.f / ws : 0.f;
  if (active) {
    float4* pa = reinterpret_cast<float4*>(out_a + row * d4 * 4) + c;
    const float4 va = *pa;
    const float4 vb = reinterpret_cast<const float4*>(out_b + row * d4 * 4)[c];
    *pa = make_float4((wa * va.x + wb * vb.x) * inv, (wa * va.y + wb * vb.y) * inv,
                      (wa * va.z + wb * vb.z) * inv, (wa * va.w + wb * vb.w) * inv);
  }
  __syncthreads();  // every thread of the block has read its rows' lse_a
  if (active && c == 0) lse_a[row] = ws > 0.f ? use + logf(ws) : kNegInf;
}

// In-place merge of extra partials into out / lse: (out, lse) <- merge(out, extras), extra e of
// row r at xo + (e * num_rows + r) * d4 * 4 and xl + e * num_rows + r. Layout as Merge2Kernel: one
// thread per 4 elements, a row's threads in one thread block, the LSE written after a barrier.
__global__ void MergeExtrasKernel(float* __restrict__ out, float* __restrict__ lse,
                                  const float* __restrict__ xo, const float* __restrict__ xl,
                                  int num_extra, int64_t num_rows, int d4) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  const bool active = idx < num_rows * d4;
  const int64_t row = active ? idx / d4 : 0;
  const int c = active ? static_cast<int>(idx % d4) : 0;
  float ws = 0.f, use = 0.f;
  if (active) {
    const float l0 = lse[row];
    float mx = l0;
    for (int e = 0; e < num_extra; ++e) mx = fmaxf(mx, xl[e * num_rows + row]);
    use = mx == kNegInf ? 0.f : mx;
    float4* po = reinterpret_cast<float4*>(out + row * d4 * 4) + c;
    float w = __expf(l0 - use);
    const float4 v0 = *po;
    float4 a = make_float4(w * v0.x, w * v0.y, w * v0.z, w * v0.w);
    ws = w;
    for (int e = 0; e < num_extra; ++e) {
      const int64_t er = e * num_rows + row;
      w = __expf(xl[er] - use);
      const float4 v = reinterpret_cast<const float4*>(xo + er * d4 * 4)[c];
      a.x = fmaf(w, v.x, a.x);
      a.y = fmaf(w, v.y, a.y);
      a.z = fmaf(w, v.z, a.z);
      a.w = fmaf(w, v.w, a.w);
      ws += w;
    }
    const float inv = ws > 0.f ? 1.f / ws : 0.f;
    *po = make_float4(a.x * inv, a.y * inv, a.z * inv, a.w * inv);
  }
  __syncthreads();  // every thread of the block has read its rows' lse
  if (active && c == 0) lse[row] = ws > 0.f ? use + logf(ws) : kNegInf;
}

// Fills out with 0 and lse with -inf (a partial over no keys).
__global__ void FillEmptyKernel(float* out, float* lse, int64_t num_rows, int d_size) {
  const int64_t idx = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (idx < num_rows * d_size) out[idx] = 0.f;
  if (idx < num_rows) lse[idx] = kNegInf;
}

}  // namespace

absl::Status LaunchMergeSplits(const float* o, int64_t o_part_stride, int64_t o_row_stride,
                               const float* l, int64_t l_part_stride, int64_t l_row_stride,
                               int parts, int64_t rows, int d, float* out, float* lse,
                               cudaStream_t stream, const float* extra_out, const float* extra_lse,
                               int num_extra) {
  if (rows == 0) return absl::OkStatus();
  if (d == 128) {
    MergeSplitsKernel<128><<<rows, kMergeThreads, 0, stream>>>(
        o, o_part_stride, o_row_stride, l, l_part_stride, l_row_stride, parts, out, lse, extra_out,
        extra_lse, num_extra, rows);
  } else {
    MergeSplitsKernel<64><<<rows, kMergeThreads, 0, stream>>>(
        o, o_part_stride, o_row_stride, l, l_part_stride, l_row_stride, parts, out, lse, extra_out,
        extra_lse, num_extra, rows);
  }
  return LaunchStatus("merge splits");
}

// Merges p's extra partials (num_extra > 0) into p.out / p.lse in place (paths that do not fold
// them into their own merge).
absl::Status LaunchMergeExtras(const PagedAttentionParams& p, int64_t rows, cudaStream_t stream) {
  if (p.num_extra == 0 || rows == 0) return absl::OkStatus();
  const int d4 = p.head_dim / 4;  // (head_dim is 16, 32, 64 or 128: d4 divides 256)
  const int threads = 256 / d4 * d4;
  const int64_t n = rows * d4;
  MergeExtrasKernel<<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, stream>>>(
      p.out, p.lse, p.extra_out, p.extra_lse, p.num_extra, rows, d4);
  return LaunchStatus("merge extra partials");
}

absl::Status LaunchFillEmpty(float* out, float* lse, int64_t rows, int d, cudaStream_t stream) {
  const int64_t n = rows * d;
  FillEmptyKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(out, lse, rows, d);
  return LaunchStatus("fill empty partial");
}

}  // namespace internal

absl::Status MergePartials(float* out_a, float* lse_a, const float* out_b, const float* lse_b,
                           int64_t num_rows, int32_t head_dim, cudaStream_t stream) {
  if (num_rows < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MergePartials: num_rows = %d < 0", num_rows));
  }
  if (head_dim <= 0 || head_dim % 4 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MergePartials: head_dim = %d must be a positive multiple of 4", head_dim));
  }
  if (num_rows == 0) return absl::OkStatus();
  if (out_a == nullptr || lse_a == nullptr || out_b == nullptr || lse_b == nullptr) {
    return absl::InvalidArgumentError("MergePartials: a pointer is null");
  }
  const int d4 = head_dim / 4;
  const int64_t n = num_rows * d4;
  // A row's threads must sit in one thread block (the LSE is written after a block barrier).
  const int threads = d4 <= 256 ? 256 / d4 * d4 : d4;
  if (threads > 1024) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MergePartials: head_dim = %d > 4096 is not supported", head_dim));
  }
  internal::
      Merge2Kernel<<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, stream>>>(
          out_a, lse_a, out_b, lse_b, num_rows, d4);
  return internal::LaunchStatus("merge partials");
}

absl::Status MergePartialsN(const float* outs, const float* lses, int32_t num_partials,
                            int64_t num_rows, int32_t head_dim, float* out, float* lse,
                            cudaStream_t stream) {
  if (num_partials < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MergePartialsN: num_partials = %d < 0", num_partials));
  }
  if (num_rows < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("MergePartialsN: num_rows = %d < 0", num_rows));
  }
  if (head_dim <= 0 || head_dim % 4 != 0) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "MergePartialsN: head_dim = %d must be a positive multiple of 4", head_dim));
  }
  if (num_rows == 0) return absl::OkStatus();
  if (out == nullptr || lse == nullptr ||
      (num_partials > 0 && (outs == nullptr || lses == nullptr))) {
    return absl::InvalidArgumentError("MergePartialsN: a pointer is null");
  }
  if (num_partials == 0) return internal::LaunchFillEmpty(out, lse, num_rows, head_dim, stream);
  if (head_dim == 128 || head_dim == 64) {
    return internal::LaunchMergeSplits(outs, num_rows * head_dim, head_dim, lses, num_rows, 1,
                                       num_partials, num_rows, head_dim, out, lse, stream);
  }
  const int64_t n = num_rows * head_dim;
  internal::MergeNGenericKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      outs, lses, num_partials, num_rows, head_dim, out, lse);
  return internal::LaunchStatus("merge partials n-way");
}

}  // namespace tokenlake::attention::cuda
