#include <cublas_v2.h>
#include <cuda_bf16.h>

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstring>
#include <functional>
#include <utility>
#include <vector>

#include "absl/strings/str_format.h"
#include "tokenlake/attention/cuda/pdl.cuh"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/gpu_llama.h"
#include "tokenlake/engine/cuda/small_batch_gemm.h"
#include "tokenlake/engine/ops.h"

namespace tokenlake::engine::cuda {

struct GpuLlamaModel::Layer {
  DeviceBuffer input_norm;  // [hidden] f32
  DeviceBuffer wqkv;        // [qd + 2 kvd][hidden] bf16 (q_proj, k_proj, v_proj rows)
  DeviceBuffer wo;          // [hidden][qd] bf16
  DeviceBuffer post_norm;   // [hidden] f32
  DeviceBuffer wgu;         // [2 inter][hidden] bf16 (gate_proj, up_proj rows)
  DeviceBuffer wdown;       // [hidden][inter] bf16
};

namespace {

using attention::cuda::GridDependencyWait;
using attention::cuda::GridDependentsLaunch;

constexpr int kThreads = 256;
constexpr int kNormThreads = 512;     // RmsNormKernel's block (at most 1024)
constexpr int kArgmaxThreads = 1024;  // ArgmaxKernel's block (a power of two)

__device__ __forceinline__ float Bf16Bits(uint16_t bits) {
  return __uint_as_float(static_cast<uint32_t>(bits) << 16);
}
__device__ __forceinline__ uint16_t ToBf16Bits(float x) {
  return __bfloat16_as_ushort(__float2bfloat16_rn(x));
}
// Two values as bf16 bits in one word, lo in the low half (the order of memory).
__device__ __forceinline__ uint32_t Bf16Pair(float lo, float hi) {
  return ToBf16Bits(lo) | (static_cast<uint32_t>(ToBf16Bits(hi)) << 16);
}
__device__ __forceinline__ float SiluMul(float g, float u) { return g / (1.0f + expf(-g)) * u; }

// The forward's small kernels take part in programmatic dependent launch (pdl.cuh, set_pdl):
// they let the next kernel be scheduled at once and wait for the previous one before touching
// anything (they have nothing worth loading before).
__device__ __forceinline__ void PdlPrologue() {
  GridDependentsLaunch();
  GridDependencyWait();
}

__global__ void EmbedKernel(const int32_t* __restrict__ tokens, const uint16_t* __restrict__ embed,
                            int hidden, float* __restrict__ x) {
  PdlPrologue();
  const int t = blockIdx.x;
  const uint16_t* row = embed + static_cast<int64_t>(tokens[t]) * hidden;
#pragma unroll 8
  for (int i = threadIdx.x; i < hidden; i += blockDim.x) {
    x[static_cast<int64_t>(t) * hidden + i] = Bf16Bits(row[i]);
  }
}

// y = w * (x / sqrt(mean(x^2) + eps)), one thread block per output row r, reading row
// rows[r] of x (row r when rows is null); y rounded to bf16. Rows of up to 16 elements per
// thread (a multiple of 4) stay in registers as float4s between the sum and the scaling, and
// the weights, which no kernel writes, are loaded before waiting for the kernel before this one
// (PDL): after the wait a row costs one load of x and one store. Other rows take the plain loop.
constexpr int kNormVec = 4;  // float4s per thread

__device__ __forceinline__ float BlockSum(float sum) {
  __shared__ float partial[32];
  for (int off = 16; off > 0; off >>= 1) sum += __shfl_xor_sync(0xffffffffu, sum, off);
  if (threadIdx.x % 32 == 0) partial[threadIdx.x / 32] = sum;
  __syncthreads();
  float total = 0.f;
  for (int i = 0; i < static_cast<int>(blockDim.x / 32); ++i) total += partial[i];
  return total;
}

__global__ void __launch_bounds__(kNormThreads)
    RmsNormKernel(const float* __restrict__ x, const float* __restrict__ w, float eps, int hidden,
                  const int32_t* __restrict__ rows, uint16_t* __restrict__ y) {
  GridDependentsLaunch();
  const int64_t r = blockIdx.x;
  const int tid = static_cast<int>(threadIdx.x);
  const int stride = static_cast<int>(blockDim.x);
  if (hidden % 4 == 0 && hidden <= stride * 4 * kNormVec) {
    const int vecs = hidden / 4;
    float4 wv[kNormVec];
#pragma unroll
    for (int k = 0; k < kNormVec; ++k) {
      const int i = tid + k * stride;
      if (i < vecs) wv[k] = __ldg(reinterpret_cast<const float4*>(w) + i);
    }
    GridDependencyWait();
    const float4* xr = reinterpret_cast<const float4*>(
        x + (rows != nullptr ? static_cast<int64_t>(rows[r]) : r) * hidden);
    float4 xv[kNormVec];
    float sum = 0.f;
#pragma unroll
    for (int k = 0; k < kNormVec; ++k) {
      const int i = tid + k * stride;
      if (i < vecs) {
        xv[k] = xr[i];
        sum += xv[k].x * xv[k].x + xv[k].y * xv[k].y + xv[k].z * xv[k].z + xv[k].w * xv[k].w;
      }
    }
    const float inv = 1.0f / sqrtf(BlockSum(sum) / static_cast<float>(hidden) + eps);
    uint2* yr = reinterpret_cast<uint2*>(y + r * hidden);
#pragma unroll
    for (int k = 0; k < kNormVec; ++k) {
      const int i = tid + k * stride;
      if (i < vecs) {
        yr[i] = make_uint2(Bf16Pair(wv[k].x * (xv[k].x * inv), wv[k].y * (xv[k].y * inv)),
                           Bf16Pair(wv[k].z * (xv[k].z * inv), wv[k].w * (xv[k].w * inv)));
      }
    }
    return;
  }
  GridDependencyWait();
  const float* xr = x + (rows != nullptr ? static_cast<int64_t>(rows[r]) : r) * hidden;
  float sum = 0.f;
#pragma unroll 8
  for (int i = tid; i < hidden; i += stride) sum += xr[i] * xr[i];
  const float inv = 1.0f / sqrtf(BlockSum(sum) / static_cast<float>(hidden) + eps);
#pragma unroll 8
  for (int i = tid; i < hidden; i += stride) y[r * hidden + i] = ToBf16Bits(w[i] * (xr[i] * inv));
}

// qkv [n][qd + 2 kvd] f32 -> q [n][qd], k [n][kvd] (RoPE at positions[t], rotate-half) and
// v [n][kvd], bf16. Grid (n, parts): block (t, y) takes token t's heads y, y + parts, ...
// (the q heads, then the k heads, then the v heads), so that a few tokens still spread over
// the device.
__global__ void RopeSplitKernel(const float* __restrict__ qkv, const float* __restrict__ inv_freq,
                                const int32_t* __restrict__ positions, int num_heads,
                                int num_kv_heads, int head_dim, uint16_t* __restrict__ q,
                                uint16_t* __restrict__ k, uint16_t* __restrict__ v) {
  GridDependentsLaunch();
  const int t = blockIdx.x;
  const int half = head_dim / 2;
  const int qd = num_heads * head_dim;
  const int kvd = num_kv_heads * head_dim;
  const float* row = qkv + static_cast<int64_t>(t) * (qd + 2 * kvd);
  const float pos = static_cast<float>(positions[t]);
  // cos and sin of each frequency once per token (in double, as engine/ops.cc), shared by the
  // heads: they are most of this kernel's work otherwise. The positions come from the forward's
  // input copy, which precedes its first kernel, so this runs before waiting for the kernel
  // before this one (PDL), under its tail.
  __shared__ float cos_sin[2 * 64];
  for (int i = threadIdx.x; i < half; i += blockDim.x) {
    const double angle = static_cast<double>(pos * inv_freq[i]);
    cos_sin[2 * i] = static_cast<float>(cos(angle));
    cos_sin[2 * i + 1] = static_cast<float>(sin(angle));
  }
  __syncthreads();
  GridDependencyWait();
  const int rotated = num_heads + num_kv_heads;
  const int parts = static_cast<int>(gridDim.y);
  const int mine = (rotated + num_kv_heads - static_cast<int>(blockIdx.y) + parts - 1) / parts;
  const int per_head = half;  // rotated pairs, or v element pairs, of one head
  for (int idx = threadIdx.x; idx < mine * per_head; idx += blockDim.x) {
    const int head = static_cast<int>(blockIdx.y) + (idx / per_head) * parts;
    const int i = idx % per_head;
    const float* src = row + head * head_dim;  // k heads follow q heads, v heads follow k heads
    if (head >= rotated) {
      uint16_t* dst = v + static_cast<int64_t>(t) * kvd + (head - rotated) * head_dim;
      dst[i] = ToBf16Bits(src[i]);
      dst[i + half] = ToBf16Bits(src[i + half]);
      continue;
    }
    const float c = cos_sin[2 * i];
    const float s = cos_sin[2 * i + 1];
    const float a = src[i];
    const float b = src[i + half];
    uint16_t* dst = head < num_heads
                        ? q + static_cast<int64_t>(t) * qd + head * head_dim
                        : k + static_cast<int64_t>(t) * kvd + (head - num_heads) * head_dim;
    dst[i] = ToBf16Bits(a * c - b * s);
    dst[i + half] = ToBf16Bits(b * c + a * s);
  }
}

// gate_up [n][2 inter] f32 -> silu(gate) * up [n][inter] bf16.
__global__ void SiluMulKernel(const float* __restrict__ gate_up, int64_t n, int inter,
                              uint16_t* __restrict__ out) {
  PdlPrologue();
  const int64_t stride = static_cast<int64_t>(gridDim.x) * blockDim.x;
  const int64_t first = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x;
  if (inter % 4 == 0) {  // four outputs a thread: 16-byte loads, an 8-byte store
    const int quads = inter / 4;
    const int64_t total = n * quads;
    for (int64_t idx = first; idx < total; idx += stride) {
      const int64_t t = idx / quads;
      const int64_t j = idx % quads;
      const float4 g = reinterpret_cast<const float4*>(gate_up + t * 2 * inter)[j];
      const float4 u = reinterpret_cast<const float4*>(gate_up + t * 2 * inter + inter)[j];
      reinterpret_cast<uint2*>(out + t * inter)[j] =
          make_uint2(Bf16Pair(SiluMul(g.x, u.x), SiluMul(g.y, u.y)),
                     Bf16Pair(SiluMul(g.z, u.z), SiluMul(g.w, u.w)));
    }
    return;
  }
  const int64_t total = n * inter;
  for (int64_t idx = first; idx < total; idx += stride) {
    const int64_t t = idx / inter;
    const int64_t j = idx % inter;
    const float g = gate_up[t * 2 * inter + j];
    const float u = gate_up[t * 2 * inter + inter + j];
    out[idx] = ToBf16Bits(SiluMul(g, u));
  }
}

// in [n] f32 -> out [n] bf16, four elements a thread (16-byte loads, 8-byte stores). n is a
// multiple of 4 (rows x num_heads x head_dim, head_dim a multiple of 16); in and out are the
// starts of allocations.
__global__ void ToBf16Kernel(const float* __restrict__ in, int64_t n, uint16_t* __restrict__ out) {
  PdlPrologue();
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n / 4;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    const float4 x = reinterpret_cast<const float4*>(in)[i];
    reinterpret_cast<uint2*>(out)[i] = make_uint2(Bf16Pair(x.x, x.y), Bf16Pair(x.z, x.w));
  }
}

// The first index of the maximum of row blockIdx.x of x [rows][n] (as engine::Argmax) into
// out[blockIdx.x]. One thread block of kArgmaxThreads per row, its loads unrolled (a row is a
// whole vocabulary, read by one multiprocessor).
__global__ void __launch_bounds__(kArgmaxThreads)
    ArgmaxKernel(const float* __restrict__ x_rows, int n, int32_t* __restrict__ out) {
  PdlPrologue();
  const float* x = x_rows + static_cast<int64_t>(blockIdx.x) * n;
  float best = -INFINITY;
  int best_i = n;
#pragma unroll 8
  for (int i = threadIdx.x; i < n; i += blockDim.x) {
    if (x[i] > best || (x[i] == best && i < best_i)) {
      best = x[i];
      best_i = i;
    }
  }
  __shared__ float sv[kArgmaxThreads];
  __shared__ int si[kArgmaxThreads];
  sv[threadIdx.x] = best;
  si[threadIdx.x] = best_i;
  __syncthreads();
  for (int off = kArgmaxThreads / 2; off > 0; off >>= 1) {
    if (static_cast<int>(threadIdx.x) < off) {
      const float ov = sv[threadIdx.x + off];
      const int oi = si[threadIdx.x + off];
      if (ov > sv[threadIdx.x] || (ov == sv[threadIdx.x] && oi < si[threadIdx.x])) {
        sv[threadIdx.x] = ov;
        si[threadIdx.x] = oi;
      }
    }
    __syncthreads();
  }
  if (threadIdx.x == 0) out[blockIdx.x] = si[0] < n ? si[0] : 0;
}

__device__ __forceinline__ float HashUniform(uint64_t seed, uint64_t i) {
  uint64_t z = seed + 0x9E3779B97F4A7C15ull * (i + 1);
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  z ^= z >> 31;
  return static_cast<float>(z >> 40) * (2.0f / 16777216.0f) - 1.0f;  // [-1, 1)
}

__global__ void RandomBf16Kernel(uint16_t* out, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = ToBf16Bits(scale * HashUniform(seed, static_cast<uint64_t>(i)));
  }
}

