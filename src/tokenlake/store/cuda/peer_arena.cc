#include "tokenlake/store/cuda/peer_arena.h"

#include <cudaTypedefs.h>
#include <cuda_runtime_api.h>

#include <cstdint>
#include <cstring>
#include <memory>
#include <optional>
#include <string>
#include <utility>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/store/cuda/cuda_device.h"

namespace tokenlake::store {
namespace {

static_assert(sizeof(cudaIpcMemHandle_t) == kCudaIpcHandleBytes);
static_assert(sizeof(cudaIpcEventHandle_t) == kCudaIpcHandleBytes);

// The status for a failed cudaIpcOpen*Handle of a handle from `origin` that passed our own
// checks: the exporter's state decides between "gone" and "bad handle".
absl::Status OpenError(std::string_view who, cudaError_t err, const IpcOrigin& origin, int device,
                       std::string_view what) {
  const std::string where =
      absl::StrFormat("%s of %s, on this process's device %d", what, origin.ToString(), device);
  switch (err) {
    case cudaErrorMemoryAllocation:
      return absl::ResourceExhaustedError(absl::StrFormat("%s: out of memory mapping %s: %s", who,
                                                          where, internal::CudaErrorText(err)));
    case cudaErrorNotSupported:
    case cudaErrorPeerAccessUnsupported:
    case cudaErrorTooManyPeers:
    case cudaErrorDevicesUnavailable:
      return absl::FailedPreconditionError(absl::StrFormat("%s: CUDA cannot map %s here: %s", who,
                                                           where, internal::CudaErrorText(err)));
    default:
      break;
  }
  if (!internal::ProcessMayBeAlive(origin.pid)) {
    return absl::UnavailableError(
        absl::StrFormat("%s: the exporting process %d has exited, so %s is gone: %s", who,
                        origin.pid, where, internal::CudaErrorText(err)));
  }
  return absl::InvalidArgumentError(
      absl::StrFormat("%s: CUDA refused the handle for %s (not a live export of that process, or "
                      "CUDA IPC is not allowed between the two, e.g. separate containers): %s",
                      who, where, internal::CudaErrorText(err)));
}

// Makes `device` current on the calling thread (until `on` goes), which also creates this
// process's context there: a device this process cannot use is reported as such, not as a bad
// handle.
absl::Status UseDevice(internal::ScopedCudaDevice& on, std::string_view who, int device,
                       std::string_view what, const IpcOrigin& origin) {
  const cudaError_t err = on.Set(device);
  if (err == cudaSuccess) return absl::OkStatus();
  cudaGetLastError();
  return absl::FailedPreconditionError(
      absl::StrFormat("%s: cannot use this process's device %d to open %s of %s: %s", who, device,
                      what, origin.ToString(), internal::CudaErrorText(err)));
}

// The allocation that contains `ptr` in this process, [base, base + size), as the driver knows it
// (cuMemGetAddressRange, reached through the runtime so that nothing links the driver library);
// nullopt when the driver cannot say.
std::optional<std::pair<uintptr_t, size_t>> AllocationRange(void* ptr) {
  static const PFN_cuMemGetAddressRange_v3020 get_range = [] {
    void* fn = nullptr;
    cudaDriverEntryPointQueryResult found{};
    if (cudaGetDriverEntryPointByVersion("cuMemGetAddressRange", &fn, 12000, cudaEnableDefault,
                                         &found) != cudaSuccess ||
        found != cudaDriverEntryPointSuccess) {
      cudaGetLastError();
      fn = nullptr;
    }
    return reinterpret_cast<PFN_cuMemGetAddressRange_v3020>(fn);
  }();
  if (get_range == nullptr) return std::nullopt;
  CUdeviceptr_v2 base = 0;
  size_t size = 0;
  if (get_range(&base, &size, reinterpret_cast<CUdeviceptr_v2>(ptr)) != CUDA_SUCCESS) {
    return std::nullopt;
  }
  return std::make_pair(static_cast<uintptr_t>(base), size);
}

}  // namespace

absl::StatusOr<std::unique_ptr<PeerArena>> PeerArena::Open(const ArenaHandle& handle) {
  constexpr std::string_view kWho = "PeerArena::Open";
  // The same checks as for received bytes: a handle built in memory gets them too.
  if (auto valid = ArenaHandle::Parse(handle.Serialize()); !valid.ok()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %s", kWho, valid.status().message()));
  }
  const std::string what = absl::StrFormat("the arena of %d bytes", handle.size_bytes);
  if (handle.origin.IsThisProcess()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: %s (device %d) was exported by this process; use it directly (CUDA cannot open a "
        "process's own handle)",
        kWho, what, handle.origin.device));
  }
  TOKENLAKE_ASSIGN_OR_RETURN(const int device, internal::FindCudaDevice(kWho, handle.origin, what));

  cudaIpcMemHandle_t ipc;
  std::memcpy(ipc.reserved, handle.ipc_handle.data(), sizeof(ipc.reserved));
  void* data = nullptr;
  {
    internal::ScopedCudaDevice on;
    TOKENLAKE_RETURN_IF_ERROR(UseDevice(on, kWho, device, what, handle.origin));
    const cudaError_t err = cudaIpcOpenMemHandle(&data, ipc, cudaIpcMemLazyEnablePeerAccess);
    if (err != cudaSuccess) {
      cudaGetLastError();
      return OpenError(kWho, err, handle.origin, device, what);
    }
    // The size is the exporter's word: check it against what CUDA mapped, so that a wrong handle
    // is refused here rather than faulting the device later.
    if (auto range = AllocationRange(data); range.has_value()) {
      const auto start = reinterpret_cast<uintptr_t>(data);
      const uintptr_t end = range->first + range->second;
      const uint64_t mapped = end > start ? end - start : 0;
      if (handle.size_bytes > mapped) {
        cudaIpcCloseMemHandle(data);
        cudaGetLastError();
        return absl::InvalidArgumentError(absl::StrFormat(
            "%s: %s of %s, on this process's device %d: the mapped allocation has only %d bytes "
            "from the arena's start",
            kWho, what, handle.origin.ToString(), device, mapped));
      }
    }
  }
  return std::unique_ptr<PeerArena>(new PeerArena(data, handle.size_bytes, device, handle.origin));
}

