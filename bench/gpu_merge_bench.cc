// What the log-sum-exp merge of partials adds to an attention step, measured the way a serving
// engine issues the work: captured in a CUDA graph (vLLM and SGLang replay decode steps as
// graphs), so that a small merge launch costs what the GPU spends on it rather than the host's
// launch latency.
//
// Shapes (the tracker's): GQA 32 query / 8 KV heads, head_dim 128, bf16 K/V and queries, a
// 32K-token pooled prefix in 512-token segments whose slots are shuffled in one arena (two such
// prefixes, alternated, so that no run reads K/V another left in L2).
//   decode:  1 query token; the instance's own partial over the prefix (PagedAttention, kAuto),
//            then merged with K partials from other instances ([1 x 32 x 128] each):
//            K = 1 by MergePartials, K = 3 by MergePartialsN over 4 partials; and the same K
//            partials fused into the decode kernel's own split merge (PagedAttentionParams::
//            num_extra = K: no merge launch).
//   prefill: 1,024 new tokens; the partial over the cached prefix plus the causal partial over
//            the new tokens' own KV (1,024 keys), merged by MergePartials.
//   layers:  a decode step's attention calls, one per layer: 10 decode calls in one graph, per
//            call, with ordinary launches and with PagedAttentionParams::pdl 1 and 2 (the way
//            serving engines replay a decode step; % of the D2D copy bandwidth).
// Each variant is a graph; one sample = 10 graph launches back to back between two events; the
// median of 30 samples after 3 warm-ups. The merge's cost is (graph with the merge) - (graph
// without it), reported in microseconds and as a share of the attention it serves. The
// stand-alone event-timed merge launch of gpu_attention_bench is printed for contrast.
//
// Usage: gpu_merge_bench [OUT.json]   (prints a table; writes JSON when OUT.json is given)
#include <cuda_runtime_api.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <fstream>
#include <functional>
#include <numeric>
#include <random>
#include <string>
#include <vector>

#include "absl/status/status.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "tokenlake/attention/cuda/paged_attention.h"
#include "tokenlake/profile/gpu_profile.h"

namespace tl = tokenlake::attention::cuda;

namespace {

#define CHECK_CUDA(expr)                                                                         \
  do {                                                                                           \
    const cudaError_t e_ = (expr);                                                               \
    if (e_ != cudaSuccess) {                                                                     \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, cudaGetErrorString(e_)); \
      std::exit(1);                                                                              \
    }                                                                                            \
  } while (0)
