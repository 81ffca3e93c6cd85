#include "tokenlake/store/cuda/device_arena.h"

#include <cuda_runtime_api.h>

#include <cstring>
#include <memory>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/store/cuda/cuda_device.h"

namespace tokenlake::store {

absl::StatusOr<std::unique_ptr<DeviceArena>> DeviceArena::Create(const Options& options) {
  if (options.bytes == 0) {
    return absl::InvalidArgumentError("DeviceArena: options.bytes must be > 0");
  }
  if (options.device < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("DeviceArena: options.device = %d < 0", options.device));
  }
  int count = 0;
  cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // clear the sticky-free error state
    return absl::FailedPreconditionError(
        absl::StrFormat("DeviceArena: no CUDA device (%s)",
                        err == cudaSuccess ? "0 devices" : cudaGetErrorString(err)));
  }
  if (options.device >= count) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "DeviceArena: options.device = %d but only %d devices", options.device, count));
  }
  int previous = 0;
  err = cudaGetDevice(&previous);
  if (err == cudaSuccess) err = cudaSetDevice(options.device);
  if (err != cudaSuccess) {
    return absl::InternalError(absl::StrFormat("DeviceArena: %s", cudaGetErrorString(err)));
  }
  void* data = nullptr;
  err = cudaMalloc(&data, options.bytes);
  cudaSetDevice(previous);
  if (err == cudaErrorMemoryAllocation) {
    cudaGetLastError();
    return absl::ResourceExhaustedError(
        absl::StrFormat("DeviceArena: cudaMalloc(%u bytes) on device %d: out of memory",
                        options.bytes, options.device));
  }
  if (err != cudaSuccess) {
    return absl::InternalError(
        absl::StrFormat("DeviceArena: cudaMalloc: %s", cudaGetErrorString(err)));
  }
  return std::unique_ptr<DeviceArena>(new DeviceArena(data, options.bytes, options.device));
}

DeviceArena::~DeviceArena() {
  int previous = 0;
  if (cudaGetDevice(&previous) == cudaSuccess && cudaSetDevice(device_) == cudaSuccess) {
    cudaFree(data_);
    cudaSetDevice(previous);
  }
}

SegmentStore::Options DeviceArena::StoreOptions(size_t slot_bytes, InstanceId instance) const {
  SegmentStore::Options options;
  options.arena = data_;
  options.arena_bytes = bytes_;
  options.slot_bytes = slot_bytes;
  options.num_slots = 0;
  options.instance = instance;
  return options;
}

absl::StatusOr<ArenaHandle> DeviceArena::ExportHandle() const {
  internal::ScopedCudaDevice on;
  cudaError_t err = on.Set(device_);
  cudaIpcMemHandle_t ipc;
  if (err == cudaSuccess) err = cudaIpcGetMemHandle(&ipc, data_);
  if (err != cudaSuccess) {
    cudaGetLastError();
    const std::string message = absl::StrFormat(
        "DeviceArena::ExportHandle: cudaIpcGetMemHandle of the arena of %d bytes "
        "on device %d: %s",
        bytes_, device_, internal::CudaErrorText(err));
    if (err == cudaErrorNotSupported) return absl::FailedPreconditionError(message);
    if (err == cudaErrorMemoryAllocation) return absl::ResourceExhaustedError(message);
    return absl::InternalError(message);
  }
  TOKENLAKE_ASSIGN_OR_RETURN(DeviceUuid uuid, internal::CudaDeviceUuid(device_));
  ArenaHandle handle;
  static_assert(sizeof(ipc.reserved) == kCudaIpcHandleBytes);
  std::memcpy(handle.ipc_handle.data(), ipc.reserved, handle.ipc_handle.size());
  handle.size_bytes = bytes_;
  handle.origin = IpcOrigin::ThisProcess(device_, uuid);
  return handle;
}

}  // namespace tokenlake::store
