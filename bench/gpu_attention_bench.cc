// GPU benchmark of the paged attention kernels (attention/cuda/) on the shapes of the TokenLake
// evaluation: GQA 32 query / 8 KV heads, head_dim 128, bf16, a 32K-token pooled prefix in
// scattered segment slots. Prints a table and writes JSON (argv[1], default
// gpu_attention_bench.json). bench/gpu_attention.sh runs it beside PyTorch SDPA (sdpa_bench.py)
// in the same run on the same GPU, and bench/gpu_report.py compares the two.
//
// Timings: CUDA events around each call, median of 50 after 5 warm-ups; two KV sets alternate.
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "tokenlake/profile/gpu_profile.h"

namespace tl = tokenlake::profile;

int main(int argc, char** argv) {
  const std::string out_path = argc > 1 ? argv[1] : "gpu_attention_bench.json";
  if (out_path == "--profile-json" && argc > 2) {
    // The same measurement as `tokenlake profile --json FILE`, for an install that has the GPU
    // benchmarks but not the CLI.
    auto json = tl::MeasureGpuProfileJson({1, 64, 256, 1024, 4096, 16384}, 10);
    if (!json.ok()) {
      std::fprintf(stderr, "profile: %s\n", json.status().ToString().c_str());
      return 1;
    }
    std::ofstream(argv[2]) << *json << "\n";
    std::printf("%s\n", json->c_str());
    return 0;
  }
  nlohmann::json j;
  auto dev = tl::DescribeDevice();
  if (!dev.ok()) {
    std::fprintf(stderr, "gpu_attention_bench: %s\n", dev.status().ToString().c_str());
    return 1;
  }
  j["device"] = dev->name;
  j["num_sms"] = dev->num_sms;
  auto copy = tl::MeasureCopyGbps(size_t{1} << 30, 20);
  if (!copy.ok()) {
    std::fprintf(stderr, "copy: %s\n", copy.status().ToString().c_str());
    return 1;
  }
  j["copy_gbps"] = *copy;
  std::printf("device %s (%d SMs); D2D copy %.0f GB/s (read+write)\n", dev->name.c_str(),
              dev->num_sms, *copy);
  // 128 MiB = the decode's KV bytes (2 x 32768 x 8 x 128 x 2 B).
  for (size_t mb : {size_t{128}, size_t{1024}}) {
    for (int batch : {1, 10}) {
      auto read = tl::MeasureReadGbps(mb << 20, 20, batch);
      if (!read.ok()) {
        std::fprintf(stderr, "read: %s\n", read.status().ToString().c_str());
        return 1;
      }
      j[absl::StrFormat("read_%dmib_x%d_gbps", mb, batch)] = *read;
      std::printf("read-only stream over %zu MiB, %d launch(es) per sample: %.0f GB/s\n", mb, batch,
                  *read);
    }
  }

  struct Run {
    std::string name;
    tl::AttentionBenchShape shape;
  };
  std::vector<Run> runs;
  // Decode: the split merge fused into the kernel (default) against the separate merge kernel
  // (which the default takes beyond 64 splits), on the tensor-core kernel and on the CUDA-core
  // kernels (the default for the shapes the tensor-core kernel does not take).
  for (int seg : {512, 256, 64}) {
    for (int merge : {0, 1}) {
      tl::AttentionBenchShape s;
      s.num_q_tokens = 1;
      s.segment_tokens = seg;
      s.kernel = 2;
      s.decode_merge = merge;
      runs.push_back({merge == 0 ? "decode" : "decode_sep_merge", s});  // the default kernel
      s.decode_kernel = 1;  // the CUDA-core kernels (the default before the tensor-core one)
      runs.push_back({merge == 0 ? "decode_cc" : "decode_cc_sep_merge", s});
    }
  }
  // Programmatic dependent launch (pdl 1: wait first; 2: the first stages' K/V copies before
  // the wait): the same kernel as `decode`; the back-to-back column is where it can show (each
  // call's blocks start while the previous call drains).
  for (int seg : {512, 256, 64}) {
    for (int pdl : {1, 2}) {
      tl::AttentionBenchShape s;
      s.num_q_tokens = 1;
      s.segment_tokens = seg;
      s.kernel = 2;
      s.pdl = pdl;
      runs.push_back({"decode_pdl" + std::to_string(pdl), s});
    }
  }
  // The tensor-core decode kernel (decode_kernel = 2, the default): 3, 2 and 4 pipeline stages
  // per warp (the default is 4 for 512- and 256-token segments, 2 for 64), and 2 stages with 48
  // splits (~3 blocks per SM), beside the rows above.
  for (int seg : {512, 256, 64}) {
    for (int stages : {0, 2, 4}) {
      tl::AttentionBenchShape s;
      s.num_q_tokens = 1;
      s.segment_tokens = seg;
      s.kernel = 2;
      s.decode_kernel = 2;
      s.decode_mma_stages = stages;
      runs.push_back({"decode_tc_s" + std::to_string(stages == 0 ? 3 : stages), s});
      // The same without the shared-memory descriptor cache (descriptors read from global
      // memory at every segment).
      s.decode_mma_descriptors = 2;
      runs.push_back({"decode_tc_glob_s" + std::to_string(stages == 0 ? 3 : stages), s});
    }
  }
  for (int seg : {512, 256}) {
    tl::AttentionBenchShape s;
    s.num_q_tokens = 1;
    s.segment_tokens = seg;
    s.kernel = 2;
    s.decode_kernel = 2;
    s.decode_mma_stages = 2;
    s.num_splits = 48;
    runs.push_back({"decode_tc_s2", s});
  }
  // Batched decode: R requests of 32K / R tokens each in one call, against one request of
  // 32K / R tokens alone (times R for R separate calls).
  for (int req : {8, 32}) {
    tl::AttentionBenchShape s;
    s.num_q_tokens = 1;
    s.segment_tokens = 256;
    s.kernel = 2;
    s.num_requests = req;
    runs.push_back({"decode_batch" + std::to_string(req), s});
    s.decode_kernel = 1;  // the CUDA-core kernels
    runs.push_back({"decode_cc_batch" + std::to_string(req), s});
    s.decode_kernel = 0;
    s.num_requests = 1;
    s.kv_tokens = 32768 / req;
    runs.push_back({"decode_single_of_" + std::to_string(req), s});
    s.decode_kernel = 1;
    runs.push_back({"decode_cc_single_of_" + std::to_string(req), s});
  }
  // The CUDA-core kernels' other loops (decode_kernel = 1): K/V through registers instead of the
  // shared-memory pipeline (decode_pipeline = 1), and 2 tokens per token group per step instead
  // of 4 (decode_unroll = 2).
  for (int seg : {512, 256, 64}) {
    for (int variant : {0, 1}) {
      tl::AttentionBenchShape s;
      s.num_q_tokens = 1;
      s.segment_tokens = seg;
      s.kernel = 2;
      s.decode_kernel = 1;
      if (variant == 0) {
        s.decode_pipeline = 1;
      } else {
        s.decode_unroll = 2;
      }
      runs.push_back({variant == 0 ? "decode_cc_regs" : "decode_cc_u2", s});
    }
  }
  for (int seg : {512, 256}) {
    for (int splits : {24, 48}) {
      tl::AttentionBenchShape s;
      s.num_q_tokens = 1;
      s.segment_tokens = seg;
      s.kernel = 2;
      s.num_splits = splits;
      s.decode_kernel = 1;  // the CUDA-core kernels
      runs.push_back({"decode_cc", s});
    }
  }
  for (int rows : {16, 32}) {
    for (int warps : {4, 8}) {
      for (int splits : {0, 1}) {
        tl::AttentionBenchShape s;
        s.num_q_tokens = 1024;
        s.segment_tokens = 512;
        s.kernel = 1;
        s.num_splits = splits;
        s.prefill_warps = warps;
        s.prefill_rows_per_warp = rows;
        s.prefill_kernel = 1;  // the mma.sync kernel
        runs.push_back({rows == 16 ? "prefill_cached" : "prefill_cached_r32", s});
      }
    }
  }
  // The mma.sync kernel below 512 query tokens, where its default is 16 rows per warp and 4
  // warps, against the other pairings.
  for (int rows : {16, 32}) {
    for (int warps : {4, 8}) {
      tl::AttentionBenchShape s;
      s.num_q_tokens = 256;
      s.segment_tokens = 512;
      s.kernel = 1;
      s.prefill_warps = warps;
      s.prefill_rows_per_warp = rows;
      s.prefill_kernel = 1;
      runs.push_back({"prefill_q256", s});
    }
  }
  // The Hopper wgmma prefill kernel (prefill_sm90.cu, the library's default on Hopper):
  // automatic, 1 and 2 splits.
  for (int splits : {0, 1, 2}) {
    tl::AttentionBenchShape s;
    s.num_q_tokens = 1024;
    s.segment_tokens = 512;
    s.kernel = 1;
    s.num_splits = splits;
    s.prefill_kernel = 2;
    runs.push_back({"prefill_cached_sm90", s});
  }
  {
    tl::AttentionBenchShape s;
    s.num_q_tokens = 1024;
    s.kv_tokens = 1024;
    s.segment_tokens = 512;
    s.causal = true;
    s.kernel = 1;
    s.prefill_kernel = 1;
    runs.push_back({"prefill_new_causal", s});
    s.prefill_rows_per_warp = 32;
    s.prefill_warps = 4;
    runs.push_back({"prefill_new_causal_r32", s});
    s.prefill_rows_per_warp = 0;
    s.prefill_warps = 0;
    s.prefill_kernel = 2;
    runs.push_back({"prefill_new_causal_sm90", s});
  }
  // TL_BENCH_ONLY=prefix[,prefix...] keeps only the runs whose name starts with one of them
  // (quick device checks); a prefix ending in '$' matches the whole name only.
  if (const char* only = std::getenv("TL_BENCH_ONLY"); only != nullptr && *only != '\0') {
    std::vector<std::string> keep(1);
    for (const char* c = only; *c != '\0'; ++c) {
      if (*c == ',') {
        keep.emplace_back();
      } else {
        keep.back() += *c;
      }
    }
    std::erase_if(runs, [&](const Run& r) {
      for (const std::string& k : keep) {
        if (!k.empty() && k.back() == '$' ? r.name == k.substr(0, k.size() - 1)
                                          : r.name.rfind(k, 0) == 0) {
          return false;
        }
      }
      return true;
    });
  }
  std::printf("%-20s %6s %6s %6s %11s %10s %9s %9s %9s %9s %9s\n", "run", "q", "kv", "seg",
              "split/w/u/p", "us", "TFLOP/s", "KV GB/s", "merge us", "b2b us", "b2b GB/s");
  for (const Run& r : runs) {
    auto t = tl::MeasurePagedAttention(r.shape, 50);
    if (!t.ok()) {
      std::fprintf(stderr, "%s: %s\n", r.name.c_str(), t.status().ToString().c_str());
      return 1;
    }
    const auto& s = r.shape;
    std::printf("%-20s %6d %6ld %6d %3d/%d/%d/%d %10.1f %9.1f %9.0f %9.2f %9.1f %9.0f\n",
                r.name.c_str(), s.num_q_tokens, static_cast<long>(s.kv_tokens), s.segment_tokens,
                s.num_splits, s.prefill_warps, s.decode_unroll, s.decode_pipeline, t->us, t->tflops,
                t->kv_gbps, t->merge_us, t->batched_us, t->batched_kv_gbps);
    j["runs"].push_back({{"name", r.name},
                         {"num_q_tokens", s.num_q_tokens},
                         {"kv_tokens", s.kv_tokens},
                         {"segment_tokens", s.segment_tokens},
                         {"num_heads", s.num_heads},
                         {"num_kv_heads", s.num_kv_heads},
                         {"head_dim", s.head_dim},
                         {"causal", s.causal},
                         {"num_splits", s.num_splits},
                         {"prefill_warps", s.prefill_warps},
                         {"decode_unroll", s.decode_unroll},
                         {"decode_pipeline", s.decode_pipeline},
                         {"prefill_rows_per_warp", s.prefill_rows_per_warp},
                         {"prefill_kernel", s.prefill_kernel},
                         {"decode_merge", s.decode_merge},
                         {"decode_kernel", s.decode_kernel},
                         {"decode_mma_stages", s.decode_mma_stages},
                         {"decode_mma_descriptors", s.decode_mma_descriptors},
                         {"num_requests", s.num_requests},
                         {"us", t->us},
                         {"tflops", t->tflops},
                         {"kv_gbps", t->kv_gbps},
                         {"merge_us", t->merge_us},
                         {"batched_us", t->batched_us},
                         {"batched_kv_gbps", t->batched_kv_gbps}});
  }
  std::ofstream(out_path) << j.dump(2) << "\n";
  return 0;
}
