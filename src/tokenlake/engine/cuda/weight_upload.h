// UploadTensors: host tensors (typically the mmap'd bytes of a checkpoint's shards) into device
// memory, converting the element type on the device.
//
// How: the tensors are cut into chunks of at most `staging_bytes` (one tensor per chunk).
// `threads` host threads take chunks in turn; each owns a CUDA stream and `buffers_per_thread`
// pinned staging buffers (cudaHostAlloc), plus, when some tensor needs a conversion, a device
// scratch buffer per staging buffer. For a chunk a thread waits until its next staging buffer's
// previous copy has finished (an event), copies the chunk into it with memcpy (this is where the
// page cache is read, through page faults on the mapping), and enqueues cudaMemcpyAsync: straight
// to the destination when the dtype already matches, else to the scratch buffer followed by a
// conversion kernel. So the host copy of one chunk overlaps the DMA of the previous one, and the
// threads read the page cache in parallel. If pinned memory cannot be had, pageable staging
// buffers are used instead (correct, slower; UploadStats::pinned says so).
//
// Conversions: BF16 -> BF16 and F32 -> F32 are plain copies; F32 -> BF16 and F16 -> BF16 round
// to nearest even (as attention::FloatToBf16 of the value); BF16 -> F32 and F16 -> F32 are exact.
//
// Thread-safety: a free function; concurrent calls must write to different device memory. The
// source bytes must stay valid and unchanged during the call (a file truncated under its
// mapping raises SIGBUS: not something this function can turn into an error).
#ifndef TOKENLAKE_ENGINE_CUDA_WEIGHT_UPLOAD_H_
#define TOKENLAKE_ENGINE_CUDA_WEIGHT_UPLOAD_H_

#include <cstddef>
#include <cstdint>
#include <string>

#include "absl/status/statusor.h"
#include "absl/types/span.h"
#include "tokenlake/engine/safetensors.h"

namespace tokenlake::engine::cuda {

struct UploadTensor {
  // For messages.
  std::string name;
  // Host bytes, little-endian elements of src_dtype.
  absl::Span<const std::byte> src;
  // kF32, kF16 or kBF16.
  TensorDtype src_dtype = TensorDtype::kBF16;
  // Device memory for src.size() / sizeof(src_dtype) elements of dst_dtype.
  void* dst = nullptr;
  // kBF16 or kF32.
  TensorDtype dst_dtype = TensorDtype::kBF16;
};

struct UploadOptions {
  // Host threads copying chunks into staging buffers, >= 1 (capped at the number of chunks).
  int threads = 4;
  // Bytes of one staging buffer (rounded down to a multiple of 16), >= 16; also the largest
  // chunk.
  size_t staging_bytes = size_t{16} << 20;
  // Staging buffers per thread, >= 1 (2: fill one while the other is copied).
  int buffers_per_thread = 2;
};

struct UploadStats {
  // Source bytes copied.
  int64_t bytes = 0;
  // Chunks (cudaMemcpyAsync calls).
  int64_t chunks = 0;
  // Threads that ran.
  int threads = 0;
  // Whether the staging buffers were pinned.
  bool pinned = true;
  // Allocating the staging buffers, scratch, streams and events.
  double setup_seconds = 0;
  // From the first chunk to the end of the last copy and conversion (device synchronised).
  double copy_seconds = 0;
};

// Copies and converts every tensor on CUDA device `device`; returns after all the device work
// has finished (also on error).
// Errors: InvalidArgument (options out of range; a tensor with an unsupported src or dst dtype,
//   a size that is not a whole number of elements, or a null dst; names the tensor),
//   ResourceExhausted (device memory for scratch), Internal (a CUDA error, naming the call and
//   the tensor being copied).
absl::StatusOr<UploadStats> UploadTensors(absl::Span<const UploadTensor> tensors, int device,
                                          const UploadOptions& options);

}  // namespace tokenlake::engine::cuda

#endif  // TOKENLAKE_ENGINE_CUDA_WEIGHT_UPLOAD_H_
