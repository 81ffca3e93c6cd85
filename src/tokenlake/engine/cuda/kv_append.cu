#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/pdl.cuh"
#include "tokenlake/engine/cuda/kv_append.h"

namespace tokenlake::engine::cuda {
namespace {

__global__ void AppendKvKernel(const KvRowDestination* __restrict__ dst, int32_t layer,
                               const uint4* __restrict__ k, const uint4* __restrict__ v,
                               int64_t row_vec) {
  attention::cuda::GridDependentsLaunch();
  attention::cuda::GridDependencyWait();
  const int64_t t = blockIdx.x;
  const KvRowDestination d = dst[t];
  auto* dk = reinterpret_cast<uint4*>(d.k0 + static_cast<uint64_t>(layer * d.layer_stride));
  auto* dv = reinterpret_cast<uint4*>(reinterpret_cast<char*>(dk) + d.v_offset);
  for (int64_t i = threadIdx.x; i < row_vec; i += blockDim.x) {
    dk[i] = k[t * row_vec + i];
    dv[i] = v[t * row_vec + i];
  }
}

}  // namespace

absl::Status AppendKvRows(const KvRowDestination* destinations, int32_t num_rows, int32_t layer,
                          const void* k, const void* v, int64_t row_bytes, cudaStream_t stream,
                          bool pdl) {
  if (num_rows < 0 || row_bytes <= 0 || row_bytes % 16 != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("AppendKvRows: num_rows %d, row_bytes %d (a positive multiple of 16)",
                        num_rows, row_bytes));
  }
  if (num_rows == 0) return absl::OkStatus();
  if (destinations == nullptr || k == nullptr || v == nullptr) {
    return absl::InvalidArgumentError("AppendKvRows: null pointer");
  }
  const int64_t row_vec = row_bytes / 16;
  const int threads = row_vec >= 128 ? 128 : static_cast<int>((row_vec + 31) / 32 * 32);
  const cudaError_t e = attention::cuda::LaunchKernel(
      pdl, AppendKvKernel, dim3(num_rows), dim3(threads), 0, stream, destinations, layer,
      static_cast<const uint4*>(k), static_cast<const uint4*>(v), row_vec);
  if (e != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(
        absl::StrFormat("AppendKvRows: launch failed: %s", cudaGetErrorString(e)));
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::engine::cuda
