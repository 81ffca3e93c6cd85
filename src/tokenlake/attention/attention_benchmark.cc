// Micro-benchmarks of the CPU attention path.
//
// One core each (PartialAttention runs on the calling thread):
//   BM_MemoryCopy         memcpy of a 256 MiB buffer: this machine's copy bandwidth
//                         (counter read_Bps counts the bytes read, copy_Bps read + write).
//   BM_MemoryRead         a vectorised sum over a 256 MiB buffer: read bandwidth.
//   BM_FmaPeak            one core's AVX2 FMA throughput (FLOPs, 2 per lane per FMA).
//   BM_Decode/dtype       1 query token, 32 heads / 8 KV heads, d = 128, over 32K cached
//                         tokens in 64-token segments; kv_Bps = KV bytes read per second.
//   BM_Prefill/dtype      512 new tokens over 8K cached tokens (non-causal partial, as in
//                         serving), same heads; FLOPs = 4 * nq * nk * heads * d.
//   BM_Merge              n-way merge of 8 partials of 512 tokens x 32 heads x 128.
//
// dtype: 0 = f32, 1 = bf16. Build with the release preset.
#include <cstring>
#include <memory>
#include <vector>

#include "benchmark/benchmark.h"
#include "tokenlake/attention/attention.h"
#include "tokenlake/attention/cpu_kernel.h"
#include "tokenlake/base/random.h"

