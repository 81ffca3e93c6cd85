// DecodeGemm: the model's dense layers at decode batch sizes (up to 64 rows) on tensor cores.
// There the time is reading the weight matrix once, and cuBLAS's kernels for these skinny
// shapes leave part of the copy bandwidth unused (too few thread blocks for the matrices of
// q/k/v and o_proj, a separate split-K reduction for down_proj). Here each thread block streams
// 128 weight rows over a slice of `in` straight from memory into registers (16-byte loads, the
// next 128 values of each row in flight while the current ones are multiplied), multiplies them
// by the input rows staged in shared memory (mma.sync m16n8k16, bf16 in, float32
// accumulation); a matrix with few blocks of rows is split along `in`, and the slices of one
// block of rows are summed by the last of their thread blocks to finish (a per-row-block
// counter), in slice order, so results are the same bit for bit from run to run. The epilogue
// (DenseEpilogue, dense_layer.h) works on the block's sums in shared memory, which saves the
// forward a pass over the output.
//
// Shapes and layouts: w [out][in] (kSiluMulBf16: [2 out][in]) bf16 bits, row-major; x [n][in]
// bf16 bits or float32 (DenseInput); y [n][out] float32; y16 [n][out] bf16 bits. in must be a
// positive multiple of kDecodeGemmInMultiple; w and x 16-byte aligned. Numerics: bf16 products
// summed in float32 (in an order that differs from cuBLAS's); SiLU in float32, rounded to bf16 to
// nearest even.
//
// Thread-safety: enqueues on `stream`; pointers are device pointers borrowed until the
// enqueued work has run. Calls that share a workspace must run one after another (one stream):
// the counters are reset by the call that used them. Safe inside a CUDA graph capture.
#ifndef TOKENLAKE_ENGINE_CUDA_DECODE_GEMM_H_
#define TOKENLAKE_ENGINE_CUDA_DECODE_GEMM_H_

#include <cuda_runtime_api.h>

#include <cstddef>
#include <cstdint>

#include "absl/status/status.h"
#include "absl/status/statusor.h"
#include "tokenlake/engine/cuda/dense_layer.h"
#include "tokenlake/engine/cuda/device_buffer.h"

namespace tokenlake::engine::cuda {

// The most input rows DecodeGemm takes; larger batches go to cuBLAS.
inline constexpr int kDecodeGemmMaxRows = 64;
// The most rows at which the model uses it by default (GpuLlamaModel::set_decode_gemm_rows):
// faster than cuBLAS on every projection up to here, slower on some from 32 rows, where the
// input rows' share of the traffic and the mma work grow (docs/results-engine.md).
inline constexpr int kDecodeGemmDefaultRows = 16;
// The most rows at which the model uses it by default on a matrix it reads without splitting
// `in` (DecodeGemmSplits == 1: enough row blocks to fill the device, as gate/up and the LM
// head; GpuLlamaModel::set_decode_gemm_unsplit_rows). Alone, such matrices stay faster on it
// than on cuBLAS to 32 rows; until a decode step has been measured faster that way, beside the
// default in the same run, the default adds no rows (docs/results-engine.md).
inline constexpr int kDecodeGemmUnsplitDefaultRows = kDecodeGemmDefaultRows;
// `in` must be a multiple of this (a thread block's step along the rows' length).
inline constexpr int kDecodeGemmInMultiple = 128;

// Scratch for the split sums and the per-row-block counters, sized for a device's
// multiprocessor count; zeroed once at Create, kept zero between calls by the calls.
class DecodeGemmWorkspace {
 public:
  // Errors: ResourceExhausted (device memory: about 64 KiB per multiprocessor), Internal
  // (another CUDA error).
  static absl::StatusOr<DecodeGemmWorkspace> Create(int device);

  float* partials() const { return partials_.as<float>(); }
  int32_t* counters() const { return counters_.as<int32_t>(); }
  int32_t num_sms() const { return num_sms_; }
  // The most thread blocks a call launches when it splits `in` (2 per multiprocessor).
  int32_t max_split_blocks() const { return 2 * num_sms_; }

 private:
  DeviceBuffer partials_;  // float [max_split_blocks][128 rows][kDecodeGemmMaxRows]
  DeviceBuffer counters_;  // int32 [max_split_blocks]
  int32_t num_sms_ = 0;
};

// pdl: launched with programmatic dependent launch (attention/cuda/pdl.cuh): the kernel may
// start while the kernel before it drains and load its first weights, and waits for that
// kernel's completion before it reads x or y, or touches the workspace.
// Errors: InvalidArgument (n outside [1, kDecodeGemmMaxRows], in not a positive multiple of
//   kDecodeGemmInMultiple, out < 1, a null or misaligned pointer the epilogue needs, an unknown
//   epilogue or input, a workspace not from Create), Internal (launch failure).
absl::Status DecodeGemm(const uint16_t* w, const void* x, DenseInput input, int32_t n, int32_t in,
                        int32_t out, DenseEpilogue epilogue, float* y, uint16_t* y16,
                        const DecodeGemmWorkspace& workspace, cudaStream_t stream,
                        bool pdl = false);

// How many slices DecodeGemm cuts `in` into for this call's shape (1: no split), for reports.
int32_t DecodeGemmSplits(int32_t n, int32_t in, int32_t out, DenseEpilogue epilogue,
                         const DecodeGemmWorkspace& workspace);

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_DECODE_GEMM_H_