__global__ void RandomNormKernel(float* out, int64_t n, uint64_t seed, float scale) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    out[i] = 1.0f + scale * HashUniform(seed, static_cast<uint64_t>(i));
  }
}

unsigned GridFor(int64_t n) {
  const int64_t blocks = (n + kThreads - 1) / kThreads;
  return static_cast<unsigned>(blocks < 4096 ? (blocks > 0 ? blocks : 1) : 4096);
}

absl::Status CublasStatus(cublasStatus_t st, const char* what) {
  if (st == CUBLAS_STATUS_SUCCESS) return absl::OkStatus();
  return absl::InternalError(absl::StrFormat("%s: cuBLAS status %d", what, static_cast<int>(st)));
}

absl::Status LaunchCheck(const char* what) { return CudaStatus(cudaGetLastError(), what); }

// kernel<<<grid, block, 0, stream>>>(args...), PDL-launched when `pdl`; errors name `what`.
template <typename... Params, typename... Args>
absl::Status Launch(const char* what, bool pdl, void (*kernel)(Params...), dim3 grid, dim3 block,
                    cudaStream_t stream, Args... args) {
  return CudaStatus(attention::cuda::LaunchKernel(pdl, kernel, grid, block, 0, stream, args...),
                    what);
}

// The rows a graph-replayed forward of n rows runs its dense stretches over (a batch-size bucket:
// exact up to 8 rows, then multiples of 8 up to 64 and of 32 up to kGraphMaxRows), or 0 when
// forwards of n rows are not replayed. A forward padded to its bucket computes the extra rows on
// token 0 at position 0 and drops them (every kernel of a stretch is row-wise), so one graph
// serves the bucket's every batch size; a padded GEMM costs about the same as the exact one,
// since at these sizes it is bound by reading the weights.
int32_t GraphRows(int32_t n) {
  if (n <= 8) return n;
  if (n <= 64) return (n + 7) / 8 * 8;
  if (n <= GpuLlamaModel::kGraphMaxRows) return (n + 31) / 32 * 32;
  return 0;
}

