// `tokenlake coordinator`: the control process of a TokenLake cluster (service/coordinator.h):
// the cluster's lake (prefix tree, heavy hitters, balancer, planner) serving the instances'
// engines over gRPC, membership by heartbeats, rebalancing, routing, and the HTTP front end
// (the OpenAI-compatible API: POST /v1/completions, POST /v1/chat/completions, GET /v1/models;
// GET /metrics, GET /healthz), on 127.0.0.1 unless --http-listen / --grpc-listen say otherwise
// (beyond loopback only with --tls-dir, or --insecure). The checkpoint folder's tokenizer
// (tokenizer.json or tokenizer.model, tokenizer_config.json, chat_template.jinja) is loaded when
// present; the model's vocabulary must cover it. With --tls-dir, gRPC and the transports are
// mutual TLS with the cluster's certificates (`tokenlake certs`). With --etcd URL --cluster NAME,
// several coordinators elect a leader through etcd (service/election.h): a follower redirects
// clients to the leader; a leader that loses its lease exits with code 3 (restart it: it comes
// back as a follower). Runs until SIGTERM/SIGINT.
// With --port-file it writes {"http_port", "grpc_port", "transport_port"} once listening
// (transport_port is 0: the coordinator dials the instances). The cluster secret comes from the
// environment (TOKENLAKE_CLUSTER_SECRET, hex; `tokenlake serve` sets it): without it, calls and
// transport connections are not authenticated (a warning says so).
//
// Exit codes: 0 after a signal, 1 for a runtime error (unreadable model config, port in use),
// 2 for bad flags.
// Built only with the service module (gRPC, protobuf, libmicrohttpd, cpp-httplib installed).
#ifdef TOKENLAKE_HAVE_SERVICE
#include <signal.h>
#include <sys/prctl.h>

#include <cstdio>
#include <cstdlib>
#include <filesystem>
#include <iostream>
#include <memory>
#include <string>
#include <tuple>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "command.h"
#include "flag_checks.h"
#include "routing_flags.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/pool_shape.h"
#include "tokenlake/sched/cost_model.h"
#include "tokenlake/service/call_auth.h"
#include "tokenlake/service/coordinator.h"
#include "tokenlake/service/election.h"
#include "tokenlake/service/etcd_client.h"
#include "tokenlake/service/grpc_credentials.h"
#include "tokenlake/service/process.h"
#include "tokenlake/tokenizer/tokenizer.h"
#include "tokenlake/transport/cluster_secret.h"
#include "tokenlake/transport/socket_stream.h"

