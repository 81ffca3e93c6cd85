// What the decode kernel's memory traffic can reach without its arithmetic: every way of reading
// a 32K-token pooled prefix's K and V (GQA 8 KV heads, head_dim 128, bf16: 134 MB) that the
// decode kernel could use, timed like the decode (events around one launch, and around ten
// launches back to back), beside cudaMemcpy D2D and a plain grid-stride read.
//
// The unit of work is 8 KB per warp, read into an S-stage shared-memory pipeline, as the
// tensor-core decode kernel does (paged_attention.cu, DecodeMmaKernel):
//   layout "head": 16 key rows x 256 B of one KV head, K and V (the decode's pattern: a row is
//                  [kv_heads][128] bf16 = 2 KB, a block of one head reads 256 B of each);
//   layout "row":  2 whole 2 KB rows, K and V (a block spanning all KV heads).
// Assignment of units to warps:
//   static:     block b owns units [b U / G, (b + 1) U / G), its W warps interleaved (the
//               decode's equal static shares);
//   interleave: warp g of the NW = G W takes units g, g + NW, ... (grid-stride);
//   dynamic:    each warp takes chunks of 4 units from one atomic counter, one chunk ahead;
//   contig:     as static, but each warp owns a contiguous quarter of the block's range.
// Copy: cp.async 16 B (.cg, as the decode), the same with the .L2::256B prefetch hint, or the
// bulk copy engine (cp.async.bulk, completing on a per-warp mbarrier).
//
// Built with the CUDA part (`cmake --preset cuda`, target gpu_stream_probe; no dependencies, so
// `nvcc -std=c++20 -O3 -gencode=arch=compute_90a,code=sm_90a bench/gpu_stream_probe.cu` works
// too). Run on a machine with the GPU: gpu_stream_probe [--json OUT]; prints one row per variant.
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>

#define CK(x)                                                                                  \
  do {                                                                                         \
    cudaError_t e_ = (x);                                                                      \
    if (e_ != cudaSuccess) {                                                                   \
      std::fprintf(stderr, "%s:%d: %s: %s\n", __FILE__, __LINE__, #x, cudaGetErrorString(e_)); \
      std::exit(1);                                                                            \
    }                                                                                          \
  } while (0)

namespace {

constexpr int kRows = 32768;
constexpr int kKvHeads = 8;
constexpr int kRowBytes = kKvHeads * 128 * 2;                          // 2 KB
constexpr size_t kSideBytes = size_t{kRows} * kRowBytes;               // K (or V): 64 MiB
constexpr int kUnitBytes = 8192;                                       // per warp: K 4 KB + V 4 KB
constexpr int kUnits = static_cast<int>(2 * kSideBytes / kUnitBytes);  // 16384
constexpr int kChunkUnits = 4;                                         // dynamic: units per grab

enum Layout { kHead = 0, kRow = 1 };
enum Assign { kStatic = 0, kInterleave = 1, kDynamic = 2, kContig = 3 };
enum Copy { kCp = 0, kCp256 = 1, kBulk = 2 };

__device__ __forceinline__ uint32_t Smem(const void* p) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(p));
}

// Source offsets (bytes from K's and V's base) of unit u's piece p: for "head", 16 pieces of
// 256 B (rows of one head); for "row", 1 piece of 4 KB (two whole rows).
template <int L>
__device__ __forceinline__ size_t PieceOffset(int u, int p) {
  if constexpr (L == kHead) {
    const int head = u / (kRows / 16);
    const int row = (u % (kRows / 16)) * 16 + p;
    return static_cast<size_t>(row) * kRowBytes + head * 256;
  } else {
    return static_cast<size_t>(u) * 2 * kRowBytes;
  }
}

