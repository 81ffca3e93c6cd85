// PeerDevicePool across processes on one GPU: this binary is instance 0; it starts itself again
// (store/cuda/peer_process_testing.h) as the process hosting instance 1, and the two exchange
// their transports' ports and arena handles over the test channel.
//  - Random stores, tail blocks (allocated, written through the mapping, committed in place or
//    given back) and frees on both instances against a naive model of what each holds: every
//    segment's slot, resolved and read back through this process's mapping, holds its bytes;
//    the holder's own report of what it holds (with the metadata of its stores) agrees; errors
//    come back named (the holder's instance, the segment).
//  - The GPU engine over the pool (GpuEngine::CreateOver), computing on instance 0 with a lake
//    of both instances: its segments spill onto instance 1 (stored device to device by the
//    holder from this process's tail blocks), later requests read them there in place, and
//    every request's logits match the CPU reference within the bf16 tolerance.
//  Both with instance 1's arena mapped and without (host staging: copies fetched into a
//  staging cache, stores carrying bytes, tails kept on instance 0 by the lake's device domains).
// Skips without a GPU.
#include "tokenlake/engine/cuda/peer_device_pool.h"

#include <cuda_runtime_api.h>

#include <iostream>
#include <map>
#include <random>
#include <string>
#include <vector>

#include "absl/strings/numbers.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "gtest/gtest.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/gpu_engine.h"
#include "tokenlake/engine/cuda/gpu_model_testing.h"
#include "tokenlake/engine/cuda/gpu_test_util.h"
#include "tokenlake/engine/pool_shape.h"
#include "tokenlake/lake/control_plane.h"
#include "tokenlake/lake/lake.h"
#include "tokenlake/store/cuda/peer_process_testing.h"
#include "tokenlake/transport/tcp_transport.h"

