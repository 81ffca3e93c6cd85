// Instance servers over a backend of the caller's (InstanceServer::Create with an
// InstanceBackendSpec): the host pool wrapped in a backend that reports a device-arena handle,
// as a GPU instance's does (docs/adr/0018). The coordinator relays each instance's handle to the
// other, whose backend is given it; when an instance dies, the survivor's backend is told it is
// gone. A coordinator, two instance servers and real gRPC / TCP on 127.0.0.1.
#include <memory>
#include <string>
#include <utility>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/synchronization/mutex.h"
#include "absl/time/clock.h"
#include "gtest/gtest.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/engine/pool_shape.h"
#include "tokenlake/service/cluster_testing.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/service/instance_backend.h"
#include "tokenlake/service/instance_server.h"
#include "tokenlake/transport/cluster_secret.h"

namespace tokenlake::service {
namespace {

// What the backends of each instance were told about their peers' arenas, latest last.
struct Told {
  absl::Mutex mu;
  absl::flat_hash_map<int32_t, std::vector<absl::flat_hash_map<int32_t, std::string>>> by_instance
      ABSL_GUARDED_BY(mu);
  absl::flat_hash_map<int32_t, std::string> Latest(int32_t instance) {
    absl::MutexLock lock(&mu);
    auto it = by_instance.find(instance);
    return it == by_instance.end() || it->second.empty()
               ? absl::flat_hash_map<int32_t, std::string>{}
               : it->second.back();
  }
};

// A backend that passes every call to `inner`; the test backends below change a few.
class ForwardingBackend : public InstanceBackend {
 public:
  explicit ForwardingBackend(std::unique_ptr<InstanceBackend> inner) : inner_(std::move(inner)) {}
  absl::Status Submit(const engine::GenerateRequest& r) override { return inner_->Submit(r); }
  std::vector<std::pair<RequestId, absl::StatusOr<engine::GenerateResult>>> Step() override {
    return inner_->Step();
  }
  absl::Status Cancel(RequestId r) override { return inner_->Cancel(r); }
  std::optional<engine::Engine::Progress> ProgressOf(RequestId r) const override {
    return inner_->ProgressOf(r);
  }
  bool idle() const override { return inner_->idle(); }
  engine::LoopLoad Load() const override { return inner_->Load(); }
  int32_t max_batch_requests() const override { return inner_->max_batch_requests(); }
  HoldingsSource* holdings() override { return inner_->holdings(); }
  int64_t used_slots() const override { return inner_->used_slots(); }
  absl::Status FreeIfUnchangedSince(SegmentId s, uint64_t g) override {
    return inner_->FreeIfUnchangedSince(s, g);
  }
  absl::Status Drop(SegmentId s) override { return inner_->Drop(s); }
  absl::StatusOr<int64_t> CopyForRebalance(InstanceId from, SegmentId s, uint64_t seq) override {
    return inner_->CopyForRebalance(from, s, seq);
  }

 private:
  std::unique_ptr<InstanceBackend> inner_;
};

// The host backend, reporting "arena-of-<id>" as its device arena and recording SetPeerArenas.
class ArenaReportingBackend final : public ForwardingBackend {
 public:
  ArenaReportingBackend(std::unique_ptr<InstanceBackend> inner, InstanceId self, Told* told)
      : ForwardingBackend(std::move(inner)), self_(self), told_(told) {}
  std::string arena_handle() const override { return absl::StrCat("arena-of-", self_.value()); }
  void SetPeerArenas(const absl::flat_hash_map<int32_t, std::string>& handles) override {
    absl::MutexLock lock(&told_->mu);
    told_->by_instance[self_.value()].push_back(handles);
  }

