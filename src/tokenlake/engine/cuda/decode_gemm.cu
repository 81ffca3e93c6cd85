#include <cuda_bf16.h>

#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/pdl.cuh"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/decode_gemm.h"

namespace tokenlake::engine::cuda {
namespace {

using attention::cuda::GridDependencyWait;
using attention::cuda::GridDependentsLaunch;
using attention::cuda::LaunchKernel;

constexpr int kWarps = 8;                      // per thread block
constexpr int kRowsPerBlock = 16 * kWarps;     // weight rows: one m16 tile per warp
constexpr int kChunk = kDecodeGemmInMultiple;  // values of `in` per pipeline stage
constexpr int kXStride = kChunk + 8;  // staged input row (bf16): 16 bytes of padding so that
                                      // the fragment loads of eight rows hit distinct banks

__device__ __forceinline__ uint32_t Word(const uint4& v, int i) {
  return i == 0 ? v.x : i == 1 ? v.y : i == 2 ? v.z : v.w;
}

__device__ __forceinline__ void CopyAsync16(void* smem, const void* global) {
  const auto dst = static_cast<uint32_t>(__cvta_generic_to_shared(smem));
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16;\n" ::"r"(dst), "l"(global) : "memory");
}
__device__ __forceinline__ void CommitAsync() {
  asm volatile("cp.async.commit_group;\n" ::: "memory");
}
template <int kPending>
__device__ __forceinline__ void WaitAsync() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(kPending) : "memory");
}

// c += a * b: a 16x16 bf16 tile (four words, row-major fragment), b 16x8 (two words), c 16x8
// float32.
__device__ __forceinline__ void Mma(float (&c)[4], uint32_t a0, uint32_t a1, uint32_t a2,
                                    uint32_t a3, uint32_t b0, uint32_t b1) {
  asm volatile(
      "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, "
      "{%8,%9}, {%0,%1,%2,%3};\n"
      : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
      : "r"(a0), "r"(a1), "r"(a2), "r"(a3), "r"(b0), "r"(b1));
}