namespace tokenlake::engine::cuda {
namespace {

using store::ChildContext;
using store::kChildFd;
using testing_util::HaveGpu;

constexpr int32_t kInstances = 2;

attention::KvSlotLayout SmallLayout() {
  return {.num_layers = 2,
          .segment_tokens = 4,
          .num_kv_heads = 2,
          .head_dim = 8,
          .dtype = attention::KvDtype::kBFloat16};
}

// One process's part: its transport (hosting its instance's server and driver endpoints) and
// its pool.
struct Side {
  std::unique_ptr<transport::TcpTransport> transport;
  std::unique_ptr<PeerDevicePool> pool;
};

absl::StatusOr<Side> MakeSide(InstanceId self, int32_t slots,
                              const attention::KvSlotLayout& layout) {
  Side side;
  TOKENLAKE_ASSIGN_OR_RETURN(
      side.transport, transport::TcpTransport::Create(
                          {.num_endpoints = 2 * kInstances,
                           .local_endpoints = {self, InstanceId(kInstances + self.value())}}));
  TOKENLAKE_ASSIGN_OR_RETURN(side.pool,
                             PeerDevicePool::Create({.num_instances = kInstances,
                                                     .self = self,
                                                     .slots = slots,
                                                     .layout = layout,
                                                     .transport = side.transport.get()}));
  return side;
}

// "port=P handle=HEX": what a side tells the other.
absl::StatusOr<std::string> Announce(const Side& side) {
  TOKENLAKE_ASSIGN_OR_RETURN(store::ArenaHandle h, side.pool->ExportHandle());
  return absl::StrCat("port=", side.transport->port(), " handle=", store::ToHex(h.Serialize()));
}

// Routes the other instance's endpoints to its port and maps its arena (unless !map: then the
// other instance is reached through host staging, as one on another GPU or host is).
absl::Status Meet(Side& side, InstanceId other, const std::string& line, bool map) {
  int32_t port = 0;
  std::string hex;
  for (absl::string_view field : absl::StrSplit(line, ' ')) {
    if (absl::ConsumePrefix(&field, "port=")) {
      if (!absl::SimpleAtoi(field, &port)) return absl::InvalidArgumentError(line);
    } else if (absl::ConsumePrefix(&field, "handle=")) {
      hex = std::string(field);
    }
  }
  std::optional<std::string> bytes = store::FromHex(hex);
  if (port <= 0 || !bytes.has_value()) {
    return absl::InvalidArgumentError(absl::StrCat("bad announcement: ", line));
  }
  TOKENLAKE_ASSIGN_OR_RETURN(store::ArenaHandle handle, store::ArenaHandle::Parse(*bytes));
  TOKENLAKE_RETURN_IF_ERROR(side.transport->SetPeer(other, port));
  TOKENLAKE_RETURN_IF_ERROR(side.transport->SetPeer(InstanceId(kInstances + other.value()), port));
  return map ? side.pool->AddPeer(other, handle) : absl::OkStatus();
}

// The child: hosts instance 1 until the parent says "exit" (after it unmapped this arena);
// "held" asks for what it stores: "N id:parent:tokens:sequence ...".
int ChildHolder(ChildContext& c) {
  const std::optional<uint64_t> slots = c.NumberFlag("slots");
  const std::optional<uint64_t> segment_tokens = c.NumberFlag("segment-tokens");
  const std::optional<uint64_t> layers = c.NumberFlag("layers");
  const std::optional<uint64_t> kv_heads = c.NumberFlag("kv-heads");
  const std::optional<uint64_t> head_dim = c.NumberFlag("head-dim");
  const std::optional<uint64_t> map = c.NumberFlag("map");
  if (!slots || !segment_tokens || !layers || !kv_heads || !head_dim || !map) {
    return c.Fail(store::kChildUsage,
                  "needs --slots, --segment-tokens, --layers, --kv-heads, --head-dim, --map");
  }
  const attention::KvSlotLayout layout{.num_layers = static_cast<int32_t>(*layers),
                                       .segment_tokens = static_cast<int32_t>(*segment_tokens),
                                       .num_kv_heads = static_cast<int32_t>(*kv_heads),
                                       .head_dim = static_cast<int32_t>(*head_dim),
                                       .dtype = attention::KvDtype::kBFloat16};
  absl::StatusOr<Side> side = MakeSide(InstanceId(1), static_cast<int32_t>(*slots), layout);
  if (!side.ok()) return c.Fail(store::kChildUnexpected, side.status().ToString());
  absl::StatusOr<std::string> announce = Announce(*side);
  if (!announce.ok()) return c.Fail(store::kChildUnexpected, announce.status().ToString());
  if (!store::SendLine(kChildFd, *announce)) return c.Fail(store::kChildChannel, "announce");
  std::string why;
  std::optional<std::string> parent = c.ReadParentLine(&why);
  if (!parent.has_value()) return c.Fail(store::kChildChannel, why);
  if (absl::Status s = Meet(*side, InstanceId(0), *parent, *map != 0); !s.ok()) {
    return c.Fail(store::kChildUnexpected, s.ToString());
  }
  if (!store::SendLine(kChildFd, "ready")) return c.Fail(store::kChildChannel, "ready");
  while (true) {
    std::optional<std::string> line = c.ReadParentLine(&why);
    if (!line.has_value()) return c.Fail(store::kChildChannel, why);
    if (*line == "exit") break;
    if (*line == "forget 0") {
      // Instance 0's process is gone (as the instance's backend is told): its tails here go.
      const int32_t freed = side->pool->ForgetPeerTails(InstanceId(0));
      if (!store::SendLine(kChildFd, absl::StrCat(freed, " ", side->pool->store().used()))) {
        return c.Fail(store::kChildChannel, "forget");
      }
    }
    if (*line == "held") {
      std::string out =
          absl::StrCat(side->pool->store().used() - side->pool->store().num_tail_slots());
      for (const HeldSegmentInfo& h : side->pool->Held()) {
        absl::StrAppend(&out, " ", h.id.value(), ":",
                        h.meta.parent.valid() ? h.meta.parent.value() : 0, ":", h.meta.num_tokens,
                        ":", h.meta.placement_sequence);
      }
      if (!store::SendLine(kChildFd, out)) return c.Fail(store::kChildChannel, "held");
    }
  }
  side->pool->RemovePeer(InstanceId(0));
  return store::kChildOk;
}

// The parent's side and its child, met.
struct Pair {
  Side side;
  std::unique_ptr<store::Child> child;
  // What the child holds, as it reports it: segment -> meta.
  std::map<uint64_t, StoredMeta> ChildHeld() {
    std::map<uint64_t, StoredMeta> out;
    EXPECT_TRUE(child->SendLine("held"));
    std::string why;
    std::optional<std::string> line = child->ReadLine(&why);
    EXPECT_TRUE(line.has_value()) << why;
    if (!line.has_value()) return out;
    std::vector<std::string> fields = absl::StrSplit(*line, ' ');
    for (size_t i = 1; i < fields.size(); ++i) {
      std::vector<std::string> p = absl::StrSplit(fields[i], ':');
      uint64_t id = 0, parent = 0, sequence = 0;
      int32_t tokens = 0;
      EXPECT_TRUE(p.size() == 4 && absl::SimpleAtoi(p[0], &id) && absl::SimpleAtoi(p[1], &parent) &&
                  absl::SimpleAtoi(p[2], &tokens) && absl::SimpleAtoi(p[3], &sequence))
          << fields[i];
      out[id] = {.parent = parent == 0 ? SegmentId() : SegmentId(parent),
                 .num_tokens = tokens,
                 .placement_sequence = sequence};
    }
    return out;
  }
  ~Pair() {
    if (side.pool != nullptr) side.pool->RemovePeer(InstanceId(1));
    if (child != nullptr) {
      child->SendLine("exit");
      const std::optional<int> code = child->Wait();
      EXPECT_EQ(code, std::optional<int>(store::kChildOk)) << store::ExitMeaning(code.value_or(-1));
    }
  }
};

void StartPair(Pair& p, int32_t slots, const attention::KvSlotLayout& layout, bool map = true) {
  absl::StatusOr<Side> side = MakeSide(InstanceId(0), slots, layout);
  ASSERT_TRUE(side.ok()) << side.status();
  p.side = *std::move(side);
  auto child = store::Child::Start(
      "holder",
      {absl::StrCat("--slots=", slots), absl::StrCat("--segment-tokens=", layout.segment_tokens),
       absl::StrCat("--layers=", layout.num_layers),
       absl::StrCat("--kv-heads=", layout.num_kv_heads),
       absl::StrCat("--head-dim=", layout.head_dim), absl::StrCat("--map=", map ? 1 : 0)});
  ASSERT_TRUE(child.ok()) << child.status();
  p.child = *std::move(child);
  std::string why;
  std::optional<std::string> theirs = p.child->ReadLine(&why);
  ASSERT_TRUE(theirs.has_value()) << why;
  absl::StatusOr<std::string> mine = Announce(p.side);
  ASSERT_TRUE(mine.ok()) << mine.status();
  ASSERT_TRUE(p.child->SendLine(*mine));
  absl::Status met = Meet(p.side, InstanceId(1), *theirs, map);
  ASSERT_TRUE(met.ok()) << met;
  std::optional<std::string> ready = p.child->ReadLine(&why);
  ASSERT_EQ(ready, std::optional<std::string>("ready")) << why;
}

std::vector<std::byte> ReadBack(const std::byte* device, size_t bytes) {
  std::vector<std::byte> host(bytes);
  EXPECT_EQ(cudaMemcpy(host.data(), device, bytes, cudaMemcpyDeviceToHost), cudaSuccess);
  return host;
}

// Mapped: the peer's arena is read in place (one GPU). Not mapped: the peer is reached through
// host staging (as one on another GPU or host): reads fetch its copies into the staging cache,
// stores carry bytes, and no tail block can be taken there.
class PeerDevicePoolAccessTest : public ::testing::TestWithParam<bool> {};

INSTANTIATE_TEST_SUITE_P(Access, PeerDevicePoolAccessTest, ::testing::Values(true, false),
                         [](const ::testing::TestParamInfo<bool>& info) {
                           return info.param ? "Mapped" : "HostStaging";
                         });

TEST_P(PeerDevicePoolAccessTest, TwoProcessesMatchANaiveModel) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const bool mapped = GetParam();
  const uint64_t seed = mapped ? 31 : 33;
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  constexpr int32_t kSlots = 5;
  const attention::KvSlotLayout layout = SmallLayout();
  const size_t slot_bytes = static_cast<size_t>(layout.SlotBytes());
  Pair p;
  ASSERT_NO_FATAL_FAILURE(StartPair(p, kSlots, layout, mapped));
  PeerDevicePool& pool = *p.side.pool;
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreate(&stream), cudaSuccess);

