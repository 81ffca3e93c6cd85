// `tokenlake instance`: one TokenLake instance process (service/instance_server.h): its part of
// the cluster's pool (its segment store, served to the other instances over TCP) and an engine
// that runs the coordinator's lake plans over the whole pool, registered with the coordinator,
// serving generate requests over the host transport. Runs until SIGTERM/SIGINT. The cluster
// secret comes from the environment (TOKENLAKE_CLUSTER_SECRET, hex; `tokenlake serve` sets it).
// Across hosts: --coordinator HOST:PORT, --listen HOST[:PORT] (its transports; beyond loopback
// only with --tls-dir or --insecure), --advertise HOST (what peers dial), --tls-dir DIR. With
// --etcd URL --cluster NAME it finds and follows the elected coordinator (--coordinator and
// --coordinator-port are then optional: an address used only while etcd names no leader) and holds
// its name in etcd under a lease: a second process with a live member's name waits until that one
// is gone, and an instance that loses its lease exits with code 3.
//
// --device gpu [--gpu K] (a CUDA build): the instance's store is a device arena of bf16 slots on
// GPU K and its engine the GPU engine (service/cuda/gpu_backend.h); instances on the same GPU
// read each other's slots in place (docs/adr/0018); those on another GPU or host, or every peer
// with --peer-access host, through host staging. --memory-fraction F sizes its pool from its
// share of the GPU instead of --slots: F of the device's memory, less the weights and
// --reserve-mib (GpuInstanceSlots); a share too small for one slot is refused, naming the bytes.
// --load-format dummy draws random weights of the checkpoint folder's config.json instead of
// reading weights (benchmarks of large shapes without a checkpoint, as other serving engines do).
//
// Exit codes: 0 after a signal, 1 for a runtime error (bad model), 2 for bad flags.
// Built only with the service module (gRPC, protobuf, libmicrohttpd, cpp-httplib installed).
#ifdef TOKENLAKE_HAVE_SERVICE
#include <signal.h>
#include <sys/prctl.h>

#include <cstdio>
#include <cstdlib>
#include <iostream>
#include <memory>
#include <string>

#include "CLI/CLI.hpp"
#include "absl/time/time.h"
#include "command.h"
#include "flag_checks.h"
#include "tokenlake/engine/llama_config.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/service/call_auth.h"
#include "tokenlake/service/election.h"
#include "tokenlake/service/etcd_client.h"
#include "tokenlake/service/grpc_credentials.h"
#include "tokenlake/service/instance_server.h"
#include "tokenlake/service/key_claim.h"
#include "tokenlake/transport/cluster_secret.h"
#include "tokenlake/transport/socket_stream.h"
#if defined(TOKENLAKE_HAVE_GPU_INSTANCE)
#include "tokenlake/engine/cuda/gpu_llama.h"
#include "tokenlake/service/cuda/gpu_backend.h"
#endif