namespace tokenlake::cli {
namespace {

struct CoordinatorFlags {
  std::string model;
  std::string model_id;
  std::string namespace_name = "tokenlake";
  int segment_tokens = 16;
  int instances = 4;
  int slots = 1024;
  std::string kv_dtype = "f32";
  int rebalance_interval_ms = 1000;
  int rebalance_every = 0;
  bool rotate_compute = false;
  RoutingFlags routing;
  int http_port = 0;
  int grpc_port = 0;
  std::string http_listen;
  std::string grpc_listen;
  std::string tls_dir;
  bool insecure = false;
  std::string api_key_file;
  bool metrics_public = false;
  std::string etcd;
  std::string cluster = "tokenlake";
  std::string advertise;
  int lease_ms = 3000;
  int transport_port = 0;
  std::string port_file;
  int heartbeat_ms = 200;
  int dead_after_ms = 1000;
  int request_timeout_ms = 30000;
  int attempt_timeout_ms = 10000;
  int max_tokens_limit = 256;
  double fault_drop = 0;
  int fault_delay_ms = 0;
  bool exit_with_parent = false;
};

int RunCoordinator(const CoordinatorFlags& f) {
  if (f.exit_with_parent) ::prctl(PR_SET_PDEATHSIG, SIGTERM);
  auto config = engine::LoadLlamaConfig(f.model + "/config.json");
  if (!config.ok()) {
    std::cerr << "tokenlake coordinator: " << config.status().message() << "\n";
    return 1;
  }
  service::CoordinatorOptions o;
  // The checkpoint's tokenizer, when it ships one: text prompts, chat, stop sequences, EOS.
  absl::StatusOr<std::unique_ptr<tokenizer::Tokenizer>> tok =
      tokenizer::Tokenizer::FromDir(f.model);
  if (tok.ok()) {
    o.tokenizer = std::move(*tok);
    std::fprintf(stderr, "tokenlake coordinator: tokenizer %s (%d ids)\n",
                 o.tokenizer->source().c_str(), o.tokenizer->vocab_size());
  } else if (tok.status().code() == absl::StatusCode::kNotFound) {
    std::fprintf(stderr,
                 "tokenlake coordinator: %s has no tokenizer: only token-id prompts are served\n",
                 f.model.c_str());
  } else {
    std::cerr << "tokenlake coordinator: cannot load the tokenizer of " << f.model << ": "
              << tok.status().message() << "\n";
    return 1;
  }
  o.model_id = f.model_id.empty()
                   ? std::filesystem::path(f.model).lexically_normal().filename().string()
                   : f.model_id;
  if (o.model_id.empty()) o.model_id = "tokenlake";
  o.limits = {.vocab_size = config->vocab_size,
              .context_tokens = config->max_position_embeddings > 0
                                    ? config->max_position_embeddings
                                    : int64_t{1} << 20,
              .max_tokens_limit = f.max_tokens_limit,
              .default_max_tokens = std::min(16, f.max_tokens_limit)};
  o.segment_tokens = f.segment_tokens;
  o.namespace_name = f.namespace_name;
  o.lake_instances = f.instances;
  o.slots_per_instance = f.slots;
  o.model = engine::PoolModelShape(
      *config, f.kv_dtype == "bf16" ? attention::KvDtype::kBFloat16 : attention::KvDtype::kFloat32);
  o.rebalance_interval = absl::Milliseconds(f.rebalance_interval_ms);
  o.rebalance_every_requests = f.rebalance_every;
  o.rotate_compute_instance = f.rotate_compute;
  // The scheduler's cost model: the checkpoint's shape on the instances' GPU profile.
  absl::StatusOr<service::RoutingRule> rule = service::ParseRoutingRule(f.routing.routing);
  absl::StatusOr<sched::GpuProfile> gpu = sched::LoadGpuProfile(f.routing.gpu);
  if (!rule.ok() || !gpu.ok()) {
    std::cerr << "tokenlake coordinator: " << (!rule.ok() ? "--routing: " : "--gpu: ")
              << (!rule.ok() ? rule.status() : gpu.status()).message() << "\n";
    return 2;
  }
  o.routing = *rule;
  o.routing_gpu = *std::move(gpu);
  o.slo_tpot_s = f.routing.slo_tpot;
  o.decode_budget_share = f.routing.decode_budget;
  o.routing_model = {.name = o.model_id,
                     .num_layers = config->num_layers,
                     .num_heads = config->num_heads,
                     .num_kv_heads = config->num_kv_heads,
                     .head_dim = config->head_dim,
                     .hidden = config->hidden_size,
                     .intermediate = config->intermediate_size,
                     .vocab = config->vocab_size,
                     .dtype_bytes = f.kv_dtype == "bf16" ? 2 : 4};
  o.http_port = f.http_port;
  o.grpc_port = f.grpc_port;
  for (const auto& [text, host, port] : {std::tuple{&f.http_listen, &o.http_host, &o.http_port},
                                         std::tuple{&f.grpc_listen, &o.grpc_host, &o.grpc_port}}) {
    if (text->empty()) continue;
    absl::StatusOr<transport::HostPort> at = transport::ParseHostPort(*text, 0);
    if (!at.ok()) {
      std::cerr << "tokenlake coordinator: " << at.status().message() << "\n";
      return 2;
    }
    *host = at->host;
    *port = at->port;
  }
  absl::StatusOr<service::ClusterTls> tls = service::ClusterTls::FromDir(f.tls_dir);
  if (!tls.ok()) {
    std::cerr << "tokenlake coordinator: " << tls.status().message() << "\n";
    return 2;
  }
  o.tls = *std::move(tls);
  o.allow_insecure = f.insecure;
  o.start_as_follower = !f.etcd.empty();
  if (!f.api_key_file.empty()) {
    absl::StatusOr<std::shared_ptr<const service::ApiKeys>> keys =
        service::ApiKeys::Load(f.api_key_file);
    if (!keys.ok()) {
      std::cerr << "tokenlake coordinator: " << keys.status().message() << "\n";
      return 2;
    }
    o.api_keys = *std::move(keys);
  }
  o.metrics_public = f.metrics_public;
  o.transport_port = f.transport_port;
  o.heartbeat_interval = absl::Milliseconds(f.heartbeat_ms);
  o.dead_after = absl::Milliseconds(f.dead_after_ms);
  o.request_timeout = absl::Milliseconds(f.request_timeout_ms);
  o.attempt_timeout = absl::Milliseconds(f.attempt_timeout_ms);
  absl::StatusOr<std::string> secret = service::TakeClusterSecretFromEnvironment();
  if (!secret.ok()) {
    std::cerr << "tokenlake coordinator: " << secret.status().message() << "\n";
    return 2;
  }
  if (secret->empty()) {
    std::fprintf(stderr,
                 "tokenlake coordinator: warning: %s is not set: gRPC calls and transport "
                 "connections are not authenticated\n",
                 transport::kClusterSecretEnv);
  }
  o.cluster_secret = *secret;
  o.faults.drop_probability = f.fault_drop;
  o.faults.delay = absl::Milliseconds(f.fault_delay_ms);

  // Signals are taken synchronously by this thread; every thread started below inherits the mask.
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);

