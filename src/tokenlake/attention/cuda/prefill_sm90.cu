// The sm_90a prefill kernel of PagedAttention (see prefill_sm90.h for the design).
//
// Numerics as the other kernels (kernels.h): scores in the log2 domain (ex2.approx), float32
// softmax, P rounded to bf16 before P V, natural-log LSE = (m2 + log2(l)) * ln(2).
//
// Measured on an H100 (docs/results-gpu.md, "Prefill"): each step of the design below
// paid: warp specialisation (producer warpgroup + mbarriers) over all threads loading with one
// __syncthreads per tile, issuing S_j before P V_{j-1}, a one-FFMA softmax, and the ping-pong.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cmath>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/prefill_sm90.h"

namespace tokenlake::attention::cuda::internal {
namespace {

constexpr int kD = 128;               // head_dim
constexpr int kM = kSm90PrefillRows;  // rows of M per thread block (two warpgroups of 64)
constexpr int kN = 128;               // keys per tile
constexpr int kThreads = 384;         // producer warpgroup + two consumer warpgroups
constexpr int kStages = 3;
constexpr float kLn2 = 0.6931471805599453f;
constexpr float kNegInf = -INFINITY;

// Shared memory (1024-byte aligned base): Q, then kStages K tiles, then kStages V tiles, then the
// mbarriers. Every
// tile is two 64-column halves, each [rows][64] bf16 = 128-byte rows, 16-byte chunk c of row r at
// chunk c ^ (r & 7) (the 128-byte swizzle of wgmma descriptors).
constexpr int kHalfBytes = kN * 128;        // one 64-column half of a 128-row tile
constexpr int kTileBytes = 2 * kHalfBytes;  // 32 KB
constexpr int kQBytes = kTileBytes;         // kM == kN
// mbarriers after the tiles: q_full, full_k[3], full_v[3], empty_k[3], empty_v[3] (8 bytes each).
constexpr int kBarBytes = 16 * 8;
constexpr int kSmemBytes = kQBytes + 2 * kStages * kTileBytes + kBarBytes + 1024;  // + alignment
static_assert(kM == kN);

struct Args {
  const uint16_t* q;
  const DeviceKvBlock* blocks;
  int num_blocks;
  int num_q;
  int num_heads;
  int num_kv_heads;
  int group;
  int tile_tokens;  // query tokens per M tile: floor(kM / group)
  float scale_log2;
  int causal;
  int q_start_pos;
  int blocks_per_split;
  float* out;
  float* lse;
};

#if defined(__CUDA_ARCH__) && defined(__CUDA_ARCH_FEAT_SM90_ALL)
#define TOKENLAKE_SM90A 1
#endif

__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
__device__ __forceinline__ void CpAsyncCommit() { asm volatile("cp.async.commit_group;\n" ::); }
template <int N>
__device__ __forceinline__ void CpAsyncWait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N) : "memory");
}
// Makes this thread's generic-proxy shared-memory writes (cp.async included) visible to the
// async proxy (wgmma operand reads) after the next barrier.
__device__ __forceinline__ void FenceProxyAsync() {
  asm volatile("fence.proxy.async.shared::cta;\n" ::: "memory");
}

__device__ __forceinline__ uint32_t PackBf16(float lo, float hi) {
  __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
  return *reinterpret_cast<uint32_t*>(&v);
}

// Byte offset of 16-byte chunk `chunk` (0..15) of row `row` in a swizzled tile.
__device__ __forceinline__ uint32_t TileOffset(int row, int chunk) {
  return static_cast<uint32_t>((chunk >> 3) * kHalfBytes + row * 128 +
                               (((chunk & 7) ^ (row & 7)) << 4));
}

// wgmma shared-memory descriptor: 128-byte swizzle, leading / stride byte offsets.
__device__ __forceinline__ uint64_t Desc(uint32_t addr, uint32_t lbo, uint32_t sbo) {
  return static_cast<uint64_t>((addr & 0x3ffff) >> 4) | (static_cast<uint64_t>(lbo >> 4) << 16) |
         (static_cast<uint64_t>(sbo >> 4) << 32) | (1ull << 62);
}

