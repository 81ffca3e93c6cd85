#include <cuda_runtime.h>

#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/pdl.cuh"
#include "tokenlake/attention/cuda/pdl_testing.h"

namespace tokenlake::attention::cuda {
namespace {

__global__ void DelayedCopyKernel(uint4* __restrict__ dst, const uint4* __restrict__ src, size_t n,
                                  int64_t delay_ns) {
  GridDependentsLaunch();
  uint64_t t0;
  asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t0));
  for (;;) {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;\n" : "=l"(t));
    if (static_cast<int64_t>(t - t0) >= delay_ns) break;
  }
  for (size_t i = threadIdx.x; i < n; i += blockDim.x) dst[i] = src[i];
}

}  // namespace

absl::Status EnqueueDelayedCopy(void* dst, const void* src, size_t bytes, int64_t delay_ns,
                                cudaStream_t stream) {
  if (reinterpret_cast<uintptr_t>(dst) % 16 != 0 || reinterpret_cast<uintptr_t>(src) % 16 != 0 ||
      bytes % 16 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("EnqueueDelayedCopy: dst %p, src %p and bytes %zu must be 16-byte aligned",
                        dst, src, bytes));
  }
  DelayedCopyKernel<<<1, 256, 0, stream>>>(static_cast<uint4*>(dst), static_cast<const uint4*>(src),
                                           bytes / 16, delay_ns);
  if (cudaError_t err = cudaGetLastError(); err != cudaSuccess) {
    return absl::InternalError(
        absl::StrFormat("EnqueueDelayedCopy launch: %s", cudaGetErrorString(err)));
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::attention::cuda
