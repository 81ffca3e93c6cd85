#include <cuda_bf16.h>

#include <cstdint>

#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/pdl.cuh"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/cuda/small_batch_gemm.h"

namespace tokenlake::engine::cuda {
namespace {

using attention::cuda::GridDependencyWait;
using attention::cuda::GridDependentsLaunch;
using attention::cuda::LaunchKernel;

constexpr int kWarps = 8;  // per thread block

__device__ __forceinline__ void Widen(const uint4& v, float (&out)[8]) {
  const uint32_t words[4] = {v.x, v.y, v.z, v.w};
#pragma unroll
  for (int i = 0; i < 4; ++i) {
    out[2 * i] = __uint_as_float(words[i] << 16);
    out[2 * i + 1] = __uint_as_float(words[i] & 0xffff0000u);
  }
}

// Input row t's 8 values of chunk c, as float: bf16 bits widened, or float32 rounded to bf16
// first (what the forward's separate bf16 conversion would have stored).
template <bool kF32>
__device__ __forceinline__ void LoadX(const void* x, int64_t t, int chunks, int c, float (&xf)[8]) {
  if constexpr (kF32) {
    const float4* p = reinterpret_cast<const float4*>(x) + (t * chunks + c) * 2;
    const float4 a = __ldg(p);
    const float4 b = __ldg(p + 1);
    const float v[8] = {a.x, a.y, a.z, a.w, b.x, b.y, b.z, b.w};
#pragma unroll
    for (int i = 0; i < 8; ++i) {
      xf[i] = __uint_as_float(static_cast<uint32_t>(__bfloat16_as_ushort(__float2bfloat16_rn(v[i])))
                              << 16);
    }
  } else {
    Widen(__ldg(reinterpret_cast<const uint4*>(x) + t * chunks + c), xf);
  }
}

// This thread's share of R weight rows against up to N input rows (n at run time): the rows
// of outputs first, first + 1, ... (kSilu: the gate rows, then their up rows `out` further;
// clamped in range: a clamped row is computed and not written), over their 16-byte chunks
// start, start + step, ...; acc[r][t] = the partial dot product of row r with input row t.
template <int N, int R, bool kSilu, bool kF32, int kUnroll>
__device__ __forceinline__ void AccumulateRows(const uint16_t* __restrict__ w,
                                               const void* __restrict__ x, int n, int in, int out,
                                               int first, int start, int step, float (&acc)[R][N]) {
  constexpr int kOutputs = kSilu ? R / 2 : R;
  const uint4* rows[R];
#pragma unroll
  for (int r = 0; r < R; ++r) {
    const int o = first + (kSilu ? r % kOutputs : r);
    const int row = (o < out ? o : out - 1) + (kSilu && r >= kOutputs ? out : 0);
    rows[r] = reinterpret_cast<const uint4*>(w + static_cast<int64_t>(row) * in);
  }
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < N; ++t) acc[r][t] = 0.f;
  }
  const int chunks = in / 8;
  // The first pass's weights are loaded before waiting for the kernel before this one
  // (programmatic dependent launch, pdl.cuh): they are not its output, and under PDL these
  // loads overlap its tail. Inputs and outputs are touched only after the wait.
  uint4 wv[R];
  if (start < chunks) {
#pragma unroll
    for (int r = 0; r < R; ++r) wv[r] = __ldcs(rows[r] + start);  // streamed: keep x in L1
  }
  GridDependencyWait();
#pragma unroll kUnroll
  for (int c = start; c < chunks; c += step) {
    if (c != start) {
#pragma unroll
      for (int r = 0; r < R; ++r) wv[r] = __ldcs(rows[r] + c);
    }
    float wf[R][8];  // widened once, used by every input row
#pragma unroll
    for (int r = 0; r < R; ++r) Widen(wv[r], wf[r]);
#pragma unroll
    for (int t = 0; t < N; ++t) {
      if (t < n) {
        float xf[8];
        LoadX<kF32>(x, t, chunks, c, xf);
#pragma unroll
        for (int r = 0; r < R; ++r) {
#pragma unroll
          for (int i = 0; i < 8; ++i) acc[r][t] = fmaf(wf[r][i], xf[i], acc[r][t]);
        }
      }
    }
  }
}

// The sum of v over the warp's 32 lanes, in every lane (butterfly).
__device__ __forceinline__ float WarpSum(float v) {
#pragma unroll
  for (int off = 16; off > 0; off >>= 1) v += __shfl_xor_sync(0xffffffffu, v, off);
  return v;
}

// Output o of input row t through epilogue E: v = its dot product; u = its up row's
// (kSiluMulBf16 only).
template <DenseEpilogue E>
__device__ __forceinline__ void WriteOutput(float* __restrict__ y, uint16_t* __restrict__ y16,
                                            int out, int o, int t, float v, float u) {
  const int64_t at = static_cast<int64_t>(t) * out + o;
  if constexpr (E == DenseEpilogue::kStoreF32) {
    y[at] = v;
  } else if constexpr (E == DenseEpilogue::kAddF32) {
    y[at] += v;
  } else {
    y16[at] = __bfloat16_as_ushort(__float2bfloat16_rn(v / (1.0f + expf(-v)) * u));
  }
}

