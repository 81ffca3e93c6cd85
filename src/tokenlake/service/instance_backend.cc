#include "tokenlake/service/instance_backend.h"

#include <utility>

#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/instance_pool.h"

namespace tokenlake::service {

uint64_t HostedStoreHoldings::Snapshot(std::vector<lake::HeldSegment>* held) const {
  engine::HostedStore::HeldReport r = hosted_->Held();
  held->reserve(r.segments.size());
  for (const engine::HeldSegmentInfo& h : r.segments) {
    held->push_back({.id = h.id, .parent = h.meta.parent, .num_tokens = h.meta.num_tokens});
  }
  return r.generation;
}

namespace {

class HostBackend final : public InstanceBackend {
 public:
  HostBackend(InstanceId self, std::unique_ptr<engine::InstancePool> pool)
      : self_(self), pool_(std::move(pool)), holdings_(&pool_->hosted(self)) {}
  ~HostBackend() override {
    engine_.reset();  // before the pool it runs over
  }
  void set_engine(std::unique_ptr<engine::Engine> engine) { engine_ = std::move(engine); }
  engine::InstancePool* pool() { return pool_.get(); }

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
  int64_t used_slots() const override { return pool_->store(self_).used(); }
  absl::Status FreeIfUnchangedSince(SegmentId segment, uint64_t generation) override {
    return pool_->FreeIfUnchangedSince(self_, segment, generation);
  }
  absl::Status Drop(SegmentId segment) override {
    return pool_->FreeSegment(self_, self_, segment);
  }
  absl::StatusOr<int64_t> CopyForRebalance(InstanceId from, SegmentId segment,
                                           uint64_t sequence) override {
    return pool_->CopyForRebalance(self_, from, segment, sequence);
  }

 private:
  const InstanceId self_;
  std::unique_ptr<engine::InstancePool> pool_;
  HostedStoreHoldings holdings_;
  std::unique_ptr<engine::Engine> engine_;
};

}  // namespace

BackendFactory HostBackendFactory(const HostBackendOptions& options) {
  return [options](const BackendContext& ctx) -> absl::StatusOr<std::unique_ptr<InstanceBackend>> {
    engine::InstancePool::Options po{.num_instances = ctx.lake_instances,
                                     .layout = options.layout,
                                     .num_heads = options.model->config().num_heads,
                                     .slots_per_instance = options.slots,
                                     .reply_timeout = options.data_timeout,
                                     .external_transport = ctx.data_transport,
                                     .endpoint_base = 0,
                                     .change_log_entries = kInstanceChangeLogEntries};
    po.hosted = {ctx.self};
    TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<engine::InstancePool> pool,
                               engine::InstancePool::Create(po));
    auto backend = std::make_unique<HostBackend>(ctx.self, std::move(pool));
    TOKENLAKE_ASSIGN_OR_RETURN(
        std::unique_ptr<engine::Engine> eng,
        engine::Engine::CreateOverPool(
            options.model,
            {.segment_tokens = options.segment_tokens,
             .namespace_name = options.namespace_name,
             .max_batch_tokens = options.max_batch_tokens},
            {.control_plane = ctx.control, .pool = backend->pool(), .compute_instance = ctx.self}));
    backend->set_engine(std::move(eng));
    return std::unique_ptr<InstanceBackend>(std::move(backend));
  };
}

}  // namespace tokenlake::service
