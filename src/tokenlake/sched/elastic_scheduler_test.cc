#include "tokenlake/sched/elastic_scheduler.h"

#include <algorithm>
#include <cmath>
#include <functional>
#include <limits>
#include <random>
#include <vector>

#include "gtest/gtest.h"

namespace tokenlake::sched {
namespace {

constexpr double kInf = std::numeric_limits<double>::infinity();

// Dense a + b t, attention e q (c + q / 2), parallel p t per extra instance.
class LinearCost final : public BatchCostModel {
 public:
  LinearCost(double a, double b, double e, double p) : a_(a), b_(b), e_(e), p_(p) {}
  double DenseSeconds(int64_t tokens) const override { return a_ + b_ * tokens; }
  double AttentionSeconds(int64_t q, int64_t c) const override { return e_ * q * (c + q / 2.0); }
  double ParallelSeconds(int64_t tokens, int32_t dop) const override {
    return p_ * tokens * (dop - 1);
  }

 private:
  double a_, b_, e_, p_;
};

struct RefChunk {
  int32_t candidate;
  int64_t tokens;
  int64_t context;
};

// The admission rule of step a, written out plainly.
std::vector<RefChunk> ReferenceChunks(const std::vector<PrefillCandidate>& c, int32_t n,
                                      const ElasticSchedulerOptions& o) {
  std::vector<RefChunk> out;
  int64_t capacity = n * o.chunk_tokens;
  const int64_t max_take = std::min(o.max_dop, n) * o.chunk_tokens;
  for (size_t i = 0; i < c.size(); ++i) {
    if (capacity == 0) break;
    int64_t take = c[i].remaining_tokens;
    if (take > capacity) take = capacity;
    if (take > max_take) take = max_take;
    if (take < c[i].remaining_tokens) {
      if (take > o.chunk_tokens) take = (take / o.chunk_tokens) * o.chunk_tokens;
      take = (take / o.align_tokens) * o.align_tokens;
      if (take == 0) continue;
    }
    capacity -= take;
    out.push_back({static_cast<int32_t>(i), take, c[i].context_tokens});
  }
  return out;
}

double RefBatchSeconds(const std::vector<RefChunk>& batch, int32_t d, const BatchCostModel& cost,
                       const ElasticSchedulerOptions& o) {
  const bool pool = o.pool_instances > 0;
  int64_t tokens = 0;
  double attention = 0;
  // The roofline's M (KV bytes of prefix + input) and F (attention FLOPs of input over prefix),
  // written out: 2 (K, V) x layers x KV heads x head_dim x bytes per token; 4 x layers x heads
  // x head_dim per (query, cached token) pair.
  const plan::ModelShape& s = o.shape;
  double m = 0, f = 0;
  for (const RefChunk& c : batch) {
    tokens += c.tokens;
    attention += cost.AttentionSeconds(c.tokens, pool ? 0 : c.context);
    m += 2.0 * s.num_layers * s.num_kv_heads * s.head_dim * s.dtype_bytes *
         static_cast<double>(c.context + c.tokens);
    f += 4.0 * s.num_layers * s.num_heads * s.head_dim * static_cast<double>(c.context) *
         static_cast<double>(c.tokens);
  }
  if (tokens > d * o.chunk_tokens || tokens < d) return kInf;
  double t = cost.DenseSeconds((tokens + d - 1) / d) + attention / d;
  if (d > 1) t += cost.ParallelSeconds(tokens, d);
  if (pool) {
    const double n = o.pool_instances;
    const double load = std::max(m / (m + n * o.roofline.kv_bytes_per_s * t),
                                 f / (f + n * o.roofline.attention_flops_per_s * t));
    t /= 1 - load;
  }
  return t;
}

// Exhaustive search over every split of the length-sorted chunks into consecutive batches and
// every DoP of each batch: the least sum over chunks of their batch's time (kInf if none).
double BruteForce(std::vector<RefChunk> chunks, int32_t n, double slo_s, const BatchCostModel& cost,
                  const ElasticSchedulerOptions& o) {
  std::stable_sort(chunks.begin(), chunks.end(),
                   [](const RefChunk& a, const RefChunk& b) { return a.tokens < b.tokens; });
  double best = kInf;
  std::function<void(size_t, int32_t, double)> rec = [&](size_t start, int32_t left, double acc) {
    if (start == chunks.size()) {
      best = std::min(best, acc);
      return;
    }
    for (size_t end = start + 1; end <= chunks.size(); ++end) {
      std::vector<RefChunk> batch(chunks.begin() + start, chunks.begin() + end);
      for (int32_t d = 1; d <= std::min(left, o.max_dop); ++d) {
        const double t = RefBatchSeconds(batch, d, cost, o);
        if (!(t <= slo_s)) continue;
        rec(end, left - d, acc + static_cast<double>(batch.size()) * t);
      }
    }
  };
  rec(0, n, 0);
  return best;
}

TEST(ElasticSchedulerTest, MatchesExhaustiveSearchOnRandomQueues) {
  const uint32_t seed = std::random_device{}();
  std::printf("ElasticSchedulerTest seed %u\n", seed);
  std::mt19937 rng(seed);
  for (int round = 0; round < 300; ++round) {
    SCOPED_TRACE(testing::Message() << "seed " << seed << " round " << round);
    ElasticSchedulerOptions o;
    o.chunk_tokens = std::uniform_int_distribution<int64_t>(64, 512)(rng);
    o.max_dop = std::uniform_int_distribution<int32_t>(1, 4)(rng);
    o.align_tokens = rng() % 2 == 0 ? 1 : 16;
    const int32_t n = std::uniform_int_distribution<int32_t>(1, 4)(rng);
    const LinearCost cost(std::uniform_real_distribution<double>(0.001, 0.01)(rng),
                          std::uniform_real_distribution<double>(1e-6, 1e-5)(rng),
                          std::uniform_real_distribution<double>(1e-10, 1e-8)(rng),
                          std::uniform_real_distribution<double>(0, 1e-6)(rng));
    std::vector<PrefillCandidate> cands(std::uniform_int_distribution<int>(1, 6)(rng));
    for (PrefillCandidate& c : cands) {
      c.remaining_tokens = std::uniform_int_distribution<int64_t>(1, 3 * o.chunk_tokens)(rng);
      c.context_tokens = std::uniform_int_distribution<int64_t>(0, 20000)(rng);
    }
    const bool with_slo = rng() % 2 == 0;
    o.prefill_slo_s = with_slo ? std::uniform_real_distribution<double>(0.002, 0.05)(rng) : kInf;
    if (rng() % 2 == 0) {  // the pool's cache load in T
      o.pool_instances = std::uniform_int_distribution<int32_t>(1, 16)(rng);
      const int32_t kv = std::uniform_int_distribution<int32_t>(1, 4)(rng);
      o.shape = plan::ModelShape{std::uniform_int_distribution<int32_t>(1, 4)(rng),
                                 kv * std::uniform_int_distribution<int32_t>(1, 4)(rng), kv, 64, 2};
      o.roofline.kv_bytes_per_s = std::uniform_real_distribution<double>(1e8, 1e10)(rng);
      o.roofline.attention_flops_per_s = std::uniform_real_distribution<double>(1e10, 1e12)(rng);
    }

    auto got = SchedulePrefill(cands, n, cost, o);
    ASSERT_TRUE(got.ok()) << got.status();

    // The reference: admitted chunks, dropping the last admitted while nothing fits.
    std::vector<RefChunk> chunks = ReferenceChunks(cands, n, o);
    double want = kInf;
    bool slo_met = true;
    while (!chunks.empty()) {
      want = BruteForce(chunks, n, o.prefill_slo_s, cost, o);
      slo_met = true;
      if (want == kInf && with_slo) {
        want = BruteForce(chunks, n, kInf, cost, o);
        slo_met = false;
      }
      if (want < kInf) break;
      chunks.pop_back();
    }
    ASSERT_FALSE(chunks.empty()) << "one chunk alone always fits";
    EXPECT_EQ(got->slo_met, slo_met);
    EXPECT_NEAR(got->total_latency_s, want, 1e-9 * std::max(1.0, want));

    // The schedule itself: every admitted chunk once, with its tokens; DoPs within the free
    // instances; each batch's time as stated and the objective their sum.
    int32_t dops = 0;
    double objective = 0;
    std::vector<int64_t> seen(cands.size(), 0);
    for (const PrefillBatch& b : got->batches) {
      ASSERT_EQ(b.items.size(), b.tokens.size());
      ASSERT_GE(b.dop, 1);
      ASSERT_LE(b.dop, o.max_dop);
      dops += b.dop;
      std::vector<RefChunk> batch;
      for (size_t i = 0; i < b.items.size(); ++i) {
        seen[b.items[i]] += b.tokens[i];
        batch.push_back({b.items[i], b.tokens[i], cands[b.items[i]].context_tokens});
      }
      const double t = RefBatchSeconds(batch, b.dop, cost, o);
      EXPECT_NEAR(b.estimated_s, t, 1e-12);
      if (got->slo_met) {
        EXPECT_LE(t, o.prefill_slo_s);
      }
      objective += static_cast<double>(b.items.size()) * t;
    }
    EXPECT_LE(dops, n);
    EXPECT_NEAR(objective, got->total_latency_s, 1e-9 * std::max(1.0, objective));
    std::vector<int64_t> want_seen(cands.size(), 0);
    for (const RefChunk& c : chunks) want_seen[c.candidate] = c.tokens;
    EXPECT_EQ(seen, want_seen);
  }
}

TEST(ElasticSchedulerTest, SpreadsALongPrefillOverIdleInstances) {
  // Dense work dominates: 4 idle instances compute a 4-budget prompt in parallel.
  const LinearCost cost(0.005, 2e-5, 0, 0);
  ElasticSchedulerOptions o;
  o.chunk_tokens = 1024;
  o.max_dop = 4;
  const std::vector<PrefillCandidate> cands = {{4096, 0}};
  auto s = SchedulePrefill(cands, 4, cost, o);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->batches.size(), 1u);
  EXPECT_EQ(s->batches[0].dop, 4);
  EXPECT_EQ(s->batches[0].tokens[0], 4096);
}

TEST(ElasticSchedulerTest, ThePoolsCacheLoadIsNotDividedByTheDop) {
  // One 2,048-token chunk after 1,000,000 cached tokens, 2 free instances. Dense 1 ms + 10 us
  // per token; attention 1e-9 x q x (c + q / 2); the exchange 10 us per token per extra member.
  const LinearCost cost(0.001, 1e-5, 1e-9, 1e-5);
  ElasticSchedulerOptions o;
  o.chunk_tokens = 2048;
  o.max_dop = 2;
  const std::vector<PrefillCandidate> cands = {{2048, 1000000}};
  // Attention local to the group: d = 1 costs 1 + 20.48 + 2,050.1 ms; d = 2 costs
  // 1 + 10.24 + 1,025.05 + 20.48 ms: the DP takes both instances.
  auto local = SchedulePrefill(cands, 2, cost, o);
  ASSERT_TRUE(local.ok()) << local.status();
  ASSERT_EQ(local->batches.size(), 1u);
  EXPECT_EQ(local->batches[0].dop, 2);
  // In a pool of 16 instances the context's attention runs where it is stored: one layer, one
  // KV head of 64, bf16: M = 256 x 1,002,048 bytes; F = 4 x 64 x 1e6 x 2048 = 5.24e11 FLOPs.
  // With B = 1e12 and P = 1e13 per instance the cache access takes max(M / 16 B, F / 16 P) =
  // max(16 us, 3.28 ms) whatever the DoP. d = 1: T0 = 1 + 20.48 + 2.10 (the chunk's own causal
  // attention) = 23.58 ms, T = 26.86 ms; d = 2: T0 = 1 + 10.24 + 1.05 + 20.48 = 32.77 ms,
  // T = 36.05 ms. The exchange no longer pays for itself: one instance.
  o.pool_instances = 16;
  o.shape = plan::ModelShape{1, 1, 1, 64, 2};
  o.roofline = {.kv_bytes_per_s = 1e12, .attention_flops_per_s = 1e13};
  auto pool = SchedulePrefill(cands, 2, cost, o);
  ASSERT_TRUE(pool.ok()) << pool.status();
  ASSERT_EQ(pool->batches.size(), 1u);
  EXPECT_EQ(pool->batches[0].dop, 1);
  const double t0 = 0.001 + 2048e-5 + 1e-9 * 2048 * 1024;
  EXPECT_NEAR(pool->batches[0].estimated_s, t0 + 4.0 * 64 * 1e6 * 2048 / (16 * 1e13), 1e-12);
}

TEST(ElasticSchedulerTest, ShortRequestsDoNotWaitBehindALongOne) {
  // One long and three short prefills on two instances: the sum of latencies is least when the
  // short ones share one instance and the long one gets the other.
  const LinearCost cost(0.005, 2e-5, 1e-9, 0);
  ElasticSchedulerOptions o;
  o.chunk_tokens = 4096;
  o.max_dop = 2;
  const std::vector<PrefillCandidate> cands = {{4000, 0}, {50, 0}, {60, 0}, {70, 0}};
  auto s = SchedulePrefill(cands, 2, cost, o);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->batches.size(), 2u);
  EXPECT_EQ(s->batches[0].items, (std::vector<int32_t>{1, 2, 3}));
  EXPECT_EQ(s->batches[1].items, (std::vector<int32_t>{0}));
}