template <int L, int A, int C, int W, int S>
__global__ void __launch_bounds__(W * 32)
    Probe(const char* __restrict__ k, const char* __restrict__ v, unsigned* counter,
          unsigned* sink) {
  extern __shared__ __align__(128) char smem[];  // [W][S][8 KB]
  __shared__ uint64_t bars[W * S];
  const int lane = threadIdx.x % 32;
  const int w = threadIdx.x / 32;
  const int G = gridDim.x;
  char* ws = smem + static_cast<size_t>(w) * S * kUnitBytes;
  uint64_t* wb = bars + w * S;
  if constexpr (C == kBulk) {
    if (lane < S) {
      asm volatile("mbarrier.init.shared::cta.b64 [%0], 1;" ::"r"(Smem(wb + lane)));
    }
    asm volatile("fence.mbarrier_init.release.cluster;" ::: "memory");
    __syncwarp();
  }

  // The warp's sequence of units.
  int first = 0, step = 1, count = 0;  // static / interleave / contig: units first + i * step
  const int b = blockIdx.x;
  if constexpr (A == kStatic || A == kContig) {
    const int lo = static_cast<int>(static_cast<int64_t>(kUnits) * b / G);
    const int hi = static_cast<int>(static_cast<int64_t>(kUnits) * (b + 1) / G);
    if constexpr (A == kStatic) {
      first = lo + w;
      step = W;
      count = first < hi ? (hi - first + W - 1) / W : 0;
    } else {
      const int n = hi - lo;
      const int a = lo + n * w / W, z = lo + n * (w + 1) / W;
      first = a;
      count = z - a;
    }
  } else if constexpr (A == kInterleave) {
    first = b * W + w;
    step = G * W;
    count = first < kUnits ? (kUnits - first + step - 1) / step : 0;
  }
  // Dynamic: chunks of kChunkUnits units, the next chunk's id taken one chunk ahead.
  unsigned cur = 0, nxt = 0;
  int in_chunk = 0;
  constexpr unsigned kChunks = kUnits / kChunkUnits;
  if constexpr (A == kDynamic) {
    if (lane == 0) {
      cur = atomicAdd(counter, 1u);
      nxt = atomicAdd(counter, 1u);
    }
    cur = __shfl_sync(~0u, cur, 0);
  }
  auto next_unit = [&](int i) -> int {  // the i-th unit of the warp, or -1
    if constexpr (A == kDynamic) {
      if (cur >= kChunks) return -1;
      const int u = static_cast<int>(cur) * kChunkUnits + in_chunk;
      if (++in_chunk == kChunkUnits) {
        in_chunk = 0;
        cur = __shfl_sync(~0u, nxt, 0);
        if (lane == 0 && cur < kChunks) nxt = atomicAdd(counter, 1u);
      }
      return u;
    } else {
      return i < count ? first + i * step : -1;
    }
  };
  auto issue = [&](int u, int stage) {
    char* dst = ws + stage * kUnitBytes;
    if constexpr (C == kBulk) {
      const uint32_t bar = Smem(wb + stage);
      if (lane == 0) {
        asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(bar),
                     "r"(kUnitBytes)
                     : "memory");
      }
      __syncwarp();
      if constexpr (L == kHead) {  // lanes 0-15: K rows, 16-31: V rows, 256 B each
        const int p = lane % 16;
        const char* src = (lane < 16 ? k : v) + PieceOffset<L>(u, p);
        const uint32_t d = Smem(dst + (lane < 16 ? 0 : 4096) + p * 256);
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 256, "
            "[%2];" ::"r"(d),
            "l"(src), "r"(bar)
            : "memory");
      } else if (lane < 2) {
        const char* src = (lane == 0 ? k : v) + PieceOffset<L>(u, 0);
        const uint32_t d = Smem(dst + lane * 4096);
        asm volatile(
            "cp.async.bulk.shared::cluster.global.mbarrier::complete_tx::bytes [%0], [%1], 4096, "
            "[%2];" ::"r"(d),
            "l"(src), "r"(bar)
            : "memory");
      }
    } else {
#pragma unroll
      for (int it = 0; it < 8; ++it) {  // 256 16-byte chunks of K (and of V) per unit
        const int i = lane + it * 32;
        size_t off;
        if constexpr (L == kHead) {
          off = PieceOffset<L>(u, i / 16) + (i % 16) * 16;
        } else {
          off = PieceOffset<L>(u, 0) + i * 16;
        }
        const uint32_t d = Smem(dst + i * 16);
        if constexpr (C == kCp256) {
          asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(d), "l"(k + off));
          asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16;" ::"r"(d + 4096),
                       "l"(v + off));
        } else {
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d), "l"(k + off));
          asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(d + 4096), "l"(v + off));
        }
      }
    }
  };
  unsigned acc = 0;
  int issued = 0, used = 0;
  int pending[S];
