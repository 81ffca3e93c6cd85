// DeviceBuffer: an owned cudaMalloc'd byte range (never managed memory), and CudaStatus, which
// turns a cudaError_t into an absl::Status naming the call.
//
// Thread-safety: a DeviceBuffer is a plain owner (not synchronised); the memory itself follows
// the stream order of whoever uses it.
#ifndef TOKENLAKE_ENGINE_CUDA_DEVICE_BUFFER_H_
#define TOKENLAKE_ENGINE_CUDA_DEVICE_BUFFER_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"

namespace tokenlake::engine::cuda {

// OK for cudaSuccess; ResourceExhausted for cudaErrorMemoryAllocation; Internal otherwise. The
// message names `what` and CUDA's error string. Clears CUDA's sticky last error.
inline absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  const std::string msg = absl::StrFormat("%s: %s", what, cudaGetErrorString(err));
  return err == cudaErrorMemoryAllocation ? absl::ResourceExhaustedError(msg)
                                          : absl::InternalError(msg);
}

class DeviceBuffer {
 public:
  DeviceBuffer() = default;
  ~DeviceBuffer() { Free(); }
  DeviceBuffer(DeviceBuffer&& o) noexcept
      : ptr_(std::exchange(o.ptr_, nullptr)), bytes_(std::exchange(o.bytes_, 0)) {}
  DeviceBuffer& operator=(DeviceBuffer&& o) noexcept {
    if (this != &o) {
      Free();
      ptr_ = std::exchange(o.ptr_, nullptr);
      bytes_ = std::exchange(o.bytes_, 0);
    }
    return *this;
  }
  DeviceBuffer(const DeviceBuffer&) = delete;
  DeviceBuffer& operator=(const DeviceBuffer&) = delete;

  // Frees the old memory and allocates `bytes` (uninitialised; 0 leaves the buffer empty).
  // REQUIRES: no pending device work uses the old memory.
  // Errors: ResourceExhausted (out of device memory), Internal (another CUDA error).
  absl::Status Allocate(size_t bytes) {
    Free();
    if (bytes == 0) return absl::OkStatus();
    void* p = nullptr;
    if (absl::Status s = CudaStatus(cudaMalloc(&p, bytes), "cudaMalloc"); !s.ok()) return s;
    ptr_ = p;
    bytes_ = bytes;
    return absl::OkStatus();
  }
  // Grows to at least `bytes` (contents lost when it grows, kept otherwise). Synchronises the
  // device before freeing the old memory. Errors as Allocate.
  absl::Status Reserve(size_t bytes) {
    if (bytes <= bytes_) return absl::OkStatus();
    if (ptr_ != nullptr) cudaDeviceSynchronize();
    return Allocate(bytes);
  }
  void Free() {
    if (ptr_ != nullptr) cudaFree(ptr_);
    ptr_ = nullptr;
    bytes_ = 0;
  }

  void* get() const { return ptr_; }
  template <typename T>
  T* as() const {
    return static_cast<T*>(ptr_);
  }
  size_t size_bytes() const { return bytes_; }

 private:
  void* ptr_ = nullptr;
  size_t bytes_ = 0;
};

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_DEVICE_BUFFER_H_
