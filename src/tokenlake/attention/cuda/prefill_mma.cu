// The mma.sync prefill kernels of PagedAttention (flash-attention-2 on m16n8k16 tensor cores):
// the prefill path on GPUs without sm_90 and for the shapes the Hopper kernel (prefill_sm90.cu)
// does not take. Numerics as kernels.h says.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/device_common.cuh"
#include "tokenlake/attention/cuda/kernels.h"

namespace tokenlake::attention::cuda::internal {
namespace {

// Prefill: flash-attention-2 with mma.sync.
//
// Thread block: NW warps, 16 query rows per warp (Br = 16 * NW rows of one query head), keys in
// tiles of kBc = 64 rows double-buffered in shared memory (K and V, XOR-swizzled 16-byte chunks
// so ldmatrix is conflict-free). Grid: x = query tiles, y = query heads, z = splits of the block
// list. With one split the kernel writes `out`/`lse`; otherwise partial results go to the
// workspace `[split][q][head][D]` / `[split][q][head]` and the split merge (merge.cu) combines
// them.

constexpr int kBc = 64;

struct PrefillArgs {
  const uint16_t* q;
  const DeviceKvBlock* blocks;
  int num_blocks;
  int num_q;
  int num_heads;
  int num_kv_heads;
  int group;
  float scale_log2;
  int causal;
  int q_start_pos;
  int blocks_per_split;
  float* out;  // [splits?][num_q][num_heads][D]
  float* lse;  // [splits?][num_q][num_heads]
};

// Copies one kBc x D tile (rows [t0, t0 + valid) of a block; the rest zero-filled) into smem.
template <int D, int NT>
__device__ __forceinline__ void LoadTile(uint16_t* smem, const uint16_t* base, int t0, int valid,
                                         int row_stride, int tid) {
  constexpr int kChunks = D / 8;
  const uint32_t smem_base = SmemAddr(smem);
  static_assert((kBc * kChunks) % NT == 0);
#pragma unroll
  for (int it = 0; it < kBc * kChunks / NT; ++it) {
    const int i = tid + it * NT;
    const int row = i / kChunks;
    const int chunk = i % kChunks;
    const bool ok = row < valid;
    const uint16_t* src =
        ok ? base + static_cast<int64_t>(t0 + row) * row_stride + chunk * 8 : base;
    CpAsync16(smem_base + SwizzledOffset<D>(row, chunk) * 2, src, ok ? 16 : 0);
  }
}

template <int D, int NW>
__global__ void __launch_bounds__(NW * 32) PrefillKernel(const PrefillArgs args) {
  constexpr int NT = NW * 32;
  constexpr int kBr = 16 * NW;
  constexpr int kKSteps = D / 16;   // k-steps of QK^T
  constexpr int kSTiles = kBc / 8;  // n-tiles of S
  constexpr int kOTiles = D / 8;    // n-tiles of O
  constexpr int kTileElems = kBc * D;

  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* ks = smem;                   // [2][kBc][D]
  uint16_t* vs = smem + 2 * kTileElems;  // [2][kBc][D]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int head = blockIdx.y;
  const int kv_head = head / args.group;
  const int split = blockIdx.z;
  const int q_tile0 = blockIdx.x * kBr;
  const int row0 = q_tile0 + warp * 16 + g;  // this thread's rows: row0 and row0 + 8
  const int row1 = row0 + 8;
  const int kv_row_stride = args.num_kv_heads * D;
  const int q_row_stride = args.num_heads * D;

  const int b_begin = split * args.blocks_per_split;
  const int b_end = min(args.num_blocks, b_begin + args.blocks_per_split);

  // Q fragments (A operand), rows beyond num_q are zero.
  uint32_t qa[kKSteps][4];
  {
    const uint16_t* q0 = args.q + static_cast<int64_t>(row0) * q_row_stride + head * D;
    const uint16_t* q1 = args.q + static_cast<int64_t>(row1) * q_row_stride + head * D;
    const bool ok0 = row0 < args.num_q;
    const bool ok1 = row1 < args.num_q;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      const int c = kk * 16 + tig * 2;
      qa[kk][0] = ok0 ? *reinterpret_cast<const uint32_t*>(q0 + c) : 0u;
      qa[kk][1] = ok1 ? *reinterpret_cast<const uint32_t*>(q1 + c) : 0u;
      qa[kk][2] = ok0 ? *reinterpret_cast<const uint32_t*>(q0 + c + 8) : 0u;
      qa[kk][3] = ok1 ? *reinterpret_cast<const uint32_t*>(q1 + c + 8) : 0u;
    }
  }

