// The pool path against the no-pool reference on a random tiny model: randomised multi-turn and
// shared-prefix workloads over 1-4 instances, with and without eviction, checking after every
// request the outputs against the reference and the pool's conservation invariants (the data
// plane's stores hold exactly the lake's replicas, nothing stays pinned, the hits are what a
// naive model of the cache predicts).
#include "tokenlake/engine/engine.h"

#include <iostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tokenlake/engine/checkpoint_testing.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/engine/safetensors.h"
#include "tokenlake/transport/fault_transport.h"
#include "tokenlake/transport/loopback.h"

namespace tokenlake::engine {
namespace {

LlamaConfig TinyConfig(bool tied) {
  return LlamaConfig{.vocab_size = 64,
                     .hidden_size = 32,
                     .intermediate_size = 48,
                     .num_layers = 2,
                     .num_heads = 4,
                     .num_kv_heads = 2,
                     .head_dim = 8,
                     .rms_norm_eps = 1e-5f,
                     .rope_theta = 10000.0,
                     .max_position_embeddings = 512,
                     .tie_word_embeddings = tied};
}

// Random weights as a safetensors image (exercises the loader too).
std::string RandomCheckpoint(const LlamaConfig& c, uint32_t seed, const std::string& skip = "") {
  std::mt19937 rng(seed);
  std::uniform_real_distribution<float> u(-0.3f, 0.3f);
  return testing_checkpoint::LlamaCheckpointImage(
      c,
      [&](const std::vector<int64_t>&, bool norm, std::vector<float>& v) {
        for (float& x : v) x = norm ? 1.0f + u(rng) : u(rng);
      },
      skip);
}

std::unique_ptr<LlamaModel> TinyModel(bool tied, uint32_t seed) {
  const LlamaConfig c = TinyConfig(tied);
  auto file = SafetensorsFile::FromBytes(RandomCheckpoint(c, seed), "tiny");
  EXPECT_TRUE(file.ok()) << file.status();
  auto model = LlamaModel::FromSafetensors(c, **file);
  EXPECT_TRUE(model.ok()) << model.status();
  return *std::move(model);
}

// Naive cache model: the distinct full-segment prefixes of every computed history.
struct NaiveCache {
  int32_t s;
  std::set<std::vector<int32_t>> segments;  // each entry: the whole prefix up to a segment end