// y[n][out] (f32) = x[n][in] (bf16) * w[out][in]^T (bf16) + beta * y. Row-major on our side is
// column-major transposed on cuBLAS's: y^T (out x n) = w (out x in, ld in)^T... see below.
absl::Status Gemm(cublasHandle_t h, const void* w, const void* x, float* y, int n, int in, int out,
                  float beta) {
  const float alpha = 1.0f;
  // Column-major: W is (in x out) with ld in, X is (in x n) with ld in, Y is (out x n), ld out.
  // Y = W^T X.
  return CublasStatus(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, out, n, in, &alpha, w, CUDA_R_16BF,
                                   in, x, CUDA_R_16BF, in, &beta, y, CUDA_R_32F, out,
                                   CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT),
                      "cublasGemmEx");
}

absl::Status UploadF32(const std::vector<float>& v, DeviceBuffer* dst) {
  TOKENLAKE_RETURN_IF_ERROR(dst->Allocate(v.size() * sizeof(float)));
  return CudaStatus(
      cudaMemcpy(dst->get(), v.data(), v.size() * sizeof(float), cudaMemcpyHostToDevice),
      "cudaMemcpy(weights)");
}

double SecondsSince(std::chrono::steady_clock::time_point from) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - from).count();
}

absl::Status CheckConfig(const LlamaConfig& c) {
  if (c.vocab_size <= 0 || c.hidden_size <= 0 || c.intermediate_size <= 0 || c.num_layers <= 0 ||
      c.num_heads <= 0 || c.num_kv_heads <= 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("GpuLlamaModel: config sizes must be > 0 (vocab_size %d, hidden_size %d, "
                        "intermediate_size %d, num_layers %d, num_heads %d, num_kv_heads %d)",
                        c.vocab_size, c.hidden_size, c.intermediate_size, c.num_layers, c.num_heads,
                        c.num_kv_heads));
  }
  if (c.num_heads % c.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("GpuLlamaModel: num_heads %d is not a multiple of num_kv_heads %d",
                        c.num_heads, c.num_kv_heads));
  }
  if (c.head_dim != 16 && c.head_dim != 32 && c.head_dim != 64 && c.head_dim != 128) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "GpuLlamaModel: head_dim %d is not supported on the GPU (16, 32, 64 or 128)", c.head_dim));
  }
  return absl::OkStatus();
}

}  // namespace

GpuLlamaModel::GpuLlamaModel(const LlamaConfig& config, int device)
    : config_(config), device_(device) {}

GpuLlamaModel::~GpuLlamaModel() {
  if (stream_ != nullptr) cudaStreamSynchronize(stream_);
  ClearGraphs();
  if (host_inputs_ != nullptr) cudaFreeHost(host_inputs_);
  for (auto& m : marks_) cudaEventDestroy(m.first);
  if (forward_begin_ != nullptr) cudaEventDestroy(forward_begin_);
  if (forward_end_ != nullptr) cudaEventDestroy(forward_end_);
  if (cublas_ != nullptr) cublasDestroy(static_cast<cublasHandle_t>(cublas_));
  if (stream_ != nullptr) cudaStreamDestroy(stream_);
}

absl::Status GpuLlamaModel::Init() {
  TOKENLAKE_RETURN_IF_ERROR(CheckConfig(config_));
  if (device_ < 0) {
    return absl::InvalidArgumentError(absl::StrFormat("GpuLlamaModel: device %d < 0", device_));
  }
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess || count == 0) {
    cudaGetLastError();
    return absl::FailedPreconditionError("GpuLlamaModel: no CUDA device");
  }
  if (device_ >= count) {
    return absl::FailedPreconditionError(
        absl::StrFormat("GpuLlamaModel: device %d, but only %d CUDA devices", device_, count));
  }
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
  TOKENLAKE_RETURN_IF_ERROR(
      CudaStatus(cudaStreamCreateWithFlags(&stream_, cudaStreamNonBlocking), "cudaStreamCreate"));
  cublasHandle_t h = nullptr;
  TOKENLAKE_RETURN_IF_ERROR(CublasStatus(cublasCreate(&h), "cublasCreate"));
  cublas_ = h;
  TOKENLAKE_RETURN_IF_ERROR(CublasStatus(cublasSetStream(h, stream_), "cublasSetStream"));
  // A workspace of our own: cuBLAS calls captured into graphs must not allocate one per graph.
  TOKENLAKE_RETURN_IF_ERROR(cublas_workspace_.Allocate(kCublasWorkspaceBytes));
  TOKENLAKE_RETURN_IF_ERROR(CublasStatus(
      cublasSetWorkspace(h, cublas_workspace_.get(), kCublasWorkspaceBytes), "cublasSetWorkspace"));
  TOKENLAKE_ASSIGN_OR_RETURN(decode_gemm_workspace_, DecodeGemmWorkspace::Create(device_));
  graphs_.assign(static_cast<size_t>(config_.num_layers + 1) * (kGraphMaxRows + 1), nullptr);
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&forward_begin_), "cudaEventCreate"));
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaEventCreate(&forward_end_), "cudaEventCreate"));
  layers_.resize(static_cast<size_t>(config_.num_layers));
  TOKENLAKE_RETURN_IF_ERROR(
      UploadF32(RopeInvFreq(config_.head_dim, config_.rope_theta), &inv_freq_));
  return absl::OkStatus();
}