  float o[kOTiles][4];
#pragma unroll
  for (int n = 0; n < kOTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m0 = kNegInf, m1 = kNegInf;  // running max (log2 domain) of rows row0, row1
  float l0 = 0.f, l1 = 0.f;          // lane-partial sums of exp2

  // Tile iterator over (block, t0). Skips empty blocks.
  int cur_b = b_begin, cur_t0 = 0;
  while (cur_b < b_end && args.blocks[cur_b].num_tokens <= 0) ++cur_b;
  int64_t cur_key0 = 0;  // key number of the current tile's first row
  if (args.causal && cur_b < b_end) cur_key0 = KeysBefore(args.blocks, cur_b);
  // Causal: the largest query position in this tile; keys beyond it are invisible to all rows.
  const int64_t max_qpos =
      static_cast<int64_t>(args.q_start_pos) + min(q_tile0 + kBr, args.num_q) - 1;

  auto tile_active = [&](int b, int64_t key0) {
    return b < b_end && !(args.causal && key0 > max_qpos);
  };

  if (tile_active(cur_b, cur_key0)) {
    const DeviceKvBlock blk = args.blocks[cur_b];
    LoadTile<D, NT>(ks, static_cast<const uint16_t*>(blk.k) + kv_head * D, 0,
                    min(kBc, blk.num_tokens), kv_row_stride, tid);
  }
  CpAsyncCommit();

  int stage = 0;
  while (tile_active(cur_b, cur_key0)) {
    const DeviceKvBlock blk = args.blocks[cur_b];
    const int valid = min(kBc, blk.num_tokens - cur_t0);
    // V of this tile.
    LoadTile<D, NT>(vs + stage * kTileElems, static_cast<const uint16_t*>(blk.v) + kv_head * D,
                    cur_t0, valid, kv_row_stride, tid);
    CpAsyncCommit();
    // Next tile.
    int nb = cur_b, nt0 = cur_t0 + kBc;
    int64_t nkey0 = cur_key0 + valid;
    if (nt0 >= blk.num_tokens) {
      nt0 = 0;
      ++nb;
      while (nb < b_end && args.blocks[nb].num_tokens <= 0) ++nb;
    }
    CpAsyncWait<1>();  // K of this tile has landed
    __syncthreads();

    // S = Q K^T for this warp's 16 rows x 64 keys.
    float s[kSTiles][4];
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
    const uint16_t* kst = ks + stage * kTileElems;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
#pragma unroll
      for (int j = 0; j < kSTiles; j += 2) {
        const int mi = lane >> 3;
        const int key = 8 * (j + (mi >> 1)) + (lane & 7);
        const int chunk = 2 * kk + (mi & 1);
        uint32_t b0, b1, b2, b3;
        LdMatrixX4(SmemAddr(kst + SwizzledOffset<D>(key, chunk)), b0, b1, b2, b3);
        MmaBf16(s[j], qa[kk], b0, b1);
        MmaBf16(s[j + 1], qa[kk], b2, b3);
      }
    }

    // Prefetch the next K tile into the other stage (its last reader finished before the
    // __syncthreads above).
    const bool has_next = tile_active(nb, nkey0);
    if (has_next) {
      const DeviceKvBlock nblk = args.blocks[nb];
      LoadTile<D, NT>(ks + (stage ^ 1) * kTileElems,
                      static_cast<const uint16_t*>(nblk.k) + kv_head * D, nt0,
                      min(kBc, nblk.num_tokens - nt0), kv_row_stride, tid);
    }
    CpAsyncCommit();

    // Mask, scale and online softmax.
    const bool need_mask =
        valid < kBc || (args.causal && cur_key0 + kBc - 1 > args.q_start_pos + q_tile0);
    const int64_t qpos0 = static_cast<int64_t>(args.q_start_pos) + row0;
    const int64_t qpos1 = qpos0 + 8;
    float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        float v = s[j][e] * args.scale_log2;
        if (need_mask) {
          const int col = 8 * j + 2 * tig + (e & 1);
          const int64_t key = cur_key0 + col;
          const int64_t qp = (e < 2) ? qpos0 : qpos1;
          if (col >= valid || (args.causal && key > qp)) v = kNegInf;
        }
        s[j][e] = v;
      }
      mx0 = fmaxf(mx0, fmaxf(s[j][0], s[j][1]));
      mx1 = fmaxf(mx1, fmaxf(s[j][2], s[j][3]));
    }
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
    mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
    mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
    const float nm0 = fmaxf(m0, mx0);
    const float nm1 = fmaxf(m1, mx1);
    const float use0 = nm0 == kNegInf ? 0.f : nm0;
    const float use1 = nm1 == kNegInf ? 0.f : nm1;
    const float corr0 = exp2f(m0 - use0);
    const float corr1 = exp2f(m1 - use1);
    m0 = nm0;
    m1 = nm1;
    float sum0 = 0.f, sum1 = 0.f;
    uint32_t pa[kBc / 16][4];
#pragma unroll
    for (int j = 0; j < kSTiles; ++j) {
      const float p0 = exp2f(s[j][0] - use0);
      const float p1 = exp2f(s[j][1] - use0);
      const float p2 = exp2f(s[j][2] - use1);
      const float p3 = exp2f(s[j][3] - use1);
      sum0 += p0 + p1;
      sum1 += p2 + p3;
      // A fragment of P for k-step j/2: tile 2kk -> regs 0,1; tile 2kk+1 -> regs 2,3.
      pa[j >> 1][(j & 1) * 2 + 0] = PackBf16(p0, p1);
      pa[j >> 1][(j & 1) * 2 + 1] = PackBf16(p2, p3);
    }
    l0 = l0 * corr0 + sum0;
    l1 = l1 * corr1 + sum1;
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      o[n][0] *= corr0;
      o[n][1] *= corr0;
      o[n][2] *= corr1;
      o[n][3] *= corr1;
    }

    CpAsyncWait<1>();  // V of this tile has landed
    __syncthreads();

    // O += P V.
    const uint16_t* vst = vs + stage * kTileElems;
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
#pragma unroll
      for (int n = 0; n < kOTiles; n += 2) {
        const int mi = lane >> 3;
        const int key = 16 * kk + 8 * (mi & 1) + (lane & 7);
        const int chunk = n + (mi >> 1);
        uint32_t b0, b1, b2, b3;
        LdMatrixX4Trans(SmemAddr(vst + SwizzledOffset<D>(key, chunk)), b0, b1, b2, b3);
        MmaBf16(o[n], pa[kk], b0, b1);
        MmaBf16(o[n + 1], pa[kk], b2, b3);
      }
    }

    cur_b = nb;
    cur_t0 = nt0;
    cur_key0 = nkey0;
    stage ^= 1;
  }
  CpAsyncWait<0>();

  // Finish: full row sums, normalise, write.
  l0 += __shfl_xor_sync(0xffffffffu, l0, 1);
  l0 += __shfl_xor_sync(0xffffffffu, l0, 2);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 1);
  l1 += __shfl_xor_sync(0xffffffffu, l1, 2);
  const float inv0 = l0 > 0.f ? 1.f / l0 : 0.f;
  const float inv1 = l1 > 0.f ? 1.f / l1 : 0.f;
  const int64_t split_rows = static_cast<int64_t>(split) * args.num_q * args.num_heads;
  if (row0 < args.num_q) {
    float* dst = args.out + ((split_rows + static_cast<int64_t>(row0) * args.num_heads + head) * D);
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      *reinterpret_cast<float2*>(dst + 8 * n + 2 * tig) =
          make_float2(o[n][0] * inv0, o[n][1] * inv0);
    }
    if (tig == 0) {
      args.lse[split_rows + static_cast<int64_t>(row0) * args.num_heads + head] =
          l0 > 0.f ? (m0 + log2f(l0)) * kLn2 : kNegInf;
    }
  }
  if (row1 < args.num_q) {
    float* dst = args.out + ((split_rows + static_cast<int64_t>(row1) * args.num_heads + head) * D);
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      *reinterpret_cast<float2*>(dst + 8 * n + 2 * tig) =
          make_float2(o[n][2] * inv1, o[n][3] * inv1);
    }
    if (tig == 0) {
      args.lse[split_rows + static_cast<int64_t>(row1) * args.num_heads + head] =
          l1 > 0.f ? (m1 + log2f(l1)) * kLn2 : kNegInf;
    }
  }
}

