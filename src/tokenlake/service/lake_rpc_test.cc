// The lake's gRPC messages (lake_rpc.h): every field of the engine's control-plane types
// survives a round trip through its message (including "none" instance and parent ids), and
// status codes map both ways. RemoteControlPlane without a coordinator fails with a clear
// Unavailable / DeadlineExceeded, never a hang or a crash.
#include "tokenlake/service/lake_rpc.h"

#include "gmock/gmock.h"
#include "gtest/gtest.h"

namespace tokenlake::service {
namespace {

TEST(LakeRpcTest, IterationRequestRoundTrips) {
  engine::IterationRequest in{.request = RequestId(77),
                              .keys = {{SegmentId(5), 16}, {SegmentId(6), 3}},
                              .max_cached_segments = 1,
                              .end_tokens = 19,
                              .prefill = false,
                              .computed_tokens = 18,
                              .preferred_instance = InstanceId(2),
                              .count_hits = false};
  v1::PlanIterationRequest wire;
  ToProto(in, &wire);
  v1::PlanIterationRequest parsed;
  ASSERT_TRUE(parsed.ParseFromString(wire.SerializeAsString()));
  const engine::IterationRequest out = FromProto(parsed);
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
  in.preferred_instance = InstanceId();
  wire.Clear();
  ToProto(in, &wire);
  EXPECT_EQ(wire.preferred_instance(), -1);
  EXPECT_FALSE(FromProto(wire).preferred_instance.valid());
}

TEST(LakeRpcTest, PlanAndCommitRoundTrip) {
  engine::IterationPlan plan;
  plan.num_keys = 3;
  plan.cached_tokens = 32;
  plan.new_tokens = 7;
  plan.compute_instance = InstanceId(1);
  plan.segments = {{SegmentId(1), 16, InstanceId(0), plan::HolderAction::kMoveQueries},
                   {SegmentId(2), 16, InstanceId(1), plan::HolderAction::kLocal},
                   {SegmentId(3), 16, InstanceId(2), plan::HolderAction::kPullKv}};
  plan.new_segments = {
      {RequestId(9), SegmentId(4), SegmentId(), 16, InstanceId(1), InstanceId(0)},
      {RequestId(9), SegmentId(5), SegmentId(4), 16, InstanceId(1), InstanceId(1)}};
  v1::PlanIterationReply wire;
  ToProto(plan, &wire);
  const engine::IterationPlan back = FromProto(wire, RequestId(9));
  EXPECT_EQ(back.num_keys, 3);
  EXPECT_EQ(back.cached_tokens, 32);
  EXPECT_EQ(back.new_tokens, 7);
  EXPECT_EQ(back.compute_instance, InstanceId(1));
  EXPECT_EQ(back.segments, plan.segments);
  EXPECT_EQ(back.new_segments, plan.new_segments);
  EXPECT_FALSE(back.new_segments[0].parent.valid());

  lake::CommitResult c;
  c.stored = {{SegmentId(4), InstanceId(0)}};
  c.deduplicated = {SegmentId(5)};
  c.not_stored = {SegmentId(6)};
  c.evicted = {{SegmentId(7), InstanceId(2)}};
  c.moved_bytes = 4096;
  c.sequence = 12345678901ULL;
  v1::CommitReply cw;
  ToProto(c, &cw);
  const lake::CommitResult cb = FromProto(cw);
  EXPECT_EQ(cb.stored, c.stored);
  EXPECT_EQ(cb.deduplicated, c.deduplicated);
  EXPECT_EQ(cb.not_stored, c.not_stored);
  EXPECT_EQ(cb.evicted, c.evicted);
  EXPECT_EQ(cb.moved_bytes, 4096);
  EXPECT_EQ(cb.sequence, 12345678901ULL);
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

}  // namespace
}  // namespace tokenlake::service