absl::StatusOr<std::unique_ptr<GpuLlamaModel>> GpuLlamaModel::Load(const std::string& dir,
                                                                   const Options& options) {
  const auto start = std::chrono::steady_clock::now();
  TOKENLAKE_ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig(dir + "/config.json"));
  TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(dir));
  const double open_seconds = SecondsSince(start);
  TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<GpuLlamaModel> m,
                             FromCheckpoint(config, *checkpoint, options));
  m->load_stats_.open_seconds = open_seconds;
  m->load_stats_.total_seconds = SecondsSince(start);
  return m;
}

absl::StatusOr<std::unique_ptr<GpuLlamaModel>> GpuLlamaModel::FromSafetensors(
    const LlamaConfig& config, const SafetensorsFile& file, const Options& options) {
  return FromCheckpoint(config, *Checkpoint::Borrow(file), options);
}

int64_t GpuLlamaModel::WeightDeviceBytes(const LlamaConfig& config) {
  const int64_t h = config.hidden_size;
  const int64_t qd = int64_t{config.num_heads} * config.head_dim;
  const int64_t kvd = int64_t{config.num_kv_heads} * config.head_dim;
  const int64_t inter = config.intermediate_size;
  const int64_t vocab = config.vocab_size;
  const int64_t per_layer = 2 * h * 4 + ((qd + 2 * kvd) * h + h * qd + 3 * inter * h) * 2;
  return vocab * h * 2 * (config.tie_word_embeddings ? 1 : 2) + h * 4 +
         per_layer * config.num_layers;
}

absl::StatusOr<std::unique_ptr<GpuLlamaModel>> GpuLlamaModel::FromCheckpoint(
    const LlamaConfig& config, const Checkpoint& checkpoint, const Options& options) {
  const auto start = std::chrono::steady_clock::now();
  std::unique_ptr<GpuLlamaModel> m(new GpuLlamaModel(config, options.device));
  TOKENLAKE_RETURN_IF_ERROR(m->Init());
  LoadStats& stats = m->load_stats_;
  stats.init_seconds = SecondsSince(start);
  stats.checkpoint_bytes = checkpoint.total_bytes();
  stats.shards = static_cast<int32_t>(checkpoint.shards().size());

  // Every tensor present, well-shaped and of a float dtype before any weight is allocated.
  const std::vector<LlamaTensorSpec> specs = LlamaCheckpointTensors(config);
  std::vector<const CheckpointTensor*> found;
  for (const LlamaTensorSpec& spec : specs) {
    TOKENLAKE_ASSIGN_OR_RETURN(const CheckpointTensor* t,
                               checkpoint.FindFloat(spec.name, spec.shape));
    found.push_back(t);
  }

  // The device layout: buffer and element offset of every checkpoint tensor.
  const int64_t h = config.hidden_size;
  const int64_t qd = int64_t{config.num_heads} * config.head_dim;
  const int64_t kvd = int64_t{config.num_kv_heads} * config.head_dim;
  const int64_t inter = config.intermediate_size;
  const int64_t vocab = config.vocab_size;
  struct Destination {
    DeviceBuffer* buffer;
    int64_t offset;  // elements
  };
  auto destination = [&](const LlamaTensorSpec& spec) -> Destination {
    Layer* w = spec.layer >= 0 ? &m->layers_[static_cast<size_t>(spec.layer)] : nullptr;
    switch (spec.weight) {
      case LlamaWeight::kEmbed:
        return {&m->embed_, 0};
      case LlamaWeight::kInputNorm:
        return {&w->input_norm, 0};
      case LlamaWeight::kQ:
        return {&w->wqkv, 0};
      case LlamaWeight::kK:
        return {&w->wqkv, qd * h};
      case LlamaWeight::kV:
        return {&w->wqkv, (qd + kvd) * h};
      case LlamaWeight::kO:
        return {&w->wo, 0};
      case LlamaWeight::kPostNorm:
        return {&w->post_norm, 0};
      case LlamaWeight::kGate:
        return {&w->wgu, 0};
      case LlamaWeight::kUp:
        return {&w->wgu, inter * h};
      case LlamaWeight::kDown:
        return {&w->wdown, 0};
      case LlamaWeight::kFinalNorm:
        return {&m->final_norm_, 0};
      case LlamaWeight::kLmHead:
        return {&m->lm_head_, 0};
    }
    return {nullptr, 0};
  };
  // Buffer sizes in bytes (bf16 matrices, f32 norms).
  std::vector<std::pair<DeviceBuffer*, int64_t>> sizes = {{&m->embed_, vocab * h * 2},
                                                          {&m->final_norm_, h * 4}};
  if (!config.tie_word_embeddings) sizes.push_back({&m->lm_head_, vocab * h * 2});
  for (Layer& w : m->layers_) {
    sizes.push_back({&w.input_norm, h * 4});
    sizes.push_back({&w.wqkv, (qd + 2 * kvd) * h * 2});
    sizes.push_back({&w.wo, h * qd * 2});
    sizes.push_back({&w.post_norm, h * 4});
    sizes.push_back({&w.wgu, 2 * inter * h * 2});
    sizes.push_back({&w.wdown, h * inter * 2});
  }
  const auto alloc_start = std::chrono::steady_clock::now();
  for (const auto& [buffer, bytes] : sizes) stats.device_bytes += bytes;
  size_t free_bytes = 0, total_bytes = 0;
  if (cudaMemGetInfo(&free_bytes, &total_bytes) == cudaSuccess &&
      static_cast<size_t>(stats.device_bytes) > free_bytes) {
    return absl::ResourceExhaustedError(absl::StrFormat(
        "GpuLlamaModel: the weights need %d bytes (%.2f GiB) of device memory; device %d has "
        "%d bytes (%.2f GiB) free of %.2f GiB",
        stats.device_bytes, stats.device_bytes / 1073741824.0, options.device, free_bytes,
        free_bytes / 1073741824.0, total_bytes / 1073741824.0));
  }
  cudaGetLastError();
  for (const auto& [buffer, bytes] : sizes) {
    absl::Status s = buffer->Allocate(static_cast<size_t>(bytes));
    if (!s.ok()) {
      return absl::Status(s.code(), absl::StrFormat("GpuLlamaModel: allocating the weights (%d "
                                                    "bytes in all): %s",
                                                    stats.device_bytes, s.message()));
    }
  }
  stats.allocate_seconds = SecondsSince(alloc_start);

  std::vector<UploadTensor> uploads;
  for (size_t i = 0; i < specs.size(); ++i) {
    const Destination d = destination(specs[i]);
    const TensorDtype dst_dtype = specs[i].is_norm() ? TensorDtype::kF32 : TensorDtype::kBF16;
    uploads.push_back(
        {.name = specs[i].name,
         .src = checkpoint.Data(*found[i]),
         .src_dtype = found[i]->info->dtype,
         .dst = static_cast<char*>(d.buffer->get()) + d.offset * TensorDtypeBytes(dst_dtype),
         .dst_dtype = dst_dtype});
  }
  const auto upload_start = std::chrono::steady_clock::now();
  TOKENLAKE_ASSIGN_OR_RETURN(stats.upload, UploadTensors(uploads, options.device, options.upload));
  stats.upload_seconds = SecondsSince(upload_start);
  stats.total_seconds = SecondsSince(start);
  return m;
}

