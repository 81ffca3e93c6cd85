// CUDA kernels of paged_attention.h. See the header for shapes and conventions.
//
// Numerics: scores are kept in the log2 domain (s2 = s * scale * log2(e)) so that exp2f does the
// exponentials; the natural-log LSE written out is (m2 + log2(l)) * ln(2).
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <mutex>
#include <type_traits>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/paged_attention.h"
#include "tokenlake/attention/cuda/prefill_sm90.h"

namespace tokenlake::attention::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

// ---------------------------------------------------------------------------------------------
// Device properties, read once per device.
struct DeviceInfo {
  int num_sms = 0;
  int max_smem_optin = 0;
  int cc_major = 0;  // compute capability (9 = Hopper: the wgmma prefill kernel can run)
};

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

// ---------------------------------------------------------------------------------------------
// Small device helpers.

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes 0 zero-fills the destination.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
// Programmatic dependent launch (PTX griddepcontrol, sm_90). Wait: blocks until the grids this
// one depends on programmatically have completed and their memory is visible (returns at once
// when the grid was launched without PDL). Launch dependents: this thread block no longer holds
// back the launch of a PDL-launched next grid (which still waits for our completion before it
// touches what we write).
__device__ __forceinline__ void GridDependencyWait() {
  asm volatile("griddepcontrol.wait;\n" ::: "memory");
}
__device__ __forceinline__ void GridDependentsLaunch() {
  asm volatile("griddepcontrol.launch_dependents;\n" ::: "memory");
}

__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void LdMatrixX4(uint32_t addr, uint32_t& r0, uint32_t& r1, uint32_t& r2,
                                           uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}
__device__ __forceinline__ void LdMatrixX4Trans(uint32_t addr, uint32_t& r0, uint32_t& r1,
                                                uint32_t& r2, uint32_t& r3) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];\n"
               : "=r"(r0), "=r"(r1), "=r"(r2), "=r"(r3)
               : "r"(addr));
}

// d += a * b, m16n8k16, bf16 inputs, f32 accumulators.
__device__ __forceinline__ void MmaBf16(float (&d)[4], const uint32_t (&a)[4], uint32_t b0,
                                        uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);  // .x = lo (low 16 bits), .y = hi
  return *reinterpret_cast<uint32_t*>(&v);
}

__device__ __forceinline__ float Bf16Lo(uint32_t w) { return __uint_as_float(w << 16); }
__device__ __forceinline__ float Bf16Hi(uint32_t w) { return __uint_as_float(w & 0xffff0000u); }

// Eight bfloat16 values packed in 16 bytes (one 128-bit load) -> float32, in order.
__device__ __forceinline__ void Bf16x8ToFloat(const uint4 r, float (&f)[8]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = Bf16Lo(w[i]);
    f[2 * i + 1] = Bf16Hi(w[i]);
  }
}

// The same, each value multiplied by `scale` (queries, pre-scaled for exp2).
__device__ __forceinline__ void Bf16x8ToFloatScaled(const uint4 r, float scale, float (&f)[8]) {
  const uint32_t w[4] = {r.x, r.y, r.z, r.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    f[2 * i] = Bf16Lo(w[i]) * scale;
    f[2 * i + 1] = Bf16Hi(w[i]) * scale;
  }
}

// Decode: this lane's 8-dim share of the scores of one key row against G query heads.
template <int G>
__device__ __forceinline__ void LaneScores(const float (&qf)[G][8], const uint4 kr, float (&s)[G]) {
  float kf[8];
  Bf16x8ToFloat(kr, kf);
#pragma unroll
  for (int h = 0; h < G; ++h) {
    float d = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) d = fmaf(qf[h][i], kf[i], d);
    s[h] = d;
  }
}

// Decode: sums the lanes' shares over the kLanes lanes that hold one key row (xor butterfly;
// every lane ends with the full scores). The whole warp must call it.
template <int kLanes, int U, int G>
__device__ __forceinline__ void SumLaneScores(float (&s)[U][G]) {
#pragma unroll
  for (int off = kLanes / 2; off > 0; off >>= 1) {
#pragma unroll
    for (int u = 0; u < U; ++u) {
#pragma unroll
      for (int h = 0; h < G; ++h) s[u][h] += __shfl_xor_sync(0xffffffffu, s[u][h], off);
    }
  }
}

// Number of keys in the blocks before `block` (for causal masking).
__device__ __forceinline__ int64_t KeysBefore(const DeviceKvBlock* blocks, int block) {
  int64_t sum = 0;
  for (int b = 0; b < block; ++b) sum += blocks[b].num_tokens;
  return sum;
}

// ---------------------------------------------------------------------------------------------
// Prefill: flash-attention-2 with mma.sync.
//
// Thread block: NW warps, 16 query rows per warp (Br = 16 * NW rows of one query head), keys in
// tiles of kBc = 64 rows double-buffered in shared memory (K and V, XOR-swizzled 16-byte chunks
// so ldmatrix is conflict-free). Grid: x = query tiles, y = query heads, z = splits of the block
// list. With one split the kernel writes `out`/`lse`; otherwise partial results go to the
// workspace `[split][q][head][D]` / `[split][q][head]` and MergeSplitsKernel combines them.

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

