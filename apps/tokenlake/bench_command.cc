// `tokenlake bench control-plane --json FILE`: control-plane latency of the TokenLake pool.
// (`tokenlake bench engine --json FILE`, the GPU engine's benchmark, is described in
// src/tokenlake/engine/cuda/engine_bench.h; `tokenlake bench coordinator --json FILE`, a real
// coordinator planning while it reconciles, in src/tokenlake/service/coordinator_bench.h.)
//
// Builds a pool of about --segments segments (default 1M) over --instances instances (default
// 16): documents of 256 segments x 512 tokens (128K tokens) sharing an 8-segment system prompt,
// each produced on one instance (round robin). Then measures, single-threaded, with
// std::chrono::steady_clock around each call:
//   match_128k:      Lake::Match of a random document's whole 128K-token chain (256 keys);
//   gen_plans_256:   Lake::GenPlans for one batch (DoP 4) of 256 requests, each a random prefix of
//                    1..64 segments (up to 32K tokens) of a random document plus one new segment,
//                    half decoding (1 new token) and half prefilling (64..2048 new tokens);
//   gen_plans_256_long: the same with every request's prefix a whole 128K-token document.
// Writes percentiles (µs) of wall time (steady_clock; the headline figures) and of thread CPU time
// (CLOCK_THREAD_CPUTIME_ID; robust to other processes on a shared machine), the build time of the
// pool, the commit (git describe at run time) and machine info as JSON. The process pins itself to
// one CPU unless --no-pin.
#include <sched.h>
#include <time.h>
#include <unistd.h>

#include <algorithm>
#include <array>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <thread>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "command.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/clock.h"
#include "tokenlake/base/hash.h"
#include "tokenlake/base/random.h"
#include "tokenlake/lake/lake.h"

#if defined(TOKENLAKE_HAVE_CUDA)
#include "tokenlake/engine/cuda/engine_bench.h"
#include "tokenlake/engine/cuda/gpu_llama.h"
#endif
#if defined(TOKENLAKE_HAVE_SERVICE)
#include "tokenlake/service/coordinator_bench.h"
#endif