absl::StatusOr<std::unique_ptr<GpuLlamaModel>> GpuLlamaModel::CreateRandom(
    const LlamaConfig& config, uint64_t seed, float scale, const Options& options) {
  std::unique_ptr<GpuLlamaModel> m(new GpuLlamaModel(config, options.device));
  TOKENLAKE_RETURN_IF_ERROR(m->Init());
  const int64_t h = config.hidden_size;
  const int64_t qd = int64_t{config.num_heads} * config.head_dim;
  const int64_t kvd = int64_t{config.num_kv_heads} * config.head_dim;
  const int64_t inter = config.intermediate_size;
  const int64_t vocab = config.vocab_size;
  uint64_t stream_id = 0;
  auto bf16 = [&](DeviceBuffer* b, int64_t n) -> absl::Status {
    TOKENLAKE_RETURN_IF_ERROR(b->Allocate(static_cast<size_t>(n) * 2));
    RandomBf16Kernel<<<GridFor(n), kThreads, 0, m->stream_>>>(b->as<uint16_t>(), n,
                                                              seed * 1000003 + ++stream_id, scale);
    return LaunchCheck("random weights");
  };
  auto norm = [&](DeviceBuffer* b, int64_t n) -> absl::Status {
    TOKENLAKE_RETURN_IF_ERROR(b->Allocate(static_cast<size_t>(n) * 4));
    RandomNormKernel<<<GridFor(n), kThreads, 0, m->stream_>>>(b->as<float>(), n,
                                                              seed * 1000003 + ++stream_id, 0.1f);
    return LaunchCheck("random weights");
  };
  TOKENLAKE_RETURN_IF_ERROR(bf16(&m->embed_, vocab * h));
  for (Layer& w : m->layers_) {
    TOKENLAKE_RETURN_IF_ERROR(norm(&w.input_norm, h));
    TOKENLAKE_RETURN_IF_ERROR(bf16(&w.wqkv, (qd + 2 * kvd) * h));
    TOKENLAKE_RETURN_IF_ERROR(bf16(&w.wo, h * qd));
    TOKENLAKE_RETURN_IF_ERROR(norm(&w.post_norm, h));
    TOKENLAKE_RETURN_IF_ERROR(bf16(&w.wgu, 2 * inter * h));
    TOKENLAKE_RETURN_IF_ERROR(bf16(&w.wdown, h * inter));
  }
  TOKENLAKE_RETURN_IF_ERROR(norm(&m->final_norm_, h));
  if (!config.tie_word_embeddings) TOKENLAKE_RETURN_IF_ERROR(bf16(&m->lm_head_, vocab * h));
  TOKENLAKE_RETURN_IF_ERROR(
      CudaStatus(cudaStreamSynchronize(m->stream_), "CreateRandom: synchronize"));
  return m;
}

absl::Status GpuLlamaModel::EnsureActivations(int32_t n, int32_t m) {
  if (n <= act_tokens_ && m <= act_logits_) return absl::OkStatus();
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "synchronize"));
  ClearGraphs();  // they name the buffers reallocated below
  const size_t h = static_cast<size_t>(config_.hidden_size);
  const size_t vocab = static_cast<size_t>(config_.vocab_size);
  if (n > act_tokens_) {
    const size_t qd = static_cast<size_t>(config_.num_heads) * config_.head_dim;
    const size_t kvd = static_cast<size_t>(config_.num_kv_heads) * config_.head_dim;
    const size_t inter = static_cast<size_t>(config_.intermediate_size);
    const size_t nn = static_cast<size_t>(n);
    TOKENLAKE_RETURN_IF_ERROR(x_.Allocate(nn * h * 4));
    TOKENLAKE_RETURN_IF_ERROR(normed_.Allocate(nn * h * 2));
    TOKENLAKE_RETURN_IF_ERROR(qkv_.Allocate(nn * (qd + 2 * kvd) * 4));
    TOKENLAKE_RETURN_IF_ERROR(q_.Allocate(nn * qd * 2));
    TOKENLAKE_RETURN_IF_ERROR(k_.Allocate(nn * kvd * 2));
    TOKENLAKE_RETURN_IF_ERROR(v_.Allocate(nn * kvd * 2));
    TOKENLAKE_RETURN_IF_ERROR(attn_.Allocate(nn * qd * 4));
    TOKENLAKE_RETURN_IF_ERROR(attn16_.Allocate(nn * qd * 2));
    TOKENLAKE_RETURN_IF_ERROR(gate_up_.Allocate(nn * 2 * inter * 4));
    TOKENLAKE_RETURN_IF_ERROR(act16_.Allocate(nn * inter * 2));
    // A padded forward's extra rows (GraphRows) are never written by the attention: zeros there
    // rather than whatever the allocation held.
    TOKENLAKE_RETURN_IF_ERROR(
        CudaStatus(cudaMemsetAsync(attn_.get(), 0, nn * qd * 4, stream_), "cudaMemsetAsync"));
    act_tokens_ = n;
  }
  if (m > act_logits_) {
    const size_t mm = static_cast<size_t>(m);
    TOKENLAKE_RETURN_IF_ERROR(head_in_.Allocate(mm * h * 2));
    TOKENLAKE_RETURN_IF_ERROR(logits_.Allocate(mm * vocab * 4));
    TOKENLAKE_RETURN_IF_ERROR(argmax_.Allocate(mm * 4));
    act_logits_ = m;
  }
  // Inputs: [n] tokens, [n] positions, [m] logits rows; the host side also receives [m]
  // argmaxes after them.
  const size_t input_bytes = (2 * static_cast<size_t>(act_tokens_) + act_logits_) * 4;
  TOKENLAKE_RETURN_IF_ERROR(inputs_.Allocate(input_bytes));
  const size_t host_bytes = input_bytes + static_cast<size_t>(act_logits_) * 4;
  if (host_bytes > host_inputs_bytes_) {
    if (host_inputs_ != nullptr) cudaFreeHost(host_inputs_);
    host_inputs_ = nullptr;
    host_inputs_bytes_ = 0;
    TOKENLAKE_RETURN_IF_ERROR(
        CudaStatus(cudaHostAlloc(&host_inputs_, host_bytes, 0), "cudaHostAlloc(forward inputs)"));
    host_inputs_bytes_ = host_bytes;
  }
  return absl::OkStatus();
}

