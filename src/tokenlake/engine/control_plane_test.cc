// lake::ControlPlane::ReleaseAndPlan (the fused step between two iterations of a request) and
// PlanBatch over a real lake, and the engine loop's use of the control plane: one PlanBatch call
// per iteration, one confirm-and-release PlanBatch at the end, every copy it stored confirmed
// (none dropped), and no pin left behind and no second release when the batch call fails,
// whichever part of it was applied. (The remote implementation is checked against these
// semantics in service/lake_rpc_test.cc.)
#include "tokenlake/lake/control_plane.h"

#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>
#include <tuple>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/instance_pool.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/index/segment_id.h"

namespace tokenlake::engine {
namespace {

std::string ModelDir() {
  const char* d = std::getenv("TOKENLAKE_SOURCE_DIR");
  return std::string(d != nullptr ? d : ".") + "/tests/fixtures/llama_tiny/model";
}

constexpr int32_t kS = 16;

lake::LakeOptions LakeOptionsFor(const LlamaConfig& c, int32_t instances) {
  lake::LakeOptions lo;
  lo.num_instances = instances;
  lo.segment_tokens = kS;
  lo.slots_per_instance = 64;
  lo.heavy_hitter.num_instances = instances;
  lo.model = plan::ModelShape{.num_layers = c.num_layers,
                              .num_heads = c.num_heads,
                              .num_kv_heads = c.num_kv_heads,
                              .head_dim = c.head_dim,
                              .dtype_bytes = 4};
  return lo;
}

// The full-segment keys of `tokens`.
std::vector<index::SegmentKey> Keys(const std::vector<int32_t>& tokens) {
  const size_t full = tokens.size() / kS * kS;
  auto k = index::ComputeSegmentKeys(index::NamespaceSalt("tokenlake"),
                                     absl::MakeConstSpan(tokens).subspan(0, full), kS);
  EXPECT_TRUE(k.ok()) << k.status();
  return k.ok() ? *k : std::vector<index::SegmentKey>{};
}

std::vector<int32_t> Tokens(int32_t n, int32_t salt) {
  std::vector<int32_t> t;
  for (int32_t i = 0; i < n; ++i) t.push_back((i * 37 + salt * 101 + 11) % 512);
  return t;
}

// The confirmations of every copy `commit` placed for `request` (its data stored at once).
std::vector<lake::StoreConfirmation> Confirmations(RequestId request,
                                                   const lake::CommitResult& commit) {
  std::vector<lake::StoreConfirmation> out;
  for (const lake::StoredReplica& st : commit.stored) {
    out.push_back({request, st.segment, st.instance});
  }
  return out;
}

class ControlPlaneTest : public ::testing::Test {
 protected:
  void SetUp() override {
    auto m = LlamaModel::Load(ModelDir());
    ASSERT_TRUE(m.ok()) << m.status();
    model_ = std::move(*m);
    auto lk = lake::Lake::Create(LakeOptionsFor(model_->config(), 2), &clock_);
    ASSERT_TRUE(lk.ok()) << lk.status();
    lake_ = std::move(*lk);
    local_ = std::make_unique<lake::LocalControlPlane>(lake_.get(), &clock_);
  }

  // A prefill request over the first `n` tokens of Tokens(n, salt).
  lake::IterationRequest Prefill(RequestId id, int32_t n, int32_t salt) {
    return {.request = id,
            .keys = Keys(Tokens(n, salt)),
            .max_cached_segments = (n - 1) / kS,
            .end_tokens = n,
            .prefill = true,
            .computed_tokens = 0,
            .preferred_instance = InstanceId(0),
            .count_hits = true};
  }