// The k order inside a stage. The dot products do not depend on which of the mma's k slots
// holds which of `in`'s values, as long as weights and inputs agree; so a lane loads 16
// contiguous bytes of a row (a 16-byte load, where the mma's own layout would take four 4-byte
// ones) and feeds them to two mmas. In a 64-value step, lane (g, q) (g = lane / 4, q = lane % 4)
// loads values [16q, 16q + 16) of weight rows g and g + 8 and of input row g of each 8-row tile
// as two uint4 each (u = 0, 1); words 2j and 2j + 1 of uint4 u go to mma (u, j)'s slots for k =
// 2q.. and 2q + 8..
//
// Thread block (blockIdx.x, blockIdx.y) computes the 128 "block rows" of row block x (warp w:
// block rows [16 w, 16 w + 16)) over `in` chunks [s * chunks / splits, (s + 1) * chunks / splits)
// for s = y, against NT tiles of 8 input rows (rows >= n are zeros). Plain epilogues: block row
// r is weight row and output 128 x + r. kSilu: block rows [0, 64) are gate rows 64 x + r, rows
// [64, 128) their up rows `out` further (weights [2 out][in]), and output 64 x + r is
// silu(gate) * up. Weight rows past the matrix are read clamped; their outputs are not written.
template <int NT, bool kSilu, bool kF32>
__global__ void __launch_bounds__(kWarps * 32, 2)
    DecodeGemmKernel(const uint16_t* __restrict__ w, const void* __restrict__ x, int n, int in,
                     int out, int splits, bool accumulate, float* __restrict__ y,
                     uint16_t* __restrict__ y16, float* __restrict__ partials,
                     int32_t* __restrict__ counters) {
  GridDependentsLaunch();
  constexpr int kOutRows = kSilu ? kRowsPerBlock / 2 : kRowsPerBlock;  // outputs per block
  constexpr int kSums = 8 * NT;          // input rows a block row is summed for
  constexpr int kSumStride = kSums + 1;  // (reading a column of block rows: distinct banks)
  // The stages' inputs, then (after the loop) the block's sums [block row][input row].
  constexpr int kXBytes = 2 * kSums * kXStride * 2;
  constexpr int kSumBytes = kRowsPerBlock * kSumStride * 4;
  __shared__ alignas(16) unsigned char smem[kXBytes > kSumBytes ? kXBytes : kSumBytes];
  auto xs = reinterpret_cast<uint16_t(*)[kSums][kXStride]>(smem);
  auto sums = reinterpret_cast<float(*)[kSumStride]>(smem);
  __shared__ bool last_block;
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int warp = static_cast<int>(threadIdx.x / 32);
  const int g = lane / 4;
  const int q = lane % 4;
  const int tile = static_cast<int>(blockIdx.x);
  const int split = static_cast<int>(blockIdx.y);
  const int chunks = in / kChunk;
  const int c_begin = split * chunks / splits;
  const int c_end = (split + 1) * chunks / splits;
  // Block row r's weight row (clamped into the matrix).
  auto weight_row = [&](int r) -> int64_t {
    if constexpr (kSilu) {
      const int j = min(tile * kOutRows + r % kOutRows, out - 1);
      return r < kOutRows ? j : j + out;
    } else {
      return min(tile * kRowsPerBlock + r, out - 1);
    }
  };
  const uint4* w_lo = reinterpret_cast<const uint4*>(w + weight_row(warp * 16 + g) * in);
  const uint4* w_hi = reinterpret_cast<const uint4*>(w + weight_row(warp * 16 + g + 8) * in);
  // A chunk's weights for this lane: [step][u] of rows g and g + 8 (uint4 index: value / 8).
  auto load_w = [&](int c, uint4(&lo)[2][2], uint4(&hi)[2][2]) {
#pragma unroll
    for (int s = 0; s < 2; ++s) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
        const int at = c * (kChunk / 8) + s * 8 + 2 * q + u;
        lo[s][u] = __ldcs(w_lo + at);  // streamed once: keep L2 and L1 for the inputs
        hi[s][u] = __ldcs(w_hi + at);
      }
    }
  };
  // Chunk c of the bf16 input rows into xs[buf] (rows >= n as zeros), asynchronously.
  auto stage_x = [&](int c, int buf) {
    const auto* x16 = static_cast<const uint16_t*>(x);
    for (int i = static_cast<int>(threadIdx.x); i < kSums * (kChunk / 8); i += kWarps * 32) {
      const int row = i / (kChunk / 8);
      const int part = i % (kChunk / 8);
      uint16_t* dst = &xs[buf][row][part * 8];
      if (row < n) {
        CopyAsync16(dst, x16 + static_cast<int64_t>(row) * in + c * kChunk + part * 8);
      } else {
        *reinterpret_cast<uint4*>(dst) = make_uint4(0, 0, 0, 0);
      }
    }
    CommitAsync();
  };
  // kF32: a chunk of the float32 input rows is loaded into registers (x32) before the mmas of
  // the chunk before it and stored, rounded to bf16, after them.
  constexpr int kX32Items = (kSums * (kChunk / 8) + kWarps * 32 - 1) / (kWarps * 32);
  float4 x32[kF32 ? kX32Items : 1][2];
  auto load_x32 = [&](int c) {
#pragma unroll
    for (int k = 0; k < kX32Items; ++k) {
      const int i = static_cast<int>(threadIdx.x) + k * kWarps * 32;
      const int row = i / (kChunk / 8);
      x32[k][0] = x32[k][1] = make_float4(0.f, 0.f, 0.f, 0.f);
      if (i < kSums * (kChunk / 8) && row < n) {
        const auto* p = reinterpret_cast<const float4*>(static_cast<const float*>(x) +
                                                        static_cast<int64_t>(row) * in +
                                                        c * kChunk + i % (kChunk / 8) * 8);
        x32[k][0] = __ldcg(p);
        x32[k][1] = __ldcg(p + 1);
      }
    }
  };
  auto store_x32 = [&](int buf) {
#pragma unroll
    for (int k = 0; k < kX32Items; ++k) {
      const int i = static_cast<int>(threadIdx.x) + k * kWarps * 32;
      if (i < kSums * (kChunk / 8)) {
        auto word = [](float lo, float hi) {
          const __nv_bfloat162 b = __floats2bfloat162_rn(lo, hi);
          return *reinterpret_cast<const uint32_t*>(&b);
        };
        const float4 a = x32[k][0];
        const float4 b = x32[k][1];
        *reinterpret_cast<uint4*>(&xs[buf][i / (kChunk / 8)][i % (kChunk / 8) * 8]) =
            make_uint4(word(a.x, a.y), word(a.z, a.w), word(b.x, b.y), word(b.z, b.w));
      }
    }
  };
  float acc[NT][4];
