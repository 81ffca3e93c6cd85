// `tokenlake profile --json OUT`: measures this machine's GPU for the simulator's cost model and
// writes the GPU-profile JSON that `tokenlake sim --gpu FILE` reads (schema in
// src/tokenlake/sim/cost_model.h): device copy bandwidth, cuBLAS bf16 GEMM rate, the dense layers
// of Llama-3-8B (qkv, o, gate-up, down over 32 layers) by batch tokens, and the prefill FLOP/s
// and decode bytes/s of our paged attention kernels (GQA 32/8, head_dim 128, bf16, 32K-token
// pooled prefix in 512-token segments). Needs the CUDA build (`cuda` preset); without it the
// command prints an error and exits 1.
#include <cstdio>
#include <fstream>
#include <memory>
#include <string>
#include <vector>

#include "CLI/CLI.hpp"
#include "command.h"
#include "nlohmann/json.hpp"

#ifdef TOKENLAKE_HAVE_CUDA
#include "tokenlake/attention/cuda/gpu_profile.h"
#endif

namespace {

struct ProfileFlags {
  std::string json_path;
  std::vector<int64_t> dense_tokens = {1, 64, 256, 1024, 4096, 16384};
  int repeats = 10;
};

#ifdef TOKENLAKE_HAVE_CUDA
int RunProfile(const ProfileFlags& flags) {
  namespace tl = tokenlake::attention::cuda;
  auto fail = [](const char* what, const absl::Status& s) {
    std::fprintf(stderr, "tokenlake profile: %s: %s\n", what, s.ToString().c_str());
    return 1;
  };
  auto dev = tl::DescribeDevice();
  if (!dev.ok()) return fail("device", dev.status());
  std::fprintf(stderr, "profiling %s (%d SMs, %.1f GiB)\n", dev->name.c_str(), dev->num_sms,
               dev->memory_bytes / double(1 << 30));
  auto copy = tl::MeasureCopyGbps(size_t{1} << 30, 20);
  if (!copy.ok()) return fail("copy bandwidth", copy.status());
  auto gemm = tl::MeasureGemmTflops(8192, 8192, 8192, 20);
  if (!gemm.ok()) return fail("gemm", gemm.status());
  auto dense = tl::MeasureDenseLayers(tl::DenseModelShape{}, flags.dense_tokens, flags.repeats);
  if (!dense.ok()) return fail("dense layers", dense.status());
  tl::AttentionBenchShape prefill;
  prefill.num_q_tokens = 1024;
  prefill.kernel = 1;
  auto pre = tl::MeasurePagedAttention(prefill, 20);
  if (!pre.ok()) return fail("attention prefill", pre.status());
  tl::AttentionBenchShape decode;
  decode.num_q_tokens = 1;
  decode.kernel = 2;
  auto dec = tl::MeasurePagedAttention(decode, 50);
  if (!dec.ok()) return fail("attention decode", dec.status());

  nlohmann::json j;
  j["name"] = dev->name;
  j["device"] = dev->name;
  j["memory_bytes"] = dev->memory_bytes;
  j["memory_utilization"] = 0.9;
  j["activation_reserve_bytes"] = int64_t{4} << 30;
  j["copy_gbps"] = *copy;
  j["gemm_tflops"] = *gemm;
  j["attn_prefill_tflops"] = pre->tflops;
  j["attn_decode_gbps"] = dec->kv_gbps;
  nlohmann::json dense_ms = nlohmann::json::array();
  nlohmann::json dense_tflops = nlohmann::json::array();
  for (const auto& p : *dense) {
    dense_ms.push_back({p.tokens, p.ms});
    dense_tflops.push_back({p.tokens, p.tflops});
  }
  j["dense_ms"] = dense_ms;
  j["dense_ms_by_tokens"] = dense_ms;
  j["measured"] = {{"model", "llama-3-8b dense layers (qkv, o, gate-up, down) x 32, cuBLAS bf16"},
                   {"dense_tflops_by_tokens", dense_tflops},
                   {"gemm_shape", "8192x8192x8192 bf16"},
                   {"attention_shape",
                    "GQA 32/8, head_dim 128, bf16, 32768 cached tokens in 512-token segments; "
                    "prefill 1024 new tokens (not causal over the cache), decode 1 token"},
                   {"attn_prefill_us", pre->us},
                   {"attn_decode_us", dec->us}};
  std::ofstream out(flags.json_path);
  if (!out) {
    std::fprintf(stderr, "tokenlake profile: cannot write '%s'\n", flags.json_path.c_str());
    return 1;
  }
  out << j.dump(2) << "\n";
  std::printf("%s\n", j.dump(2).c_str());
  return out.good() ? 0 : 1;
}
#else
int RunProfile(const ProfileFlags&) {
  std::fprintf(stderr,
               "tokenlake profile: this build has no CUDA support; rebuild with the `cuda` preset "
               "(cmake --preset cuda) on a machine with nvcc to measure a GPU\n");
  return 1;
}
#endif

void SetUpProfile(CLI::App& app, int* exit_code) {
  auto flags = std::make_shared<ProfileFlags>();
  CLI::App* cmd = app.add_subcommand(
      "profile", "Measure this machine's GPU and write the simulator's GPU-profile JSON");
  cmd->add_option("--json", flags->json_path, "Output file for the GPU profile JSON")->required();
  cmd->add_option("--dense-tokens", flags->dense_tokens, "Batch token counts of the dense profile");
  cmd->add_option("--repeats", flags->repeats, "Timed repeats per dense point (median)")
      ->check(CLI::Range(1, 1000));
  cmd->callback([flags, exit_code] { *exit_code = RunProfile(*flags); });
}

}  // namespace

TOKENLAKE_REGISTER_COMMAND(profile, SetUpProfile);