  ManualClock clock_{1};
  std::unique_ptr<LlamaModel> model_;
  std::unique_ptr<lake::Lake> lake_;
  std::unique_ptr<lake::LocalControlPlane> local_;
};

TEST_F(ControlPlaneTest, ReleaseAndPlanReleasesThenPlansAndPinsTheNextIteration) {
  auto first = local_->PlanIteration(Prefill(RequestId(1), 40, 0));
  ASSERT_TRUE(first.ok()) << first.status();
  auto committed = local_->Commit(RequestId(1), first->new_segments);
  ASSERT_TRUE(committed.ok());
  ASSERT_EQ(committed->stored.size(), 2u);  // 40 tokens: two full segments
  EXPECT_EQ(lake_->Stats().pinned_segments, 2);
  // Pending until the data plane says they are stored (here: at once).
  EXPECT_EQ(lake_->Stats().pending_copies, 2);
  ASSERT_TRUE(local_->ConfirmStored(Confirmations(RequestId(1), *committed)).ok());
  EXPECT_EQ(lake_->Stats().pending_copies, 0);
  // Iteration 2 of request 1 (decode at 41 tokens): the two committed segments are cached.
  lake::IterationRequest next = Prefill(RequestId(1), 41, 0);
  next.prefill = false;
  next.computed_tokens = 40;
  next.max_cached_segments = 40 / kS;
  next.count_hits = false;
  auto fused = local_->ReleaseAndPlan(RequestId(1), next);
  ASSERT_TRUE(fused.ok()) << fused.status();
  EXPECT_EQ(fused->cached_tokens, 32);
  EXPECT_EQ(fused->new_tokens, 1);
  EXPECT_EQ(fused->segments.size(), 2u);
  // Pinned again by the new iteration (admitted), and released once at the end.
  EXPECT_EQ(lake_->Stats().active_requests, 1);
  EXPECT_EQ(lake_->Stats().pinned_segments, 2);
  ASSERT_TRUE(local_->Release(RequestId(1)).ok());
  EXPECT_EQ(lake_->Stats().active_requests, 0);
  EXPECT_EQ(lake_->Stats().pinned_segments, 0);
}

TEST_F(ControlPlaneTest, ReleaseAndPlanOfAnInactiveRequestChangesNothing) {
  auto r = local_->ReleaseAndPlan(RequestId(9), Prefill(RequestId(9), 40, 0));
  EXPECT_EQ(r.status().code(), absl::StatusCode::kNotFound) << r.status();
  EXPECT_EQ(lake_->Stats().active_requests, 0);
  EXPECT_EQ(lake_->Stats().admitted_requests, 0);
}

TEST_F(ControlPlaneTest, ReleaseAndPlanWhosePlanFailsLeavesTheRequestReleased) {
  for (int32_t kase = 0; kase < 2; ++kase) {
    SCOPED_TRACE(kase == 0 ? "bad next request" : "next id already active");
    ASSERT_TRUE(local_->PlanIteration(Prefill(RequestId(1), 40, 0)).ok());
    ASSERT_TRUE(local_->PlanIteration(Prefill(RequestId(2), 40, 1)).ok());
    lake::IterationRequest next = Prefill(RequestId(1), 40, 0);
    if (kase == 0) {
      next.end_tokens = 0;  // InvalidArgument
    } else {
      next.request = RequestId(2);  // AlreadyExists
    }
    auto r = local_->ReleaseAndPlan(RequestId(1), next);
    EXPECT_EQ(r.status().code(),
              kase == 0 ? absl::StatusCode::kInvalidArgument : absl::StatusCode::kAlreadyExists)
        << r.status();
    // Request 1 is released (a second Release finds nothing), request 2 untouched.
    EXPECT_EQ(local_->Release(RequestId(1)).code(), absl::StatusCode::kNotFound);
    EXPECT_EQ(lake_->Stats().active_requests, 1);
    ASSERT_TRUE(local_->Release(RequestId(2)).ok());
    EXPECT_EQ(lake_->Stats().active_requests, 0);
    EXPECT_EQ(lake_->Stats().pinned_segments, 0);
  }
}

// PlanBatch: finished ids released, each planned request's own pins released just before it is
// planned again, a request whose own release fails (not active) not planned, other errors per
// request; prefill chunks cut after the cached prefix; TryAdmit defers without pinning.
TEST_F(ControlPlaneTest, PlanBatchReleasesPlansAndReportsPerRequest) {
  ASSERT_TRUE(local_->PlanIteration(Prefill(RequestId(1), 40, 0)).ok());
  ASSERT_TRUE(local_->PlanIteration(Prefill(RequestId(2), 40, 1)).ok());
  EXPECT_EQ(lake_->Stats().active_requests, 2);
  lake::IterationRequest bad = Prefill(RequestId(4), 40, 2);
  bad.end_tokens = 0;
  const std::vector<RequestId> release = {RequestId(2), RequestId(1), RequestId(3)};
  const std::vector<lake::IterationRequest> requests = {Prefill(RequestId(1), 40, 0),
                                                        Prefill(RequestId(3), 40, 3), bad};
  auto r = local_->PlanBatch({}, release, requests, 0);
  ASSERT_TRUE(r.ok()) << r.status();
  ASSERT_EQ(r->size(), 3u);
  EXPECT_TRUE((*r)[0].status.ok()) << (*r)[0].status;             // released and planned again
  EXPECT_EQ((*r)[1].status.code(), absl::StatusCode::kNotFound);  // 3 was not active
  EXPECT_EQ((*r)[2].status.code(), absl::StatusCode::kInvalidArgument);
  // Request 2 (finished) released, 1 active again, 3 and 4 not admitted.
  EXPECT_EQ(lake_->Stats().active_requests, 1);
  ASSERT_TRUE(local_->Release(RequestId(1)).ok());

  // A prefill chunk: the whole prompt asked for, cut after the cached prefix.
  auto first = local_->PlanIteration(Prefill(RequestId(5), 40, 5));
  ASSERT_TRUE(first.ok());
  auto committed = local_->Commit(RequestId(5), first->new_segments);
  ASSERT_TRUE(committed.ok());
  // Confirmed with the release, in one call (what a loop that runs dry sends).
  auto flushed = local_->PlanBatch(Confirmations(RequestId(5), *committed), {RequestId(5)}, {}, 0);
  ASSERT_TRUE(flushed.ok()) << flushed.status();
  EXPECT_TRUE(flushed->empty());
  EXPECT_EQ(lake_->Stats().active_requests, 0);
  EXPECT_EQ(lake_->Stats().pending_copies, 0);
  lake::IterationRequest chunked = Prefill(RequestId(6), 40, 5);
  chunked.max_new_tokens = 5;
  auto c = local_->PlanIteration(chunked);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ(c->cached_tokens, 32);
  EXPECT_EQ(c->end_tokens, 37);
  EXPECT_EQ(c->new_tokens, 5);
  EXPECT_EQ(c->num_keys, 2);
  ASSERT_TRUE(local_->Release(RequestId(6)).ok());
  lake::IterationRequest first_chunk = Prefill(RequestId(7), 40, 7);
  first_chunk.max_new_tokens = 20;
  auto fc = local_->PlanIteration(first_chunk);
  ASSERT_TRUE(fc.ok()) << fc.status();
  EXPECT_EQ(fc->cached_tokens, 0);
  EXPECT_EQ(fc->end_tokens, 20);
  EXPECT_EQ(fc->num_keys, 1);  // the chunk's one full segment
  EXPECT_EQ(fc->new_segments.size(), 1u);
  ASSERT_TRUE(local_->Release(RequestId(7)).ok());
  EXPECT_EQ(lake_->Stats().pinned_segments, 0);
}

TEST(FailedOnTheWireTest, OnlyTransportCodes) {
  EXPECT_TRUE(lake::FailedOnTheWire(absl::UnavailableError("x")));
  EXPECT_TRUE(lake::FailedOnTheWire(absl::DeadlineExceededError("x")));
  EXPECT_TRUE(lake::FailedOnTheWire(absl::CancelledError("x")));
  EXPECT_FALSE(lake::FailedOnTheWire(absl::OkStatus()));
  EXPECT_FALSE(lake::FailedOnTheWire(absl::NotFoundError("x")));
  EXPECT_FALSE(lake::FailedOnTheWire(absl::InvalidArgumentError("x")));
  EXPECT_FALSE(lake::FailedOnTheWire(absl::AlreadyExistsError("x")));
}

// ---- the engine loop over a control plane that counts calls and injects failures ----

// How the scripted PlanBatch call fails.
enum class Fault {
  kNone,
  kLakeErrorAfterRelease,    // the releases applied, every plan answers InvalidArgument
  kWireBeforeAnything,       // Unavailable, nothing applied
  kWireAfterRelease,         // DeadlineExceeded, the releases applied
  kWireAfterReleaseAndPlan,  // DeadlineExceeded, releases and plans applied
};

class ScriptedControlPlane final : public lake::ControlPlane {
 public:
  explicit ScriptedControlPlane(lake::LocalControlPlane* inner) : inner_(inner) {}
  int32_t num_instances() const override { return inner_->num_instances(); }
  absl::StatusOr<lake::IterationPlan> PlanIteration(
      const lake::IterationRequest& request) override {
    ++plans;
    return inner_->PlanIteration(request);
  }
  absl::StatusOr<lake::CommitResult> Commit(
      RequestId request, absl::Span<const plan::NewSegmentPlacement> placements) override {
    ++commits;
    return inner_->Commit(request, placements);
  }
  absl::Status ConfirmStored(absl::Span<const lake::StoreConfirmation> copies) override {
    return inner_->ConfirmStored(copies);
  }
  absl::Status Release(RequestId request) override {
    ++releases;
    return inner_->Release(request);
  }
  absl::StatusOr<lake::IterationPlan> ReleaseAndPlan(RequestId release,
                                                     const lake::IterationRequest& next) override {
    ++fused;
    return inner_->ReleaseAndPlan(release, next);
  }
  absl::StatusOr<std::vector<lake::BatchPlanEntry>> PlanBatch(
      absl::Span<const lake::StoreConfirmation> confirm, absl::Span<const RequestId> release,
      absl::Span<const lake::IterationRequest> requests, int64_t token_budget) override {
    if (requests.empty()) {
      // Confirm and release only (a loop that ran dry, or cleaning up after a failure).
      ++release_calls;
      return inner_->PlanBatch(confirm, release, requests, token_budget);
    }
    ++batches;
    if (batches != fail_at || fault == Fault::kNone) {
      return inner_->PlanBatch(confirm, release, requests, token_budget);
    }
    // Where a fault says the releases were applied, so were the confirmations before them.
    switch (fault) {
      case Fault::kLakeErrorAfterRelease: {
        EXPECT_TRUE(inner_->ConfirmStored(confirm).ok());
        for (RequestId r : release) EXPECT_TRUE(inner_->Release(r).ok());
        std::vector<lake::BatchPlanEntry> out(requests.size());
        for (lake::BatchPlanEntry& e : out) {
          e.status = absl::InvalidArgumentError("scripted failure");
        }
        return out;
      }
      case Fault::kWireBeforeAnything:
        return absl::UnavailableError("scripted: not sent");
      case Fault::kWireAfterRelease:
        EXPECT_TRUE(inner_->ConfirmStored(confirm).ok());
        for (RequestId r : release) EXPECT_TRUE(inner_->Release(r).ok());
        return absl::DeadlineExceededError("scripted: reply lost after the release");
      case Fault::kWireAfterReleaseAndPlan:
        EXPECT_TRUE(inner_->PlanBatch(confirm, release, requests, token_budget).ok());
        return absl::DeadlineExceededError("scripted: reply lost after the plan");
      case Fault::kNone:
        break;
    }
    return absl::InternalError("unreachable");
  }