#ifdef TOKENLAKE_SM90A
__device__ __forceinline__ void WgmmaFence() {
  asm volatile("wgmma.fence.sync.aligned;\n" ::: "memory");
}
__device__ __forceinline__ void WgmmaCommit() {
  asm volatile("wgmma.commit_group.sync.aligned;\n" ::: "memory");
}
template <int N>
__device__ __forceinline__ void WgmmaWait() {
  asm volatile("wgmma.wait_group.sync.aligned %0;\n" ::"n"(N) : "memory");
}
// Keeps the compiler from moving accesses of accumulator registers across wgmma issue / wait.
__device__ __forceinline__ void FenceRegs(float (&d)[64]) {
#pragma unroll
  for (int i = 0; i < 64; ++i) asm volatile("" : "+f"(d[i])::"memory");
}

// d (+)= A * B^T: A = 64 x 16 from shared memory (desc_a), B = 128 x 16 (desc_b, K-major);
// scale_d = 0 overwrites d, 1 accumulates. One warpgroup; asynchronous (see WgmmaCommit/Wait).
__device__ __forceinline__ void WgmmaSS(float (&d)[64], uint64_t desc_a, uint64_t desc_b,
                                        int scale_d) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %66, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, %64, %65, p, 1, 1, 0, 0;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "l"(desc_a), "l"(desc_b), "r"(scale_d));
}

// d += A * B: A = 64 x 16 bf16 in registers (the m16n8k16 A-fragment layout per warp), B =
// 16 x 128 from shared memory, MN-major (desc_b, transposed). Asynchronous.
__device__ __forceinline__ void WgmmaRS(float (&d)[64], const uint32_t (&a)[4], uint64_t desc_b) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %69, 0;\n"
      "wgmma.mma_async.sync.aligned.m64n128k16.f32.bf16.bf16 {"
      "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, "
      "%16, %17, %18, %19, %20, %21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31, "
      "%32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, "
      "%48, %49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"
      "}, {%64, %65, %66, %67}, %68, p, 1, 1, 1;\n}\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3]), "+f"(d[4]), "+f"(d[5]), "+f"(d[6]),
        "+f"(d[7]), "+f"(d[8]), "+f"(d[9]), "+f"(d[10]), "+f"(d[11]), "+f"(d[12]), "+f"(d[13]),
        "+f"(d[14]), "+f"(d[15]), "+f"(d[16]), "+f"(d[17]), "+f"(d[18]), "+f"(d[19]), "+f"(d[20]),
        "+f"(d[21]), "+f"(d[22]), "+f"(d[23]), "+f"(d[24]), "+f"(d[25]), "+f"(d[26]), "+f"(d[27]),
        "+f"(d[28]), "+f"(d[29]), "+f"(d[30]), "+f"(d[31]), "+f"(d[32]), "+f"(d[33]), "+f"(d[34]),
        "+f"(d[35]), "+f"(d[36]), "+f"(d[37]), "+f"(d[38]), "+f"(d[39]), "+f"(d[40]), "+f"(d[41]),
        "+f"(d[42]), "+f"(d[43]), "+f"(d[44]), "+f"(d[45]), "+f"(d[46]), "+f"(d[47]), "+f"(d[48]),
        "+f"(d[49]), "+f"(d[50]), "+f"(d[51]), "+f"(d[52]), "+f"(d[53]), "+f"(d[54]), "+f"(d[55]),
        "+f"(d[56]), "+f"(d[57]), "+f"(d[58]), "+f"(d[59]), "+f"(d[60]), "+f"(d[61]), "+f"(d[62]),
        "+f"(d[63])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(desc_b), "r"(1));
}

#endif  // TOKENLAKE_SM90A

// Copies rows [t0, t0 + valid) of one block's K or V (this KV head's columns) into a tile with
// NT threads; the other rows are zero-filled (so masked keys contribute exact zeros to P V).
template <int NT>
__device__ __forceinline__ void LoadKvTile(uint32_t tile, const uint16_t* base, int t0, int valid,
                                           int row_stride, int tid) {
#pragma unroll
  for (int it = 0; it < kN * 16 / NT; ++it) {
    const int i = tid + it * NT;
    const int row = i >> 4;
    const int chunk = i & 15;
    const bool ok = row < valid;
    const uint16_t* src =
        ok ? base + static_cast<int64_t>(t0 + row) * row_stride + chunk * 8 : base;
    CpAsync16(tile + TileOffset(row, chunk), src, ok ? 16 : 0);
  }
}

