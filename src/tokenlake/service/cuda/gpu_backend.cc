#include "tokenlake/service/cuda/gpu_backend.h"

#include <cuda_runtime.h>

#include <algorithm>
#include <cstdio>
#include <limits>
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_set.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/gpu_engine.h"
#include "tokenlake/engine/cuda/peer_device_pool.h"
#include "tokenlake/engine/pool_shape.h"
#include "tokenlake/store/cuda/ipc_handle.h"

namespace tokenlake::service {
namespace {

namespace ecuda = ::tokenlake::engine::cuda;

class GpuBackend final : public InstanceBackend {
 public:
  // `handle`: the arena handle announced to the peers (empty: none, every peer reaches this
  // instance through host staging); map_peers: whether the peers' handles are mapped.
  GpuBackend(InstanceId self, std::unique_ptr<ecuda::PeerDevicePool> pool, std::string handle,
             bool map_peers)
      : self_(self),
        pool_(std::move(pool)),
        holdings_(&pool_->hosted()),
        handle_(std::move(handle)),
        map_peers_(map_peers) {}
  ~GpuBackend() override { engine_.reset(); }
  void set_engine(std::unique_ptr<ecuda::GpuEngine> engine) { engine_ = std::move(engine); }
  ecuda::PeerDevicePool* pool() { return pool_.get(); }

  DataPlaneTraffic data_plane_traffic() const override {
    const ecuda::PeerDevicePool::Traffic t = pool_->traffic();
    return {.locate_messages = t.locate_messages,
            .in_place_read_bytes = t.in_place_bytes,
            .locate_time = t.locate_time,
            .store_messages = t.store_messages,
            .store_time = t.store_time,
            .tail_messages = t.tail_messages,
            .tail_time = t.tail_time,
            .fetch_messages = t.fetch_messages,
            .fetched_bytes = t.fetched_bytes,
            .fetch_time = t.fetch_time};
  }

  absl::Status Submit(const engine::GenerateRequest& request) override {
    return engine_->Submit(request);
  }
  std::vector<std::pair<RequestId, absl::StatusOr<engine::GenerateResult>>> Step() override {
    return engine_->Step();
  }
  absl::Status Cancel(RequestId request) override { return engine_->Cancel(request); }
  std::optional<engine::Engine::Progress> ProgressOf(RequestId request) const override {
    return engine_->ProgressOf(request);
  }
  bool idle() const override { return engine_->idle(); }
  engine::LoopLoad Load() const override { return engine_->Load(); }
  int32_t max_batch_requests() const override { return engine_->options().max_batch_requests; }

  HoldingsSource* holdings() override { return &holdings_; }
  int64_t used_slots() const override { return pool_->store().used(); }
  absl::Status FreeIfUnchangedSince(SegmentId segment, uint64_t generation) override {
    return pool_->hosted().FreeIfUnchangedSince(segment, generation);
  }
  absl::Status Drop(SegmentId segment) override { return pool_->hosted().Free(segment, 0); }
  absl::StatusOr<int64_t> CopyForRebalance(InstanceId from, SegmentId segment,
                                           uint64_t sequence) override {
    return pool_->CopyFromPeer(from, segment, sequence);
  }

  std::string arena_handle() const override { return handle_; }
  // Maps the peers' arenas on this GPU; unmaps those gone. A peer whose handle is from another
  // GPU (or does not parse), or that announced none, is reached through host staging
  // (PeerDevicePool), as every peer is without map_peers. A peer whose
  // place another process took (a new handle for its id) gets back the tail slots the old
  // process's driver took here (the coordinator has ended its requests' tails in the lake); a
  // peer only missing from the list keeps them (it may still run: a coordinator restart or a
  // missed heartbeat leaves it out for a while).
  void SetPeerArenas(const absl::flat_hash_map<int32_t, std::string>& handles) override {
    for (const auto& [peer, bytes] : handles) {
      auto before = seen_.find(peer);
      if (before != seen_.end() && before->second != bytes) {
        if (const int32_t freed = pool_->ForgetPeerTails(InstanceId(peer)); freed > 0) {
          std::fprintf(stderr,
                       "tokenlake instance %d: gave back %d tail slots of instance %d (another "
                       "process took its place)\n",
                       self_.value(), freed, peer);
        }
      }
      seen_[peer] = bytes;
    }
    for (auto it = mapped_.begin(); it != mapped_.end();) {
      auto now = handles.find(it->first);
      if (now == handles.end() || now->second != it->second) {
        pool_->RemovePeer(InstanceId(it->first));
        mapped_.erase(it++);
      } else {
        ++it;
      }
    }
    for (const auto& [peer, bytes] : handles) {
      if (!map_peers_ || mapped_.contains(peer)) continue;
      absl::StatusOr<store::ArenaHandle> h = store::ArenaHandle::Parse(bytes);
      absl::Status s = h.status();
      if (s.ok()) s = pool_->AddPeer(InstanceId(peer), *h);
      if (!s.ok()) {
        if (unmapped_.insert({peer, bytes}).second) {
          std::fprintf(stderr,
                       "tokenlake instance %d: instance %d is reached through host staging (its "
                       "arena is not mapped: %s)\n",
                       self_.value(), peer, std::string(s.message()).c_str());
        }
        continue;
      }
      mapped_[peer] = bytes;
    }
  }