namespace tokenlake::cli {
namespace {

constexpr int32_t kSegmentTokens = 512;
constexpr int32_t kDocSegments = 256;
constexpr int32_t kPromptSegments = 8;

struct BenchFlags {
  std::string json_path;
  int64_t segments = 1 << 20;
  int32_t instances = 16;
  int32_t match_iterations = 20000;
  int32_t plan_iterations = 300;
  uint64_t seed = 1;
  bool pin_cpu = true;
};

std::vector<index::SegmentKey> DocKeys(int32_t doc, int32_t len) {
  std::vector<index::SegmentKey> keys;
  keys.reserve(len + 1);
  uint64_t parent = 0x5eed;
  for (int32_t k = 0; k < len; ++k) {
    const uint64_t id = HashCombine(parent, k < kPromptSegments ? 0 : doc + 1);
    keys.push_back({SegmentId(id), kSegmentTokens});
    parent = id;
  }
  return keys;
}

// CPU time of this thread in microseconds (robust to other processes on a shared machine).
double ThreadCpuUs() {
  timespec ts;
  clock_gettime(CLOCK_THREAD_CPUTIME_ID, &ts);
  return static_cast<double>(ts.tv_sec) * 1e6 + static_cast<double>(ts.tv_nsec) / 1e3;
}

double Percentile(std::vector<double> v, double p) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  const size_t i = std::min(v.size() - 1, static_cast<size_t>(p * (v.size() - 1) + 0.5));
  return v[i];
}

std::string RunText(const char* cmd) {
  std::string out;
  FILE* f = popen(cmd, "r");
  if (f == nullptr) return out;
  std::array<char, 256> buf;
  while (fgets(buf.data(), buf.size(), f) != nullptr) out += buf.data();
  pclose(f);
  while (!out.empty() && (out.back() == '\n' || out.back() == '\r')) out.pop_back();
  return out;
}

// The commit being measured: $TOKENLAKE_REVISION when set (a build tree copied to another
// machine, whose checkout may be at another commit), else git describe of the working directory.
std::string Commit() {
  if (const char* env = std::getenv("TOKENLAKE_REVISION"); env != nullptr && *env != '\0') {
    return env;
  }
  std::string c = RunText("git describe --always --dirty 2>/dev/null");
  while (!c.empty() && (c.back() == '\n' || c.back() == ' ')) c.pop_back();
  return c.empty() ? "unknown" : c;
}

// Writes a benchmark's JSON (stamped with the commit when it has none) and says where; 0, or 1
// after naming the file it could not write.
int WriteBenchJson(const char* command, const std::string& path, nlohmann::json j) {
  if (!j.contains("commit")) j["commit"] = Commit();
  std::ofstream out(path);
  out << j.dump(2) << "\n";
  out.close();
  if (!out) {
    std::fprintf(stderr, "tokenlake bench %s: cannot write '%s'\n", command, path.c_str());
    return 1;
  }
  std::cout << "wrote " << path << "\n";
  return 0;
}

nlohmann::json MachineInfo(bool pinned) {
  nlohmann::json m;
  char host[256] = {0};
  gethostname(host, sizeof(host) - 1);
  m["hostname"] = host;
  m["hardware_threads"] = std::thread::hardware_concurrency();
  std::ifstream cpuinfo("/proc/cpuinfo");
  std::string line;
  while (std::getline(cpuinfo, line)) {
    if (line.rfind("model name", 0) == 0) {
      m["cpu"] = line.substr(line.find(':') + 2);
      break;
    }
  }
  m["compiler"] = __VERSION__;
#ifdef NDEBUG
  m["build"] = "release";
#else
  m["build"] = "debug";
#endif
  m["pinned_to_one_cpu"] = pinned;
  const std::string load = RunText("cat /proc/loadavg 2>/dev/null");
  if (!load.empty()) m["loadavg"] = load;
  return m;
}

nlohmann::json Summary(const std::vector<double>& us) {
  return {{"p50_us", Percentile(us, 0.5)},
          {"p90_us", Percentile(us, 0.9)},
          {"p99_us", Percentile(us, 0.99)},
          {"samples", us.size()}};
}

int RunControlPlane(const BenchFlags& f) {
  bool pinned = false;
  if (f.pin_cpu) {
    cpu_set_t current;
    CPU_ZERO(&current);
    if (sched_getaffinity(0, sizeof(current), &current) == 0) {
      for (int c = 0; c < CPU_SETSIZE; ++c) {
        if (CPU_ISSET(c, &current)) {
          cpu_set_t one;
          CPU_ZERO(&one);
          CPU_SET(c, &one);
          pinned = sched_setaffinity(0, sizeof(one), &one) == 0;
          break;
        }
      }
    }
  }
  using Steady = std::chrono::steady_clock;
  auto us_since = [](Steady::time_point t0) {
    return std::chrono::duration<double, std::micro>(Steady::now() - t0).count();
  };
  ManualClock clock(1);
  lake::LakeOptions o;
  o.num_instances = f.instances;
  o.segment_tokens = kSegmentTokens;
  const int32_t num_docs =
      static_cast<int32_t>(std::max<int64_t>(1, f.segments / (kDocSegments - kPromptSegments)));
  const int64_t total = kPromptSegments + int64_t{num_docs} * (kDocSegments - kPromptSegments);
  o.slots_per_instance = static_cast<int32_t>(total / f.instances * 5 / 4 + 1024);
  o.reserve_segments = total + 1024;
  auto lake_or = lake::Lake::Create(o, &clock);
  if (!lake_or.ok()) {
    std::cerr << "bench: " << lake_or.status() << "\n";
    return 2;
  }
  lake::Lake& pool = **lake_or;
  const auto build_start = Steady::now();
  for (int32_t d = 0; d < num_docs; ++d) {
    lake::LakeRequest r;
    r.id = RequestId(d);
    r.keys = DocKeys(d, kDocSegments);
    r.new_tokens = 1;
    auto admitted = pool.Admit(r);
    auto committed = pool.CommitKeys(r.id, r.keys, InstanceId(d % f.instances));
    absl::Status released = pool.Release(r.id);
    if (!admitted.ok() || !committed.ok() || !released.ok()) {
      std::cerr << "bench: building the pool failed at document " << d << "\n";
      return 1;
    }
    clock.AdvanceUs(1);
  }
  const double build_s = us_since(build_start) / 1e6;
  const lake::LakeStats stats = pool.Stats();
  std::cout << "pool: " << stats.segments << " segments on " << f.instances
            << " instances, built in " << build_s << " s\n";

  Rng rng(f.seed);
  // match_128k.
  std::vector<std::vector<index::SegmentKey>> prompts;
  for (int i = 0; i < 256; ++i) {
    prompts.push_back(DocKeys(static_cast<int32_t>(rng.UniformInt(0, num_docs - 1)), kDocSegments));
  }
  std::vector<double> match_us, match_cpu_us;
  match_us.reserve(f.match_iterations);
  match_cpu_us.reserve(f.match_iterations);
  int64_t matched_check = 0;
  for (int i = 0; i < f.match_iterations; ++i) {
    const auto& keys = prompts[rng.UniformInt(0, static_cast<int64_t>(prompts.size()) - 1)];
    const double c0 = ThreadCpuUs();
    const auto t0 = Steady::now();
    const index::MatchResult m = pool.Match(keys);
    match_us.push_back(us_since(t0));
    match_cpu_us.push_back(ThreadCpuUs() - c0);
    matched_check += m.matched_tokens;
  }
  if (matched_check != int64_t{f.match_iterations} * kDocSegments * kSegmentTokens) {
    std::cerr << "bench: a 128K prompt did not fully match\n";
    return 1;
  }

  // gen_plans_256 and gen_plans_256_long.
  auto make_batches = [&](bool long_prefix) {
    std::vector<lake::Batch> batches(16);
    uint64_t next = 1;
    for (lake::Batch& b : batches) {
      b.dop = std::min(4, f.instances);
      for (int k = 0; k < 256; ++k) {
        lake::LakeRequest r;
        r.id = RequestId(next++);
        const int32_t len =
            long_prefix ? kDocSegments : static_cast<int32_t>(rng.UniformInt(1, 64));
        r.keys = DocKeys(static_cast<int32_t>(rng.UniformInt(0, num_docs - 1)), len);
        r.keys.push_back({SegmentId(HashCombine(r.keys.back().id.value(), next)), kSegmentTokens});
        r.new_tokens = rng.Bernoulli(0.5) ? 1 : rng.UniformInt(64, 2048);
        b.requests.push_back(std::move(r));
      }
    }
    return batches;
  };
  auto time_plans = [&](const std::vector<lake::Batch>& batches, int iterations, int64_t* bytes,
                        std::vector<double>* cpu_us) -> std::vector<double> {
    std::vector<double> us;
    for (int i = 0; i < iterations; ++i) {
      const lake::Batch& b = batches[i % batches.size()];
      const double c0 = ThreadCpuUs();
      const auto t0 = Steady::now();
      auto plans = pool.GenPlans({&b, 1});
      us.push_back(us_since(t0));
      cpu_us->push_back(ThreadCpuUs() - c0);
      if (!plans.ok()) {
        std::cerr << "bench: GenPlans failed: " << plans.status() << "\n";
        return {};
      }
      *bytes = (*plans)[0].transfer.total_bytes;
    }
    return us;
  };
  int64_t plan_bytes = 0, long_plan_bytes = 0;
  std::vector<double> plan_cpu_us, long_cpu_us;
  const std::vector<double> plan_us =
      time_plans(make_batches(false), f.plan_iterations, &plan_bytes, &plan_cpu_us);
  const std::vector<double> long_us = time_plans(
      make_batches(true), std::max(10, f.plan_iterations / 10), &long_plan_bytes, &long_cpu_us);
  if (plan_us.empty() || long_us.empty()) return 1;

  nlohmann::json j;
  j["benchmark"] = "control-plane";
  j["commit"] = Commit();
  j["machine"] = MachineInfo(pinned);
  j["pool"] = {{"segments", stats.segments},
               {"instances", f.instances},
               {"segment_tokens", kSegmentTokens},
               {"documents", num_docs},
               {"document_tokens", kDocSegments * kSegmentTokens},
               {"build_s", build_s}};
  j["match_128k_p50_us"] = Percentile(match_us, 0.5);
  j["match_128k_p90_us"] = Percentile(match_us, 0.9);
  j["match_128k"] = Summary(match_us);
  j["match_128k"]["thread_cpu"] = Summary(match_cpu_us);
  j["gen_plans_256_p50_us"] = Percentile(plan_us, 0.5);
  j["gen_plans_256_p90_us"] = Percentile(plan_us, 0.9);
  j["gen_plans_256"] = Summary(plan_us);
  j["gen_plans_256"]["thread_cpu"] = Summary(plan_cpu_us);
  j["gen_plans_256"]["prefix_segments"] = "uniform 1..64 (+1 new)";
  j["gen_plans_256"]["dop"] = std::min(4, f.instances);
  j["gen_plans_256"]["last_plan_total_bytes"] = plan_bytes;
  j["gen_plans_256_long"] = Summary(long_us);
  j["gen_plans_256_long"]["thread_cpu"] = Summary(long_cpu_us);
  j["gen_plans_256_long"]["prefix_segments"] = "256 (128K tokens, +1 new)";
  j["gen_plans_256_long"]["last_plan_total_bytes"] = long_plan_bytes;
  j["targets"] = {{"match_128k_p50_us", 20}, {"gen_plans_256_p50_us", 1000}};

  auto line = [](const char* name, const std::vector<double>& wall,
                 const std::vector<double>& cpu) {
    std::cout << name << " wall p50 " << Percentile(wall, 0.5) << " us, p90 "
              << Percentile(wall, 0.9) << " us | thread cpu p50 " << Percentile(cpu, 0.5)
              << " us, p90 " << Percentile(cpu, 0.9) << " us\n";
  };
  line("match_128k        ", match_us, match_cpu_us);
  line("gen_plans_256     ", plan_us, plan_cpu_us);
  line("gen_plans_256_long", long_us, long_cpu_us);
  return f.json_path.empty() ? 0 : WriteBenchJson("control-plane", f.json_path, j);
}

// `tokenlake bench engine`: the GPU engine on a random-init model (engine/cuda/engine_bench.h).
struct EngineBenchFlags {
  std::string json_path;
#if defined(TOKENLAKE_HAVE_CUDA)
  engine::cuda::EngineBenchOptions options;
#endif
  int64_t reserve_mib = 4096;
};

#if defined(TOKENLAKE_HAVE_CUDA)
int RunEngine(EngineBenchFlags& f) {
  f.options.reserve_bytes = f.reserve_mib << 20;
  const bool tty = isatty(fileno(stderr)) != 0;
  const auto started = std::chrono::steady_clock::now();
  auto progress = [&](const std::string& line) {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::fprintf(stderr, "%s[%6.1f s] %s\n", tty ? "\r" : "", s, line.c_str());
  };
  absl::StatusOr<nlohmann::json> j = engine::cuda::RunEngineBench(f.options, progress);
  if (!j.ok()) {
    std::fprintf(stderr, "tokenlake bench engine: %s\n", j.status().ToString().c_str());
    return 1;
  }
  return WriteBenchJson("engine", f.json_path, *std::move(j));
}
#else
int RunEngine(EngineBenchFlags&) {
  std::fprintf(stderr,
               "tokenlake bench engine: this build has no CUDA support; rebuild with the `cuda` "
               "preset (cmake --preset cuda) on a machine with nvcc to benchmark the GPU engine\n");
  return 1;
}
#endif

void SetUpEngineBench(CLI::App* bench, int* exit_code) {
  auto f = std::make_shared<EngineBenchFlags>();
  CLI::App* e = bench->add_subcommand(
      "engine",
      "The GPU engine on a random-init model: decode, prefill and a workload against "
      "the GPU's measured bounds");
  e->add_option("--json", f->json_path, "Write the results as JSON to this file")->required();
#if defined(TOKENLAKE_HAVE_CUDA)
  engine::cuda::EngineBenchOptions& o = f->options;
  e->add_option("--model", o.model, "Model shape: llama2-7b or llama3-8b")
      ->check(CLI::IsMember({"llama2-7b", "llama3-8b"}))
      ->capture_default_str();
  e->add_option("--sections", o.sections,
                "Sections: decode, prefill, workload, dense (peaks always)")
      ->check(CLI::IsMember({"peaks", "decode", "prefill", "workload", "dense"}));
  e->add_option("--decode-batches", o.decode_batches, "Decode batch sizes")
      ->check(CLI::Range(1, 4096));
  e->add_option("--decode-contexts", o.decode_contexts, "Context tokens per decoding request")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 22));
  e->add_option("--decode-steps", o.decode_steps, "Decode steps per batch")
      ->check(CLI::Range(2, 100000));
  e->add_option("--prefill-tokens", o.prefill_tokens, "Prompt lengths of the prefill section")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 22));
  e->add_option("--segment-tokens", o.segment_tokens, "Tokens per pool segment (multiple of 16)")
      ->check(CLI::Range(16, 1 << 16))
      ->capture_default_str();
  e->add_option("--max-batch-tokens", o.max_batch_tokens, "Token budget of one iteration")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 20))
      ->capture_default_str();
  e->add_option("--max-batch-requests", o.max_batch_requests, "Requests in one iteration")
      ->check(CLI::Range(1, 1 << 16))
      ->capture_default_str();
  e->add_option("--small-batch-rows", o.small_batch_rows,
                "Forwards of at most this many rows run their dense layers on the engine's "
                "small-batch kernel, larger ones on cuBLAS (0: cuBLAS always)")
      ->check(CLI::Range(0, engine::cuda::kSmallBatchMaxRows))
      ->capture_default_str();
  e->add_option("--decode-gemm-rows", o.decode_gemm_rows,
                "Larger forwards of at most this many rows run their dense layers on the "
                "engine's tensor-core decode GEMM, larger ones on cuBLAS (0: cuBLAS)")
      ->check(CLI::Range(0, engine::cuda::kDecodeGemmMaxRows))
      ->capture_default_str();
  e->add_option("--decode-gemm-unsplit-rows", o.decode_gemm_unsplit_rows,
                "Larger forwards of at most this many rows run on that GEMM the layers it reads "
                "without splitting their input width (gate/up, the LM head); at most "
                "--decode-gemm-rows: none")
      ->check(CLI::Range(0, engine::cuda::kDecodeGemmMaxRows))
      ->capture_default_str();
  e->add_flag(
      "!--no-decode-graphs", o.decode_graphs,
      absl::StrFormat("Launch the kernels of forwards of at most %d rows one by one "
                      "instead of replaying them as CUDA graphs (one per batch-size bucket)",
                      engine::cuda::GpuLlamaModel::kGraphMaxRows));
  e->add_flag("!--no-pdl", o.pdl,
              "Launch the forward's kernels one after another instead of chaining them by "
              "programmatic dependent launch (each may start while the one before it drains)");
  e->add_option("--seed", o.seed, "Seed of the weights and prompts");
  e->add_option("--prompts", o.prompts_path,
                "Also write the workloads' prompts as JSON (for bench/hf_generate.py)");
