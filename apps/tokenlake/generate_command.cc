// `tokenlake generate`: greedy generation with a Hugging Face Llama checkpoint, its KV cache in
// the TokenLake pool across N instances.
//   --device cpu (default): engine::Engine on the CPU, N in-process instances over the loopback
//     transport (or, with --no-pool, a private per-request cache); KV in f32 or bf16.
//   --device gpu (CUDA builds only): engine::cuda::GpuEngine, the Llama forward on cuBLAS and N
//     instances sharing one GPU (CUDA device 0), KV in bf16 device slots; always pooled, no
//     rebalancing.
// Prompts (JSON lines of {"input_ids": [...]}) are submitted all at once (--arrival all, the
// default: the engine serves them with continuous batching, "max_batch_requests" in the JSON
// is the most requests that ran in one iteration) or one after another (--arrival sequential:
// later prompts hit the prefixes that earlier ones left in the pool, which multi-turn prompt
// files need). Both devices run the same iteration loop (the GPU engine's forward still runs
// the batch's requests one after another). Writes per prompt the greedy tokens, the prompt
// tokens served from the pool and the logits at the last prompt position; the JSON schema is the
// same on both devices (plus "device", and "gpu_name" and the load's phases "load" on the GPU;
// the CPU's "transport" section has no GPU counterpart and is left out there). "load_seconds" is
// the model's load (config, checkpoint, weights on the device), "seconds" the serving after it.
// The model directory holds config.json and model.safetensors or model.safetensors.index.json
// with its shards.
//
// Exit codes: 0 on success, 1 for a runtime error (unreadable or bad model / prompts file,
// named with file, line and field; no CUDA device), 2 for bad flags (including a flag the chosen
// device does not support, and --device gpu in a build without CUDA).
#include <cstdio>
#include <fstream>
#include <iostream>
#include <memory>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "absl/strings/str_format.h"
#include "command.h"
#include "flag_checks.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/clock.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/instance_pool.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/engine/pool_shape.h"
#include "tokenlake/engine/prompts.h"
#include "tokenlake/lake/lake.h"

#if defined(TOKENLAKE_HAVE_CUDA)
#include <cuda_runtime_api.h>

#include "tokenlake/engine/cuda/gpu_engine.h"
#include "tokenlake/engine/cuda/gpu_llama.h"
#endif

