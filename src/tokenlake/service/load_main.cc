// service_load: a bounded load test of a local TokenLake cluster, from a process of its own.
//
// Starts a cluster (LocalCluster: `tokenlake coordinator` + N `tokenlake instance` processes)
// or targets a running one (--port), computes the reference answer of every prompt with a
// single-instance engine in this process, then runs C concurrent HTTP clients sending M
// requests in all, checks every answer against the reference, and prints throughput, latency
// percentiles, the cluster's hit rate and the data-plane traffic between the instances
// (remote attend calls, bytes of queries / partials / pulled KV / remote stores / rebalance
// copies, from /metrics) (JSON with --json).
//
// Prompts: `groups` shared prefixes of `shared_tokens` (system prompts / documents, Zipf-like
// popularity: group k chosen with weight 1/(k+1)) followed by `suffix_tokens` random tokens.
//
// Exit codes: 0 all answers correct, 1 a wrong or failed answer or a start failure, 2 bad flags.
#include <algorithm>
#include <atomic>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "nlohmann/json.hpp"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/service/local_cluster.h"

namespace {

using nlohmann::json;
using tokenlake::service::HttpGet;
using tokenlake::service::HttpPost;

struct Flags {
  std::string binary;
  std::string model;
  int port = 0;
  int instances = 2;
  int clients = 4;
  int requests = 64;
  int max_tokens = 8;
  int groups = 4;
  int shared_tokens = 256;
  int suffix_tokens = 32;
  int segment_tokens = 16;
  uint64_t seed = 1;
  bool rotate_compute = false;
  std::string routing = "scheduler";
  int rebalance_interval_ms = 1000;
  std::string json_out;
  std::string work_dir = "/tmp";
};

double Percentile(std::vector<double> v, double q) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(q * (v.size() - 1) + 0.5));
  return v[i];
}

double ScrapeMetric(int port, const std::string& name) {
  auto r = HttpGet(port, "/metrics");
  if (!r.ok()) return -1;
  const std::string& t = r->second;
  const size_t pos = t.find("\n" + name + " ");
  if (pos == std::string::npos) return -1;
  return std::stod(t.substr(pos + name.size() + 2));
}