#define CHECK_OK(expr)                                                                          \
  do {                                                                                          \
    const absl::Status s_ = (expr);                                                             \
    if (!s_.ok()) {                                                                             \
      std::fprintf(stderr, "%s:%d %s: %s\n", __FILE__, __LINE__, #expr, s_.ToString().c_str()); \
      std::exit(1);                                                                             \
    }                                                                                           \
  } while (0)

constexpr int kHeads = 32;
constexpr int kKvHeads = 8;
constexpr int kHeadDim = 128;
constexpr int kSegmentTokens = 512;
constexpr int64_t kPrefixTokens = 32768;
constexpr int kSegments = kPrefixTokens / kSegmentTokens;
constexpr int kSets = 2;
constexpr int kLaunchesPerSample = 10;
constexpr int kSamples = 30;

void* DeviceAlloc(size_t bytes) {
  void* p = nullptr;
  CHECK_CUDA(cudaMalloc(&p, bytes));
  return p;
}

// kSets pooled prefixes: every segment's K and V block is a shuffled slot of one arena.
struct Prefix {
  std::vector<tl::DeviceKvBlock*> blocks;  // device arrays [kSegments], one per set
};

Prefix MakePrefix(std::mt19937_64& rng) {
  const size_t block_elems = size_t{kSegmentTokens} * kKvHeads * kHeadDim;
  const int slots = kSets * kSegments * 2;
  auto* arena = static_cast<uint16_t*>(DeviceAlloc(slots * block_elems * 2));
  CHECK_OK(tokenlake::profile::FillRandomBf16(arena, slots * block_elems, rng(), 1.0f));
  std::vector<int> order(slots);
  std::iota(order.begin(), order.end(), 0);
  std::shuffle(order.begin(), order.end(), rng);
  Prefix prefix;
  for (int s = 0; s < kSets; ++s) {
    std::vector<tl::DeviceKvBlock> host(kSegments);
    for (int i = 0; i < kSegments; ++i) {
      host[i].k = arena + order[(s * kSegments + i) * 2] * block_elems;
      host[i].v = arena + order[(s * kSegments + i) * 2 + 1] * block_elems;
      host[i].num_tokens = kSegmentTokens;
    }
    auto* dev = static_cast<tl::DeviceKvBlock*>(DeviceAlloc(kSegments * sizeof(tl::DeviceKvBlock)));
    CHECK_CUDA(cudaMemcpy(dev, host.data(), kSegments * sizeof(tl::DeviceKvBlock),
                          cudaMemcpyHostToDevice));
    prefix.blocks.push_back(dev);
  }
  return prefix;
}

// Captures `enqueue(set)` for each KV set into a graph; returns the median over kSamples of
// kLaunchesPerSample launches (sets alternated) between two events, per launch, in us.
double GraphUs(cudaStream_t stream, const std::function<void(int set)>& enqueue) {
  std::vector<cudaGraphExec_t> execs(kSets);
  for (int s = 0; s < kSets; ++s) {
    cudaGraph_t graph;
    CHECK_CUDA(cudaStreamBeginCapture(stream, cudaStreamCaptureModeThreadLocal));
    enqueue(s);
    CHECK_CUDA(cudaStreamEndCapture(stream, &graph));
    CHECK_CUDA(cudaGraphInstantiate(&execs[s], graph, 0));
    CHECK_CUDA(cudaGraphDestroy(graph));
  }
  cudaEvent_t start, stop;
  CHECK_CUDA(cudaEventCreate(&start));
  CHECK_CUDA(cudaEventCreate(&stop));
  std::vector<double> us;
  for (int sample = -3; sample < kSamples; ++sample) {
    CHECK_CUDA(cudaEventRecord(start, stream));
    for (int k = 0; k < kLaunchesPerSample; ++k) {
      CHECK_CUDA(cudaGraphLaunch(execs[k % kSets], stream));
    }
    CHECK_CUDA(cudaEventRecord(stop, stream));
    CHECK_CUDA(cudaEventSynchronize(stop));
    float ms = 0;
    CHECK_CUDA(cudaEventElapsedTime(&ms, start, stop));
    if (sample >= 0) us.push_back(1000.0 * ms / kLaunchesPerSample);
  }
  CHECK_CUDA(cudaEventDestroy(start));
  CHECK_CUDA(cudaEventDestroy(stop));
  for (cudaGraphExec_t e : execs) CHECK_CUDA(cudaGraphExecDestroy(e));
  std::nth_element(us.begin(), us.begin() + us.size() / 2, us.end());
  return us[us.size() / 2];
}

// One partial's buffers: q [n][H][D] bf16, out [n][H][D] f32, lse [n][H] f32, a workspace.
struct Partial {
  void* q = nullptr;
  float* out = nullptr;
  float* lse = nullptr;
  void* ws = nullptr;
  size_t ws_bytes = 0;
};

tl::PagedAttentionParams Params(const Partial& p, int num_q, const tl::DeviceKvBlock* blocks,
                                int num_blocks, int block_tokens, bool causal) {
  tl::PagedAttentionParams params;
  params.q = p.q;
  params.num_q_tokens = num_q;
  params.blocks = blocks;
  params.num_blocks = num_blocks;
  params.max_block_tokens = block_tokens;
  params.num_heads = kHeads;
  params.num_kv_heads = kKvHeads;
  params.head_dim = kHeadDim;
  params.causal = causal;
  params.out = p.out;
  params.lse = p.lse;
  return params;
}

Partial MakePartial(std::mt19937_64& rng, int num_q, const tl::PagedAttentionParams& shape) {
  Partial p;
  const size_t elems = size_t{static_cast<size_t>(num_q)} * kHeads * kHeadDim;
  p.q = DeviceAlloc(elems * 2);
  CHECK_OK(tokenlake::profile::FillRandomBf16(p.q, elems, rng(), 1.0f));
  p.out = static_cast<float*>(DeviceAlloc(elems * 4));
  p.lse = static_cast<float*>(DeviceAlloc(size_t{static_cast<size_t>(num_q)} * kHeads * 4));
  tl::PagedAttentionParams s = shape;
  s.q = p.q;
  s.out = p.out;
  s.lse = p.lse;
  absl::StatusOr<size_t> ws = tl::PagedAttentionWorkspaceBytes(s);
  CHECK_OK(ws.status());
  p.ws_bytes = *ws;
  if (p.ws_bytes > 0) {
    p.ws = DeviceAlloc(p.ws_bytes);
    CHECK_CUDA(cudaMemset(p.ws, 0, p.ws_bytes));
  }
  return p;
}

}  // namespace