#pragma unroll
  for (int s = 0; s < S; ++s) pending[s] = -1;
#pragma unroll
  for (int s = 0; s < S - 1; ++s) {
    const int u = next_unit(issued);
    if (u >= 0) {
      issue(u, s);
      ++issued;
    }
    if constexpr (C != kBulk) asm volatile("cp.async.commit_group;");
  }
  int stage = 0;
  uint32_t phase = 0;  // bit s: parity of stage s's next completion
  while (used < issued) {
    if constexpr (C == kBulk) {
      const uint32_t bar = Smem(wb + stage);
      const uint32_t par = (phase >> stage) & 1u;
      asm volatile(
          "{\n .reg .pred p;\n WAIT_%=:\n"
          " mbarrier.try_wait.parity.shared::cta.b64 p, [%0], %1;\n"
          " @!p bra WAIT_%=;\n}" ::"r"(bar),
          "r"(par)
          : "memory");
      phase ^= 1u << stage;
      __syncwarp();
    } else {
      asm volatile("cp.async.wait_group %0;" ::"n"(S - 2));
      __syncwarp();
    }
    // Refill the stage freed last round, then touch this one.
    const int u = next_unit(issued);
    if (u >= 0) {
      issue(u, (stage + S - 1) % S);
      ++issued;
    }
    if constexpr (C != kBulk) asm volatile("cp.async.commit_group;");
    acc ^= *reinterpret_cast<const unsigned*>(ws + stage * kUnitBytes + lane * 256);
    ++used;
    stage = (stage + 1) % S;
  }
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;  // keeps the reads
}

__global__ void GridStrideRead(const uint4* __restrict__ a, size_t n, unsigned* sink) {
  unsigned acc = 0;
  for (size_t i = blockIdx.x * size_t{blockDim.x} + threadIdx.x; i < n;
       i += size_t{gridDim.x} * blockDim.x) {
    const uint4 x = a[i];
    acc ^= x.x ^ x.y ^ x.z ^ x.w;
  }
  if (acc == 0x9e3779b9u) sink[blockIdx.x] = acc;
}

struct Config {
  std::string name;
  void (*kernel)(const char*, const char*, unsigned*, unsigned*);
  int warps, stages, grid;
};

template <int L, int A, int C, int W, int S>
Config Make(const char* layout, const char* assign, const char* copy, int grid) {
  char name[128];
  std::snprintf(name, sizeof name, "%s/%s/%s/w%d/s%d/g%d", layout, assign, copy, W, S, grid);
  auto* k = &Probe<L, A, C, W, S>;
  CK(cudaFuncSetAttribute(k, cudaFuncAttributeMaxDynamicSharedMemorySize, W * S * kUnitBytes));
  return {name, k, W, S, grid};
}

float Median(std::vector<float> v) {
  std::sort(v.begin(), v.end());
  return v[v.size() / 2];
}

}  // namespace

