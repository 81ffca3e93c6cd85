// Implementation of gpu_profile.h.
#include <cublas_v2.h>
#include <cuda_bf16.h>
#include <cuda_runtime.h>

#include <algorithm>
#include <cstdint>
#include <cstdio>
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

namespace tokenlake::profile {

using attention::cuda::AttentionKernel;
using attention::cuda::DeviceKvBlock;
using attention::cuda::MergePartials;
using attention::cuda::PagedAttention;
using attention::cuda::PagedAttentionParams;
using attention::cuda::PagedAttentionWorkspaceBytes;
namespace {

absl::Status CudaStatus(cudaError_t err, const char* what) {
  if (err == cudaSuccess) return absl::OkStatus();
  if (err == cudaErrorMemoryAllocation) {
    return absl::ResourceExhaustedError(absl::StrFormat("%s: %s", what, cudaGetErrorString(err)));
  }
  return absl::InternalError(absl::StrFormat("%s: %s", what, cudaGetErrorString(err)));
}

#define TL_CUDA(expr)                                                     \
  do {                                                                    \
    if (absl::Status s_ = CudaStatus((expr), #expr); !s_.ok()) return s_; \
  } while (0)

#define TL_OK(expr)                                    \
  do {                                                 \
    if (absl::Status s_ = (expr); !s_.ok()) return s_; \
  } while (0)

// A device allocation freed at scope exit.
class DeviceMem {
 public:
  DeviceMem() = default;
  ~DeviceMem() { cudaFree(ptr_); }
  DeviceMem(const DeviceMem&) = delete;
  DeviceMem& operator=(const DeviceMem&) = delete;
  absl::Status Allocate(size_t bytes) {
    if (bytes == 0) return absl::OkStatus();
    return CudaStatus(cudaMalloc(&ptr_, bytes), "cudaMalloc");
  }
  template <typename T = void>
  T* get() const {
    return static_cast<T*>(ptr_);
  }

 private:
  void* ptr_ = nullptr;
};

// Stream + events; times enqueued work.
class Timer {
 public:
  ~Timer() {
    for (cudaEvent_t e : events_) cudaEventDestroy(e);
    if (stream_ != nullptr) cudaStreamDestroy(stream_);
  }
  absl::Status Init(int repeats) {
    TL_CUDA(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking));
    events_.resize(2 * repeats);
    for (cudaEvent_t& e : events_) TL_CUDA(cudaEventCreate(&e));
    return absl::OkStatus();
  }
  cudaStream_t stream() const { return stream_; }

  // Runs `warmup` untimed calls, then `repeats` timed calls (call index passed in), returns the
  // median in microseconds.
  absl::StatusOr<double> MedianUs(const std::function<absl::Status(int)>& fn, int warmup) {
    const int repeats = static_cast<int>(events_.size() / 2);
    for (int i = 0; i < warmup; ++i) TL_OK(fn(i));
    for (int i = 0; i < repeats; ++i) {
      TL_CUDA(cudaEventRecord(events_[2 * i], stream_));
      TL_OK(fn(i));
      TL_CUDA(cudaEventRecord(events_[2 * i + 1], stream_));
    }
    TL_CUDA(cudaStreamSynchronize(stream_));
    TL_CUDA(cudaGetLastError());
    std::vector<double> us(repeats);
    for (int i = 0; i < repeats; ++i) {
      float ms = 0;
      TL_CUDA(cudaEventElapsedTime(&ms, events_[2 * i], events_[2 * i + 1]));
      us[i] = 1000.0 * ms;
    }
    std::nth_element(us.begin(), us.begin() + repeats / 2, us.end());
    return us[repeats / 2];
  }

 private:
  cudaStream_t stream_ = nullptr;
  std::vector<cudaEvent_t> events_;
};

__global__ void FillRandomBf16Kernel(uint16_t* p, size_t n, uint64_t seed, float scale) {
  for (size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x; i < n;
       i += static_cast<size_t>(gridDim.x) * blockDim.x) {
    uint64_t x = seed + 0x9e3779b97f4a7c15ull * (i + 1);
    x = (x ^ (x >> 30)) * 0xbf58476d1ce4e5b9ull;
    x = (x ^ (x >> 27)) * 0x94d049bb133111ebull;
    x ^= x >> 31;
    const float u = static_cast<float>(x >> 40) * (1.0f / 16777216.0f);  // [0, 1)
    const __nv_bfloat16 b = __float2bfloat16_rn((2.f * u - 1.f) * scale);
    p[i] = *reinterpret_cast<const uint16_t*>(&b);
  }
}

// Reads n16 16-byte words (4 independent loads per thread per iteration), XORs them, writes
// one word per thread block (so the loads cannot be dropped).
__global__ void __launch_bounds__(256)
    ReadKernel(const uint4* __restrict__ p, size_t n16, uint32_t* __restrict__ sink) {
  const size_t stride = static_cast<size_t>(gridDim.x) * blockDim.x;
  size_t i = static_cast<size_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  uint32_t x = 0;
  for (; i + 3 * stride < n16; i += 4 * stride) {
    const uint4 a = __ldcs(p + i);
    const uint4 b = __ldcs(p + i + stride);
    const uint4 c = __ldcs(p + i + 2 * stride);
    const uint4 d = __ldcs(p + i + 3 * stride);
    x ^= a.x ^ a.y ^ a.z ^ a.w ^ b.x ^ b.y ^ b.z ^ b.w ^ c.x ^ c.y ^ c.z ^ c.w ^ d.x ^ d.y ^ d.z ^
         d.w;
  }
  for (; i < n16; i += stride) {
    const uint4 a = __ldcs(p + i);
    x ^= a.x ^ a.y ^ a.z ^ a.w;
  }
  __shared__ uint32_t red;
  if (threadIdx.x == 0) red = 0;
  __syncthreads();
  atomicXor(&red, x);
  __syncthreads();
  if (threadIdx.x == 0) sink[blockIdx.x] = red;
}

absl::Status CublasStatus(cublasStatus_t s, const char* what) {
  if (s == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrFormat("%s: cuBLAS status %d", what, static_cast<int>(s)));
}

class Cublas {
 public:
  ~Cublas() {
    if (handle_ != nullptr) cublasDestroy(handle_);
  }
  absl::Status Init(cudaStream_t stream, void* workspace, size_t workspace_bytes) {
    TL_OK(CublasStatus(cublasCreate(&handle_), "cublasCreate"));
    TL_OK(CublasStatus(cublasSetStream(handle_, stream), "cublasSetStream"));
    if (workspace != nullptr) {
      TL_OK(CublasStatus(cublasSetWorkspace(handle_, workspace, workspace_bytes),
                         "cublasSetWorkspace"));
    }
    return absl::OkStatus();
  }
  // Row-major Y[m][n] = X[m][k] * W^T where W is [n][k] (a Linear layer's weight), bf16.
  absl::Status Linear(const void* x, const void* w, void* y, int64_t m, int64_t n, int64_t k) {
    const float alpha = 1.f, beta = 0.f;
    // Column-major: Y^T (n x m) = W (n x k, stored as k x n col-major, transposed) * X^T.
    return CublasStatus(
        cublasGemmEx(handle_, CUBLAS_OP_T, CUBLAS_OP_N, static_cast<int>(n), static_cast<int>(m),
                     static_cast<int>(k), &alpha, w, CUDA_R_16BF, static_cast<int>(k), x,
                     CUDA_R_16BF, static_cast<int>(k), &beta, y, CUDA_R_16BF, static_cast<int>(n),
                     CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
        "cublasGemmEx");
  }

 private:
  cublasHandle_t handle_ = nullptr;
};

}  // namespace

absl::Status FillRandomBf16(void* ptr, size_t n, uint64_t seed, float scale, cudaStream_t stream) {
  if (n == 0) return absl::OkStatus();
  const size_t blocks = std::min<size_t>((n + 255) / 256, 65536);
  FillRandomBf16Kernel<<<static_cast<unsigned>(blocks), 256, 0, stream>>>(
      static_cast<uint16_t*>(ptr), n, seed, scale);
  return CudaStatus(cudaGetLastError(), "FillRandomBf16 launch");
}

absl::StatusOr<DeviceDescription> DescribeDevice() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError("no CUDA device");
  }
  int device = 0;
  TL_CUDA(cudaGetDevice(&device));
  cudaDeviceProp prop;
  TL_CUDA(cudaGetDeviceProperties(&prop, device));
  DeviceDescription d;
  d.name = prop.name;
  d.memory_bytes = static_cast<int64_t>(prop.totalGlobalMem);
  d.num_sms = prop.multiProcessorCount;
  d.cc_major = prop.major;
  d.cc_minor = prop.minor;
  return d;
}

absl::StatusOr<double> MeasureCopyGbps(size_t bytes, int repeats) {
  Timer timer;
  TL_OK(timer.Init(repeats));
  DeviceMem src, dst;
  TL_OK(src.Allocate(bytes));
  TL_OK(dst.Allocate(bytes));
  TL_OK(FillRandomBf16(src.get(), bytes / 2, 1, 1.f, timer.stream()));
  absl::StatusOr<double> us = timer.MedianUs(
      [&](int) {
        return CudaStatus(
            cudaMemcpyAsync(dst.get(), src.get(), bytes, cudaMemcpyDeviceToDevice, timer.stream()),
            "cudaMemcpyAsync");
      },
      3);
  if (!us.ok()) return us.status();
  return 2.0 * static_cast<double>(bytes) / (*us * 1e3);
}

absl::StatusOr<double> MeasureReadGbps(size_t bytes, int repeats, int batch) {
  if (batch < 1) return absl::InvalidArgumentError("MeasureReadGbps: batch must be >= 1");
  Timer timer;
  TL_OK(timer.Init(repeats));
  int device = 0, sms = 0;
  TL_CUDA(cudaGetDevice(&device));
  TL_CUDA(cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device));
  const int blocks = 8 * std::max(1, sms);  // 8 x 256 threads per SM: full occupancy
  // Two buffers alternated, so that back-to-back reads do not find the last one's tail in L2.
  DeviceMem src, sink;
  TL_OK(src.Allocate(2 * bytes));
  TL_OK(sink.Allocate(blocks * sizeof(uint32_t)));
  TL_OK(FillRandomBf16(src.get(), bytes, 21, 1.f, timer.stream()));
  absl::StatusOr<double> us = timer.MedianUs(
      [&](int i) {
        for (int k = 0; k < batch; ++k) {
          const uint4* buf = src.get<const uint4>() + ((i * batch + k) % 2) * (bytes / 16);
          ReadKernel<<<blocks, 256, 0, timer.stream()>>>(buf, bytes / 16, sink.get<uint32_t>());
        }
        return CudaStatus(cudaGetLastError(), "ReadKernel launch");
      },
      3);
  if (!us.ok()) return us.status();
  return static_cast<double>(bytes) * batch / (*us * 1e3);
}

