// DevicePool: the data plane of the GPU engine's executor (gpu_engine.h): where each
// instance's pool slots are in device memory and how a segment's KV gets into a slot. The
// executor runs the forward; every slot it reads (a cached segment, read in place by its
// kernels) or writes (a tail block, a stored segment) comes from here, so the same executor
// serves instances that share one process (SharedDevicePool below: every instance's arena in
// this process) and, per docs/adr/0018, an instance process whose peers' arenas are mapped
// from other processes on the same GPU.
//
// A slot holds one segment's KV for all layers, laid out as layout() says
// ([layer][kv][token][kv_head][head_dim], bf16). Slots are either a segment's (found by its
// id) or a tail block of a running request (docs/adr/0017: the lake accounts them; the
// executor writes the request's new rows into them until a block is committed in place or
// given back).
//
// Ordering: every call that copies takes the stream its copy is queued on; the executor queues
// all of its work on one stream, so a slot given back (FreeTail) or freed (Free) is not written
// again before the work queued before the call that reads it has run (Free synchronises the
// stream first, since the slot may be handed to another writer).
//
// Thread-safety: implementations say; SharedDevicePool is not thread-safe (the engine's
// driver thread).
#ifndef TOKENLAKE_ENGINE_CUDA_DEVICE_POOL_H_
#define TOKENLAKE_ENGINE_CUDA_DEVICE_POOL_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <memory>
#include <vector>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/base/ids.h"
#include "tokenlake/engine/instance_pool.h"
#include "tokenlake/store/cuda/device_arena.h"
#include "tokenlake/store/segment_store.h"

namespace tokenlake::engine::cuda {

// A segment on one of the pool's instances.
struct SlotRef {
  InstanceId holder;
  SegmentId segment;
};

// A slot of an instance's store and its device address.
struct DeviceSlot {
  SlotId slot;
  std::byte* data = nullptr;
};

class DevicePool {
 public:
  virtual ~DevicePool() = default;

  virtual int32_t num_instances() const = 0;
  virtual const attention::KvSlotLayout& layout() const = 0;

  // Device addresses, in this process, of the slots of refs[i].segment on refs[i].holder
  // (out[i]), for kernels of this GPU to read in place, or of copies of them in this process's
  // device memory (a holder on another GPU or host: PeerDevicePool's host staging), valid until
  // the next call. The lake's pins keep them allocated until the requests' next plan. One call per
  // iteration (a pool of several processes asks each holder once). REQUIRES: out.size() ==
  // refs.size(). Errors: Internal naming a segment and instance where it is not stored (the data
  // plane is out of step with the lake) or an instance out of range; a peer's errors.
  virtual absl::Status Resolve(absl::Span<const SlotRef> refs,
                               absl::Span<const std::byte*> out) = 0;

  // A tail slot of `instance` (one the lake's plan placed there, so one is free).
  // Errors: Internal (out of range, or no free slot: out of step with the lake).
  virtual absl::StatusOr<DeviceSlot> AllocateTail(InstanceId instance) = 0;
  // Gives a tail slot back (see Ordering). Errors: Internal (not a tail slot of `instance`).
  virtual absl::Status FreeTail(InstanceId instance, SlotId slot) = 0;
  // Makes a tail slot `segment`'s slot in place (no copy; lake::CommitResult::in_place), with
  // its metadata.
  virtual absl::Status CommitTail(InstanceId instance, SlotId slot, SegmentId segment,
                                  const StoredMeta& meta) = 0;

  // Copies one whole slot from `source` (device memory of this GPU) into a new slot of
  // `target` for `segment` (with its metadata), queued on `stream`.
  // Errors: Internal (out of range), ResourceExhausted (no free slot), CUDA errors.
  virtual absl::Status Store(InstanceId target, SegmentId segment, const std::byte* source,
                             const StoredMeta& meta, cudaStream_t stream) = 0;

  // Frees `segment`'s slot on `target` once the work queued on `stream` has run. `evicted_at`
  // is the control-plane change that evicted the copy (0 = unknown): a pool whose instances are
  // driven by several processes keeps a copy placed by a later change (as
  // InstancePool::FreeSegment); one driven by one thread over one lake has no such race.
  // Errors: Internal (out of range), NotFound, FailedPrecondition, CUDA errors.
  virtual absl::Status Free(InstanceId target, SegmentId segment, uint64_t evicted_at,
                            cudaStream_t stream) = 0;
};

// Every instance's arena in this process, on one GPU: instance i's slots are a
// store::DeviceArena with a store::SegmentStore slot allocator over it. A moved query is a
// read of the holder's slots where they are; a store is one device-to-device copy.
//
// Thread-safety: not thread-safe.
class SharedDevicePool final : public DevicePool {
 public:
  struct Options {
    // Instances, >= 1.
    int32_t num_instances = 1;
    // Slots per instance, >= 1 (each instance's arena is slots x layout.SlotBytes()).
    int32_t slots_per_instance = 1;
    // The slots' layout; must validate.
    attention::KvSlotLayout layout;
    // CUDA device ordinal.
    int device = 0;
  };

  // Allocates the arenas. Errors: InvalidArgument naming a bad option; the arenas' errors
  // (ResourceExhausted naming the bytes asked for when the device cannot hold them).
  static absl::StatusOr<std::unique_ptr<SharedDevicePool>> Create(const Options& options);

  int32_t num_instances() const override { return options_.num_instances; }
  const attention::KvSlotLayout& layout() const override { return options_.layout; }
  absl::Status Resolve(absl::Span<const SlotRef> refs, absl::Span<const std::byte*> out) override;
  absl::StatusOr<DeviceSlot> AllocateTail(InstanceId instance) override;
  absl::Status FreeTail(InstanceId instance, SlotId slot) override;
  absl::Status CommitTail(InstanceId instance, SlotId slot, SegmentId segment,
                          const StoredMeta& meta) override;
  absl::Status Store(InstanceId target, SegmentId segment, const std::byte* source,
                     const StoredMeta& meta, cudaStream_t stream) override;
  absl::Status Free(InstanceId target, SegmentId segment, uint64_t evicted_at,
                    cudaStream_t stream) override;

  // Instance i's slot allocator. REQUIRES: 0 <= i < num_instances().
  const store::SegmentStore& store(InstanceId instance) const;

 private:
  struct Instance {
    std::unique_ptr<store::DeviceArena> arena;
    std::unique_ptr<store::SegmentStore> store;
  };
  explicit SharedDevicePool(const Options& options) : options_(options) {}
  // The store of `instance`, or Internal naming `what` when it is out of range.
  absl::StatusOr<store::SegmentStore*> Find(InstanceId instance, const char* what);

  Options options_;
  std::vector<Instance> instances_;
};

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_DEVICE_POOL_H_