template <int D>
__device__ __forceinline__ int SwizzledOffset(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

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

// ---------------------------------------------------------------------------------------------
// Decode: split-KV over (block, chunk) work items on CUDA cores.
//
// Thread block of kDecodeThreads threads handles one work item (a chunk of one block), one KV
// head, G query heads of its group and one query token. D/8 lanes share a token (each holds 8
// dims as one 16-byte load); the kDecodeThreads / (D/8) token groups walk the chunk, U tokens
// per step each, with an online softmax per group; groups combine through shared memory. Grid:
// x = work items, y = num_kv_heads * (group / G), z = query tokens. Writes either out/lse (one
// work item) or the workspace partials `[q][head][item][D]` / `[q][head][item]`.

constexpr int kDecodeThreads = 128;
// The fused split merge handles at most this many splits (more: a separate merge kernel).
constexpr int kMaxFusedItems = 64;
// ... and at most this many merge counters (one per query token and thread-block head group; the
// bound paged_attention.h documents for decode_merge).
constexpr int kMaxFusedCounters = static_cast<int>(kPagedAttentionCounterBytes / 8);

struct DecodeArgs {
  const uint16_t* q;
  const DeviceKvBlock* blocks;
  int num_blocks;
  int chunks_per_block;  // > 1: an item is one chunk of one block
  int chunk_tokens;
  int blocks_per_item;  // > 1: an item is a run of whole blocks
  int num_items;
  int num_q;
  int num_heads;
  int num_kv_heads;
  int group;
  float scale_log2;
  int causal;
  int q_start_pos;
  float* out;  // final [q][H][D] if num_items == 1, else partial [q][H][items][D]
  float* lse;  // final [q][H] if num_items == 1, else partial [q][H][items]
  // Fused split merge (num_items > 1 only): counters[qi * gridDim.y + blockIdx.y], zero on entry
  // and left zero; the last thread block to finish merges into final_out / final_lse. Null: the
  // partials stay in out/lse for a separate merge kernel.
  unsigned int* counters;
  float* final_out;  // [q][H][D]
  float* final_lse;  // [q][H]
  // Batched decode (shared-memory or tensor-core kernel, chunks_per_block == 1): query token qi
  // attends to blocks [q_block_offsets[qi], q_block_offsets[qi + 1]) only, and item i of it to
  // the i-th run of ceil(n / num_items) of them. Null: every token sees all num_blocks blocks.
  const int32_t* q_block_offsets;
  // Extra partials folded into the final merge (PagedAttentionParams::num_extra): extra e of row
  // r at extra_out[(e * extra_rows + r) * D] / extra_lse[e * extra_rows + r]; num_extra 0 = none.
  const float* extra_out;
  const float* extra_lse;
  int num_extra;
  int64_t extra_rows;  // num_q * num_heads
  // Tensor-core kernel: PagedAttentionParams::pdl (0 off; 1 wait first; 2 the first stages'
  // copies, then wait).
  int pdl;
};

// Folds the extra partials of row `row` into one output element (out_v, lse_v) of the merge
// (element d of the row): every thread of the row computes the row's merged LSE itself (the
// extras' LSEs are a few L2 loads), so no barrier is needed. -inf partials contribute nothing.
template <int D>
__device__ __forceinline__ void FoldExtrasElement(const DecodeArgs& args, int64_t row, int d,
                                                  float& out_v, float& lse_v) {
  float mx = lse_v;
#pragma unroll 4
  for (int e = 0; e < args.num_extra; ++e) {
    mx = fmaxf(mx, __ldg(args.extra_lse + e * args.extra_rows + row));
  }
  const float use = mx == kNegInf ? 0.f : mx;
  float w = __expf(lse_v - use);
  float sum = w;
  float acc = w * out_v;
#pragma unroll 4
  for (int e = 0; e < args.num_extra; ++e) {
    const int64_t er = e * args.extra_rows + row;
    w = __expf(__ldg(args.extra_lse + er) - use);
    sum += w;
    acc = fmaf(w, __ldg(args.extra_out + er * D + d), acc);
  }
  out_v = sum > 0.f ? acc / sum : 0.f;
  lse_v = sum > 0.f ? use + logf(sum) : kNegInf;
}

// The fused split merge, run by every decode thread block after it wrote its partials of query
// token qi, heads kv_head * group + hoff + h for h < G: the last block of the
// (qi, blockIdx.y) group to finish merges the num_items partials of those heads into final_out /
// final_lse and resets the counter. Each thread owns 4 dims of one row and folds the partials in
// with an online max, loading every partial's LSE and output slice together (the loads of 8
// partials in flight at once), so the merge costs about one L2 round trip per 8 partials after
// the counter. Partials are read with ld.global.cg (L2; other multiprocessors wrote them).
// U = partials whose loads are in flight at once (8; 16 for the tensor-core kernel, so its 16
// splits cost one round trip).
template <int D, int G, int U = 8>
__device__ __forceinline__ void DecodeFusedMerge(const DecodeArgs& args, int qi, int kv_head,
                                                 int hoff) {
  constexpr int kRows = G;
  __shared__ int sm_last;
  // The block's partial stores, ordered before thread 0's count by the barrier, are released
  // with it (atom.acq_rel.gpu is cumulative); the last block's thread 0 acquires the others'
  // partials with the same atomic and the barrier after it passes them on to every thread (the
  // pattern of CUTLASS's split-K semaphore: one fence-carrying atomic per block, no per-thread
  // __threadfence on the merge's critical path).
  __syncthreads();
  const int tid = threadIdx.x;
  unsigned int* counter = args.counters + static_cast<int64_t>(qi) * gridDim.y + blockIdx.y;
  if (tid == 0) {
    unsigned int ticket;
    asm volatile("atom.acq_rel.gpu.global.add.u32 %0, [%1], 1;\n"
                 : "=r"(ticket)
                 : "l"(counter)
                 : "memory");
    sm_last = ticket == static_cast<unsigned int>(args.num_items - 1) ? 1 : 0;
  }
  __syncthreads();
  if (sm_last == 0) return;
  const int n = args.num_items;
  constexpr int kLanes4 = D / 4;
  for (int idx = tid; idx < kRows * kLanes4; idx += blockDim.x) {
    const int r = idx / kLanes4;
    const int c = idx % kLanes4;
    const int64_t row = static_cast<int64_t>(qi) * args.num_heads + kv_head * args.group + hoff + r;
    const float* lrow = args.lse + row * n;
    const float4* orow = reinterpret_cast<const float4*>(args.out + row * n * D) + c;
    float mx = kNegInf;
    float sum = 0.f;
    float4 a = make_float4(0.f, 0.f, 0.f, 0.f);
#pragma unroll U
    for (int p = 0; p < n; ++p) {
      const float lp = __ldcg(lrow + p);
      const float4 v = __ldcg(orow + static_cast<int64_t>(p) * kLanes4);
      const float nm = fmaxf(mx, lp);
      const float use = nm == kNegInf ? 0.f : nm;  // (all -inf so far: weights 0, no NaN)
      const float sc = __expf(mx - use);
      const float w = __expf(lp - use);
      sum = fmaf(sum, sc, w);
      a.x = fmaf(w, v.x, a.x * sc);
      a.y = fmaf(w, v.y, a.y * sc);
      a.z = fmaf(w, v.z, a.z * sc);
      a.w = fmaf(w, v.w, a.w * sc);
      mx = nm;
    }
    // Other instances' partials (num_extra), after the splits' (4 extras' loads in flight at
    // once: one round trip for up to 4).
#pragma unroll 4
    for (int e = 0; e < args.num_extra; ++e) {
      const int64_t er = e * args.extra_rows + row;
      const float lp = __ldg(args.extra_lse + er);
      const float4 v = __ldg(reinterpret_cast<const float4*>(args.extra_out + er * D) + c);
      const float nm = fmaxf(mx, lp);
      const float use = nm == kNegInf ? 0.f : nm;
      const float sc = __expf(mx - use);
      const float w = __expf(lp - use);
      sum = fmaf(sum, sc, w);
      a.x = fmaf(w, v.x, a.x * sc);
      a.y = fmaf(w, v.y, a.y * sc);
      a.z = fmaf(w, v.z, a.z * sc);
      a.w = fmaf(w, v.w, a.w * sc);
      mx = nm;
    }
    const float inv = sum > 0.f ? 1.f / sum : 0.f;
    reinterpret_cast<float4*>(args.final_out + row * D)[c] =
        make_float4(a.x * inv, a.y * inv, a.z * inv, a.w * inv);
    if (c == 0) args.final_lse[row] = sum > 0.f ? mx + logf(sum) : kNegInf;
  }
  if (tid == 0) *counter = 0u;  // ready for the next call on this workspace
}

template <int D, int G, int U>
__global__ void __launch_bounds__(kDecodeThreads) DecodeKernel(const DecodeArgs args) {
  constexpr int kLanes = D / 8;                     // lanes per token
  constexpr int kGroups = kDecodeThreads / kLanes;  // token groups per thread block
  __shared__ float sm_m[kGroups][G];
  __shared__ float sm_l[kGroups][G];
  __shared__ float sm_acc[kGroups][G][D];

  const int tid = threadIdx.x;
  const int sub = tid % kLanes;  // which 8 dims
  const int grp = tid / kLanes;
  const int item = blockIdx.x;
  const int heads_per_cta_group = args.group / G;
  const int kv_head = blockIdx.y / heads_per_cta_group;
  const int head0 = kv_head * args.group + (blockIdx.y % heads_per_cta_group) * G;
  const int qi = blockIdx.z;
  // This item's key range: blocks [b_first, b_last) (blocks_per_item > 1, whole blocks), or
  // token rows [chunk * chunk_tokens, +chunk_tokens) of one block (chunks_per_block > 1).
  const int b_first = (item / args.chunks_per_block) * args.blocks_per_item;
  const int b_last = min(args.num_blocks, b_first + args.blocks_per_item);
  const int chunk = item % args.chunks_per_block;
  const int64_t qpos = static_cast<int64_t>(args.q_start_pos) + qi;

  // Query slice in float32.
  float qf[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    const uint4 raw = *reinterpret_cast<const uint4*>(
        args.q + (static_cast<int64_t>(qi) * args.num_heads + head0 + h) * D + sub * 8);
    Bf16x8ToFloatScaled(raw, args.scale_log2, qf[h]);
  }

  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = kNegInf;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.f;
  }

  const int row_stride = args.num_kv_heads * D;
  constexpr int kStep = kGroups * U;  // tokens per thread-block step
  int64_t key_base = 0;               // key number of the current block's row 0 (causal only)
  if (args.causal) key_base = KeysBefore(args.blocks, b_first);

  for (int b = b_first; b < b_last; ++b) {
    const DeviceKvBlock blk = args.blocks[b];
    const int t_begin = args.chunks_per_block > 1 ? chunk * args.chunk_tokens : 0;
    const int t_end = args.chunks_per_block > 1 ? min(blk.num_tokens, t_begin + args.chunk_tokens)
                                                : blk.num_tokens;
    const uint16_t* kbase = static_cast<const uint16_t*>(blk.k) + kv_head * D + sub * 8;
    const uint16_t* vbase = static_cast<const uint16_t*>(blk.v) + kv_head * D + sub * 8;
    auto load = [&](int t_base, uint4(&kr)[U], uint4(&vr)[U]) {
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tt = t_base + grp + u * kGroups;
        if (tt < t_end) {
          kr[u] =
              __ldg(reinterpret_cast<const uint4*>(kbase + static_cast<int64_t>(tt) * row_stride));
          vr[u] =
              __ldg(reinterpret_cast<const uint4*>(vbase + static_cast<int64_t>(tt) * row_stride));
        } else {
          kr[u] = make_uint4(0, 0, 0, 0);
          vr[u] = make_uint4(0, 0, 0, 0);
        }
      }
    };
    uint4 kr[U], vr[U];
    if (t_begin < t_end) load(t_begin, kr, vr);
    // The trip count is the same for every thread (the shuffles below need the whole warp);
    // tokens past t_end are masked. Loads of the next step are issued before this step's math.
    for (int t_base = t_begin; t_base < t_end; t_base += kStep) {
      uint4 kn[U], vn[U];
      if (t_base + kStep < t_end) load(t_base + kStep, kn, vn);
      float s[U][G];
#pragma unroll
      for (int u = 0; u < U; ++u) LaneScores<G>(qf, kr[u], s[u]);
      SumLaneScores<kLanes, U, G>(s);
#pragma unroll
      for (int u = 0; u < U; ++u) {
        const int tt = t_base + grp + u * kGroups;
        const bool visible = tt < t_end && !(args.causal && key_base + tt > qpos);
        if (!visible) {
#pragma unroll
          for (int h = 0; h < G; ++h) s[u][h] = kNegInf;
        }
      }
      float vf[U][8];
#pragma unroll
      for (int u = 0; u < U; ++u) Bf16x8ToFloat(vr[u], vf[u]);
#pragma unroll
      for (int h = 0; h < G; ++h) {
        float mx = s[0][h];
#pragma unroll
        for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u][h]);
        const float nm = fmaxf(m[h], mx);
        const float use = nm == kNegInf ? 0.f : nm;
        const float corr = exp2f(m[h] - use);
        m[h] = nm;
        float p[U];
        float psum = 0.f;
#pragma unroll
        for (int u = 0; u < U; ++u) {
          p[u] = exp2f(s[u][h] - use);
          psum += p[u];
        }
        l[h] = l[h] * corr + psum;
#pragma unroll
        for (int i = 0; i < 8; ++i) {
          float acc_v = acc[h][i] * corr;
#pragma unroll
          for (int u = 0; u < U; ++u) acc_v = fmaf(p[u], vf[u][i], acc_v);
          acc[h][i] = acc_v;
        }
      }