#pragma unroll
  for (int t = 0; t < NT; ++t) acc[t][0] = acc[t][1] = acc[t][2] = acc[t][3] = 0.f;
  uint4 lo[2][2];
  uint4 hi[2][2];
  // The first weights are no kernel's output: loaded before waiting for the kernel before.
  if (c_begin < c_end) load_w(c_begin, lo, hi);
  GridDependencyWait();
  if (c_begin < c_end) {
    if constexpr (kF32) {
      load_x32(c_begin);
      store_x32(0);
    } else {
      stage_x(c_begin, 0);
    }
  }
  for (int c = c_begin; c < c_end; ++c) {
    const int buf = (c - c_begin) & 1;
    uint4 next_lo[2][2];
    uint4 next_hi[2][2];
    const bool more = c + 1 < c_end;
    if (more) {
      load_w(c + 1, next_lo, next_hi);
      if constexpr (kF32) {
        load_x32(c + 1);
      } else {
        stage_x(c + 1, buf ^ 1);
        WaitAsync<1>();
      }
    } else if constexpr (!kF32) {
      WaitAsync<0>();
    }
    __syncthreads();
#pragma unroll
    for (int s = 0; s < 2; ++s) {
#pragma unroll
      for (int u = 0; u < 2; ++u) {
#pragma unroll
        for (int t = 0; t < NT; ++t) {
          const uint4 xv =
              *reinterpret_cast<const uint4*>(&xs[buf][t * 8 + g][s * 64 + 16 * q + 8 * u]);
#pragma unroll
          for (int j = 0; j < 2; ++j) {
            Mma(acc[t], Word(lo[s][u], 2 * j), Word(hi[s][u], 2 * j), Word(lo[s][u], 2 * j + 1),
                Word(hi[s][u], 2 * j + 1), Word(xv, 2 * j), Word(xv, 2 * j + 1));
          }
        }
      }
    }
    // (Every warp is past the chunk before, which read xs[buf ^ 1].)
    if constexpr (kF32) {
      if (more) store_x32(buf ^ 1);
    }
    __syncthreads();  // xs[buf] is staged again two chunks on (and smem holds the sums after)
    if (more) {
#pragma unroll
      for (int s = 0; s < 2; ++s) {
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          lo[s][u] = next_lo[s][u];
          hi[s][u] = next_hi[s][u];
        }
      }
    }
  }
  // acc[t]: block rows 16 warp + g (0, 1) and + 8 (2, 3), input rows 8t + 2q (0, 2), + 1 (1, 3).
