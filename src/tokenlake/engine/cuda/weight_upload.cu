#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime_api.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>
#include <memory>
#include <mutex>
#include <thread>
#include <vector>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/cuda/weight_upload.h"

namespace tokenlake::engine::cuda {
namespace {

constexpr int kThreads = 256;

enum class Conversion : int { kCopy, kF32ToBf16, kF16ToBf16, kBf16ToF32, kF16ToF32 };

__global__ void ConvertKernel(const void* __restrict__ in, int64_t n, void* __restrict__ out,
                              Conversion conversion) {
  for (int64_t i = blockIdx.x * static_cast<int64_t>(blockDim.x) + threadIdx.x; i < n;
       i += static_cast<int64_t>(gridDim.x) * blockDim.x) {
    switch (conversion) {
      case Conversion::kF32ToBf16:
        static_cast<uint16_t*>(out)[i] =
            __bfloat16_as_ushort(__float2bfloat16_rn(static_cast<const float*>(in)[i]));
        break;
      case Conversion::kF16ToBf16:
        static_cast<uint16_t*>(out)[i] = __bfloat16_as_ushort(__float2bfloat16_rn(
            __half2float(__ushort_as_half(static_cast<const uint16_t*>(in)[i]))));
        break;
      case Conversion::kBf16ToF32:
        static_cast<float*>(out)[i] =
            __uint_as_float(static_cast<uint32_t>(static_cast<const uint16_t*>(in)[i]) << 16);
        break;
      case Conversion::kF16ToF32:
        static_cast<float*>(out)[i] =
            __half2float(__ushort_as_half(static_cast<const uint16_t*>(in)[i]));
        break;
      case Conversion::kCopy:
        break;
    }
  }
}

absl::StatusOr<Conversion> ConversionOf(const UploadTensor& t) {
  const bool src_ok = t.src_dtype == TensorDtype::kF32 || t.src_dtype == TensorDtype::kF16 ||
                      t.src_dtype == TensorDtype::kBF16;
  const bool dst_ok = t.dst_dtype == TensorDtype::kF32 || t.dst_dtype == TensorDtype::kBF16;
  if (!src_ok || !dst_ok) {
    return absl::InvalidArgumentError(
        absl::StrFormat("UploadTensors: tensor '%s': no conversion from %s to %s", t.name,
                        TensorDtypeName(t.src_dtype), TensorDtypeName(t.dst_dtype)));
  }
  if (t.src_dtype == t.dst_dtype) return Conversion::kCopy;
  if (t.dst_dtype == TensorDtype::kBF16) {
    return t.src_dtype == TensorDtype::kF32 ? Conversion::kF32ToBf16 : Conversion::kF16ToBf16;
  }
  return t.src_dtype == TensorDtype::kBF16 ? Conversion::kBf16ToF32 : Conversion::kF16ToF32;
}

struct Chunk {
  size_t tensor = 0;
  int64_t offset = 0;  // bytes into the source
  int64_t bytes = 0;
};

struct Slot {
  void* host = nullptr;
  bool pinned = false;
  DeviceBuffer scratch;  // source bytes of a chunk that needs a conversion
  cudaEvent_t done = nullptr;
  bool in_flight = false;
};

struct Worker {
  cudaStream_t stream = nullptr;
  std::vector<Slot> slots;
};

// Owns the workers' resources; frees them after their work has finished.
struct Workers {
  std::vector<Worker> all;
  ~Workers() {
    for (Worker& w : all) {
      if (w.stream != nullptr) cudaStreamSynchronize(w.stream);
    }
    for (Worker& w : all) {
      for (Slot& s : w.slots) {
        if (s.done != nullptr) cudaEventDestroy(s.done);
        if (s.pinned) {
          cudaFreeHost(s.host);
        } else {
          std::free(s.host);
        }
      }
      if (w.stream != nullptr) cudaStreamDestroy(w.stream);
    }
    cudaGetLastError();
  }
};

double Seconds(std::chrono::steady_clock::time_point from) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - from).count();
}

}  // namespace