  auto coordinator = service::Coordinator::Create(o);
  if (!coordinator.ok()) {
    std::cerr << "tokenlake coordinator: " << coordinator.status().message() << "\n";
    return coordinator.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  const std::string ports = absl::StrFormat(
      "{\"http_port\": %d, \"grpc_port\": %d, \"transport_port\": %d}\n",
      (*coordinator)->http_port(), (*coordinator)->grpc_port(), (*coordinator)->transport_port());
  if (!f.port_file.empty()) {
    if (absl::Status s = service::WriteFileAtomically(f.port_file, ports); !s.ok()) {
      std::cerr << "tokenlake coordinator: " << s.message() << "\n";
      return 1;
    }
  }
  std::fprintf(stderr, "tokenlake coordinator: http://%s grpc %s%s %s",
               transport::HostPort{.host = o.http_host, .port = (*coordinator)->http_port()}
                   .ToString()
                   .c_str(),
               transport::HostPort{.host = o.grpc_host, .port = (*coordinator)->grpc_port()}
                   .ToString()
                   .c_str(),
               o.tls.enabled() ? " (mutual TLS)" : "", ports.c_str());
  std::unique_ptr<service::EtcdClient> etcd;
  std::unique_ptr<service::CoordinatorElection> election;
  if (!f.etcd.empty()) {
    absl::StatusOr<std::unique_ptr<service::EtcdClient>> client =
        service::EtcdClient::Create({.endpoint = f.etcd});
    if (!client.ok()) {
      std::cerr << "tokenlake coordinator: --etcd: " << client.status().message() << "\n";
      return 2;
    }
    etcd = *std::move(client);
    std::string host = f.advertise;
    if (host.empty()) host = o.grpc_host == "0.0.0.0" || o.grpc_host == "::" ? "" : o.grpc_host;
    if (host.empty()) {
      std::cerr << "tokenlake coordinator: with --etcd and a wildcard --grpc-listen, give "
                   "--advertise HOST (what instances and clients dial)\n";
      return 2;
    }
    const service::LeaderRecord self{
        .grpc = {.host = host, .port = (*coordinator)->grpc_port()},
        .http_url =
            "http://" + transport::HostPort{.host = f.advertise.empty() ? o.http_host : f.advertise,
                                            .port = (*coordinator)->http_port()}
                            .ToString()};
    absl::StatusOr<std::unique_ptr<service::CoordinatorElection>> e =
        service::CoordinatorElection::Start(
            etcd.get(), {.cluster = f.cluster, .self = self, .ttl = absl::Milliseconds(f.lease_ms)},
            (*coordinator)->leader_gate(), [] {
              // Its lake may be stale: never act again; a supervisor restarts it as a follower.
              std::fprintf(stderr, "tokenlake coordinator: lost the leadership; exiting\n");
              std::_Exit(3);
            });
    if (!e.ok()) {
      std::cerr << "tokenlake coordinator: " << e.status().message() << "\n";
      return 2;
    }
    election = *std::move(e);
    std::fprintf(stderr, "tokenlake coordinator: campaigning in cluster '%s' on etcd %s\n",
                 f.cluster.c_str(), etcd->endpoint().c_str());
  }
  int sig = 0;
  sigwait(&signals, &sig);
  std::fprintf(stderr, "tokenlake coordinator: signal %d, shutting down\n", sig);
  if (election != nullptr) election->Resign();
  (*coordinator)->Shutdown();
  return 0;
}

void SetUpCoordinator(CLI::App& app, int* exit_code) {
  auto f = std::make_shared<CoordinatorFlags>();
  CLI::App* cmd = app.add_subcommand(
      "coordinator", "Cluster coordinator: membership, prefix tree, routing, HTTP front end");
  cmd->add_option("--model", f->model,
                  "Checkpoint directory (its config.json sets the limits; its tokenizer, if any, "
                  "serves text prompts and chat)")
      ->required();
  cmd->add_option("--model-id", f->model_id,
                  "Model id that GET /v1/models lists (default: the checkpoint folder's name)");
  cmd->add_option("--namespace", f->namespace_name, "Segment-id namespace (same on instances)")
      ->capture_default_str();
  cmd->add_option("--segment-tokens", f->segment_tokens,
                  "Tokens per segment, the same on every instance (GPU instances: 256, as "
                  "serve --device gpu uses)")
      ->capture_default_str();
  cmd->add_option("--instances", f->instances,
                  "Instances of the lake (ids 0..N-1; run that many `tokenlake instance`)")
      ->capture_default_str();
  cmd->add_option("--slots", f->slots, "Segment slots per instance (instances need >= this)")
      ->capture_default_str();
  cmd->add_option("--kv-dtype", f->kv_dtype, "KV dtype of the instances (plan costs): f32, bf16")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_option("--rebalance-interval-ms", f->rebalance_interval_ms,
                  "Run the lake's rebalancing this often (0 = never)")
      ->capture_default_str();
  cmd->add_option("--rebalance-every", f->rebalance_every,
                  "Also rebalance after every this many served requests (0 = never)")
      ->capture_default_str();
  cmd->add_flag("--rotate-compute", f->rotate_compute,
                "Live instances take turns computing (forces cross-process KV / query traffic)");
  AddRoutingFlags(cmd, &f->routing);
  CLI::Option* http_port =
      cmd->add_option("--http-port", f->http_port, "HTTP port on 127.0.0.1 (0 = any)")
          ->capture_default_str();
  CLI::Option* grpc_port =
      cmd->add_option("--grpc-port", f->grpc_port, "gRPC port on 127.0.0.1 (0 = any)")
          ->capture_default_str();
  cmd->add_option("--http-listen", f->http_listen,
                  "HTTP address HOST[:PORT] or [IPV6][:PORT] (0.0.0.0 = every interface)")
      ->excludes(http_port);
  cmd->add_option("--grpc-listen", f->grpc_listen, "gRPC address HOST[:PORT] or [IPV6][:PORT]")
      ->excludes(grpc_port);
  cmd->add_option("--tls-dir", f->tls_dir,
                  "Mutual TLS for gRPC and the transports: ca.pem, cert.pem, key.pem "
                  "(`tokenlake certs`)");
  cmd->add_option("--api-key-file", f->api_key_file,
                  "API keys of the HTTP front end, one per line: KEY [tenant=NAME] "
                  "[max_concurrent=N] [max_tokens_in_flight=N]; requests then need "
                  "Authorization: Bearer KEY");
  cmd->add_flag("--metrics-public", f->metrics_public, "Serve /metrics without a key");
  cmd->add_option("--etcd", f->etcd,
                  "etcd endpoint http://HOST:PORT: elect a leader among this cluster's "
                  "coordinators");
  cmd->add_option("--cluster", f->cluster, "Cluster name in etcd")->capture_default_str();
  cmd->add_option("--advertise", f->advertise,
                  "Host instances and clients dial to reach this coordinator (with --etcd)");
  cmd->add_option("--lease-ms", f->lease_ms, "Leader lease in etcd (whole seconds, >= 1 s)")
      ->capture_default_str()
      ->check(CLI::Range(1000, 600000));
  cmd->add_flag("--insecure", f->insecure,
                "Allow listening beyond loopback without TLS (anyone who reaches the ports can "
                "talk to the cluster)");
  cmd->add_option("--transport-port", f->transport_port, "Host-transport port (0 = any)")
      ->capture_default_str();
  cmd->add_option("--port-file", f->port_file, "Write the chosen ports (JSON) to this file");
  cmd->add_option("--heartbeat-ms", f->heartbeat_ms, "Heartbeat period asked of instances")
      ->capture_default_str();
  cmd->add_option("--dead-after-ms", f->dead_after_ms, "Silence after which an instance is dead")
      ->capture_default_str();
  cmd->add_option("--request-timeout-ms", f->request_timeout_ms, "Deadline of one request")
      ->capture_default_str();
  cmd->add_option("--attempt-timeout-ms", f->attempt_timeout_ms,
                  "An attempt fails over after this long without word from its instance")
      ->capture_default_str();
  cmd->add_option("--max-tokens-limit", f->max_tokens_limit, "Largest max_tokens accepted")
      ->capture_default_str();
  cmd->add_option("--fault-drop", f->fault_drop, "Drop probability on the host transport (tests)")
      ->capture_default_str();
  cmd->add_option("--fault-delay-ms", f->fault_delay_ms, "Delay on the host transport (tests)")
      ->capture_default_str();
  cmd->add_flag("--exit-with-parent", f->exit_with_parent, "Exit when the parent process dies");
  cmd->callback([f, exit_code] { *exit_code = RunCoordinator(*f); });
}

}  // namespace
}  // namespace tokenlake::cli

TOKENLAKE_REGISTER_COMMAND(coordinator, tokenlake::cli::SetUpCoordinator);

#endif  // TOKENLAKE_HAVE_SERVICE
