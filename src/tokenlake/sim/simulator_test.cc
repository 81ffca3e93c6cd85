// Hand-computed scenarios per policy, and conservation checks of whole runs.
#include "tokenlake/sim/simulator.h"

#include <memory>
#include <string>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/sim/baselines.h"
#include "tokenlake/sim/experiment.h"
#include "tokenlake/sim/metrics.h"
#include "tokenlake/sim/tokenlake_policy.h"

namespace tokenlake::sim {
namespace {

Request Req(double t, int64_t input, int64_t output, std::vector<uint64_t> ids) {
  Request r;
  r.arrival_s = t;
  r.input_tokens = input;
  r.output_tokens = output;
  r.block_ids = std::move(ids);
  return r;
}

// `gpu` defaults to the built-in (measured) H100; tests whose expectations were computed by hand
// from the paper-derived profile's numbers pass PaperH100Profile().
SimResult RunPolicy(const std::string& policy, const Workload& w, SimOptions o,
                    const sched::GpuProfile& gpu = sched::GpuProfile{}) {
  const sched::CostModel cost(sched::ModelSpec{}, gpu, sched::InterconnectSpec{});
  auto p = MakePolicy(policy);
  EXPECT_TRUE(p.ok()) << p.status();
  Simulator sim(o, w, cost, **p);
  absl::StatusOr<SimResult> r = sim.Run();
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? *std::move(r) : SimResult{};
}

TEST(SimulatorTest, LoneRequestTimesMatchTheProfileByHand) {
  Workload w;
  w.requests.push_back(Req(0, 1024, 3, {1, 2}));
  SimOptions o;
  o.num_instances = 1;
  const SimResult r = RunPolicy("round-robin", w, o, sched::PaperH100Profile());
  const RequestRecord& rec = r.records[0];
  // Prefill: dense 19.8 ms (1024 tokens) + attention 4 x 1024 x 512.5 x 131072 FLOPs at
  // 590 TFLOP/s.
  const double prefill = 19.8e-3 + 4.0 * 1024 * 512.5 * 131072 / 590e12;
  EXPECT_NEAR(rec.first_token_s, prefill, 1e-9);
  // Two decode iterations: dense 6.7 ms + (1024 + 1 + 1) then (1024 + 2 + 1) tokens of KV at
  // 2900 GB/s.
  const double decode = 2 * 6.7e-3 + (1026.0 + 1027.0) * 131072 / 2900e9;
  EXPECT_NEAR(rec.finish_s, prefill + decode, 1e-9);
  EXPECT_EQ(rec.cached_tokens, 0);
}

TEST(SimulatorTest, ChunkedPrefillSplitsAtTheTokenBudget) {
  Workload w;
  w.requests.push_back(Req(0, 1500, 1, {1, 2, 3}));
  SimOptions o;
  o.num_instances = 1;
  o.token_budget = 1000;
  const SimResult r = RunPolicy("round-robin", w, o, sched::PaperH100Profile());
  // Chunk 1: 1000 tokens, no context; chunk 2: 500 tokens over 1000.
  const double dense1000 = 6.7e-3 + (19.8e-3 - 6.7e-3) * 999.0 / 1023.0;
  const double dense500 = 6.7e-3 + (19.8e-3 - 6.7e-3) * 499.0 / 1023.0;
  const double attn1 = 4.0 * 1000 * 500.5 * 131072 / 590e12;
  const double attn2 = 4.0 * 500 * (1000 + 250.5) * 131072 / 590e12;
  EXPECT_NEAR(r.records[0].first_token_s, dense1000 + attn1 + dense500 + attn2, 1e-9);
  EXPECT_NEAR(r.records[0].finish_s, r.records[0].first_token_s, 1e-12);
}

TEST(SimulatorTest, RequestsArrivingTogetherShareTheFirstStep) {
  // Three 1,000-token prompts at t = 0 on one instance with an 8,192-token budget: one
  // iteration prefills all three (an engine builds its batch from every request that is in),
  // not the first alone and the other two one iteration later.
  Workload w;
  for (uint64_t k = 0; k < 3; ++k) w.requests.push_back(Req(0, 1000, 1, {10 * k + 1, 10 * k + 2}));
  SimOptions o;
  o.num_instances = 1;
  const SimResult r = RunPolicy("round-robin", w, o, sched::PaperH100Profile());
  // Dense over 3,000 tokens (interpolated between 1,024 and 4,096) + three causal attentions.
  const double dense = 19.8e-3 + (73e-3 - 19.8e-3) * (3000.0 - 1024) / (4096.0 - 1024);
  const double attn = 3 * 4.0 * 1000 * 500.5 * 131072 / 590e12;
  for (int k = 0; k < 3; ++k) EXPECT_NEAR(r.records[k].first_token_s, dense + attn, 1e-9) << k;
  EXPECT_EQ(r.iterations, 1);
}

TEST(SimulatorTest, MakespanRunsFromTheFirstArrivalToTheLastCompletion) {
  // The first request (1 s) finishes before the second (2 s, three output tokens): the run's
  // completion time is the second's finish minus 1 s.
  Workload w;
  w.requests.push_back(Req(1, 100, 1, {1}));
  w.requests.push_back(Req(2, 100, 3, {2}));
  SimOptions o;
  o.num_instances = 1;
  const SimResult r = RunPolicy("round-robin", w, o);
  ASSERT_GT(r.records[1].finish_s, r.records[0].finish_s);
  EXPECT_DOUBLE_EQ(r.makespan_s, r.records[1].finish_s - 1.0);
  EXPECT_DOUBLE_EQ(Summarize(r, 0).makespan_s, r.makespan_s);
}

// Two requests sharing a two-block (1024-token) prefix, 10 s apart on 2 instances.
Workload SharedPrefixPair() {
  Workload w;
  w.requests.push_back(Req(0, 1536, 2, {1, 2, 3}));
  w.requests.push_back(Req(10, 1536, 2, {1, 2, 4}));
  return w;
}

TEST(PolicyScenarioTest, RoundRobinSendsTheSecondRequestElsewhereAndMisses) {
  SimOptions o;
  o.num_instances = 2;
  const SimResult r = RunPolicy("round-robin", SharedPrefixPair(), o);
  EXPECT_EQ(r.records[0].instance, 0);
  EXPECT_EQ(r.records[1].instance, 1);
  EXPECT_EQ(r.records[1].cached_tokens, 0);
}

TEST(PolicyScenarioTest, LeastLoadBreaksATieByBusyTimeNotByIndex) {
  SimOptions o;
  o.num_instances = 2;
  const SimResult r = RunPolicy("least-load", SharedPrefixPair(), o);
  // At t = 0 everything ties (nothing has run yet): instance 0. At t = 10 both are idle with
  // nothing in flight, but instance 0 has worked: instance 1 (and misses, least-load does not
  // look at caches).
  EXPECT_EQ(r.records[0].instance, 0);
  EXPECT_EQ(r.records[1].instance, 1);
  EXPECT_EQ(r.records[1].cached_tokens, 0);
}

TEST(PolicyScenarioTest, LeastLoadPrefersFewerQueuedTokensAtEqualRequestsInFlight) {
  // t = 0: a long prompt (32768 tokens, ~4 chunks) to instance 0; t = 0.001: a short one to
  // instance 1 (fewer in flight). t = 0.002: one request in flight on each, but instance 0 has
  // far more tokens left: instance 1.
  std::vector<uint64_t> ids;
  for (int i = 0; i < 64; ++i) ids.push_back(100 + i);
  Workload w;
  w.requests.push_back(Req(0, 32768, 2, ids));
  w.requests.push_back(Req(0.001, 512, 100, {1}));
  w.requests.push_back(Req(0.002, 512, 2, {2}));
  SimOptions o;
  o.num_instances = 2;
  const SimResult r = RunPolicy("least-load", w, o);
  EXPECT_EQ(r.records[0].instance, 0);
  EXPECT_EQ(r.records[1].instance, 1);
  EXPECT_EQ(r.records[2].instance, 1);
}

TEST(PolicyScenarioTest, CacheAwareFollowsThePrefixAboveThreshold) {
  SimOptions o;
  o.num_instances = 2;
  const SimResult r = RunPolicy("cache-aware", SharedPrefixPair(), o);
  // First: no match anywhere -> the smallest tree (both empty: worker 0). Second: match
  // 1024 / 1536 = 0.67 > 0.3 on worker 0.
  EXPECT_EQ(r.records[0].instance, 0);
  EXPECT_EQ(r.records[1].instance, 0);
  EXPECT_EQ(r.records[1].cached_tokens, 1024);
}

TEST(PolicyScenarioTest, CacheAwareBelowThresholdGoesToTheSmallestTree) {
  Workload w;
  w.requests.push_back(Req(0, 1536, 2, {1, 2, 3}));
  w.requests.push_back(Req(10, 2048, 2, {1, 7, 8, 9}));  // match 512 / 2048 = 0.25 <= 0.3
  SimOptions o;
  o.num_instances = 2;
  const SimResult r = RunPolicy("cache-aware", w, o);
  EXPECT_EQ(r.records[1].instance, 1);
  EXPECT_EQ(r.records[1].cached_tokens, 0);
}

TEST(PolicyScenarioTest, CacheAwareBreaksAnEqualTreeSizeTieByLoadNotByIndex) {
  // Two workers; r0 (1024 tokens, 300 output tokens) -> worker 0 (all equal: index), r1 (1024
  // tokens, 2 output) -> worker 1 (smaller tree). At t = 100 both trees hold 1024 tokens and both
  // are idle, but worker 0 has worked longer: r2 (no match) goes to worker 1.
  Workload w;
  w.requests.push_back(Req(0, 1024, 300, {1, 2}));
  w.requests.push_back(Req(0.001, 1024, 2, {3, 4}));
  w.requests.push_back(Req(100, 1024, 2, {5, 6}));
  SimOptions o;
  o.num_instances = 2;
  const SimResult r = RunPolicy("cache-aware", w, o);
  EXPECT_EQ(r.records[0].instance, 0);
  EXPECT_EQ(r.records[1].instance, 1);
  EXPECT_EQ(r.records[2].instance, 1);
}

TEST(PolicyScenarioTest, CacheAwareKnobsComeFromItsOptions) {
  // The same pair as CacheAwareFollowsThePrefixAboveThreshold, with cache_threshold 0.7: the
  // match ratio 0.67 is now below it, so the second request goes to the smaller tree.
  CacheAwareOptions ca;
  ca.cache_threshold = 0.7;
  CacheAwarePolicy policy(ca);
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
  SimOptions o;
  o.num_instances = 2;
  const Workload w = SharedPrefixPair();
  Simulator sim(o, w, cost, policy);
  const SimResult r = sim.Run().value();
  EXPECT_EQ(r.records[1].instance, 1);
  EXPECT_EQ(r.records[1].cached_tokens, 0);
}

TEST(PolicyScenarioTest, CacheAwareRebalancesPastBothThresholds) {
  // 70 requests with one shared prefix at t = 0, none finishing before the last arrives.
  // Request k sees worker 0 with k in flight, the others 0: imbalanced once k - 0 > 64 (and
  // k > 0 x 1.5), so requests 0..64 go to worker 0, request 65 to worker 1 (least loaded,
  // lowest id), request 66 to worker 2.
  Workload w;
  for (int k = 0; k < 70; ++k)
    w.requests.push_back(Req(0, 1024, 500, {1, static_cast<uint64_t>(100 + k)}));
  SimOptions o;
  o.num_instances = 4;
  const SimResult r = RunPolicy("cache-aware", w, o);
  for (int k = 0; k <= 64; ++k) EXPECT_EQ(r.records[k].instance, 0) << k;
  EXPECT_EQ(r.records[65].instance, 1);
  EXPECT_EQ(r.records[66].instance, 2);
}

TEST(PolicyScenarioTest, PdDisaggHitsOnThePrefillPoolAndMovesTheKvToDecode) {
  SimOptions o;
  o.num_instances = 2;  // 1 prefill + 1 decode
  const SimResult r = RunPolicy("pd-disagg", SharedPrefixPair(), o);
  EXPECT_EQ(r.records[0].instance, 0);
  EXPECT_EQ(r.records[1].instance, 0);
  EXPECT_EQ(r.records[1].cached_tokens, 1024);
  // Each request's whole prompt KV (1536 tokens x 128 KiB) moves prefill -> decode.
  EXPECT_EQ(r.bytes_moved, 2 * 1536 * 131072);
  EXPECT_GT(r.records[1].finish_s, r.records[1].first_token_s);
}

TEST(PolicyScenarioTest, PdDisaggFetchesFromTheBestHolderAboveTheRatio) {
  // 3 prefill instances (4 x 0.75) + 1 decode, all on one node. r0 (3 blocks A) prefills on
  // instance 0 (nothing has run yet: every tie-break equal, lowest id) and is done by t = 1. r1
  // (A + 29 blocks, 16384 tokens) at t = 1 goes to instance 0 again (its own match of A beats
  // fetching A elsewhere). r2 (A + 1 block) at t = 1.01: instance 0 holds A but has r1's
  // ~0.4 s prefill queued; instances 1 and 2 hold nothing, and best_len 3 > own 0 x 1.5, so
  // they would fetch A (3 x 64 MiB over NVLink, ~0.7 ms): they tie, and instance 1 (as idle
  // and unused as instance 2) wins, fetches A and hits 1536 tokens.
  Workload w;
  w.requests.push_back(Req(0, 1536, 2, {1000, 1001, 1002}));
  std::vector<uint64_t> ids = {1000, 1001, 1002};
  for (int i = 3; i < 32; ++i) ids.push_back(2000 + i);
  w.requests.push_back(Req(1, 16384, 2, ids));
  w.requests.push_back(Req(1.01, 2048, 2, {1000, 1001, 1002, 7}));
  SimOptions o;
  o.num_instances = 4;
  const SimResult r = RunPolicy("pd-disagg", w, o);
  EXPECT_EQ(r.records[0].instance, 0);
  EXPECT_EQ(r.records[1].instance, 0);
  EXPECT_EQ(r.records[1].cached_tokens, 1536);
  EXPECT_EQ(r.records[2].instance, 1);
  EXPECT_EQ(r.records[2].cached_tokens, 1536);
  // Moved: every prompt's KV to the decode instance, plus the 3 fetched blocks.
  EXPECT_EQ(r.bytes_moved, (1536 + 16384 + 2048) * 131072LL + 3 * 512 * 131072LL);
}

TEST(PolicyScenarioTest, PdDisaggDramStoreServesWhatTheGpuCacheEvicted) {
  // 1 prefill + 1 decode instance with 8 blocks of KV memory each. r0 (blocks A0-A2) is
  // prefilled and cached; r1 (7 blocks + output: 8 blocks) evicts A from the prefill GPU; r2
  // (A + 1 block) then misses on the GPU. With the DRAM store (on by option) it loads the 3
  // blocks from DRAM instead: 1536 cached tokens and 3 x 64 MiB from DRAM.
  Workload w;
  w.requests.push_back(Req(0, 1536, 2, {1000, 1001, 1002}));
  w.requests.push_back(Req(1, 3584, 2, {1, 2, 3, 4, 5, 6, 7}));
  w.requests.push_back(Req(2, 2048, 2, {1000, 1001, 1002, 9}));
  SimOptions o;
  o.num_instances = 2;
  o.kv_capacity_bytes = 8LL * 512 * 131072;
  const SimResult gpu_only = RunPolicy("pd-disagg", w, o);
  EXPECT_EQ(gpu_only.records[2].cached_tokens, 0);
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
  PdDisaggOptions pd;
  pd.dram_bytes = 1LL << 34;
  PdDisaggPolicy policy(pd);
  Simulator sim(o, w, cost, policy);
  const SimResult dram = sim.Run().value();
  EXPECT_EQ(dram.policy, "pd-disagg+dram");
  EXPECT_EQ(dram.records[2].cached_tokens, 1536);
  EXPECT_EQ(dram.bytes_by_kind.at("kv_from_dram"), 3LL * 512 * 131072);
  // Every prefilled prompt block was written to DRAM once: 3 + 7 + 1 blocks.
  EXPECT_EQ(dram.bytes_by_kind.at("kv_to_dram"), 11LL * 512 * 131072);
}

TEST(PolicyScenarioTest, PdDisaggRejectsWhatCannotMeetTheTtftSloOnlyWhenAsked) {
  Workload w;
  w.requests.push_back(Req(0, 1024, 2, {1, 2}));
  SimOptions o;
  o.num_instances = 2;
  o.slo_ttft_s = 0.01;  // the prefill alone takes 20.3 ms
  // By default no policy rejects by an SLO estimate: the request runs (and misses its SLO).
  const SimResult plain = RunPolicy("pd-disagg", w, o);
  EXPECT_FALSE(plain.records[0].rejected);
  EXPECT_EQ(Summarize(plain, 1).completed, 1);
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
  PdDisaggOptions pd;
  pd.slo_rejection = true;
  PdDisaggPolicy policy(pd);
  Simulator sim(o, w, cost, policy);
  const SimResult r = sim.Run().value();
  EXPECT_EQ(r.policy, "pd-disagg+reject");
  EXPECT_TRUE(r.records[0].rejected);
  const Summary s = Summarize(r, 1);
  EXPECT_EQ(s.rejected, 1);
  EXPECT_EQ(s.completed, 0);
}

TEST(PolicyScenarioTest, PdDisaggTieWithEmptyQueuesGoesToTheLeastLoadedInstances) {
  // 2 prefill + 2 decode instances; three requests without shared blocks, 10 s apart: every
  // prefill queue is empty and nothing is cached at each arrival, so the TTFT estimates tie;
  // so do the decode estimates (every decode instance idle). The ties go by load (busy time so
  // far), not to instance 0: prefill 0, 1, 0 and both decode instances get work.
  Workload w;
  w.requests.push_back(Req(0, 1024, 20, {1, 2}));
  w.requests.push_back(Req(10, 1024, 20, {3, 4}));
  w.requests.push_back(Req(20, 1024, 20, {5, 6}));
  SimOptions o;
  o.num_instances = 4;
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
  PdDisaggOptions pd;
  pd.num_prefill = 2;
  pd.split_in_name = true;
  PdDisaggPolicy policy(pd);
  Simulator sim(o, w, cost, policy);
  const SimResult r = sim.Run().value();
  EXPECT_EQ(r.policy, "pd-disagg 2P:2D");
  EXPECT_EQ(r.records[0].instance, 0);
  EXPECT_EQ(r.records[1].instance, 1);
  EXPECT_EQ(r.records[2].instance, 0);  // equal busy time again: the index decides
  EXPECT_GT(r.busy_s[2], 0);
  EXPECT_GT(r.busy_s[3], 0);
}

TEST(PolicyScenarioTest, TokenLakeHitsPoolWideWhereRoundRobinMisses) {
  // Four requests sharing a 2-block prefix, 10 s apart, on 4 instances. Round-robin puts each
  // on a fresh instance: no hits. TokenLake's pool serves the prefix to whichever instance
  // computes: 1024 cached tokens for requests 1-3.
  Workload w;
  for (int k = 0; k < 4; ++k) {
    w.requests.push_back(Req(10.0 * k, 1536, 2, {1, 2, static_cast<uint64_t>(10 + k)}));
  }
  SimOptions o;
  o.num_instances = 4;
  const SimResult rr = RunPolicy("round-robin", w, o);
  const SimResult tl = RunPolicy("tokenlake", w, o);
  for (int k = 0; k < 4; ++k) {
    EXPECT_EQ(rr.records[k].instance, k);
    EXPECT_EQ(rr.records[k].cached_tokens, 0);
    EXPECT_EQ(tl.records[k].cached_tokens, k == 0 ? 0 : 1024) << k;
    EXPECT_GT(tl.records[k].finish_s, 0);
  }
  // Hit rate: 3 x 1024 / (4 x 1536) = 0.5.
  EXPECT_DOUBLE_EQ(Summarize(tl, 1).hit_rate, 0.5);
  EXPECT_DOUBLE_EQ(Summarize(rr, 1).hit_rate, 0.0);
}

TEST(PolicyScenarioTest, TokenLakeSplitsALongPrefillOverIdleInstances) {
  // 40000 uncached tokens, 4 idle instances with 8192-token budgets: the first chunk is 4
  // budgets (32768 tokens) computed sequence-parallel on all 4; round-robin computes the whole
  // prompt on one instance, chunk after chunk.
  Workload w;
  std::vector<uint64_t> ids;
  for (int i = 0; i < 79; ++i) ids.push_back(500 + i);
  w.requests.push_back(Req(0, 40000, 2, ids));
  SimOptions o;
  o.num_instances = 4;
  const SimResult tl = RunPolicy("tokenlake", w, o);
  const SimResult rr = RunPolicy("round-robin", w, o);
  int busy = 0;
  for (double b : tl.busy_s) busy += b > 0 ? 1 : 0;
  EXPECT_EQ(busy, 4);
  EXPECT_LT(tl.records[0].first_token_s, rr.records[0].first_token_s * 0.6);
}

TEST(PolicyScenarioTest, TokenLakeMixesAPrefillChunkIntoADecodeInstance) {
  // One instance decodes A (2,000 output tokens, ~6 ms per iteration, far under the 0.1 s
  // decode budget); B (600 tokens) arrives at 1 s. The instance holds a decode, so it is never
  // free for prefill: B's chunk is mixed into its decode iterations (a 601-token iteration,
  // ~12 ms, fits the budget), and B's first token comes long before A finishes, within a few
  // iterations of its arrival. Without mixed chunks B would wait for A's last token.
  Workload w;
  w.requests.push_back(Req(0, 1024, 2000, {1, 2}));
  w.requests.push_back(Req(1, 600, 2, {3, 4}));
  SimOptions o;
  o.num_instances = 1;
  const SimResult r = RunPolicy("tokenlake", w, o);
  const RequestRecord& a = r.records[0];
  const RequestRecord& b = r.records[1];
  ASSERT_FALSE(a.rejected || b.rejected);
  EXPECT_GT(a.finish_s, 5.0);
  EXPECT_LT(b.first_token_s, 1.1);
  EXPECT_LT(b.finish_s, a.finish_s);
  EXPECT_EQ(b.instance, 0);
}

TEST(PolicyScenarioTest, TokenLakeBatchesRequestsArrivingTogetherInOneIteration) {
  // Four 2,048-token prompts (no shared blocks) at t = 0 on one instance: the scheduler sees
  // all four and fills one 8,192-token iteration with them, as the engine's loop does.
  Workload w;
  for (uint64_t k = 0; k < 4; ++k) {
    w.requests.push_back(Req(0, 2048, 1, {10 * k + 1, 10 * k + 2, 10 * k + 3, 10 * k + 4}));
  }
  SimOptions o;
  o.num_instances = 1;
  const SimResult r = RunPolicy("tokenlake", w, o);
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
  const double one_iteration =
      cost.IterationSeconds(std::vector<sched::SeqWork>(4, sched::SeqWork{.new_tokens = 2048}));
  for (int k = 0; k < 4; ++k) {
    ASSERT_FALSE(r.records[k].rejected) << k;
    EXPECT_NEAR(r.records[k].first_token_s, one_iteration, 1e-9) << k;
  }
  EXPECT_EQ(r.iterations, 1);
}

TEST(PolicyScenarioTest, TokenLakeMixesAQueuedPromptAsSoonAsAPrefillTurnsIntoADecode) {
  // A (2,048 tokens, 300 output tokens) starts alone at t = 0; B arrives 1 ms later, while A's
  // prefill runs, and queues. When A's prompt is done A decodes on the only instance, and B's
  // chunk is mixed into A's very next decode iteration, as the engine's loop batches a waiting
  // prompt with the running decodes, not after A's 300 decode iterations.
  Workload w;
  w.requests.push_back(Req(0, 2048, 300, {1, 2, 3, 4}));
  w.requests.push_back(Req(0.001, 1024, 2, {5, 6}));
  SimOptions o;
  o.num_instances = 1;
  const SimResult r = RunPolicy("tokenlake", w, o);
  const RequestRecord& a = r.records[0];
  const RequestRecord& b = r.records[1];
  ASSERT_FALSE(a.rejected || b.rejected);
  ASSERT_GT(b.arrival_s, 0);
  ASSERT_LT(b.arrival_s, a.first_token_s);
  // One mixed iteration after A's prefill: dense over 1,025 tokens and the two attentions,
  // well under 0.1 s; A's decodes alone take over a second.
  EXPECT_LT(b.first_token_s, a.first_token_s + 0.1);
  EXPECT_GT(a.finish_s, a.first_token_s + 1.0);
  EXPECT_LT(b.finish_s, a.finish_s);
}

// Link time of a new segment stored away from its producer (hand-computed). 2 instances with 3
// blocks of KV memory each, links of 1 MB/s (so that the copy dominates). A (2,048 tokens, one
// output token) is computed on instance 0 (the link is too slow for a sequence-parallel
// split); its 4th segment does not fit there and is stored on instance 1: 64 MiB =
// 67,108,864 bytes over the link, 67.108864 s + 10 us. B, A's next turn (think time 0), repeats
// A's prompt and adds 1 token: it arrives when A finishes, hits A's 4 segments, and reads the
// 4th on instance 1, so its chunk waits until that copy lands, then sends its one query there
// (528,384 bytes with the partial result: 0.53 s) and computes one token. (Without the link
// model B's first token came 0.53 s after A's finish.)
TEST(PolicyScenarioTest, TokenLakeWaitsForANewSegmentCopiedOverTheLink) {
  Workload w;
  w.requests.push_back(Req(0, 2048, 1, {1, 2, 3, 4}));
  w.requests.push_back(Req(0, 2049, 1, {1, 2, 3, 4, 5}));
  w.requests[1].previous_turn = 0;
  w.requests[1].think_s = 0;
  SimOptions o;
  o.num_instances = 2;
  o.kv_capacity_bytes = 3 * sched::ModelSpec{}.KvBytesPerToken() * kBlockTokens;
  sched::InterconnectSpec slow;
  slow.intra_node_gbps = 0.001;
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, slow);
  auto p = MakePolicy("tokenlake");
  ASSERT_TRUE(p.ok());
  Simulator sim(o, w, cost, **p);
  const SimResult r = sim.Run().value();
  // A's 4th segment, and B's 1-token segment (instance 0 is still full), stored on instance 1.
  ASSERT_EQ(r.bytes_by_kind.at("new_segments"), int64_t{512} * 131072 + 131072);
  const RequestRecord& a = r.records[0];
  const RequestRecord& b = r.records[1];
  ASSERT_FALSE(a.rejected || b.rejected);
  EXPECT_EQ(b.cached_tokens, 2048);
  const double copy_s = 67108864.0 / 1e6 + 10e-6;
  EXPECT_GE(b.first_token_s, a.finish_s + copy_s);
  EXPECT_LE(b.first_token_s, a.finish_s + copy_s + 0.6);
}

// Memory admission in the one pool (hand-computed pool arithmetic). 2 instances with 4 blocks of
// KV memory each: 8 pool slots. A request needs its prompt's segments plus the segments its
// generated tokens complete (ceil((prompt + output) / 512) in all). A (2048 + 3 tokens: 5 slots)
// starts at t = 0, leaving 3. B arrives with it:
// - with 4 prompt segments (5 slots) it does not fit: it waits until A finishes and releases its
//   memory, then runs; its first token comes after A's finish, within a lone 2048-token prefill
//   on one instance (plus holder work A's decode charged);
// - with 2 prompt segments (3 slots) it fits and runs as soon as an instance is free, while A
//   decodes;
// - C, with 8 prompt segments (9 slots > 8 in the whole pool), can never be stored: rejected.
// In every case no running request's segment is left unstored.
TEST(PolicyScenarioTest, TokenLakeRequestsWaitForPoolMemoryInsteadOfRunningUnstored) {
  SimOptions o;
  o.num_instances = 2;
  o.kv_capacity_bytes = 4 * kBlockTokens * int64_t{131072};  // 4 blocks of Llama-3-8B KV
  const sched::CostModel cost(sched::ModelSpec{}, sched::PaperH100Profile(),
                              sched::InterconnectSpec{});
  const double lone_prefill_s = cost.PrefillSeconds(2048, 0, o.token_budget);
  for (const int b_segments : {4, 2}) {
    SCOPED_TRACE(::testing::Message() << "B segments=" << b_segments);
    Workload w;
    w.requests.push_back(Req(0, 2048, 3, {1, 2, 3, 4}));
    std::vector<uint64_t> b_ids = {11, 12, 13, 14};
    b_ids.resize(static_cast<size_t>(b_segments));
    w.requests.push_back(Req(0, 512 * b_segments, 3, b_ids));
    w.requests.push_back(Req(0, 4096, 3, {21, 22, 23, 24, 25, 26, 27, 28}));
    const SimResult r = RunPolicy("tokenlake", w, o, sched::PaperH100Profile());
    const RequestRecord& a = r.records[0];
    const RequestRecord& b = r.records[1];
    EXPECT_TRUE(r.records[2].rejected);
    ASSERT_FALSE(a.rejected);
    ASSERT_FALSE(b.rejected);
    EXPECT_EQ(r.unstored_segments, 0);
    EXPECT_EQ(b.cached_tokens, 0);
    if (b_segments == 4) {
      EXPECT_GT(b.first_token_s, a.finish_s);
      EXPECT_LT(b.first_token_s - a.finish_s, 1.5 * lone_prefill_s);
    } else {
      // A took both idle instances at t = 0 (it arrived first); B runs as soon as A's prefill
      // frees one, beside A's decode: it started (a lone 1024-token prefill before its first
      // token) before A finished.
      EXPECT_LT(b.first_token_s - cost.PrefillSeconds(1024, 0, o.token_budget), a.finish_s);
    }
  }
}

// A later session turn queues by its position in the workload, so it can arrive behind, yet
// sit ahead of, a request admitted to the pool and prefilling chunk by chunk. When the turn
// does not fit the pool beside it, the admitted request must go on (only its end frees the
// memory): each finishes, none is left waiting.
// Pool: 2 instances x 8 blocks; one block per instance per iteration.
// - 0: a session's first turn, 1 block, done at once;
// - 1: its second turn, 13 blocks with its answer, sent when 0 is answered;
// - 2: 11 blocks with its answer, admitted at its arrival, before 1 arrives, 5 iterations of
//   prefill: 1 waits for it.
TEST(PolicyScenarioTest, TokenLakeAdmittedRequestsRunOnWhileAnEarlierQueuedTurnWaitsForMemory) {
  SimOptions o;
  o.num_instances = 2;
  o.kv_capacity_bytes = 8 * kBlockTokens * sched::ModelSpec{}.KvBytesPerToken();
  o.token_budget = kBlockTokens;
  Workload w;
  w.requests.push_back(Req(0, 512, 1, {1}));
  w.requests.push_back(Req(0, int64_t{512} * 12, 4, {1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12}));
  w.requests[1].previous_turn = 0;
  w.requests[1].think_s = 0;
  w.requests.push_back(Req(1e-4, int64_t{512} * 10, 2, {21, 22, 23, 24, 25, 26, 27, 28, 29, 30}));
  const SimResult r = RunPolicy("tokenlake", w, o);
  ASSERT_EQ(r.records.size(), 3u);
  for (const RequestRecord& rec : r.records) {
    EXPECT_FALSE(rec.rejected);
    EXPECT_GE(rec.finish_s, 0);
  }
  // 2 was admitted first and holds the memory 1 needs: 1's first token comes after 2's end.
  EXPECT_LT(r.records[2].arrival_s, r.records[1].arrival_s);
  EXPECT_GT(r.records[1].first_token_s, r.records[2].finish_s);
}

// Admission longest cached prefix first (TokenLakePolicyOptions::admit_longest_prefix_first).
// Pool: 2 instances x 8 blocks = 16 slots (a request needs its prompt's blocks + 1 for output).
// - X: 5 blocks, 200 output tokens: holds 6 slots while it decodes;
// - R0: 6 blocks, one output token: done at once, its 6 blocks stay cached (unpinned);
// - R1: 10 blocks, cold: needs 11 slots, more than X leaves; it waits at the queue's head;
// - R2: R0's next turn (R0's 6 blocks + 1), 0.1 s after R0's answer: needs 2 new slots.
// In queue order R2 waits behind R1; when X ends R1 is admitted first and its blocks evict
// R0's: R2 hits a part at most. Longest prefix first admits R2 while X still runs (its 6 blocks
// pinned, 2 new): it hits all of R0's prompt, and R1 follows.
TEST(PolicyScenarioTest, TokenLakeAdmittingLongestPrefixFirstKeepsASessionsContext) {
  SimOptions o;
  o.num_instances = 2;
  o.kv_capacity_bytes = 8 * kBlockTokens * sched::ModelSpec{}.KvBytesPerToken();
  Workload w;
  w.requests.push_back(Req(0, int64_t{512} * 5, 200, {1, 2, 3, 4, 5}));
  w.requests.push_back(Req(0, int64_t{512} * 6, 1, {11, 12, 13, 14, 15, 16}));
  w.requests.push_back(Req(0.05, int64_t{512} * 10, 1, {21, 22, 23, 24, 25, 26, 27, 28, 29, 30}));
  w.requests.push_back(Req(0.06, int64_t{512} * 7, 1, {11, 12, 13, 14, 15, 16, 17}));
  w.requests[3].previous_turn = 1;
  w.requests[3].think_s = 0.1;
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
  for (const bool lpm : {false, true}) {
    SCOPED_TRACE(lpm ? "longest prefix first" : "queue order");
    TokenLakePolicyOptions to;
    to.admit_longest_prefix_first = lpm;
    auto p = MakeTokenLakePolicy(to);
    ASSERT_TRUE(p.ok()) << p.status();
    Simulator sim(o, w, cost, **p);
    auto r = sim.Run();
    ASSERT_TRUE(r.ok()) << r.status();
    for (const RequestRecord& rec : r->records) ASSERT_FALSE(rec.rejected);
    ASSERT_LT(r->records[3].arrival_s, r->records[0].finish_s);  // R2 came while X ran
    if (lpm) {
      EXPECT_EQ(r->records[3].cached_tokens, int64_t{512} * 6);
      EXPECT_LT(r->records[3].first_token_s, r->records[2].first_token_s);
    } else {
      EXPECT_LT(r->records[3].cached_tokens, int64_t{512} * 6);  // R1's blocks evicted R0's
      EXPECT_GT(r->records[3].first_token_s, r->records[2].first_token_s);
    }
  }
}

// Conservation over whole runs of every policy: every request finishes or is rejected, times
// are ordered, hits are bounded, and the baselines' caches hold no leaked references.
class ConservationTest : public ::testing::TestWithParam<std::tuple<std::string, int>> {};

TEST_P(ConservationTest, EveryRequestAccountedAndNoMemoryLeaks) {
  const auto& [policy, instances] = GetParam();
  for (WorkloadKind kind : {WorkloadKind::kChat, WorkloadKind::kAgent, WorkloadKind::kDocQa}) {
    const uint64_t seed = 11 + static_cast<uint64_t>(kind);
    SCOPED_TRACE(::testing::Message() << "seed=" << seed << " workload=" << WorkloadKindName(kind)
                                      << " policy=" << policy);
    GeneratorOptions g;
    g.kind = kind;
    g.num_requests = 300;
    g.rate_rps = 6;
    g.seed = seed;
    auto w = GenerateWorkload(g);
    ASSERT_TRUE(w.ok());
    const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
    auto p = MakePolicy(policy);
    ASSERT_TRUE(p.ok());
    SimOptions o;
    o.num_instances = instances;
    o.kv_capacity_bytes = int64_t{8} << 30;  // small: eviction happens
    Simulator sim(o, *w, cost, **p);
    const SimResult r = sim.Run().value();
    for (size_t i = 0; i < r.records.size(); ++i) {
      const RequestRecord& rec = r.records[i];
      const Request& req = w->requests[i];
      if (rec.rejected) continue;
      ASSERT_GE(rec.first_token_s, rec.arrival_s) << i;
      ASSERT_GE(rec.finish_s, rec.first_token_s) << i;
      ASSERT_LE(rec.cached_tokens, req.input_tokens - 1) << i;
      ASSERT_GE(rec.cached_tokens, 0) << i;
    }
    for (Instance& inst : sim.instances()) {
      ASSERT_TRUE(inst.cache->CheckInvariants().ok());
      EXPECT_EQ(inst.cache->private_blocks(), 0) << inst.id;
      EXPECT_EQ(inst.cache->evictable_blocks(), inst.cache->cached_blocks()) << inst.id;
      EXPECT_EQ(inst.in_flight, 0) << inst.id;
      EXPECT_TRUE(inst.running.empty() && inst.waiting.empty());
    }
    // Every running request's prompt KV had memory (TokenLake: none committed unstored).
    EXPECT_EQ(r.unstored_segments, 0);
    const Summary s = Summarize(r, 6);
    EXPECT_EQ(s.completed + s.rejected, 300);
    EXPECT_GE(s.hit_rate, 0);
    EXPECT_LE(s.hit_rate, 1);
  }
}

INSTANTIATE_TEST_SUITE_P(Policies, ConservationTest,
                         ::testing::Combine(::testing::Values("round-robin", "least-load",
                                                              "cache-aware", "pd-disagg",
                                                              "pd-disagg+dram", "tokenlake"),
                                            ::testing::Values(2, 5)));

// Under the per-token SLO each decode instance's budget is half its decodes' smallest bar (10x
// a request's batch-1 time per output token, about 60 ms here), not half the absolute TPOT SLO
// (0.1 s): under load, decode iterations then stay within the bars, where the absolute budget
// lets them grow past them.
TEST(SimulatorTest, TokenLakeUnderThePerTokenSloKeepsDecodesWithinTheirBars) {
  GeneratorOptions g;
  g.kind = WorkloadKind::kShareGpt;
  g.num_requests = 400;
  g.rate_rps = 40;
  g.seed = 5;
  auto w = GenerateWorkload(g);
  ASSERT_TRUE(w.ok());
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
  SimOptions o;
  o.num_instances = 2;
  auto over_bar = [&](double factor) {
    TokenLakePolicyOptions to;
    to.per_token_slo_factor = factor;
    auto p = MakeTokenLakePolicy(to);
    EXPECT_TRUE(p.ok());
    Simulator sim(o, *w, cost, **p);
    const SimResult r = sim.Run().value();
    int over = 0;
    for (size_t i = 0; i < r.records.size(); ++i) {
      const RequestRecord& rec = r.records[i];
      EXPECT_FALSE(rec.rejected) << i;
      EXPECT_GE(rec.finish_s, rec.first_token_s) << i;
      if (rec.output_tokens < 2) continue;
      const Batch1Latency b1 =
          Batch1Latencies(cost, rec.input_tokens, rec.output_tokens, o.token_budget);
      over += (rec.finish_s - rec.first_token_s) / (rec.output_tokens - 1) > 10 * b1.output_token_s;
    }
    return over;
  };
  const int per_token = over_bar(10);
  const int absolute = over_bar(0);
  std::printf("requests over their TPOT bar: %d per-token budget, %d absolute budget\n", per_token,
              absolute);
  EXPECT_LE(per_token, 400 / 100);  // at most 1%
  EXPECT_GT(absolute, per_token);
}

TEST(SimulatorTest, LaterSessionTurnsArriveAfterThePreviousAnswerPlusThinkTime) {
  Workload w;
  w.requests.push_back(Req(0, 1024, 3, {1, 2}));
  // Nominally at 0.001 s, before the first turn's answer; sent 3 s after it instead.
  w.requests.push_back(Req(0.001, 2048, 2, {1, 2, 3, 4}));
  w.requests[1].previous_turn = 0;
  w.requests[1].think_s = 3;
  SimOptions o;
  o.num_instances = 1;
  const SimResult r = RunPolicy("round-robin", w, o);
  ASSERT_GT(r.records[0].finish_s, 0);
  EXPECT_DOUBLE_EQ(r.records[1].arrival_s, r.records[0].finish_s + 3);
  EXPECT_EQ(r.records[1].cached_tokens, 1024);  // the first turn's prompt, cached
  EXPECT_GT(r.records[1].finish_s, r.records[1].arrival_s);
  // A rejected turn releases the next one too: the first does not fit (1 block of memory).
  o.kv_capacity_bytes = sched::ModelSpec{}.KvBytesPerToken() * kBlockTokens;
  const SimResult rejected = RunPolicy("round-robin", w, o);
  EXPECT_TRUE(rejected.records[0].rejected);
  EXPECT_DOUBLE_EQ(rejected.records[1].arrival_s, 3);
  EXPECT_TRUE(rejected.records[1].rejected);
}

TEST(SimulatorTest, PoliciesRefuseASetupTheyCannotServeWithAnErrorNamingTheSetting) {
  Workload w;
  w.requests.push_back(Req(0, 1024, 3, {1, 2}));
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
  auto refused = [&](Policy& policy, const SimOptions& o) {
    Simulator sim(o, w, cost, policy);
    absl::StatusOr<SimResult> r = sim.Run();
    EXPECT_EQ(r.status().code(), absl::StatusCode::kInvalidArgument);
    return std::string(r.status().message());
  };
  SimOptions o;
  o.num_instances = 2;
  // More KV blocks per instance than the pool counts in 32 bits (2^31 blocks of 64 MiB).
  o.kv_capacity_bytes = (int64_t{1} << 31) * sched::ModelSpec{}.KvBytesPerToken() * kBlockTokens;
  auto tl = MakeTokenLakePolicy();
  ASSERT_TRUE(tl.ok());
  EXPECT_NE(refused(**tl, o).find("kv_capacity_bytes"), std::string::npos);
  // A large capacity within the limit is accepted.
  o.kv_capacity_bytes = (int64_t{1} << 20) * sched::ModelSpec{}.KvBytesPerToken() * kBlockTokens;
  {
    auto ok = MakeTokenLakePolicy();
    Simulator sim(o, w, cost, **ok);
    EXPECT_TRUE(sim.Run().ok());
  }
  o.kv_capacity_bytes = 0;
  // A static split that leaves no decode instance.
  TokenLakePolicyOptions fixed;
  fixed.fixed_prefill_instances = 2;
  auto st = MakeTokenLakePolicy(fixed);
  ASSERT_TRUE(st.ok());
  EXPECT_NE(refused(**st, o).find("fixed_prefill_instances 2"), std::string::npos);
  // A negative per-token SLO factor.
  TokenLakePolicyOptions negative;
  negative.per_token_slo_factor = -1;
  auto bad = MakeTokenLakePolicy(negative);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("per_token_slo_factor"), std::string::npos);
  // PD on one instance, and a prefill count that leaves no decode instance.
  PdDisaggOptions pd;
  PdDisaggPolicy one(pd);
  SimOptions single;
  single.num_instances = 1;
  EXPECT_NE(refused(one, single).find("at least 2 instances"), std::string::npos);
  pd.num_prefill = 2;
  PdDisaggPolicy all_prefill(pd);
  EXPECT_NE(refused(all_prefill, o).find("num_prefill 2"), std::string::npos);
}

}  // namespace
}  // namespace tokenlake::sim