// Copies the block tile's Q rows with NT threads: row r = (token tok0 + r / group, head
// kv_head * group + r % group); unused rows (past rows_used or num_q) are zero.
template <int NT>
__device__ __forceinline__ void LoadQTile(uint32_t q_smem, const Args& args, int tok0, int kv_head,
                                          int tid) {
  const int rows_used = args.tile_tokens * args.group;
#pragma unroll 4
  for (int it = 0; it < kM * 16 / NT; ++it) {
    const int i = tid + it * NT;
    const int row = i >> 4;
    const int chunk = i & 15;
    const int tok = tok0 + row / args.group;
    const int head = kv_head * args.group + row % args.group;
    const bool ok = row < rows_used && tok < args.num_q;
    const uint16_t* src =
        ok ? args.q + (static_cast<int64_t>(tok) * args.num_heads + head) * kD + chunk * 8 : args.q;
    CpAsync16(q_smem + TileOffset(row, chunk), src, ok ? 16 : 0);
  }
}

// Position of the tile iterator over (block, first row) of one split's blocks.
struct TileIt {
  int b;         // block; >= b_end when past the end
  int t0;        // first row of the tile in the block
  int64_t key0;  // key number of the tile's first row
};

__device__ __forceinline__ void Advance(TileIt& it, const DeviceKvBlock* blocks, int b_end) {
  if (it.b >= b_end) return;
  const int n = blocks[it.b].num_tokens;
  it.key0 += min(kN, n - it.t0);
  it.t0 += kN;
  if (it.t0 >= n) {
    it.t0 = 0;
    ++it.b;
    while (it.b < b_end && blocks[it.b].num_tokens <= 0) ++it.b;
  }
}

// The first tile of a split (key0 counted only when causal needs it).
__device__ __forceinline__ TileIt FirstTile(const Args& args, int b_begin, int b_end) {
  TileIt it{b_begin, 0, 0};
  while (it.b < b_end && args.blocks[it.b].num_tokens <= 0) ++it.b;
  if (args.causal) {
    for (int b = 0; b < it.b; ++b) it.key0 += args.blocks[b].num_tokens;
  }
  return it;
}

#ifdef TOKENLAKE_SM90A
// S = Q K^T for one warpgroup's 64 rows (q_desc_base: its first Q row) over one K tile.
__device__ __forceinline__ void IssueS(float (&s)[64], uint32_t q_desc_base, uint32_t kt) {
#pragma unroll
  for (int kk = 0; kk < kD / 16; ++kk) {
    const uint32_t off = (kk >> 2) * kHalfBytes + (kk & 3) * 32;
    WgmmaSS(s, Desc(q_desc_base + off, 16, 1024), Desc(kt + off, 16, 1024), kk > 0 ? 1 : 0);
  }
}

// O += P V over one V tile (P in registers).
__device__ __forceinline__ void IssuePV(float (&o)[64], const uint32_t (&pa)[8][4], uint32_t vt) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    WgmmaRS(o, pa[kk], Desc(vt + kk * 2048, kHalfBytes, 1024));
  }
}
#endif  // TOKENLAKE_SM90A

// Online-softmax state of this thread's two rows (r0: s[4i], s[4i+1]; r1: s[4i+2], s[4i+3]).
struct RowState {
  float m0 = kNegInf, m1 = kNegInf;  // running max, log2 domain
  float l0 = 0.f, l1 = 0.f;          // this thread's share of the sums of exp2
};

// 2^x (MUFU.EX2, flush-to-zero; 2^-inf = 0).
__device__ __forceinline__ float Exp2(float x) {
  float y;
  asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
  return y;
}