// Prefill variant with two 16-row m-tiles per warp (32 query rows per warp, Br = 32 * NW): each
// K/V fragment loaded from shared memory feeds twice the MMAs (the one-tile kernel is bound by
// shared-memory bandwidth). Q lives in shared memory (swizzled like K/V) and is re-read per
// k-step with ldmatrix, as flash-attention-2 does. Same grid, arguments and outputs as
// PrefillKernel. Dynamic shared memory: Q [Br][D] + K, V [2][kBc][D] bf16.
template <int D, int NW>
__global__ void __launch_bounds__(NW * 32) PrefillKernel2(const PrefillArgs args) {
  constexpr int NT = NW * 32;
  constexpr int MT = 2;
  constexpr int kBr = 16 * MT * NW;
  constexpr int kKSteps = D / 16;
  constexpr int kSTiles = kBc / 8;
  constexpr int kOTiles = D / 8;
  constexpr int kTileElems = kBc * D;

  extern __shared__ __align__(128) uint16_t smem[];
  uint16_t* qs = smem;                 // [kBr][D]
  uint16_t* ks = smem + kBr * D;       // [2][kBc][D]
  uint16_t* vs = ks + 2 * kTileElems;  // [2][kBc][D]

  const int tid = threadIdx.x;
  const int warp = tid >> 5;
  const int lane = tid & 31;
  const int g = lane >> 2;
  const int tig = lane & 3;
  const int head = blockIdx.y;
  const int kv_head = head / args.group;
  const int split = blockIdx.z;
  const int q_tile0 = blockIdx.x * kBr;
  const int warp_row0 = warp * 16 * MT;  // first row of this warp inside the tile
  const int kv_row_stride = args.num_kv_heads * D;
  const int q_row_stride = args.num_heads * D;
  const int b_begin = split * args.blocks_per_split;
  const int b_end = min(args.num_blocks, b_begin + args.blocks_per_split);

  // Q tile -> shared memory (rows past num_q zero-filled).
  {
    constexpr int kChunks = D / 8;
    const uint32_t base = SmemAddr(qs);
    const uint16_t* qg = args.q + static_cast<int64_t>(q_tile0) * q_row_stride + head * D;
    static_assert((kBr * kChunks) % NT == 0);
#pragma unroll
    for (int it = 0; it < kBr * kChunks / NT; ++it) {
      const int i = tid + it * NT;
      const int row = i / kChunks;
      const int chunk = i % kChunks;
      const bool ok = q_tile0 + row < args.num_q;
      const uint16_t* src = ok ? qg + static_cast<int64_t>(row) * q_row_stride + chunk * 8 : args.q;
      CpAsync16(base + SwizzledOffset<D>(row, chunk) * 2, src, ok ? 16 : 0);
    }
  }

  float o[MT][kOTiles][4];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) o[mt][n][0] = o[mt][n][1] = o[mt][n][2] = o[mt][n][3] = 0.f;
  }
  float m[MT][2], l[MT][2];
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
    m[mt][0] = m[mt][1] = kNegInf;
    l[mt][0] = l[mt][1] = 0.f;
  }

  int cur_b = b_begin, cur_t0 = 0;
  while (cur_b < b_end && args.blocks[cur_b].num_tokens <= 0) ++cur_b;
  int64_t cur_key0 = 0;
  if (args.causal && cur_b < b_end) cur_key0 = KeysBefore(args.blocks, cur_b);
  const int64_t max_qpos =
      static_cast<int64_t>(args.q_start_pos) + min(q_tile0 + kBr, args.num_q) - 1;
  auto tile_active = [&](int b, int64_t key0) {
    return b < b_end && !(args.causal && key0 > max_qpos);
  };
  if (tile_active(cur_b, cur_key0)) {
    const DeviceKvBlock blk = args.blocks[cur_b];
    LoadTile<D, NT>(ks, static_cast<const uint16_t*>(blk.k) + kv_head * D, 0,
                    min(kBc, blk.num_tokens), kv_row_stride, tid);
  }
  CpAsyncCommit();  // group: Q + K0

  int stage = 0;
  while (tile_active(cur_b, cur_key0)) {
    const DeviceKvBlock blk = args.blocks[cur_b];
    const int valid = min(kBc, blk.num_tokens - cur_t0);
    LoadTile<D, NT>(vs + stage * kTileElems, static_cast<const uint16_t*>(blk.v) + kv_head * D,
                    cur_t0, valid, kv_row_stride, tid);
    CpAsyncCommit();
    int nb = cur_b, nt0 = cur_t0 + kBc;
    const int64_t nkey0 = cur_key0 + valid;
    if (nt0 >= blk.num_tokens) {
      nt0 = 0;
      ++nb;
      while (nb < b_end && args.blocks[nb].num_tokens <= 0) ++nb;
    }
    CpAsyncWait<1>();
    __syncthreads();

    float s[MT][kSTiles][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) s[mt][j][0] = s[mt][j][1] = s[mt][j][2] = s[mt][j][3] = 0.f;
    }
    const uint16_t* kst = ks + stage * kTileElems;
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      uint32_t qa[MT][4];
#pragma unroll
      for (int mt = 0; mt < MT; ++mt) {
        const int row = warp_row0 + mt * 16 + (lane & 15);
        const int chunk = 2 * kk + (lane >> 4);
        LdMatrixX4(SmemAddr(qs + SwizzledOffset<D>(row, chunk)), qa[mt][0], qa[mt][1], qa[mt][2],
                   qa[mt][3]);
      }
