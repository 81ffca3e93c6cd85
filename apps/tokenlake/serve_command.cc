// `tokenlake serve`: a whole local TokenLake cluster on loopback: one coordinator process and N
// instance processes (children of this one; each dies with it), the embedded default.
// Prints where it listens (the HTTP address on stderr, the port alone on stdout) and, while
// stdout is a terminal, a one-line status refreshed every 2 s (instances live, requests/s, the
// served requests' hit rate, pool use, requests running; from the coordinator's /metrics).
// Supervises the instances (one that exits is restarted and rejoins
// empty) and the coordinator (one that exits is restarted on the same ports, after a pause
// that doubles from 0.2 s to 5 s while it keeps failing; the instances re-register and rebuild
// its prefix tree; each restart is logged), and stops everything on SIGTERM/SIGINT or after
// --duration-s. The cluster secret is generated here and handed to the children (LocalCluster).
// The routing flags (routing_flags.h) go to the coordinator; a GPU profile it could not read is
// refused here, before anything starts. --device gpu (a CUDA build) runs every instance on the
// GPU (the first one CUDA_VISIBLE_DEVICES shows; they map each other's arenas), with bf16 slots,
// and the coordinator costs plans for bf16; --memory-fraction F gives each instance F of that
// GPU's memory (N x F at most 1), its pool what the weights and --reserve-mib leave, and tells
// the coordinator that many slots per instance.
//
// Exit codes: 0 after a signal or the duration, 1 when the cluster does not start or the
// coordinator cannot be started again (5 failed starts in a row), 2 for bad flags.
// Built only with the service module (gRPC, protobuf, libmicrohttpd, cpp-httplib installed).
#ifdef TOKENLAKE_HAVE_SERVICE
#include <signal.h>
#include <unistd.h>

#include <algorithm>
#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "absl/time/clock.h"
#include "command.h"
#include "flag_checks.h"
#include "routing_flags.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/pool_shape.h"
#include "tokenlake/sched/cost_model.h"
#include "tokenlake/service/local_cluster.h"
#if defined(TOKENLAKE_HAVE_GPU_INSTANCE)
#include "tokenlake/service/cuda/gpu_backend.h"
#endif
#include "tokenlake/tokenizer/tokenizer.h"

namespace tokenlake::cli {
namespace {

struct ServeFlags {
  std::string model;
  int instances = 2;
  int port = 0;
  int segment_tokens = 0;  // not given: engine::DefaultSegmentTokens for --device
  int slots = 1024;
  int heartbeat_ms = 200;
  int dead_after_ms = 1000;
  double duration_s = 0;
  std::string log_dir = "/tmp";
  std::string port_file;
  std::string device = "cpu";
  double memory_fraction = -1;  // < 0: --slots
  int reserve_mib = 4096;
  std::string peer_access = "auto";
  std::string load_format = "auto";
  int64_t max_batch_tokens = 2048;
  int request_timeout_ms = 30000;
  RoutingFlags routing;
};

// The sum of every sample of metric family `name` on a /metrics page (0 when absent).
double MetricSum(const std::string& page, const std::string& name) {
  double sum = 0;
  size_t at = 0;
  while ((at = page.find(name, at)) != std::string::npos) {
    const bool line_start = at == 0 || page[at - 1] == '\n';
    const size_t after = at + name.size();
    at = after;
    if (!line_start || after >= page.size() || (page[after] != ' ' && page[after] != '{')) continue;
    const size_t value = page.find(' ', page[after] == '{' ? page.find('}', after) : after);
    if (value == std::string::npos) break;
    sum += std::strtod(page.c_str() + value + 1, nullptr);
  }
  return sum;
}

// The one-line status shown while stdout is a terminal, from the coordinator's /metrics:
// requests per second since the last line, the served requests' hit rate, pool use, running.
class StatusLine {
 public:
  StatusLine(int32_t port, int32_t instances, int64_t pool_slots)
      : port_(port), instances_(instances), pool_slots_(pool_slots) {}