TEST(ElasticSchedulerTest, FirstComeFirstServedWithinTheBudget) {
  const LinearCost cost(0.005, 2e-5, 0, 0);
  ElasticSchedulerOptions o;
  o.chunk_tokens = 1000;
  o.max_dop = 1;
  // One instance: the first request takes the whole budget, the second waits.
  auto s = SchedulePrefill(std::vector<PrefillCandidate>{{5000, 0}, {10, 0}}, 1, cost, o);
  ASSERT_TRUE(s.ok());
  ASSERT_EQ(s->batches.size(), 1u);
  EXPECT_EQ(s->batches[0].items, (std::vector<int32_t>{0}));
  EXPECT_EQ(s->batches[0].tokens, (std::vector<int64_t>{1000}));
}

TEST(ElasticSchedulerTest, ManySmallRequestsAreGroupedAndAllScheduled) {
  const LinearCost cost(0.005, 2e-5, 1e-9, 1e-7);
  ElasticSchedulerOptions o;
  o.chunk_tokens = 2048;
  o.max_dop = 8;
  o.max_dp_items = 16;
  std::vector<PrefillCandidate> cands(500, PrefillCandidate{40, 100});
  auto s = SchedulePrefill(cands, 8, cost, o);
  ASSERT_TRUE(s.ok()) << s.status();
  int64_t tokens = 0, dops = 0;
  for (const PrefillBatch& b : s->batches) {
    dops += b.dop;
    for (int64_t t : b.tokens) tokens += t;
  }
  EXPECT_EQ(tokens, 8 * 2048);  // the budget is full: 409 whole requests and 24 tokens of one
  EXPECT_LE(dops, 8);
}