#pragma unroll
      for (int j = 0; j < kSTiles; j += 2) {
        const int mi = lane >> 3;
        const int key = 8 * (j + (mi >> 1)) + (lane & 7);
        const int chunk = 2 * kk + (mi & 1);
        uint32_t b0, b1, b2, b3;
        LdMatrixX4(SmemAddr(kst + SwizzledOffset<D>(key, chunk)), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          MmaBf16(s[mt][j], qa[mt], b0, b1);
          MmaBf16(s[mt][j + 1], qa[mt], b2, b3);
        }
      }
    }

    const bool has_next = tile_active(nb, nkey0);
    if (has_next) {
      const DeviceKvBlock nblk = args.blocks[nb];
      LoadTile<D, NT>(ks + (stage ^ 1) * kTileElems,
                      static_cast<const uint16_t*>(nblk.k) + kv_head * D, nt0,
                      min(kBc, nblk.num_tokens - nt0), kv_row_stride, tid);
    }
    CpAsyncCommit();

    const bool need_mask =
        valid < kBc || (args.causal && cur_key0 + kBc - 1 > args.q_start_pos + q_tile0);
    uint32_t pa[MT][kBc / 16][4];
#pragma unroll
    for (int mt = 0; mt < MT; ++mt) {
      const int64_t qpos0 =
          static_cast<int64_t>(args.q_start_pos) + q_tile0 + warp_row0 + mt * 16 + g;
      const int64_t qpos1 = qpos0 + 8;
      float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
#pragma unroll
        for (int e = 0; e < 4; ++e) {
          float v = s[mt][j][e] * args.scale_log2;
          if (need_mask) {
            const int col = 8 * j + 2 * tig + (e & 1);
            const int64_t key = cur_key0 + col;
            const int64_t qp = (e < 2) ? qpos0 : qpos1;
            if (col >= valid || (args.causal && key > qp)) v = kNegInf;
          }
          s[mt][j][e] = v;
        }
        mx0 = fmaxf(mx0, fmaxf(s[mt][j][0], s[mt][j][1]));
        mx1 = fmaxf(mx1, fmaxf(s[mt][j][2], s[mt][j][3]));
      }
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
      mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
      mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
      const float nm0 = fmaxf(m[mt][0], mx0);
      const float nm1 = fmaxf(m[mt][1], mx1);
      const float use0 = nm0 == kNegInf ? 0.f : nm0;
      const float use1 = nm1 == kNegInf ? 0.f : nm1;
      const float corr0 = exp2f(m[mt][0] - use0);
      const float corr1 = exp2f(m[mt][1] - use1);
      m[mt][0] = nm0;
      m[mt][1] = nm1;
      float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
      for (int j = 0; j < kSTiles; ++j) {
        const float p0 = exp2f(s[mt][j][0] - use0);
        const float p1 = exp2f(s[mt][j][1] - use0);
        const float p2 = exp2f(s[mt][j][2] - use1);
        const float p3 = exp2f(s[mt][j][3] - use1);
        sum0 += p0 + p1;
        sum1 += p2 + p3;
        pa[mt][j >> 1][(j & 1) * 2 + 0] = PackBf16(p0, p1);
        pa[mt][j >> 1][(j & 1) * 2 + 1] = PackBf16(p2, p3);
      }
      l[mt][0] = l[mt][0] * corr0 + sum0;
      l[mt][1] = l[mt][1] * corr1 + sum1;