#pragma unroll
      for (int u = 0; u < U; ++u) {
        kr[u] = kn[u];
        vr[u] = vn[u];
      }
    }
    if (args.causal) key_base += blk.num_tokens;
  }

  // Combine the token groups.
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (sub == 0) {
      sm_m[grp][h] = m[h];
      sm_l[grp][h] = l[h];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sm_acc[grp][h][sub * 8 + i] = acc[h][i];
  }
  __syncthreads();
  const bool final_out = args.num_items == 1;
  for (int idx = tid; idx < G * D; idx += kDecodeThreads) {
    const int h = idx / D;
    const int d = idx % D;
    float mm = kNegInf;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) mm = fmaxf(mm, sm_m[gi][h]);
    const float use = mm == kNegInf ? 0.f : mm;
    float ll = 0.f, oo = 0.f;
#pragma unroll
    for (int gi = 0; gi < kGroups; ++gi) {
      const float w = exp2f(sm_m[gi][h] - use);
      ll = fmaf(sm_l[gi][h], w, ll);
      oo = fmaf(sm_acc[gi][h][d], w, oo);
    }
    float out_v = ll > 0.f ? oo / ll : 0.f;
    float lse_v = ll > 0.f ? (mm + log2f(ll)) * kLn2 : kNegInf;
    const int64_t row = static_cast<int64_t>(qi) * args.num_heads + head0 + h;
    if (final_out) {
      if (args.num_extra > 0) FoldExtrasElement<D>(args, row, d, out_v, lse_v);
      args.out[row * D + d] = out_v;
      if (d == 0) args.lse[row] = lse_v;
    } else {
      args.out[(row * args.num_items + item) * D + d] = out_v;
      if (d == 0) args.lse[row * args.num_items + item] = lse_v;
    }
  }
  if (!final_out && args.counters != nullptr) {
    DecodeFusedMerge<D, G>(args, qi, kv_head, head0 - kv_head * args.group);
  }
}

// Decode with a shared-memory pipeline: the same work split and math as DecodeKernel, but K and
// V steps (kStep tokens) stream through kDecodeStages shared-memory buffers with cp.async, so
// several steps of loads are in flight without holding them in registers. Dynamic shared memory:
// DecodeSmemBytes<D, U>() (the combine arrays reuse it after the loop).
constexpr int kDecodeStages = 4;

template <int D, int U>
__host__ __device__ constexpr int DecodeStepTokens() {
  return (kDecodeThreads / (D / 8)) * U;
}
template <int D, int U>
__host__ __device__ constexpr int DecodeSmemBytes() {
  return kDecodeStages * DecodeStepTokens<D, U>() * D * 2 * 2;
}

template <int D, int G, int U>
__global__ void __launch_bounds__(kDecodeThreads) DecodeSmemKernel(const DecodeArgs args) {
  constexpr int T = kDecodeThreads;
  constexpr int kLanes = D / 8;
  constexpr int kGroups = T / kLanes;       // token groups
  constexpr int kStep = kGroups * U;        // token rows per step
  constexpr int kStageElems = kStep * D;    // one of K or V
  constexpr int kChunks = kStageElems / 8;  // 16-byte chunks per K (or V) step
  static_assert(kChunks % T == 0);
  static_assert(kStageElems == DecodeStepTokens<D, U>() * D);
  static_assert(kGroups * G * (D + 2) * 4 <= DecodeSmemBytes<D, U>());
  extern __shared__ __align__(128) uint16_t dsmem[];  // [stage][K, V][kStep][D]

  const int tid = threadIdx.x;
  const int sub = tid % kLanes;
  const int grp = tid / kLanes;
  const int item = blockIdx.x;
  const int heads_per_cta_group = args.group / G;
  const int kv_head = blockIdx.y / heads_per_cta_group;
  const int hoff = (blockIdx.y % heads_per_cta_group) * G;
  const int head0 = kv_head * args.group + hoff;
  const int qi = blockIdx.z;
  // This token's blocks: all of them, or its own run in a batched decode.
  const DeviceKvBlock* blocks = args.blocks;
  int num_blocks = args.num_blocks;
  int blocks_per_item = args.blocks_per_item;
  if (args.q_block_offsets != nullptr) {
    const int first = args.q_block_offsets[qi];
    blocks += first;
    num_blocks = args.q_block_offsets[qi + 1] - first;
    blocks_per_item = max(1, (num_blocks + args.num_items - 1) / args.num_items);
  }
  const int b_first = (item / args.chunks_per_block) * blocks_per_item;
  const int b_last = min(num_blocks, b_first + blocks_per_item);
  const bool chunked = args.chunks_per_block > 1;
  const int chunk_begin = (item % args.chunks_per_block) * args.chunk_tokens;
  const int64_t qpos = static_cast<int64_t>(args.q_start_pos) + qi;
  const int row_stride = args.num_kv_heads * D;

  float qf[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    const uint4 raw = *reinterpret_cast<const uint4*>(
        args.q + (static_cast<int64_t>(qi) * args.num_heads + head0 + h) * D + sub * 8);
    Bf16x8ToFloatScaled(raw, args.scale_log2, qf[h]);
  }
  float m[G], l[G], acc[G][8];
#pragma unroll
  for (int h = 0; h < G; ++h) {
    m[h] = kNegInf;
    l[h] = 0.f;
#pragma unroll
    for (int i = 0; i < 8; ++i) acc[h][i] = 0.f;
  }

  // A cursor over this item's steps: block b, rows [tb, min(tb + kStep, tend)); key0 is the key
  // number of row 0 of block b. Uniform across the thread block.
  struct Cursor {
    int b;
    int tb;
    int tend;
    int64_t key0;
  };
  auto settle = [&](Cursor& c) {  // moves to the first non-empty range at or after c.b
    while (c.b < b_last) {
      const int n = blocks[c.b].num_tokens;
      c.tend = chunked ? min(n, chunk_begin + args.chunk_tokens) : n;
      if (c.tb < c.tend) return;
      c.key0 += n;
      ++c.b;
      c.tb = chunked ? chunk_begin : 0;
    }
  };
  auto advance = [&](Cursor& c) {
    c.tb += kStep;
    if (c.tb >= c.tend) {
      if (chunked) {
        c.b = b_last;
        return;
      }
      c.key0 += blocks[c.b].num_tokens;
      ++c.b;
      c.tb = 0;
      settle(c);
    }
  };
  // Where each stage's rows come from (written by thread 0 at issue, read by compute).
  __shared__ int sm_desc_tb[kDecodeStages];
  __shared__ int sm_desc_tend[kDecodeStages];
  __shared__ int64_t sm_desc_key0[kDecodeStages];
  auto issue = [&](const Cursor& c, int stage) {
    if (tid == 0) {
      sm_desc_tb[stage] = c.tb;
      sm_desc_tend[stage] = c.tend;
      sm_desc_key0[stage] = c.key0;
    }
    const DeviceKvBlock blk = blocks[c.b];
    const int valid = min(kStep, c.tend - c.tb);
    const uint16_t* kb = static_cast<const uint16_t*>(blk.k) + kv_head * D;
    const uint16_t* vb = static_cast<const uint16_t*>(blk.v) + kv_head * D;
    const uint32_t base = SmemAddr(dsmem + stage * 2 * kStageElems);
#pragma unroll
    for (int it = 0; it < kChunks / T; ++it) {
      const int i = tid + it * T;
      const int row = i / (D / 8);
      const int ch = i % (D / 8);
      const bool ok = row < valid;
      const int64_t off = ok ? static_cast<int64_t>(c.tb + row) * row_stride + ch * 8 : 0;
      CpAsync16(base + (row * D + ch * 8) * 2, kb + off, ok ? 16 : 0);
      CpAsync16(base + (kStageElems + row * D + ch * 8) * 2, vb + off, ok ? 16 : 0);
    }
  };

  Cursor load{b_first, chunked ? chunk_begin : 0, 0, 0};
  if (args.causal) load.key0 = KeysBefore(blocks, b_first);
  settle(load);
  int issued = 0;  // steps issued (uniform)
#pragma unroll
  for (int st = 0; st < kDecodeStages - 1; ++st) {
    if (load.b < b_last) {
      issue(load, st);
      advance(load);
      ++issued;
    }
    CpAsyncCommit();
  }
  int stage = 0;
  for (int computed = 0; computed < issued; ++computed) {
    CpAsyncWait<kDecodeStages - 2>();
    __syncthreads();
    struct {
      int tb;
      int tend;
      int64_t key0;
    } comp = {sm_desc_tb[stage], sm_desc_tend[stage], sm_desc_key0[stage]};
    if (load.b < b_last) {
      issue(load, (stage + kDecodeStages - 1) % kDecodeStages);
      advance(load);
      ++issued;
    }
    CpAsyncCommit();

    const uint16_t* ks = dsmem + stage * 2 * kStageElems;
    const uint16_t* vs = ks + kStageElems;
    float s[U][G];
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint4 kr = *reinterpret_cast<const uint4*>(ks + (grp + u * kGroups) * D + sub * 8);
      LaneScores<G>(qf, kr, s[u]);
    }
    SumLaneScores<kLanes, U, G>(s);
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const int tt = comp.tb + grp + u * kGroups;
      const bool visible = tt < comp.tend && !(args.causal && comp.key0 + tt > qpos);
      if (!visible) {
#pragma unroll
        for (int h = 0; h < G; ++h) s[u][h] = kNegInf;
      }
    }