  struct Tail {
    InstanceId instance;
    DeviceSlot slot;
    std::vector<std::byte> bytes;
  };
  std::vector<std::map<uint64_t, std::pair<std::vector<std::byte>, StoredMeta>>> held(kInstances);
  std::vector<Tail> tails;
  auto used = [&](int32_t i) {
    int32_t n = static_cast<int32_t>(held[i].size());
    for (const Tail& t : tails) n += t.instance == InstanceId(i) ? 1 : 0;
    return n;
  };
  auto random_bytes = [&] {
    std::vector<std::byte> b(slot_bytes);
    for (std::byte& x : b) x = static_cast<std::byte>(rng() & 0xff);
    return b;
  };
  uint64_t sequence = 0;
  for (int step = 0; step < 300; ++step) {
    SCOPED_TRACE(testing::Message() << "step " << step);
    const int32_t i = static_cast<int32_t>(rng() % kInstances);
    const InstanceId inst(i);
    const uint64_t id = 1 + rng() % 16;
    const StoredMeta meta{.parent = SegmentId(100 + id),
                          .num_tokens = 1 + static_cast<int32_t>(id % 4),
                          .placement_sequence = ++sequence};
    switch (rng() % 5) {
      case 0: {  // a tail block of instance 0 (this process) or 1, written through the mapping
        absl::StatusOr<DeviceSlot> t = pool.AllocateTail(inst);
        if (!mapped && i == 1) {
          // Its slots cannot be written from here: the lake keeps tails off it.
          EXPECT_EQ(t.status().code(), absl::StatusCode::kFailedPrecondition) << t.status();
          break;
        }
        if (used(i) == kSlots) {
          EXPECT_EQ(t.status().code(), absl::StatusCode::kInternal) << t.status();
          break;
        }
        ASSERT_TRUE(t.ok()) << t.status();
        std::vector<std::byte> bytes = random_bytes();
        ASSERT_EQ(
            cudaMemcpyAsync(t->data, bytes.data(), slot_bytes, cudaMemcpyHostToDevice, stream),
            cudaSuccess);
        tails.push_back({inst, *t, std::move(bytes)});
        break;
      }
      case 1: {  // a tail block stored on an instance (the holder copies it device to device)
        if (tails.empty()) break;
        const size_t k = rng() % tails.size();
        absl::Status s = pool.Store(inst, SegmentId(id), tails[k].slot.data, meta, stream);
        // An existing copy is overwritten.
        if (!held[i].contains(id) && used(i) == kSlots) {
          EXPECT_EQ(s.code(), absl::StatusCode::kResourceExhausted) << s;
        } else {
          ASSERT_TRUE(s.ok()) << s;
          held[i][id] = {tails[k].bytes, meta};
        }
        break;
      }
      case 2: {  // a tail block committed in place, or given back
        if (tails.empty()) break;
        const size_t k = rng() % tails.size();
        Tail t = tails[k];
        tails.erase(tails.begin() + static_cast<std::ptrdiff_t>(k));
        ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
        const int32_t ti = t.instance.value();
        if (rng() % 2 == 0 && !held[ti].contains(id)) {
          ASSERT_TRUE(pool.CommitTail(t.instance, t.slot.slot, SegmentId(id), meta).ok());
          held[ti][id] = {std::move(t.bytes), meta};
        } else {
          ASSERT_TRUE(pool.FreeTail(t.instance, t.slot.slot).ok());
        }
        break;
      }
      case 3:
      case 4: {  // a free: of a held segment, of one not held, or guarded by an older eviction
        uint64_t victim = id;
        if (!held[i].empty() && rng() % 4 != 0) {
          auto it = held[i].begin();
          std::advance(it, static_cast<std::ptrdiff_t>(rng() % held[i].size()));
          victim = it->first;
        }
        auto it = held[i].find(victim);
        const bool stale = it != held[i].end() && rng() % 3 == 0;
        const uint64_t evicted_at =
            stale ? it->second.second.placement_sequence - 1 : (it == held[i].end() ? 0 : sequence);
        absl::Status s = pool.Free(inst, SegmentId(victim), evicted_at, stream);
        if (it == held[i].end()) {
          EXPECT_EQ(s.code(), absl::StatusCode::kNotFound) << s;
          if (i == 1) {
            EXPECT_NE(s.message().find("instance 1"), std::string::npos) << s;
          }
        } else if (stale) {
          EXPECT_EQ(s.code(), absl::StatusCode::kFailedPrecondition) << s;
        } else {
          EXPECT_TRUE(s.ok()) << s;
          held[i].erase(it);
        }
        break;
      }
    }
    // Every segment, resolved at once, holds its bytes.
    std::vector<SlotRef> refs;
    std::vector<const std::vector<std::byte>*> want;
    for (int32_t k = 0; k < kInstances; ++k) {
      for (const auto& [segment, entry] : held[k]) {
        refs.push_back({InstanceId(k), SegmentId(segment)});
        want.push_back(&entry.first);
      }
    }
    std::vector<const std::byte*> at(refs.size());
    absl::Status resolved = pool.Resolve(refs, absl::MakeSpan(at));
    ASSERT_TRUE(resolved.ok()) << resolved;
    for (size_t r = 0; r < refs.size(); ++r) {
      ASSERT_TRUE(ReadBack(at[r], slot_bytes) == *want[r])
          << "segment " << refs[r].segment.value() << " on instance " << refs[r].holder.value();
    }
    ASSERT_EQ(pool.store().used(), used(0));
    if (step % 25 == 0 || step == 299) {
      std::map<uint64_t, StoredMeta> theirs = p.ChildHeld();
      ASSERT_EQ(theirs.size(), held[1].size());
      for (const auto& [segment, entry] : held[1]) {
        ASSERT_TRUE(theirs.contains(segment)) << segment;
        EXPECT_EQ(theirs[segment].placement_sequence, entry.second.placement_sequence);
        EXPECT_EQ(theirs[segment].num_tokens, entry.second.num_tokens);
        EXPECT_EQ(theirs[segment].parent, entry.second.parent);
      }
    }
  }
  // A segment that is not there is named with its holder.
  const SlotRef absent{InstanceId(1), SegmentId(999)};
  const std::byte* where = nullptr;
  absl::Status missing = pool.Resolve({&absent, 1}, {&where, 1});
  EXPECT_EQ(missing.code(), absl::StatusCode::kInternal) << missing;
  EXPECT_NE(missing.message().find("instance 1"), std::string::npos) << missing;
  ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
  for (const Tail& t : tails) ASSERT_TRUE(pool.FreeTail(t.instance, t.slot.slot).ok());
  cudaStreamDestroy(stream);
  const PeerDevicePool::Traffic t = pool.traffic();
  std::cout << "locates " << t.locate_messages << ", fetches " << t.fetch_messages << " ("
            << t.fetched_slots << " slots fetched, " << t.staged_hits << " staged copies reused), "
            << t.byte_stores << " stores with bytes of " << t.store_messages << "\n";
  if (mapped) {
    EXPECT_EQ(t.fetch_messages, 0);
    EXPECT_GT(t.locate_messages, 0);
  } else {
    EXPECT_EQ(t.locate_messages, 0);
    EXPECT_GT(t.fetched_slots, 0);
    EXPECT_GT(t.staged_hits, t.fetched_slots) << "the staging cache kept nothing";
    EXPECT_EQ(t.byte_stores, t.store_messages);
    EXPECT_GT(t.byte_stores, 0);
  }
}