#pragma unroll
      for (int n = 0; n < kOTiles; ++n) {
        o[mt][n][0] *= corr0;
        o[mt][n][1] *= corr0;
        o[mt][n][2] *= corr1;
        o[mt][n][3] *= corr1;
      }
    }

    CpAsyncWait<1>();
    __syncthreads();

    const uint16_t* vst = vs + stage * kTileElems;
#pragma unroll
    for (int kk = 0; kk < kBc / 16; ++kk) {
#pragma unroll
      for (int n = 0; n < kOTiles; n += 2) {
        const int mi = lane >> 3;
        const int key = 16 * kk + 8 * (mi & 1) + (lane & 7);
        const int chunk = n + (mi >> 1);
        uint32_t b0, b1, b2, b3;
        LdMatrixX4Trans(SmemAddr(vst + SwizzledOffset<D>(key, chunk)), b0, b1, b2, b3);
#pragma unroll
        for (int mt = 0; mt < MT; ++mt) {
          MmaBf16(o[mt][n], pa[mt][kk], b0, b1);
          MmaBf16(o[mt][n + 1], pa[mt][kk], b2, b3);
        }
      }
    }

    cur_b = nb;
    cur_t0 = nt0;
    cur_key0 = nkey0;
    stage ^= 1;
  }
  CpAsyncWait<0>();

  const int64_t split_rows = static_cast<int64_t>(split) * args.num_q * args.num_heads;