absl::Status GpuLlamaModel::Enqueue(absl::Span<const GpuSequenceInput> sequences,
                                    GpuAttentionBackend& backend) {
  const LlamaConfig& c = config_;
  if (sequences.empty()) {
    return absl::InvalidArgumentError("GpuLlamaModel::ForwardBatch: no sequences");
  }
  int64_t total = 0;
  int32_t m = 0;
  for (size_t s = 0; s < sequences.size(); ++s) {
    const GpuSequenceInput& seq = sequences[s];
    if (seq.tokens.empty()) {
      return absl::InvalidArgumentError(
          absl::StrFormat("GpuLlamaModel::ForwardBatch: sequence %d has no tokens", s));
    }
    if (seq.start_pos < 0 ||
        seq.start_pos + static_cast<int64_t>(seq.tokens.size()) > (int64_t{1} << 31) - 1) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "GpuLlamaModel::ForwardBatch: sequence %d: start_pos %d is outside [0, 2^31 - %d)", s,
          seq.start_pos, seq.tokens.size()));
    }
    for (size_t i = 0; i < seq.tokens.size(); ++i) {
      if (seq.tokens[i] < 0 || seq.tokens[i] >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrFormat("GpuLlamaModel::ForwardBatch: sequence %d: token %d at index %d is "
                            "outside the vocabulary [0, %d)",
                            s, seq.tokens[i], i, c.vocab_size));
      }
    }
    total += static_cast<int64_t>(seq.tokens.size());
    if (seq.logits != GpuSequenceInput::Logits::kNone) ++m;
  }
  if (total > (int64_t{1} << 31) - 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("GpuLlamaModel::ForwardBatch: %d tokens in one forward", total));
  }
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device_), "cudaSetDevice"));
  const int32_t n = static_cast<int32_t>(total);
  // Forwards of at most kGraphMaxRows rows replay the work between two attentions as CUDA graphs
  // (captured once per stretch and bucket, see GraphRows): those stretches run over `rows` >= n
  // rows, the attention over the n real ones.
  const bool graphs = decode_graphs_ && !profiling_ && GraphRows(n) > 0;
  const int32_t rows = graphs ? GraphRows(n) : n;
  TOKENLAKE_RETURN_IF_ERROR(EnsureActivations(rows, m));
  const int h = c.hidden_size;
  const int qd = c.num_heads * c.head_dim;
  const int kvd = c.num_kv_heads * c.head_dim;
  const int inter = c.intermediate_size;
  auto* blas = static_cast<cublasHandle_t>(cublas_);
  // The smallest batches read each weight matrix with SmallBatchGemm (fusing SiLU*up into the
  // gate/up projection), decode-sized ones with DecodeGemm where the input width allows; larger
  // ones run on cuBLAS.
  const bool small = rows <= small_batch_rows_ && h % 8 == 0 && qd % 8 == 0 && inter % 8 == 0;
  // Whether DecodeGemm takes a layer of `in` inputs and `out` outputs at `num_rows` rows.
  auto decode_gemm = [&](int num_rows, int in, int out, DenseEpilogue epilogue) {
    if (in % kDecodeGemmInMultiple != 0) return false;
    return num_rows <= decode_gemm_rows_ ||
           (num_rows <= decode_gemm_unsplit_rows_ &&
            DecodeGemmSplits(num_rows, in, out, epilogue, decode_gemm_workspace_) == 1);
  };
  // y[rows][out] (+)= x[rows][in] * w^T, beta 0 or 1.
  auto dense = [&](const DeviceBuffer& wt, const DeviceBuffer& x, float* y, int num_rows, int in,
                   int out, float beta) -> absl::Status {
    if (small) {
      return SmallBatchGemm(wt.as<uint16_t>(), x.get(), DenseInput::kBf16, num_rows, in, out,
                            beta == 0.f ? DenseEpilogue::kStoreF32 : DenseEpilogue::kAddF32, y,
                            nullptr, stream_, SmallGemmLayout::kAuto, pdl_);
    }
    const DenseEpilogue epilogue = beta == 0.f ? DenseEpilogue::kStoreF32 : DenseEpilogue::kAddF32;
    if (decode_gemm(num_rows, in, out, epilogue)) {
      return DecodeGemm(wt.as<uint16_t>(), x.get(), DenseInput::kBf16, num_rows, in, out, epilogue,
                        y, nullptr, decode_gemm_workspace_, stream_, pdl_);
    }
    return Gemm(blas, wt.get(), x.get(), y, num_rows, in, out, beta);
  };
  // The inputs in one pinned buffer, one copy: `rows` tokens, `rows` positions (a graph names
  // these addresses, so they depend on the bucket only; padding rows are token 0 at position 0),
  // the logits rows. (The previous forward synchronised its stream, so the staging buffer is
  // free.)
  auto* host = static_cast<int32_t*>(host_inputs_);
  int32_t row = 0;
  int32_t logits_row = 0;
  for (const GpuSequenceInput& seq : sequences) {
    for (size_t i = 0; i < seq.tokens.size(); ++i) {
      host[row] = seq.tokens[i];
      host[rows + row] = static_cast<int32_t>(seq.start_pos + static_cast<int64_t>(i));
      ++row;
    }
    if (seq.logits != GpuSequenceInput::Logits::kNone) host[2 * rows + logits_row++] = row - 1;
  }
  for (; row < rows; ++row) host[row] = host[rows + row] = 0;
  const int32_t* d_tokens = inputs_.as<int32_t>();
  const int32_t* d_positions = d_tokens + rows;
  const int32_t* d_rows = d_tokens + 2 * static_cast<ptrdiff_t>(rows);
  TOKENLAKE_RETURN_IF_ERROR(
      CudaStatus(cudaMemcpyAsync(inputs_.get(), host, (2 * static_cast<size_t>(rows) + m) * 4,
                                 cudaMemcpyHostToDevice, stream_),
                 "cudaMemcpyAsync(forward inputs)"));
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaEventRecord(forward_begin_, stream_), "event"));
  Mark(kPhaseEnds);
  // RoPE's thread blocks per token: enough for a decode batch to cover the device.
  const unsigned rope_parts =
      static_cast<unsigned>(std::clamp(256 / rows, 1, c.num_heads + 2 * c.num_kv_heads));
  TOKENLAKE_RETURN_IF_ERROR(Launch("embedding", pdl_, EmbedKernel, dim3(rows), dim3(kThreads),
                                   stream_, d_tokens, embed_.as<uint16_t>(), h, x_.as<float>()));
  // A layer's work before its attention (RMSNorm, q/k/v, RoPE) and after it (o_proj, RMSNorm,
  // gate/up with SiLU, down_proj).
  auto before_attention = [&](const Layer& w) -> absl::Status {
    Mark(kPhaseOther);
    TOKENLAKE_RETURN_IF_ERROR(Launch("rmsnorm", pdl_, RmsNormKernel, dim3(rows), dim3(kNormThreads),
                                     stream_, x_.as<float>(), w.input_norm.as<float>(),
                                     c.rms_norm_eps, h, nullptr, normed_.as<uint16_t>()));
    Mark(kPhaseGemm);
    TOKENLAKE_RETURN_IF_ERROR(dense(w.wqkv, normed_, qkv_.as<float>(), rows, h, qd + 2 * kvd, 0.f));
    Mark(kPhaseOther);
    return Launch("rope", pdl_, RopeSplitKernel, dim3(static_cast<unsigned>(rows), rope_parts),
                  dim3(kThreads), stream_, qkv_.as<float>(), inv_freq_.as<float>(), d_positions,
                  c.num_heads, c.num_kv_heads, c.head_dim, q_.as<uint16_t>(), k_.as<uint16_t>(),
                  v_.as<uint16_t>());
  };
  auto after_attention = [&](const Layer& w) -> absl::Status {
    // x += attn * Wo^T (the attention's float32 output rounded to bf16: by SmallBatchGemm or
    // DecodeGemm as they read it, else by a conversion pass before cuBLAS)
    if (small) {
      Mark(kPhaseGemm);
      TOKENLAKE_RETURN_IF_ERROR(SmallBatchGemm(w.wo.as<uint16_t>(), attn_.get(), DenseInput::kF32,
                                               rows, qd, h, DenseEpilogue::kAddF32, x_.as<float>(),
                                               nullptr, stream_, SmallGemmLayout::kAuto, pdl_));
    } else if (decode_gemm(rows, qd, h, DenseEpilogue::kAddF32)) {
      Mark(kPhaseGemm);
      TOKENLAKE_RETURN_IF_ERROR(DecodeGemm(w.wo.as<uint16_t>(), attn_.get(), DenseInput::kF32, rows,
                                           qd, h, DenseEpilogue::kAddF32, x_.as<float>(), nullptr,
                                           decode_gemm_workspace_, stream_, pdl_));
    } else {
      Mark(kPhaseOther);
      const int64_t attn_elems = int64_t{rows} * qd;
      TOKENLAKE_RETURN_IF_ERROR(Launch("to bf16", pdl_, ToBf16Kernel, dim3(GridFor(attn_elems / 4)),
                                       dim3(kThreads), stream_, attn_.as<float>(), attn_elems,
                                       attn16_.as<uint16_t>()));
      Mark(kPhaseGemm);
      TOKENLAKE_RETURN_IF_ERROR(dense(w.wo, attn16_, x_.as<float>(), rows, qd, h, 1.f));
    }
    Mark(kPhaseOther);
    TOKENLAKE_RETURN_IF_ERROR(Launch("rmsnorm", pdl_, RmsNormKernel, dim3(rows), dim3(kNormThreads),
                                     stream_, x_.as<float>(), w.post_norm.as<float>(),
                                     c.rms_norm_eps, h, nullptr, normed_.as<uint16_t>()));
    Mark(kPhaseGemm);
    if (small) {
      TOKENLAKE_RETURN_IF_ERROR(
          SmallBatchGemm(w.wgu.as<uint16_t>(), normed_.get(), DenseInput::kBf16, rows, h, inter,
                         DenseEpilogue::kSiluMulBf16, nullptr, act16_.as<uint16_t>(), stream_,
                         SmallGemmLayout::kAuto, pdl_));
    } else if (decode_gemm(rows, h, inter, DenseEpilogue::kSiluMulBf16)) {
      TOKENLAKE_RETURN_IF_ERROR(DecodeGemm(w.wgu.as<uint16_t>(), normed_.get(), DenseInput::kBf16,
                                           rows, h, inter, DenseEpilogue::kSiluMulBf16, nullptr,
                                           act16_.as<uint16_t>(), decode_gemm_workspace_, stream_,
                                           pdl_));
    } else {
      TOKENLAKE_RETURN_IF_ERROR(
          dense(w.wgu, normed_, gate_up_.as<float>(), rows, h, 2 * inter, 0.f));
      Mark(kPhaseOther);
      // (A thread takes four outputs when inter is a multiple of 4.)
      const int64_t act_threads = int64_t{rows} * (inter % 4 == 0 ? inter / 4 : inter);
      TOKENLAKE_RETURN_IF_ERROR(Launch("silu", pdl_, SiluMulKernel, dim3(GridFor(act_threads)),
                                       dim3(kThreads), stream_, gate_up_.as<float>(), int64_t{rows},
                                       inter, act16_.as<uint16_t>()));
    }
    // x += act * Wdown^T
    Mark(kPhaseGemm);
    return dense(w.wdown, act16_, x_.as<float>(), rows, inter, h, 1.f);
  };
  // The work between two attentions is the same kernels with the same arguments at every
  // forward of the same bucket (their inputs are device buffers at fixed addresses): without
  // profiling events, each such stretch is captured once per bucket as a CUDA graph and
  // replayed, which saves the launches' host time and the gaps between kernels.
  auto stretch = [&](int32_t index, const std::function<absl::Status()>& body) -> absl::Status {
    if (!graphs) return body();
    cudaGraphExec_t& exec = graphs_[static_cast<size_t>(index) * (kGraphMaxRows + 1) + rows];
    if (exec == nullptr) {
      TOKENLAKE_RETURN_IF_ERROR(CudaStatus(
          cudaStreamBeginCapture(stream_, cudaStreamCaptureModeThreadLocal), "begin capture"));
      const absl::Status captured = body();
      cudaGraph_t graph = nullptr;
      const cudaError_t ended = cudaStreamEndCapture(stream_, &graph);
      if (!captured.ok() || ended != cudaSuccess) {
        if (graph != nullptr) cudaGraphDestroy(graph);
        TOKENLAKE_RETURN_IF_ERROR(captured);
        return CudaStatus(ended, "end capture");
      }
      const cudaError_t made = cudaGraphInstantiate(&exec, graph, 0);
      cudaGraphDestroy(graph);
      if (made != cudaSuccess) {
        exec = nullptr;
        return CudaStatus(made, "cudaGraphInstantiate");
      }
    }
    return CudaStatus(cudaGraphLaunch(exec, stream_), "cudaGraphLaunch");
  };
  TOKENLAKE_RETURN_IF_ERROR(stretch(0, [&] { return before_attention(layers_[0]); }));
  for (int32_t l = 0; l < c.num_layers; ++l) {
    Mark(kPhaseAttention);
    TOKENLAKE_RETURN_IF_ERROR(backend.Attend(l, n, q_.as<uint16_t>(), k_.as<uint16_t>(),
                                             v_.as<uint16_t>(), attn_.as<float>(), stream_));
    TOKENLAKE_RETURN_IF_ERROR(stretch(l + 1, [&]() -> absl::Status {
      TOKENLAKE_RETURN_IF_ERROR(after_attention(layers_[static_cast<size_t>(l)]));
      if (l + 1 == c.num_layers) return absl::OkStatus();
      return before_attention(layers_[static_cast<size_t>(l) + 1]);
    }));
  }
  Mark(kPhaseEnds);
  if (m > 0) {
    // The last token of each sequence that wants logits.
    TOKENLAKE_RETURN_IF_ERROR(Launch("rmsnorm", pdl_, RmsNormKernel, dim3(m), dim3(kNormThreads),
                                     stream_, x_.as<float>(), final_norm_.as<float>(),
                                     c.rms_norm_eps, h, d_rows, head_in_.as<uint16_t>()));
    const DeviceBuffer& head = lm_head_.size_bytes() > 0 ? lm_head_ : embed_;
    TOKENLAKE_RETURN_IF_ERROR(dense(head, head_in_, logits_.as<float>(), m, h, c.vocab_size, 0.f));
    TOKENLAKE_RETURN_IF_ERROR(Launch("argmax", pdl_, ArgmaxKernel, dim3(m), dim3(kArgmaxThreads),
                                     stream_, logits_.as<float>(), c.vocab_size,
                                     argmax_.as<int32_t>()));
  }
  Mark(-1);
  return CudaStatus(cudaEventRecord(forward_end_, stream_), "event");
}