namespace tokenlake::cli {
namespace {

// What `--device` accepts in this build (shown in --help; cli_test.sh reads it).
#if defined(TOKENLAKE_HAVE_CUDA)
constexpr char kBuildDevices[] = "this build: cpu and gpu";
#else
constexpr char kBuildDevices[] = "this build: cpu only, no CUDA";
#endif

struct GenerateFlags {
  std::string model;
  std::string prompts;
  std::string json_out;
  std::string device = "cpu";
  int instances = 1;
  bool no_pool = false;
  int max_new_tokens = 8;
  int segment_tokens = 0;  // not given: engine::DefaultSegmentTokens for --device
  int slots_per_instance = 1024;
  std::string kv_dtype = "auto";
  bool rotate = false;
  int rebalance_every = 0;
  std::string arrival = "all";
  int64_t max_batch_tokens = 2048;
  // Sampling (engine/sampler.h); seed < 0 = a random seed per request.
  float temperature = 0.0f;
  float top_p = 1.0f;
  int top_k = 0;
  int64_t seed = -1;
  std::vector<int32_t> stop_tokens;
};

// The request of one prompt, with the flags' sampling and stop tokens.
engine::GenerateRequest RequestFor(const GenerateFlags& f, const engine::Prompt& p) {
  engine::GenerateRequest r{.prompt = p.input_ids, .max_new_tokens = f.max_new_tokens};
  r.sampling = {.temperature = f.temperature, .top_k = f.top_k, .top_p = f.top_p};
  if (f.seed >= 0) r.sampling.seed = static_cast<uint64_t>(f.seed);
  r.stop_token_ids = f.stop_tokens;
  return r;
}

int Fail(const std::string& message) {
  std::cerr << "tokenlake generate: " << message << "\n";
  return 1;
}

int UsageError(const std::string& message) {
  std::cerr << "tokenlake generate: " << message << "\n";
  return 2;
}

// Checks every prompt token against the vocabulary; the error names file, line and index.
absl::Status CheckVocabulary(const std::string& prompts_file,
                             const std::vector<engine::Prompt>& prompts, int32_t vocab) {
  for (const engine::Prompt& p : prompts) {
    for (size_t i = 0; i < p.input_ids.size(); ++i) {
      if (p.input_ids[i] < 0 || p.input_ids[i] >= vocab) {
        return absl::InvalidArgumentError(
            absl::StrFormat("%s:%d: input_ids[%d] = %d is outside the vocabulary [0, %d)",
                            prompts_file, p.line, i, p.input_ids[i], vocab));
      }
    }
  }
  return absl::OkStatus();
}

// One prompt's entry of "results"; R is engine::GenerateResult or cuda::GpuGenerateResult
// (the fields written exist in both with the same meaning).
template <typename R>
nlohmann::json PromptJson(const engine::Prompt& p, const R& r) {
  return {{"line", p.line},
          {"prompt_tokens", p.input_ids.size()},
          {"tokens", r.tokens},
          {"greedy", r.tokens},
          {"finish_reason", r.finish_reason},
          {"cached_tokens", r.cached_tokens},
          {"last_logits", r.last_logits},
          {"remote_attend_calls", r.remote_attend_calls},
          {"pulled_segments", r.pulled_segments},
          {"stored_segments", r.stored_segments},
          {"remote_stored_segments", r.remote_stored_segments}};
}

nlohmann::json LakeJson(const lake::Lake& lk, int64_t rebalance_actions) {
  const lake::LakeStats s = lk.Stats();
  return {{"segments", s.segments},
          {"replicas", s.replicas},
          {"stored_tokens", s.stored_tokens},
          {"plan_query_bytes", s.plan_query_bytes},
          {"plan_kv_pull_bytes", s.plan_kv_pull_bytes},
          {"plan_new_segment_bytes", s.plan_new_segment_bytes},
          {"evicted_replicas", s.evicted_replicas},
          {"deduplicated_segments", s.deduplicated_segments},
          {"redundancy", s.redundancy},
          {"rebalance_actions", rebalance_actions}};
}

// Serves `prompts` with `serve` (prompts -> one StatusOr<result> per prompt, in order) and
// returns the top-level JSON without the device-specific sections ("lake", "transport",
// "gpu_name"), or the first failing prompt's error prefixed with the prompts file and its line.
struct Served {
  nlohmann::json out;
  int64_t prompt_tokens = 0;
  int64_t cached_tokens = 0;
  double seconds = 0;
};
template <typename ServeFn>
absl::StatusOr<Served> ServePrompts(const GenerateFlags& f, const std::string& kv_dtype, bool pool,
                                    const std::vector<engine::Prompt>& prompts, ServeFn serve) {
  Served s;
  nlohmann::json results = nlohmann::json::array();
  const int64_t start_us = SystemClock::Default()->NowUs();
  auto all = serve(prompts);  // shorter than prompts only after a failed one
  for (size_t i = 0; i < all.size(); ++i) {
    const engine::Prompt& p = prompts[i];
    const auto& r = all[i];
    if (!r.ok()) {
      return absl::Status(r.status().code(),
                          absl::StrFormat("%s:%d: %s", f.prompts, p.line, r.status().ToString()));
    }
    s.prompt_tokens += static_cast<int64_t>(p.input_ids.size());
    s.cached_tokens += r->cached_tokens;
    results.push_back(PromptJson(p, *r));
  }
  s.seconds = static_cast<double>(SystemClock::Default()->NowUs() - start_us) / 1e6;
  s.out = {{"model", f.model},
           {"prompts_file", f.prompts},
           {"device", f.device},
           {"pool", pool},
           {"instances", f.instances},
           {"segment_tokens", f.segment_tokens},
           {"kv_dtype", kv_dtype},
           {"max_new_tokens", f.max_new_tokens},
           {"arrival", f.arrival},
           {"prompt_tokens", s.prompt_tokens},
           {"cached_tokens", s.cached_tokens},
           {"hit_rate", s.prompt_tokens > 0 ? static_cast<double>(s.cached_tokens) /
                                                  static_cast<double>(s.prompt_tokens)
                                            : 0.0},
           {"seconds", s.seconds},
           {"results", std::move(results)}};
  return s;
}

int WriteOutput(const GenerateFlags& f, const Served& s, size_t num_prompts) {
  std::ofstream os(f.json_out);
  if (!os) return Fail(f.json_out + ": cannot open for writing");
  os << s.out.dump(1) << "\n";
  if (!os) return Fail(f.json_out + ": write error");
  std::fprintf(stderr,
               "tokenlake generate (%s): %zu prompts, %lld prompt tokens, %lld served from the "
               "pool (%.1f%%), %.2f s -> %s\n",
               f.device.c_str(), num_prompts, static_cast<long long>(s.prompt_tokens),
               static_cast<long long>(s.cached_tokens),
               s.prompt_tokens > 0 ? 100.0 * s.cached_tokens / s.prompt_tokens : 0.0, s.seconds,
               f.json_out.c_str());
  return 0;
}

int RunCpu(const GenerateFlags& f) {
  const std::string kv_dtype = f.kv_dtype == "auto" ? "f32" : f.kv_dtype;
  const int64_t load_start_us = SystemClock::Default()->NowUs();
  auto model = engine::LlamaModel::Load(f.model);
  const double load_seconds =
      static_cast<double>(SystemClock::Default()->NowUs() - load_start_us) / 1e6;
  if (!model.ok()) return Fail(std::string(model.status().message()));
  auto prompts = engine::LoadPromptsJsonl(f.prompts);
  if (!prompts.ok()) return Fail(std::string(prompts.status().message()));
  if (absl::Status st = CheckVocabulary(f.prompts, *prompts, (*model)->config().vocab_size);
      !st.ok()) {
    return Fail(std::string(st.message()));
  }
  engine::EngineOptions options{
      .use_pool = !f.no_pool,
      .num_instances = f.instances,
      .segment_tokens = f.segment_tokens,
      .slots_per_instance = f.slots_per_instance,
      .kv_dtype = kv_dtype == "bf16" ? attention::KvDtype::kBFloat16 : attention::KvDtype::kFloat32,
      .namespace_name = f.model,
      .rotate_compute_instance = f.rotate,
      .rebalance_every_requests = f.rebalance_every,
      .max_batch_tokens = f.max_batch_tokens};
  auto eng = engine::Engine::Create(model->get(), options);
  if (!eng.ok()) return Fail(std::string(eng.status().message()));

  auto served =
      ServePrompts(f, kv_dtype, !f.no_pool, *prompts, [&](const std::vector<engine::Prompt>& ps) {
        std::vector<absl::StatusOr<engine::GenerateResult>> out;
        if (f.arrival == "sequential") {
          for (const engine::Prompt& p : ps) {
            const engine::GenerateRequest one = RequestFor(f, p);
            out.push_back(std::move((*eng)->GenerateBatch(absl::MakeConstSpan(&one, 1))[0]));
            if (!out.back().ok()) break;
          }
          return out;
        }
        std::vector<engine::GenerateRequest> requests;
        for (const engine::Prompt& p : ps) {
          requests.push_back(RequestFor(f, p));
        }
        return (*eng)->GenerateBatch(requests);
      });
  if (!served.ok()) return Fail(std::string(served.status().message()));
  nlohmann::json& out = served->out;
  out["load_seconds"] = load_seconds;
  // Without the pool the reference path serves one request at a time.
  out["max_batch_requests"] = f.no_pool ? 1 : (*eng)->max_batch_requests_seen();
  if (const lake::Lake* lk = (*eng)->lake(); lk != nullptr) {
    out["lake"] = LakeJson(*lk, (*eng)->rebalance_actions());
  }
  if (const engine::InstancePool* ip = (*eng)->instance_pool(); ip != nullptr) {
    // What really crossed the loopback transport, per instance: sent by its server (replies)
    // and by its driver (queries, pulls, stores), in messages and payload bytes.
    nlohmann::json per_instance = nlohmann::json::array();
    int64_t total_bytes = 0;
    for (int32_t i = 0; i < ip->num_instances(); ++i) {
      const InstanceId server(i);
      const InstanceId driver = ip->DriverEndpoint(server);
      const int64_t bytes = ip->transport().bytes_sent(server) + ip->transport().bytes_sent(driver);
      total_bytes += bytes;
      per_instance.push_back({{"instance", i},
                              {"messages_sent", ip->transport().messages_sent(server) +
                                                    ip->transport().messages_sent(driver)},
                              {"bytes_sent", bytes},
                              {"stored_segments", ip->store(server).used()}});
    }
    out["transport"] = {{"bytes_sent", total_bytes}, {"instances", per_instance}};
  }
  return WriteOutput(f, *served, prompts->size());
}

#if defined(TOKENLAKE_HAVE_CUDA)
int RunGpu(const GenerateFlags& f) {
  // Before touching the model: a CUDA build on a machine without a (visible) GPU.
  int count = 0;
  const cudaError_t err = cudaGetDeviceCount(&count);
  if (err != cudaSuccess || count == 0) {
    cudaGetLastError();
    return Fail(absl::StrFormat(
        "--device gpu: no CUDA device is visible on this machine (cudaGetDeviceCount: %s); run "
        "on a machine with an NVIDIA GPU and its driver, or use --device cpu",
        err != cudaSuccess ? cudaGetErrorString(err) : "0 devices"));
  }
  cudaDeviceProp prop{};
  std::string gpu_name = "unknown";
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) gpu_name = prop.name;