  // Rewrites the line (a carriage return, then the line, cleared to its end).
  void Refresh() {
    absl::StatusOr<std::pair<int, std::string>> page =
        service::HttpGet(port_, "/metrics", absl::Seconds(1));
    std::string line;
    if (!page.ok() || page->first != 200) {
      line = "coordinator not answering";
    } else {
      const std::string& m = page->second;
      const double requests = MetricSum(m, "tokenlake_requests_total");
      const absl::Time now = absl::Now();
      const double rate = last_time_ == absl::InfinitePast()
                              ? 0
                              : (requests - last_requests_) /
                                    std::max(1e-3, absl::ToDoubleSeconds(now - last_time_));
      last_requests_ = requests;
      last_time_ = now;
      const double replicas = MetricSum(m, "tokenlake_pool_replicas");
      line = absl::StrFormat(
          "%d/%d instances live | %.1f requests/s | hit rate %.2f | pool %.1f%% (%d of %d "
          "slots) | %d running",
          static_cast<int>(MetricSum(m, "tokenlake_instance_alive")), instances_, rate,
          MetricSum(m, "tokenlake_hit_rate"),
          pool_slots_ > 0 ? 100.0 * replicas / static_cast<double>(pool_slots_) : 0.0,
          static_cast<int64_t>(replicas), pool_slots_,
          static_cast<int64_t>(MetricSum(m, "tokenlake_instance_running")));
    }
    std::printf("\r\033[K%s", line.c_str());
    std::fflush(stdout);
  }