// Masks S of one tile (raw scores; the scale is positive, so the max commutes with it), updates
// the running max (log2 domain) and sums, replaces s by exp2(s * scale - max) (one FFMA and one
// EX2 per element), and returns the factors by which O must be rescaled (corr0, corr1).
__device__ __forceinline__ void Softmax(float (&s)[64], RowState& st, const Args& args,
                                        const TileIt& it, int64_t min_qpos, int64_t qpos0,
                                        int64_t qpos1, int t, float& corr0, float& corr1) {
  const int valid = min(kN, args.blocks[it.b].num_tokens - it.t0);
  const bool need_mask = valid < kN || (args.causal && it.key0 + kN - 1 > min_qpos);
  if (need_mask) {
#pragma unroll
    for (int i = 0; i < 16; ++i) {
#pragma unroll
      for (int e = 0; e < 4; ++e) {
        const int col = 8 * i + 2 * t + (e & 1);
        const int64_t key = it.key0 + col;
        const int64_t qp = e < 2 ? qpos0 : qpos1;
        if (col >= valid || (args.causal && key > qp)) s[4 * i + e] = kNegInf;
      }
    }
  }
  float mx0 = kNegInf, mx1 = kNegInf;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    mx0 = fmaxf(mx0, fmaxf(s[4 * i], s[4 * i + 1]));
    mx1 = fmaxf(mx1, fmaxf(s[4 * i + 2], s[4 * i + 3]));
  }
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 1));
  mx0 = fmaxf(mx0, __shfl_xor_sync(0xffffffffu, mx0, 2));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 1));
  mx1 = fmaxf(mx1, __shfl_xor_sync(0xffffffffu, mx1, 2));
  const float scale = args.scale_log2;
  const float nm0 = fmaxf(st.m0, mx0 * scale);
  const float nm1 = fmaxf(st.m1, mx1 * scale);
  const float use0 = nm0 == kNegInf ? 0.f : nm0;
  const float use1 = nm1 == kNegInf ? 0.f : nm1;
  corr0 = Exp2(st.m0 - use0);
  corr1 = Exp2(st.m1 - use1);
  st.m0 = nm0;
  st.m1 = nm1;
  float sum0 = 0.f, sum1 = 0.f;
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    s[4 * i] = Exp2(fmaf(s[4 * i], scale, -use0));
    s[4 * i + 1] = Exp2(fmaf(s[4 * i + 1], scale, -use0));
    s[4 * i + 2] = Exp2(fmaf(s[4 * i + 2], scale, -use1));
    s[4 * i + 3] = Exp2(fmaf(s[4 * i + 3], scale, -use1));
    sum0 += s[4 * i] + s[4 * i + 1];
    sum1 += s[4 * i + 2] + s[4 * i + 3];
  }
  st.l0 = st.l0 * corr0 + sum0;
  st.l1 = st.l1 * corr1 + sum1;
}

// O *= corr per row; P (bf16 A fragments) from the probabilities in s.
__device__ __forceinline__ void RescaleAndPack(float (&o)[64], const float (&s)[64],
                                               uint32_t (&pa)[8][4], float corr0, float corr1) {
#pragma unroll
  for (int i = 0; i < 16; ++i) {
    o[4 * i] *= corr0;
    o[4 * i + 1] *= corr0;
    o[4 * i + 2] *= corr1;
    o[4 * i + 3] *= corr1;
  }
#pragma unroll
  for (int kk = 0; kk < 8; ++kk) {
    pa[kk][0] = PackBf16(s[8 * kk], s[8 * kk + 1]);
    pa[kk][1] = PackBf16(s[8 * kk + 2], s[8 * kk + 3]);
    pa[kk][2] = PackBf16(s[8 * kk + 4], s[8 * kk + 5]);
    pa[kk][3] = PackBf16(s[8 * kk + 6], s[8 * kk + 7]);
  }
}

// Normalises and writes this thread's two rows (r0 = wg_row0 + g, r1 = r0 + 8) of O and LSE.
__device__ __forceinline__ void WriteRows(const float (&o)[64], RowState st, const Args& args,
                                          int tok0, int kv_head, int split, int r0, int t) {
  st.l0 += __shfl_xor_sync(0xffffffffu, st.l0, 1);
  st.l0 += __shfl_xor_sync(0xffffffffu, st.l0, 2);
  st.l1 += __shfl_xor_sync(0xffffffffu, st.l1, 1);
  st.l1 += __shfl_xor_sync(0xffffffffu, st.l1, 2);
  const int rows_used = args.tile_tokens * args.group;
  const int64_t split_rows = static_cast<int64_t>(split) * args.num_q * args.num_heads;
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int r = r0 + 8 * half;
    const float l = half == 0 ? st.l0 : st.l1;
    const float m = half == 0 ? st.m0 : st.m1;
    const int tok = tok0 + r / args.group;
    if (r >= rows_used || tok >= args.num_q) continue;
    const int head = kv_head * args.group + r % args.group;
    const int64_t row = split_rows + static_cast<int64_t>(tok) * args.num_heads + head;
    const float inv = l > 0.f ? 1.f / l : 0.f;
    float* dst = args.out + row * kD;
#pragma unroll
    for (int i = 0; i < 16; ++i) {
      *reinterpret_cast<float2*>(dst + 8 * i + 2 * t) =
          make_float2(o[4 * i + 2 * half] * inv, o[4 * i + 2 * half + 1] * inv);
    }
    if (t == 0) args.lse[row] = l > 0.f ? (m + log2f(l)) * kLn2 : kNegInf;
  }
}