#pragma unroll
    for (int h = 0; h < G; ++h) {
      float mx = s[0][h];
#pragma unroll
      for (int u = 1; u < U; ++u) mx = fmaxf(mx, s[u][h]);
      const float nm = fmaxf(m[h], mx);
      const float use = nm == kNegInf ? 0.f : nm;
      const float corr = exp2f(m[h] - use);
      m[h] = nm;
      float psum = 0.f;
#pragma unroll
      for (int u = 0; u < U; ++u) {
        s[u][h] = exp2f(s[u][h] - use);  // s becomes the probability p
        psum += s[u][h];
      }
      l[h] = l[h] * corr + psum;
#pragma unroll
      for (int i = 0; i < 8; ++i) acc[h][i] *= corr;
    }
#pragma unroll
    for (int u = 0; u < U; ++u) {
      const uint4 vr = *reinterpret_cast<const uint4*>(vs + (grp + u * kGroups) * D + sub * 8);
      float vf[8];
      Bf16x8ToFloat(vr, vf);
#pragma unroll
      for (int h = 0; h < G; ++h) {
#pragma unroll
        for (int i = 0; i < 8; ++i) acc[h][i] = fmaf(s[u][h], vf[i], acc[h][i]);
      }
    }
    stage = (stage + 1) % kDecodeStages;
  }
  CpAsyncWait<0>();
  __syncthreads();  // the stage buffers become the combine arrays

  float* sm_m = reinterpret_cast<float*>(dsmem);  // [kGroups][G]
  float* sm_l = sm_m + kGroups * G;               // [kGroups][G]
  float* sm_acc = sm_l + kGroups * G;             // [kGroups][G][D]
#pragma unroll
  for (int h = 0; h < G; ++h) {
    if (sub == 0) {
      sm_m[grp * G + h] = m[h];
      sm_l[grp * G + h] = l[h];
    }
#pragma unroll
    for (int i = 0; i < 8; ++i) sm_acc[(grp * G + h) * D + sub * 8 + i] = acc[h][i];
  }
  __syncthreads();
  const bool final_out = args.num_items == 1;
  for (int idx = tid; idx < G * D; idx += T) {
    const int h = idx / D;
    const int d = idx % D;
    float mm = kNegInf;
#pragma unroll
    for (int t = 0; t < kGroups; ++t) mm = fmaxf(mm, sm_m[t * G + h]);
    const float use = mm == kNegInf ? 0.f : mm;
    float ll = 0.f, oo = 0.f;
#pragma unroll
    for (int t = 0; t < kGroups; ++t) {
      const float w = exp2f(sm_m[t * G + h] - use);
      ll = fmaf(sm_l[t * G + h], w, ll);
      oo = fmaf(sm_acc[(t * G + h) * D + d], w, oo);
    }
    float out_v = ll > 0.f ? oo / ll : 0.f;
    float lse_v = ll > 0.f ? (mm + log2f(ll)) * kLn2 : kNegInf;
    const int64_t row = static_cast<int64_t>(qi) * args.num_heads + head0 + h;
    if (final_out) {
      if (args.num_extra > 0) FoldExtrasElement<D>(args, row, d, out_v, lse_v);
      args.out[row * D + d] = out_v;
      if (d == 0) args.lse[row] = lse_v;
    } else {
      args.out[(row * args.num_items + item) * D + d] = out_v;
      if (d == 0) args.lse[row * args.num_items + item] = lse_v;
    }
  }
  if (!final_out && args.counters != nullptr) {
    DecodeFusedMerge<D, G>(args, qi, kv_head, hoff);
  }
}

// ---------------------------------------------------------------------------------------------
// Decode on tensor cores (decode_kernel = 2): the G (<= 8) query heads of one KV head's group
// are the rows of one m16n8k16 tile (rows G..15 zero), so S = Q K^T and O += P V are mma.sync
// over 16 keys at a time and the per-key CUDA-core dot products, shuffles and softmax of the
// kernels above disappear (per 16 keys and warp: 16 + 16 mma, 2 max shuffles, 4 exp2).
// Thread block: kDecodeMmaWarps warps, one (work item, KV head, query token) as above; every
// warp streams its own 16-key slice of each 16 * kDecodeMmaWarps-key step through its own
// S-stage cp.async pipeline in shared memory (XOR-swizzled rows, so ldmatrix is conflict-free)
// and keeps its own online softmax, so the main loop has no block-wide barrier; the warps
// combine through shared memory at the end, then the fused split merge runs as above.
constexpr int kDecodeMmaWarps = 4;
constexpr int kDecodeMmaKeys = 16;  // keys per warp per step

template <int D, int S>
__host__ __device__ constexpr int DecodeMmaSmemBytes() {
  return kDecodeMmaWarps * S * 2 * kDecodeMmaKeys * D * 2;
}

// The first kDecodeMmaDescCache block descriptors of a thread block's run are copied into shared
// memory at the start (kDescCache), so moving to the next segment in the load loop costs no
// dependent global load (measured: each such load stalls the warp that issues the copies for
// an L2 round trip under full memory traffic).
constexpr int kDecodeMmaDescCache = 64;