// A peer's tail slots are its own, and go back when its process is gone: the holder gives back
// the tail slots that the other process's driver took and neither committed nor gave back, and
// refuses that driver's later calls about them.
TEST(PeerDevicePoolTest, TheTailSlotsOfAPeerThatIsGoneAreGivenBack) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const attention::KvSlotLayout layout = SmallLayout();
  Pair p;
  ASSERT_NO_FATAL_FAILURE(StartPair(p, /*slots=*/4, layout));
  PeerDevicePool& pool = *p.side.pool;
  const InstanceId holder(1);
  std::vector<DeviceSlot> tails;
  for (int k = 0; k < 3; ++k) {
    absl::StatusOr<DeviceSlot> t = pool.AllocateTail(holder);
    ASSERT_TRUE(t.ok()) << t.status();
    tails.push_back(*t);
  }
  // One becomes a segment in place (no longer a tail), one is given back, one stays a tail.
  ASSERT_TRUE(pool.CommitTail(holder, tails[0].slot, SegmentId(7), {.num_tokens = 4}).ok());
  ASSERT_TRUE(pool.FreeTail(holder, tails[1].slot).ok());
  // A slot given back is no longer this driver's to give back again.
  EXPECT_EQ(pool.FreeTail(holder, tails[1].slot).code(), absl::StatusCode::kFailedPrecondition);
  ASSERT_TRUE(p.child->SendLine("forget 0"));
  std::string why;
  std::optional<std::string> line = p.child->ReadLine(&why);
  ASSERT_TRUE(line.has_value()) << why;
  EXPECT_EQ(*line, "1 1") << "freed, then used: only the segment stays";
  EXPECT_EQ(pool.CommitTail(holder, tails[2].slot, SegmentId(8), {.num_tokens = 4}).code(),
            absl::StatusCode::kFailedPrecondition);
  EXPECT_EQ(pool.FreeTail(holder, tails[2].slot).code(), absl::StatusCode::kFailedPrecondition);
  // Its slots are the holder's again.
  for (int k = 0; k < 3; ++k) ASSERT_TRUE(pool.AllocateTail(holder).ok()) << k;
  const std::map<uint64_t, StoredMeta> theirs = p.ChildHeld();
  EXPECT_EQ(theirs.size(), 1u);
  EXPECT_TRUE(theirs.contains(7));
}

