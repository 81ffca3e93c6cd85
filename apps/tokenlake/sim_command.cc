// `tokenlake sim`: the trace-driven cluster simulator. Runs the policies (round-robin,
// cache-aware, pd-disagg at every prefill:decode split, tokenlake; least-load and
// pd-disagg+dram on request) over a trace or a built-in workload on one cost model, prints a
// comparison table, and optionally writes JSON and an HTML/SVG report. Bad flags or values
// (unknown names, with the valid ones listed): a message on stderr and exit code 2.
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdio>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <limits>
#include <memory>
#include <set>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "absl/strings/str_join.h"
#include "absl/strings/str_split.h"
#include "command.h"
#include "flag_checks.h"
#include "nlohmann/json.hpp"
#include "tokenlake/plan/planner.h"
#include "tokenlake/sched/cost_model.h"
#include "tokenlake/sim/experiment.h"
#include "tokenlake/sim/preset.h"
#include "tokenlake/sim/report.h"
#include "tokenlake/sim/workload.h"

namespace tokenlake::cli {
namespace {

// The flags, typed: CLI11 converts and range-checks each value (a bad one is a usage error
// naming the flag, exit 2); RunSim checks only what involves several flags.
struct SimFlags {
  std::string preset;
  std::string trace;
  std::string workload;  // empty: chat
  int64_t requests = 2000;
  int instances = 16;
  std::string model = "llama-3-8b";
  std::string gpu = "h100";
  std::string policies = "round-robin,cache-aware,pd-disagg,tokenlake";
  double rate = 0;  // 0 (not given): the trace's native rate
  bool max_rate = false;
  double slo_ttft = 5;
  double slo_tpot = 0.2;
  int64_t seed = 1;
  std::string json;
  std::string report;
  bool progress = false;
  int64_t token_budget = 8192;
  double intra_gbps = 300;
  double inter_gbps = 50;
  int64_t gpus_per_node = 8;
  std::string pd_splits = "all";
  bool slo_rejection = false;
  double kv_gb = 0;  // 0 (not given): derived from the GPU's memory
  double pd_dram_gb = 128;
  double pd_dram_gbps = 25;
  double cache_threshold = 0.3;
  int64_t balance_abs_threshold = 64;
  double balance_rel_threshold = 1.5;
  double eviction_interval_s = 60;
  int64_t max_tree_size = 67108864;
  int threads = 0;
  int tl_max_dop = 4;
  double tl_decode_budget = 0.5;
  double tl_local_evict = 0.5;
  std::string tl_dispatch = "greedy";
  double tl_access_slack = 0;
  bool tl_hot_runs = true;
  bool tl_dispatch_compare = false;
  std::string tl_admission = "fcfs";
  int tp = 1;
  int64_t cache_tokens = 0;  // 0 (not given): --kv-gb's sizing
  std::string slo = "p90";
  double slo_factor = 10;
  int64_t system_prompt_tokens = 6000;
  std::string question_order = "shuffled";
  bool verbose = false;
};

int Usage(const std::string& message) {
  std::cerr << "tokenlake sim: " << message << "\n(see tokenlake sim --help)\n";
  return 2;
}

void DrawProgress(double share) {
  const int width = 40;
  const int filled = static_cast<int>(share * width);
  std::fprintf(stderr, "\r[%s%s] %3.0f%%", std::string(filled, '#').c_str(),
               std::string(width - filled, ' ').c_str(), share * 100);
  if (share >= 1) std::fprintf(stderr, "\n");
  std::fflush(stderr);
}

// Gives the flags that `given` lacks the preset's values (explicit flags win).
absl::Status ApplyPreset(const std::string& name, const std::set<std::string>& given, SimFlags* f) {
  auto p = sim::FindPreset(name);
  if (!p.ok()) return p.status();
  auto set = [&](const char* flag, auto* field, const auto& value) {
    if (given.count(flag) == 0) *field = value;
  };
  set("--instances", &f->instances, p->instances);
  set("--tp", &f->tp, p->tensor_parallel);
  set("--model", &f->model, p->model);
  set("--gpu", &f->gpu, p->gpu);
  set("--intra-gbps", &f->intra_gbps, p->intra_node_gbps);
  set("--gpus-per-node", &f->gpus_per_node, p->gpus_per_node);
  set("--token-budget", &f->token_budget, p->token_budget);
  set("--slo", &f->slo, std::string(sim::SloModeName(p->slo_mode)));
  set("--slo-factor", &f->slo_factor, p->slo_factor);
  set("--policies", &f->policies, absl::StrJoin(p->policies, ","));
  if (given.count("--trace") == 0) set("--workload", &f->workload, p->workload);
  return absl::OkStatus();
}

int RunSim(SimFlags f, const std::vector<std::string>& extras, const std::set<std::string>& given) {
  if (!extras.empty()) return Usage("unexpected argument '" + extras.front() + "'");
  const bool requests_given = given.count("--requests") > 0;
  if (!f.preset.empty()) {
    absl::Status s = ApplyPreset(f.preset, given, &f);
    if (!s.ok()) return Usage(std::string(s.message()));
  }
  sim::ExperimentOptions eo;
  const int64_t instances = f.instances, requests = f.requests, seed = f.seed;
  const int64_t budget = f.token_budget, gpn = f.gpus_per_node, tp = f.tp;
  const double slo_ttft = f.slo_ttft, slo_tpot = f.slo_tpot;
  const double pd_dram_gb = f.pd_dram_gb, pd_dram_gbps = f.pd_dram_gbps;
  const int64_t system_prompt_tokens = f.system_prompt_tokens, cache_tokens = f.cache_tokens;
  eo.baselines.pd_dram_bytes = static_cast<int64_t>(pd_dram_gb * 1e9);
  eo.baselines.pd.dram_gbps = pd_dram_gbps;
  eo.baselines.pd.slo_rejection = f.slo_rejection;
  sim::CacheAwareOptions& ca = eo.baselines.cache_aware;
  ca.cache_threshold = f.cache_threshold;
  ca.balance_abs_threshold = f.balance_abs_threshold;
  ca.balance_rel_threshold = f.balance_rel_threshold;
  ca.eviction_interval_s = f.eviction_interval_s;
  ca.max_tree_size = f.max_tree_size;
  eo.threads = f.threads;
  auto slo_mode = sim::ParseSloMode(f.slo);
  if (!slo_mode.ok()) return Usage("--slo: " + std::string(slo_mode.status().message()));
  eo.slo_mode = *slo_mode;
  eo.slo_factor = f.slo_factor;
  eo.tokenlake.local_eviction_min_age_ratio = f.tl_local_evict;
  eo.tokenlake.max_dop = f.tl_max_dop;
  eo.tokenlake.decode_budget_share = f.tl_decode_budget;
  eo.tokenlake.dispatch = f.tl_dispatch == "matching" ? plan::PlannerOptions::Dispatch::kMatching
                                                      : plan::PlannerOptions::Dispatch::kGreedy;
  eo.tokenlake.compare_dispatch = f.tl_dispatch_compare;
  eo.tokenlake.access_slack = f.tl_access_slack;
  eo.tokenlake.hot_runs = f.tl_hot_runs;
  eo.tokenlake.admit_longest_prefix_first = f.tl_admission == "lpm";
  eo.rate_rps = f.rate;
  if (given.count("--rate") > 0 && f.max_rate) {
    return Usage("--rate and --max-rate are exclusive");
  }
  const double kv_gb = f.kv_gb;
  // Bytes are counted in 64 bits: 1e9 GB (an exabyte) per instance is far beyond any GPU.
  if (kv_gb > 1e9) return Usage(absl::StrFormat("--kv-gb must be at most 1e9, got %g", kv_gb));
  if (given.count("--kv-gb") > 0 && given.count("--cache-tokens") > 0) {
    return Usage("--kv-gb and --cache-tokens are exclusive");
  }
  eo.policies.clear();
  for (absl::string_view p : absl::StrSplit(f.policies, ',', absl::SkipWhitespace())) {
    if (std::find(eo.policies.begin(), eo.policies.end(), p) != eo.policies.end()) {
      return Usage(absl::StrFormat("--policies names '%s' twice", p));
    }
    eo.policies.emplace_back(p);
    auto made = sim::MakePolicy(eo.policies.back());
    if (!made.ok() && !absl::IsUnimplemented(made.status())) {
      return Usage(std::string(made.status().message()));
    }
    if (!made.ok()) {
      std::cerr << "tokenlake sim: " << made.status().message() << "\n";
      return 1;
    }
  }
  if (eo.policies.empty()) return Usage("--policies is empty");
  bool any_pd = false;
  for (const auto& p : eo.policies) any_pd |= sim::IsSplitPolicy(p);
  if (any_pd && instances < 2) return Usage("pd-disagg needs --instances >= 2");
  if (any_pd || f.pd_splits != "all") {
    auto splits = sim::ParsePdSplits(f.pd_splits, static_cast<int>(instances));
    if (!splits.ok()) return Usage("--pd-splits: " + std::string(splits.status().message()));
    eo.pd_splits = *std::move(splits);
  }
  auto model = sched::LoadModelSpec(f.model);
  if (!model.ok()) return Usage(std::string(model.status().message()));
  auto gpu = sched::LoadGpuProfile(f.gpu);
  if (!gpu.ok()) return Usage(std::string(gpu.status().message()));
  if (model->num_kv_heads % tp != 0) {
    return Usage(
        absl::StrFormat("--tp %d must divide the model's %d KV heads", tp, model->num_kv_heads));
  }
  sched::InterconnectSpec net;
  net.intra_node_gbps = f.intra_gbps;
  net.inter_node_gbps = f.inter_gbps;
  net.gpus_per_node = gpn;
  const sched::CostModel cost(*model, *gpu, net, static_cast<int>(tp));

  sim::Workload workload;
  if (!f.trace.empty() && !f.workload.empty()) {
    return Usage("--trace and --workload are exclusive");
  }
  if (!f.trace.empty() && given.count("--question-order") > 0) {
    return Usage("--question-order applies to --workload loogle only, not to a --trace");
  }
  if (!f.trace.empty()) {
    auto w = sim::ReadMooncakeTrace(f.trace);
    if (!w.ok()) {
      std::cerr << "tokenlake sim: " << w.status().message() << "\n";
      return absl::IsNotFound(w.status()) || absl::IsInvalidArgument(w.status()) ? 2 : 1;
    }
    workload = *std::move(w);
    // --requests N with a trace: its first N requests (by arrival).
    if (requests_given && static_cast<int64_t>(workload.requests.size()) > requests) {
      workload.requests.resize(static_cast<size_t>(requests));
    }
  } else {
    auto kind = sim::ParseWorkloadKind(f.workload.empty() ? "chat" : f.workload);
    if (!kind.ok()) return Usage(std::string(kind.status().message()));
    sim::GeneratorOptions g;
    g.kind = *kind;
    g.num_requests = requests;
    g.seed = static_cast<uint64_t>(seed);
    g.system_prompt_tokens = system_prompt_tokens;
    auto order = sim::ParseQuestionOrder(f.question_order);
    if (!order.ok()) return Usage(std::string{order.status().message()});
    if (given.count("--question-order") > 0 && g.kind != sim::WorkloadKind::kLoogle) {
      return Usage("--question-order applies to --workload loogle only");
    }
    g.question_order = *order;
    auto w = sim::GenerateWorkload(g);
    if (!w.ok()) return Usage(std::string(w.status().message()));
    workload = *std::move(w);
  }
  if (workload.requests.empty()) return Usage("the workload has no requests");

  eo.sim.num_instances = static_cast<int>(instances);
  eo.sim.token_budget = budget;
  eo.sim.slo_ttft_s = slo_ttft;
  eo.sim.slo_tpot_s = slo_tpot;
  eo.sim.kv_capacity_bytes = static_cast<int64_t>(kv_gb * 1e9);
  if (cache_tokens > 0) {
    // The total cache slots, split evenly: each instance holds cache_tokens / instances tokens.
    const int64_t per_instance = cache_tokens / instances;
    if (per_instance < sim::kBlockTokens) {
      return Usage(
          absl::StrFormat("--cache-tokens %d leaves fewer than %d tokens (one block) per instance",
                          cache_tokens, sim::kBlockTokens));
    }
    if (per_instance > std::numeric_limits<int64_t>::max() / model->KvBytesPerToken()) {
      return Usage(absl::StrFormat(
          "--cache-tokens %d gives each instance more KV bytes than 64 bits count", cache_tokens));
    }
    eo.sim.kv_capacity_bytes = per_instance * model->KvBytesPerToken();
  }
  eo.max_rate = f.max_rate;
  const bool show_progress = f.progress || isatty(STDERR_FILENO);
  if (show_progress) eo.sim.progress = DrawProgress;
  if (f.verbose) eo.log = [](const std::string& line) { std::cerr << line << "\n"; };

  double mean_in = 0, mean_out = 0;
  int64_t max_in = 0;
  for (const sim::Request& r : workload.requests) {
    mean_in += static_cast<double>(r.input_tokens);
    mean_out += static_cast<double>(r.output_tokens);
    max_in = std::max(max_in, r.input_tokens);
  }
  mean_in /= static_cast<double>(workload.requests.size());
  mean_out /= static_cast<double>(workload.requests.size());
  nlohmann::json config;
  config["mean_input_tokens"] = mean_in;
  config["max_input_tokens"] = max_in;
  config["mean_output_tokens"] = mean_out;
  config["workload"] = workload.name;
  config["requests"] = workload.requests.size();
  config["native_rate_rps"] = sim::MeanRateRps(workload);
  config["instances"] = eo.sim.num_instances;
  config["model"] = model->name;
  config["gpu"] = gpu->name;
  // Which of the profile's tables the cost model charges for an iteration's work besides
  // attention (sched/cost_model.h: forward_ms when the profile has one).
  config["gpu_iteration_table"] = gpu->forward_ms.empty() ? "dense_ms" : "forward_ms";
  config["preset"] = f.preset.empty() ? nlohmann::json(nullptr) : nlohmann::json(f.preset);
  config["tensor_parallel"] = tp;
  config["slo_mode"] = std::string(sim::SloModeName(eo.slo_mode));
  config["slo_factor"] = eo.slo_factor;
  config["cache_tokens"] =
      cache_tokens > 0 ? nlohmann::json(cache_tokens) : nlohmann::json(nullptr);
  if (f.trace.empty()) config["system_prompt_tokens"] = system_prompt_tokens;
  if (f.trace.empty() && f.workload == "loogle") config["question_order"] = f.question_order;
  config["token_budget"] = eo.sim.token_budget;
  config["max_running"] = eo.sim.max_running;
  config["slo_ttft_s"] = eo.sim.slo_ttft_s;
  config["slo_tpot_s"] = eo.sim.slo_tpot_s;
  config["intra_node_gbps"] = net.intra_node_gbps;
  config["inter_node_gbps"] = net.inter_node_gbps;
  config["gpus_per_node"] = net.gpus_per_node;
  config["pd_splits"] = f.pd_splits;
  config["slo_rejection"] = f.slo_rejection;
  config["cache_threshold"] = ca.cache_threshold;
  config["balance_abs_threshold"] = ca.balance_abs_threshold;
  config["balance_rel_threshold"] = ca.balance_rel_threshold;
  config["eviction_interval_s"] = ca.eviction_interval_s;
  config["max_tree_size"] = ca.max_tree_size;
  const bool with_dram =
      std::find(eo.policies.begin(), eo.policies.end(), "pd-disagg+dram") != eo.policies.end();
  if (with_dram) {
    config["pd_dram_bytes_per_prefill_instance"] = eo.baselines.pd_dram_bytes;
    config["pd_dram_gbps"] = pd_dram_gbps;
  }
  const std::string tier =
      with_dram ? absl::StrFormat(
                      "GPU memory, for every policy; pd-disagg+dram also uses a host-DRAM KV "
                      "store of %g GB per prefill instance at %g GB/s",
                      pd_dram_gb, pd_dram_gbps)
                : std::string("GPU memory only, for every policy");
  config["kv_cache_tier"] = tier;
  config["seed"] = seed;
  config["tokenlake_max_dop"] = eo.tokenlake.max_dop;
  config["tokenlake_decode_budget"] = eo.tokenlake.decode_budget_share;
  config["tokenlake_local_evict"] = eo.tokenlake.local_eviction_min_age_ratio;
  config["tokenlake_dispatch"] = f.tl_dispatch;
  config["tokenlake_access_slack"] = f.tl_access_slack;
  config["tokenlake_hot_runs"] = f.tl_hot_runs;
  config["tokenlake_admission"] = f.tl_admission;

  const std::string slo_text =
      eo.slo_mode == sim::SloMode::kPerToken
          ? absl::StrFormat(
                "SLO per token: TTFT / input and TPOT each <= %gx batch 1, met by >= %g%% (P90 "
                "goodput)",
                eo.slo_factor, eo.goodput_quantile * 100)
          : absl::StrFormat("SLO P90 TTFT <= %gs, P90 TPOT <= %gs", slo_ttft, slo_tpot);
  std::cout << absl::StrFormat(
      "workload %s: %d requests (mean input %.0f tokens, max %d, mean output %.0f), %.3f rps "
      "native%s; %d x %s%s, %s; %s\n",
      workload.name, workload.requests.size(), mean_in, max_in, mean_out,
      sim::MeanRateRps(workload),
      eo.rate_rps > 0 ? absl::StrFormat(", offered %.3f rps", eo.rate_rps) : "",
      eo.sim.num_instances, gpu->name,
      absl::StrCat(gpu->forward_ms.empty() ? "" : " (its measured engine forward, forward_ms)",
                   tp > 1 ? absl::StrFormat(" (TP %d)", tp) : ""),
      model->name, slo_text);
  auto runs = sim::RunExperiment(workload, cost, eo);
  if (!runs.ok()) {
    std::cerr << "tokenlake sim: " << runs.status().message() << "\n";
    return absl::IsInvalidArgument(runs.status()) ? 2 : 1;
  }
  std::cout << sim::FormatTable(*runs) << "KV cache tier: " << tier << "\n";
  if (!f.json.empty()) {
    std::ofstream out(f.json);
    out << sim::ResultsJson(*runs, config).dump(2) << "\n";
    out.close();
    if (!out) {
      std::cerr << "tokenlake sim: cannot write '" << f.json << "'\n";
      return 1;
    }
  }
  if (!f.report.empty()) {
    // Plot titles name the trace file, not its whole path.
    const std::string title = std::filesystem::path(workload.name).filename().string();
    absl::Status s = sim::WriteReport(f.report, title, *runs, config);
    if (!s.ok()) {
      std::cerr << "tokenlake sim: " << s.message() << "\n";
      return 1;
    }
    std::cout << "report: " << f.report << "/index.html\n";
  }
  return 0;
}

void SetUpSim(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<SimFlags>();
  CLI::App* cmd = app.add_subcommand(
      "sim", "Trace-driven cluster simulation: TokenLake against its baselines on one cost model");
  cmd->allow_extras();
  cmd->add_option("--preset", flags->preset,
                  "paper: the paper's setup (4 instances of 2 x a100-80gb at --tp 2, lwm-7b, "
                  "--token-budget 8192, --slo per-token, --workload loogle, policies cache-aware, "
                  "pd-disagg, tokenlake); explicit flags override its values");
  cmd->add_option("--trace", flags->trace,
                  "Mooncake JSON-lines trace file (gzip-compressed when named *.gz)");
  cmd->add_option("--workload", flags->workload,
                  "built-in workload when no --trace: chat, agent, docqa, loogle, scbench or "
                  "sharegpt (default chat)");
  cmd->add_option("--system-prompt-tokens", flags->system_prompt_tokens,
                  "loogle, scbench, sharegpt: tokens of the system prompt on every request "
                  "(default 6000)")
      ->check(IntIn(1, int64_t{1} << 24));
  cmd->add_option("--question-order", flags->question_order,
                  "loogle: shuffled (every question in a random order, the default) or "
                  "by-document (each document's questions one after another)");
  cmd->add_option("--requests", flags->requests,
                  "requests of a built-in workload (default 2000); with --trace, keep its first N")
      ->check(IntIn(1, 10'000'000));
  cmd->add_option("--instances", flags->instances, "serving instances / GPUs (default 16)")
      ->check(IntIn(1, 4096));
  cmd->add_option("--model", flags->model, "llama-3-8b, lwm-7b or a model JSON file");
  cmd->add_option("--gpu", flags->gpu,
                  "h100 (measured, the default), h100-paper, a100-80gb (from published specs) "
                  "or a GPU profile JSON file (cost_model.h schema)");
  cmd->add_option("--tp", flags->tp, "tensor-parallel GPUs per instance (default 1)")
      ->check(IntIn(1, 64));
  cmd->add_option("--policies", flags->policies,
                  "comma-separated: round-robin, least-load, cache-aware, pd-disagg, "
                  "pd-disagg+dram (Mooncake with its host-DRAM store), tokenlake");
  cmd->add_option("--rate", flags->rate, "offered requests/s (arrivals scaled; default native)")
      ->check(Positive());
  cmd->add_flag("--max-rate", flags->max_rate,
                "search each policy's highest rate meeting the P90 TTFT and TPOT SLOs");
  cmd->add_option("--slo", flags->slo,
                  "p90 (P90 TTFT and TPOT against --slo-ttft / --slo-tpot, the default) or "
                  "per-token (the paper's: TTFT / input and TPOT each <= --slo-factor x batch 1 "
                  "for >= 90% of requests; --max-rate then reports the P90 goodput)");
  cmd->add_option("--slo-factor", flags->slo_factor, "per-token SLO: factor over batch 1 (10)")
      ->check(Positive());
  cmd->add_option("--slo-ttft", flags->slo_ttft, "P90 TTFT SLO in seconds (default 5)")
      ->check(Positive());
  cmd->add_option("--slo-tpot", flags->slo_tpot, "P90 TPOT SLO in seconds (default 0.2)")
      ->check(Positive());
  cmd->add_option("--seed", flags->seed, "seed of the built-in workloads (default 1)")
      ->check(IntAtLeast(0));
  cmd->add_option("--json", flags->json, "write the results as JSON to this file");
  cmd->add_option("--report", flags->report, "write SVG plots and index.html into this folder");
  cmd->add_flag("--progress", flags->progress, "progress bar on stderr even when not a TTY");
  cmd->add_option("--token-budget", flags->token_budget,
                  "tokens per iteration (chunked prefill budget, default 8192)")
      ->check(IntIn(1, int64_t{1} << 24));
  cmd->add_option("--intra-gbps", flags->intra_gbps, "GB/s between GPUs of a node (default 300)")
      ->check(Positive());
  cmd->add_option("--inter-gbps", flags->inter_gbps, "GB/s between nodes (default 50)")
      ->check(Positive());
  cmd->add_option("--gpus-per-node", flags->gpus_per_node, "GPUs per node (default 8)")
      ->check(IntIn(1, 1024));
  cmd->add_option("--pd-splits", flags->pd_splits,
                  "PD policies: prefill:decode splits to run, one row each: 'all' (default: "
                  "every P:D with P + D = instances) or P:D[,P:D...] (e.g. 7P:9D,12P:4D)");
  cmd->add_flag("--slo-rejection", flags->slo_rejection,
                "Mooncake's early rejection (refuse a request whose estimated TTFT or TBT "
                "exceeds the SLO) for the policies that estimate them (pd-disagg*; rows named "
                "+reject); default off, as for every policy");
  cmd->add_option("--pd-dram-gb", flags->pd_dram_gb,
                  "pd-disagg+dram: host-DRAM KV store, GB per prefill instance (default 128)")
      ->check(Positive());
  cmd->add_option("--pd-dram-gbps", flags->pd_dram_gbps,
                  "pd-disagg+dram: DRAM store <-> GPU bandwidth, GB/s (default 25)")
      ->check(Positive());
  cmd->add_option("--cache-threshold", flags->cache_threshold,
                  "cache-aware: route by prefix when matched / prompt tokens exceeds this (0.3)")
      ->check(NumberIn(0, 1));
  cmd->add_option("--balance-abs-threshold", flags->balance_abs_threshold,
                  "cache-aware: imbalanced when max - min requests in flight exceeds this (64)")
      ->check(IntAtLeast(0));
  cmd->add_option("--balance-rel-threshold", flags->balance_rel_threshold,
                  "cache-aware: ... and max exceeds min x this (1.5)")
      ->check(Positive());
  cmd->add_option("--eviction-interval-s", flags->eviction_interval_s,
                  "cache-aware: seconds between trims of the router's trees (60)")
      ->check(Positive());
  cmd->add_option("--max-tree-size", flags->max_tree_size,
                  "cache-aware: tokens each router tree is trimmed to (67108864 = 2^26)")
      ->check(IntAtLeast(1));
  cmd->add_option("--threads", flags->threads,
                  "simulations run at once, one per thread (0 = the machine's threads)")
      ->check(IntIn(0, 1024));
  cmd->add_option("--kv-gb", flags->kv_gb,
                  "KV cache GB per instance (default: GPU memory x 0.9 - weights - 4 GiB)")
      ->check(Positive());
  cmd->add_option("--cache-tokens", flags->cache_tokens,
                  "KV cache slots in tokens across the cluster, split evenly over the instances "
                  "(instead of --kv-gb)")
      ->check(IntIn(1, INT64_MAX / 4));
  cmd->add_option("--tl-max-dop", flags->tl_max_dop, "tokenlake: largest prefill group (4)")
      ->check(IntIn(1, 4096));
  cmd->add_option("--tl-decode-budget", flags->tl_decode_budget,
                  "tokenlake: a decode instance takes decodes while its estimated iteration stays "
                  "within this share of the TPOT SLO (0.5)")
      ->check(NumberIn(0, 1, /*open_lo=*/true));
  cmd->add_option("--tl-dispatch", flags->tl_dispatch,
                  "tokenlake: how the planner places queries on replicas and new segments: "
                  "matching (a min-cost transportation problem per batch) or greedy (request by "
                  "request) (greedy)")
      ->check(CLI::IsMember({"matching", "greedy"}));
  cmd->add_option("--tl-hot-runs", flags->tl_hot_runs,
                  "tokenlake: copy a hot run of segments (its holder's cache access in force "
                  "over the pool's mean) to the instance with the least access when a plan reads "
                  "it (docs/adr/0020) (true)");
  cmd->add_option("--tl-access-slack", flags->tl_access_slack,
                  "tokenlake: a request reads a segment with several copies on its own instance "
                  "while that instance's cache access in force stays within (1 + this) x the "
                  "pool's mean, else on the copy with the least access (docs/adr/0019) (0)")
      ->check(NonNegative());
  cmd->add_option("--tl-admission", flags->tl_admission,
                  "tokenlake: the order in which queued requests are admitted to the pool: fcfs "
                  "(queue order) or lpm (longest cached prefix first among the first 128) (fcfs)")
      ->check(CLI::IsMember({"fcfs", "lpm"}));
  cmd->add_flag("--tl-dispatch-compare", flags->tl_dispatch_compare,
                "tokenlake: also plan every batch with the other dispatch rule (no effect on the "
                "run) and report both rules' bytes and holders in the JSON's policy_counters");
  cmd->add_option("--tl-local-evict", flags->tl_local_evict,
                  "tokenlake: a full producer evicts its own LRU leaf for a new segment when that "
                  "leaf's age is >= this x the pool's LRU leaf's (0.5; > 1: pool-wide LRU only)")
      ->check(NonNegative());
  cmd->add_flag("--verbose", flags->verbose, "log every simulation run (with --max-rate)");
  cmd->callback([flags, cmd, exit_code] {
    std::set<std::string> given;
    for (const CLI::Option* opt : cmd->get_options()) {
      if (opt->count() > 0) given.insert(opt->get_name());
    }
    *exit_code = RunSim(*flags, cmd->remaining(), given);
  });
}

}  // namespace
}  // namespace tokenlake::cli

TOKENLAKE_REGISTER_COMMAND(sim, tokenlake::cli::SetUpSim);