// kDesc = PagedAttentionParams::decode_mma_descriptors (1 cache, 2 global). (Measured and
// dropped: the next segment's descriptor prefetched into registers one segment ahead, 0.2-1 us
// slower than both.)
template <int D, int G, int S, int kDesc = 1>
__global__ void __launch_bounds__(kDecodeMmaWarps * 32) DecodeMmaKernel(const DecodeArgs args) {
  constexpr bool kDescCache = kDesc == 1;
  static_assert(G >= 1 && G <= 8);
  constexpr int NW = kDecodeMmaWarps;                      // warps of the block
  constexpr int kStep = kDecodeMmaWarps * kDecodeMmaKeys;  // key rows per block step
  constexpr int kWarpElems = kDecodeMmaKeys * D;           // one warp's K (or V) slice of a stage
  constexpr int kChunksPerRow = D / 8;                     // 16-byte chunks per key row
  constexpr int kCopies = kDecodeMmaKeys * kChunksPerRow / 32;  // per lane, of K (and of V)
  constexpr int kKSteps = D / 16;                               // k-steps of Q K^T
  constexpr int kOTiles = D / 8;                                // n-tiles of O
  static_assert(NW * G * D * 4 + 2 * NW * G * 4 <= DecodeMmaSmemBytes<D, S>());
  extern __shared__ __align__(128) uint16_t dsmem[];  // [warp][stage][K, V][16][D]

  const int tid = threadIdx.x;
  const int warp = tid / 32;
  const int lane = tid % 32;
  const int r = lane / 4;  // fragment row = query head of the group (valid when r < G)
  const int qd = lane % 4;
  const int item = blockIdx.x;
  const int kv_head = blockIdx.y;
  const int head0 = kv_head * G;  // group == G
  const int qi = blockIdx.z;
  // PDL (args.pdl): wait here, before any global access, unless the first stages' copies may go
  // first (pdl 2: the wait follows them, below).
  if (args.pdl == 1) GridDependencyWait();
  const DeviceKvBlock* blocks = args.blocks;
  int num_blocks = args.num_blocks;
  int blocks_per_item = args.blocks_per_item;
  if (args.q_block_offsets != nullptr) {
    const int first = args.q_block_offsets[qi];
    blocks += first;
    num_blocks = args.q_block_offsets[qi + 1] - first;
    blocks_per_item = max(1, (num_blocks + args.num_items - 1) / args.num_items);
  }
  const int b_first = (item / args.chunks_per_block) * blocks_per_item;
  const int b_last = min(num_blocks, b_first + blocks_per_item);
  const bool chunked = args.chunks_per_block > 1;
  const int chunk_begin = (item % args.chunks_per_block) * args.chunk_tokens;
  const int64_t qpos = static_cast<int64_t>(args.q_start_pos) + qi;
  const int row_stride = args.num_kv_heads * D;
  const int t_first = chunked ? chunk_begin : 0;  // first row of block b_first

  // Descriptors of blocks [b_first, b_first + kDecodeMmaDescCache) in shared memory.
  __shared__ const void* sm_dk[kDescCache ? kDecodeMmaDescCache : 1];
  __shared__ const void* sm_dv[kDescCache ? kDecodeMmaDescCache : 1];
  __shared__ int sm_dn[kDescCache ? kDecodeMmaDescCache : 1];
  if constexpr (kDescCache) {
    const int n_cached = min(kDecodeMmaDescCache, b_last - b_first);
    for (int i = tid; i < n_cached; i += NW * 32) {
      const DeviceKvBlock d = blocks[b_first + i];
      sm_dk[i] = d.k;
      sm_dv[i] = d.v;
      sm_dn[i] = d.num_tokens;
    }
    __syncthreads();
  }
  // (b >= b_first for every cursor position below.)
  auto cached = [&](int b) { return kDescCache && b - b_first < kDecodeMmaDescCache; };
  auto num_tokens_of = [&](int b) { return cached(b) ? sm_dn[b - b_first] : blocks[b].num_tokens; };

  float o[kOTiles][4];
#pragma unroll
  for (int n = 0; n < kOTiles; ++n) o[n][0] = o[n][1] = o[n][2] = o[n][3] = 0.f;
  float m = kNegInf;  // row r's running max (log2 domain)
  float l = 0.f;      // this lane's share of row r's sum

  struct Cursor {
    int b;
    int tb;
    int tend;
    int64_t key0;
  };
  auto settle = [&](Cursor& c) {
    while (c.b < b_last) {
      const int n = num_tokens_of(c.b);
      c.tend = chunked ? min(n, chunk_begin + args.chunk_tokens) : n;
      if (c.tb < c.tend) return;
      c.key0 += n;
      ++c.b;
      c.tb = chunked ? chunk_begin : 0;
    }
  };
  auto advance = [&](Cursor& c) {
    c.tb += kStep;
    if (c.tb >= c.tend) {
      if (chunked) {
        c.b = b_last;
        return;
      }
      c.key0 += c.tend;  // (not chunked: the block's token count)
      ++c.b;
      c.tb = 0;
      settle(c);
    }
  };
  uint16_t* wsmem = dsmem + warp * S * 2 * kWarpElems;
  auto issue = [&](const Cursor& c, int stage) {
    const bool in_cache = cached(c.b);
    const void* kp = in_cache ? sm_dk[c.b - b_first] : blocks[c.b].k;
    const void* vp = in_cache ? sm_dv[c.b - b_first] : blocks[c.b].v;
    const int row0 = c.tb + warp * kDecodeMmaKeys;
    const int valid = min(kDecodeMmaKeys, c.tend - row0);  // may be <= 0
    const uint16_t* kb = static_cast<const uint16_t*>(kp) + kv_head * D;
    const uint16_t* vb = static_cast<const uint16_t*>(vp) + kv_head * D;
    const uint32_t base = SmemAddr(wsmem + stage * 2 * kWarpElems);
#pragma unroll
    for (int it = 0; it < kCopies; ++it) {
      const int i = lane + it * 32;
      const int row = i / kChunksPerRow;
      const int ch = i % kChunksPerRow;
      const bool ok = row < valid;
      const int64_t off = ok ? static_cast<int64_t>(row0 + row) * row_stride + ch * 8 : 0;
      const uint32_t dst = base + SwizzledOffset<D>(row, ch) * 2;
      CpAsync16(dst, kb + off, ok ? 16 : 0);
      CpAsync16(dst + kWarpElems * 2, vb + off, ok ? 16 : 0);
    }
  };

  // Q as the A fragments (loaded after the first stages' copies went out: load_q):
  // rows r and r + 8; rows >= G and the upper half are zero.
  uint32_t qa[kKSteps][2];
  auto load_q = [&]() {
#pragma unroll
    for (int kk = 0; kk < kKSteps; ++kk) {
      qa[kk][0] = qa[kk][1] = 0u;
      if (r < G) {
        const uint32_t* qrow = reinterpret_cast<const uint32_t*>(
            args.q + (static_cast<int64_t>(qi) * args.num_heads + head0 + r) * D + 16 * kk +
            2 * qd);
        qa[kk][0] = qrow[0];
        qa[kk][1] = qrow[4];  // dims + 8
      }
    }
  };
  // One 16-row slice of this warp in stage `stage`: `valid` rows are keys (> 0), the first at
  // key position key_at (causal only).
  auto compute = [&](int stage, int valid, int64_t key_at) {
    {
      const uint16_t* kst = wsmem + stage * 2 * kWarpElems;
      const uint16_t* vst = kst + kWarpElems;
      float s[2][4];
#pragma unroll
      for (int j = 0; j < 2; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
      for (int kk = 0; kk < kKSteps; ++kk) {
        const int mi = lane >> 3;
        const int key = 8 * (mi >> 1) + (lane & 7);
        const int chunk = 2 * kk + (mi & 1);
        uint32_t b0, b1, b2, b3;
        LdMatrixX4(SmemAddr(kst + SwizzledOffset<D>(key, chunk)), b0, b1, b2, b3);
        const uint32_t a[4] = {qa[kk][0], 0u, qa[kk][1], 0u};
        MmaBf16(s[0], a, b0, b1);
        MmaBf16(s[1], a, b2, b3);
      }
      const bool need_mask =
          valid < kDecodeMmaKeys || (args.causal && key_at + kDecodeMmaKeys - 1 > qpos);
      float mx = kNegInf;
#pragma unroll
      for (int j = 0; j < 2; ++j) {
#pragma unroll
        for (int e = 0; e < 2; ++e) {
          float v = s[j][e] * args.scale_log2;
          if (need_mask) {
            const int col = 8 * j + 2 * qd + e;
            if (col >= valid || (args.causal && key_at + col > qpos)) v = kNegInf;
          }
          s[j][e] = v;
          mx = fmaxf(mx, v);
        }
      }
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
      mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
      const float nm = fmaxf(m, mx);
      const float use = nm == kNegInf ? 0.f : nm;
      const float corr = exp2f(m - use);
      m = nm;
      const float p00 = exp2f(s[0][0] - use);
      const float p01 = exp2f(s[0][1] - use);
      const float p10 = exp2f(s[1][0] - use);
      const float p11 = exp2f(s[1][1] - use);
      l = l * corr + ((p00 + p01) + (p10 + p11));
      const uint32_t pa[4] = {PackBf16(p00, p01), 0u, PackBf16(p10, p11), 0u};
#pragma unroll
      for (int n = 0; n < kOTiles; ++n) {
        o[n][0] *= corr;
        o[n][1] *= corr;
      }
#pragma unroll
      for (int n = 0; n < kOTiles; n += 2) {
        const int mi = lane >> 3;
        const int key = 8 * (mi & 1) + (lane & 7);
        const int chunk = n + (mi >> 1);
        uint32_t b0, b1, b2, b3;
        LdMatrixX4Trans(SmemAddr(vst + SwizzledOffset<D>(key, chunk)), b0, b1, b2, b3);
        MmaBf16(o[n], pa, b0, b1);
        MmaBf16(o[n + 1], pa, b2, b3);
      }
    }
  };
  Cursor load{b_first, t_first, 0, 0};
  if (args.causal) load.key0 = KeysBefore(blocks, b_first);
  settle(load);
  Cursor comp = load;
  int issued = 0;
#pragma unroll
  for (int st = 0; st < S - 1; ++st) {
    if (load.b < b_last) {
      issue(load, st);
      advance(load);
      ++issued;
    }
    CpAsyncCommit();
  }
  if (args.pdl == 2) GridDependencyWait();  // (K/V and descriptors are not the previous grid's)
  load_q();
  int stage = 0;
  for (int computed = 0; computed < issued; ++computed) {
    CpAsyncWait<S - 2>();
    __syncwarp();  // every lane's copies of this stage landed; the stage refilled below is free
    if (load.b < b_last) {
      issue(load, (stage + S - 1) % S);
      advance(load);
      ++issued;
    }
    CpAsyncCommit();
    const int row0 = comp.tb + warp * kDecodeMmaKeys;
    if (row0 < comp.tend) {  // (uniform per warp) some of this warp's 16 rows are keys
      compute(stage, comp.tend - row0, comp.key0 + row0);
    }
    advance(comp);
    stage = (stage + 1) % S;
  }
  // The keys are done: a PDL-launched next grid may be scheduled (it waits for our completion
  // before it touches anything we write).
  GridDependentsLaunch();
  CpAsyncWait<0>();
  l += __shfl_xor_sync(0xffffffffu, l, 1);
  l += __shfl_xor_sync(0xffffffffu, l, 2);
  __syncthreads();  // every warp is done with its stages: they become the combine arrays

  float* sm_o = reinterpret_cast<float*>(dsmem);  // [NW][G][D]
  float* sm_m = sm_o + NW * G * D;                // [NW][G]
  float* sm_l = sm_m + NW * G;                    // [NW][G]
  if (r < G) {
#pragma unroll
    for (int n = 0; n < kOTiles; ++n) {
      *reinterpret_cast<float2*>(sm_o + (warp * G + r) * D + 8 * n + 2 * qd) =
          make_float2(o[n][0], o[n][1]);
    }
    if (qd == 0) {
      sm_m[warp * G + r] = m;
      sm_l[warp * G + r] = l;
    }
  }
  __syncthreads();
  const bool final_out = args.num_items == 1;
  for (int idx = tid; idx < G * D; idx += NW * 32) {
    const int h = idx / D;
    const int d = idx % D;
    float mm = kNegInf;
#pragma unroll
    for (int w = 0; w < NW; ++w) mm = fmaxf(mm, sm_m[w * G + h]);
    const float use = mm == kNegInf ? 0.f : mm;
    float ll = 0.f, oo = 0.f;
#pragma unroll
    for (int w = 0; w < NW; ++w) {
      const float wt = exp2f(sm_m[w * G + h] - use);
      ll = fmaf(sm_l[w * G + h], wt, ll);
      oo = fmaf(sm_o[(w * G + h) * D + d], wt, oo);
    }
    float out_v = ll > 0.f ? oo / ll : 0.f;
    float lse_v = ll > 0.f ? (mm + log2f(ll)) * kLn2 : kNegInf;
    const int64_t row = static_cast<int64_t>(qi) * args.num_heads + head0 + h;
    if (final_out) {
      if (args.num_extra > 0) FoldExtrasElement<D>(args, row, d, out_v, lse_v);
      args.out[row * D + d] = out_v;
      if (d == 0) args.lse[row] = lse_v;
    } else {
      args.out[(row * args.num_items + item) * D + d] = out_v;
      if (d == 0) args.lse[row * args.num_items + item] = lse_v;
    }
  }
  if (!final_out && args.counters != nullptr) {
    // (16 partials' loads in flight: 0.1-0.4 us faster than 8 per call, measured on an H100.)
    DecodeFusedMerge<D, G, 16>(args, qi, kv_head, 0);
  }
}

// ---------------------------------------------------------------------------------------------
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

// Small head dims (16, 32; e.g. tiny test models): one warp per (query token, head), each lane an
// online softmax over every 32nd key of the concatenated blocks, then a butterfly merge of the
// lanes' (max, sum, accumulator). CUDA cores, float32; not tuned (the tensor-core and split-KV
// kernels above need head_dim >= 64). Same conventions as the other kernels (causal,
// q_block_offsets, out/lse).
template <int D>
__global__ void __launch_bounds__(32)
    SmallHeadKernel(const uint16_t* __restrict__ q, const DeviceKvBlock* __restrict__ blocks,
                    int num_blocks, const int32_t* __restrict__ q_block_offsets, int num_heads,
                    int num_kv_heads, float scale, int causal, int q_start_pos,
                    float* __restrict__ out, float* __restrict__ lse) {
  const int i = blockIdx.x;  // query token
  const int h = blockIdx.y;  // query head
  const int lane = threadIdx.x;
  const int kvh = h / (num_heads / num_kv_heads);
  const int64_t row = static_cast<int64_t>(i) * num_heads + h;
  float qf[D];
#pragma unroll
  for (int d = 0; d < D; ++d) {
    qf[d] = __uint_as_float(static_cast<uint32_t>(q[row * D + d]) << 16);
  }
  int b_begin = 0;
  int b_end = num_blocks;
  if (q_block_offsets != nullptr) {
    b_begin = q_block_offsets[i];
    b_end = q_block_offsets[i + 1];
  }
  const int64_t limit = causal ? static_cast<int64_t>(q_start_pos) + i : INT64_MAX;
  float m = -INFINITY;
  float l = 0.f;
  float acc[D];
#pragma unroll
  for (int d = 0; d < D; ++d) acc[d] = 0.f;
  int64_t base = 0;  // key number of the block's first row
  for (int b = b_begin; b < b_end; ++b) {
    const DeviceKvBlock blk = blocks[b];
    const uint16_t* kb = static_cast<const uint16_t*>(blk.k);
    const uint16_t* vb = static_cast<const uint16_t*>(blk.v);
    for (int t = lane; t < blk.num_tokens; t += 32) {
      if (base + t > limit) break;
      const int64_t off = (static_cast<int64_t>(t) * num_kv_heads + kvh) * D;
      float s = 0.f;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        s += qf[d] * __uint_as_float(static_cast<uint32_t>(kb[off + d]) << 16);
      }
      s *= scale;
      const float m_new = fmaxf(m, s);
      const float corr = __expf(m - m_new);  // exp(-inf) = 0 on the first key
      const float p = __expf(s - m_new);
      l = l * corr + p;
#pragma unroll
      for (int d = 0; d < D; ++d) {
        acc[d] = acc[d] * corr + p * __uint_as_float(static_cast<uint32_t>(vb[off + d]) << 16);
      }
      m = m_new;
    }
    base += blk.num_tokens;
  }
  // Merge the 32 lanes.
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) {
    const float m_o = __shfl_xor_sync(0xffffffffu, m, off);
    const float l_o = __shfl_xor_sync(0xffffffffu, l, off);
    const float m_new = fmaxf(m, m_o);
    const float c_self = m == -INFINITY ? 0.f : __expf(m - m_new);
    const float c_o = m_o == -INFINITY ? 0.f : __expf(m_o - m_new);
    l = l * c_self + l_o * c_o;
#pragma unroll
    for (int d = 0; d < D; ++d) {
      const float a_o = __shfl_xor_sync(0xffffffffu, acc[d], off);
      acc[d] = acc[d] * c_self + a_o * c_o;
    }
    m = m_new;
  }
  if (lane == 0) {
    const bool empty = !(l > 0.f);
    const float inv = empty ? 0.f : 1.0f / l;
#pragma unroll
    for (int d = 0; d < D; ++d) out[row * D + d] = acc[d] * inv;
    lse[row] = empty ? -INFINITY : m + logf(l);
  }
}

