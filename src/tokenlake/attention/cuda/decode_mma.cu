// The tensor-core decode kernel of PagedAttention (mma.sync over the query heads of one KV
// head's group): the default decode for head_dim 64/128 and groups of 1, 2, 4 or 8. Numerics as
// kernels.h says.
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>
#include <type_traits>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/decode_common.cuh"
#include "tokenlake/attention/cuda/device_common.cuh"
#include "tokenlake/attention/cuda/kernels.h"

namespace tokenlake::attention::cuda::internal {
namespace {

// Decode on tensor cores (decode_kernel = 2): the G (<= 8) query heads of one KV head's group
// are the rows of one m16n8k16 tile (rows G..15 zero), so S = Q K^T and O += P V are mma.sync
// over 16 keys at a time and the per-key dot products, shuffles and softmax of the CUDA-core
// kernels (decode_cuda_core.cu) disappear (per 16 keys and warp: 16 + 16 mma, 2 max shuffles,
// 4 exp2). Thread block: kDecodeMmaWarps warps, one (work item, KV head, query token) of the
// work split decode_common.cuh describes; every warp streams its own 16-key slice of each
// 16 * kDecodeMmaWarps-key step through its own S-stage cp.async pipeline in shared memory
// (XOR-swizzled rows, so ldmatrix is conflict-free) and keeps its own online softmax, so the
// main loop has no block-wide barrier; the warps combine through shared memory at the end, then
// the fused split merge (decode_common.cuh) runs.
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

}  // namespace

// The tensor-core decode kernel: shapes it serves (else the CUDA-core kernels run).
bool DecodeMmaSupports(const PagedAttentionParams& p) {
  const int group = p.num_heads / p.num_kv_heads;
  return (p.head_dim == 128 || p.head_dim == 64) &&
         (group == 1 || group == 2 || group == 4 || group == 8);
}

absl::StatusOr<int> DecodeMmaBlocksPerSm(int d, int g, int stages, int desc_mode) {
  return DispatchDecodeMma(d, g, stages, desc_mode, [](auto dc, auto gc, auto sc, auto cc) {
    return DecodeMmaBlocksPerSmT<decltype(dc)::value, decltype(gc)::value, decltype(sc)::value,
                                 decltype(cc)::value>();
  });
}

absl::Status LaunchDecodeMma(const PagedAttentionParams& p, const LaunchConfig& c,
                             const DecodeArgs& a, cudaStream_t stream) {
  return DispatchDecodeMma(
      p.head_dim, a.group, c.decode_mma_stages, c.decode_mma_desc,
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
        if (cudaError_t err =
                LaunchKernel(p.pdl > 0, DecodeMmaKernel<kD, kG, kS, kC>, grid,
                             dim3(kDecodeMmaWarps * 32), DecodeMmaSmemBytes<kD, kS>(), stream, a);
            err != cudaSuccess) {
          return absl::InternalError(absl::StrFormat("decode attention (tensor cores) launch: %s",
                                                     cudaGetErrorString(err)));
        }
        return LaunchStatus("decode attention (tensor cores)");
      });
}

}  // namespace tokenlake::attention::cuda::internal
