#include "tokenlake/store/cuda/cuda_device.h"

#include <algorithm>
#include <cerrno>
#include <csignal>
#include <cstring>
#include <fstream>
#include <string>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace tokenlake::store::internal {

ScopedCudaDevice::~ScopedCudaDevice() {
  if (switched_) cudaSetDevice(previous_);
}

cudaError_t ScopedCudaDevice::Set(int device) {
  if (!saved_) {
    const cudaError_t err = cudaGetDevice(&previous_);
    if (err != cudaSuccess) return err;
    saved_ = true;
  }
  // Switching (and back) only when needed: cudaSetDevice creates the device's context, which a
  // thread that never used its default device should not get as a side effect.
  if (device == previous_ && !switched_) {
    // cudaGetDevice does not create a context; make sure the device is usable all the same.
    return cudaFree(nullptr);
  }
  switched_ = true;
  return cudaSetDevice(device);
}

std::string CudaErrorText(cudaError_t error) {
  return absl::StrFormat("%s (%s)", cudaGetErrorName(error), cudaGetErrorString(error));
}

absl::StatusOr<int> CudaDeviceCount(std::string_view who) {
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();  // not sticky: clear it for the caller's next CUDA call
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: no CUDA device (%s)", who, err == cudaSuccess ? "0 devices" : CudaErrorText(err)));
  }
  return count;
}

bool HaveCudaDevice() { return CudaDeviceCount("HaveCudaDevice").ok(); }

absl::StatusOr<DeviceUuid> CudaDeviceUuid(int device) {
  cudaDeviceProp prop{};
  const cudaError_t err = cudaGetDeviceProperties(&prop, device);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(
        absl::StrFormat("cudaGetDeviceProperties(device %d): %s", device, CudaErrorText(err)));
  }
  DeviceUuid uuid;
  static_assert(sizeof(prop.uuid.bytes) == std::tuple_size_v<DeviceUuid>);
  std::memcpy(uuid.data(), prop.uuid.bytes, uuid.size());
  return uuid;
}

absl::StatusOr<int> FindCudaDevice(std::string_view who, const IpcOrigin& origin,
                                   std::string_view what) {
  auto count = CudaDeviceCount(who);
  if (!count.ok()) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s; cannot open %s of %s", count.status().message(), what, origin.ToString()));
  }
  const bool by_uuid = std::any_of(origin.device_uuid.begin(), origin.device_uuid.end(),
                                   [](uint8_t b) { return b != 0; });
  if (!by_uuid) {
    if (origin.device >= *count) {
      return absl::FailedPreconditionError(
          absl::StrFormat("%s: device %d is out of range (this process has %d CUDA devices); "
                          "cannot open %s of %s",
                          who, origin.device, *count, what, origin.ToString()));
    }
    return origin.device;
  }
  for (int device = 0; device < *count; ++device) {
    auto uuid = CudaDeviceUuid(device);
    if (!uuid.ok()) {
      return absl::InternalError(absl::StrFormat("%s: %s", who, uuid.status().message()));
    }
    if (*uuid == origin.device_uuid) return device;
  }
  return absl::FailedPreconditionError(
      absl::StrFormat("%s: the GPU %s is not among this process's %d CUDA devices "
                      "(CUDA_VISIBLE_DEVICES?); cannot open %s of %s",
                      who, FormatDeviceUuid(origin.device_uuid), *count, what, origin.ToString()));
}

bool ProcessMayBeAlive(uint32_t pid) {
  if (::kill(static_cast<pid_t>(pid), 0) != 0 && errno == ESRCH) return false;
  // An exited child that its parent has not reaped yet still answers kill(): its state in
  // /proc/<pid>/stat (the field after the parenthesised command name) is Z.
  std::ifstream stat(absl::StrFormat("/proc/%d/stat", pid));
  std::string line;
  if (!std::getline(stat, line)) return true;
  const size_t close = line.rfind(')');
  return !(close != std::string::npos && close + 2 < line.size() && line[close + 2] == 'Z');
}

}  // namespace tokenlake::store::internal