int Run(const Flags& f) {
  if (f.clients < 1 || f.requests < 1 || f.max_tokens < 1 || f.groups < 1 || f.shared_tokens < 0 ||
      f.suffix_tokens < 1) {
    std::cerr << "service_load: counts must be >= 1 (shared_tokens >= 0)\n";
    return 2;
  }
  // Prompts.
  std::mt19937_64 rng(f.seed);
  std::vector<std::vector<int32_t>> shared(f.groups);
  for (auto& s : shared) {
    for (int i = 0; i < f.shared_tokens; ++i) s.push_back(static_cast<int32_t>(rng() % 512));
  }
  std::vector<double> weights;
  for (int k = 0; k < f.groups; ++k) weights.push_back(1.0 / (k + 1));
  std::discrete_distribution<int> pick(weights.begin(), weights.end());
  std::vector<std::vector<int32_t>> prompts(f.requests);
  for (auto& p : prompts) {
    p = shared[pick(rng)];
    for (int i = 0; i < f.suffix_tokens; ++i) p.push_back(static_cast<int32_t>(rng() % 512));
  }
  // Reference: one instance, in this process, sequentially.
  auto model = tokenlake::engine::LlamaModel::Load(f.model);
  if (!model.ok()) {
    std::cerr << "service_load: " << model.status().message() << "\n";
    return 1;
  }
  auto ref = tokenlake::engine::Engine::Create(model->get(), {.use_pool = true,
                                                              .num_instances = 1,
                                                              .segment_tokens = f.segment_tokens,
                                                              .slots_per_instance = 4096,
                                                              .namespace_name = "reference"});
  if (!ref.ok()) {
    std::cerr << "service_load: " << ref.status().message() << "\n";
    return 1;
  }
  std::vector<std::vector<int32_t>> expected;
  const absl::Time ref_start = absl::Now();
  for (const auto& p : prompts) {
    auto r = (*ref)->Generate(p, f.max_tokens);
    if (!r.ok()) {
      std::cerr << "service_load: reference: " << r.status().message() << "\n";
      return 1;
    }
    expected.push_back(r->tokens);
  }
  const double ref_seconds = absl::ToDoubleSeconds(absl::Now() - ref_start);

  std::unique_ptr<tokenlake::service::LocalCluster> cluster;
  int port = f.port;
  if (port == 0) {
    tokenlake::service::LocalClusterOptions o;
    o.binary = f.binary;
    o.model = std::filesystem::absolute(f.model).string();
    o.instances = f.instances;
    o.segment_tokens = f.segment_tokens;
    o.slots = 4096;
    o.work_dir = f.work_dir;
    o.coordinator_flags = {"--rebalance-interval-ms", std::to_string(f.rebalance_interval_ms)};
    if (f.rotate_compute) o.coordinator_flags.push_back("--rotate-compute");
    o.coordinator_flags.insert(o.coordinator_flags.end(), {"--routing", f.routing});
    auto c = tokenlake::service::LocalCluster::Start(o);
    if (!c.ok()) {
      std::cerr << "service_load: " << c.status().message() << "\n";
      return 1;
    }
    cluster = std::move(*c);
    port = cluster->http_port();
  }

  std::atomic<int> next{0}, wrong{0}, failed{0};
  std::vector<std::vector<double>> latencies(f.clients);
  std::vector<int64_t> cached(f.clients, 0);
  const absl::Time start = absl::Now();
  std::vector<std::thread> threads;
  for (int c = 0; c < f.clients; ++c) {
    threads.emplace_back([&, c] {
      for (int i = next++; i < f.requests; i = next++) {
        const std::string body =
            json({{"prompt", prompts[i]}, {"max_tokens", f.max_tokens}}).dump();
        const absl::Time t0 = absl::Now();
        auto r = HttpPost(port, "/v1/completions", body, absl::Seconds(120));
        latencies[c].push_back(absl::ToDoubleMilliseconds(absl::Now() - t0));
        if (!r.ok() || r->first != 200) {
          ++failed;
          std::cerr << "request " << i
                    << " failed: " << (r.ok() ? r->second : std::string(r.status().message()))
                    << "\n";
          continue;
        }
        json j = json::parse(r->second, nullptr, false);
        if (j.is_discarded() ||
            j["choices"][0]["tokens"].get<std::vector<int32_t>>() != expected[i]) {
          ++wrong;
          std::cerr << "request " << i << ": wrong answer " << r->second << "\n";
          continue;
        }
        cached[c] += j["usage"]["prompt_tokens_details"]["cached_tokens"].get<int64_t>();
      }
    });
  }
  for (auto& t : threads) t.join();
  const double seconds = absl::ToDoubleSeconds(absl::Now() - start);
  std::vector<double> all;
  int64_t cached_tokens = 0, prompt_tokens = 0;
  for (int c = 0; c < f.clients; ++c) {
    all.insert(all.end(), latencies[c].begin(), latencies[c].end());
    cached_tokens += cached[c];
  }
  for (const auto& p : prompts) prompt_tokens += static_cast<int64_t>(p.size());
  json out = {
      {"instances", f.port == 0 ? f.instances : -1},
      {"clients", f.clients},
      {"requests", f.requests},
      {"max_tokens", f.max_tokens},
      {"prompt_tokens", prompt_tokens},
      {"groups", f.groups},
      {"shared_tokens", f.shared_tokens},
      {"suffix_tokens", f.suffix_tokens},
      {"wrong", wrong.load()},
      {"failed", failed.load()},
      {"seconds", seconds},
      {"requests_per_s", f.requests / seconds},
      {"generated_tokens_per_s", f.requests * f.max_tokens / seconds},
      {"latency_ms",
       {{"p50", Percentile(all, 0.5)},
        {"p90", Percentile(all, 0.9)},
        {"p99", Percentile(all, 0.99)},
        {"max", Percentile(all, 1.0)}}},
      {"hit_rate", static_cast<double>(cached_tokens) / prompt_tokens},
      {"pool_replicas", ScrapeMetric(port, "tokenlake_pool_replicas")},
      {"pool_segments", ScrapeMetric(port, "tokenlake_pool_segments")},
      {"rotate_compute", f.rotate_compute},
      {"routing", f.routing},
      {"routes_by_scheduler", ScrapeMetric(port, "tokenlake_routes_total{rule=\"scheduler\"}")},
      {"lake_hit_rate", ScrapeMetric(port, "tokenlake_lake_hit_rate")},
      {"remote_attend_calls", ScrapeMetric(port, "tokenlake_remote_attend_calls_total")},
      {"kv_pulled_segments", ScrapeMetric(port, "tokenlake_kv_pulled_segments_total")},
      {"kv_stored_remote_segments",
       ScrapeMetric(port, "tokenlake_kv_stored_remote_segments_total")},
      {"rebalance_actions", ScrapeMetric(port, "tokenlake_rebalance_actions_total")},
      {"failovers", ScrapeMetric(port, "tokenlake_failovers_total")},
      // The engines' calls to the coordinator's lake (-1: a cluster without the counter).
      {"lake_plan_iterations", ScrapeMetric(port, "tokenlake_lake_plan_iterations_total")},
      {"lake_rpcs",
       {{"plan_iteration",
         ScrapeMetric(port, "tokenlake_lake_rpcs_total{call=\"plan_iteration\"}")},
        {"release_and_plan",
         ScrapeMetric(port, "tokenlake_lake_rpcs_total{call=\"release_and_plan\"}")},
        {"commit", ScrapeMetric(port, "tokenlake_lake_rpcs_total{call=\"commit\"}")},
        {"release", ScrapeMetric(port, "tokenlake_lake_rpcs_total{call=\"release\"}")}}},
      {"bytes_moved",
       {{"query_out", ScrapeMetric(port, "tokenlake_data_plane_bytes_total{kind=\"query_out\"}")},
        {"partial_back",
         ScrapeMetric(port, "tokenlake_data_plane_bytes_total{kind=\"partial_back\"}")},
        {"kv_pulled", ScrapeMetric(port, "tokenlake_data_plane_bytes_total{kind=\"kv_pulled\"}")},
        {"kv_stored_remote",
         ScrapeMetric(port, "tokenlake_data_plane_bytes_total{kind=\"kv_stored_remote\"}")},
        {"rebalance_copy",
         ScrapeMetric(port, "tokenlake_data_plane_bytes_total{kind=\"rebalance_copy\"}")}}},
      {"reference_single_instance_seconds", ref_seconds}};
  // Where the requests went (attempts routed per instance id).
  json routed = json::array();
  for (int i = 0; i < std::max(f.instances, 1); ++i) {
    routed.push_back(
        ScrapeMetric(port, absl::StrCat("tokenlake_instance_routed_total{instance=\"", i, "\"}")));
  }
  out["routed_per_instance"] = routed;
  std::cout << out.dump(1) << "\n";
  if (!f.json_out.empty()) std::ofstream(f.json_out) << out.dump(1) << "\n";
  if (cluster != nullptr) cluster->Stop();
  return wrong.load() == 0 && failed.load() == 0 ? 0 : 1;
}

}  // namespace