absl::StatusOr<double> MeasureGemmTflops(int64_t m, int64_t n, int64_t k, int repeats) {
  Timer timer;
  TL_OK(timer.Init(repeats));
  DeviceMem x, w, y, ws;
  TL_OK(x.Allocate(m * k * 2));
  TL_OK(w.Allocate(n * k * 2));
  TL_OK(y.Allocate(m * n * 2));
  TL_OK(ws.Allocate(32 << 20));
  TL_OK(FillRandomBf16(x.get(), m * k, 2, 1.f, timer.stream()));
  TL_OK(FillRandomBf16(w.get(), n * k, 3, 0.05f, timer.stream()));
  Cublas blas;
  TL_OK(blas.Init(timer.stream(), ws.get(), 32 << 20));
  absl::StatusOr<double> us =
      timer.MedianUs([&](int) { return blas.Linear(x.get(), w.get(), y.get(), m, n, k); }, 3);
  if (!us.ok()) return us.status();
  return 2.0 * m * n * k / (*us * 1e6);
}

absl::StatusOr<std::vector<DensePoint>> MeasureDenseLayers(const DenseModelShape& s,
                                                           const std::vector<int64_t>& tokens,
                                                           int repeats) {
  const int64_t qkv_n = s.num_heads * s.head_dim + 2 * s.num_kv_heads * s.head_dim;
  const int64_t o_k = s.num_heads * s.head_dim;
  // Two layers' weights, alternated, so that small-batch runs read weights from HBM as in a
  // real model (one layer's weights can nearly fit in L2 on an H200).
  constexpr int kLayerSets = 2;
  const int64_t w_elems =
      qkv_n * s.hidden + s.hidden * o_k + 2 * s.intermediate * s.hidden + s.hidden * s.intermediate;
  const int64_t max_t = tokens.empty() ? 1 : *std::max_element(tokens.begin(), tokens.end());
  Timer timer;
  TL_OK(timer.Init(repeats));
  DeviceMem w, x, big, out, ws;
  TL_OK(w.Allocate(kLayerSets * w_elems * 2));
  TL_OK(x.Allocate(max_t * std::max(s.hidden, o_k) * 2));
  TL_OK(big.Allocate(max_t * std::max(2 * s.intermediate, qkv_n) * 2));
  TL_OK(out.Allocate(max_t * std::max(s.hidden, s.intermediate) * 2));
  TL_OK(ws.Allocate(32 << 20));
  TL_OK(FillRandomBf16(w.get(), kLayerSets * w_elems, 5, 0.02f, timer.stream()));
  TL_OK(FillRandomBf16(x.get(), max_t * std::max(s.hidden, o_k), 6, 1.f, timer.stream()));
  TL_OK(FillRandomBf16(out.get(), max_t * std::max(s.hidden, s.intermediate), 7, 1.f,
                       timer.stream()));
  Cublas blas;
  TL_OK(blas.Init(timer.stream(), ws.get(), 32 << 20));
  std::vector<DensePoint> points;
  for (int64_t t : tokens) {
    auto layer = [&](int i) -> absl::Status {
      const uint16_t* wl = w.get<uint16_t>() + (i % kLayerSets) * w_elems;
      const uint16_t* w_qkv = wl;
      const uint16_t* w_o = w_qkv + qkv_n * s.hidden;
      const uint16_t* w_gu = w_o + s.hidden * o_k;
      const uint16_t* w_down = w_gu + 2 * s.intermediate * s.hidden;
      TL_OK(blas.Linear(x.get(), w_qkv, big.get(), t, qkv_n, s.hidden));
      TL_OK(blas.Linear(x.get(), w_o, big.get(), t, s.hidden, o_k));
      TL_OK(blas.Linear(x.get(), w_gu, big.get(), t, 2 * s.intermediate, s.hidden));
      // down reads the [t][intermediate] activation (random data in `out`).
      return blas.Linear(out.get(), w_down, x.get(), t, s.hidden, s.intermediate);
    };
    absl::StatusOr<double> us = timer.MedianUs(layer, 3);
    if (!us.ok()) return us.status();
    DensePoint p;
    p.tokens = t;
    p.ms = *us * s.num_layers / 1000.0;
    p.tflops = 2.0 * t * w_elems / (*us * 1e6);
    points.push_back(p);
  }
  return points;
}

