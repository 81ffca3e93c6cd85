// Private to the attention_cuda library: device helpers that several kernel families use
// (cp.async, programmatic-dependent-launch control, ldmatrix, mma.sync, bf16 packing and
// unpacking, the XOR swizzle of shared-memory tiles, key counting).
#ifndef TOKENLAKE_ATTENTION_CUDA_DEVICE_COMMON_CUH_
#define TOKENLAKE_ATTENTION_CUDA_DEVICE_COMMON_CUH_

#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <cstdint>

#include "tokenlake/attention/cuda/kernels.h"
#include "tokenlake/attention/cuda/paged_attention.h"
#include "tokenlake/attention/cuda/pdl.cuh"

namespace tokenlake::attention::cuda::internal {

__device__ __forceinline__ uint32_t SmemAddr(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// 16-byte async copy global -> shared; src_bytes 0 zero-fills the destination.
__device__ __forceinline__ void CpAsync16(uint32_t dst, const void* src, int src_bytes) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(dst), "l"(src),
               "r"(src_bytes));
}
// Programmatic dependent launch: pdl.cuh.
using ::tokenlake::attention::cuda::GridDependencyWait;
using ::tokenlake::attention::cuda::GridDependentsLaunch;

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

// Element offset of 16-byte chunk `chunk` of row `row` in a tile of D-element rows whose chunks
// are XOR-swizzled with the row (so ldmatrix reads are conflict-free).
template <int D>
__device__ __forceinline__ int SwizzledOffset(int row, int chunk) {
  return row * D + ((chunk ^ (row & 7)) << 3);
}

// Number of keys in the blocks before `block` (for causal masking).
__device__ __forceinline__ int64_t KeysBefore(const DeviceKvBlock* blocks, int block) {
  int64_t sum = 0;
  for (int b = 0; b < block; ++b) sum += blocks[b].num_tokens;
  return sum;
}

}  // namespace tokenlake::attention::cuda::internal

#endif  // TOKENLAKE_ATTENTION_CUDA_DEVICE_COMMON_CUH_