absl::Status LaunchSmallHead(const PagedAttentionParams& p, float scale, cudaStream_t stream);

// ---------------------------------------------------------------------------------------------
// Host side: validation, configuration, launches.

absl::Status Validate(const PagedAttentionParams& p, AttentionKernel kernel) {
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

struct Config {
  AttentionKernel kernel = AttentionKernel::kPrefill;
  int prefill_warps = 4;
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

template <int D, int G, int U>
cudaError_t PrepareDecodeSmem() {
  static const cudaError_t err =
      cudaFuncSetAttribute(DecodeSmemKernel<D, G, U>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           DecodeSmemBytes<D, U>());
  return err;
}

template <int D, int G, int U, bool kSmem>
absl::StatusOr<int> DecodeBlocksPerSmT() {
  static int blocks = -1;
  static cudaError_t err =
      kSmem
          ? (PrepareDecodeSmem<D, G, U>() != cudaSuccess
                 ? PrepareDecodeSmem<D, G, U>()
                 : cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                       &blocks, DecodeSmemKernel<D, G, U>, kDecodeThreads, DecodeSmemBytes<D, U>()))
          : cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, DecodeKernel<D, G, U>,
                                                          kDecodeThreads, 0);
  if (err != cudaSuccess) {
    return absl::InternalError(absl::StrFormat("cudaOccupancyMaxActiveBlocksPerMultiprocessor: %s",
                                               cudaGetErrorString(err)));
  }
  return blocks;
}