// ---------------------------------------------------------------------------------------------
// The kernel, warp-specialised. Warpgroup 0 = producer: cp.async of Q, then K_0, V_0, K_1, ...
// into the stage rings; a unit's "full" mbarrier is signalled once the producer's copies of it
// have landed (checked kProducerLag units later, then fence.proxy.async so that the wgmma async
// proxy sees them); it waits on the stage's "empty" mbarrier before overwriting it. Warpgroups 1
// and 2 = consumers (64 rows each): per tile j, wait K_j (and V_{j-1}); on their turn (ping-pong
// on named barriers 1 and 2) issue S_j = Q K_j^T then O += P_{j-1} V_{j-1}; hand the turn over;
// wait S_j, release K_j, softmax; wait P V, release V_{j-1}; rescale O, pack P_j. No block-wide
// barrier in the loop. setmaxnreg gives the consumers 216 registers, the producer 72 (40 would
// spill its address arithmetic).
constexpr int kProducerThreads = 128;
constexpr int kProducerLag = 2;  // load units in flight per producer thread before it signals

__device__ __forceinline__ void MbarInit(uint32_t bar, int count) {
  asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;\n" ::"r"(bar), "r"(count) : "memory");
}
__device__ __forceinline__ void MbarArrive(uint32_t bar) {
  asm volatile("mbarrier.arrive.release.cta.shared::cta.b64 _, [%0];\n" ::"r"(bar) : "memory");
}
__device__ __forceinline__ void MbarWait(uint32_t bar, uint32_t parity) {
  asm volatile(
      "{\n.reg .pred p;\nWAIT_%=:\n"
      "mbarrier.try_wait.parity.acquire.cta.shared::cta.b64 p, [%0], %1;\n"
      "@!p bra WAIT_%=;\n}\n" ::"r"(bar),
      "r"(parity)
      : "memory");
}

// Named barriers 1 and 2 (0 is __syncthreads) between the two consumer warpgroups (256 threads:
// one warpgroup syncs, the other arrives).
__device__ __forceinline__ void NamedBarrierSync(int id) {
  asm volatile("bar.sync %0, 256;\n" ::"r"(id) : "memory");
}
__device__ __forceinline__ void NamedBarrierArrive(int id) {
  asm volatile("bar.arrive %0, 256;\n" ::"r"(id) : "memory");
}