  void Add(const std::vector<int32_t>& history) {
    for (size_t end = static_cast<size_t>(s); end <= history.size();
         end += static_cast<size_t>(s)) {
      segments.insert(std::vector<int32_t>(history.begin(), history.begin() + end));
    }
  }
  // Cached prefix of `prompt`: whole segments, at least one token left to compute.
  int64_t Hit(const std::vector<int32_t>& prompt) const {
    int64_t hit = 0;
    for (size_t end = static_cast<size_t>(s); end < prompt.size(); end += static_cast<size_t>(s)) {
      if (!segments.contains(std::vector<int32_t>(prompt.begin(), prompt.begin() + end))) break;
      hit = static_cast<int64_t>(end);
    }
    return hit;
  }
};

struct PoolCase {
  int32_t num_instances;
  int32_t segment_tokens;
  int32_t slots_per_instance;
  bool rotate;
  bool tied;
  int32_t rebalance_every = 0;
};

class EnginePoolRandomTest : public testing::TestWithParam<PoolCase> {};

TEST_P(EnginePoolRandomTest, MatchesNoPoolReferenceAndKeepsThePoolConsistent) {
  const PoolCase pc = GetParam();
  const uint32_t seed =
      20250 + static_cast<uint32_t>(pc.num_instances * 1000 + pc.segment_tokens * 100 +
                                    pc.slots_per_instance + (pc.rotate ? 7 : 0));
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  auto model = TinyModel(pc.tied, seed);
  auto ref = Engine::Create(model.get(), {.use_pool = false});
  ASSERT_TRUE(ref.ok());
  auto eng = Engine::Create(model.get(), {.use_pool = true,
                                          .num_instances = pc.num_instances,
                                          .segment_tokens = pc.segment_tokens,
                                          .slots_per_instance = pc.slots_per_instance,
                                          .rotate_compute_instance = pc.rotate,
                                          .rebalance_every_requests = pc.rebalance_every,
                                          // Small thresholds so that the tiny workload has
                                          // heavy hitters and imbalance to fix.
                                          .heavy_hitter = {.half_life_us = 20'000,
                                                           .heavy_fraction = 0.2,
                                                           .replica_target_fraction = 0.2,
                                                           .track_fraction = 0.01,
                                                           .min_heavy_load = 0},
                                          .balancer = {.imbalance_threshold = 0.1}});
  ASSERT_TRUE(eng.ok()) << eng.status();
  const bool evicting = pc.slots_per_instance < 64;
  std::mt19937 rng(seed);
  auto tok = [&] { return static_cast<int32_t>(rng() % 64); };
  std::vector<std::vector<int32_t>> docs(3);
  for (auto& d : docs) {
    d.resize(10 + rng() % 20);
    for (int32_t& t : d) t = tok();
  }
  NaiveCache naive{pc.segment_tokens, {}};
  std::vector<std::vector<int32_t>> histories;
  int64_t total_hit = 0, remote_attends = 0;
  for (int step = 0; step < 24; ++step) {
    SCOPED_TRACE(testing::Message() << "request " << step);
    std::vector<int32_t> prompt;
    const int kind = static_cast<int>(rng() % 4);
    if (kind == 0 || histories.empty()) {  // fresh
      prompt.resize(1 + rng() % 12);
      for (int32_t& t : prompt) t = tok();
    } else if (kind == 1) {  // a document prefix + question
      const auto& d = docs[rng() % docs.size()];
      prompt.assign(d.begin(), d.begin() + static_cast<long>(1 + rng() % d.size()));
      for (uint32_t i = 0, n = rng() % 6; i < n; ++i) prompt.push_back(tok());
    } else if (kind == 2) {  // next turn of an earlier conversation
      prompt = histories[rng() % histories.size()];
      prompt.resize(std::min<size_t>(prompt.size(), 40));
      for (uint32_t i = 0, n = 1 + rng() % 5; i < n; ++i) prompt.push_back(tok());
    } else {  // exact repeat of an earlier prompt's history
      prompt = histories[rng() % histories.size()];
      prompt.resize(std::min<size_t>(prompt.size(), 40));
    }
    const int32_t max_new = 1 + static_cast<int32_t>(rng() % 4);
    auto want = (*ref)->Generate(prompt, max_new);
    ASSERT_TRUE(want.ok()) << want.status();
    auto got = (*eng)->Generate(prompt, max_new);
    // A request needing more segments than the whole pool holds is refused with a clear error.
    const int64_t seg = pc.segment_tokens;
    const int64_t needed = (static_cast<int64_t>(prompt.size()) + max_new + seg - 1) / seg;
    if (needed > int64_t{pc.num_instances} * pc.slots_per_instance) {
      ASSERT_EQ(got.status().code(), absl::StatusCode::kResourceExhausted) << got.status();
      EXPECT_NE(got.status().message().find("the whole pool holds"), std::string::npos);
      continue;
    }
    ASSERT_TRUE(got.ok()) << got.status();

    EXPECT_EQ(got->tokens, want->tokens);
    for (size_t v = 0; v < want->last_logits.size(); ++v) {
      ASSERT_NEAR(got->last_logits[v], want->last_logits[v], 1e-4) << v;
      ASSERT_NEAR(got->decode_logits[v], want->decode_logits[v], 1e-4) << v;
    }
    // Hits: whole segments, never the whole prompt; exactly the naive model's without eviction.
    EXPECT_EQ(got->cached_tokens % pc.segment_tokens, 0);
    EXPECT_LT(got->cached_tokens, static_cast<int64_t>(prompt.size()));
    if (evicting) {
      EXPECT_LE(got->cached_tokens, naive.Hit(prompt));
    } else {
      EXPECT_EQ(got->cached_tokens, naive.Hit(prompt));
    }
    total_hit += got->cached_tokens;
    remote_attends += got->remote_attend_calls + got->pulled_segments;
    std::vector<int32_t> history = prompt;
    history.insert(history.end(), got->tokens.begin(), got->tokens.end() - 1);
    naive.Add(history);
    histories.push_back(history);

    // Conservation after every request.
    const lake::Lake& lk = *(*eng)->lake();
    ASSERT_TRUE(lk.CheckIntegrity().ok()) << lk.CheckIntegrity();
    const lake::LakeStats stats = lk.Stats();
    EXPECT_EQ(stats.pinned_segments, 0);
    EXPECT_EQ(stats.active_requests, 0);
    if (!evicting) {
      EXPECT_EQ(stats.segments, static_cast<int64_t>(naive.segments.size()));
    }
    std::vector<std::set<uint64_t>> lake_on(static_cast<size_t>(pc.num_instances));
    lk.prefix_tree().ForEachNode([&](const index::PrefixTree::Node& node) {
      for (InstanceId r : node.replicas)
        lake_on[static_cast<size_t>(r.value())].insert(node.id.value());
    });
    for (int32_t i = 0; i < pc.num_instances; ++i) {
      const store::SegmentStore& st = (*eng)->instance_pool()->store(InstanceId(i));
      std::set<uint64_t> data_on;
      for (SegmentId id : st.Segments()) data_on.insert(id.value());
      EXPECT_EQ(data_on, lake_on[static_cast<size_t>(i)]) << "instance " << i;
      EXPECT_EQ(st.num_pinned(), 0);
      EXPECT_LE(st.used(), pc.slots_per_instance);
    }
  }
  EXPECT_GT(total_hit, 0);
  const lake::LakeStats stats = (*eng)->lake()->Stats();
  std::cout << "hit tokens " << total_hit << ", segments " << stats.segments
            << ", evicted replicas " << stats.evicted_replicas << ", not stored "
            << stats.not_stored_segments << ", remote attends " << remote_attends << ", redundancy "
            << stats.redundancy << ", rebalance actions " << (*eng)->rebalance_actions() << "\n";
  if (pc.rebalance_every > 0) {
    EXPECT_GT((*eng)->rebalance_actions(), 0);
  }
  if (evicting) {
    EXPECT_GT(stats.evicted_replicas, 0);
  }
  if (pc.rotate) {
    EXPECT_GT(remote_attends, 0);
  }
}

INSTANTIATE_TEST_SUITE_P(
    Pools, EnginePoolRandomTest,
    testing::Values(PoolCase{1, 4, 512, false, false}, PoolCase{2, 3, 512, true, false},
                    PoolCase{4, 8, 512, true, true}, PoolCase{3, 4, 6, true, false},
                    PoolCase{2, 2, 13, false, true}, PoolCase{4, 1, 13, true, false},
                    PoolCase{4, 4, 512, true, false, 2}, PoolCase{3, 2, 9, false, true, 1}),
    [](const testing::TestParamInfo<PoolCase>& param_info) {
      const PoolCase& c = param_info.param;
      return absl::StrFormat("N%d_S%d_Slots%d%s%s%s", c.num_instances, c.segment_tokens,
                             c.slots_per_instance, c.rotate ? "_Rotate" : "", c.tied ? "_Tied" : "",
                             c.rebalance_every > 0 ? "_Rebalance" : "");
    });

// Continuous batching: random requests (shared prefixes, repeats, multi-turn follow-ups) arrive
// at random iterations into one GenerateBatch call with a random token budget, request cap and
// pool (small pools make requests wait for memory); every request's tokens and logits equal its
// own single-request run on the reference path (float32 within 1e-4).
TEST(EngineBatchTest, EachRequestMatchesItsSingleRunWhateverTheBatchAndArrivalOrder) {
  for (uint32_t round = 0; round < 10; ++round) {
    const uint32_t seed = 90210 + round;
    SCOPED_TRACE(testing::Message() << "seed=" << seed);
    std::cout << "seed=" << seed << "\n";
    std::mt19937 rng(seed);
    auto model = TinyModel(round % 3 == 0, seed);
    auto ref = Engine::Create(model.get(), {.use_pool = false});
    ASSERT_TRUE(ref.ok());
    const int32_t instances = 1 + static_cast<int32_t>(rng() % 4);
    const int32_t slots = (rng() % 2 == 0) ? 512 : 4 + static_cast<int32_t>(rng() % 8);
    const int32_t seg = 1 + static_cast<int32_t>(rng() % 6);
    auto eng =
        Engine::Create(model.get(), {.use_pool = true,
                                     .num_instances = instances,
                                     .segment_tokens = seg,
                                     .slots_per_instance = slots,
                                     .kv_dtype = attention::KvDtype::kFloat32,
                                     .rotate_compute_instance = rng() % 2 == 0,
                                     .max_batch_tokens = 1 + static_cast<int64_t>(rng() % 64),
                                     .max_batch_requests = 1 + static_cast<int32_t>(rng() % 8)});
    ASSERT_TRUE(eng.ok()) << eng.status();
    auto tok = [&] { return static_cast<int32_t>(rng() % 64); };
    std::vector<std::vector<int32_t>> docs(2);
    for (auto& d : docs) {
      d.resize(8 + rng() % 30);
      for (int32_t& t : d) t = tok();
    }
    std::vector<GenerateRequest> requests;
    const int n = 3 + static_cast<int>(rng() % 10);
    for (int i = 0; i < n; ++i) {
      GenerateRequest r;
      const int kind = static_cast<int>(rng() % 3);
      if (kind == 0 || requests.empty()) {
        const auto& d = docs[rng() % docs.size()];
        r.prompt.assign(d.begin(), d.begin() + static_cast<long>(1 + rng() % d.size()));
      } else if (kind == 1) {
        r.prompt = requests[rng() % requests.size()].prompt;  // a repeat
      } else {
        r.prompt = requests[rng() % requests.size()].prompt;  // a follow-up turn
      }
      for (uint32_t k = 0, m = rng() % 8; k < m; ++k) r.prompt.push_back(tok());
      if (r.prompt.empty()) r.prompt.push_back(tok());
      r.max_new_tokens = 1 + static_cast<int32_t>(rng() % 6);
      r.arrival_iteration = static_cast<int32_t>(rng() % 8);
      requests.push_back(std::move(r));
    }
    std::vector<absl::StatusOr<GenerateResult>> got = (*eng)->GenerateBatch(requests);
    ASSERT_EQ(got.size(), requests.size());
    for (size_t i = 0; i < requests.size(); ++i) {
      SCOPED_TRACE(testing::Message() << "request " << i);
      auto want = (*ref)->Generate(requests[i].prompt, requests[i].max_new_tokens);
      ASSERT_TRUE(want.ok()) << want.status();
      const int64_t needed =
          (static_cast<int64_t>(requests[i].prompt.size()) + requests[i].max_new_tokens + seg - 1) /
          seg;
      if (needed > int64_t{instances} * slots) {
        // More segments than the whole pool holds: refused, naming the sizes.
        ASSERT_EQ(got[i].status().code(), absl::StatusCode::kResourceExhausted) << got[i].status();
        continue;
      }
      ASSERT_TRUE(got[i].ok()) << got[i].status();
      EXPECT_EQ(got[i]->tokens, want->tokens);
      ASSERT_EQ(got[i]->last_logits.size(), want->last_logits.size());
      ASSERT_EQ(got[i]->decode_logits.size(), want->decode_logits.size());
      for (size_t v = 0; v < want->last_logits.size(); ++v) {
        ASSERT_NEAR(got[i]->last_logits[v], want->last_logits[v], 1e-4) << v;
        ASSERT_NEAR(got[i]->decode_logits[v], want->decode_logits[v], 1e-4) << v;
      }
    }
    const lake::Lake& lk = *(*eng)->lake();
    ASSERT_TRUE(lk.CheckIntegrity().ok()) << lk.CheckIntegrity();
    EXPECT_EQ(lk.Stats().pinned_segments, 0);
    EXPECT_EQ(lk.Stats().active_requests, 0);
    EXPECT_EQ(lk.Stats().reserved_slots, 0);
    int64_t stored = 0;
    for (int32_t i = 0; i < instances; ++i) {
      stored += (*eng)->instance_pool()->store(InstanceId(i)).used();
    }
    EXPECT_EQ(stored, lk.Stats().replicas);
    std::cout << "requests " << n << ", instances " << instances << ", slots " << slots
              << ", most requests in one iteration " << (*eng)->max_batch_requests_seen()
              << ", admissions deferred " << lk.Stats().admissions_deferred << "\n";
  }
}

TEST(EngineTest, LosingAnInstanceLosesItsCacheButNeverCorrectness) {
  auto model = TinyModel(false, 11);
  auto ref = Engine::Create(model.get(), {.use_pool = false});
  auto eng = Engine::Create(
      model.get(),
      {.use_pool = true, .num_instances = 3, .segment_tokens = 4, .rotate_compute_instance = true});
  ASSERT_TRUE(ref.ok() && eng.ok());
  std::mt19937 rng(3);
  std::vector<int32_t> doc(30);
  for (int32_t& t : doc) t = static_cast<int32_t>(rng() % 64);
  auto ask = [&](int32_t q) {
    std::vector<int32_t> p = doc;
    p.push_back(q);
    auto want = (*ref)->Generate(p, 3);
    auto got = (*eng)->Generate(p, 3);
    EXPECT_TRUE(want.ok() && got.ok());
    EXPECT_EQ(got->tokens, want->tokens);
    for (size_t v = 0; v < want->last_logits.size(); ++v) {
      EXPECT_NEAR(got->last_logits[v], want->last_logits[v], 1e-4);
    }
    return got->cached_tokens;
  };
  EXPECT_EQ(ask(1), 0);
  EXPECT_EQ(ask(2), 28);
  const int64_t before = (*eng)->lake()->Stats().replicas;
  ASSERT_GT((*eng)->instance_pool()->store(InstanceId(0)).used() +
                (*eng)->instance_pool()->store(InstanceId(1)).used(),
            0);
  // Drop the instance holding the first segment: the whole chain behind it becomes unreachable.
  const index::PrefixTree::Node* first = nullptr;
  (*eng)->lake()->prefix_tree().ForEachNode([&](const index::PrefixTree::Node& n) {
    if (n.depth == 0) first = &n;
  });
  ASSERT_NE(first, nullptr);
  const InstanceId victim = first->replicas[0];
  auto freed = (*eng)->DropInstance(victim);
  ASSERT_TRUE(freed.ok()) << freed.status();
  EXPECT_EQ(*freed, before);  // every segment hangs off the first one
  EXPECT_EQ((*eng)->lake()->Stats().replicas, 0);
  for (int32_t i = 0; i < 3; ++i) {
    EXPECT_EQ((*eng)->instance_pool()->store(InstanceId(i)).used(), 0);
  }
  EXPECT_EQ(ask(3), 0);   // recomputed, same answer
  EXPECT_EQ(ask(4), 28);  // and cached again
  EXPECT_TRUE((*eng)->lake()->CheckIntegrity().ok());
  EXPECT_EQ((*eng)->DropInstance(InstanceId(7)).status().code(),
            absl::StatusCode::kInvalidArgument);
  auto no_pool = Engine::Create(model.get(), {.use_pool = false});
  EXPECT_EQ((*no_pool)->DropInstance(InstanceId(0)).status().code(),
            absl::StatusCode::kFailedPrecondition);
}

TEST(EngineTest, DelayedTransportChangesNothingAndLostRepliesAreDeadlineErrors) {
  auto model = TinyModel(true, 13);
  auto ref = Engine::Create(model.get(), {.use_pool = false});
  transport::FaultTransport* fault = nullptr;
  auto eng =
      Engine::Create(model.get(), {.use_pool = true,
                                   .num_instances = 3,
                                   .segment_tokens = 4,
                                   .rotate_compute_instance = true,
                                   .reply_timeout = absl::Milliseconds(300),
                                   .wrap_transport = [&fault](transport::Transport* inner)
                                       -> absl::StatusOr<std::unique_ptr<transport::Transport>> {
                                     auto f = transport::FaultTransport::Create(
                                         inner, {.delay = absl::Milliseconds(1)});
                                     if (!f.ok()) return f.status();
                                     fault = f->get();
                                     return std::unique_ptr<transport::Transport>(*std::move(f));
                                   }});
  ASSERT_TRUE(ref.ok() && eng.ok()) << eng.status();
  ASSERT_NE(fault, nullptr);
  std::vector<int32_t> doc = {3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5, 8, 9, 7, 9, 3, 2, 3, 8, 4};
  for (int32_t q = 0; q < 4; ++q) {
    std::vector<int32_t> p = doc;
    p.push_back(q);
    auto want = (*ref)->Generate(p, 3);
    auto got = (*eng)->Generate(p, 3);
    ASSERT_TRUE(want.ok() && got.ok()) << got.status();
    EXPECT_EQ(got->tokens, want->tokens);
    for (size_t v = 0; v < want->last_logits.size(); ++v) {
      ASSERT_NEAR(got->last_logits[v], want->last_logits[v], 1e-4);
    }
  }
  EXPECT_GT(fault->delayed(), 0);
  // Every message lost: the request fails with a deadline error instead of hanging.
  ASSERT_TRUE(fault->SetDropProbability(1.0).ok());
  doc.push_back(42);
  const absl::Time start = absl::Now();
  auto lost = (*eng)->Generate(doc, 2);
  EXPECT_EQ(lost.status().code(), absl::StatusCode::kDeadlineExceeded) << lost.status();
  EXPECT_LT(absl::Now() - start, absl::Seconds(10));
  EXPECT_GT(fault->dropped(), 0);
  EXPECT_EQ((*eng)->lake()->Stats().active_requests, 0);  // released despite the failure
}

TEST(EngineTest, BfloatPoolStaysCloseToTheFloatReference) {
  auto model = TinyModel(false, 5);
  auto ref = Engine::Create(model.get(), {.use_pool = false});
  auto eng = Engine::Create(model.get(), {.use_pool = true,
                                          .num_instances = 2,
                                          .segment_tokens = 4,
                                          .kv_dtype = attention::KvDtype::kBFloat16,
                                          .rotate_compute_instance = true});
  ASSERT_TRUE(ref.ok() && eng.ok());
  const std::vector<int32_t> base = {5, 9, 13, 2, 44, 17, 8, 1, 60, 33, 21, 7, 3};
  ASSERT_TRUE((*eng)->Generate(base, 2).ok());
  std::vector<int32_t> longer = base;
  longer.insert(longer.end(), {11, 12, 13});
  auto want = (*ref)->Generate(longer, 1);
  auto got = (*eng)->Generate(longer, 1);
  ASSERT_TRUE(want.ok() && got.ok());
  EXPECT_EQ(got->cached_tokens, 12);
  float worst = 0;
  for (size_t v = 0; v < want->last_logits.size(); ++v) {
    worst = std::max(worst, std::abs(got->last_logits[v] - want->last_logits[v]));
  }
  EXPECT_GT(worst, 0.0f);   // the cached KV really was rounded to bf16 ...
  EXPECT_LT(worst, 5e-2f);  // ... and that costs little
}

// A request's segment salt (a tenant's) names its segments: the same prompt under another
// salt finds nothing cached, under the same salt all its full segments, whether it comes
// through Submit / Step or GenerateBatch.
TEST(EngineTest, SegmentSaltSeparatesCachesOnEveryPath) {
  auto model = TinyModel(false, 6);
  auto eng =
      Engine::Create(model.get(), {.use_pool = true, .num_instances = 1, .segment_tokens = 4});
  ASSERT_TRUE(eng.ok()) << eng.status();
  const std::vector<int32_t> prompt = {5, 9, 13, 2, 44, 17, 8, 1, 60, 33, 21, 7, 3};
  auto batch = [&](uint64_t salt) {
    const GenerateRequest r{.prompt = prompt, .max_new_tokens = 2, .segment_salt = salt};
    std::vector<absl::StatusOr<GenerateResult>> got = (*eng)->GenerateBatch({&r, 1});
    EXPECT_TRUE(got[0].ok()) << got[0].status();
    return got[0].ok() ? got[0]->cached_tokens : -1;
  };
  auto submitted = [&](uint64_t id, uint64_t salt) -> int64_t {
    EXPECT_TRUE(
        (*eng)
            ->Submit(
                {.id = RequestId(id), .prompt = prompt, .max_new_tokens = 2, .segment_salt = salt})
            .ok());
    for (int steps = 0; steps < 100 && !(*eng)->idle(); ++steps) {
      for (auto& [rid, r] : (*eng)->Step()) {
        EXPECT_TRUE(r.ok()) << r.status();
        if (rid == RequestId(id) && r.ok()) return r->cached_tokens;
      }
    }
    return -1;
  };
  EXPECT_EQ(batch(77), 0);
  EXPECT_EQ(batch(77), 12);
  EXPECT_EQ(batch(78), 0);
  EXPECT_EQ(submitted(1000, 79), 0);
  EXPECT_EQ(submitted(1001, 79), 12);
  EXPECT_EQ(batch(79), 12);
}

TEST(EngineTest, RejectsBadInputWithClearErrors) {
  auto model = TinyModel(false, 9);
  for (bool pool : {false, true}) {
    auto eng = Engine::Create(model.get(), {.use_pool = pool, .num_instances = 2});
    ASSERT_TRUE(eng.ok());
    auto empty = (*eng)->Generate({}, 1);
    EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument);
    const std::vector<int32_t> bad = {1, 2, 64};
    auto oov = (*eng)->Generate(bad, 1);
    EXPECT_EQ(oov.status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_NE(oov.status().message().find("index 2"), std::string::npos) << oov.status();
    const std::vector<int32_t> neg = {-1};
    EXPECT_EQ((*eng)->Generate(neg, 1).status().code(), absl::StatusCode::kInvalidArgument);
    const std::vector<int32_t> ok = {1, 2, 3};
    EXPECT_EQ((*eng)->Generate(ok, 0).status().code(), absl::StatusCode::kInvalidArgument);
    EXPECT_TRUE((*eng)->Generate(ok, 1).ok());  // still usable after the errors
  }
  EXPECT_EQ(Engine::Create(nullptr, {}).status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Engine::Create(model.get(), {.num_instances = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Engine::Create(model.get(), {.segment_tokens = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(Engine::Create(model.get(), {.slots_per_instance = 0}).status().code(),
            absl::StatusCode::kInvalidArgument);
}

TEST(EngineTest, LoaderNamesTheMissingOrMisshapenTensor) {
  const LlamaConfig c = TinyConfig(false);
  auto file = SafetensorsFile::FromBytes(
      RandomCheckpoint(c, 1, "model.layers.1.mlp.up_proj.weight"), "ckpt.safetensors");
  ASSERT_TRUE(file.ok());
  auto m = LlamaModel::FromSafetensors(c, **file);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find("model.layers.1.mlp.up_proj.weight"), std::string::npos);
  EXPECT_NE(m.status().message().find("ckpt.safetensors"), std::string::npos);
  LlamaConfig wider = c;
  wider.intermediate_size = 50;
  file = SafetensorsFile::FromBytes(RandomCheckpoint(c, 1), "ckpt.safetensors");
  ASSERT_TRUE(file.ok());
  m = LlamaModel::FromSafetensors(wider, **file);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(m.status().message().find("model.layers.0.mlp.gate_proj.weight"), std::string::npos)
      << m.status();
  // Tied config, untied file: fine (lm_head is ignored); untied config, tied file: lm_head missing.
  LlamaConfig tied = c;
  tied.tie_word_embeddings = true;
  EXPECT_TRUE(LlamaModel::FromSafetensors(tied, **file).ok());
  auto tied_file = SafetensorsFile::FromBytes(RandomCheckpoint(tied, 1), "tied.safetensors");
  ASSERT_TRUE(tied_file.ok());
  m = LlamaModel::FromSafetensors(c, **tied_file);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(m.status().message().find("lm_head.weight"), std::string::npos);
  EXPECT_EQ(LlamaModel::Load("/nonexistent").status().code(), absl::StatusCode::kNotFound);
}

// The cluster's shape in one process: one lake behind a lake::LocalControlPlane, two InstancePools
// each hosting one instance on a shared transport, one engine per instance with a fixed
// computing instance. Requests alternate between the engines with caller-chosen ids; every
// answer equals the no-pool reference, and queries / KV really cross between the pools.
TEST(EngineOverPoolTest, EnginesOnSeparatePoolsShareOneLakeAndMatchTheReference) {
  const uint32_t seed = 777;
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  auto model = TinyModel(false, seed);
  const LlamaConfig& c = model->config();
  auto ref = Engine::Create(model.get(), {.use_pool = false});
  ASSERT_TRUE(ref.ok());
  const int32_t s = 4;
  ManualClock clock(1);
  lake::LakeOptions lo;
  lo.num_instances = 2;
  lo.segment_tokens = s;
  lo.slots_per_instance = 64;
  lo.heavy_hitter.num_instances = 2;
  lo.model = plan::ModelShape{.num_layers = c.num_layers,
                              .num_heads = c.num_heads,
                              .num_kv_heads = c.num_kv_heads,
                              .head_dim = c.head_dim,
                              .dtype_bytes = 4};
  auto lk = lake::Lake::Create(lo, &clock);
  ASSERT_TRUE(lk.ok()) << lk.status();
  lake::LocalControlPlane control(lk->get(), &clock);
  auto shared = transport::LoopbackTransport::Create({.num_endpoints = 5 + 4});
  ASSERT_TRUE(shared.ok());
  const attention::KvSlotLayout layout{.num_layers = c.num_layers,
                                       .segment_tokens = s,
                                       .num_kv_heads = c.num_kv_heads,
                                       .head_dim = c.head_dim,
                                       .dtype = attention::KvDtype::kFloat32};
  std::vector<std::unique_ptr<InstancePool>> pools;
  std::vector<std::unique_ptr<Engine>> engines;
  for (int32_t i = 0; i < 2; ++i) {
    InstancePool::Options po{.num_instances = 2,
                             .layout = layout,
                             .num_heads = c.num_heads,
                             .slots_per_instance = 64,
                             .external_transport = shared->get(),
                             .endpoint_base = 5};
    po.hosted = {InstanceId(i)};
    auto pool = InstancePool::Create(po);
    ASSERT_TRUE(pool.ok()) << pool.status();
    pools.push_back(*std::move(pool));
    auto eng = Engine::CreateOverPool(
        model.get(), {.segment_tokens = s},
        {.control_plane = &control, .pool = pools.back().get(), .compute_instance = InstanceId(i)});
    ASSERT_TRUE(eng.ok()) << eng.status();
    engines.push_back(*std::move(eng));
  }
  // Bad wiring is refused: an instance the pool does not host.
  EXPECT_EQ(
      Engine::CreateOverPool(
          model.get(), {.segment_tokens = s},
          {.control_plane = &control, .pool = pools[0].get(), .compute_instance = InstanceId(1)})
          .status()
          .code(),
      absl::StatusCode::kInvalidArgument);
  std::mt19937 rng(seed);
  std::vector<int32_t> doc(23);
  for (int32_t& t : doc) t = static_cast<int32_t>(rng() % 64);
  int64_t remote = 0, moved = 0, cached = 0;
  for (int32_t k = 0; k < 12; ++k) {
    SCOPED_TRACE(testing::Message() << "request " << k);
    std::vector<int32_t> prompt(doc.begin(), doc.begin() + 9 + rng() % 14);
    for (uint32_t i = 0, n = rng() % 4; i < n; ++i)
      prompt.push_back(static_cast<int32_t>(rng() % 64));
    const int32_t max_new = 1 + static_cast<int32_t>(rng() % 3);
    auto want = (*ref)->Generate(prompt, max_new);
    ASSERT_TRUE(want.ok());
    auto got = engines[static_cast<size_t>(k % 2)]->Generate(RequestId(100 + k), prompt, max_new);
    ASSERT_TRUE(got.ok()) << got.status();
    EXPECT_EQ(got->tokens, want->tokens);
    remote += got->remote_attend_calls;
    moved += got->pulled_segments + got->remote_stored_segments;
    cached += got->cached_tokens;
    ASSERT_TRUE((*lk)->CheckIntegrity().ok());
  }
  EXPECT_GT(cached, 0);
  EXPECT_GT(remote + moved, 0);
  // Every replica the lake lists is in the store of the pool that hosts it.
  (*lk)->prefix_tree().ForEachNode([&](const index::PrefixTree::Node& node) {
    for (InstanceId r : node.replicas) {
      EXPECT_TRUE(pools[static_cast<size_t>(r.value())]->store(r).Find(node.id).has_value());
    }
  });
  engines.clear();
  pools.clear();
  (*shared)->Shutdown();
}

}  // namespace
}  // namespace tokenlake::engine