#endif
  e->add_option("--reserve-mib", f->reserve_mib,
                "Device memory kept out of the pool for activations and workspaces (MiB)")
      ->check(CLI::Range(int64_t{0}, int64_t{1} << 30))
      ->capture_default_str();
  e->callback([f, exit_code] { *exit_code = RunEngine(*f); });
}

// `tokenlake bench coordinator`: a real coordinator planning while it reconciles
// (service/coordinator_bench.h).
struct CoordinatorBenchFlags {
  std::string json_path;
  int32_t instances = 64;
  int64_t segments = int64_t{1} << 20;
  double seconds = 5;
  double warmup_seconds = 1;
  int32_t plan_clients = 2;
  int32_t batch_requests = 4;
  int32_t heartbeat_ms = 200;
  int32_t full_report_every = 50;
  uint64_t seed = 1;
};

#if defined(TOKENLAKE_HAVE_SERVICE)
int RunCoordinator(const CoordinatorBenchFlags& f) {
  const bool tty = isatty(fileno(stderr)) != 0;
  const auto started = std::chrono::steady_clock::now();
  auto progress = [&](const std::string& line) {
    const double s =
        std::chrono::duration<double>(std::chrono::steady_clock::now() - started).count();
    std::fprintf(stderr, "%s[%6.1f s] %s\n", tty ? "\r" : "", s, line.c_str());
  };
  absl::StatusOr<nlohmann::json> j =
      service::RunCoordinatorBench({.instances = f.instances,
                                    .segments = f.segments,
                                    .phase = absl::Seconds(f.seconds),
                                    .warmup = absl::Seconds(f.warmup_seconds),
                                    .plan_clients = f.plan_clients,
                                    .batch_requests = f.batch_requests,
                                    .heartbeat_interval = absl::Milliseconds(f.heartbeat_ms),
                                    .full_report_every = f.full_report_every,
                                    .seed = f.seed},
                                   progress);
  if (!j.ok()) {
    std::fprintf(stderr, "tokenlake bench coordinator: %s\n", j.status().ToString().c_str());
    return 1;
  }
  (*j)["commit"] = Commit();
  (*j)["machine"] = MachineInfo(false);
  std::printf(
      "plans/s %.0f without reconciliation, %.0f with; plan p99 %.3f ms without, %.3f "
      "ms with\n",
      (*j)["plans_per_s"].get<double>(), (*j)["plans_per_s_with_reconcile"].get<double>(),
      (*j)["plan_p99_ms"].get<double>(), (*j)["plan_p99_ms_with_reconcile"].get<double>());
  return WriteBenchJson("coordinator", f.json_path, *std::move(j));
}
#else
int RunCoordinator(const CoordinatorBenchFlags&) {
  std::fprintf(stderr,
               "tokenlake bench coordinator: this build has no service module; rebuild with "
               "-DTOKENLAKE_SERVICE=ON\n");
  return 1;
}
#endif