// One warp: R weight rows against up to N input rows (n at run time, n <= N). Plain epilogues:
// rows [R * warp, R * warp + R) of out; kSiluMulBf16: gate rows [R/2 * warp, + R/2) and the up
// rows `out` after them.
template <int N, int R, DenseEpilogue E, bool kF32>
__global__ void __launch_bounds__(kWarps * 32)
    SmallGemmKernel(const uint16_t* __restrict__ w, const void* __restrict__ x, int n, int in,
                    int out, float* __restrict__ y, uint16_t* __restrict__ y16) {
  constexpr bool kSilu = E == DenseEpilogue::kSiluMulBf16;
  constexpr int kOutputs = kSilu ? R / 2 : R;  // outputs per warp and input row
  GridDependentsLaunch();
  const int warp = static_cast<int>((blockIdx.x * blockDim.x + threadIdx.x) / 32);
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int first = warp * kOutputs;
  if (first >= out) return;
  float acc[R][N];
  AccumulateRows<N, R, kSilu, kF32, 2>(w, x, n, in, out, first, lane, 32, acc);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < N; ++t) acc[r][t] = WarpSum(acc[r][t]);
  }
  if (lane != 0) return;
#pragma unroll
  for (int i = 0; i < kOutputs; ++i) {
    const int o = first + i;
    if (o >= out) break;
#pragma unroll
    for (int t = 0; t < N; ++t) {
      if (t >= n) break;
      // The up row's sum (read by kSiluMulBf16 only; an index in range for the others).
      WriteOutput<E>(y, y16, out, o, t, acc[i][t], acc[kSilu ? i + kOutputs : i][t]);
    }
  }
}

// One thread block: R weight rows against up to N input rows, the reduction over `in` split
// across all of its threads (each takes every blockDim-th 16-byte chunk of the R rows), then
// summed across warps in shared memory. Many more thread blocks than the warp-per-rows layout
// for the same matrix, and every thread's loads of one pass issued together: more bytes in
// flight per multiprocessor on matrices with few rows (o_proj, down_proj). Plain epilogues:
// rows [R * block, R * block + R) of out; kSiluMulBf16: gate rows [R/2 * block, + R/2) and the
// up rows `out` after them.
template <int N, int R, DenseEpilogue E, bool kF32>
__global__ void __launch_bounds__(kWarps * 32)
    SmallGemmBlockKernel(const uint16_t* __restrict__ w, const void* __restrict__ x, int n, int in,
                         int out, float* __restrict__ y, uint16_t* __restrict__ y16) {
  constexpr bool kSilu = E == DenseEpilogue::kSiluMulBf16;
  constexpr int kOutputs = kSilu ? R / 2 : R;  // outputs per block and input row
  GridDependentsLaunch();
  const int first = static_cast<int>(blockIdx.x) * kOutputs;
  float acc[R][N];
  AccumulateRows<N, R, kSilu, kF32, 1>(w, x, n, in, out, first, static_cast<int>(threadIdx.x),
                                       kWarps * 32, acc);
  __shared__ float partial[kWarps][R * N];
  const int lane = static_cast<int>(threadIdx.x % 32);
  const int warp = static_cast<int>(threadIdx.x / 32);
#pragma unroll
  for (int r = 0; r < R; ++r) {
#pragma unroll
    for (int t = 0; t < N; ++t) {
      acc[r][t] = WarpSum(acc[r][t]);
      if (lane == 0) partial[warp][r * N + t] = acc[r][t];
    }
  }
  __syncthreads();
  // Thread i < kOutputs * N finishes output (first + i / N) of input row i % N.
  const int i = static_cast<int>(threadIdx.x);
  if (i >= kOutputs * N) return;
  const int o = first + i / N;
  const int t = i % N;
  if (o >= out || t >= n) return;
  auto sum_of = [&](int r) {
    float s = 0.f;
#pragma unroll
    for (int k = 0; k < kWarps; ++k) s += partial[k][r * N + t];
    return s;
  };
  float up = 0.f;
  if constexpr (kSilu) up = sum_of(i / N + kOutputs);
  WriteOutput<E>(y, y16, out, o, t, sum_of(i / N), up);
}