absl::StatusOr<AttentionTiming> MeasurePagedAttention(const AttentionBenchShape& s, int repeats) {
  if (s.segment_tokens <= 0 || s.kv_tokens <= 0 || s.num_q_tokens <= 0) {
    return absl::InvalidArgumentError("MeasurePagedAttention: sizes must be > 0");
  }
  const int64_t num_segments = (s.kv_tokens + s.segment_tokens - 1) / s.segment_tokens;
  const int num_requests = std::max(1, s.num_requests);
  if (num_requests > 1 && (s.num_q_tokens != 1 || num_segments % num_requests != 0)) {
    return absl::InvalidArgumentError(
        "MeasurePagedAttention: a batched decode needs num_q_tokens = 1 and segments divisible "
        "by num_requests");
  }
  const int32_t q_tokens = num_requests > 1 ? num_requests : s.num_q_tokens;
  const int64_t block_elems = static_cast<int64_t>(s.segment_tokens) * s.num_kv_heads * s.head_dim;
  // Two KV sets (two layers) in one pooled arena; slots shuffled so segments are scattered.
  constexpr int kSets = 2;
  const int64_t num_slots = kSets * num_segments;
  Timer timer;
  TL_OK(timer.Init(repeats));
  DeviceMem arena, q, out, lse, out2, lse2, blocks;
  TL_OK(arena.Allocate(num_slots * 2 * block_elems * 2));
  TL_OK(FillRandomBf16(arena.get(), num_slots * 2 * block_elems, 11, 1.f, timer.stream()));
  const int64_t q_elems = static_cast<int64_t>(q_tokens) * s.num_heads * s.head_dim;
  const int64_t rows = static_cast<int64_t>(q_tokens) * s.num_heads;
  TL_OK(q.Allocate(q_elems * 2));
  TL_OK(FillRandomBf16(q.get(), q_elems, 12, 1.f, timer.stream()));
  TL_OK(out.Allocate(q_elems * 4));
  TL_OK(lse.Allocate(rows * 4));
  TL_OK(out2.Allocate(q_elems * 4));
  TL_OK(lse2.Allocate(rows * 4));
  std::vector<int64_t> perm(num_slots);
  std::iota(perm.begin(), perm.end(), 0);
  std::shuffle(perm.begin(), perm.end(), std::mt19937_64(13));
  std::vector<DeviceKvBlock> host_blocks(num_slots);
  for (int64_t i = 0; i < num_slots; ++i) {
    const uint16_t* slot = arena.get<uint16_t>() + perm[i] * 2 * block_elems;
    host_blocks[i].k = slot;
    host_blocks[i].v = slot + block_elems;
    const int64_t seg = i % num_segments;
    host_blocks[i].num_tokens = static_cast<int32_t>(
        std::min<int64_t>(s.segment_tokens, s.kv_tokens - seg * s.segment_tokens));
  }
  TL_OK(blocks.Allocate(num_slots * sizeof(DeviceKvBlock)));
  TL_CUDA(cudaMemcpy(blocks.get(), host_blocks.data(), num_slots * sizeof(DeviceKvBlock),
                     cudaMemcpyHostToDevice));
  PagedAttentionParams p;
  p.q = q.get();
  p.num_q_tokens = q_tokens;
  p.num_blocks = static_cast<int32_t>(num_segments);
  p.max_block_tokens = s.segment_tokens;
  p.num_heads = s.num_heads;
  p.num_kv_heads = s.num_kv_heads;
  p.head_dim = s.head_dim;
  p.causal = s.causal;
  p.out = out.get<float>();
  p.lse = lse.get<float>();
  p.num_splits = s.num_splits;
  p.prefill_warps = s.prefill_warps;
  p.decode_unroll = s.decode_unroll;
  p.decode_pipeline = s.decode_pipeline;
  p.prefill_rows_per_warp = s.prefill_rows_per_warp;
  p.prefill_kernel = s.prefill_kernel;
  p.decode_merge = s.decode_merge;
  p.decode_kernel = s.decode_kernel;
  p.decode_mma_stages = s.decode_mma_stages;
  p.decode_mma_descriptors = s.decode_mma_descriptors;
  p.pdl = s.pdl;
  p.blocks = blocks.get<DeviceKvBlock>();
  DeviceMem offsets;
  if (num_requests > 1) {
    std::vector<int32_t> off(num_requests + 1);
    for (int r = 0; r <= num_requests; ++r) {
      off[r] = static_cast<int32_t>(r * (num_segments / num_requests));
    }
    TL_OK(offsets.Allocate(off.size() * sizeof(int32_t)));
    TL_CUDA(cudaMemcpy(offsets.get(), off.data(), off.size() * sizeof(int32_t),
                       cudaMemcpyHostToDevice));
    p.q_block_offsets = offsets.get<const int32_t>();
  }
  const auto kernel = static_cast<AttentionKernel>(s.kernel);
  absl::StatusOr<size_t> ws_bytes = PagedAttentionWorkspaceBytes(p, kernel);
  if (!ws_bytes.ok()) return ws_bytes.status();
  DeviceMem ws;
  TL_OK(ws.Allocate(*ws_bytes));
  // The counter bytes at the front must start at zero (paged_attention.h); calls keep them so.
  if (*ws_bytes > 0) TL_CUDA(cudaMemsetAsync(ws.get(), 0, *ws_bytes, timer.stream()));
  p.workspace = ws.get();
  p.workspace_bytes = *ws_bytes;
  absl::StatusOr<double> us = timer.MedianUs(
      [&](int i) {
        PagedAttentionParams pi = p;
        pi.blocks = blocks.get<DeviceKvBlock>() + (i % kSets) * num_segments;
        return PagedAttention(pi, kernel, timer.stream());
      },
      5);
  if (!us.ok()) return us.status();
  // Back to back, as an engine issues one call per layer: kBatch calls (the KV sets alternated)
  // between two events.
  constexpr int kBatch = 10;
  absl::StatusOr<double> batched_us = timer.MedianUs(
      [&](int i) {
        for (int k = 0; k < kBatch; ++k) {
          PagedAttentionParams pi = p;
          pi.blocks = blocks.get<DeviceKvBlock>() + ((i * kBatch + k) % kSets) * num_segments;
          TL_OK(PagedAttention(pi, kernel, timer.stream()));
        }
        return absl::OkStatus();
      },
      1);
  if (!batched_us.ok()) return batched_us.status();
  // A second output to merge with (any valid partial will do). Merges are timed in batches of
  // kMergeBatch back-to-back launches (a lone tiny launch measures the event overhead).
  constexpr int kMergeBatch = 20;
  TL_CUDA(cudaMemcpyAsync(out2.get(), out.get(), q_elems * 4, cudaMemcpyDeviceToDevice,
                          timer.stream()));
  TL_CUDA(
      cudaMemcpyAsync(lse2.get(), lse.get(), rows * 4, cudaMemcpyDeviceToDevice, timer.stream()));
  absl::StatusOr<double> merge_us = timer.MedianUs(
      [&](int) {
        for (int k = 0; k < kMergeBatch; ++k) {
          TL_OK(MergePartials(out.get<float>(), lse.get<float>(), out2.get<float>(),
                              lse2.get<float>(), rows, s.head_dim, timer.stream()));
        }
        return absl::OkStatus();
      },
      3);
  if (!merge_us.ok()) return merge_us.status();
  AttentionTiming t;
  t.us = *us;
  t.batched_us = *batched_us / kBatch;
  t.merge_us = *merge_us / kMergeBatch;
  double pairs = static_cast<double>(s.num_q_tokens) * static_cast<double>(s.kv_tokens);
  // (A batched decode: each request's token sees its own share, kv_tokens in all.)
  if (s.causal) {
    // Query i sees keys 0..i (q_start_pos = 0), capped at kv_tokens.
    pairs = 0;
    for (int64_t i = 0; i < s.num_q_tokens; ++i) pairs += std::min<int64_t>(i + 1, s.kv_tokens);
  }
  t.tflops = 4.0 * pairs * s.num_heads * s.head_dim / (t.us * 1e6);
  const double kv_bytes = 2.0 * s.kv_tokens * s.num_kv_heads * s.head_dim * 2;
  t.kv_gbps = kv_bytes / (t.us * 1e3);
  t.batched_kv_gbps = kv_bytes / (t.batched_us * 1e3);
  return t;
}

