#include "tokenlake/engine/cuda/device_pool.h"

#include <utility>

#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/device_buffer.h"

namespace tokenlake::engine::cuda {

absl::StatusOr<std::unique_ptr<SharedDevicePool>> SharedDevicePool::Create(const Options& options) {
  if (options.num_instances < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "SharedDevicePool: num_instances must be >= 1, got %d", options.num_instances));
  }
  if (options.slots_per_instance < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "SharedDevicePool: slots_per_instance must be >= 1, got %d", options.slots_per_instance));
  }
  TOKENLAKE_RETURN_IF_ERROR(options.layout.Validate());
  std::unique_ptr<SharedDevicePool> pool(new SharedDevicePool(options));
  const size_t slot_bytes = static_cast<size_t>(options.layout.SlotBytes());
  for (int32_t i = 0; i < options.num_instances; ++i) {
    Instance inst;
    TOKENLAKE_ASSIGN_OR_RETURN(
        inst.arena, store::DeviceArena::Create(
                        {.bytes = slot_bytes * static_cast<size_t>(options.slots_per_instance),
                         .device = options.device}));
    store::SegmentStore::Options so = inst.arena->StoreOptions(slot_bytes, InstanceId(i));
    so.num_slots = options.slots_per_instance;
    TOKENLAKE_ASSIGN_OR_RETURN(inst.store, store::SegmentStore::Create(so));
    pool->instances_.push_back(std::move(inst));
  }
  return pool;
}

absl::StatusOr<store::SegmentStore*> SharedDevicePool::Find(InstanceId instance, const char* what) {
  if (!instance.valid() || instance.value() >= options_.num_instances) {
    return absl::InternalError(absl::StrFormat("SharedDevicePool: %s on instance %d of %d", what,
                                               instance.valid() ? instance.value() : -1,
                                               options_.num_instances));
  }
  return instances_[static_cast<size_t>(instance.value())].store.get();
}

const store::SegmentStore& SharedDevicePool::store(InstanceId instance) const {
  TOKENLAKE_CHECK(instance.valid() && instance.value() < options_.num_instances);
  return *instances_[static_cast<size_t>(instance.value())].store;
}

absl::Status SharedDevicePool::Resolve(absl::Span<const SlotRef> refs,
                                       absl::Span<const std::byte*> out) {
  TOKENLAKE_CHECK(refs.size() == out.size());
  for (size_t i = 0; i < refs.size(); ++i) {
    TOKENLAKE_ASSIGN_OR_RETURN(store::SegmentStore * st, Find(refs[i].holder, "a read"));
    const std::optional<SlotId> slot = st->Find(refs[i].segment);
    if (!slot.has_value()) {
      return absl::InternalError(absl::StrFormat(
          "SharedDevicePool: segment %016x is not stored on instance %d (data plane out of step "
          "with the lake)",
          refs[i].segment.value(), refs[i].holder.value()));
    }
    out[i] = st->SlotData(*slot).data();
  }
  return absl::OkStatus();
}

absl::StatusOr<DeviceSlot> SharedDevicePool::AllocateTail(InstanceId instance) {
  TOKENLAKE_ASSIGN_OR_RETURN(store::SegmentStore * st, Find(instance, "a tail slot"));
  absl::StatusOr<SlotId> slot = st->AllocateTail();
  if (!slot.ok()) {
    return absl::InternalError(absl::StrFormat(
        "SharedDevicePool: no slot on instance %d for a tail block the lake placed there (data "
        "plane out of step with the lake): %s",
        instance.value(), slot.status().message()));
  }
  return DeviceSlot{*slot, st->SlotData(*slot).data()};
}

absl::Status SharedDevicePool::FreeTail(InstanceId instance, SlotId slot) {
  TOKENLAKE_ASSIGN_OR_RETURN(store::SegmentStore * st, Find(instance, "giving a tail slot back"));
  return st->FreeTail(slot);
}

absl::Status SharedDevicePool::CommitTail(InstanceId instance, SlotId slot, SegmentId segment,
                                          const StoredMeta& /*meta*/) {
  TOKENLAKE_ASSIGN_OR_RETURN(store::SegmentStore * st, Find(instance, "a commit in place"));
  return st->AssignTail(slot, segment);
}

absl::Status SharedDevicePool::Store(InstanceId target, SegmentId segment, const std::byte* source,
                                     const StoredMeta& /*meta*/, cudaStream_t stream) {
  TOKENLAKE_ASSIGN_OR_RETURN(store::SegmentStore * st, Find(target, "a store"));
  TOKENLAKE_ASSIGN_OR_RETURN(SlotId slot, st->Allocate(segment));
  // The same layout on both sides: one copy of the whole slot.
  return CudaStatus(cudaMemcpyAsync(st->SlotData(slot).data(), source,
                                    static_cast<size_t>(options_.layout.SlotBytes()),
                                    cudaMemcpyDeviceToDevice, stream),
                    "store copy");
}

absl::Status SharedDevicePool::Free(InstanceId target, SegmentId segment, uint64_t /*evicted_at*/,
                                    cudaStream_t stream) {
  TOKENLAKE_ASSIGN_OR_RETURN(store::SegmentStore * st, Find(target, "a free"));
  // Queued work may still read the slot.
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream), "synchronize before a free"));
  return st->Free(segment);
}

}  // namespace tokenlake::engine::cuda