 private:
  const InstanceId self_;
  std::unique_ptr<ecuda::PeerDevicePool> pool_;
  HostedStoreHoldings holdings_;
  const std::string handle_;
  std::unique_ptr<ecuda::GpuEngine> engine_;
  // Peers mapped now (id -> the handle mapped), and the latest handle announced for every peer
  // ever announced; the server's control thread only.
  absl::flat_hash_map<int32_t, std::string> mapped_;
  absl::flat_hash_map<int32_t, std::string> seen_;
  // Handles that could not be mapped (reported once each).
  absl::flat_hash_set<std::pair<int32_t, std::string>> unmapped_;
  const bool map_peers_;
};

}  // namespace

attention::KvSlotLayout GpuBackendLayout(const engine::LlamaConfig& config,
                                         int32_t segment_tokens) {
  return engine::PoolSlotLayout(config, segment_tokens, attention::KvDtype::kBFloat16);
}

BackendFactory GpuBackendFactory(const GpuBackendOptions& options) {
  return [options](const BackendContext& ctx) -> absl::StatusOr<std::unique_ptr<InstanceBackend>> {
    if (options.model == nullptr) return absl::InvalidArgumentError("GPU backend: model is null");
    const engine::LlamaConfig& c = options.model->config();
    TOKENLAKE_ASSIGN_OR_RETURN(
        std::unique_ptr<ecuda::PeerDevicePool> pool,
        ecuda::PeerDevicePool::Create({.num_instances = ctx.lake_instances,
                                       .self = ctx.self,
                                       .slots = options.slots,
                                       .layout = GpuBackendLayout(c, options.segment_tokens),
                                       .device = options.model->device(),
                                       .transport = ctx.data_transport,
                                       .endpoint_base = 0,
                                       .reply_timeout = options.data_timeout,
                                       .change_log_entries = kInstanceChangeLogEntries}));
    TOKENLAKE_ASSIGN_OR_RETURN(store::ArenaHandle handle, pool->ExportHandle());
    auto backend = std::make_unique<GpuBackend>(
        ctx.self, std::move(pool), options.map_peers ? handle.Serialize() : std::string(),
        options.map_peers);
    TOKENLAKE_ASSIGN_OR_RETURN(
        std::unique_ptr<ecuda::GpuEngine> eng,
        ecuda::GpuEngine::CreateOver(options.model,
                                     {.num_instances = ctx.lake_instances,
                                      .segment_tokens = options.segment_tokens,
                                      .slots_per_instance = options.slots,
                                      .namespace_name = options.namespace_name,
                                      .max_batch_tokens = options.max_batch_tokens,
                                      .max_batch_requests = options.max_batch_requests},
                                     ctx.control, backend->pool(), ctx.self));
    backend->set_engine(std::move(eng));
    return std::unique_ptr<InstanceBackend>(std::move(backend));
  };
}

absl::StatusOr<int32_t> GpuInstanceSlots(int64_t total_bytes, double fraction, int64_t weight_bytes,
                                         int64_t reserve_bytes, int64_t slot_bytes) {
  if (!(fraction > 0 && fraction <= 1)) {
    return absl::InvalidArgumentError(
        absl::StrFormat("the memory fraction must be in (0, 1], not %g", fraction));
  }
  if (total_bytes < 0 || weight_bytes < 0 || reserve_bytes < 0 || slot_bytes < 1) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "bad sizes: device %d bytes, weights %d, reserve %d, slot %d (want >= 0, slot >= 1)",
        total_bytes, weight_bytes, reserve_bytes, slot_bytes));
  }
  const auto given = static_cast<int64_t>(fraction * static_cast<double>(total_bytes));
  const int64_t left = given - weight_bytes - reserve_bytes;
  if (left < slot_bytes) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "%.2f of the GPU's %.2f GiB is %.2f GiB; the weights take %.2f GiB and the reserve "
        "%.2f GiB, which leaves %.2f GiB: not one slot of %d bytes; give the instance a larger "
        "memory fraction or a smaller reserve",
        fraction, total_bytes / 1073741824.0, given / 1073741824.0, weight_bytes / 1073741824.0,
        reserve_bytes / 1073741824.0, left / 1073741824.0, slot_bytes));
  }
  return static_cast<int32_t>(
      std::min<int64_t>(left / slot_bytes, std::numeric_limits<int32_t>::max()));
}

absl::StatusOr<int64_t> GpuTotalMemory(int device) {
  // Device properties are read without a context (cudaMemGetInfo would make one here, in a
  // process that may never compute: serve).
  cudaDeviceProp props{};
  if (cudaError_t e = cudaGetDeviceProperties(&props, device); e != cudaSuccess) {
    return absl::FailedPreconditionError(absl::StrFormat(
        "no CUDA device %d visible (cudaGetDeviceProperties: %s)", device, cudaGetErrorString(e)));
  }
  return static_cast<int64_t>(props.totalGlobalMem);
}

absl::StatusOr<int32_t> GpuShareSlots(const engine::LlamaConfig& config, int32_t segment_tokens,
                                      int device, double fraction, int64_t reserve_bytes) {
  TOKENLAKE_ASSIGN_OR_RETURN(int64_t total, GpuTotalMemory(device));
  return GpuInstanceSlots(total, fraction, ecuda::GpuLlamaModel::WeightDeviceBytes(config),
                          reserve_bytes, GpuBackendLayout(config, segment_tokens).SlotBytes());
}

}  // namespace tokenlake::service
