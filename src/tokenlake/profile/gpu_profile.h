// GPU measurements for the simulator's cost model (`tokenlake profile`) and the GPU benchmarks:
// device copy bandwidth, cuBLAS bf16 GEMM rate, the dense layers of a Llama-style model by batch
// tokens, and the rates of the paged attention kernels (attention/cuda). All timings use CUDA
// events around repeated runs after a warm-up and report the median; inputs are random (never
// zeros).
//
// Thread-safety: the functions use the current device and their own stream; do not run two
// measurements on one device at the same time (they would disturb each other's timings).
#ifndef TOKENLAKE_PROFILE_GPU_PROFILE_H_
#define TOKENLAKE_PROFILE_GPU_PROFILE_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>
#include <string>
#include <utility>
#include <vector>

#include "absl/status/statusor.h"

namespace tokenlake::profile {

// Fills `n` bf16 values (raw bits) at device pointer `ptr` with uniform values in
// [-scale, scale) from a counter-based hash of (seed, index). Errors: Internal on launch failure.
absl::Status FillRandomBf16(void* ptr, size_t n, uint64_t seed, float scale,
                            cudaStream_t stream = nullptr);

// Device name, total memory and multiprocessor count of the current device.
struct DeviceDescription {
  std::string name;
  int64_t memory_bytes = 0;
  int num_sms = 0;
  int cc_major = 0;
  int cc_minor = 0;
};
// Errors: FailedPrecondition when there is no CUDA device.
absl::StatusOr<DeviceDescription> DescribeDevice();

// Device-to-device cudaMemcpyAsync of `bytes`, median of `repeats`; GB/s counting bytes read
// plus bytes written (2 * bytes / time).
absl::StatusOr<double> MeasureCopyGbps(size_t bytes = size_t{1} << 30, int repeats = 20);

// A read-only streaming kernel over `bytes` of device memory (16-byte loads, grid-stride, a few
// loads in flight per thread, one word written per thread block), median of `repeats`; GB/s of
// bytes read. The read-side ceiling for memory-bound kernels such as decode attention. With
// batch > 1, each timed sample is `batch` launches back to back (two buffers alternated) and the
// rate counts all of them. Errors: InvalidArgument for batch < 1; CUDA errors.
absl::StatusOr<double> MeasureReadGbps(size_t bytes = size_t{1} << 30, int repeats = 20,
                                       int batch = 1);

// One bf16 GEMM (cuBLAS, float32 accumulation) of m x k times k x n; TFLOP/s (2mnk / time).
absl::StatusOr<double> MeasureGemmTflops(int64_t m, int64_t n, int64_t k, int repeats = 20);

// Dense layers of a Llama-style decoder: per layer qkv [T, hidden] x [hidden, hidden + 2 * kv],
// o [T, hidden] x [hidden, hidden], gate-up [T, hidden] x [hidden, 2 * intermediate], down
// [T, intermediate] x [intermediate, hidden], all bf16 via cuBLAS; times num_layers.
struct DenseModelShape {
  int64_t num_layers = 32;  // Llama-3-8B
  int64_t hidden = 4096;
  int64_t num_heads = 32;
  int64_t num_kv_heads = 8;
  int64_t head_dim = 128;
  int64_t intermediate = 14336;
};
struct DensePoint {
  int64_t tokens = 0;
  double ms = 0;      // all layers, one iteration
  double tflops = 0;  // achieved
};
absl::StatusOr<std::vector<DensePoint>> MeasureDenseLayers(const DenseModelShape& shape,
                                                           const std::vector<int64_t>& tokens,
                                                           int repeats = 10);

// Paged attention over a pooled prefix: `kv_tokens` keys in segments of `segment_tokens` whose
// slots are scattered (shuffled) in one arena, GQA num_heads / num_kv_heads, head_dim, bf16.
struct AttentionBenchShape {
  int32_t num_q_tokens = 1;
  int64_t kv_tokens = 32768;
  int32_t segment_tokens = 512;
  int32_t num_heads = 32;
  int32_t num_kv_heads = 8;
  int32_t head_dim = 128;
  bool causal = false;
  int32_t num_splits = 0;              // 0 = auto
  int32_t prefill_warps = 0;           // 0 = auto
  int32_t decode_unroll = 0;           // 0 = auto
  int32_t decode_pipeline = 0;         // 0 = auto, 1 registers, 2 shared memory
  int32_t prefill_rows_per_warp = 0;   // 0 = auto, 16, 32
  int32_t decode_merge = 0;            // 0 = fused into the decode kernel, 1 = separate kernel
  int32_t prefill_kernel = 0;          // prefill: 0 = auto, 1 = mma.sync, 2 = sm90 wgmma
  int32_t decode_kernel = 0;           // decode: 0 = auto, 1 = CUDA cores, 2 = tensor cores
  int32_t decode_mma_stages = 0;       // decode, tensor cores: stages per warp, 0 = auto, 2-4
  int32_t decode_mma_descriptors = 0;  // decode, tensor cores: 0 auto, 1 smem cache, 2 global
  int32_t pdl = 0;                     // PagedAttentionParams::pdl (0 off, 1, 2)
  // > 1: a batched decode of this many requests, one query token each (num_q_tokens must be 1),
  // request r owning the r-th equal share of the kv_tokens' segments, in one call.
  int32_t num_requests = 1;
  int kernel = 0;  // 0 auto, 1 prefill, 2 decode (AttentionKernel order)
};
struct AttentionTiming {
  double us = 0;               // median time of one call (kernel(s) + internal merge)
  double tflops = 0;           // 4 * q * visible keys * heads * head_dim / time
  double kv_gbps = 0;          // KV bytes read once / time
  double merge_us = 0;         // median time of MergePartials of two partials of this output shape
  double batched_us = 0;       // per call, 10 calls back to back between two events (median)
  double batched_kv_gbps = 0;  // KV bytes read once / batched_us
};
absl::StatusOr<AttentionTiming> MeasurePagedAttention(const AttentionBenchShape& shape,
                                                      int repeats = 50);

// What `tokenlake profile` measures here, as the simulator's GPU-profile JSON (schema in
// src/tokenlake/sched/cost_model.h: name, memory_bytes, memory_utilization,
// activation_reserve_bytes, copy_gbps, gemm_tflops, attn_prefill_tflops, attn_decode_gbps,
// dense_ms [[tokens, ms], ...]; plus "device", "dense_ms_by_tokens" and a "measured" object with
// details). Dense layers: Llama-3-8B at `dense_tokens`; GEMM: 8192^3; attention: GQA 32/8,
// d = 128, 32K cached tokens in 512-token segments, prefill 1024 tokens, decode 1 token. (The
// command adds forward_ms, the GPU engine's forward without attention, which this library
// cannot run: apps/tokenlake/profile_command.cc.)
// Errors: FailedPrecondition without a device; others from the measurements.
absl::StatusOr<std::string> MeasureGpuProfileJson(const std::vector<int64_t>& dense_tokens,
                                                  int repeats = 10);

}  // namespace tokenlake::profile

#endif  // TOKENLAKE_PROFILE_GPU_PROFILE_H_