 private:
  const InstanceId self_;
  Told* const told_;
};

TEST(ClusterBackendTest, ArenaHandlesReachThePeersBackendsAndLeaveWithTheirInstance) {
  auto model = engine::LlamaModel::Load(TestModelDir());
  ASSERT_TRUE(model.ok()) << model.status();
  const std::string secret = *transport::GenerateClusterSecret();
  auto coordinator = Coordinator::Create(SmallClusterOptions((*model)->config(), secret));
  ASSERT_TRUE(coordinator.ok()) << coordinator.status();
  Told told;
  const InstanceServerOptions base{
      .coordinator_port = (*coordinator)->grpc_port(), .slots = 256, .cluster_secret = secret};
  const attention::KvSlotLayout layout =
      engine::PoolSlotLayout((*model)->config(), base.segment_tokens, attention::KvDtype::kFloat32);
  const BackendFactory host = HostBackendFactory({.model = model->get(),
                                                  .layout = layout,
                                                  .slots = base.slots,
                                                  .segment_tokens = base.segment_tokens,
                                                  .namespace_name = base.namespace_name});
  std::vector<std::unique_ptr<InstanceServer>> instances;
  for (int32_t i = 0; i < 2; ++i) {
    InstanceServerOptions o = base;
    o.name = absl::StrCat("arena-", i);
    o.preferred_id = i;
    auto s = InstanceServer::Create(
        {.layout = layout,
         .context_tokens = (*model)->config().max_position_embeddings,
         .factory =
             [&](const BackendContext& ctx) -> absl::StatusOr<std::unique_ptr<InstanceBackend>> {
           absl::StatusOr<std::unique_ptr<InstanceBackend>> inner = host(ctx);
           if (!inner.ok()) return inner.status();
           return std::make_unique<ArenaReportingBackend>(*std::move(inner), ctx.self, &told);
         }},
        o);
    ASSERT_TRUE(s.ok()) << s.status();
    instances.push_back(*std::move(s));
  }
  const absl::flat_hash_map<int32_t, std::string> of0 = {{0, "arena-of-0"}};
  const absl::flat_hash_map<int32_t, std::string> of1 = {{1, "arena-of-1"}};
  absl::Time deadline = absl::Now() + absl::Seconds(20);
  while ((told.Latest(0) != of1 || told.Latest(1) != of0) && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_EQ(told.Latest(0), of1);
  EXPECT_EQ(told.Latest(1), of0);
  // Instance 1 stops: once the coordinator declares it dead, instance 0's backend is told.
  instances[1]->Shutdown();
  deadline = absl::Now() + absl::Seconds(20);
  while (!told.Latest(0).empty() && absl::Now() < deadline) {
    absl::SleepFor(absl::Milliseconds(10));
  }
  EXPECT_TRUE(told.Latest(0).empty());
}

// The host backend, every engine step `pause` slower: a request of many steps takes far longer
// than the coordinator's attempt timeout.
class SlowBackend final : public ForwardingBackend {
 public:
  SlowBackend(std::unique_ptr<InstanceBackend> inner, absl::Duration pause)
      : ForwardingBackend(std::move(inner)), pause_(pause) {}
  std::vector<std::pair<RequestId, absl::StatusOr<engine::GenerateResult>>> Step() override {
    absl::SleepFor(pause_);
    return ForwardingBackend::Step();
  }

 private:
  const absl::Duration pause_;
};

// The attempt timeout measures the instance's silence, not a request's length: an instance that
// reports a long request's progress (tokens or not) every progress_interval keeps its attempt;
// one that stays silent past the attempt timeout loses it.
TEST(ClusterBackendTest, ALongRequestKeepsItsAttemptWhileItsInstanceReportsProgress) {
  auto model = engine::LlamaModel::Load(TestModelDir());
  ASSERT_TRUE(model.ok()) << model.status();
  auto reference = engine::Engine::Create(model->get(), {.use_pool = false});
  ASSERT_TRUE(reference.ok()) << reference.status();
  std::vector<int32_t> prompt(37);
  for (int i = 0; i < 37; ++i) prompt[static_cast<size_t>(i)] = (i * 29 + 5) % 512;
  constexpr int32_t kTokens = 32;
  auto want = (*reference)->Generate(prompt, kTokens);
  ASSERT_TRUE(want.ok()) << want.status();
  const std::string secret = *transport::GenerateClusterSecret();
  CoordinatorOptions co = SmallClusterOptions((*model)->config(), secret);
  co.lake_instances = 1;
  co.attempt_timeout = absl::Seconds(1);
  co.max_attempts = 2;
  auto coordinator = Coordinator::Create(co);
  ASSERT_TRUE(coordinator.ok()) << coordinator.status();
  const attention::KvSlotLayout layout =
      engine::PoolSlotLayout((*model)->config(), co.segment_tokens, attention::KvDtype::kFloat32);
  // kTokens steps of at least 100 ms: over 3 s a request, against 1 s of silence allowed.
  const absl::Duration pause = absl::Milliseconds(100);
  for (const absl::Duration interval : {absl::Milliseconds(100), absl::Seconds(30)}) {
    SCOPED_TRACE(absl::StrCat("progress_interval ", absl::FormatDuration(interval)));
    InstanceServerOptions o{.name = "slow",
                            .preferred_id = 0,
                            .coordinator_port = (*coordinator)->grpc_port(),
                            .slots = 256,
                            .cluster_secret = secret};
    o.progress_interval = interval;
    const BackendFactory host = HostBackendFactory({.model = model->get(),
                                                    .layout = layout,
                                                    .slots = o.slots,
                                                    .segment_tokens = o.segment_tokens,
                                                    .namespace_name = o.namespace_name});
    auto server = InstanceServer::Create(
        {.layout = layout,
         .context_tokens = (*model)->config().max_position_embeddings,
         .factory =
             [&](const BackendContext& ctx) -> absl::StatusOr<std::unique_ptr<InstanceBackend>> {
           absl::StatusOr<std::unique_ptr<InstanceBackend>> inner = host(ctx);
           if (!inner.ok()) return inner.status();
           return std::make_unique<SlowBackend>(*std::move(inner), pause);
         }},
        o);
    ASSERT_TRUE(server.ok()) << server.status();
    const absl::Time deadline = absl::Now() + absl::Seconds(20);
    while ((*coordinator)->LiveInstances() != 1 && absl::Now() < deadline) {
      absl::SleepFor(absl::Milliseconds(10));
    }
    ASSERT_EQ((*coordinator)->LiveInstances(), 1);
    const absl::Time start = absl::Now();
    auto r = (*coordinator)->Complete({.prompt = prompt, .max_tokens = kTokens});
    if (interval < co.attempt_timeout) {
      ASSERT_TRUE(r.ok()) << r.status();
      EXPECT_EQ(r->tokens, want->tokens);
      EXPECT_EQ(r->attempts, 1);
      EXPECT_GT(absl::Now() - start, 2 * co.attempt_timeout);
    } else {
      // Silent for longer than the attempt timeout: both attempts are given up.
      ASSERT_FALSE(r.ok()) << "served in " << r->attempts << " attempts";
      EXPECT_NE(r.status().message().find("nothing heard for"), std::string::npos) << r.status();
    }
    (*server)->Shutdown();
    // The next server takes the same name once the coordinator saw this one die.
    const absl::Time gone = absl::Now() + absl::Seconds(20);
    while ((*coordinator)->LiveInstances() != 0 && absl::Now() < gone) {
      absl::SleepFor(absl::Milliseconds(10));
    }
  }
}

}  // namespace
}  // namespace tokenlake::service