__global__ void __launch_bounds__(kThreads, 1)
    PrefillSm90Kernel(const __grid_constant__ Args args) {
#ifdef TOKENLAKE_SM90A
  extern __shared__ uint8_t smem_raw[];
  const uint32_t smem0 =
      (static_cast<uint32_t>(__cvta_generic_to_shared(smem_raw)) + 1023u) & ~1023u;
  const uint32_t q_smem = smem0;
  const uint32_t k_smem = smem0 + kQBytes;
  const uint32_t v_smem = k_smem + kStages * kTileBytes;
  const uint32_t bars = v_smem + kStages * kTileBytes;
  const uint32_t q_full = bars;
  const uint32_t full_k = bars + 8;
  const uint32_t full_v = full_k + 8 * kStages;
  const uint32_t empty_k = full_v + 8 * kStages;
  const uint32_t empty_v = empty_k + 8 * kStages;

  const int tid = threadIdx.x;
  const int kv_head = blockIdx.y;
  const int split = blockIdx.z;
  const int tok0 = blockIdx.x * args.tile_tokens;
  const int b_begin = split * args.blocks_per_split;
  const int b_end = min(args.num_blocks, b_begin + args.blocks_per_split);
  const int last_tok = min(tok0 + args.tile_tokens, args.num_q) - 1;
  const int64_t max_qpos = static_cast<int64_t>(args.q_start_pos) + last_tok;
  const int64_t min_qpos = static_cast<int64_t>(args.q_start_pos) + tok0;
  auto active = [&](const TileIt& it) {
    return it.b < b_end && !(args.causal && it.key0 > max_qpos);
  };

  if (tid == 0) {
    MbarInit(q_full, kProducerThreads);
    for (int i = 0; i < kStages; ++i) {
      MbarInit(full_k + 8 * i, kProducerThreads);
      MbarInit(full_v + 8 * i, kProducerThreads);
      MbarInit(empty_k + 8 * i, 8);  // one arrival per consumer warp (8)
      MbarInit(empty_v + 8 * i, 8);
    }
  }
  __syncthreads();

  // (Warp-uniform in the compiler's eyes, as setmaxnreg needs.)
  const int wg_idx = __shfl_sync(0xffffffffu, tid / 128, 0);
  if (wg_idx == 0) {
    // ---------------- producer ----------------
    asm volatile("setmaxnreg.dec.sync.aligned.u32 72;\n" ::: "memory");
    const int ptid = tid;
    const int kv_row_stride = args.num_kv_heads * kD;
    // Unit u: 0 = Q, 2j + 1 = K_j, 2j + 2 = V_j. Signals the unit's full barrier once this
    // thread's copies of it have landed (kProducerLag units later, or at the end).
    auto full_bar = [&](int u) -> uint32_t {
      if (u == 0) return q_full;
      const int j = (u - 1) >> 1;
      return ((u - 1) & 1 ? full_v : full_k) + 8 * (j % kStages);
    };
    LoadQTile<kProducerThreads>(q_smem, args, tok0, kv_head, ptid);
    CpAsyncCommit();
    int u = 1;  // next unit
    TileIt it = FirstTile(args, b_begin, b_end);
    int j = 0;
    while (active(it)) {
      const DeviceKvBlock blk = args.blocks[it.b];
      const int valid = min(kN, blk.num_tokens - it.t0);
      const int stage = j % kStages;
      const uint32_t parity = ((j / kStages) + 1) & 1;  // completion of use j / 3 - 1
#pragma unroll
      for (int kv = 0; kv < 2; ++kv) {
        if (j >= kStages) MbarWait((kv ? empty_v : empty_k) + 8 * stage, parity);
        LoadKvTile<kProducerThreads>(
            (kv ? v_smem : k_smem) + stage * kTileBytes,
            static_cast<const uint16_t*>(kv ? blk.v : blk.k) + kv_head * kD, it.t0, valid,
            kv_row_stride, ptid);
        CpAsyncCommit();
        ++u;
        if (u - 1 - kProducerLag >= 0) {
          CpAsyncWait<kProducerLag>();
          FenceProxyAsync();
          MbarArrive(full_bar(u - 1 - kProducerLag));
        }
      }
      Advance(it, args.blocks, b_end);
      ++j;
    }
    CpAsyncWait<0>();
    FenceProxyAsync();
    for (int w = max(0, u - kProducerLag); w < u; ++w) MbarArrive(full_bar(w));
  } else {
    // ---------------- consumers ----------------
    asm volatile("setmaxnreg.inc.sync.aligned.u32 216;\n" ::: "memory");
    const int ctid = tid - kProducerThreads;
    const int wg = ctid >> 7;
    const int warp = (ctid >> 5) & 3;
    const int lane = ctid & 31;
    const int g = lane >> 2;
    const int t = lane & 3;
    const int r0 = wg * 64 + warp * 16 + g;
    const int64_t qpos0 = static_cast<int64_t>(args.q_start_pos) + tok0 + r0 / args.group;
    const int64_t qpos1 = static_cast<int64_t>(args.q_start_pos) + tok0 + (r0 + 8) / args.group;
    float o[64];
#pragma unroll
    for (int i = 0; i < 64; ++i) o[i] = 0.f;
    float s[64];
    uint32_t pa[8][4];
    RowState st;
    const uint32_t q_desc_base = q_smem + wg * 64 * 128;
    TileIt it = FirstTile(args, b_begin, b_end);
    MbarWait(q_full, 0);
    int j = 0;
    int stage = 0;       // j % 3
    int prev_stage = 0;  // (j - 1) % 3
    // Ping-pong: warpgroup 1 lets warpgroup 0 go first.
    if (wg == 1) NamedBarrierArrive(1);
    while (active(it)) {
      MbarWait(full_k + 8 * stage, (j / kStages) & 1);
      if (j > 0) MbarWait(full_v + 8 * prev_stage, ((j - 1) / kStages) & 1);
      NamedBarrierSync(1 + wg);  // my turn
      FenceRegs(o);
      FenceRegs(s);
      WgmmaFence();
      IssueS(s, q_desc_base, k_smem + stage * kTileBytes);
      WgmmaCommit();
      if (j > 0) {
        IssuePV(o, pa, v_smem + prev_stage * kTileBytes);
        WgmmaCommit();
        NamedBarrierArrive(2 - wg);  // the other warpgroup's turn
        WgmmaWait<1>();
      } else {
        NamedBarrierArrive(2 - wg);
        WgmmaWait<0>();
      }
      FenceRegs(s);
      __syncwarp();
      if (lane == 0) MbarArrive(empty_k + 8 * stage);  // K_j read by this warp's wgmma
      float corr0, corr1;
      Softmax(s, st, args, it, min_qpos, qpos0, qpos1, t, corr0, corr1);
      WgmmaWait<0>();
      FenceRegs(o);
      if (j > 0) {
        __syncwarp();
        if (lane == 0) MbarArrive(empty_v + 8 * prev_stage);
      }
      RescaleAndPack(o, s, pa, corr0, corr1);
      Advance(it, args.blocks, b_end);
      prev_stage = stage;
      ++j;
      stage = stage == kStages - 1 ? 0 : stage + 1;
    }
    if (j > 0) {
      MbarWait(full_v + 8 * prev_stage, ((j - 1) / kStages) & 1);
      FenceRegs(o);
      WgmmaFence();
      IssuePV(o, pa, v_smem + prev_stage * kTileBytes);
      WgmmaCommit();
      WgmmaWait<0>();
      FenceRegs(o);
    }
    WriteRows(o, st, args, tok0, kv_head, split, r0, t);
  }
#else
  __trap();
#endif
}

}  // namespace

