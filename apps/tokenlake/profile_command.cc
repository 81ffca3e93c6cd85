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

#ifdef TOKENLAKE_HAVE_CUDA
#include "tokenlake/profile/gpu_profile.h"
#endif

namespace {

struct ProfileFlags {
  std::string json_path;
  std::vector<int64_t> dense_tokens = {1, 64, 256, 1024, 4096, 16384};
  int repeats = 10;
};

#ifdef TOKENLAKE_HAVE_CUDA
int RunProfile(const ProfileFlags& flags) {
  absl::StatusOr<std::string> json =
      tokenlake::profile::MeasureGpuProfileJson(flags.dense_tokens, flags.repeats);
  if (!json.ok()) {
    std::fprintf(stderr, "tokenlake profile: %s\n", json.status().ToString().c_str());
    return 1;
  }
  std::ofstream out(flags.json_path);
  out << *json << "\n";
  out.close();
  if (!out) {
    std::fprintf(stderr, "tokenlake profile: cannot write '%s'\n", flags.json_path.c_str());
    return 1;
  }
  std::printf("%s\n", json->c_str());
  return 0;
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