template <int D, int U, bool kSmem>
absl::StatusOr<int> DecodeBlocksPerSmDU(int g) {
  switch (g) {
    case 4:
      return DecodeBlocksPerSmT<D, 4, U, kSmem>();
    case 2:
      return DecodeBlocksPerSmT<D, 2, U, kSmem>();
    default:
      return DecodeBlocksPerSmT<D, 1, U, kSmem>();
  }
}

template <bool kSmem>
absl::StatusOr<int> DecodeBlocksPerSmS(int d, int g, int u) {
  if (d == 128) {
    return u == 2 ? DecodeBlocksPerSmDU<128, 2, kSmem>(g) : DecodeBlocksPerSmDU<128, 4, kSmem>(g);
  }
  return u == 2 ? DecodeBlocksPerSmDU<64, 2, kSmem>(g) : DecodeBlocksPerSmDU<64, 4, kSmem>(g);
}

absl::StatusOr<int> DecodeBlocksPerSm(int d, int g, int u, bool smem) {
  return smem ? DecodeBlocksPerSmS<true>(d, g, u) : DecodeBlocksPerSmS<false>(d, g, u);
}

// The tensor-core decode kernel: shapes it serves (else the CUDA-core kernels run).
bool DecodeMmaSupports(const PagedAttentionParams& p) {
  const int group = p.num_heads / p.num_kv_heads;
  return (p.head_dim == 128 || p.head_dim == 64) &&
         (group == 1 || group == 2 || group == 4 || group == 8);
}

template <int D, int G, int S, int C>
cudaError_t PrepareDecodeMma() {
  static const cudaError_t err =
      cudaFuncSetAttribute(DecodeMmaKernel<D, G, S, C>, cudaFuncAttributeMaxDynamicSharedMemorySize,
                           DecodeMmaSmemBytes<D, S>());
  return err;
}

template <int D, int G, int S, int C>
absl::StatusOr<int> DecodeMmaBlocksPerSmT() {
  static int blocks = 0;
  static const cudaError_t err = PrepareDecodeMma<D, G, S, C>() != cudaSuccess
                                     ? PrepareDecodeMma<D, G, S, C>()
                                     : cudaOccupancyMaxActiveBlocksPerMultiprocessor(
                                           &blocks, DecodeMmaKernel<D, G, S, C>,
                                           kDecodeMmaWarps * 32, DecodeMmaSmemBytes<D, S>());
  if (err != cudaSuccess) {
    return absl::InternalError(
        absl::StrFormat("decode (tensor cores) occupancy: %s", cudaGetErrorString(err)));
  }
  return blocks;
}

// Calls f(std::integral_constant<int, D>, ..G.., ..S.., ..descriptor mode..) for the kernel's
// supported shapes (descriptor mode 2, global memory: head_dim 128, group 4 only; else 1, the
// cache).
template <typename F>
auto DispatchDecodeMma(int d, int g, int stages, int desc_mode, F&& f) {
  using std::integral_constant;
  auto with_c = [&](auto dc, auto gc, auto sc) {
    if constexpr (decltype(dc)::value == 128 && decltype(gc)::value == 4) {
      if (desc_mode == 2) return f(dc, gc, sc, integral_constant<int, 2>());
    }
    return f(dc, gc, sc, integral_constant<int, 1>());
  };
  auto with_s = [&](auto dc, auto gc) {
    if constexpr (decltype(dc)::value == 128) {
      if (stages == 2) return with_c(dc, gc, integral_constant<int, 2>());
      if (stages == 4) return with_c(dc, gc, integral_constant<int, 4>());
    }
    return with_c(dc, gc, integral_constant<int, 3>());
  };
  auto with_g = [&](auto dc) {
    switch (g) {
      case 8:
        return with_s(dc, integral_constant<int, 8>());
      case 4:
        return with_s(dc, integral_constant<int, 4>());
      case 2:
        return with_s(dc, integral_constant<int, 2>());
      default:
        return with_s(dc, integral_constant<int, 1>());
    }
  };
  return d == 128 ? with_g(integral_constant<int, 128>()) : with_g(integral_constant<int, 64>());
}

absl::StatusOr<int> DecodeMmaBlocksPerSm(int d, int g, int stages, int desc_mode) {
  return DispatchDecodeMma(d, g, stages, desc_mode, [](auto dc, auto gc, auto sc, auto cc) {
    return DecodeMmaBlocksPerSmT<decltype(dc)::value, decltype(gc)::value, decltype(sc)::value,
                                 decltype(cc)::value>();
  });
}

template <int MT>
absl::StatusOr<int> PrefillBlocksPerSmM(int d, int nw) {
  if (d == 128) {
    return nw == 8 ? PrefillBlocksPerSmT<128, 8, MT>() : PrefillBlocksPerSmT<128, 4, MT>();
  }
  return nw == 8 ? PrefillBlocksPerSmT<64, 8, MT>() : PrefillBlocksPerSmT<64, 4, MT>();
}

absl::StatusOr<int> PrefillBlocksPerSm(int d, int nw, int mt) {
  return mt == 2 ? PrefillBlocksPerSmM<2>(d, nw) : PrefillBlocksPerSmM<1>(d, nw);
}

