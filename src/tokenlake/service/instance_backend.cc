#include "tokenlake/service/instance_backend.h"

#include <utility>

#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/instance_pool.h"

namespace tokenlake::service {
namespace {

// Unacknowledged changes of the store an instance keeps for its reports (beyond, it reports in
// full): far more than a heartbeat period's.
constexpr int64_t kChangeLogEntries = int64_t{1} << 16;

// What this instance's store holds and how it changed (holdings_report.h), from its pool.
class PoolHoldings final : public HoldingsSource {
 public:
  PoolHoldings(engine::InstancePool* pool, InstanceId self) : pool_(pool), self_(self) {}
  uint64_t Snapshot(std::vector<lake::HeldSegment>* held) const override {
    engine::InstancePool::HeldReport r = pool_->HeldWithGeneration(self_);
    held->reserve(r.segments.size());
    for (const engine::HeldSegmentInfo& h : r.segments) {
      held->push_back({.id = h.id, .parent = h.meta.parent, .num_tokens = h.meta.num_tokens});
    }
    return r.generation;
  }
  std::optional<std::vector<store::SegmentChange>> ChangesSince(uint64_t from) const override {
    return pool_->ChangesSince(self_, from);
  }
  void Forget(uint64_t through) override { pool_->ForgetChanges(self_, through); }

 private:
  engine::InstancePool* const pool_;
  const InstanceId self_;
};

class HostBackend final : public InstanceBackend {
 public:
  HostBackend(InstanceId self, std::unique_ptr<engine::InstancePool> pool)
      : self_(self), pool_(std::move(pool)), holdings_(pool_.get(), self) {}
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
  PoolHoldings holdings_;
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
                                     .change_log_entries = kChangeLogEntries};
    po.hosted = {ctx.self};
    TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<engine::InstancePool> pool,
                               engine::InstancePool::Create(po));
    auto backend = std::make_unique<HostBackend>(ctx.self, std::move(pool));
    TOKENLAKE_ASSIGN_OR_RETURN(
        std::unique_ptr<engine::Engine> eng,
        engine::Engine::CreateOverPool(
            options.model,
            {.segment_tokens = options.segment_tokens, .namespace_name = options.namespace_name},
            {.control_plane = ctx.control, .pool = backend->pool(), .compute_instance = ctx.self}));
    backend->set_engine(std::move(eng));
    return std::unique_ptr<InstanceBackend>(std::move(backend));
  };
}

}  // namespace tokenlake::service