int main(int argc, char** argv) {
  Flags f;
  CLI::App app("Bounded load test of a local TokenLake cluster (checks every answer)");
  app.add_option("--binary", f.binary, "The tokenlake executable (to start a cluster)");
  app.add_option("--model", f.model, "Checkpoint directory")->required();
  app.add_option("--port", f.port, "HTTP port of a running cluster (0 = start one)");
  app.add_option("--instances", f.instances, "Instance processes")->capture_default_str();
  app.add_option("--clients", f.clients, "Concurrent clients")->capture_default_str();
  app.add_option("--requests", f.requests, "Requests in all")->capture_default_str();
  app.add_option("--max-tokens", f.max_tokens, "Tokens generated per request")
      ->capture_default_str();
  app.add_option("--groups", f.groups, "Shared prefixes")->capture_default_str();
  app.add_option("--shared-tokens", f.shared_tokens, "Tokens of each shared prefix")
      ->capture_default_str();
  app.add_option("--suffix-tokens", f.suffix_tokens, "Random tokens after the prefix")
      ->capture_default_str();
  app.add_option("--segment-tokens", f.segment_tokens, "Tokens per segment")->capture_default_str();
  app.add_option("--seed", f.seed, "Seed of the prompts")->capture_default_str();
  app.add_flag("--rotate-compute", f.rotate_compute,
               "Instances take turns computing (forces queries and KV across processes)");
  app.add_option("--routing", f.routing, "The coordinator's --routing: scheduler or plan")
      ->capture_default_str()
      ->check(CLI::IsMember({"scheduler", "plan"}));
  app.add_option("--rebalance-interval-ms", f.rebalance_interval_ms,
                 "The coordinator's rebalancing period (0 = never)")
      ->capture_default_str();
  app.add_option("--json", f.json_out, "Write the result here");
  app.add_option("--work-dir", f.work_dir, "Logs of the cluster processes")->capture_default_str();
  CLI11_PARSE(app, argc, argv);
  if (f.port == 0 && f.binary.empty()) {
    std::cerr << "service_load: give --binary (to start a cluster) or --port\n";
    return 2;
  }
  return Run(f);
}