template <int N, int R, DenseEpilogue E>
cudaError_t Launch(const uint16_t* w, const void* x, bool x_f32, bool per_block, int n, int in,
                   int out, float* y, uint16_t* y16, bool pdl, cudaStream_t stream) {
  constexpr int kOutputs = E == DenseEpilogue::kSiluMulBf16 ? R / 2 : R;
  const int groups = (out + kOutputs - 1) / kOutputs;  // of kOutputs outputs
  const dim3 block(kWarps * 32);
  if (per_block) {
    return x_f32 ? LaunchKernel(pdl, SmallGemmBlockKernel<N, R, E, true>, dim3(groups), block, 0,
                                stream, w, x, n, in, out, y, y16)
                 : LaunchKernel(pdl, SmallGemmBlockKernel<N, R, E, false>, dim3(groups), block, 0,
                                stream, w, x, n, in, out, y, y16);
  }
  const dim3 grid((groups + kWarps - 1) / kWarps);
  return x_f32 ? LaunchKernel(pdl, SmallGemmKernel<N, R, E, true>, grid, block, 0, stream, w, x, n,
                              in, out, y, y16)
               : LaunchKernel(pdl, SmallGemmKernel<N, R, E, false>, grid, block, 0, stream, w, x, n,
                              in, out, y, y16);
}

template <int R, DenseEpilogue E>
cudaError_t LaunchRows(const uint16_t* w, const void* x, bool x_f32, bool per_block, int n, int in,
                       int out, float* y, uint16_t* y16, bool pdl, cudaStream_t stream) {
  if (n == 1) return Launch<1, R, E>(w, x, x_f32, per_block, n, in, out, y, y16, pdl, stream);
  if (n == 2) return Launch<2, R, E>(w, x, x_f32, per_block, n, in, out, y, y16, pdl, stream);
  if (n <= 4) return Launch<4, R, E>(w, x, x_f32, per_block, n, in, out, y, y16, pdl, stream);
  return Launch<8, R, E>(w, x, x_f32, per_block, n, in, out, y, y16, pdl, stream);
}

template <DenseEpilogue E>
cudaError_t LaunchEpilogue(const uint16_t* w, const void* x, bool x_f32, int n, int in, int out,
                           float* y, uint16_t* y16, SmallGemmLayout layout, bool pdl,
                           cudaStream_t stream) {
  switch (layout) {
    case SmallGemmLayout::kAuto:
    case SmallGemmLayout::kBlockRows4:
      return LaunchRows<4, E>(w, x, x_f32, /*per_block=*/true, n, in, out, y, y16, pdl, stream);
    case SmallGemmLayout::kBlockRows8:
      return LaunchRows<8, E>(w, x, x_f32, /*per_block=*/true, n, in, out, y, y16, pdl, stream);
    case SmallGemmLayout::kWarpRows2:
      return LaunchRows<2, E>(w, x, x_f32, /*per_block=*/false, n, in, out, y, y16, pdl, stream);
    case SmallGemmLayout::kWarpRows4:
      return LaunchRows<4, E>(w, x, x_f32, /*per_block=*/false, n, in, out, y, y16, pdl, stream);
  }
  return cudaErrorInvalidValue;  // (layouts are checked before)
}

}  // namespace

absl::Status SmallBatchGemm(const uint16_t* w, const void* x, DenseInput input, int32_t n,
                            int32_t in, int32_t out, DenseEpilogue epilogue, float* y,
                            uint16_t* y16, cudaStream_t stream, SmallGemmLayout layout, bool pdl) {
  const bool silu = epilogue == DenseEpilogue::kSiluMulBf16;
  if (static_cast<int>(layout) > static_cast<int>(SmallGemmLayout::kBlockRows8)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("SmallBatchGemm: unknown layout %d", static_cast<int>(layout)));
  }
  if (n < 1 || n > kSmallBatchMaxRows || in < 8 || in % 8 != 0 || out < 1 || w == nullptr ||
      x == nullptr || !Aligned16(w) || !Aligned16(x) || (silu ? y16 == nullptr : y == nullptr)) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "SmallBatchGemm: n %d (1..%d), in %d (a positive multiple of 8), out %d (>= 1), w %p and "
        "x %p (16-byte aligned), %s %p (not null)",
        n, kSmallBatchMaxRows, in, out, static_cast<const void*>(w), static_cast<const void*>(x),
        silu ? "y16" : "y", silu ? static_cast<const void*>(y16) : static_cast<const void*>(y)));
  }
  const bool x_f32 = input == DenseInput::kF32;
  cudaError_t launched = cudaSuccess;
  switch (epilogue) {
    case DenseEpilogue::kStoreF32:
      launched = LaunchEpilogue<DenseEpilogue::kStoreF32>(w, x, x_f32, n, in, out, y, y16, layout,
                                                          pdl, stream);
      break;
    case DenseEpilogue::kAddF32:
      launched = LaunchEpilogue<DenseEpilogue::kAddF32>(w, x, x_f32, n, in, out, y, y16, layout,
                                                        pdl, stream);
      break;
    case DenseEpilogue::kSiluMulBf16:
      launched = LaunchEpilogue<DenseEpilogue::kSiluMulBf16>(w, x, x_f32, n, in, out, y, y16,
                                                             layout, pdl, stream);
      break;
  }
  return CudaStatus(launched, "SmallBatchGemm launch");
}

}  // namespace tokenlake::engine::cuda
