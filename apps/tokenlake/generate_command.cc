// `tokenlake generate`: greedy generation with a Hugging Face Llama checkpoint on the CPU, its KV
// cache in the TokenLake pool across N in-process instances (or, with --no-pool, in a private
// per-request cache). Prompts (JSON lines of {"input_ids": [...]}) are served in order, so later
// prompts hit the prefixes of earlier ones. Writes per prompt the greedy tokens, the prompt
// tokens served from the pool and the logits at the last prompt position.
//
// Exit codes: 0 on success, 1 for a runtime error (unreadable or bad model / prompts file,
// named with file, line and field), 2 for bad flags.
#include <cstdio>
#include <fstream>
#include <iostream>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "absl/strings/str_format.h"
#include "command.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/clock.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/instance_pool.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/engine/prompts.h"

namespace tokenlake::cli {
namespace {

struct GenerateFlags {
  std::string model;
  std::string prompts;
  std::string json_out;
  int instances = 1;
  bool no_pool = false;
  int max_new_tokens = 8;
  int segment_tokens = 16;
  int slots_per_instance = 1024;
  std::string kv_dtype = "f32";
  bool rotate = false;
  int rebalance_every = 0;
};

int Fail(const std::string& message) {
  std::cerr << "tokenlake generate: " << message << "\n";
  return 1;
}

int RunGenerate(const GenerateFlags& f) {
  if (f.instances < 1 || f.max_new_tokens < 1 || f.segment_tokens < 1 || f.slots_per_instance < 1) {
    std::cerr << "tokenlake generate: --instances, --max-new-tokens, --segment-tokens and "
                 "--slots-per-instance must be >= 1, --rebalance-every >= 0\n";
    return 2;
  }
  if (f.kv_dtype != "f32" && f.kv_dtype != "bf16") {
    std::cerr << "tokenlake generate: --kv-dtype must be f32 or bf16, got '" << f.kv_dtype << "'\n";
    return 2;
  }
  auto model = engine::LlamaModel::Load(f.model);
  if (!model.ok()) return Fail(std::string(model.status().message()));
  auto prompts = engine::LoadPromptsJsonl(f.prompts);
  if (!prompts.ok()) return Fail(std::string(prompts.status().message()));
  const int32_t vocab = (*model)->config().vocab_size;
  for (const engine::Prompt& p : *prompts) {
    for (size_t i = 0; i < p.input_ids.size(); ++i) {
      if (p.input_ids[i] >= vocab) {
        return Fail(absl::StrFormat("%s:%d: input_ids[%d] = %d is outside the vocabulary [0, %d)",
                                    f.prompts, p.line, i, p.input_ids[i], vocab));
      }
    }
  }
  engine::EngineOptions options{.use_pool = !f.no_pool,
                                .num_instances = f.instances,
                                .segment_tokens = f.segment_tokens,
                                .slots_per_instance = f.slots_per_instance,
                                .kv_dtype = f.kv_dtype == "bf16" ? attention::KvDtype::kBFloat16
                                                                 : attention::KvDtype::kFloat32,
                                .namespace_name = f.model,
                                .rotate_compute_instance = f.rotate,
                                .rebalance_every_requests = f.rebalance_every};
  auto eng = engine::Engine::Create(model->get(), options);
  if (!eng.ok()) return Fail(std::string(eng.status().message()));

  nlohmann::json results = nlohmann::json::array();
  int64_t prompt_tokens = 0, cached_tokens = 0;
  const int64_t start_us = SystemClock::Default()->NowUs();
  for (size_t i = 0; i < prompts->size(); ++i) {
    const engine::Prompt& p = (*prompts)[i];
    auto r = (*eng)->Generate(p.input_ids, f.max_new_tokens);
    if (!r.ok()) {
      return Fail(absl::StrFormat("%s:%d: %s", f.prompts, p.line, r.status().ToString()));
    }
    prompt_tokens += static_cast<int64_t>(p.input_ids.size());
    cached_tokens += r->cached_tokens;
    results.push_back({{"line", p.line},
                       {"prompt_tokens", p.input_ids.size()},
                       {"greedy", r->tokens},
                       {"cached_tokens", r->cached_tokens},
                       {"last_logits", r->last_logits},
                       {"remote_attend_calls", r->remote_attend_calls},
                       {"pulled_segments", r->pulled_segments},
                       {"stored_segments", r->stored_segments},
                       {"remote_stored_segments", r->remote_stored_segments}});
  }
  const double seconds = static_cast<double>(SystemClock::Default()->NowUs() - start_us) / 1e6;
  nlohmann::json out = {{"model", f.model},
                        {"prompts_file", f.prompts},
                        {"pool", !f.no_pool},
                        {"instances", f.instances},
                        {"segment_tokens", f.segment_tokens},
                        {"kv_dtype", f.kv_dtype},
                        {"max_new_tokens", f.max_new_tokens},
                        {"prompt_tokens", prompt_tokens},
                        {"cached_tokens", cached_tokens},
                        {"hit_rate", prompt_tokens > 0 ? static_cast<double>(cached_tokens) /
                                                             static_cast<double>(prompt_tokens)
                                                       : 0.0},
                        {"seconds", seconds},
                        {"results", results}};
  if (const lake::Lake* lk = (*eng)->lake(); lk != nullptr) {
    const lake::LakeStats s = lk->Stats();
    out["lake"] = {{"segments", s.segments},
                   {"replicas", s.replicas},
                   {"stored_tokens", s.stored_tokens},
                   {"plan_query_bytes", s.plan_query_bytes},
                   {"plan_kv_pull_bytes", s.plan_kv_pull_bytes},
                   {"plan_new_segment_bytes", s.plan_new_segment_bytes},
                   {"evicted_replicas", s.evicted_replicas},
                   {"deduplicated_segments", s.deduplicated_segments},
                   {"redundancy", s.redundancy},
                   {"rebalance_actions", (*eng)->rebalance_actions()}};
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
  std::ofstream os(f.json_out);
  if (!os) return Fail(f.json_out + ": cannot open for writing");
  os << out.dump(1) << "\n";
  if (!os) return Fail(f.json_out + ": write error");
  std::fprintf(
      stderr,
      "tokenlake generate: %zu prompts, %lld prompt tokens, %lld served from the pool "
      "(%.1f%%), %.2f s -> %s\n",
      prompts->size(), static_cast<long long>(prompt_tokens), static_cast<long long>(cached_tokens),
      prompt_tokens > 0 ? 100.0 * cached_tokens / prompt_tokens : 0.0, seconds, f.json_out.c_str());
  return 0;
}

void SetUpGenerate(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<GenerateFlags>();
  CLI::App* cmd = app.add_subcommand(
      "generate",
      "Greedy generation with a Llama checkpoint on the CPU, KV cache in the TokenLake pool");
  cmd->add_option("--model", flags->model, "Checkpoint directory (config.json, model.safetensors)")
      ->required();
  cmd->add_option("--prompts", flags->prompts, "JSON lines of {\"input_ids\": [...]}")->required();
  cmd->add_option("--json", flags->json_out, "Output JSON file")->required();
  cmd->add_option("--instances", flags->instances, "Pool instances (threads)")
      ->capture_default_str();
  cmd->add_flag("--no-pool", flags->no_pool, "Private per-request KV cache (no TokenLake)");
  cmd->add_option("--max-new-tokens", flags->max_new_tokens, "Tokens to generate per prompt")
      ->capture_default_str();
  cmd->add_option("--segment-tokens", flags->segment_tokens, "Tokens per segment (S)")
      ->capture_default_str();
  cmd->add_option("--slots-per-instance", flags->slots_per_instance, "Segment slots per instance")
      ->capture_default_str();
  cmd->add_option("--kv-dtype", flags->kv_dtype, "KV dtype in the pool: f32 or bf16")
      ->capture_default_str();
  cmd->add_flag("--rotate-compute", flags->rotate,
                "Prefer computing request k on instance k mod N (spreads the work)");
  cmd->add_option("--rebalance-every", flags->rebalance_every,
                  "Rebalance the pool after every N requests (0 = never)")
      ->capture_default_str();
  cmd->callback([flags, exit_code] { *exit_code = RunGenerate(*flags); });
}

}  // namespace
}  // namespace tokenlake::cli

TOKENLAKE_REGISTER_COMMAND(generate, tokenlake::cli::SetUpGenerate);
