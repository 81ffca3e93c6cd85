// `tokenlake serve`: a whole local TokenLake cluster on loopback: one coordinator process and N
// instance processes (children of this one; each dies with it), the embedded default.
// Prints the HTTP address, supervises the instances (one that exits is restarted and rejoins
// empty) and the coordinator (one that exits is restarted on the same ports, after a pause
// that doubles from 0.2 s to 5 s while it keeps failing; the instances re-register and rebuild
// its prefix tree; each restart is logged), and stops everything on SIGTERM/SIGINT or after
// --duration-s. The cluster secret is generated here and handed to the children (LocalCluster).
//
// Exit codes: 0 after a signal or the duration, 1 when the cluster does not start or the
// coordinator cannot be started again (5 failed starts in a row), 2 for bad flags.
// Built only with the service module (gRPC, protobuf, cpp-httplib installed).
#ifdef TOKENLAKE_HAVE_SERVICE
#include <signal.h>

#include <algorithm>
#include <cstdio>
#include <filesystem>
#include <iostream>
#include <optional>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/time/clock.h"
#include "command.h"
#include "flag_checks.h"
#include "tokenlake/service/local_cluster.h"

namespace tokenlake::cli {
namespace {

struct ServeFlags {
  std::string model;
  int instances = 2;
  int port = 0;
  int segment_tokens = 16;
  int slots = 1024;
  int heartbeat_ms = 200;
  int dead_after_ms = 1000;
  double duration_s = 0;
  std::string log_dir = "/tmp";
  std::string port_file;
};

int RunServe(const ServeFlags& f) {
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  service::LocalClusterOptions o;
  o.binary = service::SelfExecutable();
  o.model = std::filesystem::absolute(f.model).string();
  o.instances = f.instances;
  o.http_port = f.port;
  o.segment_tokens = f.segment_tokens;
  o.slots = f.slots;
  o.heartbeat_ms = f.heartbeat_ms;
  o.dead_after_ms = f.dead_after_ms;
  o.work_dir = f.log_dir;
  auto cluster = service::LocalCluster::Start(o);
  if (!cluster.ok()) {
    std::cerr << "tokenlake serve: " << cluster.status().message() << "\n";
    return 1;
  }
  std::fprintf(stderr,
               "tokenlake serve: http://127.0.0.1:%d (coordinator + %d instance processes; "
               "logs in %s)\n",
               (*cluster)->http_port(), f.instances, f.log_dir.c_str());
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
  while (absl::Now() < end) {
    timespec ts{.tv_sec = 0, .tv_nsec = 200'000'000};
    if (sigtimedwait(&signals, nullptr, &ts) > 0) break;
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
                  "model.safetensors.index.json with its shards)")
      ->required();
  cmd->add_option("--instances", f->instances, "Instance processes")
      ->capture_default_str()
      ->check(IntIn(1, 64));
  cmd->add_option("--port", f->port, "HTTP port on 127.0.0.1 (0 = any, printed)")
      ->capture_default_str()
      ->check(IntIn(0, 65535));
  cmd->add_option("--segment-tokens", f->segment_tokens, "Tokens per segment")
      ->capture_default_str();
  cmd->add_option("--slots", f->slots, "Segment slots per instance")->capture_default_str();
  cmd->add_option("--heartbeat-ms", f->heartbeat_ms, "Instance heartbeat period")
      ->capture_default_str();
  cmd->add_option("--dead-after-ms", f->dead_after_ms, "Silence after which an instance is dead")
      ->capture_default_str();
  cmd->add_option("--duration-s", f->duration_s, "Stop after this many seconds (0 = on signal)")
      ->capture_default_str();
  cmd->add_option("--log-dir", f->log_dir, "Directory for the processes' logs")
      ->capture_default_str();
  cmd->add_option("--port-file", f->port_file, "Write the HTTP port to this file");
  cmd->callback([f, exit_code] { *exit_code = RunServe(*f); });
}

}  // namespace
}  // namespace tokenlake::cli

TOKENLAKE_REGISTER_COMMAND(serve, tokenlake::cli::SetUpServe);

#endif  // TOKENLAKE_HAVE_SERVICE