absl::StatusOr<UploadStats> UploadTensors(absl::Span<const UploadTensor> tensors, int device,
                                          const UploadOptions& options) {
  if (options.threads < 1 || options.buffers_per_thread < 1 || options.staging_bytes < 16) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "UploadTensors: threads %d and buffers_per_thread %d must be >= 1, staging_bytes %d >= 16",
        options.threads, options.buffers_per_thread, options.staging_bytes));
  }
  const auto start = std::chrono::steady_clock::now();
  const int64_t staging = static_cast<int64_t>(options.staging_bytes / 16 * 16);
  std::vector<Conversion> conversions;
  std::vector<Chunk> chunks;
  bool any_conversion = false;
  UploadStats stats;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const UploadTensor& t = tensors[i];
    TOKENLAKE_ASSIGN_OR_RETURN(Conversion conv, ConversionOf(t));
    conversions.push_back(conv);
    const int64_t bytes = static_cast<int64_t>(t.src.size());
    if (bytes % TensorDtypeBytes(t.src_dtype) != 0 || (bytes > 0 && t.dst == nullptr)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "UploadTensors: tensor '%s': %d bytes of %s%s", t.name, bytes,
          TensorDtypeName(t.src_dtype), t.dst == nullptr ? " to a null destination" : ""));
    }
    for (int64_t off = 0; off < bytes; off += staging) {
      chunks.push_back({i, off, std::min(staging, bytes - off)});
      if (conv != Conversion::kCopy) any_conversion = true;
    }
    stats.bytes += bytes;
  }
  stats.chunks = static_cast<int64_t>(chunks.size());
  stats.threads =
      static_cast<int>(std::min<int64_t>(options.threads, std::max<int64_t>(stats.chunks, 1)));
  TOKENLAKE_RETURN_IF_ERROR(CudaStatus(cudaSetDevice(device), "UploadTensors: cudaSetDevice"));

  Workers workers;
  workers.all.resize(static_cast<size_t>(stats.threads));
  for (Worker& w : workers.all) {
    TOKENLAKE_RETURN_IF_ERROR(
        CudaStatus(cudaStreamCreateWithFlags(&w.stream, cudaStreamNonBlocking),
                   "UploadTensors: cudaStreamCreate"));
    w.slots.resize(static_cast<size_t>(options.buffers_per_thread));
    for (Slot& s : w.slots) {
      if (cudaHostAlloc(&s.host, static_cast<size_t>(staging), cudaHostAllocDefault) ==
          cudaSuccess) {
        s.pinned = true;
      } else {
        cudaGetLastError();
        s.host = std::malloc(static_cast<size_t>(staging));
        if (s.host == nullptr) {
          return absl::ResourceExhaustedError(
              absl::StrFormat("UploadTensors: cannot allocate a %d-byte staging buffer", staging));
        }
        stats.pinned = false;
      }
      TOKENLAKE_RETURN_IF_ERROR(
          CudaStatus(cudaEventCreateWithFlags(&s.done, cudaEventDisableTiming),
                     "UploadTensors: cudaEventCreate"));
      if (any_conversion) {
        TOKENLAKE_RETURN_IF_ERROR(s.scratch.Allocate(static_cast<size_t>(staging)));
      }
    }
  }
  stats.setup_seconds = Seconds(start);

  const auto copy_start = std::chrono::steady_clock::now();
  std::atomic<size_t> next_chunk{0};
  std::atomic<bool> failed{false};
  std::mutex error_mu;
  absl::Status error;
  auto fail = [&](const absl::Status& s) {
    std::lock_guard<std::mutex> lock(error_mu);
    if (error.ok()) error = s;
    failed = true;
  };
  auto run = [&](Worker& w) {
    if (absl::Status s = CudaStatus(cudaSetDevice(device), "UploadTensors: cudaSetDevice");
        !s.ok()) {
      fail(s);
      return;
    }
    size_t slot = 0;
    while (!failed.load(std::memory_order_relaxed)) {
      const size_t c = next_chunk.fetch_add(1);
      if (c >= chunks.size()) break;
      const Chunk& ch = chunks[c];
      const UploadTensor& t = tensors[ch.tensor];
      const Conversion conv = conversions[ch.tensor];
      Slot& s = w.slots[slot];
      slot = (slot + 1) % w.slots.size();
      auto check = [&](cudaError_t err, const char* what) {
        if (err == cudaSuccess) return true;
        fail(CudaStatus(err,
                        absl::StrCat("UploadTensors: ", what, " (tensor '", t.name, "')").c_str()));
        return false;
      };
      if (s.in_flight && !check(cudaEventSynchronize(s.done), "cudaEventSynchronize")) break;
      std::memcpy(s.host, t.src.data() + ch.offset, static_cast<size_t>(ch.bytes));
      const int64_t src_elem = TensorDtypeBytes(t.src_dtype);
      const int64_t elements = ch.bytes / src_elem;
      char* dst = static_cast<char*>(t.dst) + ch.offset / src_elem * TensorDtypeBytes(t.dst_dtype);
      if (conv == Conversion::kCopy) {
        if (!check(cudaMemcpyAsync(dst, s.host, static_cast<size_t>(ch.bytes),
                                   cudaMemcpyHostToDevice, w.stream),
                   "cudaMemcpyAsync")) {
          break;
        }
      } else {
        if (!check(cudaMemcpyAsync(s.scratch.get(), s.host, static_cast<size_t>(ch.bytes),
                                   cudaMemcpyHostToDevice, w.stream),
                   "cudaMemcpyAsync")) {
          break;
        }
        const int64_t blocks = std::min<int64_t>((elements + kThreads - 1) / kThreads, 4096);
        ConvertKernel<<<static_cast<unsigned>(blocks), kThreads, 0, w.stream>>>(
            s.scratch.get(), elements, dst, conv);
        if (!check(cudaGetLastError(), "conversion kernel")) break;
      }
      if (!check(cudaEventRecord(s.done, w.stream), "cudaEventRecord")) break;
      s.in_flight = true;
    }
    if (absl::Status s =
            CudaStatus(cudaStreamSynchronize(w.stream), "UploadTensors: cudaStreamSynchronize");
        !s.ok()) {
      fail(s);
    }
  };
  std::vector<std::thread> threads;
  for (size_t i = 1; i < workers.all.size(); ++i)
    threads.emplace_back(run, std::ref(workers.all[i]));
  if (!workers.all.empty()) run(workers.all[0]);
  for (std::thread& th : threads) th.join();
  stats.copy_seconds = Seconds(copy_start);
  if (!error.ok()) return error;
  return stats;
}

}  // namespace tokenlake::engine::cuda