TEST_P(PeerDevicePoolAccessTest, GpuEngineComputesOverTwoProcessesAndMatchesTheCpuReference) {
  if (!HaveGpu()) GTEST_SKIP() << "no CUDA device";
  const bool mapped = GetParam();
  using testing_util::MakeModels;
  const uint64_t seed = 32;
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  const LlamaConfig c = testing_util::FixedConfig();
  testing_util::Models m = MakeModels(c, seed);
  ASSERT_TRUE(m.cpu != nullptr && m.gpu != nullptr);
  auto cpu = Engine::Create(m.cpu.get(), {.use_pool = false});
  ASSERT_TRUE(cpu.ok()) << cpu.status();
  // Instance 0 alone cannot hold the batch's segments: they spill onto instance 1.
  const GpuEngineOptions options{.num_instances = kInstances,
                                 .segment_tokens = 8,
                                 .slots_per_instance = 40,
                                 .max_batch_tokens = 128};
  const attention::KvSlotLayout layout =
      PoolSlotLayout(c, options.segment_tokens, attention::KvDtype::kBFloat16);
  Pair p;
  ASSERT_NO_FATAL_FAILURE(StartPair(p, options.slots_per_instance, layout, mapped));
  ManualClock clock(1);
  auto lake = lake::Lake::Create(PoolLakeOptions(c,
                                                 {.num_instances = kInstances,
                                                  .segment_tokens = options.segment_tokens,
                                                  .slots_per_instance = options.slots_per_instance},
                                                 attention::KvDtype::kBFloat16),
                                 &clock);
  ASSERT_TRUE(lake.ok()) << lake.status();
  // Unmapped, instance 1 is another device: the tails stay on instance 0.
  if (!mapped) ASSERT_TRUE((*lake)->SetDeviceDomains({0, 1}).ok());
  lake::LocalControlPlane control(lake->get(), &clock);
  auto gpu =
      GpuEngine::CreateOver(m.gpu.get(), options, &control, p.side.pool.get(), InstanceId(0));
  ASSERT_TRUE(gpu.ok()) << gpu.status();

  std::vector<GenerateRequest> requests;
  std::vector<GenerateResult> want;
  std::vector<int32_t> shared(24);
  for (int32_t& t : shared) t = static_cast<int32_t>(rng() % c.vocab_size);
  for (int i = 0; i < 8; ++i) {
    std::vector<int32_t> prompt = shared;
    for (size_t k = 0; k < 40 + rng() % 40; ++k) {
      prompt.push_back(static_cast<int32_t>(rng() % c.vocab_size));
    }
    auto w = (*cpu)->Generate(prompt, 6);
    ASSERT_TRUE(w.ok()) << w.status();
    requests.push_back(
        {.prompt = prompt,
         .max_new_tokens = 6,
         .force_tokens = std::vector<int32_t>(w->tokens.begin(), w->tokens.end() - 1)});
    want.push_back(*std::move(w));
  }
  const auto first = (*gpu)->GenerateBatch(requests);
  ASSERT_NO_FATAL_FAILURE(testing_util::ExpectBatchMatches(first, want));
  // What the lake lists on instance 1 is what the other process holds.
  const std::map<uint64_t, StoredMeta> theirs = p.ChildHeld();
  EXPECT_GT(theirs.size(), 0u) << "nothing spilled onto instance 1";
  const lake::LakeStats stats = (*lake)->Stats();
  EXPECT_EQ(static_cast<int64_t>(theirs.size()) + p.side.pool->store().used(), stats.replicas);
  EXPECT_TRUE((*lake)->CheckIntegrity().ok()) << (*lake)->CheckIntegrity();
  // The same prompts again: their cached prefixes are read where they are, on both instances.
  const auto again = (*gpu)->GenerateBatch(requests);
  ASSERT_NO_FATAL_FAILURE(testing_util::ExpectBatchMatches(again, want));
  int64_t cached = 0, remote = 0;
  for (const auto& r : again) {
    cached += r->cached_tokens;
    remote += r->remote_attend_calls + r->pulled_segments;
  }
  EXPECT_GT(cached, 0);
  EXPECT_GT(remote, 0) << "no request read instance 1's slots";
  std::cout << "instance 1 holds " << theirs.size() << " segments; the repeat read " << cached
            << " cached tokens, " << remote << " partials or pulls from instance 1\n";
  const PeerDevicePool::Traffic t = p.side.pool->traffic();
  std::cout << "fetched " << t.fetched_slots << " slots in " << t.fetch_messages << " fetches ("
            << t.staged_hits << " reused), stores with bytes " << t.byte_stores
            << ", tail messages " << t.tail_messages << "\n";
  if (!mapped) {
    EXPECT_GT(t.fetched_slots, 0);
    EXPECT_GT(t.byte_stores, 0);
    EXPECT_EQ(t.tail_messages, 0);
  }
}

}  // namespace
}  // namespace tokenlake::engine::cuda

// The other instance's process is this binary with --peer-arena-child=holder; GoogleTest runs
// otherwise.
int main(int argc, char** argv) {
  namespace store = tokenlake::store;
  if (store::IsChildInvocation(argc, argv)) {
    return store::RunChild(argc, argv, {{"holder", tokenlake::engine::cuda::ChildHolder}});
  }
  ::testing::InitGoogleTest(&argc, argv);
  return RUN_ALL_TESTS();
}