void GpuLlamaModel::Mark(int phase) {
  if (!profiling_) return;
  if (marks_used_ == marks_.size()) {
    cudaEvent_t e = nullptr;
    if (cudaEventCreate(&e) != cudaSuccess) {
      cudaGetLastError();
      profiling_ = false;  // give up profiling rather than fail the forward
      return;
    }
    marks_.push_back({e, 0});
  }
  marks_[marks_used_].second = phase;
  cudaEventRecord(marks_[marks_used_].first, stream_);
  ++marks_used_;
}

void GpuLlamaModel::CollectMarks() {
  if (marks_used_ == 0) return;
  cudaEventSynchronize(marks_[marks_used_ - 1].first);
  for (size_t i = 0; i + 1 < marks_used_; ++i) {
    const int phase = marks_[i].second;
    if (phase < 0 || phase >= kNumPhases) continue;
    float ms = 0.f;
    if (cudaEventElapsedTime(&ms, marks_[i].first, marks_[i + 1].first) == cudaSuccess) {
      phase_ms_[static_cast<size_t>(phase)] += ms;
    } else {
      cudaGetLastError();
    }
  }
  marks_used_ = 0;
}

void GpuLlamaModel::set_small_batch_rows(int32_t rows) {
  small_batch_rows_ = std::clamp(rows, 0, kSmallBatchMaxRows);
}