bool Sm90PrefillSupports(const PagedAttentionParams& p) {
  return p.head_dim == kD && p.num_kv_heads > 0 && p.num_heads % p.num_kv_heads == 0 &&
         p.num_heads / p.num_kv_heads <= kM;
}

int64_t Sm90PrefillBlocksPerSplit(const PagedAttentionParams& p) {
  const int tile_tokens = kM / (p.num_heads / p.num_kv_heads);
  return static_cast<int64_t>((p.num_q_tokens + tile_tokens - 1) / tile_tokens) * p.num_kv_heads;
}

absl::Status LaunchSm90Prefill(const PagedAttentionParams& p, int splits, float scale_log2,
                               float* out, float* lse, cudaStream_t stream) {
  static const cudaError_t attr_err = cudaFuncSetAttribute(
      PrefillSm90Kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, kSmemBytes);
  if (attr_err != cudaSuccess) {
    return absl::InternalError(
        absl::StrFormat("cudaFuncSetAttribute(prefill sm90): %s", cudaGetErrorString(attr_err)));
  }
  Args a;
  a.q = static_cast<const uint16_t*>(p.q);
  a.blocks = p.blocks;
  a.num_blocks = p.num_blocks;
  a.num_q = p.num_q_tokens;
  a.num_heads = p.num_heads;
  a.num_kv_heads = p.num_kv_heads;
  a.group = p.num_heads / p.num_kv_heads;
  a.tile_tokens = kM / a.group;
  a.scale_log2 = scale_log2;
  a.causal = p.causal ? 1 : 0;
  a.q_start_pos = p.q_start_pos;
  a.blocks_per_split = (p.num_blocks + splits - 1) / splits;
  a.out = out;
  a.lse = lse;
  const dim3 grid((p.num_q_tokens + a.tile_tokens - 1) / a.tile_tokens, p.num_kv_heads, splits);
  PrefillSm90Kernel<<<grid, kThreads, kSmemBytes, stream>>>(a);
  const cudaError_t err = cudaGetLastError();
  if (err != cudaSuccess) {
    return absl::InternalError(
        absl::StrFormat("prefill sm90 attention launch: %s", cudaGetErrorString(err)));
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::attention::cuda::internal
