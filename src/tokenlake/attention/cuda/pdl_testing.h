// Test support for programmatic dependent launch (PagedAttentionParams::pdl): a producer kernel
// that lets a PDL-launched next kernel start at once and writes its output only after a delay,
// so a consumer that reads the output before its griddepcontrol.wait sees the old bytes.
//
// Thread-safety: as the CUDA runtime (one stream per caller). Test-only: not part of the
// library's interface.
#ifndef TOKENLAKE_ATTENTION_CUDA_PDL_TESTING_H_
#define TOKENLAKE_ATTENTION_CUDA_PDL_TESTING_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"

namespace tokenlake::attention::cuda {

// Enqueues on `stream` one thread block that executes griddepcontrol.launch_dependents first,
// then spins for `delay_ns` nanoseconds (the device's global timer), then copies `bytes` bytes
// from src to dst (device pointers, 16-byte aligned, bytes a multiple of 16).
// Errors: InvalidArgument for misaligned pointers or sizes; Internal when the launch fails.
absl::Status EnqueueDelayedCopy(void* dst, const void* src, size_t bytes, int64_t delay_ns,
                                cudaStream_t stream);

}  // namespace tokenlake::attention::cuda

#endif  // TOKENLAKE_ATTENTION_CUDA_PDL_TESTING_H_
