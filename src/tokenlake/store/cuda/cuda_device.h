// CUDA device helpers shared by the arena files (device_arena.cc, peer_arena.cc): a guard that
// restores the calling thread's current device, the device-count check with the project's error
// codes, a GPU's UUID and the lookup of a handle's GPU among this process's devices.
// Internal to the store_cuda target.
//
// Thread-safety: the functions are thread-safe; a ScopedCudaDevice belongs to one thread (the
// current device is per thread).
#ifndef TOKENLAKE_STORE_CUDA_CUDA_DEVICE_H_
#define TOKENLAKE_STORE_CUDA_CUDA_DEVICE_H_

#include <cuda_runtime_api.h>

#include <string>
#include <string_view>

#include "absl/status/statusor.h"
#include "tokenlake/store/cuda/ipc_handle.h"

namespace tokenlake::store::internal {

// Switches the calling thread to a device and switches back on destruction.
class ScopedCudaDevice {
 public:
  ScopedCudaDevice() = default;
  ~ScopedCudaDevice();
  ScopedCudaDevice(const ScopedCudaDevice&) = delete;
  ScopedCudaDevice& operator=(const ScopedCudaDevice&) = delete;

  // Makes `device` current and creates its context if needed (the first call remembers the
  // device to restore).
  cudaError_t Set(int device);

 private:
  bool saved_ = false;
  bool switched_ = false;
  int previous_ = 0;
};

// "cudaErrorInvalidValue (invalid argument)": CUDA's name and description of an error.
std::string CudaErrorText(cudaError_t error);

// The number of CUDA devices of this process. `who` starts the error message.
// Errors: FailedPrecondition (no CUDA device, no driver).
absl::StatusOr<int> CudaDeviceCount(std::string_view who);

// True when this process sees at least one CUDA device (CudaDeviceCount succeeds).
bool HaveCudaDevice();

// The UUID of this process's device `device` (cudaDeviceProp::uuid).
// Errors: Internal (a CUDA error).
absl::StatusOr<DeviceUuid> CudaDeviceUuid(int device);

// This process's ordinal of the GPU that `origin` names: the device with the origin's UUID, or,
// for an origin without a UUID (all zeros), the origin's ordinal. `what` (e.g. "the arena of
// 8388608 bytes") goes into the error messages.
// Errors: FailedPrecondition (no CUDA device; no visible device has the UUID; the ordinal is
// out of range), Internal (a CUDA error).
absl::StatusOr<int> FindCudaDevice(std::string_view who, const IpcOrigin& origin,
                                   std::string_view what);

// True unless process `pid` is known to have exited (no such process, or a zombie).
bool ProcessMayBeAlive(uint32_t pid);

}  // namespace tokenlake::store::internal

#endif  // TOKENLAKE_STORE_CUDA_CUDA_DEVICE_H_