absl::StatusOr<std::string> MeasureGpuProfileJson(const std::vector<int64_t>& dense_tokens,
                                                  int repeats) {
  auto fail = [](const char* what, const absl::Status& s) {
    return absl::Status(s.code(), absl::StrFormat("%s: %s", what, s.message()));
  };
  auto dev = DescribeDevice();
  if (!dev.ok()) return fail("device", dev.status());
  std::fprintf(stderr, "tokenlake profile: measuring %s (%d SMs, %.1f GiB)\n", dev->name.c_str(),
               dev->num_sms, dev->memory_bytes / double(1 << 30));
  // Attention first: measured after the long GEMM runs it came out ~20% slower (clocks).
  AttentionBenchShape prefill;
  prefill.num_q_tokens = 1024;
  prefill.kernel = 1;
  auto pre = MeasurePagedAttention(prefill, 20);
  if (!pre.ok()) return fail("attention prefill", pre.status());
  AttentionBenchShape decode;
  decode.num_q_tokens = 1;
  decode.kernel = 2;
  auto dec = MeasurePagedAttention(decode, 50);
  if (!dec.ok()) return fail("attention decode", dec.status());

  auto copy = MeasureCopyGbps(size_t{1} << 30, 20);
  if (!copy.ok()) return fail("copy bandwidth", copy.status());
  auto gemm = MeasureGemmTflops(8192, 8192, 8192, 20);
  if (!gemm.ok()) return fail("gemm", gemm.status());
  auto dense = MeasureDenseLayers(DenseModelShape{}, dense_tokens, repeats);
  if (!dense.ok()) return fail("dense layers", dense.status());
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
  return j.dump(2);
}

}  // namespace tokenlake::profile