absl::StatusOr<Config> ChooseConfig(const PagedAttentionParams& p, AttentionKernel kernel) {
  if (absl::Status s = Validate(p, kernel); !s.ok()) return s;
  Config c;
  if (p.num_q_tokens == 0 || p.num_blocks == 0) return c;
  if (p.head_dim < 64) return c;  // SmallHeadKernel: no workspace
  absl::StatusOr<DeviceInfo> info = GetDeviceInfo();
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
        c.prefill_sm90 ? 1 : PrefillBlocksPerSm(p.head_dim, c.prefill_warps, c.prefill_mt);
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
    c.decode_mma = p.decode_kernel != 1 && DecodeMmaSupports(p);
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
        c.decode_mma
            ? DecodeMmaBlocksPerSm(p.head_dim, c.decode_g, c.decode_mma_stages, c.decode_mma_desc)
            : DecodeBlocksPerSm(p.head_dim, c.decode_g, c.decode_unroll, c.decode_smem);
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
    const bool counters_fit = ctas_per_item <= kMaxFusedCounters;
    if (c.items > 1) {
      const int64_t rows = static_cast<int64_t>(p.num_q_tokens) * p.num_heads;
      c.workspace_bytes = static_cast<size_t>(c.items) * rows * (p.head_dim + 1) * sizeof(float);
      c.workspace_bytes = kPagedAttentionCounterBytes + (c.workspace_bytes + 255) / 256 * 256;
      c.decode_fused = p.decode_merge == 0 && c.items <= kMaxFusedItems && counters_fit;
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

template <int D, int NW, int MT>
absl::Status LaunchPrefill(const PagedAttentionParams& p, const Config& c, float scale_log2,
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
absl::Status LaunchPrefillM(const PagedAttentionParams& p, const Config& c, float scale_log2,
                            float* out, float* lse, cudaStream_t stream) {
  if (p.head_dim == 128) {
    return c.prefill_warps == 8 ? LaunchPrefill<128, 8, MT>(p, c, scale_log2, out, lse, stream)
                                : LaunchPrefill<128, 4, MT>(p, c, scale_log2, out, lse, stream);
  }
  return c.prefill_warps == 8 ? LaunchPrefill<64, 8, MT>(p, c, scale_log2, out, lse, stream)
                              : LaunchPrefill<64, 4, MT>(p, c, scale_log2, out, lse, stream);
}

template <int D, int G, int U>
absl::Status LaunchDecode(const PagedAttentionParams& p, const Config& c, float scale_log2,
                          float* out, float* lse, cudaStream_t stream) {
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
  if constexpr (G == 1 && U == 4) {  // (LaunchDecodeD routes the tensor-core kernel here)
    if (c.decode_mma) {
      return DispatchDecodeMma(
          D, a.group, c.decode_mma_stages, c.decode_mma_desc,
          [&](auto dc, auto gc, auto sc, auto cc) {
            constexpr int kD = decltype(dc)::value;
            constexpr int kG = decltype(gc)::value;
            constexpr int kS = decltype(sc)::value;
            constexpr int kC = decltype(cc)::value;
            if (cudaError_t err = PrepareDecodeMma<kD, kG, kS, kC>(); err != cudaSuccess) {
              return absl::InternalError(absl::StrFormat(
                  "cudaFuncSetAttribute(decode tensor cores): %s", cudaGetErrorString(err)));
            }
            const dim3 grid(c.items, p.num_kv_heads, p.num_q_tokens);
            // One launch path: with pdl > 0 the programmatic-serialization attribute (the
            // kernel's griddepcontrol.wait then orders it), without it an ordinary launch.
            cudaLaunchConfig_t config = {};
            config.gridDim = grid;
            config.blockDim = dim3(kDecodeMmaWarps * 32);
            config.dynamicSmemBytes = DecodeMmaSmemBytes<kD, kS>();
            config.stream = stream;
            cudaLaunchAttribute attr[1];
            attr[0].id = cudaLaunchAttributeProgrammaticStreamSerialization;
            attr[0].val.programmaticStreamSerializationAllowed = 1;
            config.attrs = attr;
            config.numAttrs = p.pdl > 0 ? 1 : 0;
            if (cudaError_t err = cudaLaunchKernelEx(&config, DecodeMmaKernel<kD, kG, kS, kC>, a);
                err != cudaSuccess) {
              return absl::InternalError(absl::StrFormat(
                  "decode attention (tensor cores) launch: %s", cudaGetErrorString(err)));
            }
            return LaunchStatus("decode attention (tensor cores)");
          });
    }
  }
  const dim3 grid(c.items, p.num_kv_heads * (a.group / G), p.num_q_tokens);
  if (c.decode_smem) {
    if (cudaError_t err = PrepareDecodeSmem<D, G, U>(); err != cudaSuccess) {
      return absl::InternalError(
          absl::StrFormat("cudaFuncSetAttribute(decode): %s", cudaGetErrorString(err)));
    }
    DecodeSmemKernel<D, G, U><<<grid, kDecodeThreads, DecodeSmemBytes<D, U>(), stream>>>(a);
  } else {
    DecodeKernel<D, G, U><<<grid, kDecodeThreads, 0, stream>>>(a);
  }
  return LaunchStatus("decode attention");
}

template <int D, int U>
absl::Status LaunchDecodeDU(const PagedAttentionParams& p, const Config& c, float scale_log2,
                            float* out, float* lse, cudaStream_t stream) {
  switch (c.decode_g) {
    case 4:
      return LaunchDecode<D, 4, U>(p, c, scale_log2, out, lse, stream);
    case 2:
      return LaunchDecode<D, 2, U>(p, c, scale_log2, out, lse, stream);
    default:
      return LaunchDecode<D, 1, U>(p, c, scale_log2, out, lse, stream);
  }
}

template <int D>
absl::Status LaunchDecodeD(const PagedAttentionParams& p, const Config& c, float scale_log2,
                           float* out, float* lse, cudaStream_t stream) {
  if (c.decode_mma) return LaunchDecode<D, 1, 4>(p, c, scale_log2, out, lse, stream);
  return c.decode_unroll == 2 ? LaunchDecodeDU<D, 2>(p, c, scale_log2, out, lse, stream)
                              : LaunchDecodeDU<D, 4>(p, c, scale_log2, out, lse, stream);
}

absl::Status LaunchMergeSplits(const float* o, int64_t o_part_stride, int64_t o_row_stride,
                               const float* l, int64_t l_part_stride, int64_t l_row_stride,
                               int parts, int64_t rows, int d, float* out, float* lse,
                               cudaStream_t stream, const float* extra_out = nullptr,
                               const float* extra_lse = nullptr, int num_extra = 0) {
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

absl::Status LaunchSmallHead(const PagedAttentionParams& p, float scale, cudaStream_t stream) {
  const dim3 grid(p.num_q_tokens, p.num_heads);
  if (p.head_dim == 16) {
    SmallHeadKernel<16><<<grid, 32, 0, stream>>>(
        static_cast<const uint16_t*>(p.q), p.blocks, p.num_blocks, p.q_block_offsets, p.num_heads,
        p.num_kv_heads, scale, p.causal ? 1 : 0, p.q_start_pos, p.out, p.lse);
  } else {
    SmallHeadKernel<32><<<grid, 32, 0, stream>>>(
        static_cast<const uint16_t*>(p.q), p.blocks, p.num_blocks, p.q_block_offsets, p.num_heads,
        p.num_kv_heads, scale, p.causal ? 1 : 0, p.q_start_pos, p.out, p.lse);
  }
  return LaunchStatus("small-head attention");
}

}  // namespace

absl::StatusOr<size_t> PagedAttentionWorkspaceBytes(const PagedAttentionParams& params,
                                                    AttentionKernel kernel) {
  absl::StatusOr<Config> c = ChooseConfig(params, kernel);
  if (!c.ok()) return c.status();
  return c->workspace_bytes;
}

absl::Status PagedAttention(const PagedAttentionParams& p, AttentionKernel kernel,
                            cudaStream_t stream) {
  absl::StatusOr<Config> cfg = ChooseConfig(p, kernel);
  if (!cfg.ok()) return cfg.status();
  const Config& c = *cfg;
  if (p.num_q_tokens == 0) return absl::OkStatus();
  const int64_t rows = static_cast<int64_t>(p.num_q_tokens) * p.num_heads;
  if (p.num_blocks == 0) {
    const int64_t n = rows * p.head_dim;
    FillEmptyKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(p.out, p.lse, rows,
                                                                                p.head_dim);
    if (absl::Status s = LaunchStatus("fill empty partial"); !s.ok()) return s;
    return LaunchMergeExtras(p, rows, stream);
  }
  if (c.workspace_bytes > 0 && (p.workspace == nullptr || p.workspace_bytes < c.workspace_bytes)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "PagedAttention: workspace_bytes = %u, needs %u (see PagedAttentionWorkspaceBytes)",
        p.workspace_bytes, c.workspace_bytes));
  }
  const float scale =
      p.softmax_scale > 0.f ? p.softmax_scale : 1.0f / std::sqrt(static_cast<float>(p.head_dim));
  if (p.head_dim < 64) {
    if (absl::Status s = LaunchSmallHead(p, scale, stream); !s.ok()) return s;
    return LaunchMergeExtras(p, rows, stream);
  }
  const float scale_log2 = scale * kLog2e;
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
      s = c.prefill_mt == 2 ? LaunchPrefillM<2>(p, c, scale_log2, out, lse, stream)
                            : LaunchPrefillM<1>(p, c, scale_log2, out, lse, stream);
    }
    if (!s.ok()) return s;
    if (c.splits == 1) return LaunchMergeExtras(p, rows, stream);
    // Partials are [split][row][D] and [split][row]; the extras join the split merge.
    return LaunchMergeSplits(out, rows * d, d, lse, rows, 1, c.splits, rows, d, p.out, p.lse,
                             stream, p.extra_out, p.extra_lse, p.num_extra);
  }
  float* out = p.out;
  float* lse = p.lse;
  if (c.items > 1) {
    out = reinterpret_cast<float*>(static_cast<char*>(p.workspace) + kPagedAttentionCounterBytes);
    lse = out + static_cast<int64_t>(c.items) * rows * d;
  }
  absl::Status s = d == 128 ? LaunchDecodeD<128>(p, c, scale_log2, out, lse, stream)
                            : LaunchDecodeD<64>(p, c, scale_log2, out, lse, stream);
  if (!s.ok() || c.items == 1 || c.decode_fused) return s;
  // Partials are [row][item][D] and [row][item]; the extras join the split merge.
  return LaunchMergeSplits(out, d, static_cast<int64_t>(c.items) * d, lse, 1, c.items, c.items,
                           rows, d, p.out, p.lse, stream, p.extra_out, p.extra_lse, p.num_extra);
}

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
  Merge2Kernel<<<static_cast<unsigned>((n + threads - 1) / threads), threads, 0, stream>>>(
      out_a, lse_a, out_b, lse_b, num_rows, d4);
  return LaunchStatus("merge partials");
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
  if (num_partials == 0) {
    const int64_t n = num_rows * head_dim;
    FillEmptyKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(out, lse, num_rows,
                                                                                head_dim);
    return LaunchStatus("fill empty partial");
  }
  if (head_dim == 128 || head_dim == 64) {
    return LaunchMergeSplits(outs, num_rows * head_dim, head_dim, lses, num_rows, 1, num_partials,
                             num_rows, head_dim, out, lse, stream);
  }
  const int64_t n = num_rows * head_dim;
  MergeNGenericKernel<<<static_cast<unsigned>((n + 255) / 256), 256, 0, stream>>>(
      outs, lses, num_partials, num_rows, head_dim, out, lse);
  return LaunchStatus("merge partials n-way");
}

}  // namespace tokenlake::attention::cuda
