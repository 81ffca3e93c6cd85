// The GPU instance backend (service/instance_backend.h; docs/adr/0018): an instance process on a
// GPU that other instance processes may share. Its store is a PeerDevicePool hosting this
// instance (a device arena of bf16 slots, exported to the peers through the coordinator, whose
// arenas it maps as the coordinator announces them), and its engine is the GPU engine over that
// pool and the coordinator's lake, computing every request on this instance. Peers on another
// GPU are not reached yet (the host path of the ADR's point 5): their arenas are not mapped,
// and a plan that names one fails the request with FailedPrecondition.
//
// Thread-safety: as InstanceBackend's.
#ifndef TOKENLAKE_SERVICE_CUDA_GPU_BACKEND_H_
#define TOKENLAKE_SERVICE_CUDA_GPU_BACKEND_H_

#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/time/time.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/engine/cuda/gpu_llama.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/service/instance_backend.h"

namespace tokenlake::service {

struct GpuBackendOptions {
  // Borrowed; outlives the backends; not used by anyone else meanwhile (its stream).
  engine::cuda::GpuLlamaModel* model = nullptr;
  // Slots of this instance's device arena, >= 1 (as the coordinator's lake counts).
  int32_t slots = 1;
  int32_t segment_tokens = 16;
  std::string namespace_name = "tokenlake";
  // How long a request to a peer's data plane may take.
  absl::Duration data_timeout = absl::Seconds(2);
  // Continuous batching (engine::cuda::GpuEngineOptions).
  int64_t max_batch_tokens = 2048;
  int32_t max_batch_requests = 256;
  // Whether peers on this GPU are mapped and read in place (docs/adr/0018). False: every peer
  // is reached through host staging, as one on another GPU or host is, and the instance
  // announces no arena handle (a deployment where processes may not share GPU memory).
  bool map_peers = true;
};

// The layout of the backend's slots (bf16): InstanceBackendSpec::layout.
attention::KvSlotLayout GpuBackendLayout(const engine::LlamaConfig& config, int32_t segment_tokens);

// The slots of an instance given `fraction` of a GPU of `total_bytes`: what is left of that
// share after the weights (`weight_bytes`, GpuLlamaModel::WeightDeviceBytes) and
// `reserve_bytes` (the engine's activations and workspaces, the CUDA context), in slots of
// `slot_bytes`, at most INT32_MAX.
// Errors: InvalidArgument (fraction not in (0, 1], a negative size, slot_bytes < 1),
// ResourceExhausted naming the bytes given, the weights', the reserve and the slot size when
// not one slot fits.
absl::StatusOr<int32_t> GpuInstanceSlots(int64_t total_bytes, double fraction, int64_t weight_bytes,
                                         int64_t reserve_bytes, int64_t slot_bytes);

// The memory of CUDA device `device` (as CUDA_VISIBLE_DEVICES numbers them), read without
// creating a context on it. Errors: FailedPrecondition (no such device, naming it).
absl::StatusOr<int64_t> GpuTotalMemory(int device);

// The slots of an instance of `config` (segments of `segment_tokens`, GpuBackendLayout) given
// `fraction` of CUDA device `device`, less its weights and `reserve_bytes`: GpuTotalMemory and
// GpuInstanceSlots together, the one sum that `tokenlake instance --memory-fraction` sizes its
// arena by and `tokenlake serve --memory-fraction` tells the coordinator.
// Errors: those of GpuTotalMemory and GpuInstanceSlots.
absl::StatusOr<int32_t> GpuShareSlots(const engine::LlamaConfig& config, int32_t segment_tokens,
                                      int device, double fraction, int64_t reserve_bytes);

// Errors of a backend it makes: the PeerDevicePool's (ResourceExhausted naming the bytes when
// the arena does not fit the device) and the GPU engine's.
BackendFactory GpuBackendFactory(const GpuBackendOptions& options);

}  // namespace tokenlake::service

#endif  // TOKENLAKE_SERVICE_CUDA_GPU_BACKEND_H_
