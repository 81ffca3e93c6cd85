// IterationLoop against a naive model: a fake executor whose "logits" are a hash of the KV
// context it is handed (the plan's cached segments as stored, the request's tail, the new
// tokens), so that any bookkeeping error of the loop (wrong cached prefix, wrong tail rows,
// wrong segment stored) changes the generated tokens; the expected tokens come from hashing the
// true sequence one token at a time. The control plane is the real lake.
#include "tokenlake/engine/iteration_loop.h"

#include <algorithm>
#include <cstdint>
#include <functional>
#include <iostream>
#include <map>
#include <memory>
#include <random>
#include <set>
#include <vector>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/iteration_loop_testing.h"
#include "tokenlake/lake/lake.h"

namespace tokenlake::engine {
namespace {

using testing_loop::FakeExecutor;
using testing_loop::kVocab;
using testing_loop::Naive;

// A lake of `instances` instances of `slots` segment slots of `s` tokens over a tiny model
// (its shape only sets the planner's byte costs).
lake::LakeOptions TestLakeOptions(int32_t instances, int32_t s, int32_t slots, int32_t layers = 1,
                                  int32_t heads = 1) {
  lake::LakeOptions lo;
  lo.num_instances = instances;
  lo.segment_tokens = s;
  lo.slots_per_instance = slots;
  lo.heavy_hitter.num_instances = instances;
  lo.model = plan::ModelShape{
      .num_layers = layers, .num_heads = heads, .num_kv_heads = 1, .head_dim = 8, .dtype_bytes = 4};
  return lo;
}

struct LoopCase {
  int32_t instances;
  int32_t segment_tokens;
  int32_t slots;
  int64_t max_batch_tokens;
  int32_t max_batch_requests;
  bool memory_admission;
  bool tails_in_pool = false;
};

class IterationLoopRandomTest : public testing::TestWithParam<LoopCase> {};

TEST_P(IterationLoopRandomTest, EveryRequestFinishesWithTheNaiveTokensUnderTheBudgets) {
  const LoopCase lc = GetParam();
  for (uint32_t round = 0; round < 6; ++round) {
    const uint32_t seed = 7100 + round * 13 + static_cast<uint32_t>(lc.slots * 7 + lc.instances) +
                          static_cast<uint32_t>(lc.max_batch_tokens);
    SCOPED_TRACE(testing::Message() << "seed=" << seed);
    std::cout << "seed=" << seed << "\n";
    std::mt19937 rng(seed);
    ManualClock clock(1);
    auto lk = lake::Lake::Create(
        TestLakeOptions(lc.instances, lc.segment_tokens, lc.slots, /*layers=*/2, /*heads=*/2),
        &clock);
    ASSERT_TRUE(lk.ok()) << lk.status();
    lake::LocalControlPlane control(lk->get(), &clock);
    FakeExecutor exec(lc.segment_tokens, lc.instances, lc.tails_in_pool ? lc.slots : 0);
    auto loop = IterationLoop::Create(&control, &exec,
                                      {.segment_tokens = lc.segment_tokens,
                                       .salt = 99,
                                       .max_batch_tokens = lc.max_batch_tokens,
                                       .max_batch_requests = lc.max_batch_requests,
                                       .memory_admission = lc.memory_admission,
                                       .vocab_size = kVocab,
                                       .max_request_tokens = 400,
                                       .rotate_over_instances = (rng() % 2 == 0) ? lc.instances : 0,
                                       .tails_in_pool = lc.tails_in_pool});
    ASSERT_TRUE(loop.ok()) << loop.status();

    // Requests sharing a few document prefixes, arriving at random iterations.
    std::vector<std::vector<int32_t>> docs(3);
    for (auto& d : docs) {
      d.resize(5 + rng() % 40);
      for (int32_t& t : d) t = static_cast<int32_t>(rng() % kVocab);
    }
    const int n = 4 + static_cast<int>(rng() % 12);
    struct Pending {
      LoopRequest req;
      int64_t arrival;
    };
    std::vector<Pending> pending;
    absl::flat_hash_map<RequestId, std::vector<int32_t>> want;
    for (int i = 0; i < n; ++i) {
      LoopRequest r{.id = RequestId(static_cast<uint64_t>(i + 1))};
      const auto& d = docs[rng() % docs.size()];
      r.prompt.assign(d.begin(), d.begin() + static_cast<long>(1 + rng() % d.size()));
      for (uint32_t k = 0, m = rng() % 30; k < m; ++k) {
        r.prompt.push_back(static_cast<int32_t>(rng() % kVocab));
      }
      r.max_new_tokens = 1 + static_cast<int32_t>(rng() % 12);
      want[r.id] = Naive(r.prompt, r.max_new_tokens);
      pending.push_back({std::move(r), static_cast<int64_t>(rng() % 6)});
    }
    // A request longer than the context is refused at once, naming the request.
    {
      LoopRequest big{
          .id = RequestId(1000), .prompt = std::vector<int32_t>(399, 1), .max_new_tokens = 2};
      const absl::Status s = (*loop)->Submit(big);
      EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
      EXPECT_NE(s.message().find("request 1000"), std::string::npos) << s;
    }
    absl::flat_hash_map<RequestId, LoopResult> got;
    size_t next = 0;
    std::stable_sort(pending.begin(), pending.end(),
                     [](const Pending& a, const Pending& b) { return a.arrival < b.arrival; });
    int64_t step = 0;
    for (; step < 5000 && (next < pending.size() || !(*loop)->idle()); ++step) {
      for (; next < pending.size() && pending[next].arrival <= step; ++next) {
        ASSERT_TRUE((*loop)->Submit(pending[next].req).ok());
      }
      for (LoopResult& r : (*loop)->Step()) got[r.id] = std::move(r);
    }
    ASSERT_LT(step, 5000) << "the loop did not finish";
    ASSERT_EQ(got.size(), want.size());
    int64_t restarts = 0;
    for (const auto& [id, tokens] : want) {
      SCOPED_TRACE(testing::Message() << "request " << id.value());
      ASSERT_TRUE(got[id].status.ok()) << got[id].status;
      EXPECT_EQ(got[id].tokens, tokens);
      // The first and the last logits are kept, and only they were copied in full.
      ASSERT_EQ(got[id].last_logits.size(), static_cast<size_t>(kVocab));
      ASSERT_EQ(got[id].decode_logits.size(), static_cast<size_t>(kVocab));
      EXPECT_EQ(got[id].last_logits[static_cast<size_t>(tokens.front())], 1.0f);
      EXPECT_EQ(got[id].decode_logits[static_cast<size_t>(tokens.back())], 1.0f);
      restarts += got[id].restarts;
    }
    // A restart recomputes the prompt but asks for no extra full logits (its first token is
    // already chosen), so at most two per request.
    EXPECT_LE(exec.full_logits, 2 * static_cast<int64_t>(want.size()));
    for (const FakeExecutor::Batch& b : exec.batches) {
      EXPECT_LE(b.tokens, lc.max_batch_tokens);
      EXPECT_LE(b.requests, lc.max_batch_requests);
      if (!lc.memory_admission && !b.all_decodes) {
        EXPECT_EQ(b.left_out_decodes, 0);
      }
    }
    const lake::LakeStats stats = (*lk)->Stats();
    EXPECT_EQ(stats.active_requests, 0);
    EXPECT_EQ(stats.pinned_segments, 0);
    // Every copy the loop committed was stored and confirmed.
    EXPECT_EQ(stats.pending_copies, 0);
    EXPECT_EQ(stats.dropped_pending_copies, 0);
    ASSERT_TRUE((*lk)->CheckIntegrity().ok());
    // Every tail went back, in the lake and in the data plane.
    EXPECT_EQ(stats.tail_slots, 0);
    EXPECT_EQ(exec.tail_blocks(), 0);
    if (lc.tails_in_pool) {
      EXPECT_EQ(exec.in_place, stats.in_place_commits);
      std::cout << "tail blocks committed in place " << exec.in_place << ", copied " << exec.copied
                << "\n";
    }
    std::cout << "requests " << n << ", iterations " << (*loop)->iterations()
              << ", most requests in one iteration " << (*loop)->max_batch_requests_seen()
              << ", admissions deferred " << stats.admissions_deferred << ", restarts " << restarts
              << "\n";
  }
}

INSTANTIATE_TEST_SUITE_P(
    Loops, IterationLoopRandomTest,
    testing::Values(LoopCase{1, 4, 512, 2048, 256, true}, LoopCase{2, 4, 512, 7, 3, false},
                    LoopCase{3, 2, 512, 16, 5, true}, LoopCase{2, 4, 6, 32, 8, true},
                    LoopCase{1, 3, 4, 5, 256, true}, LoopCase{4, 1, 5, 64, 2, false},
                    // Tails in the pool (large pools, then pools the tails contend for).
                    LoopCase{1, 4, 512, 2048, 256, true, true},
                    LoopCase{3, 2, 512, 16, 5, true, true}, LoopCase{2, 4, 40, 32, 8, true, true},
                    LoopCase{1, 2, 50, 16, 6, true, true}),
    [](const testing::TestParamInfo<LoopCase>& p) {
      const LoopCase& c = p.param;
      return absl::StrFormat("N%d_S%d_Slots%d_Budget%d_Cap%d%s%s", c.instances, c.segment_tokens,
                             c.slots, c.max_batch_tokens, c.max_batch_requests,
                             c.memory_admission ? "_Admission" : "",
                             c.tails_in_pool ? "_TailsInPool" : "");
    });

// A small pool under memory admission: requests wait for memory (the lake defers them) and all
// still finish; one request larger than the whole pool runs alone rather than waiting forever.
TEST(IterationLoopTest, WaitsForMemoryAndNeverHangsOnARequestLargerThanThePool) {
  ManualClock clock(1);
  auto lk = lake::Lake::Create(TestLakeOptions(1, 2, 6), &clock);
  ASSERT_TRUE(lk.ok());
  lake::LocalControlPlane control(lk->get(), &clock);
  FakeExecutor exec(2, 1);
  auto loop = IterationLoop::Create(&control, &exec,
                                    {.segment_tokens = 2, .salt = 5, .vocab_size = kVocab});
  ASSERT_TRUE(loop.ok());
  absl::flat_hash_map<RequestId, std::vector<int32_t>> want;
  for (uint64_t i = 1; i <= 4; ++i) {
    LoopRequest r{.id = RequestId(i), .max_new_tokens = 3};
    for (int t = 0; t < 7; ++t) r.prompt.push_back(static_cast<int32_t>((i * 5 + t) % kVocab));
    want[r.id] = Naive(r.prompt, 3);
    ASSERT_TRUE((*loop)->Submit(r).ok());
  }
  LoopRequest huge{.id = RequestId(9), .max_new_tokens = 2};
  for (int t = 0; t < 40; ++t) huge.prompt.push_back(t % kVocab);  // 20 segments > 6 slots
  want[huge.id] = Naive(huge.prompt, 2);
  ASSERT_TRUE((*loop)->Submit(huge).ok());
  absl::flat_hash_map<RequestId, LoopResult> got;
  int steps = 0;
  for (; steps < 1000 && !(*loop)->idle(); ++steps) {
    for (LoopResult& r : (*loop)->Step()) got[r.id] = std::move(r);
  }
  ASSERT_LT(steps, 1000);
  for (const auto& [id, tokens] : want) {
    ASSERT_TRUE(got[id].status.ok()) << id.value() << ": " << got[id].status;
    EXPECT_EQ(got[id].tokens, tokens) << id.value();
  }
  EXPECT_GT((*lk)->Stats().admissions_deferred, 0);
  EXPECT_EQ((*lk)->Stats().pinned_segments, 0);
  EXPECT_EQ((*lk)->Stats().reserved_slots, 0);

  // When the loop knows the pool's size, such a request is refused at once, naming the sizes;
  // one that fits exactly is taken.
  auto sized = IterationLoop::Create(
      &control, &exec, {.segment_tokens = 2, .salt = 5, .vocab_size = kVocab, .pool_tokens = 12});
  ASSERT_TRUE(sized.ok());
  huge.id = RequestId(10);
  const absl::Status refused = (*sized)->Submit(huge);
  EXPECT_EQ(refused.code(), absl::StatusCode::kResourceExhausted) << refused;
  EXPECT_NE(refused.message().find("needs 21 segments of 2 tokens; the whole pool holds 6"),
            std::string::npos)
      << refused;
  LoopRequest fits{.id = RequestId(11), .max_new_tokens = 2};
  fits.prompt.assign(9, 1);  // 11 tokens: 6 segments
  EXPECT_TRUE((*sized)->Submit(fits).ok());
}

// Prompts the pool already holds join many per iteration: the budget is charged with what each
// computes after its cached prefix (known to the control plane), not with its whole prompt. Eight
// 40-token prompts of 4-token segments, each pooled by an earlier run: a repeat serves 9 segments
// (36 tokens; the last token is computed) and computes 4, so all eight fit one budget of 40
// tokens together (32), where charging whole prompts would admit one per iteration.
TEST(IterationLoopTest, CachedPromptsJoinTogetherUnderTheTokenBudget) {
  ManualClock clock(1);
  auto lk = lake::Lake::Create(TestLakeOptions(1, 4, 512), &clock);
  ASSERT_TRUE(lk.ok());
  lake::LocalControlPlane control(lk->get(), &clock);
  FakeExecutor exec(4, 1);
  auto loop = IterationLoop::Create(
      &control, &exec,
      {.segment_tokens = 4, .salt = 5, .max_batch_tokens = 40, .vocab_size = kVocab});
  ASSERT_TRUE(loop.ok());
  std::vector<std::vector<int32_t>> prompts(8);
  for (size_t i = 0; i < prompts.size(); ++i) {
    for (int32_t t = 0; t < 40; ++t) {
      prompts[i].push_back((static_cast<int32_t>(i) * 7 + t * 3) % kVocab);
    }
  }
  auto run = [&](uint64_t first_id, bool together) {
    absl::flat_hash_map<RequestId, LoopResult> got;
    for (size_t i = 0; i < prompts.size(); ++i) {
      ASSERT_TRUE(
          (*loop)
              ->Submit({.id = RequestId(first_id + i), .prompt = prompts[i], .max_new_tokens = 2})
              .ok());
      for (int steps = 0; !together && !(*loop)->idle() && steps < 100; ++steps) {
        for (LoopResult& r : (*loop)->Step()) got[r.id] = std::move(r);
      }
    }
    for (int steps = 0; !(*loop)->idle() && steps < 100; ++steps) {
      for (LoopResult& r : (*loop)->Step()) got[r.id] = std::move(r);
    }
    ASSERT_TRUE((*loop)->idle());
    for (size_t i = 0; i < prompts.size(); ++i) {
      const LoopResult& r = got[RequestId(first_id + i)];
      ASSERT_TRUE(r.status.ok()) << r.status;
      EXPECT_EQ(r.tokens, Naive(prompts[i], 2));
      EXPECT_EQ(r.cached_tokens, together ? 36 : 0);
    }
  };
  ASSERT_NO_FATAL_FAILURE(run(1, /*together=*/false));
  const size_t before = exec.batches.size();
  ASSERT_NO_FATAL_FAILURE(run(101, /*together=*/true));
  ASSERT_GT(exec.batches.size(), before);
  const FakeExecutor::Batch& first = exec.batches[before];
  EXPECT_EQ(first.requests, 8);
  EXPECT_EQ(first.tokens, 32);
  for (size_t b = before; b < exec.batches.size(); ++b) EXPECT_LE(exec.batches[b].tokens, 40);
}

TEST(IterationLoopTest, CancelReleasesPinsAndTailAndOtherRequestsFinishUnchanged) {
  ManualClock clock(1);
  auto lk = lake::Lake::Create(TestLakeOptions(2, 4, 64), &clock);
  ASSERT_TRUE(lk.ok());
  lake::LocalControlPlane control(lk->get(), &clock);
  FakeExecutor exec(4, 2);
  auto loop = IterationLoop::Create(
      &control, &exec,
      {.segment_tokens = 4, .salt = 3, .max_batch_tokens = 8, .vocab_size = kVocab});
  ASSERT_TRUE(loop.ok());
  const lake::LakeStats before = (*lk)->Stats();
  absl::flat_hash_map<RequestId, std::vector<int32_t>> want;
  for (uint64_t i = 1; i <= 3; ++i) {
    LoopRequest r{.id = RequestId(i), .max_new_tokens = 12};
    for (int t = 0; t < 13; ++t) r.prompt.push_back(static_cast<int32_t>((i * 7 + t) % kVocab));
    want[r.id] = Naive(r.prompt, 12);
    ASSERT_TRUE((*loop)->Submit(r).ok());
  }
  // Run until request 2 is decoding (it has produced tokens and holds pins), then cancel it.
  absl::flat_hash_map<RequestId, LoopResult> got;
  int steps = 0;
  while ((*loop)->Progress(RequestId(2)) == nullptr ||
         (*loop)->Progress(RequestId(2))->tokens.size() < 3) {
    ASSERT_LT(++steps, 200);
    for (LoopResult& r : (*loop)->Step()) got[r.id] = std::move(r);
  }
  const std::vector<int32_t> partial = (*loop)->Progress(RequestId(2))->tokens;
  EXPECT_EQ(partial, std::vector<int32_t>(
                         want[RequestId(2)].begin(),
                         want[RequestId(2)].begin() + static_cast<std::ptrdiff_t>(partial.size())));
  EXPECT_GT((*lk)->Stats().pinned_segments, 0);
  const int64_t open = exec.open_sequences();
  ASSERT_TRUE((*loop)->Cancel(RequestId(2)).ok());
  EXPECT_EQ(exec.open_sequences(), open - 1);
  EXPECT_EQ((*loop)->Progress(RequestId(2)), nullptr);
  EXPECT_EQ((*loop)->Cancel(RequestId(2)).code(), absl::StatusCode::kNotFound);
  EXPECT_EQ((*loop)->Cancel(RequestId(77)).code(), absl::StatusCode::kNotFound);
  while (!(*loop)->idle()) {
    ASSERT_LT(++steps, 400);
    for (LoopResult& r : (*loop)->Step()) got[r.id] = std::move(r);
  }
  EXPECT_FALSE(got.contains(RequestId(2)));
  for (uint64_t i : {1, 3}) {
    ASSERT_TRUE(got[RequestId(i)].status.ok()) << got[RequestId(i)].status;
    EXPECT_EQ(got[RequestId(i)].tokens, want[RequestId(i)]) << i;
  }
  // Nothing of the cancelled request stays pinned or reserved, and no tail is left.
  const lake::LakeStats after = (*lk)->Stats();
  EXPECT_EQ(after.pinned_segments, before.pinned_segments);
  EXPECT_EQ(after.reserved_slots, before.reserved_slots);
  EXPECT_EQ(after.active_requests, before.active_requests);
  EXPECT_EQ(exec.open_sequences(), 0);

  // Cancelling the only running request releases at once, without another Step.
  LoopRequest r{.id = RequestId(5), .max_new_tokens = 20};
  r.prompt.assign(10, 4);
  ASSERT_TRUE((*loop)->Submit(r).ok());
  (*loop)->Step();
  (*loop)->Step();
  EXPECT_GT((*lk)->Stats().pinned_segments + (*lk)->Stats().reserved_slots, 0);
  ASSERT_TRUE((*loop)->Cancel(RequestId(5)).ok());
  EXPECT_TRUE((*loop)->idle());
  EXPECT_EQ((*lk)->Stats().pinned_segments, before.pinned_segments);
  EXPECT_EQ((*lk)->Stats().reserved_slots, before.reserved_slots);
  EXPECT_EQ((*lk)->Stats().active_requests, before.active_requests);
  EXPECT_EQ(exec.open_sequences(), 0);
}

TEST(IterationLoopTest, LoadCountsPrefillAndDecodeWorkAsTheNextStepBatchesIt) {
  ManualClock clock(1);
  auto lk = lake::Lake::Create(TestLakeOptions(2, 4, 64), &clock);
  ASSERT_TRUE(lk.ok());
  lake::LocalControlPlane control(lk->get(), &clock);
  FakeExecutor exec(4, 2);
  auto loop = IterationLoop::Create(
      &control, &exec,
      {.segment_tokens = 4, .salt = 5, .max_batch_tokens = 8, .vocab_size = kVocab});
  ASSERT_TRUE(loop.ok());
  auto load = [&] {
    const LoopLoad l = (*loop)->Load();
    return std::vector<int64_t>{l.decode_requests, l.decode_context_tokens, l.prefill_requests,
                                l.prefill_tokens, l.prefill_context_tokens};
  };
  EXPECT_EQ(load(), (std::vector<int64_t>{0, 0, 0, 0, 0}));
  LoopRequest a{.id = RequestId(1), .max_new_tokens = 3};
  for (int t = 0; t < 13; ++t) a.prompt.push_back(t % kVocab);
  ASSERT_TRUE((*loop)->Submit(a).ok());
  // Queued: its 13 prompt tokens to compute.
  EXPECT_EQ(load(), (std::vector<int64_t>{0, 0, 1, 13, 13}));
  (*loop)->Step();  // the first 8 (the batch's token budget)
  EXPECT_EQ(load(), (std::vector<int64_t>{0, 0, 1, 5, 13}));
  LoopRequest b{.id = RequestId(2), .prompt = {1, 2, 3}, .max_new_tokens = 2};
  ASSERT_TRUE((*loop)->Submit(b).ok());
  EXPECT_EQ(load(), (std::vector<int64_t>{0, 0, 2, 8, 16}));
  // The last 5 of a and all 3 of b: both produce their first token and decode next, over the
  // 13 and 3 tokens whose KV exists.
  (*loop)->Step();
  EXPECT_EQ(load(), (std::vector<int64_t>{2, 16, 0, 0, 0}));
  (*loop)->Step();  // one decode step each: b has its 2 tokens and leaves
  EXPECT_EQ(load(), (std::vector<int64_t>{1, 14, 0, 0, 0}));
  (*loop)->Step();
  EXPECT_TRUE((*loop)->idle());
  EXPECT_EQ(load(), (std::vector<int64_t>{0, 0, 0, 0, 0}));
}

TEST(IterationLoopTest, RejectsBadRequestsWithClearErrors) {
  ManualClock clock(1);
  lake::LakeOptions lo;
  lo.num_instances = 1;
  lo.segment_tokens = 2;
  lo.heavy_hitter.num_instances = 1;
  auto lk = lake::Lake::Create(lo, &clock);
  ASSERT_TRUE(lk.ok());
  lake::LocalControlPlane control(lk->get(), &clock);
  FakeExecutor exec(2, 1);
  EXPECT_EQ(IterationLoop::Create(&control, &exec, {.segment_tokens = 2, .max_batch_tokens = 0})
                .status()
                .code(),
            absl::StatusCode::kInvalidArgument);
  auto loop = IterationLoop::Create(
      &control, &exec, {.segment_tokens = 2, .vocab_size = kVocab, .max_request_tokens = 10});
  ASSERT_TRUE(loop.ok());
  auto code = [&](LoopRequest r) { return (*loop)->Submit(std::move(r)).code(); };
  EXPECT_EQ(code({.id = RequestId(), .prompt = {1}}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.id = RequestId(1), .prompt = {}}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.id = RequestId(1), .prompt = {1, kVocab}}), absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.id = RequestId(1), .prompt = {1}, .max_new_tokens = 0}),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.id = RequestId(1), .prompt = std::vector<int32_t>(9, 1), .max_new_tokens = 2}),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.id = RequestId(1), .prompt = {1}, .max_new_tokens = 3, .force_tokens = {2}}),
            absl::StatusCode::kInvalidArgument);
  EXPECT_EQ(code({.id = RequestId(1), .prompt = {1}, .max_new_tokens = 2}), absl::StatusCode::kOk);
  EXPECT_EQ(code({.id = RequestId(1), .prompt = {1}, .max_new_tokens = 2}),
            absl::StatusCode::kAlreadyExists);
}

}  // namespace
}  // namespace tokenlake::engine