PeerArena::~PeerArena() {
  internal::ScopedCudaDevice on;
  if (on.Set(device_) == cudaSuccess) cudaIpcCloseMemHandle(data_);
  cudaGetLastError();  // nothing to report to from a destructor; leave no error for the caller
}

absl::StatusOr<std::unique_ptr<IpcEvent>> IpcEvent::Create(int device) {
  constexpr std::string_view kWho = "IpcEvent::Create";
  if (device < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: device %d < 0", kWho, device));
  }
  TOKENLAKE_ASSIGN_OR_RETURN(const int count, internal::CudaDeviceCount(kWho));
  if (device >= count) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: device %d is out of range (this process has %d CUDA devices)", kWho, device, count));
  }
  internal::ScopedCudaDevice on;
  cudaError_t err = on.Set(device);
  cudaEvent_t event = nullptr;
  if (err == cudaSuccess) {
    err = cudaEventCreateWithFlags(&event, cudaEventInterprocess | cudaEventDisableTiming);
  }
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(absl::StrFormat("%s: cudaEventCreateWithFlags on device %d: %s",
                                               kWho, device, internal::CudaErrorText(err)));
  }
  return std::unique_ptr<IpcEvent>(new IpcEvent(event, device, /*opened=*/false));
}

absl::StatusOr<std::unique_ptr<IpcEvent>> IpcEvent::Open(const EventHandle& handle) {
  constexpr std::string_view kWho = "IpcEvent::Open";
  if (auto valid = EventHandle::Parse(handle.Serialize()); !valid.ok()) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: %s", kWho, valid.status().message()));
  }
  if (handle.origin.IsThisProcess()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "%s: the event (device %d) was exported by this process; use it directly (CUDA cannot "
        "open a process's own handle)",
        kWho, handle.origin.device));
  }
  TOKENLAKE_ASSIGN_OR_RETURN(const int device,
                             internal::FindCudaDevice(kWho, handle.origin, "the event"));
  cudaIpcEventHandle_t ipc;
  std::memcpy(ipc.reserved, handle.ipc_handle.data(), sizeof(ipc.reserved));
  internal::ScopedCudaDevice on;
  TOKENLAKE_RETURN_IF_ERROR(UseDevice(on, kWho, device, "the event", handle.origin));
  cudaEvent_t event = nullptr;
  const cudaError_t err = cudaIpcOpenEventHandle(&event, ipc);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return OpenError(kWho, err, handle.origin, device, "the event");
  }
  return std::unique_ptr<IpcEvent>(new IpcEvent(event, device, /*opened=*/true));
}

IpcEvent::~IpcEvent() {
  internal::ScopedCudaDevice on;
  if (on.Set(device_) == cudaSuccess) cudaEventDestroy(event_);
  cudaGetLastError();
}

absl::StatusOr<EventHandle> IpcEvent::ExportHandle() const {
  constexpr std::string_view kWho = "IpcEvent::ExportHandle";
  if (opened_) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "%s: this event was opened from another process's handle; export the creator's", kWho));
  }
  internal::ScopedCudaDevice on;
  cudaError_t err = on.Set(device_);
  cudaIpcEventHandle_t ipc;
  if (err == cudaSuccess) err = cudaIpcGetEventHandle(&ipc, event_);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(absl::StrFormat("%s: cudaIpcGetEventHandle on device %d: %s", kWho,
                                               device_, internal::CudaErrorText(err)));
  }
  TOKENLAKE_ASSIGN_OR_RETURN(DeviceUuid uuid, internal::CudaDeviceUuid(device_));
  EventHandle handle;
  std::memcpy(handle.ipc_handle.data(), ipc.reserved, handle.ipc_handle.size());
  handle.origin = IpcOrigin::ThisProcess(device_, uuid);
  return handle;
}

absl::Status IpcEvent::Record(cudaStream_t stream) {
  const cudaError_t err = cudaEventRecord(event_, stream);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(
        absl::StrFormat("IpcEvent::Record (device %d): %s", device_, internal::CudaErrorText(err)));
  }
  return absl::OkStatus();
}

absl::Status IpcEvent::StreamWait(cudaStream_t stream) {
  const cudaError_t err = cudaStreamWaitEvent(stream, event_, 0);
  if (err != cudaSuccess) {
    cudaGetLastError();
    return absl::InternalError(absl::StrFormat("IpcEvent::StreamWait (device %d): %s", device_,
                                               internal::CudaErrorText(err)));
  }
  return absl::OkStatus();
}

absl::StatusOr<bool> IpcEvent::Query() const {
  const cudaError_t err = cudaEventQuery(event_);
  if (err == cudaSuccess) return true;
  if (err == cudaErrorNotReady) return false;
  cudaGetLastError();
  return absl::InternalError(
      absl::StrFormat("IpcEvent::Query (device %d): %s", device_, internal::CudaErrorText(err)));
}

}  // namespace tokenlake::store