#pragma unroll
  for (int t = 0; t < NT; ++t) {
#pragma unroll
    for (int e = 0; e < 4; ++e) {
      sums[warp * 16 + g + (e >= 2 ? 8 : 0)][8 * t + 2 * q + (e & 1)] = acc[t][e];
    }
  }
  __syncthreads();
  if (splits > 1) {
    // Split: this slice's sums to the workspace ([split][input row][block row], block-row runs
    // of 128 per row block); the last slice of the row block to finish sums them all back into
    // `sums` in slice order (their stores made visible by the fence before the counter).
    float* mine = partials + static_cast<int64_t>(tile) * kRowsPerBlock;
    const int64_t padded = static_cast<int64_t>(gridDim.x) * kRowsPerBlock;
    for (int k = static_cast<int>(threadIdx.x); k < n * kRowsPerBlock; k += kWarps * 32) {
      const int row = k / kRowsPerBlock;
      mine[(static_cast<int64_t>(split) * n + row) * padded + k % kRowsPerBlock] =
          sums[k % kRowsPerBlock][row];
    }
    __threadfence();
    __syncthreads();
    if (threadIdx.x == 0) last_block = atomicAdd(&counters[tile], 1) == splits - 1;
    __syncthreads();
    if (!last_block) return;
    __threadfence();
    if (threadIdx.x == 0) counters[tile] = 0;  // for the next call (no other block reads it now)
    // Four block rows a load (float4), four loads of each slice in flight per thread.
    constexpr int kQuads = kRowsPerBlock / 4;
    const int items = n * kQuads;
    for (int base = static_cast<int>(threadIdx.x); base < items; base += 4 * kWarps * 32) {
      float4 total[4];
#pragma unroll
      for (int k = 0; k < 4; ++k) total[k] = make_float4(0.f, 0.f, 0.f, 0.f);
      for (int s = 0; s < splits; ++s) {
#pragma unroll
        for (int k = 0; k < 4; ++k) {
          const int i = base + k * kWarps * 32;
          if (i < items) {
            const float4 v = __ldcg(reinterpret_cast<const float4*>(
                mine + (static_cast<int64_t>(s) * n + i / kQuads) * padded + i % kQuads * 4));
            total[k].x += v.x;
            total[k].y += v.y;
            total[k].z += v.z;
            total[k].w += v.w;
          }
        }
      }
#pragma unroll
      for (int k = 0; k < 4; ++k) {
        const int i = base + k * kWarps * 32;
        if (i < items) {
          const int row = i / kQuads;
          const int r = i % kQuads * 4;
          sums[r][row] = total[k].x;
          sums[r + 1][row] = total[k].y;
          sums[r + 2][row] = total[k].z;
          sums[r + 3][row] = total[k].w;
        }
      }
    }
    __syncthreads();
  }
  // The epilogue: output i of this block for input row `row`, from the block rows' sums.
  for (int k = static_cast<int>(threadIdx.x); k < n * kOutRows; k += kWarps * 32) {
    const int row = k / kOutRows;
    const int i = k % kOutRows;
    if constexpr (kSilu) {
      const int j = tile * kOutRows + i;
      if (j >= out) continue;
      const float gate = sums[i][row];
      y16[static_cast<int64_t>(row) * out + j] = __bfloat16_as_ushort(
          __float2bfloat16_rn(gate / (1.0f + expf(-gate)) * sums[i + kOutRows][row]));
    } else {
      const int o = tile * kRowsPerBlock + i;
      if (o >= out) continue;
      float& dst = y[static_cast<int64_t>(row) * out + o];
      dst = accumulate ? dst + sums[i][row] : sums[i][row];
    }
  }
}

// Thread blocks along the outputs (blockIdx.x): 128 outputs a block, 64 for kSiluMulBf16.
int32_t RowBlocks(int32_t out, DenseEpilogue epilogue) {
  const int32_t per_block =
      epilogue == DenseEpilogue::kSiluMulBf16 ? kRowsPerBlock / 2 : kRowsPerBlock;
  return (out + per_block - 1) / per_block;
}

}  // namespace

absl::StatusOr<DecodeGemmWorkspace> DecodeGemmWorkspace::Create(int device) {
  DecodeGemmWorkspace ws;
  TOKENLAKE_RETURN_IF_ERROR(
      CudaStatus(cudaDeviceGetAttribute(&ws.num_sms_, cudaDevAttrMultiProcessorCount, device),
                 "cudaDeviceGetAttribute(multiprocessors)"));
  const size_t blocks = static_cast<size_t>(ws.max_split_blocks());
  // A split call has splits x row blocks <= max_split_blocks, n <= 64 rows each.
  TOKENLAKE_RETURN_IF_ERROR(
      ws.partials_.Allocate(blocks * kRowsPerBlock * kDecodeGemmMaxRows * sizeof(float)));
  TOKENLAKE_RETURN_IF_ERROR(ws.counters_.Allocate(blocks * sizeof(int32_t)));
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaMemset(ws.counters_.get(), 0, blocks * sizeof(int32_t)),
                                       "cudaMemset(DecodeGemm counters)"));
  return ws;
}