namespace tokenlake::engine {
namespace {

struct SampledRun {
  std::map<uint64_t, LoopResult> results;
};

// Runs `requests` through a fresh loop over a 2-instance pool with the given budgets.
SampledRun RunLoop(const std::vector<LoopRequest>& requests, int64_t budget, int32_t cap) {
  ManualClock clock(1);
  auto lk = lake::Lake::Create(TestLakeOptions(2, 4, 256), &clock);
  EXPECT_TRUE(lk.ok());
  lake::LocalControlPlane control(lk->get(), &clock);
  FakeExecutor exec(4, 2);
  auto loop = IterationLoop::Create(&control, &exec,
                                    {.segment_tokens = 4,
                                     .salt = 3,
                                     .max_batch_tokens = budget,
                                     .max_batch_requests = cap,
                                     .vocab_size = kVocab});
  EXPECT_TRUE(loop.ok());
  SampledRun run;
  for (const LoopRequest& r : requests) EXPECT_TRUE((*loop)->Submit(r).ok());
  for (int steps = 0; steps < 2000 && !(*loop)->idle(); ++steps) {
    for (LoopResult& r : (*loop)->Step()) run.results[r.id.value()] = std::move(r);
  }
  EXPECT_TRUE((*loop)->idle());
  return run;
}

// Seeded sampling gives the same tokens whatever the batch and budgets; a stop token ends a
// request early with finish_reason "stop"; greedy requests still follow the naive tokens.
TEST(IterationLoopSamplingTest, SeededSamplingRepeatsAndStopTokensEndRequests) {
  const uint32_t seed = std::random_device{}();
  std::cout << "seed=" << seed << "\n";
  std::mt19937 rng(seed);
  std::vector<LoopRequest> requests;
  for (uint64_t i = 1; i <= 8; ++i) {
    LoopRequest r{.id = RequestId(i), .max_new_tokens = 12};
    for (int t = 0, n = 3 + static_cast<int>(rng() % 20); t < n; ++t) {
      r.prompt.push_back(static_cast<int32_t>(rng() % kVocab));
    }
    if (i % 2 == 0) r.sampling = {.temperature = 1.5f, .top_k = 8, .seed = rng()};
    requests.push_back(std::move(r));
  }
  // Greedy request 9 stops at its naive third token.
  LoopRequest stop{.id = RequestId(9), .prompt = {5, 6, 7}, .max_new_tokens = 12};
  const std::vector<int32_t> naive = Naive(stop.prompt, 12);
  stop.stop_token_ids = {naive[2]};
  requests.push_back(stop);

  const SampledRun a = RunLoop(requests, 64, 16);
  const SampledRun b = RunLoop(requests, 5, 3);  // other batches, other chunking
  std::vector<LoopRequest> alone = {requests[1]};
  const SampledRun c = RunLoop(alone, 64, 16);
  ASSERT_EQ(a.results.size(), requests.size());
  ASSERT_EQ(b.results.size(), requests.size());
  bool sampled_differs = false;
  for (const LoopRequest& r : requests) {
    SCOPED_TRACE(testing::Message() << "request " << r.id.value());
    const LoopResult& ra = a.results.at(r.id.value());
    ASSERT_TRUE(ra.status.ok()) << ra.status;
    EXPECT_EQ(ra.tokens, b.results.at(r.id.value()).tokens);
    if (r.id.value() == 9) {
      EXPECT_EQ(ra.tokens, std::vector<int32_t>(naive.begin(), naive.begin() + 3));
      EXPECT_EQ(ra.finish_reason, "stop");
    } else {
      EXPECT_EQ(ra.tokens.size(), 12u);
      EXPECT_EQ(ra.finish_reason, "length");
      if (r.sampling.greedy()) {
        EXPECT_EQ(ra.tokens, Naive(r.prompt, 12));
      } else {
        sampled_differs = sampled_differs || ra.tokens != Naive(r.prompt, 12);
      }
    }
  }
  EXPECT_TRUE(sampled_differs) << "sampling at temperature 1.5 never left the greedy path";
  EXPECT_EQ(c.results.at(requests[1].id.value()).tokens,
            a.results.at(requests[1].id.value()).tokens);
}

TEST(IterationLoopSamplingTest, BadSamplingParametersAndStopTokensAreRefused) {
  ManualClock clock(1);
  auto lk = lake::Lake::Create(TestLakeOptions(1, 4, 1024), &clock);
  ASSERT_TRUE(lk.ok());
  lake::LocalControlPlane control(lk->get(), &clock);
  FakeExecutor exec(4, 1);
  auto loop = IterationLoop::Create(&control, &exec, {.segment_tokens = 4, .vocab_size = kVocab});
  ASSERT_TRUE(loop.ok());
  LoopRequest r{.id = RequestId(1), .prompt = {1, 2}, .max_new_tokens = 2};
  r.sampling.top_p = 0;
  absl::Status s = (*loop)->Submit(r);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.message().find("top_p"), std::string::npos) << s;
  r.sampling = {};
  r.stop_token_ids = {kVocab};
  s = (*loop)->Submit(r);
  EXPECT_NE(s.message().find("stop token"), std::string::npos) << s;
}

}  // namespace
}  // namespace tokenlake::engine

