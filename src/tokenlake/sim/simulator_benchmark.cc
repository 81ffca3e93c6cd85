// Simulator speed: one policy over a generated workload (BM_Simulate), and over the Mooncake
// conversation trace when TOKENLAKE_SOURCE_DIR/../shared/traces has it
// (BM_SimulateConversationTrace; skipped otherwise).
#include <cstdlib>
#include <string>

#include "benchmark/benchmark.h"
#include "tokenlake/sim/experiment.h"
#include "tokenlake/sim/simulator.h"
#include "tokenlake/sim/workload.h"

namespace tokenlake::sim {
namespace {

const char* const kPolicies[] = {"round-robin", "cache-aware", "pd-disagg", "tokenlake"};

void RunPolicy(benchmark::State& state, const Workload& w) {
  const sched::CostModel cost(sched::ModelSpec{}, sched::GpuProfile{}, sched::InterconnectSpec{});
  SimOptions o;
  for (auto _ : state) {
    auto policy = MakePolicy(kPolicies[state.range(0)]);
    Simulator sim(o, w, cost, **policy);
    SimResult r = sim.Run().value();
    benchmark::DoNotOptimize(r.makespan_s);
    state.counters["iterations"] = static_cast<double>(r.iterations);
  }
  state.SetLabel(kPolicies[state.range(0)]);
  state.SetItemsProcessed(state.iterations() * static_cast<int64_t>(w.requests.size()));
}

void BM_Simulate(benchmark::State& state) {
  GeneratorOptions g;
  g.kind = WorkloadKind::kChat;
  g.num_requests = 2000;
  static const Workload w = *GenerateWorkload(g);
  RunPolicy(state, w);
}
BENCHMARK(BM_Simulate)->DenseRange(0, 3)->Unit(benchmark::kMillisecond);

void BM_SimulateConversationTrace(benchmark::State& state) {
  const char* src = std::getenv("TOKENLAKE_SOURCE_DIR");
  static const auto w = ReadMooncakeTrace(std::string(src ? src : ".") +
                                          "/../shared/traces/conversation_trace.jsonl");
  if (!w.ok()) {
    state.SkipWithError("conversation trace not found (set TOKENLAKE_SOURCE_DIR)");
    return;
  }
  RunPolicy(state, *w);
}
BENCHMARK(BM_SimulateConversationTrace)->DenseRange(0, 3)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace tokenlake::sim
