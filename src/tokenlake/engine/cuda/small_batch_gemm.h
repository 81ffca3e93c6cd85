// SmallBatchGemm: the model's dense layers at the row counts of decoding (1-8 rows), where the
// time is reading the weight matrix once and cuBLAS's kernels for these skinny shapes stay well
// below the device's copy bandwidth. A few weight rows are streamed (16-byte loads that bypass
// L1, so the small input stays there) against every input row, in float32, either by one warp
// or by a whole thread block that splits the rows' length over its warps (SmallGemmLayout), and
// the result goes through one of the epilogues the forward needs (DenseEpilogue, dense_layer.h),
// which saves it a pass over the output.
//
// Shapes and layouts: w [rows][in] bf16 bits, row-major (rows = out, or 2 out for kSiluMulBf16);
// x [n][in] (bf16 bits or float32, see DenseInput); y [n][out] float32; y16 [n][out] bf16 bits.
// in must be a positive multiple of 8 and w, x 16-byte aligned. Numerics: products and sums in
// float32 (each thread sums its slice of in, then a butterfly across the warp and, in the block
// layouts, a sum over the warps); bf16 rounding to nearest even. Results differ from cuBLAS's
// float32-accumulated ones by summation order only.
//
// Thread-safety: enqueues on `stream`; pointers are device pointers borrowed until the
// enqueued work has run. Not captured state: safe inside a CUDA graph capture.
#ifndef TOKENLAKE_ENGINE_CUDA_SMALL_BATCH_GEMM_H_
#define TOKENLAKE_ENGINE_CUDA_SMALL_BATCH_GEMM_H_

#include <cuda_runtime_api.h>

#include <cstdint>

#include "absl/status/status.h"
#include "tokenlake/engine/cuda/dense_layer.h"

namespace tokenlake::engine::cuda {

// The most input rows SmallBatchGemm takes; larger batches go to DecodeGemm or cuBLAS.
inline constexpr int kSmallBatchMaxRows = 8;
// The most rows at which the model uses it by default (GpuLlamaModel::set_small_batch_rows):
// faster than DecodeGemm (decode_gemm.h) for the decode steps of 1 and 2 rows, slower at 4
// (docs/results-engine.md).
inline constexpr int kSmallBatchDefaultRows = 2;

// How the weight rows are shared out: kWarpRowsR, R rows per warp (eight warps a thread block);
// kBlockRowsR, R rows per thread block, each thread taking every 256th 16-byte chunk of them.
// A tuning knob for benchmarks; the results differ only by summation order. kAuto is the
// layout measured fastest at decode shapes (docs/results-engine.md).
enum class SmallGemmLayout : uint8_t { kAuto, kWarpRows2, kWarpRows4, kBlockRows4, kBlockRows8 };

// pdl: launched with programmatic dependent launch (attention/cuda/pdl.cuh): the kernel may
// start while the kernel before it on the stream drains, loading its first weights, and waits
// for that kernel's completion before it reads x or y or writes anything; it lets the kernel
// after it (if PDL-launched) start the same way. Without pdl an ordinary launch (the kernel
// still lets a PDL-launched next kernel start early).
// Errors: InvalidArgument (n outside [1, kSmallBatchMaxRows], in not a positive multiple of 8,
//   out < 1, a null or misaligned pointer the epilogue needs, an unknown layout),
//   Internal (launch failure).
absl::Status SmallBatchGemm(const uint16_t* w, const void* x, DenseInput input, int32_t n,
                            int32_t in, int32_t out, DenseEpilogue epilogue, float* y,
                            uint16_t* y16, cudaStream_t stream,
                            SmallGemmLayout layout = SmallGemmLayout::kAuto, bool pdl = false);

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_SMALL_BATCH_GEMM_H_