namespace tokenlake::engine {
namespace {

// An executor that runs `before_store` once, just before the first store it is asked for, and
// otherwise hands everything to `inner`.
class InterleavingExecutor final : public IterationExecutor {
 public:
  InterleavingExecutor(IterationExecutor* inner, std::function<void()> before_store)
      : inner_(inner), before_store_(std::move(before_store)) {}
  absl::Status BeginSequence(RequestId r, int64_t max_tokens) override {
    return inner_->BeginSequence(r, max_tokens);
  }
  DataPlaneCounters EndSequence(RequestId r) override { return inner_->EndSequence(r); }
  absl::Status DropTailRows(RequestId r, int64_t rows) override {
    return inner_->DropTailRows(r, rows);
  }
  absl::StatusOr<std::vector<WorkOutput>> Run(absl::Span<const IterationWork> batch) override {
    return inner_->Run(batch);
  }
  absl::StatusOr<int64_t> StoreSegment(RequestId r, InstanceId compute, int64_t first_row,
                                       InstanceId target, SegmentId segment,
                                       const StoredMeta& meta) override {
    if (before_store_) std::exchange(before_store_, nullptr)();
    return inner_->StoreSegment(r, compute, first_row, target, segment, meta);
  }
  absl::Status FreeSegment(InstanceId compute, InstanceId target, SegmentId segment,
                           uint64_t evicted_at) override {
    return inner_->FreeSegment(compute, target, segment, evicted_at);
  }

