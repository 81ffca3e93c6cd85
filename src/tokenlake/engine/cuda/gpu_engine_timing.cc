// Times the GPU engine on a random-init Llama of Llama-3-8B layer shapes (hidden 4096, 32/8
// heads, head_dim 128, MLP 14336, vocab 128256) with few layers, in bf16 on one GPU:
// prefill and decode iteration times (wall clock around each iteration: control plane, data
// plane and forward), for 2 and 4 layers, so that the difference gives ms per layer without the
// embedding, LM head and fixed costs. Also a prompt sharing all but its last 64 tokens with an
// earlier one (served from the pool), on 1 instance and on 2 instances sharing the GPU. Each
// figure is the median over 3 different prompts (decode: of each request's 16 decode steps'
// median); the GPU is synchronised at the end of every iteration.
//
//   gpu_engine_timing [out.json]
#include <algorithm>
#include <cstdio>
#include <fstream>
#include <iostream>
#include <random>
#include <vector>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "tokenlake/engine/cuda/gpu_engine.h"
#include "tokenlake/engine/cuda/gpu_llama.h"

namespace tokenlake::engine::cuda {
namespace {

double Median(std::vector<double> v) {
  if (v.empty()) return 0;
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

int Run(const char* json_path) {
  nlohmann::json out;
  out["model"] = "Llama-3-8B layer shapes, random weights, bf16";
  std::mt19937_64 rng(1);
  auto random_tokens = [&](int n) {
    std::vector<int32_t> t(static_cast<size_t>(n));
    for (int32_t& x : t) x = static_cast<int32_t>(rng() % 128256);
    return t;
  };
  for (int layers : {2, 4}) {
    LlamaConfig c = *NamedLlamaConfig("llama3-8b");
    c.num_layers = layers;
    auto model = GpuLlamaModel::CreateRandom(c, 7, 0.02f, {});
    if (!model.ok()) {
      std::cerr << model.status() << "\n";
      return 1;
    }
    for (int instances : {1, 2}) {
      auto engine = GpuEngine::Create(model->get(), {.num_instances = instances,
                                                     .segment_tokens = 256,
                                                     .slots_per_instance = 64,
                                                     .rotate_compute_instance = true});
      if (!engine.ok()) {
        std::cerr << engine.status() << "\n";
        return 1;
      }
      auto warm = (*engine)->Generate(random_tokens(300), 4);  // cuBLAS and kernel warm-up
      if (!warm.ok()) {
        std::cerr << warm.status() << "\n";
        return 1;
      }
      for (int n : {1024, 4096}) {
        // Three different prompts (medians); each followed by one sharing all but its last 64
        // tokens (served from the pool).
        std::vector<double> prefill, decode, cached_prefill;
        GpuGenerateResult first, second;
        for (int rep = 0; rep < 3; ++rep) {
          const std::vector<int32_t> prompt = random_tokens(n);
          auto a = (*engine)->Generate(prompt, 17);
          if (!a.ok()) {
            std::cerr << a.status() << "\n";
            return 1;
          }
          std::vector<int32_t> second_prompt(prompt.begin(), prompt.end() - 64);
          const std::vector<int32_t> tail = random_tokens(64);
          second_prompt.insert(second_prompt.end(), tail.begin(), tail.end());
          auto b = (*engine)->Generate(second_prompt, 2);
          if (!b.ok()) {
            std::cerr << b.status() << "\n";
            return 1;
          }
          prefill.push_back(a->iteration_us[0]);
          decode.push_back(
              Median(std::vector<double>(a->iteration_us.begin() + 1, a->iteration_us.end())));
          cached_prefill.push_back(b->iteration_us[0]);
          first = *std::move(a);
          second = *std::move(b);
        }
        nlohmann::json row{{"layers", layers},
                           {"instances", instances},
                           {"prompt_tokens", n},
                           {"prefill_ms", Median(prefill) / 1000},
                           {"decode_ms_median", Median(decode) / 1000},
                           {"cached_prompt_tokens", second.cached_tokens},
                           {"cached_prefill_ms", Median(cached_prefill) / 1000},
                           {"cached_remote_attend_calls", second.remote_attend_calls},
                           {"cached_local_attend_calls", second.local_attend_calls},
                           {"cached_pulled_segments", second.pulled_segments},
                           {"cached_pulled_bytes", second.pulled_bytes},
                           {"stored_segments", first.stored_segments},
                           {"remote_stored_segments", first.remote_stored_segments}};
        std::cout << row.dump() << std::endl;
        out["runs"].push_back(row);
      }
      if (instances == 1 && layers == 4) {
        // Device time by phase (CUDA events around the phases of every forward): a prefill
        // alone (1 new token), and prefill + 16 decode steps of a prompt of the same length;
        // decode = the difference / 16.
        GpuLlamaModel& gm = **model;
        for (int n : {1024, 4096}) {
          gm.SetProfiling(true);
          auto p1 = (*engine)->Generate(random_tokens(n), 1);
          const auto prefill_phases = gm.phase_ms();
          gm.SetProfiling(true);
          auto p17 = (*engine)->Generate(random_tokens(n), 17);
          const auto all_phases = gm.phase_ms();
          gm.SetProfiling(false);
          if (!p1.ok() || !p17.ok()) {
            std::cerr << "profiling run failed\n";
            return 1;
          }
          static const char* kNames[] = {"gemm", "attention", "other", "embed_head"};
          nlohmann::json ph{{"layers", layers}, {"prompt_tokens", n}};
          for (int k = 0; k < GpuLlamaModel::kNumPhases; ++k) {
            const double per = k == GpuLlamaModel::kPhaseEnds ? 1.0 : layers;
            ph[std::string("prefill_") + kNames[k] + "_ms" + (per > 1 ? "_per_layer" : "")] =
                prefill_phases[k] / per;
            ph[std::string("decode_") + kNames[k] + "_ms" + (per > 1 ? "_per_layer" : "")] =
                (all_phases[k] - prefill_phases[k]) / 16 / per;
          }
          std::cout << ph.dump() << std::endl;
          out["phases"].push_back(ph);
        }
      }
    }
  }
  // Per layer: (4-layer time - 2-layer time) / 2, single instance.
  for (const auto& a : out["runs"]) {
    if (a["layers"] != 4 || a["instances"] != 1) continue;
    for (const auto& b : out["runs"]) {
      if (b["layers"] != 2 || b["instances"] != 1 || b["prompt_tokens"] != a["prompt_tokens"]) {
        continue;
      }
      nlohmann::json pl{
          {"prompt_tokens", a["prompt_tokens"]},
          {"prefill_ms_per_layer",
           (a["prefill_ms"].get<double>() - b["prefill_ms"].get<double>()) / 2},
          {"decode_ms_per_layer",
           (a["decode_ms_median"].get<double>() - b["decode_ms_median"].get<double>()) / 2}};
      std::cout << pl.dump() << std::endl;
      out["per_layer"].push_back(pl);
    }
  }
  if (json_path != nullptr) std::ofstream(json_path) << out.dump(2) << "\n";
  return 0;
}

}  // namespace
}  // namespace tokenlake::engine::cuda

int main(int argc, char** argv) {
  return tokenlake::engine::cuda::Run(argc > 1 ? argv[1] : nullptr);
}