  auto prompts = engine::LoadPromptsJsonl(f.prompts);
  if (!prompts.ok()) return Fail(std::string(prompts.status().message()));
  auto model = engine::cuda::GpuLlamaModel::Load(f.model, {});
  if (!model.ok()) return Fail("--device gpu: " + model.status().ToString());
  if (absl::Status st = CheckVocabulary(f.prompts, *prompts, (*model)->config().vocab_size);
      !st.ok()) {
    return Fail(std::string(st.message()));
  }
  auto eng =
      engine::cuda::GpuEngine::Create(model->get(), {.num_instances = f.instances,
                                                     .segment_tokens = f.segment_tokens,
                                                     .slots_per_instance = f.slots_per_instance,
                                                     .namespace_name = f.model,
                                                     .rotate_compute_instance = f.rotate,
                                                     .max_batch_tokens = f.max_batch_tokens});
  if (!eng.ok()) return Fail("--device gpu: " + eng.status().ToString());

  auto served =
      ServePrompts(f, "bf16", /*pool=*/true, *prompts, [&](const std::vector<engine::Prompt>& ps) {
        std::vector<absl::StatusOr<engine::cuda::GpuGenerateResult>> out;
        if (f.arrival == "sequential") {
          for (const engine::Prompt& p : ps) {
            const engine::GenerateRequest one = RequestFor(f, p);
            out.push_back(std::move((*eng)->GenerateBatch(absl::MakeConstSpan(&one, 1))[0]));
            if (!out.back().ok()) break;
          }
          return out;
        }
        std::vector<engine::GenerateRequest> requests;
        for (const engine::Prompt& p : ps) {
          requests.push_back(RequestFor(f, p));
        }
        return (*eng)->GenerateBatch(requests);
      });
  if (!served.ok()) return Fail(std::string(served.status().message()));
  served->out["gpu_name"] = gpu_name;
  const engine::cuda::GpuLlamaModel::LoadStats& load = (*model)->load_stats();
  served->out["load_seconds"] = load.total_seconds;
  served->out["load"] = {
      {"open_seconds", load.open_seconds},         {"init_seconds", load.init_seconds},
      {"allocate_seconds", load.allocate_seconds}, {"upload_seconds", load.upload_seconds},
      {"checkpoint_bytes", load.checkpoint_bytes}, {"shards", load.shards},
      {"pinned_staging", load.upload.pinned}};
  served->out["max_batch_requests"] = (*eng)->max_batch_requests_seen();
  // The GPU engine never rebalances (--rebalance-every is refused): 0 actions.
  served->out["lake"] = LakeJson((*eng)->lake(), 0);
  // No "transport" section: the instances share one device, nothing crosses a transport.
  return WriteOutput(f, *served, prompts->size());
}
#endif  // TOKENLAKE_HAVE_CUDA

int RunGenerate(GenerateFlags f) {
  // The values themselves were checked by CLI11 (SetUpGenerate); here only what involves the
  // build or several flags.
  if (f.segment_tokens == 0) {
    f.segment_tokens = engine::DefaultSegmentTokens(f.device == "gpu");
  }
  if (f.no_pool && (f.temperature != 0.0f || !f.stop_tokens.empty())) {
    return UsageError("--temperature and --stop-token need the pool (not --no-pool)");
  }
  if (f.device == "cpu") return RunCpu(f);
#if !defined(TOKENLAKE_HAVE_CUDA)
  return UsageError(
      "--device gpu: this build has no CUDA data plane; build the CLI with it: `cmake --preset "
      "cuda && cmake --build --preset cuda --target tokenlake` (the build `make cuda` "
      "configures; needs /usr/local/cuda), then run build/cuda/bin/tokenlake on a machine with an "
      "NVIDIA GPU");
#else
  // Flags the GPU engine has no counterpart for.
  if (f.no_pool) {
    return UsageError("--no-pool is not supported with --device gpu (the GPU engine always pools)");
  }
  if (f.rebalance_every > 0) {
    return UsageError(
        "--rebalance-every is not supported with --device gpu (the GPU engine does not "
        "rebalance the pool)");
  }
  if (f.kv_dtype == "f32") {
    return UsageError(
        "--kv-dtype f32 is not supported with --device gpu (the GPU pool holds bf16 KV; use "
        "auto or bf16)");
  }
  return RunGpu(f);
#endif
}

void SetUpGenerate(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<GenerateFlags>();
  CLI::App* cmd = app.add_subcommand(
      "generate",
      "Greedy generation with a Llama checkpoint, KV cache in the TokenLake pool: on the CPU, "
      "or on one GPU with --device gpu (CUDA builds)");
  cmd->add_option("--model", flags->model,
                  "Checkpoint directory (config.json, and model.safetensors or "
                  "model.safetensors.index.json with its shards)")
      ->required();
  cmd->add_option("--prompts", flags->prompts, "JSON lines of {\"input_ids\": [...]}")->required();
  cmd->add_option("--json", flags->json_out, "Output JSON file")->required();
  cmd->add_option("--device", flags->device,
                  std::string("cpu (engine::Engine) or gpu (GpuEngine: N instances sharing CUDA "
                              "device 0; CUDA builds only; always pooled, bf16 KV, no "
                              "rebalancing); ") +
                      kBuildDevices)
      ->capture_default_str()
      ->check(CLI::IsMember({"cpu", "gpu"}));
  cmd->add_option("--instances", flags->instances,
                  "Pool instances (threads on the CPU; sharing the device on the GPU)")
      ->capture_default_str()
      ->check(IntAtLeast(1));
  cmd->add_flag("--no-pool", flags->no_pool,
                "Private per-request KV cache (no TokenLake; CPU only)");
  cmd->add_option("--max-new-tokens", flags->max_new_tokens, "Tokens to generate per prompt")
      ->capture_default_str()
      ->check(IntAtLeast(1));
  cmd->add_option("--segment-tokens", flags->segment_tokens,
                  "Tokens per segment (S; default 16, 256 with --device gpu)")
      ->check(IntAtLeast(1));
  cmd->add_option("--slots-per-instance", flags->slots_per_instance, "Segment slots per instance")
      ->capture_default_str()
      ->check(IntAtLeast(1));
  cmd->add_option("--kv-dtype", flags->kv_dtype,
                  "KV dtype in the pool: auto (f32 on the CPU, bf16 on the GPU), f32 (CPU only) "
                  "or bf16")
      ->capture_default_str()
      ->check(CLI::IsMember({"auto", "f32", "bf16"}));
  cmd->add_flag("--rotate-compute", flags->rotate,
                "Prefer computing request k on instance k mod N (spreads the work)");
  cmd->add_option("--rebalance-every", flags->rebalance_every,
                  "Rebalance the pool after every N requests (0 = never; CPU only)")
      ->capture_default_str()
      ->check(IntAtLeast(0));
  cmd->add_option("--arrival", flags->arrival,
                  "all: every prompt submitted at once (continuous batching); sequential: one "
                  "after another, so that later prompts hit what earlier ones left in the pool")
      ->capture_default_str()
      ->check(CLI::IsMember({"all", "sequential"}));
  cmd->add_option("--max-batch-tokens", flags->max_batch_tokens,
                  "Tokens computed per iteration over the whole batch (prompts are prefilled in "
                  "chunks under it; pool only)")
      ->capture_default_str()
      ->check(IntAtLeast(1));
  cmd->add_option("--temperature", flags->temperature,
                  "Sampling temperature (0 = greedy; pool only)")
      ->check(NumberIn(0, 1e6))
      ->capture_default_str();
  cmd->add_option("--top-p", flags->top_p,
                  "Nucleus sampling: keep the most likely tokens up to "
                  "this probability, in (0, 1]")
      ->check(NumberIn(0, 1, /*open_lo=*/true))
      ->capture_default_str();
  cmd->add_option("--top-k", flags->top_k, "Keep the k most likely tokens (0 = all)")
      ->check(IntIn(0, 1 << 30))
      ->capture_default_str();
  cmd->add_option("--seed", flags->seed,
                  "Sampling seed (the same seed gives the same tokens; default a random one)")
      ->check(IntAtLeast(0));
  cmd->add_option("--stop-token", flags->stop_tokens,
                  "Token ids that end a request (e.g. the model's end of sequence); repeatable");
  cmd->callback([flags, exit_code] { *exit_code = RunGenerate(*flags); });
}

}  // namespace
}  // namespace tokenlake::cli

TOKENLAKE_REGISTER_COMMAND(generate, tokenlake::cli::SetUpGenerate);