int main(int argc, char** argv) {
  const char* json_path = argc > 2 && std::string(argv[1]) == "--json" ? argv[2] : nullptr;
  cudaDeviceProp prop{};
  CK(cudaGetDeviceProperties(&prop, 0));
  const int sms = prop.multiProcessorCount;
  // Two sets of K and V (each call reads the set the previous call did not), and 1 GiB for the
  // copy.
  char* buf;
  CK(cudaMalloc(&buf, 4 * kSideBytes));
  CK(cudaMemset(buf, 1, 4 * kSideBytes));
  char* big;
  const size_t kBig = size_t{1} << 30;
  CK(cudaMalloc(&big, 2 * kBig));
  CK(cudaMemset(big, 2, 2 * kBig));
  unsigned* counters;
  constexpr int kCounters = 64;
  CK(cudaMalloc(&counters, kCounters * sizeof(unsigned)));
  unsigned* sink;
  CK(cudaMalloc(&sink, 65536 * sizeof(unsigned)));
  cudaStream_t st;
  CK(cudaStreamCreate(&st));
  cudaEvent_t e0, e1;
  CK(cudaEventCreate(&e0));
  CK(cudaEventCreate(&e1));
  constexpr int kSamples = 40, kWarm = 5, kBack = 10;
  const double bytes = 2.0 * kSideBytes;

  // Times fn(i) once per sample (one launch) and kBack times per sample (back to back).
  auto time = [&](auto&& fn, auto&& before_sample) {
    for (int i = 0; i < kWarm; ++i) {
      before_sample();
      fn(i);
    }
    std::vector<float> one, back;
    for (int s = 0; s < kSamples; ++s) {
      before_sample();
      CK(cudaEventRecord(e0, st));
      fn(s);
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      float ms;
      CK(cudaEventElapsedTime(&ms, e0, e1));
      one.push_back(ms * 1000.f);
      before_sample();
      CK(cudaEventRecord(e0, st));
      for (int j = 0; j < kBack; ++j) fn(s * kBack + j);
      CK(cudaEventRecord(e1, st));
      CK(cudaEventSynchronize(e1));
      CK(cudaEventElapsedTime(&ms, e0, e1));
      back.push_back(ms * 1000.f / kBack);
    }
    CK(cudaGetLastError());
    return std::pair<float, float>{Median(one), Median(back)};
  };
  auto nothing = [] {};

  // Copy bandwidth (read + write), as the decode bench measures it.
  std::vector<float> copy_us;
  for (int i = 0; i < 25; ++i) {
    CK(cudaEventRecord(e0, st));
    CK(cudaMemcpyAsync(big + kBig, big, kBig, cudaMemcpyDeviceToDevice, st));
    CK(cudaEventRecord(e1, st));
    CK(cudaEventSynchronize(e1));
    float ms;
    CK(cudaEventElapsedTime(&ms, e0, e1));
    if (i >= 5) copy_us.push_back(ms * 1000.f);
  }
  const double copy_gbps = 2.0 * kBig / (Median(copy_us) * 1e3);
  std::printf(
      "device %s, %d SMs; D2D copy %.0f GB/s (read + write, 1 GiB); floor for 134 MB "
      "at copy: %.1f us\n",
      prop.name, sms, copy_gbps, bytes / copy_gbps / 1e3);
  std::string json = "{\"device\": \"" + std::string(prop.name) +
                     "\", \"copy_gbps\": " + std::to_string(copy_gbps) + ", \"rows\": [";
  auto report = [&](const std::string& name, std::pair<float, float> t) {
    const double p1 = bytes / (t.first * 1e3) / copy_gbps * 100;
    const double pb = bytes / (t.second * 1e3) / copy_gbps * 100;
    std::printf("%-34s one %6.1f us %5.1f%%   back-to-back %6.1f us %5.1f%%\n", name.c_str(),
                t.first, p1, t.second, pb);
    std::fflush(stdout);
    char row[256];
    std::snprintf(row, sizeof row,
                  "%s{\"name\": \"%s\", \"one_us\": %.2f, \"one_pct\": %.2f, \"back_us\": %.2f, "
                  "\"back_pct\": %.2f}",
                  json.back() == '[' ? "" : ", ", name.c_str(), t.first, p1, t.second, pb);
    json += row;
  };

  {
    auto fn = [&](int i) {
      const char* base = buf + (i % 2) * 2 * kSideBytes;
      GridStrideRead<<<sms * 8, 256, 0, st>>>(reinterpret_cast<const uint4*>(base),
                                              2 * kSideBytes / 16, sink);
    };
    report("grid-stride ld.v4 8x256/SM", time(fn, nothing));
  }

  std::vector<Config> configs = {
      // The decode's pattern and grid (16 splits x 8 heads), three copy kinds.
      Make<kHead, kStatic, kCp, 4, 4>("head", "static", "cp", 128),
      Make<kHead, kStatic, kCp256, 4, 4>("head", "static", "cp256", 128),
      Make<kHead, kStatic, kBulk, 4, 4>("head", "static", "bulk", 128),
      Make<kHead, kContig, kCp, 4, 4>("head", "contig", "cp", 128),
      // Every SM.
      Make<kHead, kStatic, kCp, 4, 4>("head", "static", "cp", sms),
      Make<kHead, kStatic, kBulk, 4, 4>("head", "static", "bulk", sms),
      Make<kHead, kInterleave, kCp, 4, 4>("head", "interleave", "cp", sms),
      Make<kHead, kInterleave, kBulk, 4, 4>("head", "interleave", "bulk", sms),
      Make<kHead, kDynamic, kCp, 4, 4>("head", "dynamic", "cp", sms),
      Make<kHead, kDynamic, kBulk, 4, 4>("head", "dynamic", "bulk", sms),
      // Two blocks per SM.
      Make<kHead, kStatic, kCp, 4, 2>("head", "static", "cp", 2 * sms),
      Make<kHead, kDynamic, kCp, 4, 2>("head", "dynamic", "cp", 2 * sms),
      Make<kHead, kDynamic, kBulk, 4, 2>("head", "dynamic", "bulk", 2 * sms),
      // Deeper bulk pipelines.
      Make<kHead, kStatic, kBulk, 4, 6>("head", "static", "bulk", 128),
      Make<kHead, kDynamic, kBulk, 4, 6>("head", "dynamic", "bulk", sms),
      // Whole rows (a block spanning every KV head).
      Make<kRow, kStatic, kCp, 4, 4>("row", "static", "cp", sms),
      Make<kRow, kStatic, kBulk, 4, 4>("row", "static", "bulk", sms),
      Make<kRow, kInterleave, kCp, 4, 4>("row", "interleave", "cp", sms),
      Make<kRow, kInterleave, kBulk, 4, 4>("row", "interleave", "bulk", sms),
      Make<kRow, kDynamic, kCp, 4, 4>("row", "dynamic", "cp", sms),
      Make<kRow, kDynamic, kBulk, 4, 4>("row", "dynamic", "bulk", sms),
      Make<kRow, kStatic, kBulk, 8, 3>("row", "static", "bulk", sms),
      // The decode's configuration again, last (row-order effects).
      Make<kHead, kStatic, kCp, 4, 4>("head", "static", "cp", 128),
  };
  for (const Config& c : configs) {
    const size_t smem = static_cast<size_t>(c.warps) * c.stages * kUnitBytes;
    auto reset = [&] { CK(cudaMemsetAsync(counters, 0, kCounters * sizeof(unsigned), st)); };
    auto fn = [&](int i) {
      const char* base = buf + (i % 2) * 2 * kSideBytes;
      c.kernel<<<c.grid, c.warps * 32, smem, st>>>(base, base + kSideBytes,
                                                   counters + i % kCounters, sink);
    };
    report(c.name, time(fn, reset));
  }
  json += "]}\n";
  if (json_path != nullptr) {
    FILE* f = std::fopen(json_path, "w");
    if (f == nullptr) {
      std::perror(json_path);
      return 1;
    }
    std::fputs(json.c_str(), f);
    std::fclose(f);
  }
  return 0;
}