 private:
  int32_t port_;
  int32_t instances_;
  int64_t pool_slots_;
  double last_requests_ = 0;
  absl::Time last_time_ = absl::InfinitePast();
};

int RunServe(ServeFlags f) {
  if (f.segment_tokens == 0) {
    f.segment_tokens = engine::DefaultSegmentTokens(f.device == "gpu");
  }
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  // The checkpoint's tokenizer must fit the model (the coordinator refuses it too, but its
  // reason would only be in its log).
  if (auto config = engine::LoadLlamaConfig(f.model + "/config.json"); config.ok()) {
    auto tok = tokenizer::Tokenizer::FromDir(f.model);
    if (!tok.ok() && tok.status().code() != absl::StatusCode::kNotFound) {
      std::cerr << "tokenlake serve: cannot load the tokenizer of " << f.model << ": "
                << tok.status().message() << "\n";
      return 1;
    }
    if (tok.ok() && (*tok)->vocab_size() > config->vocab_size) {
      std::cerr << "tokenlake serve: the tokenizer (" << (*tok)->source() << ") knows ids up to "
                << (*tok)->vocab_size() - 1 << ", the model's vocabulary has only "
                << config->vocab_size << " rows\n";
      return 1;
    }
  }
  // The coordinator would refuse a GPU profile it cannot read, but only in its log.
  if (absl::StatusOr<sched::GpuProfile> gpu = sched::LoadGpuProfile(f.routing.gpu); !gpu.ok()) {
    std::cerr << "tokenlake serve: --gpu: " << gpu.status().message() << "\n";
    return 2;
  }
#if !defined(TOKENLAKE_HAVE_GPU_INSTANCE)
  if (f.device == "gpu") {
    std::cerr << "tokenlake serve: --device gpu: this build has no GPU instance backend; build "
                 "the CLI with CUDA (`cmake --preset cuda && cmake --build --preset cuda "
                 "--target tokenlake`) and run build/cuda/bin/tokenlake on a machine with an "
                 "NVIDIA GPU\n";
    return 2;
  }
#endif
  int32_t slots = f.slots;
  if (f.load_format == "dummy" && f.device != "gpu") {
    std::cerr << "tokenlake serve: --load-format dummy (random weights) runs on the GPU only; "
                 "give --device gpu\n";
    return 2;
  }
  if (f.memory_fraction >= 0 && f.device != "gpu") {
    std::cerr << "tokenlake serve: --memory-fraction sizes GPU instances' pools; give --device "
                 "gpu, or --slots on the CPU\n";
    return 2;
  }
  if (f.peer_access != "auto" && f.device != "gpu") {
    std::cerr << "tokenlake serve: --peer-access chooses how GPU instances reach each other; "
                 "give --device gpu\n";
    return 2;
  }
#if defined(TOKENLAKE_HAVE_GPU_INSTANCE)
  if (f.memory_fraction >= 0) {
    if (f.memory_fraction * f.instances > 1.0 + 1e-9) {
      std::cerr << "tokenlake serve: --memory-fraction " << f.memory_fraction << " for each of "
                << f.instances << " instances on one GPU is more than all of it\n";
      return 2;
    }
    absl::StatusOr<engine::LlamaConfig> config = engine::LoadLlamaConfig(f.model + "/config.json");
    if (!config.ok()) {
      std::cerr << "tokenlake serve: " << config.status().message() << "\n";
      return 1;
    }
    absl::StatusOr<int32_t> fit = service::GpuShareSlots(
        *config, f.segment_tokens, /*device=*/0, f.memory_fraction, int64_t{f.reserve_mib} << 20);
    if (!fit.ok()) {
      std::cerr << "tokenlake serve: --memory-fraction " << f.memory_fraction << ": "
                << fit.status().message() << "\n";
      return 1;
    }
    slots = *fit;
  }
#endif
  service::LocalClusterOptions o;
  o.binary = service::SelfExecutable();
  o.coordinator_flags = RoutingFlagArgs(f.routing);
  o.instance_flags = {"--max-batch-tokens", std::to_string(f.max_batch_tokens)};
  if (f.device == "gpu") {
    // GPU instances keep bf16 slots; the coordinator's plan costs must count the same bytes.
    o.coordinator_flags.insert(o.coordinator_flags.end(), {"--kv-dtype", "bf16"});
    o.instance_flags.insert(o.instance_flags.end(),
                            {"--device", "gpu", "--gpu", "0", "--kv-dtype", "bf16", "--load-format",
                             f.load_format, "--peer-access", f.peer_access});
  }
  o.model = std::filesystem::absolute(f.model).string();
  o.instances = f.instances;
  o.http_port = f.port;
  o.segment_tokens = f.segment_tokens;
  o.slots = slots;
  o.heartbeat_ms = f.heartbeat_ms;
  o.dead_after_ms = f.dead_after_ms;
  o.request_timeout_ms = f.request_timeout_ms;
  o.work_dir = f.log_dir;
  auto cluster = service::LocalCluster::Start(o);
  if (!cluster.ok()) {
    std::cerr << "tokenlake serve: " << cluster.status().message() << "\n";
    return 1;
  }
  std::fprintf(stderr,
               "tokenlake serve: http://127.0.0.1:%d (coordinator + %d instance processes; "
               "logs in %s)\n"
               "tokenlake serve: OpenAI-compatible API at http://127.0.0.1:%d/v1 "
               "(completions, chat/completions, models); /metrics, /healthz\n",
               (*cluster)->http_port(), f.instances, f.log_dir.c_str(), (*cluster)->http_port());
  if (f.device == "gpu") {
    std::fprintf(stderr, "tokenlake serve: %d GPU instance processes on GPU 0, %d slots each\n",
                 f.instances, slots);
  }
  std::printf("%d\n", (*cluster)->http_port());
  std::fflush(stdout);
  if (!f.port_file.empty()) {
    service::WriteFileAtomically(f.port_file, std::to_string((*cluster)->http_port()) + "\n")
        .IgnoreError();
  }
  const absl::Time end =
      f.duration_s > 0 ? absl::Now() + absl::Seconds(f.duration_s) : absl::InfiniteFuture();
  constexpr int kMaxFailedStarts = 5;
  const absl::Duration kFirstPause = absl::Milliseconds(200), kMaxPause = absl::Seconds(5);
  absl::Duration pause = kFirstPause;
  absl::Time next_start = absl::InfinitePast();
  absl::Time last_start = absl::Now();
  int failed_starts = 0;
  // The status line, only for a person watching: a pipe or file gets the port line alone.
  std::optional<StatusLine> status;
  if (::isatty(STDOUT_FILENO) == 1) {
    status.emplace((*cluster)->http_port(), f.instances, int64_t{f.instances} * slots);
  }
  absl::Time next_status = absl::Now();
  while (absl::Now() < end) {
    timespec ts{.tv_sec = 0, .tv_nsec = 200'000'000};
    if (sigtimedwait(&signals, nullptr, &ts) > 0) break;
    if (status.has_value() && absl::Now() >= next_status) {
      status->Refresh();
      next_status = absl::Now() + absl::Seconds(2);
    }
    if (const std::optional<int> code = (*cluster)->CoordinatorExitCode(); code.has_value()) {
      if (absl::Now() < next_start) continue;
      // A coordinator that ran for a while is restarted at once; one that keeps dying waits
      // longer each time.
      if (absl::Now() - last_start > absl::Seconds(60)) pause = kFirstPause;
      std::fprintf(stderr, "tokenlake serve: the coordinator exited (code %d); restarting it\n",
                   *code);
      last_start = absl::Now();
      if (absl::Status s = (*cluster)->StartCoordinatorAgain(); s.ok()) {
        failed_starts = 0;
        std::fprintf(stderr,
                     "tokenlake serve: restarted the coordinator (pid %d) on "
                     "http://127.0.0.1:%d\n",
                     (*cluster)->coordinator_pid(), (*cluster)->http_port());
      } else {
        ++failed_starts;
        std::fprintf(stderr, "tokenlake serve: cannot restart the coordinator (%d of %d): %s\n",
                     failed_starts, kMaxFailedStarts, std::string(s.message()).c_str());
        if (failed_starts >= kMaxFailedStarts) {
          std::fprintf(stderr, "tokenlake serve: giving up; stopping the cluster\n");
          (*cluster)->Stop();
          return 1;
        }
      }
      next_start = absl::Now() + pause;
      pause = std::min(2 * pause, kMaxPause);
      continue;
    }
    if (const int32_t n = (*cluster)->RestartExitedInstances(); n > 0) {
      std::fprintf(stderr, "tokenlake serve: restarted %d instance(s)\n", n);
    }
  }
  if (status.has_value()) std::printf("\n");
  std::fprintf(stderr, "tokenlake serve: stopping\n");
  (*cluster)->Stop();
  return 0;
}

void SetUpServe(CLI::App& app, int* exit_code) {
  auto f = std::make_shared<ServeFlags>();
  CLI::App* cmd = app.add_subcommand(
      "serve", "A local TokenLake cluster on loopback: coordinator + N instance processes");
  cmd->add_option("--model", f->model,
                  "Checkpoint directory (config.json, and model.safetensors or "
                  "model.safetensors.index.json with its shards; its tokenizer and chat template, "
                  "when present, serve text prompts and chat)")
      ->required();
  cmd->add_option("--instances", f->instances, "Instance processes")
      ->capture_default_str()
      ->check(IntIn(1, 64));
  cmd->add_option("--port", f->port, "HTTP port on 127.0.0.1 (0 = any, printed)")
      ->capture_default_str()
      ->check(IntIn(0, 65535));
  cmd->add_option("--segment-tokens", f->segment_tokens,
                  "Tokens per segment (default 16; 256 with --device gpu)")
      ->check(IntIn(1, 1 << 20));
  CLI::Option* slots =
      cmd->add_option("--slots", f->slots, "Segment slots per instance")->capture_default_str();
  cmd->add_option("--heartbeat-ms", f->heartbeat_ms, "Instance heartbeat period")
      ->capture_default_str();
  cmd->add_option("--dead-after-ms", f->dead_after_ms, "Silence after which an instance is dead")
      ->capture_default_str();
  cmd->add_option("--request-timeout-ms", f->request_timeout_ms,
                  "Deadline of one request, all attempts (long prompts under load need more)")
      ->capture_default_str()
      ->check(IntAtLeast(1));
  cmd->add_option("--duration-s", f->duration_s, "Stop after this many seconds (0 = on signal)")
      ->capture_default_str();
  cmd->add_option("--log-dir", f->log_dir, "Directory for the processes' logs (made if missing)")
      ->capture_default_str();
  cmd->add_option("--port-file", f->port_file, "Write the HTTP port to this file");
  cmd->add_option("--device", f->device,
                  "Where the instances compute and keep their slots: cpu, or gpu (all on the "
                  "first GPU CUDA_VISIBLE_DEVICES shows; a CUDA build)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "gpu"}));
  cmd->add_option("--max-batch-tokens", f->max_batch_tokens,
                  "Tokens each instance computes per iteration (decodes and prompt chunks)")
      ->capture_default_str()
      ->check(IntAtLeast(1));
  cmd->add_option("--load-format", f->load_format,
                  "auto: the checkpoint's weights; dummy: random weights of its config.json's "
                  "shape, the same in every instance (--device gpu; for benchmarks)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "dummy"}));
  cmd->add_option("--memory-fraction", f->memory_fraction,
                  "--device gpu: the share of the GPU's memory each instance takes; the pools get "
                  "what the weights and --reserve-mib leave (instead of --slots)")
      ->check(CLI::Range(0.0, 1.0))
      ->excludes(slots);
  cmd->add_option("--reserve-mib", f->reserve_mib,
                  "--memory-fraction: device memory each instance keeps out of its pool for "
                  "activations, workspaces and the CUDA context")
      ->capture_default_str()
      ->check(IntAtLeast(0));
  cmd->add_option("--peer-access", f->peer_access,
                  "--device gpu: how instances read each other's slots. auto: in place (CUDA "
                  "IPC; one GPU); host: through host staging over TCP, as instances on different "
                  "GPUs or hosts do")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "host"}));
  AddRoutingFlags(cmd, &f->routing);
  cmd->callback([f, exit_code] { *exit_code = RunServe(*f); });
}

}  // namespace
}  // namespace tokenlake::cli

TOKENLAKE_REGISTER_COMMAND(serve, tokenlake::cli::SetUpServe);

#endif  // TOKENLAKE_HAVE_SERVICE