  int32_t batches = 0;        // PlanBatch calls with requests (iterations)
  int32_t release_calls = 0;  // PlanBatch calls without requests (confirm and release)
  int32_t plans = 0, commits = 0, releases = 0, fused = 0;
  int32_t fail_at = 0;  // the batch call (1-based) that fails
  Fault fault = Fault::kNone;

 private:
  lake::LocalControlPlane* inner_;
};

class EngineControlCallsTest : public ControlPlaneTest {
 protected:
  void SetUp() override {
    ControlPlaneTest::SetUp();
    const LlamaConfig& c = model_->config();
    auto pool = InstancePool::Create({.num_instances = 2,
                                      .layout = {.num_layers = c.num_layers,
                                                 .segment_tokens = kS,
                                                 .num_kv_heads = c.num_kv_heads,
                                                 .head_dim = c.head_dim,
                                                 .dtype = attention::KvDtype::kFloat32},
                                      .num_heads = c.num_heads,
                                      .slots_per_instance = 64});
    ASSERT_TRUE(pool.ok()) << pool.status();
    pool_ = std::move(*pool);
    scripted_ = std::make_unique<ScriptedControlPlane>(local_.get());
    auto eng = Engine::CreateOverPool(
        model_.get(), {.segment_tokens = kS},
        {.control_plane = scripted_.get(), .pool = pool_.get(), .compute_instance = InstanceId(0)});
    ASSERT_TRUE(eng.ok()) << eng.status();
    engine_ = std::move(*eng);
    auto ref = Engine::Create(model_.get(), {.use_pool = false});
    ASSERT_TRUE(ref.ok());
    reference_ = std::move(*ref);
  }