#pragma unroll
  for (int mt = 0; mt < MT; ++mt) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float lsum = l[mt][half];
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 1);
      lsum += __shfl_xor_sync(0xffffffffu, lsum, 2);
      const float inv = lsum > 0.f ? 1.f / lsum : 0.f;
      const int row = q_tile0 + warp_row0 + mt * 16 + g + 8 * half;
      if (row < args.num_q) {
        const int64_t r = split_rows + static_cast<int64_t>(row) * args.num_heads + head;
        float* dst = args.out + r * D;
#pragma unroll
        for (int n = 0; n < kOTiles; ++n) {
          *reinterpret_cast<float2*>(dst + 8 * n + 2 * tig) =
              make_float2(o[mt][n][2 * half] * inv, o[mt][n][2 * half + 1] * inv);
        }
        if (tig == 0) args.lse[r] = lsum > 0.f ? (m[mt][half] + log2f(lsum)) * kLn2 : kNegInf;
      }
    }
  }
}

// MT = query m-tiles of 16 rows per warp: 1 -> PrefillKernel, 2 -> PrefillKernel2.
template <int D, int NW, int MT>
constexpr auto PrefillKernelFor() {
  if constexpr (MT == 2) {
    return PrefillKernel2<D, NW>;
  } else {
    return PrefillKernel<D, NW>;
  }
}

template <int D, int NW, int MT>
int PrefillSmemBytes() {
  return (4 * kBc * D + (MT == 2 ? 32 * NW * D : 0)) * static_cast<int>(sizeof(uint16_t));
}