namespace tokenlake::attention {
namespace {

constexpr size_t kBufferBytes = size_t{256} << 20;

void BM_MemoryCopy(benchmark::State& state) {
  std::vector<char> src(kBufferBytes, 1);
  std::vector<char> dst(kBufferBytes, 0);
  for (auto _ : state) {
    std::memcpy(dst.data(), src.data(), kBufferBytes);
    benchmark::DoNotOptimize(dst.data());
    benchmark::ClobberMemory();
  }
  const double bytes = static_cast<double>(kBufferBytes) * state.iterations();
  state.counters["read_Bps"] = benchmark::Counter(bytes, benchmark::Counter::kIsRate);
  state.counters["copy_Bps"] = benchmark::Counter(2 * bytes, benchmark::Counter::kIsRate);
}
BENCHMARK(BM_MemoryCopy)->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_MemoryRead(benchmark::State& state) {
  const size_t n = kBufferBytes / sizeof(float);
  std::vector<float> src(n, 1.0f);
  for (auto _ : state) {
    // 8 independent partial sums so the loop vectorises without reassociation.
    float acc[8] = {};
    for (size_t j = 0; j < n; j += 8) {
      for (int k = 0; k < 8; ++k) acc[k] += src[j + k];
    }
    float sum = 0;
    for (float a : acc) sum += a;
    benchmark::DoNotOptimize(sum);
  }
  state.counters["read_Bps"] = benchmark::Counter(
      static_cast<double>(kBufferBytes) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_MemoryRead)->Unit(benchmark::kMillisecond)->UseRealTime();

// The per-core FMA peak of the AVX2 path: 12 independent 8-wide FMA chains, no memory traffic.
// FLOPs counts 2 per lane per FMA, so the prefill FLOPs above can be read against it.
typedef float v8f_bench __attribute__((vector_size(32)));
__attribute__((target("avx2,fma"), noinline)) float FmaLoop(int64_t n, float x) {
  v8f_bench acc[12];
  for (int i = 0; i < 12; ++i) acc[i] = v8f_bench{} + (x + static_cast<float>(i));
  const v8f_bench a = v8f_bench{} + 0.999f;
  const v8f_bench b = v8f_bench{} + 0.001f;
  for (int64_t k = 0; k < n; ++k) {
    for (int i = 0; i < 12; ++i) acc[i] = acc[i] * a + b;
  }
  float s = 0;
  for (int i = 0; i < 12; ++i) s += acc[i][0] + acc[i][7];
  return s;
}

void BM_FmaPeak(benchmark::State& state) {
  const int64_t n = 1 << 20;
  for (auto _ : state) {
    int64_t m = n;  // opaque to the optimiser, so the (pure) call is not hoisted.
    benchmark::DoNotOptimize(m);
    benchmark::DoNotOptimize(FmaLoop(m, 1.0f));
  }
  state.counters["FLOPs"] = benchmark::Counter(
      static_cast<double>(n) * 12 * 8 * 2 * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_FmaPeak)->Unit(benchmark::kMillisecond);

// KV for `num_tokens` tokens in segments of `segment_tokens`, one layer.
struct KvData {
  std::vector<float> f32;
  std::vector<uint16_t> bf16;
  std::vector<KvBlock> blocks;
  int64_t bytes = 0;
};

KvData MakeKv(KvDtype dtype, int64_t num_tokens, int segment_tokens, int num_kv_heads,
              int head_dim) {
  KvData kv;
  const int64_t row = static_cast<int64_t>(num_kv_heads) * head_dim;
  const int64_t n = 2 * num_tokens * row;  // K then V per segment
  Rng rng(7);
  if (dtype == KvDtype::kFloat32) {
    kv.f32.resize(static_cast<size_t>(n));
    for (auto& x : kv.f32) x = static_cast<float>(rng.UniformDouble() - 0.5);
  } else {
    kv.bf16.resize(static_cast<size_t>(n));
    for (auto& x : kv.bf16) x = FloatToBf16(static_cast<float>(rng.UniformDouble() - 0.5));
  }
  const size_t elem = KvDtypeBytes(dtype);
  auto* base = dtype == KvDtype::kFloat32 ? static_cast<char*>(static_cast<void*>(kv.f32.data()))
                                          : static_cast<char*>(static_cast<void*>(kv.bf16.data()));
  for (int64_t t = 0; t < num_tokens; t += segment_tokens) {
    const int64_t len = std::min<int64_t>(segment_tokens, num_tokens - t);
    char* seg = base + static_cast<size_t>(2 * t * row) * elem;
    kv.blocks.push_back(KvBlock{seg, seg + static_cast<size_t>(segment_tokens * row) * elem,
                                static_cast<int32_t>(len)});
  }
  kv.bytes = n * static_cast<int64_t>(elem);
  return kv;
}

void RunAttentionBenchmark(benchmark::State& state, int nq, int64_t num_keys) {
  const KvDtype dtype = state.range(0) == 0 ? KvDtype::kFloat32 : KvDtype::kBFloat16;
  AttentionParams p{.num_heads = 32, .num_kv_heads = 8, .head_dim = 128, .kv_dtype = dtype};
  KvData kv = MakeKv(dtype, num_keys, 64, p.num_kv_heads, p.head_dim);
  Rng rng(3);
  std::vector<float> q(static_cast<size_t>(nq) * p.num_heads * p.head_dim);
  for (auto& x : q) x = static_cast<float>(rng.UniformDouble() - 0.5);
  std::vector<float> out(q.size());
  std::vector<float> lse(static_cast<size_t>(nq) * p.num_heads);
  for (auto _ : state) {
    const absl::Status s =
        PartialAttention(p, nq, q, kv.blocks, absl::MakeSpan(out), absl::MakeSpan(lse));
    if (!s.ok()) state.SkipWithError(s.ToString().c_str());
    benchmark::DoNotOptimize(out.data());
  }
  const double iters = static_cast<double>(state.iterations());
  state.counters["kv_Bps"] =
      benchmark::Counter(static_cast<double>(kv.bytes) * iters, benchmark::Counter::kIsRate);
  state.counters["FLOPs"] = benchmark::Counter(
      4.0 * nq * static_cast<double>(num_keys) * p.num_heads * p.head_dim * iters,
      benchmark::Counter::kIsRate);
  state.SetLabel(std::string(KvDtypeName(dtype)) +
                 (internal::KernelUsesAvx2() ? " avx2+fma" : " sse2"));
}

void BM_Decode(benchmark::State& state) { RunAttentionBenchmark(state, 1, 32768); }
BENCHMARK(BM_Decode)->Arg(0)->Arg(1)->ArgName("bf16")->Unit(benchmark::kMillisecond)->UseRealTime();

void BM_Prefill(benchmark::State& state) { RunAttentionBenchmark(state, 512, 8192); }
BENCHMARK(BM_Prefill)
    ->Arg(0)
    ->Arg(1)
    ->ArgName("bf16")
    ->Unit(benchmark::kMillisecond)
    ->UseRealTime();

void BM_Merge(benchmark::State& state) {
  const PartialShape shape{512, 32, 128};
  const size_t out_n = 512 * 32 * 128;
  const size_t lse_n = 512 * 32;
  Rng rng(5);
  std::vector<std::vector<float>> outs(8, std::vector<float>(out_n));
  std::vector<std::vector<float>> lses(8, std::vector<float>(lse_n));
  for (auto& o : outs)
    for (auto& x : o) x = static_cast<float>(rng.UniformDouble());
  for (auto& l : lses)
    for (auto& x : l) x = static_cast<float>(rng.UniformDouble() * 10);
  std::vector<PartialView> others;
  for (int i = 1; i < 8; ++i) others.push_back({outs[i], lses[i]});
  std::vector<float> acc_o = outs[0], acc_l = lses[0];
  for (auto _ : state) {
    const absl::Status s =
        MergePartialsInPlace(shape, {absl::MakeSpan(acc_o), absl::MakeSpan(acc_l)}, others);
    if (!s.ok()) state.SkipWithError(s.ToString().c_str());
    benchmark::DoNotOptimize(acc_o.data());
  }
  state.counters["bytes_Bps"] = benchmark::Counter(
      8.0 * (out_n + lse_n) * sizeof(float) * state.iterations(), benchmark::Counter::kIsRate);
}
BENCHMARK(BM_Merge)->Unit(benchmark::kMillisecond);

}  // namespace
}  // namespace tokenlake::attention