int32_t DecodeGemmSplits(int32_t n, int32_t in, int32_t out, DenseEpilogue epilogue,
                         const DecodeGemmWorkspace& workspace) {
  const int32_t tiles = RowBlocks(out, epilogue);
  const int32_t chunks = in / kChunk;
  // As many slices as keep the grid within one wave of two blocks per multiprocessor: a
  // matrix with few row blocks (o_proj, down_proj) is read by enough blocks to keep the loads
  // in flight, one with many (gate/up, the LM head) is not split. And few enough that the
  // slices' sums (written and read back: 8 bytes per weight row and input row) stay within a
  // quarter of the weights' bytes (2 per weight row and input value).
  const int32_t by_grid = workspace.max_split_blocks() / std::max(tiles, 1);
  const int32_t by_traffic = in / (16 * std::max(n, 1));
  return std::clamp(std::min(by_grid, by_traffic), 1, std::max(chunks, 1));
}

absl::Status DecodeGemm(const uint16_t* w, const void* x, DenseInput input, int32_t n, int32_t in,
                        int32_t out, DenseEpilogue epilogue, float* y, uint16_t* y16,
                        const DecodeGemmWorkspace& workspace, cudaStream_t stream, bool pdl) {
  const bool silu = epilogue == DenseEpilogue::kSiluMulBf16;
  if (n < 1 || n > kDecodeGemmMaxRows || in < kChunk || in % kChunk != 0 || out < 1 ||
      w == nullptr || x == nullptr || (silu ? y16 == nullptr : y == nullptr) || !Aligned16(w) ||
      !Aligned16(x) || workspace.num_sms() < 1 || static_cast<int>(epilogue) > 2 ||
      static_cast<int>(input) > 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "DecodeGemm: n %d (1..%d), in %d (a positive multiple of %d), out %d (>= 1), w %p and "
        "x %p (16-byte aligned), %s %p (not null), epilogue %d, input %d, a workspace from "
        "Create",
        n, kDecodeGemmMaxRows, in, kChunk, out, static_cast<const void*>(w), x, silu ? "y16" : "y",
        silu ? static_cast<const void*>(y16) : static_cast<const void*>(y),
        static_cast<int>(epilogue), static_cast<int>(input)));
  }
  const int32_t splits = DecodeGemmSplits(n, in, out, epilogue, workspace);
  const bool accumulate = epilogue == DenseEpilogue::kAddF32;
  const dim3 grid(static_cast<unsigned>(RowBlocks(out, epilogue)), static_cast<unsigned>(splits));
  const dim3 block(kWarps * 32);
  auto launch = [&](auto kernel) {
    return LaunchKernel(pdl, kernel, grid, block, 0, stream, w, x, n, in, out, splits, accumulate,
                        y, y16, workspace.partials(), workspace.counters());
  };
  auto launch_rows = [&](auto silu_tag, auto f32_tag) {
    constexpr bool kSilu = decltype(silu_tag)::value;
    constexpr bool kF32 = decltype(f32_tag)::value;
    if (n <= 8) return launch(DecodeGemmKernel<1, kSilu, kF32>);
    if (n <= 16) return launch(DecodeGemmKernel<2, kSilu, kF32>);
    if (n <= 32) return launch(DecodeGemmKernel<4, kSilu, kF32>);
    return launch(DecodeGemmKernel<8, kSilu, kF32>);
  };
  const bool f32 = input == DenseInput::kF32;
  const cudaError_t launched = silu ? (f32 ? launch_rows(std::true_type{}, std::true_type{})
                                           : launch_rows(std::true_type{}, std::false_type{}))
                                    : (f32 ? launch_rows(std::false_type{}, std::true_type{})
                                           : launch_rows(std::false_type{}, std::false_type{}));
  return CudaStatus(launched, "DecodeGemm launch");
}

}  // namespace tokenlake::engine::cuda