template <int D, int NW, int MT>
absl::Status PreparePrefill() {
  // Raise the dynamic shared memory limit once per process (per device would be more exact; all
  // devices we target are the same kind).
  static const cudaError_t err = cudaFuncSetAttribute(PrefillKernelFor<D, NW, MT>(),
                                                      cudaFuncAttributeMaxDynamicSharedMemorySize,
                                                      PrefillSmemBytes<D, NW, MT>());
  if (err != cudaSuccess) {
    return absl::InternalError(
        absl::StrFormat("cudaFuncSetAttribute(prefill): %s", cudaGetErrorString(err)));
  }
  return absl::OkStatus();
}

template <int D, int NW, int MT>
absl::StatusOr<int> PrefillBlocksPerSmT() {
  if (absl::Status s = PreparePrefill<D, NW, MT>(); !s.ok()) return s;
  static int blocks = -1;
  static cudaError_t err = cudaOccupancyMaxActiveBlocksPerMultiprocessor(
      &blocks, PrefillKernelFor<D, NW, MT>(), NW * 32, PrefillSmemBytes<D, NW, MT>());
  if (err != cudaSuccess) {
    return absl::InternalError(absl::StrFormat("cudaOccupancyMaxActiveBlocksPerMultiprocessor: %s",
                                               cudaGetErrorString(err)));
  }
  return blocks;
}

template <int MT>
absl::StatusOr<int> PrefillBlocksPerSmM(int d, int nw) {
  if (d == 128) {
    return nw == 8 ? PrefillBlocksPerSmT<128, 8, MT>() : PrefillBlocksPerSmT<128, 4, MT>();
  }
  return nw == 8 ? PrefillBlocksPerSmT<64, 8, MT>() : PrefillBlocksPerSmT<64, 4, MT>();
}

template <int D, int NW, int MT>
absl::Status LaunchPrefill(const PagedAttentionParams& p, const LaunchConfig& c, float scale_log2,
                           float* out, float* lse, cudaStream_t stream) {
  if (absl::Status s = PreparePrefill<D, NW, MT>(); !s.ok()) return s;
  PrefillArgs a;
  a.q = static_cast<const uint16_t*>(p.q);
  a.blocks = p.blocks;
  a.num_blocks = p.num_blocks;
  a.num_q = p.num_q_tokens;
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.group = p.num_heads / p.num_kv_heads;
  a.scale_log2 = scale_log2;
  a.causal = p.causal ? 1 : 0;
  a.q_start_pos = p.q_start_pos;
  a.blocks_per_split = (p.num_blocks + c.splits - 1) / c.splits;
  a.out = out;
  a.lse = lse;
  constexpr int kBr = 16 * MT * NW;
  const dim3 grid((p.num_q_tokens + kBr - 1) / kBr, p.num_heads, c.splits);
  PrefillKernelFor<D, NW, MT>()<<<grid, NW * 32, PrefillSmemBytes<D, NW, MT>(), stream>>>(a);
  return LaunchStatus("prefill attention");
}

template <int MT>
absl::Status LaunchPrefillM(const PagedAttentionParams& p, const LaunchConfig& c, float scale_log2,
                            float* out, float* lse, cudaStream_t stream) {
  if (p.head_dim == 128) {
    return c.prefill_warps == 8 ? LaunchPrefill<128, 8, MT>(p, c, scale_log2, out, lse, stream)
                                : LaunchPrefill<128, 4, MT>(p, c, scale_log2, out, lse, stream);
  }
  return c.prefill_warps == 8 ? LaunchPrefill<64, 8, MT>(p, c, scale_log2, out, lse, stream)
                              : LaunchPrefill<64, 4, MT>(p, c, scale_log2, out, lse, stream);
}

}  // namespace

absl::StatusOr<int> PrefillMmaBlocksPerSm(int head_dim, int warps, int m_tiles) {
  return m_tiles == 2 ? PrefillBlocksPerSmM<2>(head_dim, warps)
                      : PrefillBlocksPerSmM<1>(head_dim, warps);
}

absl::Status LaunchPrefillMma(const PagedAttentionParams& p, const LaunchConfig& c,
                              float scale_log2, float* out, float* lse, cudaStream_t stream) {
  return c.prefill_mt == 2 ? LaunchPrefillM<2>(p, c, scale_log2, out, lse, stream)
                           : LaunchPrefillM<1>(p, c, scale_log2, out, lse, stream);
}

}  // namespace tokenlake::attention::cuda::internal