namespace tokenlake::cli {
namespace {

struct InstanceFlags {
  std::string model;
  std::string name;
  int id = -1;
  int coordinator_port = 0;
  int transport_port = 0;
  std::string coordinator;
  std::string listen;
  std::string advertise;
  std::string tls_dir;
  bool insecure = false;
  std::string etcd;
  std::string cluster = "tokenlake";
  int lease_ms = 3000;
  std::string namespace_name = "tokenlake";
  int segment_tokens = 16;
  int slots = 1024;
  std::string kv_dtype = "f32";
  int data_timeout_ms = 2000;
  int64_t max_batch_tokens = 2048;
  bool exit_with_parent = false;
  std::string device = "cpu";
  int gpu = 0;
  double memory_fraction = -1;  // < 0: --slots
  int reserve_mib = 4096;
  std::string load_format = "auto";
  std::string peer_access = "auto";
};

int RunInstance(const InstanceFlags& f) {
  if (f.exit_with_parent) ::prctl(PR_SET_PDEATHSIG, SIGTERM);
  if (f.load_format == "dummy" && f.device != "gpu") {
    std::cerr << "tokenlake instance: --load-format dummy (random weights) runs on the GPU only; "
                 "give --device gpu\n";
    return 2;
  }
  if (f.memory_fraction >= 0 && f.device != "gpu") {
    std::cerr << "tokenlake instance: --memory-fraction sizes a GPU instance's pool; give "
                 "--device gpu, or --slots on the CPU\n";
    return 2;
  }
  if (f.peer_access != "auto" && f.device != "gpu") {
    std::cerr << "tokenlake instance: --peer-access chooses how a GPU instance reaches its "
                 "peers; give --device gpu\n";
    return 2;
  }
  int32_t slots = f.slots;
  // Before the model loads: a missing address is a usage error, not a runtime one.
  if (f.etcd.empty() && f.coordinator.empty() && f.coordinator_port == 0) {
    std::cerr << "tokenlake instance: give the coordinator's address: --coordinator HOST:PORT "
                 "(or --coordinator-port PORT on 127.0.0.1), or --etcd URL to follow the "
                 "cluster's elected coordinator\n";
    return 2;
  }
#if !defined(TOKENLAKE_HAVE_GPU_INSTANCE)
  if (f.device == "gpu") {
    std::cerr << "tokenlake instance: --device gpu: this build has no GPU instance backend; "
                 "build the CLI with CUDA (`cmake --preset cuda && cmake --build --preset cuda "
                 "--target tokenlake`) and run build/cuda/bin/tokenlake on a machine with an "
                 "NVIDIA GPU\n";
    return 2;
  }
#endif
  // The model as the chosen device runs it, and the backend spec of the instance server.
  std::unique_ptr<engine::LlamaModel> cpu_model;
#if defined(TOKENLAKE_HAVE_GPU_INSTANCE)
  std::unique_ptr<engine::cuda::GpuLlamaModel> gpu_model;
#endif
  service::InstanceBackendSpec spec;
  if (f.device == "cpu") {
    auto model = engine::LlamaModel::Load(f.model);
    if (!model.ok()) {
      std::cerr << "tokenlake instance: " << model.status().message() << "\n";
      return 1;
    }
    cpu_model = *std::move(model);
  }
#if defined(TOKENLAKE_HAVE_GPU_INSTANCE)
  if (f.device == "gpu") {
    absl::StatusOr<std::unique_ptr<engine::cuda::GpuLlamaModel>> model;
    if (f.load_format == "dummy") {
      // Random weights of the checkpoint's shape, the same in every instance (seed 1).
      absl::StatusOr<engine::LlamaConfig> config =
          engine::LoadLlamaConfig(f.model + "/config.json");
      model = config.ok()
                  ? engine::cuda::GpuLlamaModel::CreateRandom(*config, /*seed=*/1,
                                                              /*scale=*/0.02f, {.device = f.gpu})
                  : absl::StatusOr<std::unique_ptr<engine::cuda::GpuLlamaModel>>(config.status());
    } else {
      model = engine::cuda::GpuLlamaModel::Load(f.model, {.device = f.gpu});
    }
    if (!model.ok()) {
      std::cerr << "tokenlake instance: --device gpu: " << model.status().message() << "\n";
      return 1;
    }
    gpu_model = *std::move(model);
    const attention::KvSlotLayout layout =
        service::GpuBackendLayout(gpu_model->config(), f.segment_tokens);
    if (f.memory_fraction >= 0) {
      // The pool gets what this instance's share of the GPU leaves after the weights and the
      // reserve (the same sum `serve --memory-fraction` tells the coordinator).
      absl::StatusOr<int32_t> fit =
          service::GpuShareSlots(gpu_model->config(), f.segment_tokens, f.gpu, f.memory_fraction,
                                 int64_t{f.reserve_mib} << 20);
      if (!fit.ok()) {
        std::cerr << "tokenlake instance: --memory-fraction " << f.memory_fraction << ": "
                  << fit.status().message() << "\n";
        return 1;
      }
      slots = *fit;
    }
    spec = {.layout = layout,
            .context_tokens = gpu_model->config().max_position_embeddings,
            .factory =
                service::GpuBackendFactory({.model = gpu_model.get(),
                                            .slots = slots,
                                            .segment_tokens = f.segment_tokens,
                                            .namespace_name = f.namespace_name,
                                            .data_timeout = absl::Milliseconds(f.data_timeout_ms),
                                            .max_batch_tokens = f.max_batch_tokens,
                                            .map_peers = f.peer_access == "auto"})};
  }
#endif
  sigset_t signals;
  sigemptyset(&signals);
  sigaddset(&signals, SIGTERM);
  sigaddset(&signals, SIGINT);
  pthread_sigmask(SIG_BLOCK, &signals, nullptr);
  service::InstanceServerOptions o;
  o.name = f.name.empty() ? "instance-" + std::to_string(f.id) : f.name;
  o.preferred_id = f.id;
  o.coordinator_port = f.coordinator_port;
  o.transport_port = f.transport_port;
  std::unique_ptr<service::EtcdClient> etcd;
  std::unique_ptr<service::KeyClaim> member;
  if (!f.etcd.empty()) {
    absl::StatusOr<std::unique_ptr<service::EtcdClient>> client =
        service::EtcdClient::Create({.endpoint = f.etcd});
    if (!client.ok()) {
      std::cerr << "tokenlake instance: --etcd: " << client.status().message() << "\n";
      return 2;
    }
    etcd = *std::move(client);
    // No fixed address needed (o.coordinator_port stays 0 unless --coordinator(-port) gave one):
    // the instance registers once etcd names the leader.
    o.locate_coordinator = [client = etcd.get(),
                            cluster = f.cluster]() -> absl::StatusOr<transport::HostPort> {
      absl::StatusOr<service::LeaderRecord> r = service::FindLeader(client, cluster);
      if (!r.ok()) return r.status();
      return r->grpc;
    };
    absl::StatusOr<std::unique_ptr<service::KeyClaim>> claim = service::KeyClaim::Start(
        etcd.get(),
        {.key = service::MemberKey(f.cluster, o.name),
         .value = !f.advertise.empty() ? f.advertise
                  : f.listen.empty()   ? o.listen_host
                                       : f.listen,
         .ttl = absl::Milliseconds(f.lease_ms)},
        [held_once = std::make_shared<bool>(false), name = o.name](bool held) {
          if (held) {
            *held_once = true;
          } else if (*held_once) {
            // Cut off from etcd past its lease: another process may take the name; stop.
            std::fprintf(stderr, "tokenlake instance %s: lost its lease in etcd; exiting\n",
                         name.c_str());
            std::_Exit(3);
          }
        });
    if (!claim.ok()) {
      std::cerr << "tokenlake instance: " << claim.status().message() << "\n";
      return 2;
    }
    member = *std::move(claim);
    while (!member->Held()) {
      if (absl::Status s = member->WaitHeld(absl::Seconds(5)); !s.ok()) {
        std::fprintf(stderr, "tokenlake instance %s: waiting for the name: %s\n", o.name.c_str(),
                     std::string(s.message()).c_str());
      }
    }
  }
  if (!f.coordinator.empty()) {
    absl::StatusOr<transport::HostPort> at = transport::ParseHostPort(f.coordinator);
    if (!at.ok()) {
      std::cerr << "tokenlake instance: --coordinator: " << at.status().message() << "\n";
      return 2;
    }
    o.coordinator_host = at->host;
    o.coordinator_port = at->port;
  }
  if (!f.listen.empty()) {
    absl::StatusOr<transport::HostPort> at = transport::ParseHostPort(f.listen, 0);
    if (!at.ok()) {
      std::cerr << "tokenlake instance: --listen: " << at.status().message() << "\n";
      return 2;
    }
    o.listen_host = at->host;
    o.transport_port = at->port;
  }
  o.advertise_host = f.advertise;
  absl::StatusOr<service::ClusterTls> tls = service::ClusterTls::FromDir(f.tls_dir);
  if (!tls.ok()) {
    std::cerr << "tokenlake instance: " << tls.status().message() << "\n";
    return 2;
  }
  o.tls = *std::move(tls);
  o.allow_insecure = f.insecure;
  o.namespace_name = f.namespace_name;
  o.segment_tokens = f.segment_tokens;
  o.slots = slots;
  o.kv_dtype = f.kv_dtype == "bf16" ? attention::KvDtype::kBFloat16 : attention::KvDtype::kFloat32;
  o.data_timeout = absl::Milliseconds(f.data_timeout_ms);
  o.max_batch_tokens = f.max_batch_tokens;
  absl::StatusOr<std::string> secret = service::TakeClusterSecretFromEnvironment();
  if (!secret.ok()) {
    std::cerr << "tokenlake instance: " << secret.status().message() << "\n";
    return 2;
  }
  if (secret->empty()) {
    std::fprintf(stderr,
                 "tokenlake instance: warning: %s is not set: gRPC calls and transport "
                 "connections are not authenticated\n",
                 transport::kClusterSecretEnv);
  }
  o.cluster_secret = *secret;
  auto server = cpu_model != nullptr ? service::InstanceServer::Create(cpu_model.get(), o)
                                     : service::InstanceServer::Create(std::move(spec), o);
  if (!server.ok()) {
    std::cerr << "tokenlake instance: " << server.status().message() << "\n";
    return server.status().code() == absl::StatusCode::kInvalidArgument ? 2 : 1;
  }
  const std::string device = f.device == "gpu" ? "GPU " + std::to_string(f.gpu) + ", " +
                                                     std::to_string(slots) + " bf16 slots"
                                               : "CPU, " + std::to_string(slots) + " slots";
  std::fprintf(stderr, "tokenlake instance %s (%s): transport %s, coordinator %s%s\n",
               o.name.c_str(), device.c_str(),
               transport::HostPort{.host = o.listen_host, .port = (*server)->transport_port()}
                   .ToString()
                   .c_str(),
               f.etcd.empty()
                   ? transport::HostPort{.host = o.coordinator_host, .port = o.coordinator_port}
                         .ToString()
                         .c_str()
                   : ("the leader of '" + f.cluster + "' in etcd " + f.etcd).c_str(),
               o.tls.enabled() ? " (mutual TLS)" : "");
  int sig = 0;
  sigwait(&signals, &sig);
  (*server)->Shutdown();
  return 0;
}

void SetUpInstance(CLI::App& app, int* exit_code) {
  auto f = std::make_shared<InstanceFlags>();
  CLI::App* cmd = app.add_subcommand(
      "instance",
      "One TokenLake instance: engine shard and segment store, serving the coordinator");
  cmd->add_option("--model", f->model,
                  "Checkpoint directory (config.json, and model.safetensors or "
                  "model.safetensors.index.json with its shards)")
      ->required();
  CLI::Option* coordinator_port =
      cmd->add_option("--coordinator-port", f->coordinator_port,
                      "Coordinator gRPC port on 127.0.0.1 (this, --coordinator or --etcd)")
          ->check(CLI::Range(1, 65535));
  CLI::Option* coordinator =
      cmd->add_option("--coordinator", f->coordinator,
                      "Coordinator gRPC address HOST:PORT or [IPV6]:PORT (this, "
                      "--coordinator-port or --etcd)");
  coordinator->excludes(coordinator_port);
  cmd->add_option("--listen", f->listen,
                  "Address of this instance's transports HOST[:PORT] (0.0.0.0 = every "
                  "interface; default 127.0.0.1)");
  cmd->add_option("--advertise", f->advertise,
                  "Host other processes dial to reach this instance (default: the --listen host, "
                  "or the address the coordinator sees)");
  cmd->add_option("--tls-dir", f->tls_dir,
                  "Mutual TLS for gRPC and the transports: ca.pem, cert.pem, key.pem "
                  "(`tokenlake certs`)");
  cmd->add_option("--etcd", f->etcd,
                  "etcd endpoint http://HOST:PORT: follow the cluster's elected coordinator");
  cmd->add_option("--cluster", f->cluster, "Cluster name in etcd")->capture_default_str();
  cmd->add_option("--lease-ms", f->lease_ms, "Membership lease in etcd (whole seconds, >= 1 s)")
      ->capture_default_str()
      ->check(CLI::Range(1000, 600000));
  cmd->add_flag("--insecure", f->insecure, "Allow listening beyond loopback without TLS");
  cmd->add_option("--name", f->name, "Stable instance name (default instance-<id>)");
  cmd->add_option("--id", f->id, "Preferred instance id (-1 = any)")->capture_default_str();
  cmd->add_option("--transport-port", f->transport_port, "Host-transport port (0 = any)")
      ->capture_default_str();
  cmd->add_option("--namespace", f->namespace_name, "Segment-id namespace (as the coordinator)")
      ->capture_default_str();
  cmd->add_option("--segment-tokens", f->segment_tokens,
                  "Tokens per segment, as the coordinator's (GPU instances: 256 runs the GPU "
                  "kernels and messages at their size, as serve --device gpu does)")
      ->capture_default_str();
  CLI::Option* slots =
      cmd->add_option("--slots", f->slots, "Segment slots of this instance")->capture_default_str();
  cmd->add_option("--kv-dtype", f->kv_dtype, "KV dtype: f32 or bf16")
      ->capture_default_str()
      ->check(CLI::IsMember({"f32", "bf16"}));
  cmd->add_option("--max-batch-tokens", f->max_batch_tokens,
                  "Tokens computed per iteration (decodes and prompt chunks)")
      ->capture_default_str()
      ->check(IntAtLeast(1));
  cmd->add_option("--data-timeout-ms", f->data_timeout_ms,
                  "How long to wait for another instance's data-plane reply")
      ->capture_default_str()
      ->check(IntAtLeast(1));
  cmd->add_option("--device", f->device,
                  "Where the instance computes and keeps its slots: cpu (host memory), or gpu "
                  "(bf16 slots in device memory; a CUDA build)")
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "gpu"}));
  cmd->add_option("--gpu", f->gpu, "CUDA device ordinal of --device gpu")
      ->capture_default_str()
      ->check(CLI::Range(0, 1024));
  cmd->add_option("--load-format", f->load_format,
                  "auto: the checkpoint's weights; dummy: random weights of its config.json's "
                  "shape (--device gpu; for benchmarks without a checkpoint)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "dummy"}));
  cmd->add_option("--memory-fraction", f->memory_fraction,
                  "--device gpu: the share of the GPU's memory this instance takes; its pool gets "
                  "what the weights and --reserve-mib leave (instead of --slots)")
      ->check(CLI::Range(0.0, 1.0))
      ->excludes(slots);
  cmd->add_option("--reserve-mib", f->reserve_mib,
                  "--memory-fraction: device memory kept out of the pool for activations, "
                  "workspaces and the CUDA context")
      ->capture_default_str()
      ->check(IntAtLeast(0));
  cmd->add_option("--peer-access", f->peer_access,
                  "--device gpu: how peers' slots are read. auto: in place for peers on the same "
                  "GPU (CUDA IPC), through host staging over TCP for the others; host: through "
                  "host staging for every peer (processes that may not share GPU memory)")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "host"}));
  cmd->add_flag("--exit-with-parent", f->exit_with_parent, "Exit when the parent process dies");
  cmd->callback([f, exit_code] { *exit_code = RunInstance(*f); });
}

}  // namespace
}  // namespace tokenlake::cli

TOKENLAKE_REGISTER_COMMAND(instance, tokenlake::cli::SetUpInstance);

#endif  // TOKENLAKE_HAVE_SERVICE