void SetUpCoordinatorBench(CLI::App* bench, int* exit_code) {
  auto f = std::make_shared<CoordinatorBenchFlags>();
  CLI::App* c = bench->add_subcommand(
      "coordinator",
      "A real coordinator (gRPC on loopback) with simulated instances and engines: plans per "
      "second and plan latency, with and without heartbeat reconciliation");
  c->add_option("--json", f->json_path, "Write the results as JSON to this file")->required();
  c->add_option("--instances", f->instances, "Simulated instances")
      ->check(CLI::Range(1, 64))
      ->capture_default_str();
  c->add_option("--segments", f->segments, "Segments in the pool at the start (about)")
      ->check(CLI::Range(int64_t{1}, int64_t{1} << 26))
      ->capture_default_str();
  c->add_option("--seconds", f->seconds, "Length of each measured phase")
      ->check(CLI::Range(0.1, 3600.0))
      ->capture_default_str();
  c->add_option("--warmup-seconds", f->warmup_seconds, "Warm-up before the phases")
      ->check(CLI::Range(0.0, 3600.0))
      ->capture_default_str();
  c->add_option("--plan-clients", f->plan_clients, "Engines planning concurrently")
      ->check(CLI::Range(1, 256))
      ->capture_default_str();
  c->add_option("--batch-requests", f->batch_requests, "Requests per PlanBatch call")
      ->check(CLI::Range(1, 4096))
      ->capture_default_str();
  c->add_option("--heartbeat-ms", f->heartbeat_ms, "The instances' heartbeat period")
      ->check(CLI::Range(1, 60000))
      ->capture_default_str();
  c->add_option("--full-report-every", f->full_report_every,
                "Every how many heartbeats an instance sends a full report (0: only when asked)")
      ->check(CLI::Range(0, 1 << 20))
      ->capture_default_str();
  c->add_option("--seed", f->seed, "Seed of the request mix");
  c->callback([f, exit_code] { *exit_code = RunCoordinator(*f); });
}