void GpuLlamaModel::set_decode_gemm_rows(int32_t rows) {
  rows = std::clamp(rows, 0, kDecodeGemmMaxRows);
  if (rows != decode_gemm_rows_) ClearGraphs();  // they name the GEMMs' kernels
  decode_gemm_rows_ = rows;
}

void GpuLlamaModel::set_decode_gemm_unsplit_rows(int32_t rows) {
  rows = std::clamp(rows, 0, kDecodeGemmMaxRows);
  if (rows != decode_gemm_unsplit_rows_) ClearGraphs();
  decode_gemm_unsplit_rows_ = rows;
}

void GpuLlamaModel::set_decode_graphs(bool on) { decode_graphs_ = on; }

void GpuLlamaModel::set_pdl(bool on) {
  if (on != pdl_) ClearGraphs();  // their launches carry the setting
  pdl_ = on;
}

void GpuLlamaModel::ClearGraphs() {
  for (cudaGraphExec_t& g : graphs_) {
    if (g != nullptr) cudaGraphExecDestroy(g);
    g = nullptr;
  }
}

void GpuLlamaModel::SetProfiling(bool on) {
  profiling_ = on;
  marks_used_ = 0;
  phase_ms_.fill(0.0);
}

absl::StatusOr<GpuBatchOutput> GpuLlamaModel::ForwardBatch(
    absl::Span<const GpuSequenceInput> sequences, GpuAttentionBackend& backend) {
  absl::Status s = Enqueue(sequences, backend);
  if (!s.ok()) {
    cudaStreamSynchronize(stream_);  // nothing enqueued may outlive the caller's buffers
    marks_used_ = 0;
    return s;
  }
  const size_t vocab = static_cast<size_t>(config_.vocab_size);
  GpuBatchOutput out;
  out.next_tokens.assign(sequences.size(), -1);
  out.logits.resize(sequences.size());
  int32_t m = 0;
  for (const GpuSequenceInput& seq : sequences) m += seq.logits != GpuSequenceInput::Logits::kNone;
  int64_t n = 0;
  for (const GpuSequenceInput& seq : sequences) n += static_cast<int64_t>(seq.tokens.size());
  int32_t* host_argmax = static_cast<int32_t*>(host_inputs_) + 2 * n + m;
  if (m > 0) {
    TOKENLAKE_RETURN_IF_ERROR(CudaStatus(
        cudaMemcpyAsync(host_argmax, argmax_.get(), m * 4, cudaMemcpyDeviceToHost, stream_),
        "cudaMemcpyAsync(argmax)"));
  }
  int32_t r = 0;
  for (size_t i = 0; i < sequences.size(); ++i) {
    if (sequences[i].logits == GpuSequenceInput::Logits::kNone) continue;
    if (sequences[i].logits == GpuSequenceInput::Logits::kFull) {
      out.logits[i].resize(vocab);
      TOKENLAKE_RETURN_IF_ERROR(
          CudaStatus(cudaMemcpyAsync(out.logits[i].data(), logits_.as<float>() + r * vocab,
                                     vocab * 4, cudaMemcpyDeviceToHost, stream_),
                     "cudaMemcpyAsync(logits)"));
    }
    ++r;
  }
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaStreamSynchronize(stream_), "Forward: synchronize"));
  float gpu_ms = 0;
  if (cudaEventElapsedTime(&gpu_ms, forward_begin_, forward_end_) == cudaSuccess) {
    last_forward_gpu_ms_ = gpu_ms;
  }
  r = 0;
  for (size_t i = 0; i < sequences.size(); ++i) {
    if (sequences[i].logits != GpuSequenceInput::Logits::kNone)
      out.next_tokens[i] = host_argmax[r++];
  }
  CollectMarks();
  return out;
}

absl::StatusOr<std::vector<float>> GpuLlamaModel::Forward(absl::Span<const int32_t> tokens,
                                                          int64_t start_pos,
                                                          GpuAttentionBackend& backend) {
  const GpuSequenceInput seq{tokens, start_pos, GpuSequenceInput::Logits::kFull};
  TOKENLAKE_ASSIGN_OR_RETURN(GpuBatchOutput out, ForwardBatch({&seq, 1}, backend));
  return std::move(out.logits[0]);
}

absl::StatusOr<int32_t> GpuLlamaModel::ForwardArgmax(absl::Span<const int32_t> tokens,
                                                     int64_t start_pos,
                                                     GpuAttentionBackend& backend) {
  const GpuSequenceInput seq{tokens, start_pos, GpuSequenceInput::Logits::kArgmax};
  TOKENLAKE_ASSIGN_OR_RETURN(GpuBatchOutput out, ForwardBatch({&seq, 1}, backend));
  return out.next_tokens[0];
}

}  // namespace tokenlake::engine::cuda