  std::vector<int32_t> Expected(const std::vector<int32_t>& prompt, int32_t n) {
    auto r = reference_->Generate(prompt, n);
    EXPECT_TRUE(r.ok());
    return r.ok() ? r->tokens : std::vector<int32_t>{};
  }

  std::unique_ptr<InstancePool> pool_;
  std::unique_ptr<ScriptedControlPlane> scripted_;
  std::unique_ptr<Engine> engine_;
  std::unique_ptr<Engine> reference_;
};

TEST_F(EngineControlCallsTest, OneBatchPlanCallPerIterationAndOneReleaseAtTheEnd) {
  int64_t request = 1;
  for (int32_t max_new : {1, 2, 5, 17}) {
    SCOPED_TRACE(testing::Message() << "max_new_tokens=" << max_new);
    const std::vector<int32_t> prompt = Tokens(40, max_new);
    scripted_->plans = scripted_->commits = scripted_->releases = scripted_->fused = 0;
    scripted_->batches = scripted_->release_calls = 0;
    const lake::LakeStats before = lake_->Stats();
    auto r = engine_->Generate(RequestId(request++), prompt, max_new);
    ASSERT_TRUE(r.ok()) << r.status();
    EXPECT_EQ(r->tokens, Expected(prompt, max_new));
    // One PlanBatch per iteration (the prefill, then one per decode; each releases the
    // iteration before), and the last iteration's pins released at the end.
    EXPECT_EQ(scripted_->batches, max_new);
    EXPECT_EQ(scripted_->plans, 0);
    EXPECT_EQ(scripted_->fused, 0);
    EXPECT_EQ(scripted_->releases, 0);       // releases travel in PlanBatch calls
    EXPECT_EQ(scripted_->release_calls, 1);  // confirm + release when the loop runs dry
    EXPECT_EQ(scripted_->commits, max_new);  // lake::LocalControlPlane commits every iteration
    const lake::LakeStats after = lake_->Stats();
    EXPECT_EQ(after.active_requests, 0);
    EXPECT_EQ(after.pinned_segments, 0);
    // Every copy the engine stored was confirmed: none pending, none dropped.
    EXPECT_EQ(after.pending_copies, 0);
    EXPECT_EQ(after.dropped_pending_copies, before.dropped_pending_copies);
    EXPECT_EQ(after.confirmed_copies - before.confirmed_copies, r->stored_segments);
    EXPECT_EQ(after.segments, before.segments + r->stored_segments);
    ASSERT_TRUE(lake_->CheckIntegrity().ok());
  }
}

class EngineFusedFaultTest : public EngineControlCallsTest,
                             public ::testing::WithParamInterface<std::tuple<Fault, int32_t>> {};

TEST_P(EngineFusedFaultTest, FailedBatchCallLeavesNoPinAndReleasesOnlyWhenUnsure) {
  const auto [fault, fail_at] = GetParam();
  SCOPED_TRACE(testing::Message() << "fault=" << static_cast<int>(fault) << " fail_at=" << fail_at);
  scripted_->fault = fault;
  scripted_->fail_at = fail_at;
  const std::vector<int32_t> prompt = Tokens(40, 3);
  auto r = engine_->Generate(RequestId(5), prompt, 6);
  ASSERT_FALSE(r.ok());
  EXPECT_EQ(r.status().code(),
            fault == Fault::kLakeErrorAfterRelease ? absl::StatusCode::kInvalidArgument
            : fault == Fault::kWireBeforeAnything  ? absl::StatusCode::kUnavailable
                                                   : absl::StatusCode::kDeadlineExceeded)
      << r.status();
  EXPECT_EQ(scripted_->batches, fail_at);
  // After an answered error nothing is pinned, so no release call; after a wire failure one
  // best-effort confirm-and-release call.
  EXPECT_EQ(scripted_->release_calls, fault == Fault::kLakeErrorAfterRelease ? 0 : 1);
  EXPECT_EQ(scripted_->releases, 0);
  EXPECT_EQ(lake_->Stats().pending_copies, 0);
  EXPECT_EQ(lake_->Stats().active_requests, 0);
  EXPECT_EQ(lake_->Stats().pinned_segments, 0);
  ASSERT_TRUE(lake_->CheckIntegrity().ok());
  // The lake is intact: the same request with another id is served correctly.
  scripted_->fault = Fault::kNone;
  auto again = engine_->Generate(RequestId(6), prompt, 6);
  ASSERT_TRUE(again.ok()) << again.status();
  EXPECT_EQ(again->tokens, Expected(prompt, 6));
  EXPECT_EQ(lake_->Stats().active_requests, 0);
}

INSTANTIATE_TEST_SUITE_P(
    Faults, EngineFusedFaultTest,
    ::testing::Combine(::testing::Values(Fault::kLakeErrorAfterRelease, Fault::kWireBeforeAnything,
                                         Fault::kWireAfterRelease, Fault::kWireAfterReleaseAndPlan),
                       ::testing::Values(1, 5)));

}  // namespace
}  // namespace tokenlake::engine