void SetUpBench(CLI::App& app, int* exit_code) {
  CLI::App* bench = app.add_subcommand("bench", "Micro-benchmarks of TokenLake components");
  bench->require_subcommand(1);
  auto flags = std::make_shared<BenchFlags>();
  CLI::App* cp = bench->add_subcommand(
      "control-plane", "Match and GenPlans latency over a large pool (default 1M segments)");
  cp->add_option("--json", flags->json_path, "Write the results as JSON to this file");
  cp->add_option("--segments", flags->segments, "Approximate pool size in segments")
      ->check(CLI::Range(int64_t{256}, int64_t{1} << 26));
  cp->add_option("--instances", flags->instances, "Number of instances")
      ->check(CLI::Range(1, 4096));
  cp->add_option("--match-iterations", flags->match_iterations, "Match calls to time")
      ->check(CLI::Range(1, 10'000'000));
  cp->add_option("--plan-iterations", flags->plan_iterations, "GenPlans calls to time")
      ->check(CLI::Range(1, 1'000'000));
  cp->add_option("--seed", flags->seed, "Seed of the request mix");
  cp->add_flag("!--no-pin", flags->pin_cpu, "Do not pin the process to one CPU");
  cp->callback([flags, exit_code] { *exit_code = RunControlPlane(*flags); });
  SetUpEngineBench(bench, exit_code);
  SetUpCoordinatorBench(bench, exit_code);
}

}  // namespace

TOKENLAKE_REGISTER_COMMAND(bench, SetUpBench);

}  // namespace tokenlake::cli
