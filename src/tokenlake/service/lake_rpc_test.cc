// The lake's gRPC messages (lake_rpc.h): every field of the engine's control-plane types
// survives a round trip through its message (including "none" instance and parent ids), and
// status codes and the protocol's enums map both ways. RemoteControlPlane without a coordinator
// fails with a clear Unavailable / DeadlineExceeded, never a hang or a crash. Against a real
// coordinator, RemoteControlPlane's ReleaseAndPlan (one RPC) gives the same plans, commit results,
// errors and pins as Release + PlanIteration on a reference lake, and an empty Commit makes no RPC.
// An IterationLoop whose requests keep their KV tails in the pool runs step for step the same
// over the coordinator as over a local lake.
#include "tokenlake/service/lake_rpc.h"

#include <iostream>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/time/clock.h"
#include "gmock/gmock.h"
#include "gtest/gtest.h"
#include "tokenlake/engine/iteration_loop.h"
#include "tokenlake/engine/iteration_loop_testing.h"
#include "tokenlake/index/segment_id.h"
#include "tokenlake/service/coordinator.h"

namespace tokenlake::service {
namespace {

TEST(LakeRpcTest, IterationRequestRoundTrips) {
  lake::IterationRequest in{.request = RequestId(77),
                            .keys = {{SegmentId(5), 16}, {SegmentId(6), 3}},
                            .max_cached_segments = 1,
                            .end_tokens = 19,
                            .prefill = false,
                            .computed_tokens = 18,
                            .preferred_instance = InstanceId(2),
                            .count_hits = false,
                            .max_new_tokens = 64,
                            .try_admit = true,
                            .tail_in_pool = true};
  v1::PlanIterationRequest wire;
  ToProto(in, &wire);
  v1::PlanIterationRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(wire.SerializeAsString()));
  const lake::IterationRequest out = FromProto(parsed);
  EXPECT_EQ(out.request, in.request);
  ASSERT_EQ(out.keys.size(), 2u);
  EXPECT_EQ(out.keys[1].id, SegmentId(6));
  EXPECT_EQ(out.keys[1].num_tokens, 3);
  EXPECT_EQ(out.max_cached_segments, 1);
  EXPECT_EQ(out.end_tokens, 19);
  EXPECT_FALSE(out.prefill);
  EXPECT_EQ(out.computed_tokens, 18);
  EXPECT_EQ(out.preferred_instance, InstanceId(2));
  EXPECT_FALSE(out.count_hits);
  EXPECT_EQ(out.max_new_tokens, 64);
  EXPECT_TRUE(out.try_admit);
  EXPECT_TRUE(out.tail_in_pool);
  in.preferred_instance = InstanceId();
  wire.Clear();
  ToProto(in, &wire);
  EXPECT_EQ(wire.preferred_instance(), -1);
  EXPECT_FALSE(FromProto(wire).preferred_instance.valid());
}

TEST(LakeRpcTest, PlanAndCommitRoundTrip) {
  lake::IterationPlan plan;
  plan.num_keys = 3;
  plan.cached_tokens = 32;
  plan.new_tokens = 7;
  plan.compute_instance = InstanceId(1);
  plan.end_tokens = 39;
  plan.segments = {{SegmentId(1), 16, InstanceId(0), plan::HolderAction::kMoveQueries},
                   {SegmentId(2), 16, InstanceId(1), plan::HolderAction::kLocal},
                   {SegmentId(3), 16, InstanceId(2), plan::HolderAction::kPullKv}};
  plan.new_segments = {
      {RequestId(9), SegmentId(4), SegmentId(), 16, InstanceId(1), InstanceId(0)},
      {RequestId(9), SegmentId(5), SegmentId(4), 16, InstanceId(1), InstanceId(1)}};
  plan.tail_slots = {InstanceId(1), InstanceId(0), InstanceId(1)};
  plan.evicted = {{SegmentId(11), InstanceId(0)}};
  plan.evicted_at = 987654321012ULL;
  v1::PlanIterationReply wire;
  ToProto(plan, &wire);
  const lake::IterationPlan back = FromProto(wire, RequestId(9));
  EXPECT_EQ(back.num_keys, 3);
  EXPECT_EQ(back.cached_tokens, 32);
  EXPECT_EQ(back.new_tokens, 7);
  EXPECT_EQ(back.compute_instance, InstanceId(1));
  EXPECT_EQ(back.segments, plan.segments);
  EXPECT_EQ(back.new_segments, plan.new_segments);
  EXPECT_FALSE(back.new_segments[0].parent.valid());
  EXPECT_EQ(back.end_tokens, 39);
  EXPECT_TRUE(back.admitted);
  EXPECT_EQ(back.tail_slots, plan.tail_slots);
  EXPECT_EQ(back.evicted, plan.evicted);
  EXPECT_EQ(back.evicted_at, 987654321012ULL);
  lake::IterationPlan deferred;
  deferred.admitted = false;
  wire.Clear();
  ToProto(deferred, &wire);
  EXPECT_TRUE(wire.deferred());
  EXPECT_FALSE(FromProto(wire, RequestId(9)).admitted);

  lake::CommitResult c;
  c.stored = {{SegmentId(4), InstanceId(0)}};
  c.deduplicated = {SegmentId(5)};
  c.not_stored = {SegmentId(6)};
  c.pending_elsewhere = {SegmentId(8), SegmentId(9)};
  c.in_place = {SegmentId(4)};
  c.evicted = {{SegmentId(7), InstanceId(2)}};
  c.moved_bytes = 4096;
  c.sequence = 12345678901ULL;
  v1::CommitReply cw;
  ToProto(c, &cw);
  const lake::CommitResult cb = FromProto(cw);
  EXPECT_EQ(cb.stored, c.stored);
  EXPECT_EQ(cb.deduplicated, c.deduplicated);
  EXPECT_EQ(cb.not_stored, c.not_stored);
  EXPECT_EQ(cb.pending_elsewhere, c.pending_elsewhere);
  EXPECT_EQ(cb.in_place, c.in_place);
  EXPECT_EQ(cb.evicted, c.evicted);
  EXPECT_EQ(cb.moved_bytes, 4096);
  EXPECT_EQ(cb.sequence, 12345678901ULL);

  const lake::StoreConfirmation confirm{RequestId(9), SegmentId(4), InstanceId(1)};
  v1::StoreConfirmation sw;
  ToProto(confirm, &sw);
  EXPECT_EQ(FromProto(sw), confirm);
}

TEST(LakeRpcTest, StatusCodesMapBothWays) {
  EXPECT_TRUE(ToGrpc(absl::OkStatus()).ok());
  const grpc::Status g = ToGrpc(absl::NotFoundError("Release: request 3 is not active"));
  EXPECT_EQ(g.error_code(), grpc::StatusCode::NOT_FOUND);
  const absl::Status back = FromGrpc(g, "Release");
  EXPECT_EQ(back.code(), absl::StatusCode::kNotFound);
  EXPECT_THAT(back.message(), ::testing::HasSubstr("request 3 is not active"));
  EXPECT_THAT(back.message(), ::testing::HasSubstr("Release"));
}

TEST(LakeRpcTest, ProtocolEnumsMapBothWays) {
  for (plan::HolderAction a : {plan::HolderAction::kLocal, plan::HolderAction::kMoveQueries,
                               plan::HolderAction::kPullKv}) {
    EXPECT_EQ(FromProto(ToProto(a)), a) << static_cast<int>(a);
  }
  EXPECT_EQ(ToProto(plan::HolderAction::kPullKv), v1::HOLDER_ACTION_PULL_KV);
  EXPECT_EQ(FromProto(static_cast<v1::HolderAction>(7)), plan::HolderAction::kMoveQueries);
  for (int c = 0; c <= 16; ++c) {
    const auto code = static_cast<absl::StatusCode>(c);
    EXPECT_EQ(FromProto(ToProto(code)), code) << c;
    EXPECT_EQ(static_cast<int>(ToProto(code)), c);
  }
  EXPECT_EQ(ToProto(absl::StatusCode::kNotFound), v1::STATUS_CODE_NOT_FOUND);
  EXPECT_EQ(FromProto(static_cast<v1::StatusCode>(99)), absl::StatusCode::kUnknown);
  EXPECT_EQ(FromProto(static_cast<v1::StatusCode>(-1)), absl::StatusCode::kUnknown);
}

// The enum fields were int32 before: both are varints on the wire, so bytes written by either
// schema read the same in the other.
TEST(LakeRpcTest, EnumFieldsReadTheBytesOfTheirFormerInt32Form) {
  // SegmentAssignment {action (field 4) = 2}: tag (4 << 3 | varint) = 0x20, value 2.
  v1::SegmentAssignment s;
  ASSERT_TRUE(s.ParseFromString(std::string("\x20\x02", 2)));
  EXPECT_EQ(s.action(), v1::HOLDER_ACTION_PULL_KV);
  EXPECT_EQ(s.SerializeAsString(), std::string("\x20\x02", 2));
  // PlanBatchEntry {status_code (field 1) = 5}; RebalanceAction {kind (field 1) = 1}.
  v1::PlanBatchEntry e;
  ASSERT_TRUE(e.ParseFromString(std::string("\x08\x05", 2)));
  EXPECT_EQ(e.status_code(), v1::STATUS_CODE_NOT_FOUND);
  v1::RebalanceAction r;
  ASSERT_TRUE(r.ParseFromString(std::string("\x08\x01", 2)));
  EXPECT_EQ(r.kind(), v1::REBALANCE_KIND_REPLICATE);
  // An int32 -1 (ten varint bytes) stays -1: an unknown value, kept, not a parse error.
  ASSERT_TRUE(s.ParseFromString(std::string("\x20\xff\xff\xff\xff\xff\xff\xff\xff\xff\x01", 11)));
  EXPECT_EQ(static_cast<int>(s.action()), -1);
  EXPECT_EQ(FromProto(s.action()), plan::HolderAction::kMoveQueries);
}

TEST(LakeRpcTest, RemoteControlPlaneWithoutACoordinatorFailsClearly) {
  EXPECT_EQ(RemoteControlPlane::Create({.coordinator_port = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(RemoteControlPlane::Create({.coordinator_port = 1, .num_instances = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  // Port 1 on loopback: nothing listens there.
  auto cp = RemoteControlPlane::Create(
      {.coordinator_port = 1, .num_instances = 2, .call_timeout = absl::Milliseconds(300)});
  ASSERT_TRUE(cp.ok());
  auto plan = (*cp)->PlanIteration({.request = RequestId(1), .end_tokens = 1});
  ASSERT_FALSE(plan.ok());
  EXPECT_TRUE(plan.status().code() == absl::StatusCode::kUnavailable ||
              plan.status().code() == absl::StatusCode::kDeadlineExceeded)
      << plan.status();
  EXPECT_FALSE((*cp)->Release(RequestId(1)).ok());
}

// The value of the sample line `sample value` (sample with its labels) in the metrics text,
// -1 if absent.
double Metric(const std::string& text, const std::string& sample) {
  const size_t pos = text.find("\n" + sample + " ");
  if (pos == std::string::npos) return -1;
  return std::stod(text.substr(pos + sample.size() + 2));
}

void ExpectSamePlan(const lake::IterationPlan& a, const lake::IterationPlan& b) {
  EXPECT_EQ(a.num_keys, b.num_keys);
  EXPECT_EQ(a.cached_tokens, b.cached_tokens);
  EXPECT_EQ(a.new_tokens, b.new_tokens);
  EXPECT_EQ(a.compute_instance, b.compute_instance);
  EXPECT_EQ(a.segments, b.segments);
  EXPECT_EQ(a.new_segments, b.new_segments);
  EXPECT_EQ(a.end_tokens, b.end_tokens);
  EXPECT_EQ(a.admitted, b.admitted);
  EXPECT_EQ(a.tail_slots, b.tail_slots);
  EXPECT_EQ(a.evicted, b.evicted);
  // Change numbers count the lake's commits, and an empty one is no RPC (RemoteControlPlane)
  // but a change locally: whether there is one is what both lakes agree on.
  EXPECT_EQ(a.evicted_at == 0, b.evicted_at == 0);
}

void ExpectSameCommit(const lake::CommitResult& a, const lake::CommitResult& b) {
  EXPECT_EQ(a.stored, b.stored);
  EXPECT_EQ(a.deduplicated, b.deduplicated);
  EXPECT_EQ(a.not_stored, b.not_stored);
  EXPECT_EQ(a.pending_elsewhere, b.pending_elsewhere);
  EXPECT_EQ(a.in_place, b.in_place);
  EXPECT_EQ(a.evicted, b.evicted);
  EXPECT_EQ(a.moved_bytes, b.moved_bytes);
  EXPECT_EQ(a.sequence, b.sequence);
}

// A coordinator whose two instances registered (empty, no data port: none is routable, so it
// redirects nothing; no heartbeats, with a dead_after long enough that none is declared dead
// and no reconciliation runs) against a lake built with the same options, driven through
// LocalControlPlane with the plain calls.
class FusedCallTest : public ::testing::TestWithParam<std::tuple<uint32_t, int32_t>> {
 protected:
  void SetUp() override {
    options_.lake_instances = 2;
    options_.segment_tokens = kS;
    options_.slots_per_instance = std::get<1>(GetParam());
    options_.model = {
        .num_layers = 2, .num_heads = 4, .num_kv_heads = 2, .head_dim = 8, .dtype_bytes = 4};
    options_.rebalance_interval = absl::ZeroDuration();
    options_.heartbeat_interval = absl::Minutes(30);
    options_.dead_after = absl::Hours(1);
    auto c = Coordinator::Create(options_);
    ASSERT_TRUE(c.ok()) << c.status();
    coordinator_ = std::move(*c);
    auto channel = grpc::CreateChannel(absl::StrCat("127.0.0.1:", coordinator_->grpc_port()),
                                       grpc::InsecureChannelCredentials());
    auto stub = v1::Coordinator::NewStub(channel);
    for (int32_t i = 0; i < 2; ++i) {
      v1::RegisterRequest in;
      in.set_name(absl::StrCat("fake-", i));
      in.set_transport_port(1);
      in.set_namespace_name(options_.namespace_name);
      in.set_segment_tokens(kS);
      in.set_preferred_id(i);
      v1::RegisterReply out;
      grpc::ClientContext ctx;
      ctx.set_deadline(absl::ToChronoTime(absl::Now() + absl::Seconds(5)));
      const grpc::Status s = stub->Register(&ctx, in, &out);
      ASSERT_TRUE(s.ok()) << s.error_message();
      ASSERT_EQ(out.instance_id(), i);
    }
    auto remote = RemoteControlPlane::Create(
        {.coordinator_port = coordinator_->grpc_port(), .num_instances = 2});
    ASSERT_TRUE(remote.ok());
    remote_ = std::move(*remote);
    // The lake the coordinator builds from the same options.
    auto lk = lake::Lake::Create(options_.ToLakeOptions(), &clock_);
    ASSERT_TRUE(lk.ok()) << lk.status();
    lake_ = std::move(*lk);
    reference_ = std::make_unique<lake::LocalControlPlane>(lake_.get(), &clock_);
  }

  // The coordinator's lake agrees with the reference lake on what is stored and pinned.
  void ExpectSameLakeState() {
    const std::string m = coordinator_->MetricsText();
    const lake::LakeStats st = lake_->Stats();
    EXPECT_EQ(Metric(m, "tokenlake_pool_segments"), st.segments);
    EXPECT_EQ(Metric(m, "tokenlake_pool_replicas"), st.replicas);
    EXPECT_EQ(Metric(m, "tokenlake_pool_pinned_segments"), st.pinned_segments);
    EXPECT_EQ(Metric(m, "tokenlake_lake_active_requests"), st.active_requests);
    EXPECT_EQ(Metric(m, "tokenlake_pool_pending_copies"), st.pending_copies);
    EXPECT_EQ(Metric(m, "tokenlake_pool_tail_slots"), st.tail_slots);
  }

  static constexpr int32_t kS = 4;
  CoordinatorOptions options_;
  std::unique_ptr<Coordinator> coordinator_;
  std::unique_ptr<RemoteControlPlane> remote_;
  ManualClock clock_{1};  // as the coordinator's lake clock
  std::unique_ptr<lake::Lake> lake_;
  std::unique_ptr<lake::LocalControlPlane> reference_;
};

TEST_P(FusedCallTest, ReleaseAndPlanEqualsReleaseThenPlanIterationOnAReferenceLake) {
  const auto [seed, slots] = GetParam();
  std::cout << "seed=" << seed << " slots=" << slots << "\n";
  SCOPED_TRACE(testing::Message() << "seed=" << seed << " slots=" << slots);
  std::mt19937 rng(seed);
  std::vector<std::vector<int32_t>> docs(3);
  for (auto& d : docs) {
    for (int i = 0; i < 24; ++i) d.push_back(static_cast<int32_t>(rng() % 64));
  }
  const uint64_t salt = index::NamespaceSalt(options_.namespace_name);
  int64_t fused_calls = 0, commits = 0, fused_errors = 0, confirms = 0;
  for (int64_t r = 1; r <= 40; ++r) {
    SCOPED_TRACE(testing::Message() << "request " << r);
    const RequestId id(r);
    const auto& doc = docs[rng() % docs.size()];
    std::vector<int32_t> seq(doc.begin(), doc.begin() + 1 + rng() % doc.size());
    for (uint32_t i = 0, n = rng() % 4; i < n; ++i) seq.push_back(static_cast<int32_t>(rng() % 64));
    const int32_t iterations = 1 + static_cast<int32_t>(rng() % 6);
    int64_t computed = 0;
    bool active = false;
    for (int32_t it = 0; it < iterations; ++it) {
      const bool prefill = it == 0;
      const int64_t end = static_cast<int64_t>(seq.size());
      const size_t full = seq.size() / kS * kS;
      auto keys = index::ComputeSegmentKeys(salt, absl::MakeConstSpan(seq).subspan(0, full), kS);
      ASSERT_TRUE(keys.ok());
      lake::IterationRequest req{
          .request = id,
          .keys = *keys,
          .max_cached_segments = static_cast<int32_t>((prefill ? end - 1 : computed) / kS),
          .end_tokens = end,
          .prefill = prefill,
          .computed_tokens = computed,
          .preferred_instance = InstanceId(static_cast<int32_t>(rng() % 2)),
          .count_hits = prefill};
      absl::StatusOr<lake::IterationPlan> got, want;
      if (prefill) {
        got = remote_->PlanIteration(req);
        want = reference_->PlanIteration(req);
      } else {
        // Error cases now and then: releasing an id that is not active (NotFound, nothing
        // planned), a next iteration the lake refuses (InvalidArgument after the release).
        const uint32_t pick = rng() % 10;
        RequestId release = id;
        if (pick == 0) release = RequestId(1000 + r);
        if (pick == 1) req.end_tokens = 0;
        got = remote_->ReleaseAndPlan(release, req);
        if (absl::Status released = reference_->Release(release); released.ok()) {
          want = reference_->PlanIteration(req);
        } else {
          want = released;
        }
        ++fused_calls;
        if (!want.ok()) ++fused_errors;
        if (pick == 0) {
          EXPECT_EQ(got.status().code(), absl::StatusCode::kNotFound);
        }
        if (pick == 1) {
          EXPECT_EQ(got.status().code(), absl::StatusCode::kInvalidArgument);
        }
      }
      ASSERT_EQ(got.status().code(), want.status().code())
          << got.status() << " / " << want.status();
      ExpectSameLakeState();
      // NotFound (the Release part): nothing changed, the request is still active with its
      // pins. Any other error: it was released and nothing was admitted.
      if (got.status().code() == absl::StatusCode::kNotFound) break;
      active = want.ok();
      if (!want.ok()) break;
      ExpectSamePlan(*got, *want);
      if (!want->new_segments.empty()) {
        auto cg = remote_->Commit(id, got->new_segments);
        auto cw = reference_->Commit(id, want->new_segments);
        ASSERT_TRUE(cg.ok()) << cg.status();
        ASSERT_TRUE(cw.ok()) << cw.status();
        ExpectSameCommit(*cg, *cw);
        ++commits;
        // Most iterations store their copies and confirm them (through a PlanBatch RPC that
        // carries only confirmations); the others leave them pending, so that the next
        // release drops them.
        if (rng() % 4 != 0) {
          std::vector<lake::StoreConfirmation> stored;
          for (const lake::StoredReplica& st : cg->stored) {
            stored.push_back({id, st.segment, st.instance});
          }
          ASSERT_TRUE(remote_->ConfirmStored(stored).ok());
          ASSERT_TRUE(reference_->ConfirmStored(stored).ok());
          ++confirms;
        }
        ExpectSameLakeState();
      }
      computed = end;
      seq.push_back(static_cast<int32_t>(rng() % 64));
    }
    // The last iteration's plain Release (the request is active unless the plan part of a
    // fused call failed, which released it; after a NotFound fused call it is still active).
    const absl::Status rg = remote_->Release(id);
    const absl::Status rw = reference_->Release(id);
    EXPECT_EQ(rg.code(), rw.code()) << rg << " / " << rw;
    EXPECT_EQ(rw.ok(), active) << rw;
    ExpectSameLakeState();
    EXPECT_EQ(lake_->Stats().active_requests, 0);
    EXPECT_EQ(lake_->Stats().pinned_segments, 0);
  }
  // The workload exercised what it is about.
  EXPECT_GT(fused_calls, 20);
  EXPECT_GT(commits, 10);
  EXPECT_GT(confirms, 5);
  EXPECT_GT(fused_errors, 0);
  EXPECT_GT(lake_->Stats().confirmed_copies, 0);
  EXPECT_GT(lake_->Stats().dropped_pending_copies, 0);
  const std::string m = coordinator_->MetricsText();
  EXPECT_EQ(Metric(m, "tokenlake_lake_rpcs_total{call=\"release_and_plan\"}"), fused_calls);
  EXPECT_EQ(Metric(m, "tokenlake_lake_rpcs_total{call=\"commit\"}"), commits);
  if (slots < 16) {
    EXPECT_GT(lake_->Stats().evicted_replicas, 0);
  }
}

// PlanBatch's token budget over the wire equals the local control plane's: the requests take
// it in order, a prefill's chunk is cut after its cached prefix to what is left, and a request
// that finds nothing left is deferred with nothing pinned. With 4-token segments and a pooled
// 24-token prompt A: A again serves 5 segments (20 tokens; its last token is computed) and
// computes 4 of a budget of 10; an uncached prompt B is cut to the 6 left; A for a third id
// finds nothing left; a continuation of 1 token finds nothing left either.
TEST_P(FusedCallTest, PlanBatchTokenBudgetIsTakenInOrderAfterCachedPrefixes) {
  const uint64_t salt = index::NamespaceSalt(options_.namespace_name);
  auto prefill = [&](uint64_t id, int32_t doc) {
    std::vector<int32_t> seq;
    seq.reserve(24);
    for (int32_t i = 0; i < 24; ++i) seq.push_back((i * 5 + doc * 17) % 64);
    auto keys = index::ComputeSegmentKeys(salt, seq, kS);
    EXPECT_TRUE(keys.ok());
    return lake::IterationRequest{.request = RequestId(id),
                                  .keys = keys.ok() ? *keys : std::vector<index::SegmentKey>{},
                                  .max_cached_segments = 23 / kS,
                                  .end_tokens = 24,
                                  .prefill = true,
                                  .preferred_instance = InstanceId(0)};
  };
  for (lake::ControlPlane* cp : {static_cast<lake::ControlPlane*>(remote_.get()),
                                 static_cast<lake::ControlPlane*>(reference_.get())}) {
    auto first = cp->PlanIteration(prefill(1, 0));
    ASSERT_TRUE(first.ok()) << first.status();
    auto committed = cp->Commit(RequestId(1), first->new_segments);
    ASSERT_TRUE(committed.ok()) << committed.status();
    std::vector<lake::StoreConfirmation> stored;
    for (const lake::StoredReplica& st : committed->stored) {
      stored.push_back({RequestId(1), st.segment, st.instance});
    }
    ASSERT_TRUE(cp->PlanBatch(stored, {RequestId(1)}, {}, 0).ok());
  }
  const lake::IterationRequest decode{.request = RequestId(5),
                                      .max_cached_segments = 0,
                                      .end_tokens = 1,
                                      .prefill = false,
                                      .computed_tokens = 0};
  const std::vector<lake::IterationRequest> batch = {prefill(2, 0), prefill(3, 1), prefill(4, 0),
                                                     decode};
  auto got = remote_->PlanBatch({}, {}, batch, 10);
  auto want = reference_->PlanBatch({}, {}, batch, 10);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(want.ok()) << want.status();
  ASSERT_EQ(got->size(), 4u);
  ASSERT_EQ(want->size(), 4u);
  for (size_t i = 0; i < 4; ++i) {
    SCOPED_TRACE(testing::Message() << "entry " << i);
    ASSERT_TRUE((*got)[i].status.ok()) << (*got)[i].status;
    ASSERT_TRUE((*want)[i].status.ok()) << (*want)[i].status;
    EXPECT_EQ((*got)[i].plan.admitted, (*want)[i].plan.admitted);
    if ((*want)[i].plan.admitted) ExpectSamePlan((*got)[i].plan, (*want)[i].plan);
  }
  const std::vector<lake::BatchPlanEntry>& e = *want;
  EXPECT_TRUE(e[0].plan.admitted);
  EXPECT_EQ(e[0].plan.cached_tokens, 20);
  EXPECT_EQ(e[0].plan.new_tokens, 4);
  EXPECT_TRUE(e[1].plan.admitted);
  EXPECT_EQ(e[1].plan.cached_tokens, 0);
  EXPECT_EQ(e[1].plan.new_tokens, 6);
  EXPECT_EQ(e[1].plan.end_tokens, 6);
  EXPECT_FALSE(e[2].plan.admitted);
  EXPECT_FALSE(e[3].plan.admitted);
  ExpectSameLakeState();
  EXPECT_EQ(lake_->Stats().active_requests, 2);
}

// The iteration loop with tails in the pool (as the GPU engine runs it) over the coordinator and
// over a local lake: the same requests, submitted at the same steps, finish at the same steps
// with the same tokens (the naive model's: the fake executor hashes the KV context the plans
// give it), the lakes agree after every step (tail slots included), and as many tail blocks
// are committed in place and copied. With 6 slots per instance requests wait for memory. Then a
// tail given back on its own (ReleaseTail, as a preemption does) leaves both lakes alike.
TEST_P(FusedCallTest, AnIterationLoopWithTailsInThePoolRunsTheSameOverTheWire) {
  using engine::testing_loop::FakeExecutor;
  using engine::testing_loop::kVocab;
  const auto [seed, slots] = GetParam();
  std::cout << "seed=" << seed << " slots=" << slots << "\n";
  SCOPED_TRACE(testing::Message() << "seed=" << seed << " slots=" << slots);
  std::mt19937 rng(seed);
  FakeExecutor over_wire_exec(kS, 2, slots), local_exec(kS, 2, slots);
  const engine::IterationLoopOptions lo{.segment_tokens = kS,
                                        .salt = index::NamespaceSalt(options_.namespace_name),
                                        .max_batch_tokens = 32,
                                        .max_batch_requests = 6,
                                        .memory_admission = true,
                                        .vocab_size = kVocab,
                                        .pool_tokens = int64_t{2} * slots * kS,
                                        .rotate_over_instances = 2,
                                        .tails_in_pool = true};
  auto over_wire = engine::IterationLoop::Create(remote_.get(), &over_wire_exec, lo);
  auto local = engine::IterationLoop::Create(reference_.get(), &local_exec, lo);
  ASSERT_TRUE(over_wire.ok()) << over_wire.status();
  ASSERT_TRUE(local.ok()) << local.status();
  std::vector<std::vector<int32_t>> docs(3);
  for (auto& d : docs) {
    for (int i = 0; i < 16; ++i) d.push_back(static_cast<int32_t>(rng() % kVocab));
  }
  std::vector<engine::LoopRequest> requests;
  for (uint64_t r = 1; r <= 12; ++r) {
    const auto& doc = docs[rng() % docs.size()];
    engine::LoopRequest q{.id = RequestId(r),
                          .prompt = std::vector<int32_t>(doc.begin(), doc.begin() + 4 + rng() % 12),
                          .max_new_tokens = 1 + static_cast<int32_t>(rng() % 12)};
    for (uint32_t i = 0, n = rng() % 8; i < n; ++i) {
      q.prompt.push_back(static_cast<int32_t>(rng() % kVocab));
    }
    requests.push_back(std::move(q));
  }
  size_t submitted = 0;
  int64_t finished = 0;
  for (int step = 0; step < 2000 && (submitted < requests.size() || !(*local)->idle()); ++step) {
    SCOPED_TRACE(testing::Message() << "step " << step);
    for (uint32_t n = rng() % 3; n > 0 && submitted < requests.size(); --n, ++submitted) {
      ASSERT_TRUE((*over_wire)->Submit(requests[submitted]).ok());
      ASSERT_TRUE((*local)->Submit(requests[submitted]).ok());
    }
    std::vector<engine::LoopResult> got = (*over_wire)->Step();
    std::vector<engine::LoopResult> want = (*local)->Step();
    ASSERT_EQ(got.size(), want.size());
    for (size_t i = 0; i < want.size(); ++i) {
      ASSERT_EQ(got[i].id, want[i].id);
      EXPECT_EQ(got[i].status.code(), want[i].status.code()) << got[i].status;
      EXPECT_EQ(got[i].tokens, want[i].tokens) << "request " << want[i].id.value();
      ASSERT_TRUE(want[i].status.ok()) << want[i].status;
      const engine::LoopRequest& q = requests[want[i].id.value() - 1];
      EXPECT_EQ(want[i].tokens, engine::testing_loop::Naive(q.prompt, q.max_new_tokens));
      ++finished;
    }
    ExpectSameLakeState();
  }
  EXPECT_EQ(finished, static_cast<int64_t>(requests.size()));
  EXPECT_TRUE((*over_wire)->idle());
  EXPECT_EQ(over_wire_exec.in_place, local_exec.in_place);
  EXPECT_EQ(over_wire_exec.copied, local_exec.copied);
  EXPECT_GT(local_exec.in_place, 0);
  EXPECT_EQ(over_wire_exec.tail_blocks(), 0);
  EXPECT_EQ(lake_->Stats().tail_slots, 0);
  EXPECT_EQ(lake_->Stats().pinned_segments, 0);
  std::cout << "in place " << local_exec.in_place << ", copied " << local_exec.copied
            << ", deferred admissions " << lake_->Stats().admissions_deferred << "\n";

  const std::vector<int32_t> prompt(docs[0].begin(), docs[0].begin() + 11);
  auto keys = index::ComputeSegmentKeys(lo.salt, absl::MakeConstSpan(prompt).subspan(0, 8), kS);
  ASSERT_TRUE(keys.ok());
  const lake::IterationRequest tail_request{.request = RequestId(100),
                                            .keys = *keys,
                                            .max_cached_segments = 2,
                                            .end_tokens = 11,
                                            .prefill = true,
                                            .preferred_instance = InstanceId(1),
                                            .tail_in_pool = true};
  auto got = remote_->PlanIteration(tail_request);
  auto want = reference_->PlanIteration(tail_request);
  ASSERT_TRUE(got.ok()) << got.status();
  ASSERT_TRUE(want.ok()) << want.status();
  ExpectSamePlan(*got, *want);
  EXPECT_FALSE(want->tail_slots.empty());
  ExpectSameLakeState();
  ASSERT_TRUE(remote_->ReleaseTail(RequestId(100)).ok());
  ASSERT_TRUE(reference_->ReleaseTail(RequestId(100)).ok());
  EXPECT_EQ(lake_->Stats().tail_slots, 0);
  ExpectSameLakeState();
  ASSERT_TRUE(remote_->Release(RequestId(100)).ok());
  ASSERT_TRUE(reference_->Release(RequestId(100)).ok());
  ExpectSameLakeState();
  EXPECT_EQ(Metric(coordinator_->MetricsText(), "tokenlake_lake_rpcs_total{call=\"release_tail\"}"),
            1);
}

INSTANTIATE_TEST_SUITE_P(SeedsAndSlots, FusedCallTest,
                         ::testing::Combine(::testing::Values(1u, 2u, 3u),
                                            ::testing::Values(6, 64)));

TEST(LakeRpcTest, EmptyCommitMakesNoRpc) {
  // Nothing listens on port 1: an RPC would fail, an empty Commit succeeds without one.
  auto cp = RemoteControlPlane::Create(
      {.coordinator_port = 1, .num_instances = 2, .call_timeout = absl::Milliseconds(300)});
  ASSERT_TRUE(cp.ok());
  auto empty = (*cp)->Commit(RequestId(1), {});
  ASSERT_TRUE(empty.ok()) << empty.status();
  EXPECT_TRUE(empty->stored.empty() && empty->evicted.empty() && empty->deduplicated.empty() &&
              empty->not_stored.empty());
  EXPECT_EQ(empty->sequence, 0u);
  const plan::NewSegmentPlacement p{RequestId(1), SegmentId(4),  SegmentId(),
                                    16,           InstanceId(0), InstanceId(0)};
  EXPECT_FALSE((*cp)->Commit(RequestId(1), absl::MakeConstSpan(&p, 1)).ok());
  auto fused = (*cp)->ReleaseAndPlan(RequestId(1), {.request = RequestId(1), .end_tokens = 1});
  ASSERT_FALSE(fused.ok());
  EXPECT_TRUE(lake::FailedOnTheWire(fused.status())) << fused.status();
}

}  // namespace
}  // namespace tokenlake::service