TEST(ElasticSchedulerTest, RefusesBadInput) {
  const LinearCost cost(0.005, 2e-5, 0, 0);
  ElasticSchedulerOptions o;
  o.chunk_tokens = 0;
  EXPECT_EQ(SchedulePrefill({}, 1, cost, o).status().code(), absl::StatusCode::kInvalidArgument);
  o = {};
  o.prefill_slo_s = 0;
  EXPECT_EQ(SchedulePrefill({}, 1, cost, o).status().code(), absl::StatusCode::kInvalidArgument);
  o = {};
  EXPECT_EQ(SchedulePrefill({}, -1, cost, o).status().code(), absl::StatusCode::kInvalidArgument);
  o = {};
  o.pool_instances = 4;  // without a roofline
  auto no_roofline = SchedulePrefill({}, 1, cost, o);
  EXPECT_EQ(no_roofline.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(no_roofline.status().message().find("roofline"), std::string::npos);
  o = {};
  const std::vector<PrefillCandidate> bad = {{0, 0}};
  auto s = SchedulePrefill(bad, 1, cost, o);
  EXPECT_EQ(s.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(s.status().message().find("candidate 0"), std::string::npos);
  auto empty = SchedulePrefill({}, 3, cost, o);
  ASSERT_TRUE(empty.ok());
  EXPECT_TRUE(empty->batches.empty());
}

TEST(ElasticSchedulerTest, PlaceDecodeBestFitThenIdleThenLeastLoaded) {
  const LinearCost cost(0.005, 1e-5, 1e-8, 0);  // decode of context c: ~1e-8 c seconds
  const double budget = 0.02;
  std::vector<DecodeInstance> in(4);
  in[0] = {.decodes = 2, .context_tokens = 200000};  // ~0.007 s
  in[1] = {.decodes = 4, .context_tokens = 900000};  // ~0.014 s: busiest that still fits
  in[2] = {.decodes = 0, .idle = true};
  in[3] = {.decodes = 1, .context_tokens = 1500000};  // ~0.02 s: full
  EXPECT_EQ(PlaceDecode(in, 100000, budget, cost), 1);
  // Too long for any decode instance: the idle one becomes a decode instance.
  EXPECT_EQ(PlaceDecode(in, 1500000, budget, cost), 2);
  // No idle instance: the least-loaded decode instance takes it.
  in[2].idle = false;
  EXPECT_EQ(PlaceDecode(in, 1500000, budget, cost), 0);
  // A decode instance at its running-request limit takes no more: the next busiest does.
  in[2].idle = true;
  EXPECT_EQ(PlaceDecode(in, 100000, budget, cost, /*max_decodes=*/4), 0);
  // Every decode instance full: an idle one; none idle: -1 (the caller decides).
  EXPECT_EQ(PlaceDecode(in, 100000, budget, cost, /*max_decodes=*/1), 2);
  in[2].idle = false;
  EXPECT_EQ(PlaceDecode(in, 100000, budget, cost, /*max_decodes=*/1), -1);
  // Nothing eligible.
  for (auto& i : in) i.eligible = false;
  EXPECT_EQ(PlaceDecode(in, 1, budget, cost), -1);
}

TEST(ElasticSchedulerTest, PlaceDecodeBreaksTiesByWhereItsContextLives) {
  const LinearCost cost(0.005, 1e-5, 1e-8, 0);
  const double budget = 0.02;
  std::vector<DecodeInstance> in(6);
  in[0] = {.decodes = 2, .context_tokens = 200000, .local_tokens = 3000};  // fits, holds most
  in[1] = {.decodes = 4, .context_tokens = 900000, .local_tokens = 1000};  // fits, busiest
  in[2] = {.decodes = 0, .idle = true, .local_tokens = 5000};
  in[3] = {.decodes = 1, .context_tokens = 1500000, .local_tokens = 9000};  // full
  in[4] = {.decodes = 0, .idle = true, .local_tokens = 8000};
  in[5] = {.decodes = 4, .context_tokens = 900000, .local_tokens = 2000};  // as busy as 1
  // Best fit first (the busiest that fits), so that decodes use as few instances as they can;
  // between the equally busy 1 and 5, the one holding more of the decode's context.
  EXPECT_EQ(PlaceDecode(in, 100000, budget, cost), 5);
  in[5].local_tokens = 0;
  EXPECT_EQ(PlaceDecode(in, 100000, budget, cost), 1);
  // No decode instance fits: the idle one holding most of it.
  EXPECT_EQ(PlaceDecode(in, 1500000, budget, cost), 4);
  // An instance's own, tighter budget keeps it out: 1 and 5 with 0.013 s fit no more.
  in[1].budget_s = 0.013;
  in[5].budget_s = 0.013;
  EXPECT_EQ(PlaceDecode(in, 100000, budget, cost), 0);
  // A looser own budget does not widen the call's: instance 3 stays full.
  in[1].budget_s = 1.0;
  in[3].budget_s = 1.0;
  EXPECT_EQ(PlaceDecode(in, 100000, budget, cost), 1);
}

// The mixed chunk by the definition: the largest q, scanned down one token at a time.
int64_t RefMixedChunk(const DecodeInstance& in, const PrefillCandidate& c, double budget,
                      const BatchCostModel& cost, const ElasticSchedulerOptions& o) {
  if (!in.eligible || in.decodes <= 0) return 0;
  for (int64_t q = std::min(c.remaining_tokens, o.chunk_tokens - in.decodes - in.mixed_tokens);
       q >= 1; --q) {
    if (q != c.remaining_tokens && q % o.align_tokens != 0) continue;
    // Dense over every token, each decode's attention at the mean context, the chunks' already
    // mixed, this one's.
    const double t = cost.DenseSeconds(in.decodes + in.mixed_tokens + q) +
                     in.decodes * cost.AttentionSeconds(1, in.context_tokens / in.decodes) +
                     in.mixed_attention_s + cost.AttentionSeconds(q, c.context_tokens);
    // An instance's own budget applies when it is tighter.
    if (t <= budget && (in.budget_s <= 0 || t <= in.budget_s)) return q;
  }
  return 0;
}

TEST(ElasticSchedulerTest, MixedPrefillMatchesTheDefinitionOnRandomInstances) {
  const uint32_t seed = std::random_device{}();
  std::printf("MixedPrefill seed %u\n", seed);
  std::mt19937 rng(seed);
  for (int round = 0; round < 500; ++round) {
    SCOPED_TRACE(testing::Message() << "seed " << seed << " round " << round);
    ElasticSchedulerOptions o;
    o.chunk_tokens = std::uniform_int_distribution<int64_t>(16, 600)(rng);
    o.align_tokens = std::vector<int64_t>{1, 7, 16, 64}[rng() % 4];
    const LinearCost cost(std::uniform_real_distribution<double>(0.001, 0.01)(rng),
                          std::uniform_real_distribution<double>(1e-6, 1e-4)(rng),
                          std::uniform_real_distribution<double>(1e-10, 1e-7)(rng), 0);
    const double budget = std::uniform_real_distribution<double>(0.002, 0.05)(rng);
    std::vector<DecodeInstance> in(std::uniform_int_distribution<int>(0, 5)(rng));
    for (DecodeInstance& i : in) {
      i.decodes = rng() % 4 == 0 ? 0 : std::uniform_int_distribution<int64_t>(1, 40)(rng);
      i.context_tokens = i.decodes * std::uniform_int_distribution<int64_t>(0, 5000)(rng);
      i.eligible = rng() % 6 != 0;
      if (rng() % 3 == 0) i.budget_s = std::uniform_real_distribution<double>(0.002, 0.05)(rng);
    }
    std::vector<PrefillCandidate> cands(std::uniform_int_distribution<int>(0, 6)(rng));
    for (PrefillCandidate& c : cands) {
      c.remaining_tokens = std::uniform_int_distribution<int64_t>(1, 2 * o.chunk_tokens)(rng);
      c.context_tokens = std::uniform_int_distribution<int64_t>(0, 20000)(rng);
    }
    for (const DecodeInstance& i : in) {
      for (const PrefillCandidate& c : cands) {
        ASSERT_EQ(MixedChunkTokens(i, c, budget, cost, o), RefMixedChunk(i, c, budget, cost, o));
      }
    }
    auto got = ScheduleMixedPrefill(cands, in, budget, cost, o);
    ASSERT_TRUE(got.ok()) << got.status();
    // The reference: first come first served, each to the instance with the largest chunk
    // given the chunks that instance already took.
    std::vector<MixedChunk> want;
    std::vector<DecodeInstance> ref = in;
    std::vector<int64_t> mixed(in.size(), 0);
    for (size_t c = 0; c < cands.size(); ++c) {
      int best = -1;
      int64_t best_q = 0;
      for (size_t i = 0; i < in.size(); ++i) {
        const int64_t q = RefMixedChunk(ref[i], cands[c], budget, cost, o);
        if (q > best_q) best = static_cast<int>(i), best_q = q;
      }
      if (best < 0) continue;
      ref[best].mixed_tokens += best_q;
      ref[best].mixed_attention_s += cost.AttentionSeconds(best_q, cands[c].context_tokens);
      want.push_back({best, static_cast<int32_t>(c), best_q, 0});
    }
    ASSERT_EQ(got->size(), want.size());
    for (size_t k = 0; k < want.size(); ++k) {
      const MixedChunk& g = (*got)[k];
      EXPECT_EQ(g.instance, want[k].instance);
      EXPECT_EQ(g.candidate, want[k].candidate);
      EXPECT_EQ(g.tokens, want[k].tokens);
      EXPECT_LE(g.estimated_s, budget * (1 + 1e-12));
      if (in[g.instance].budget_s > 0) {
        EXPECT_LE(g.estimated_s, in[g.instance].budget_s * (1 + 1e-12));
      }
      mixed[g.instance] += g.tokens;
    }
    // Every instance's iteration stays within the token budget.
    for (size_t i = 0; i < in.size(); ++i) {
      EXPECT_LE(mixed[i] + (mixed[i] > 0 ? in[i].decodes : 0), o.chunk_tokens) << i;
    }
  }
}

TEST(ElasticSchedulerTest, MixedPrefillFillsTheDecodeBudgetByHand) {
  // Dense 5 ms + 10 us per token; attention 1e-8 x q x (c + q / 2).
  const LinearCost cost(0.005, 1e-5, 1e-8, 0);
  ElasticSchedulerOptions o;
  o.chunk_tokens = 4096;
  o.align_tokens = 512;
  // 10 decodes with 1,000 context tokens each: attention 10 x 1e-8 x 1000.5 = 0.1 ms.
  const DecodeInstance in{.decodes = 10, .context_tokens = 10000};
  // A fresh prompt of 4,000 tokens: q = 1024 costs 5 + 10.34 + 0.1 + 5.24 = 20.68 ms and
  // q = 1536 costs 5 + 15.46 + 0.1 + 11.80 = 32.36 ms: under a 25 ms budget, 1,024.
  EXPECT_EQ(MixedChunkTokens(in, {4000, 0}, 0.025, cost, o), 1024);
  EXPECT_NEAR(MixedIterationSeconds(10, 10000, 1024, 0, cost),
              0.005 + 1034e-5 + 10 * 1e-8 * 1000.5 + 1e-8 * 1024 * 512, 1e-12);
  // The last 300 tokens of a prompt fit whole (no alignment): 5 + 3.1 + 0.1 + 0.45 ms = 8.65 ms.
  EXPECT_EQ(MixedChunkTokens(in, {300, 0}, 0.025, cost, o), 300);
  // A budget the decodes alone exceed leaves nothing; so does an instance without decodes.
  EXPECT_EQ(MixedChunkTokens(in, {300, 0}, 0.005, cost, o), 0);
  EXPECT_EQ(MixedChunkTokens(DecodeInstance{}, {300, 0}, 0.025, cost, o), 0);
  // Two requests, two decode instances, 256-token alignment, a 27 ms budget. Instance 0 (100
  // decodes, 1 ms of decode attention) fits q = 1024 (22.48 ms) but not 1280 (27.99 ms);
  // instance 1 (one decode) fits 1280 (5 + 12.81 + 8.19 = 26.0 ms). The first request takes
  // instance 1 (the larger chunk); the second, 300 tokens whole, instance 0 (10.45 ms).
  o.align_tokens = 256;
  const std::vector<DecodeInstance> ins = {{.decodes = 100, .context_tokens = 100000},
                                           {.decodes = 1, .context_tokens = 100}};
  auto s =
      ScheduleMixedPrefill(std::vector<PrefillCandidate>{{4000, 0}, {300, 0}}, ins, 0.027, cost, o);
  ASSERT_TRUE(s.ok()) << s.status();
  ASSERT_EQ(s->size(), 2u);
  EXPECT_EQ((*s)[0].instance, 1);
  EXPECT_EQ((*s)[0].candidate, 0);
  EXPECT_EQ((*s)[0].tokens, 1280);
  EXPECT_EQ((*s)[1].instance, 0);
  EXPECT_EQ((*s)[1].candidate, 1);
  EXPECT_EQ((*s)[1].tokens, 300);
  // Short prompts share one instance's iteration: two of 300 tokens on the instance with 10
  // decodes cost 5 + 6.1 + 0.1 + 2 x 0.45 = 12.1 ms together, within 25 ms.
  auto two = ScheduleMixedPrefill(std::vector<PrefillCandidate>{{300, 0}, {300, 0}},
                                  std::vector<DecodeInstance>{in}, 0.025, cost, o);
  ASSERT_TRUE(two.ok()) << two.status();
  ASSERT_EQ(two->size(), 2u);
  EXPECT_EQ((*two)[1].instance, 0);
  EXPECT_EQ((*two)[1].tokens, 300);
  EXPECT_NEAR((*two)[1].estimated_s, 0.005 + 610e-5 + 10 * 1e-8 * 1000.5 + 2 * 1e-8 * 300 * 150,
              1e-12);
  EXPECT_EQ(ScheduleMixedPrefill({}, ins, 0, cost, o).status().code(),
            absl::StatusCode::kInvalidArgument);
  const std::vector<PrefillCandidate> bad = {{0, 0}};
  EXPECT_EQ(ScheduleMixedPrefill(bad, ins, 0.025, cost, o).status().code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tokenlake::sched