 private:
  IterationExecutor* inner_;
  std::function<void()> before_store_;
};

// Issue 15, finding 9, with two engines over one lake and one data plane: engine A commits the
// two segments of a prompt and, before it has stored them, engine B plans and runs a request
// sharing that prefix. B is not told to read A's copies (the fake data plane would answer
// NotFound: the copies are not there yet): it computes the prefix itself and its answer is
// right. Once A has stored and confirmed them, B's next request reads them from the pool.
TEST(IterationLoopTest, AnotherEnginesPlanNeverReadsACopyWhoseStoreIsOnItsWay) {
  constexpr int32_t kS = 4;
  ManualClock clock(1);
  auto lk = lake::Lake::Create(TestLakeOptions(2, kS, 64), &clock);
  ASSERT_TRUE(lk.ok());
  lake::LocalControlPlane control(lk->get(), &clock);
  FakeExecutor data(kS, 2);  // the data plane both engines share
  const IterationLoopOptions options{.segment_tokens = kS, .salt = 3, .vocab_size = kVocab};
  auto b_loop = IterationLoop::Create(&control, &data, options);
  ASSERT_TRUE(b_loop.ok());
  absl::flat_hash_map<RequestId, LoopResult> got;
  auto run = [&](IterationLoop& loop) {
    for (int steps = 0; steps < 100 && !loop.idle(); ++steps) {
      for (LoopResult& r : loop.Step()) got[r.id] = std::move(r);
    }
  };
  const std::vector<int32_t> shared = {1, 2, 3, 4, 5, 6, 7, 8, 9, 10};  // 2 full segments
  LoopRequest a{.id = RequestId(1), .prompt = shared, .max_new_tokens = 1};
  LoopRequest b{.id = RequestId(2), .prompt = shared, .max_new_tokens = 3};
  b.prompt.insert(b.prompt.end(), {11, 12, 13});
  LoopRequest c{.id = RequestId(3), .prompt = shared, .max_new_tokens = 2};
  c.prompt.push_back(14);
  int64_t pending_while_b_ran = -1;
  InterleavingExecutor a_exec(&data, [&] {
    // A's commit has placed its copies; their stores have not happened yet.
    pending_while_b_ran = (*lk)->Stats().pending_copies;
    ASSERT_TRUE((*b_loop)->Submit(b).ok());
    run(**b_loop);
  });
  auto a_loop = IterationLoop::Create(&control, &a_exec, options);
  ASSERT_TRUE(a_loop.ok());
  ASSERT_TRUE((*a_loop)->Submit(a).ok());
  run(**a_loop);
  EXPECT_EQ(pending_while_b_ran, 2);
  ASSERT_TRUE(got.contains(b.id));
  ASSERT_TRUE(got[b.id].status.ok()) << got[b.id].status;
  EXPECT_EQ(got[b.id].tokens, Naive(b.prompt, b.max_new_tokens));
  EXPECT_EQ(got[b.id].cached_tokens, 0);  // B computed the shared prefix itself
  EXPECT_GE((*lk)->Stats().pending_elsewhere_segments, 2);
  ASSERT_TRUE(got[a.id].status.ok()) << got[a.id].status;
  EXPECT_EQ(got[a.id].tokens, Naive(a.prompt, a.max_new_tokens));
  // A confirmed its copies when its loop ran dry: C hits them.
  EXPECT_EQ((*lk)->Stats().pending_copies, 0);
  ASSERT_TRUE((*b_loop)->Submit(c).ok());
  run(**b_loop);
  ASSERT_TRUE(got[c.id].status.ok()) << got[c.id].status;
  EXPECT_EQ(got[c.id].cached_tokens, 2 * kS);
  EXPECT_EQ(got[c.id].tokens, Naive(c.prompt, c.max_new_tokens));
  EXPECT_EQ((*lk)->Stats().pinned_segments, 0);
  ASSERT_TRUE((*lk)->CheckIntegrity().ok()) << (*lk)->CheckIntegrity();
}

}  // namespace
}  // namespace tokenlake::engine