int main(int argc, char** argv) {
  auto dev = tokenlake::profile::DescribeDevice();
  if (!dev.ok()) {
    std::fprintf(stderr, "gpu_merge_bench: %s\n", dev.status().ToString().c_str());
    return 1;
  }
  std::mt19937_64 rng(20261125);
  cudaStream_t stream;
  CHECK_CUDA(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking));
  const Prefix prefix = MakePrefix(rng);
  nlohmann::json j;
  j["device"] = dev->name;
  j["shape"] = absl::StrFormat("GQA %d/%d, d %d, bf16, %d cached tokens in %d-token segments",
                               kHeads, kKvHeads, kHeadDim, kPrefixTokens, kSegmentTokens);

  // ---- decode: own partial over the prefix, merged with K remote partials.
  {
    const int rows = kHeads;  // one query token
    tl::PagedAttentionParams shape =
        Params({}, 1, prefix.blocks[0], kSegments, kSegmentTokens, false);
    Partial own = MakePartial(rng, 1, shape);
    // Remote partials: 3 of [1][H][D] with finite LSEs (any valid partial will do: the output of
    // the own partial, copied before timing).
    auto run_own = [&](int set) {
      tl::PagedAttentionParams p =
          Params(own, 1, prefix.blocks[set], kSegments, kSegmentTokens, false);
      p.workspace = own.ws;
      p.workspace_bytes = own.ws_bytes;
      CHECK_OK(tl::PagedAttention(p, tl::AttentionKernel::kAuto, stream));
    };
    run_own(0);
    CHECK_CUDA(cudaStreamSynchronize(stream));
    const size_t out_elems = size_t{rows} * kHeadDim;
    auto* outs = static_cast<float*>(DeviceAlloc(4 * out_elems * 4));
    auto* lses = static_cast<float*>(DeviceAlloc(4 * rows * 4));
    for (int k = 0; k < 4; ++k) {
      CHECK_CUDA(
          cudaMemcpy(outs + k * out_elems, own.out, out_elems * 4, cudaMemcpyDeviceToDevice));
      CHECK_CUDA(cudaMemcpy(lses + k * rows, own.lse, rows * 4, cudaMemcpyDeviceToDevice));
    }
    auto* merged = static_cast<float*>(DeviceAlloc(out_elems * 4));
    auto* merged_lse = static_cast<float*>(DeviceAlloc(rows * 4));
    const double alone = GraphUs(stream, run_own);
    const double with_one = GraphUs(stream, [&](int set) {
      run_own(set);
      CHECK_OK(tl::MergePartials(own.out, own.lse, outs + out_elems, lses + rows, rows, kHeadDim,
                                 stream));
    });
    const double with_three = GraphUs(stream, [&](int set) {
      run_own(set);
      // The own partial is slot 0 of the N-way merge's input (an engine would have the decode
      // write it there).
      CHECK_CUDA(cudaMemcpyAsync(outs, own.out, out_elems * 4, cudaMemcpyDeviceToDevice, stream));
      CHECK_CUDA(cudaMemcpyAsync(lses, own.lse, rows * 4, cudaMemcpyDeviceToDevice, stream));
      CHECK_OK(tl::MergePartialsN(outs, lses, 4, rows, kHeadDim, merged, merged_lse, stream));
    });
    // The remote partials fused into the decode call (num_extra; slots 1..K of outs / lses).
    auto run_fused = [&](int set, int k) {
      tl::PagedAttentionParams p =
          Params(own, 1, prefix.blocks[set], kSegments, kSegmentTokens, false);
      p.workspace = own.ws;
      p.workspace_bytes = own.ws_bytes;
      p.num_extra = k;
      p.extra_out = outs + out_elems;
      p.extra_lse = lses + rows;
      CHECK_OK(tl::PagedAttention(p, tl::AttentionKernel::kAuto, stream));
    };
    const double fused_one = GraphUs(stream, [&](int set) { run_fused(set, 1); });
    const double fused_three = GraphUs(stream, [&](int set) { run_fused(set, 3); });
    const double f1 = fused_one - alone;
    const double f3 = fused_three - alone;
    const double m1 = with_one - alone;
    const double m3 = with_three - alone;
    std::printf("%s, %s\n", dev->name.c_str(), j["shape"].get<std::string>().c_str());
    std::printf("decode (1 token), CUDA graphs, %d launches per sample, median of %d:\n",
                kLaunchesPerSample, kSamples);
    std::printf("  own partial alone                     %7.2f us\n", alone);
    std::printf("  + merge with 1 remote partial         %7.2f us  -> merge %5.2f us = %4.1f%%\n",
                with_one, m1, 100 * m1 / alone);
    std::printf("  + 2 copies + 4-way merge (3 remote)   %7.2f us  -> merge %5.2f us = %4.1f%%\n",
                with_three, m3, 100 * m3 / alone);
    std::printf("  decode with 1 extra fused             %7.2f us  -> merge %5.2f us = %4.1f%%\n",
                fused_one, f1, 100 * f1 / alone);
    std::printf("  decode with 3 extras fused            %7.2f us  -> merge %5.2f us = %4.1f%%\n",
                fused_three, f3, 100 * f3 / alone);
    j["decode"] = {{"attention_us", alone},      {"with_merge1_us", with_one},    {"merge1_us", m1},
                   {"merge1_share", m1 / alone}, {"with_merge3_us", with_three},  {"merge3_us", m3},
                   {"merge3_share", m3 / alone}, {"with_fused1_us", fused_one},   {"fused1_us", f1},
                   {"fused1_share", f1 / alone}, {"with_fused3_us", fused_three}, {"fused3_us", f3},
                   {"fused3_share", f3 / alone}};

    // A decode step's attention calls, one per layer, in one graph (kLayers calls, the KV sets
    // alternated), per call: ordinary launches against programmatic dependent launch
    // (PagedAttentionParams::pdl 1: each call's blocks start while the previous call drains and
    // wait first; 2: they also stream their first K/V stages before waiting). % of the D2D copy
    // bandwidth for the 134 MB of K/V each call reads.
    constexpr int kLayers = 10;
    auto copy = tokenlake::profile::MeasureCopyGbps(size_t{1} << 30, 20);
    CHECK_OK(copy.status());
    const double kv_bytes = 2.0 * kPrefixTokens * kKvHeads * kHeadDim * 2;
    std::printf("decode, %d calls (layers) in one graph, per call (D2D copy %.0f GB/s):\n", kLayers,
                *copy);
    j["copy_gbps"] = *copy;
    for (int pdl : {0, 1, 2}) {
      const double per_call =
          GraphUs(stream,
                  [&](int set) {
                    for (int layer = 0; layer < kLayers; ++layer) {
                      tl::PagedAttentionParams p =
                          Params(own, 1, prefix.blocks[(set + layer) % kSets], kSegments,
                                 kSegmentTokens, false);
                      p.workspace = own.ws;
                      p.workspace_bytes = own.ws_bytes;
                      p.pdl = pdl;
                      CHECK_OK(tl::PagedAttention(p, tl::AttentionKernel::kAuto, stream));
                    }
                  }) /
          kLayers;
      const double pct = 100.0 * kv_bytes / (per_call * 1e3) / *copy;
      std::printf("  pdl %d                                 %7.2f us  = %5.1f%% of copy\n", pdl,
                  per_call, pct);
      j["decode_layers"].push_back({{"pdl", pdl}, {"per_call_us", per_call}, {"copy_pct", pct}});
    }
  }

  // ---- prefill: cached partial + causal partial over the new tokens, merged.
  {
    constexpr int kNew = 1024;
    tl::PagedAttentionParams cached_shape =
        Params({}, kNew, prefix.blocks[0], kSegments, kSegmentTokens, false);
    Partial cached = MakePartial(rng, kNew, cached_shape);
    // The new tokens' own K/V: one block of kNew tokens.
    const size_t new_elems = size_t{kNew} * kKvHeads * kHeadDim;
    auto* new_kv = static_cast<uint16_t*>(DeviceAlloc(2 * new_elems * 2));
    CHECK_OK(tokenlake::profile::FillRandomBf16(new_kv, 2 * new_elems, rng(), 1.0f));
    tl::DeviceKvBlock host_block{new_kv, new_kv + new_elems, kNew, 0};
    auto* new_block = static_cast<tl::DeviceKvBlock*>(DeviceAlloc(sizeof(tl::DeviceKvBlock)));
    CHECK_CUDA(cudaMemcpy(new_block, &host_block, sizeof(host_block), cudaMemcpyHostToDevice));
    tl::PagedAttentionParams new_shape = Params({}, kNew, new_block, 1, kNew, true);
    Partial fresh = MakePartial(rng, kNew, new_shape);
    CHECK_CUDA(cudaMemcpy(fresh.q, cached.q, size_t{kNew} * kHeads * kHeadDim * 2,
                          cudaMemcpyDeviceToDevice));
    auto run_both = [&](int set) {
      tl::PagedAttentionParams a =
          Params(cached, kNew, prefix.blocks[set], kSegments, kSegmentTokens, false);
      a.workspace = cached.ws;
      a.workspace_bytes = cached.ws_bytes;
      CHECK_OK(tl::PagedAttention(a, tl::AttentionKernel::kAuto, stream));
      tl::PagedAttentionParams b = Params(fresh, kNew, new_block, 1, kNew, true);
      b.workspace = fresh.ws;
      b.workspace_bytes = fresh.ws_bytes;
      CHECK_OK(tl::PagedAttention(b, tl::AttentionKernel::kAuto, stream));
    };
    const double alone = GraphUs(stream, run_both);
    const double with_merge = GraphUs(stream, [&](int set) {
      run_both(set);
      CHECK_OK(tl::MergePartials(cached.out, cached.lse, fresh.out, fresh.lse,
                                 int64_t{kNew} * kHeads, kHeadDim, stream));
    });
    const double m = with_merge - alone;
    std::printf("prefill (1,024 new tokens: cached partial + causal new-token partial):\n");
    std::printf("  both partials                         %7.2f us\n", alone);
    std::printf("  + merge                               %7.2f us  -> merge %5.2f us = %4.2f%%\n",
                with_merge, m, 100 * m / alone);
    j["prefill"] = {{"attention_us", alone},
                    {"with_merge_us", with_merge},
                    {"merge_us", m},
                    {"merge_share", m / alone}};
  }
  if (argc > 1) std::ofstream(argv[1]) << j.dump(2) << "\n";
  return 0;
}
