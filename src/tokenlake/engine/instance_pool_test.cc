#include "tokenlake/engine/instance_pool.h"

#include <cmath>
#include <cstring>
#include <iostream>
#include <map>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/attention/attention_reference.h"
#include "tokenlake/attention/bf16.h"

namespace tokenlake::engine {
namespace {

using attention::KvDtype;

attention::KvSlotLayout Layout(KvDtype dtype) {
  return {.num_layers = 2, .segment_tokens = 4, .num_kv_heads = 2, .head_dim = 8, .dtype = dtype};
}

std::unique_ptr<InstancePool> MakePool(int32_t n, KvDtype dtype, int32_t slots = 8) {
  auto pool = InstancePool::Create(
      {.num_instances = n, .layout = Layout(dtype), .num_heads = 4, .slots_per_instance = slots});
  EXPECT_TRUE(pool.ok()) << pool.status();
  return *std::move(pool);
}

// A slot image of random values (exactly representable in bf16 so both dtypes hold them).
std::vector<std::byte> RandomSlot(const attention::KvSlotLayout& layout, std::mt19937& rng) {
  std::vector<std::byte> slot(static_cast<size_t>(layout.SlotBytes()));
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  const size_t elems = slot.size() / attention::KvDtypeBytes(layout.dtype);
  for (size_t i = 0; i < elems; ++i) {
    const uint16_t bits = attention::FloatToBf16(u(rng));
    if (layout.dtype == KvDtype::kFloat32) {
      const float f = attention::Bf16ToFloat(bits);
      std::memcpy(slot.data() + 4 * i, &f, 4);
    } else {
      std::memcpy(slot.data() + 2 * i, &bits, 2);
    }
  }
  return slot;
}

TEST(InstancePoolTest, CreateRejectsBadOptions) {
  EXPECT_EQ(InstancePool::Create({.num_instances = 0, .layout = Layout(KvDtype::kFloat32)})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  attention::KvSlotLayout bad = Layout(KvDtype::kFloat32);
  bad.segment_tokens = 0;
  EXPECT_EQ(InstancePool::Create({.num_instances = 1, .layout = bad}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(InstancePool::Create(
                {.num_instances = 1, .layout = Layout(KvDtype::kFloat32), .num_heads = 3})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(InstancePool::Create({.num_instances = 1,
                                  .layout = Layout(KvDtype::kFloat32),
                                  .num_heads = 4,
                                  .slots_per_instance = 0})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
}

class InstancePoolAttendTest : public testing::TestWithParam<std::tuple<KvDtype, int>> {};

// Segments stored on every instance (from local and remote drivers); the partial attention a
// holder returns over the transport equals its local computation and the naive reference over
// an independent copy of the KV; pulls return the stored bytes.
TEST_P(InstancePoolAttendTest, RemoteAttendEqualsLocalAndReference) {
  const auto [dtype, num_q] = GetParam();
  const uint32_t seed = 777u + static_cast<uint32_t>(num_q) * 3 + static_cast<uint32_t>(dtype);
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::mt19937 rng(seed);
  const int32_t n = 3;
  auto pool = MakePool(n, dtype);
  const attention::KvSlotLayout layout = pool->layout();
  // Instance i holds segments 10*i + 1 .. 10*i + 3, each stored by driver (i + j) % n.
  std::vector<std::vector<std::pair<SegmentRef, std::vector<std::byte>>>> held(n);
  for (int32_t i = 0; i < n; ++i) {
    for (int32_t j = 1; j <= 3; ++j) {
      const SegmentRef ref{SegmentId(10 * i + j), 1 + (j + i) % layout.segment_tokens};
      auto slot = RandomSlot(layout, rng);
      ASSERT_TRUE(pool->StoreSegment(InstanceId((i + j) % n), InstanceId(i), ref.id, slot).ok());
      held[i].push_back({ref, std::move(slot)});
    }
  }
  for (int32_t i = 0; i < n; ++i) EXPECT_EQ(pool->store(InstanceId(i)).used(), 3);

  std::vector<float> q(static_cast<size_t>(num_q) * 4 * 8);
  std::uniform_real_distribution<float> u(-2.0f, 2.0f);
  for (float& x : q) x = u(rng);
  const size_t out_size = q.size(), lse_size = static_cast<size_t>(num_q) * 4;
  for (int32_t layer = 0; layer < layout.num_layers; ++layer) {
    for (int32_t holder = 0; holder < n; ++holder) {
      std::vector<SegmentRef> refs;
      std::vector<attention::KvBlock> blocks;
      for (const auto& [ref, slot] : held[holder]) {
        refs.push_back(ref);
        auto block = attention::SlotLayerBlock(layout, slot.data(), layer, ref.num_tokens);
        ASSERT_TRUE(block.ok());
        blocks.push_back(*block);
      }
      std::vector<float> ref_out(out_size), ref_lse(lse_size);
      ASSERT_TRUE(attention::ReferencePartialAttention(
                      {.num_heads = 4, .num_kv_heads = 2, .head_dim = 8, .kv_dtype = dtype}, num_q,
                      q, blocks, absl::MakeSpan(ref_out), absl::MakeSpan(ref_lse))
                      .ok());
      const InstanceId compute((holder + 1) % n);
      auto ticket = pool->StartAttend(compute, InstanceId(holder), layer, refs, num_q, q);
      ASSERT_TRUE(ticket.ok()) << ticket.status();
      std::vector<float> out(out_size), lse(lse_size), lout(out_size), llse(lse_size);
      ASSERT_TRUE(
          pool->AwaitAttend(compute, *ticket, absl::MakeSpan(out), absl::MakeSpan(lse)).ok());
      ASSERT_TRUE(pool->LocalAttend(InstanceId(holder), layer, refs, num_q, q, absl::MakeSpan(lout),
                                    absl::MakeSpan(llse))
                      .ok());
      EXPECT_EQ(out, lout);
      EXPECT_EQ(lse, llse);
      for (size_t k = 0; k < out_size; ++k) ASSERT_NEAR(out[k], ref_out[k], 1e-5) << k;
      for (size_t k = 0; k < lse_size; ++k) ASSERT_NEAR(lse[k], ref_lse[k], 1e-5) << k;
    }
  }
  for (int32_t i = 0; i < n; ++i) {
    for (const auto& [ref, slot] : held[i]) {
      for (int32_t c = 0; c < n; ++c) {
        auto pulled = pool->PullSegment(InstanceId(c), InstanceId(i), ref.id);
        ASSERT_TRUE(pulled.ok()) << pulled.status();
        EXPECT_EQ(*pulled, slot);
      }
    }
  }
  for (int32_t i = 0; i < n; ++i) {
    EXPECT_EQ(pool->store(InstanceId(i)).num_pinned(), 0);
    EXPECT_TRUE(pool->store(InstanceId(i)).CheckIntegrity().ok());
  }
}

INSTANTIATE_TEST_SUITE_P(DtypesAndQueries, InstancePoolAttendTest,
                         testing::Combine(testing::Values(KvDtype::kFloat32, KvDtype::kBFloat16),
                                          testing::Values(1, 5)));

// The queries of several requests to one holder in one message: each group's partial equals
// the holder's local computation for that group alone, and the call is one message each way.
TEST(InstancePoolTest, BatchedAttendIsOneMessageAndEqualsEachGroupAlone) {
  const uint32_t seed = 4242;
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::mt19937 rng(seed);
  auto pool = MakePool(2, KvDtype::kFloat32);
  const attention::KvSlotLayout layout = Layout(KvDtype::kFloat32);
  for (uint64_t id = 1; id <= 3; ++id) {
    ASSERT_TRUE(
        pool->StoreSegment(InstanceId(0), InstanceId(1), SegmentId(id), RandomSlot(layout, rng))
            .ok());
  }
  const std::vector<SegmentRef> a = {{SegmentId(1), 4}, {SegmentId(2), 3}};
  const std::vector<SegmentRef> b = {{SegmentId(3), 4}};
  const int32_t qa = 3, qb = 1;
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  std::vector<float> q_a(static_cast<size_t>(qa) * 4 * 8), q_b(static_cast<size_t>(qb) * 4 * 8);
  for (float& x : q_a) x = u(rng);
  for (float& x : q_b) x = u(rng);
  const std::vector<AttendGroup> groups = {{.segments = a, .num_q = qa, .q = q_a},
                                           {.segments = b, .num_q = qb, .q = q_b}};
  const int64_t before = pool->transport().messages_sent(pool->DriverEndpoint(InstanceId(0)));
  auto ticket = pool->StartAttendBatch(InstanceId(0), InstanceId(1), 1, groups);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  std::vector<float> out_a(q_a.size()), lse_a(qa * 4), out_b(q_b.size()), lse_b(qb * 4);
  const std::vector<absl::Span<float>> outs = {absl::MakeSpan(out_a), absl::MakeSpan(out_b)};
  const std::vector<absl::Span<float>> lses = {absl::MakeSpan(lse_a), absl::MakeSpan(lse_b)};
  ASSERT_TRUE(pool->AwaitAttendBatch(InstanceId(0), *ticket, outs, lses).ok());
  EXPECT_EQ(pool->transport().messages_sent(pool->DriverEndpoint(InstanceId(0))) - before, 1);
  std::vector<float> ref_out(q_a.size()), ref_lse(qa * 4);
  ASSERT_TRUE(pool->LocalAttend(InstanceId(1), 1, a, qa, q_a, absl::MakeSpan(ref_out),
                                absl::MakeSpan(ref_lse))
                  .ok());
  EXPECT_EQ(out_a, ref_out);
  EXPECT_EQ(lse_a, ref_lse);
  std::vector<float> ref_out_b(q_b.size()), ref_lse_b(qb * 4);
  ASSERT_TRUE(pool->LocalAttend(InstanceId(1), 1, b, qb, q_b, absl::MakeSpan(ref_out_b),
                                absl::MakeSpan(ref_lse_b))
                  .ok());
  EXPECT_EQ(out_b, ref_out_b);
  EXPECT_EQ(lse_b, ref_lse_b);
  // A bad group is named; a group whose segment is missing fails the call with the holder's
  // error.
  const std::vector<AttendGroup> bad = {{.segments = a, .num_q = qa, .q = q_a},
                                        {.segments = b, .num_q = 2, .q = q_b}};
  const absl::Status s = pool->StartAttendBatch(InstanceId(0), InstanceId(1), 1, bad).status();
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("group 1"), std::string::npos) << s;
  const std::vector<SegmentRef> missing = {{SegmentId(99), 4}};
  const std::vector<AttendGroup> gone = {{.segments = a, .num_q = qa, .q = q_a},
                                         {.segments = missing, .num_q = qb, .q = q_b}};
  auto t2 = pool->StartAttendBatch(InstanceId(0), InstanceId(1), 1, gone);
  ASSERT_TRUE(t2.ok());
  EXPECT_EQ(pool->AwaitAttendBatch(InstanceId(0), *t2, outs, lses).code(),
            absl::StatusCode::kNotFound);
}

TEST(InstancePoolTest, ErrorsComeBackAsStatusesNamingTheInstance) {
  auto pool = MakePool(2, KvDtype::kFloat32, /*slots=*/1);
  std::mt19937 rng(1);
  const auto slot = RandomSlot(pool->layout(), rng);
  const std::vector<float> q(4 * 8, 0.5f);
  // Unknown segment, remotely and locally.
  const SegmentRef missing{SegmentId(42), 4};
  auto ticket = pool->StartAttend(InstanceId(0), InstanceId(1), 0, {&missing, 1}, 1, q);
  ASSERT_TRUE(ticket.ok());
  std::vector<float> out(32), lse(4);
  absl::Status s =
      pool->AwaitAttend(InstanceId(0), *ticket, absl::MakeSpan(out), absl::MakeSpan(lse));
  EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
  EXPECT_NE(s.message().find("instance 1"), std::string::npos) << s;
  EXPECT_EQ(pool->PullSegment(InstanceId(0), InstanceId(1), SegmentId(42)).status().code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(pool->PullSegment(InstanceId(1), InstanceId(1), SegmentId(42)).status().code(),
            absl::StatusCode::kNotFound);
  // Bad sizes and ranges.
  EXPECT_EQ(pool->StoreSegment(InstanceId(0), InstanceId(1), SegmentId(1),
                               absl::MakeConstSpan(slot).subspan(1))
                .code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pool->StoreSegment(InstanceId(0), InstanceId(2), SegmentId(1), slot).code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pool->StartAttend(InstanceId(0), InstanceId(1), 0, {&missing, 1}, 2, q).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(pool->StartAttend(InstanceId(0), InstanceId(1), 0, {}, 1, q).status().code(),
            absl::StatusCode::kInvalidArgument);
  // A full instance.
  ASSERT_TRUE(pool->StoreSegment(InstanceId(0), InstanceId(1), SegmentId(1), slot).ok());
  EXPECT_EQ(pool->StoreSegment(InstanceId(0), InstanceId(1), SegmentId(2), slot).code(),
            absl::StatusCode::kResourceExhausted);
  // Storing again overwrites in place.
  EXPECT_TRUE(pool->StoreSegment(InstanceId(1), InstanceId(1), SegmentId(1), slot).ok());
  // A layer out of range.
  const SegmentRef one{SegmentId(1), 4};
  ticket = pool->StartAttend(InstanceId(0), InstanceId(1), 7, {&one, 1}, 1, q);
  ASSERT_TRUE(ticket.ok());
  EXPECT_EQ(
      pool->AwaitAttend(InstanceId(0), *ticket, absl::MakeSpan(out), absl::MakeSpan(lse)).code(),
      absl::StatusCode::kInvalidArgument);
  // Free, then it is gone.
  EXPECT_TRUE(pool->FreeSegment(InstanceId(0), InstanceId(1), SegmentId(1)).ok());
  EXPECT_EQ(pool->FreeSegment(InstanceId(0), InstanceId(1), SegmentId(1)).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(pool->store(InstanceId(1)).used(), 0);
  // Only remote operations that passed the driver-side checks used the transport: driver 0 sent
  // 2 attends, 1 pull, 2 stores and 2 frees; driver 1 worked only on itself (no messages).
  EXPECT_EQ(pool->transport().messages_sent(pool->DriverEndpoint(InstanceId(0))), 7);
  EXPECT_EQ(pool->transport().messages_sent(pool->DriverEndpoint(InstanceId(1))), 0);
}

// Two pools in one process, each hosting one of the two instances, over one shared transport
// (as two instance processes share the endpoint space of their TcpTransports): stores, pulls,
// attends and frees cross between them with the segments' metadata.
TEST(InstancePoolTest, PoolsHostingDisjointInstancesTalkOverASharedTransport) {
  auto shared = transport::LoopbackTransport::Create({.num_endpoints = 3 + 4});
  ASSERT_TRUE(shared.ok());
  InstancePool::Options o{.num_instances = 2,
                          .layout = Layout(KvDtype::kFloat32),
                          .num_heads = 4,
                          .slots_per_instance = 4,
                          .external_transport = shared->get(),
                          .endpoint_base = 3};
  o.hosted = {InstanceId(0)};
  auto a = InstancePool::Create(o);
  ASSERT_TRUE(a.ok()) << a.status();
  o.hosted = {InstanceId(1)};
  auto b = InstancePool::Create(o);
  ASSERT_TRUE(b.ok()) << b.status();
  EXPECT_TRUE((*a)->hosts(InstanceId(0)));
  EXPECT_FALSE((*a)->hosts(InstanceId(1)));
  std::mt19937 rng(7);
  const std::vector<std::byte> slot = RandomSlot(Layout(KvDtype::kFloat32), rng);
  const StoredMeta meta{SegmentId(11), 3};
  ASSERT_TRUE((*a)->StoreSegment(InstanceId(0), InstanceId(1), SegmentId(12), slot, meta).ok());
  ASSERT_EQ((*b)->Held(InstanceId(1)).size(), 1u);
  EXPECT_EQ((*b)->Held(InstanceId(1))[0].meta.parent, SegmentId(11));
  EXPECT_EQ((*b)->Held(InstanceId(1))[0].meta.num_tokens, 3);
  StoredMeta pulled_meta;
  auto pulled = (*a)->PullSegment(InstanceId(0), InstanceId(1), SegmentId(12), &pulled_meta);
  ASSERT_TRUE(pulled.ok()) << pulled.status();
  EXPECT_EQ(*pulled, slot);
  EXPECT_EQ(pulled_meta.parent, SegmentId(11));
  EXPECT_EQ(pulled_meta.num_tokens, 3);
  // Remote attend from instance 0 to 1 equals instance 1's own computation.
  const int32_t num_q = 2;
  std::vector<float> q(static_cast<size_t>(num_q) * 4 * 8, 0.25f);
  std::vector<float> out(q.size()), lse(num_q * 4), ref_out(q.size()), ref_lse(num_q * 4);
  const SegmentRef ref{SegmentId(12), 3};
  auto ticket = (*a)->StartAttend(InstanceId(0), InstanceId(1), 1, {&ref, 1}, num_q, q);
  ASSERT_TRUE(ticket.ok()) << ticket.status();
  ASSERT_TRUE(
      (*a)->AwaitAttend(InstanceId(0), *ticket, absl::MakeSpan(out), absl::MakeSpan(lse)).ok());
  ASSERT_TRUE((*b)->LocalAttend(InstanceId(1), 1, {&ref, 1}, num_q, q, absl::MakeSpan(ref_out),
                                absl::MakeSpan(ref_lse))
                  .ok());
  EXPECT_EQ(out, ref_out);
  EXPECT_EQ(lse, ref_lse);
  // A driver call from an instance this pool does not host is refused, not crashed.
  EXPECT_EQ((*a)->PullSegment(InstanceId(1), InstanceId(1), SegmentId(12)).status().code(),
            absl::StatusCode::kInvalidArgument);
  ASSERT_TRUE((*a)->FreeSegment(InstanceId(0), InstanceId(1), SegmentId(12)).ok());
  EXPECT_TRUE((*b)->Held(InstanceId(1)).empty());
  // Hosting a subset without an external transport is an error.
  InstancePool::Options bad = o;
  bad.external_transport = nullptr;
  EXPECT_EQ(InstancePool::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  // So is a transport with too few endpoints.
  auto small = transport::LoopbackTransport::Create({.num_endpoints = 4});
  ASSERT_TRUE(small.ok());
  bad.external_transport = small->get();
  EXPECT_EQ(InstancePool::Create(bad).status().code(), absl::StatusCode::kInvalidArgument);
  b->reset();
  a->reset();
  (*shared)->Shutdown();
}

// A free decided from an older report never drops a copy stored since (store generations).
TEST(InstancePoolTest, FreeIfUnchangedSinceSparesACopyStoredAgain) {
  auto pool = MakePool(1, KvDtype::kFloat32, 4);
  std::mt19937 rng(3);
  const std::vector<std::byte> slot = RandomSlot(Layout(KvDtype::kFloat32), rng);
  const InstanceId i(0);
  ASSERT_TRUE(pool->StoreSegment(i, i, SegmentId(1), slot).ok());
  const uint64_t reported = pool->StoreGeneration(i);
  ASSERT_TRUE(pool->StoreSegment(i, i, SegmentId(2), slot).ok());
  ASSERT_TRUE(pool->StoreSegment(i, i, SegmentId(1), slot).ok());  // stored again since
  EXPECT_GT(pool->StoreGeneration(i), reported);
  EXPECT_EQ(pool->FreeIfUnchangedSince(i, SegmentId(1), reported).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_TRUE(pool->store(i).Find(SegmentId(1)).has_value());
  EXPECT_TRUE(pool->FreeIfUnchangedSince(i, SegmentId(1), pool->StoreGeneration(i)).ok());
  EXPECT_FALSE(pool->store(i).Find(SegmentId(1)).has_value());
  EXPECT_EQ(pool->FreeIfUnchangedSince(i, SegmentId(1), pool->StoreGeneration(i)).code(),
            absl::StatusCode::kNotFound);
  EXPECT_EQ(pool->Held(i).size(), 1u);
}

// Every store and free on a hosted instance, through the transport or local, is a numbered
// change (its store generation); replaying the changes after an acknowledged report onto that
// report gives what the instance holds, after random stores, frees and acknowledgements.
TEST(InstancePoolTest, ChangesSinceAReportReplayToWhatTheInstanceHolds) {
  auto created = InstancePool::Create({.num_instances = 2,
                                       .layout = Layout(KvDtype::kFloat32),
                                       .num_heads = 4,
                                       .slots_per_instance = 6,
                                       .change_log_entries = 64});
  ASSERT_TRUE(created.ok()) << created.status();
  InstancePool& pool = **created;
  const uint64_t seed = 11;
  std::cout << "seed=" << seed << "\n";
  std::mt19937 rng(seed);
  const std::vector<std::byte> slot = RandomSlot(Layout(KvDtype::kFloat32), rng);
  const InstanceId holder(1);
  auto held_map = [](const std::vector<HeldSegmentInfo>& held) {
    std::map<uint64_t, std::pair<uint64_t, int32_t>> m;
    for (const HeldSegmentInfo& h : held) {
      m[h.id.value()] = {h.meta.parent.value(), h.meta.num_tokens};
    }
    return m;
  };
  InstancePool::HeldReport report = pool.HeldWithGeneration(holder);
  std::map<uint64_t, std::pair<uint64_t, int32_t>> mirror = held_map(report.segments);
  uint64_t acked = report.generation;
  for (int step = 0; step < 400; ++step) {
    const uint64_t seg = 1 + rng() % 10;
    const InstanceId driver(static_cast<int32_t>(rng() % 2));  // remote (0) or local (1)
    const int dice = static_cast<int>(rng() % 10);
    if (dice < 5) {
      // A full store fails without changing anything: no change is numbered.
      const uint64_t before = pool.StoreGeneration(holder);
      const StoredMeta meta{.parent = SegmentId(seg + 100), .num_tokens = 1 + step % 5};
      if (!pool.StoreSegment(driver, holder, SegmentId(seg), slot, meta).ok()) {
        ASSERT_EQ(pool.StoreGeneration(holder), before);
      }
    } else if (dice < 8) {
      pool.FreeSegment(driver, holder, SegmentId(seg)).IgnoreError();
    } else {
      pool.FreeIfUnchangedSince(holder, SegmentId(seg), pool.StoreGeneration(holder)).IgnoreError();
    }
    if (rng() % 4 == 0) {
      // A report: the changes since the acknowledged one, applied to the mirror.
      std::optional<std::vector<store::SegmentChange>> changes = pool.ChangesSince(holder, acked);
      ASSERT_TRUE(changes.has_value()) << "step " << step;
      for (const store::SegmentChange& c : *changes) {
        if (c.stored) {
          mirror[c.id.value()] = {c.parent.value(), c.num_tokens};
        } else {
          ASSERT_EQ(mirror.erase(c.id.value()), 1u) << "step " << step << ": a free of " << c.id;
        }
      }
      acked += changes->size();
      ASSERT_EQ(acked, pool.StoreGeneration(holder));
      ASSERT_EQ(mirror, held_map(pool.Held(holder))) << "step " << step;
      if (rng() % 2 == 0) {
        pool.ForgetChanges(holder, acked);
        ASSERT_EQ(pool.ChangesSince(holder, acked), std::vector<store::SegmentChange>{});
        if (acked > 0) {
          ASSERT_EQ(pool.ChangesSince(holder, acked - 1), std::nullopt);
        }
      }
    }
  }
  ASSERT_GT(acked, 100u);
}

// A free for an evicted copy keeps the same segment placed there again by a later change of
// the lake (placement sequence numbers), locally and through the transport.
TEST(InstancePoolTest, FreeOfAnEvictedCopySparesTheSegmentPlacedAgain) {
  auto pool = MakePool(2, KvDtype::kFloat32, 4);
  std::mt19937 rng(5);
  const std::vector<std::byte> slot = RandomSlot(Layout(KvDtype::kFloat32), rng);
  for (const InstanceId from : {InstanceId(1), InstanceId(0)}) {
    SCOPED_TRACE(testing::Message() << "freed from instance " << from.value());
    const InstanceId target(1);
    // Placed by change 7, evicted by change 5 (a stale free): kept.
    ASSERT_TRUE(pool->StoreSegment(from, target, SegmentId(9), slot, {SegmentId(), 4, 7}).ok());
    EXPECT_EQ(pool->FreeSegment(from, target, SegmentId(9), 5).code(),
              absl::StatusCode::kFailedPrecondition);
    EXPECT_TRUE(pool->store(target).Find(SegmentId(9)).has_value());
    StoredMeta meta;
    ASSERT_TRUE(pool->PullSegment(from, target, SegmentId(9), &meta).ok());
    EXPECT_EQ(meta.placement_sequence, 7u);
    // Evicted by change 8 (after the placement): freed.
    EXPECT_TRUE(pool->FreeSegment(from, target, SegmentId(9), 8).ok());
    EXPECT_FALSE(pool->store(target).Find(SegmentId(9)).has_value());
  }
}

// A rebalancing copy lands on the receiving instance byte for byte, with the source's parent and
// token count and the action's sequence number; the source keeps its copy; a missing source or
// a full target is an error and changes nothing.
TEST(InstancePoolTest, CopyForRebalanceCopiesTheSlotWithItsMetadata) {
  auto pool = MakePool(3, KvDtype::kBFloat16, 1);
  std::mt19937 rng(11);
  const std::vector<std::byte> slot = RandomSlot(Layout(KvDtype::kBFloat16), rng);
  const InstanceId from(0), to(2);
  ASSERT_TRUE(pool->StoreSegment(from, from, SegmentId(4), slot, {SegmentId(3), 4, 2}).ok());
  absl::StatusOr<int64_t> bytes = pool->CopyForRebalance(to, from, SegmentId(4), 9);
  ASSERT_TRUE(bytes.ok()) << bytes.status();
  EXPECT_EQ(*bytes, static_cast<int64_t>(slot.size()));
  StoredMeta meta;
  absl::StatusOr<std::vector<std::byte>> copied = pool->PullSegment(to, to, SegmentId(4), &meta);
  ASSERT_TRUE(copied.ok()) << copied.status();
  EXPECT_EQ(*copied, slot);
  EXPECT_EQ(meta.parent, SegmentId(3));
  EXPECT_EQ(meta.num_tokens, 4);
  EXPECT_EQ(meta.placement_sequence, 9u);
  EXPECT_TRUE(pool->store(from).Find(SegmentId(4)).has_value());
  EXPECT_EQ(pool->CopyForRebalance(InstanceId(1), from, SegmentId(5), 10).status().code(),
            absl::StatusCode::kNotFound);
  ASSERT_TRUE(pool->StoreSegment(from, InstanceId(1), SegmentId(6), slot).ok());
  EXPECT_EQ(pool->CopyForRebalance(InstanceId(1), from, SegmentId(4), 11).status().code(),
            absl::StatusCode::kResourceExhausted);
  EXPECT_FALSE(pool->store(InstanceId(1)).Find(SegmentId(4)).has_value());
}

}  // namespace
}  // namespace tokenlake::engine
