// Checkpoint loading onto the GPU, timed.
//
//   checkpoint_load_timing write DIR [--shape llama2-7b|llama3-8b|tiny] [--dtype bf16|f16|f32]
//                                    [--shards N] [--seed S]
//     writes a random checkpoint of that shape into the existing folder DIR (config.json and
//     the weights, streamed to disk: WriteRandomLlamaCheckpoint).
//   checkpoint_load_timing load DIR OUT.json [--repeat N] [--no-sweep]
//     times GpuLlamaModel::Load(DIR) N times (default 3) with the default upload options, then
//     once per point of a sweep of the upload options (threads x staging buffer size), and, as
//     the bounds the load is measured against, the host-to-device copy bandwidth from pinned
//     memory and the rate of one thread's memcpy from the mapped checkpoint files into a
//     buffer. The CUDA context is created first and timed on its own (cuda_init_seconds), so
//     every load's figures are those of a process that already uses the GPU.
// Both modes print a line per result; `load` writes them as JSON with the revision given in
// $TOKENLAKE_REVISION (or "unknown").
#include <cuda_runtime_api.h>

#include <algorithm>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <string>
#include <thread>
#include <vector>

#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "tokenlake/engine/checkpoint.h"
#include "tokenlake/engine/checkpoint_writer.h"
#include "tokenlake/engine/cuda/gpu_llama.h"

namespace tokenlake::engine::cuda {
namespace {

using json = nlohmann::json;

double SecondsSince(std::chrono::steady_clock::time_point t) {
  return std::chrono::duration<double>(std::chrono::steady_clock::now() - t).count();
}

int Usage() {
  std::cerr << "usage: checkpoint_load_timing write DIR [--shape llama2-7b|llama3-8b|tiny] "
               "[--dtype bf16|f16|f32] [--shards N] [--seed S]\n"
               "       checkpoint_load_timing load DIR OUT.json [--repeat N] [--no-sweep]\n";
  return 2;
}

bool ShapeConfig(const std::string& shape, LlamaConfig* c) {
  if (absl::StatusOr<LlamaConfig> named = NamedLlamaConfig(shape); named.ok()) {
    *c = *named;
    return true;
  }
  if (shape == "tiny") {  // for trying the script out
    *c = {.vocab_size = 512,
          .hidden_size = 128,
          .intermediate_size = 256,
          .num_layers = 2,
          .num_heads = 2,
          .num_kv_heads = 1,
          .head_dim = 64,
          .rms_norm_eps = 1e-5f,
          .rope_theta = 10000.0,
          .max_position_embeddings = 4096,
          .tie_word_embeddings = false};
    return true;
  }
  return false;
}

int Write(const std::string& dir, int argc, char** argv) {
  std::string shape = "llama2-7b", dtype_name = "bf16";
  int32_t shards = 3;
  uint64_t seed = 1;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (i + 1 >= argc) return Usage();
    if (a == "--shape") {
      shape = argv[++i];
    } else if (a == "--dtype") {
      dtype_name = argv[++i];
    } else if (a == "--shards") {
      shards = std::atoi(argv[++i]);
    } else if (a == "--seed") {
      seed = std::strtoull(argv[++i], nullptr, 10);
    } else {
      return Usage();
    }
  }
  LlamaConfig c;
  if (!ShapeConfig(shape, &c)) return Usage();
  const TensorDtype dtype = dtype_name == "f32"   ? TensorDtype::kF32
                            : dtype_name == "f16" ? TensorDtype::kF16
                                                  : TensorDtype::kBF16;
  if (dtype_name != "f32" && dtype_name != "f16" && dtype_name != "bf16") return Usage();
  const auto start = std::chrono::steady_clock::now();
  if (absl::Status s = WriteRandomLlamaCheckpoint(dir, c, dtype, shards, seed); !s.ok()) {
    std::cerr << s << "\n";
    return 1;
  }
  std::printf("wrote %s %s checkpoint in %d shard(s) to %s in %.1f s\n", shape.c_str(),
              dtype_name.c_str(), shards, dir.c_str(), SecondsSince(start));
  return 0;
}

// Host-to-device bandwidth from pinned memory (GB/s), the best of 5 copies of 256 MiB.
double PinnedH2DGBps() {
  const size_t bytes = size_t{256} << 20;
  void* host = nullptr;
  void* dev = nullptr;
  if (cudaHostAlloc(&host, bytes, cudaHostAllocDefault) != cudaSuccess ||
      cudaMalloc(&dev, bytes) != cudaSuccess) {
    cudaGetLastError();
    if (host != nullptr) cudaFreeHost(host);
    return 0;
  }
  std::memset(host, 1, bytes);
  double best = 1e30;
  for (int i = 0; i < 5; ++i) {
    const auto t = std::chrono::steady_clock::now();
    cudaMemcpy(dev, host, bytes, cudaMemcpyHostToDevice);
    best = std::min(best, SecondsSince(t));
  }
  cudaFree(dev);
  cudaFreeHost(host);
  return static_cast<double>(bytes) / best / 1e9;
}

// One thread's memcpy rate (GB/s) from the mapped shards (page cache) into a 16 MiB buffer,
// over at most the first 4 GiB of the checkpoint's tensors.
double MappedMemcpyGBps(const Checkpoint& ckpt) {
  std::vector<std::byte> buf(size_t{16} << 20);
  int64_t done = 0;
  const int64_t limit = int64_t{4} << 30;
  const auto t = std::chrono::steady_clock::now();
  for (const auto& [name, tensor] : ckpt.tensors()) {
    const absl::Span<const std::byte> data = ckpt.Data(tensor);
    for (size_t off = 0; off < data.size() && done < limit; off += buf.size()) {
      const size_t n = std::min(buf.size(), data.size() - off);
      std::memcpy(buf.data(), data.data() + off, n);
      done += static_cast<int64_t>(n);
    }
    if (done >= limit) break;
  }
  const double s = SecondsSince(t);
  return s > 0 ? static_cast<double>(done) / s / 1e9 : 0;
}

json StatsJson(const GpuLlamaModel::LoadStats& s, const UploadOptions& o) {
  return {{"open_seconds", s.open_seconds},
          {"init_seconds", s.init_seconds},
          {"allocate_seconds", s.allocate_seconds},
          {"upload_seconds", s.upload_seconds},
          {"total_seconds", s.total_seconds},
          {"upload_setup_seconds", s.upload.setup_seconds},
          {"upload_copy_seconds", s.upload.copy_seconds},
          {"upload_gbps", s.upload.copy_seconds > 0
                              ? static_cast<double>(s.upload.bytes) / s.upload.copy_seconds / 1e9
                              : 0.0},
          {"chunks", s.upload.chunks},
          {"pinned", s.upload.pinned},
          {"threads", o.threads},
          {"staging_bytes", o.staging_bytes},
          {"buffers_per_thread", o.buffers_per_thread}};
}

int Load(const std::string& dir, const std::string& out_path, int argc, char** argv) {
  int repeat = 3;
  bool sweep = true;
  for (int i = 0; i < argc; ++i) {
    const std::string a = argv[i];
    if (a == "--repeat" && i + 1 < argc) {
      repeat = std::max(1, std::atoi(argv[++i]));
    } else if (a == "--no-sweep") {
      sweep = false;
    } else {
      return Usage();
    }
  }
  json out;
  const char* rev = std::getenv("TOKENLAKE_REVISION");
  out["revision"] = rev != nullptr ? rev : "unknown";
  out["checkpoint_dir"] = dir;
  out["host_threads"] = std::thread::hardware_concurrency();
  const auto init = std::chrono::steady_clock::now();
  if (cudaSetDevice(0) != cudaSuccess || cudaFree(nullptr) != cudaSuccess) {
    std::cerr << "no usable CUDA device\n";
    return 1;
  }
  out["cuda_init_seconds"] = SecondsSince(init);
  cudaDeviceProp prop{};
  if (cudaGetDeviceProperties(&prop, 0) == cudaSuccess) out["gpu_name"] = prop.name;
  {
    auto ckpt = Checkpoint::Open(dir);
    if (!ckpt.ok()) {
      std::cerr << ckpt.status() << "\n";
      return 1;
    }
    out["checkpoint_bytes"] = (*ckpt)->total_bytes();
    out["shards"] = (*ckpt)->shards().size();
    out["mapped_memcpy_gbps_1_thread"] = MappedMemcpyGBps(**ckpt);
  }
  out["pinned_h2d_gbps"] = PinnedH2DGBps();
  std::printf(
      "%s, %.2f GB in %d shard(s); pinned H2D %.1f GB/s, memcpy from the mapping %.1f "
      "GB/s (1 thread); CUDA init %.2f s\n",
      out.value("gpu_name", std::string("?")).c_str(), out["checkpoint_bytes"].get<int64_t>() / 1e9,
      out["shards"].get<int>(), out["pinned_h2d_gbps"].get<double>(),
      out["mapped_memcpy_gbps_1_thread"].get<double>(), out["cuda_init_seconds"].get<double>());

  auto run = [&](const UploadOptions& o) -> json {
    GpuLlamaModel::Options options;
    options.upload = o;
    auto m = GpuLlamaModel::Load(dir, options);
    if (!m.ok()) {
      std::cerr << m.status() << "\n";
      return json();
    }
    const GpuLlamaModel::LoadStats& s = (*m)->load_stats();
    std::printf(
        "load: threads %d, staging %zu MiB x %d: total %.3f s (open %.3f, init %.3f, "
        "allocate %.3f, upload %.3f = setup %.3f + copy %.3f at %.1f GB/s)\n",
        o.threads, o.staging_bytes >> 20, o.buffers_per_thread, s.total_seconds, s.open_seconds,
        s.init_seconds, s.allocate_seconds, s.upload_seconds, s.upload.setup_seconds,
        s.upload.copy_seconds, s.upload.bytes / std::max(s.upload.copy_seconds, 1e-9) / 1e9);
    std::fflush(stdout);
    return StatsJson(s, o);
  };
  json loads = json::array();
  std::vector<double> totals;
  for (int r = 0; r < repeat; ++r) {
    json j = run(UploadOptions{});
    if (j.is_null()) return 1;
    totals.push_back(j["total_seconds"].get<double>());
    loads.push_back(std::move(j));
  }
  std::sort(totals.begin(), totals.end());
  out["default_loads"] = loads;
  out["default_total_seconds_median"] = totals[totals.size() / 2];
  if (sweep) {
    json points = json::array();
    for (int threads : {1, 2, 4, 8}) {
      for (size_t mib : {4, 16, 64}) {
        json j = run({.threads = threads, .staging_bytes = mib << 20, .buffers_per_thread = 2});
        if (j.is_null()) return 1;
        points.push_back(std::move(j));
      }
    }
    out["sweep"] = points;
  }
  std::ofstream os(out_path);
  os << out.dump(1) << "\n";
  if (!os) {
    std::cerr << out_path << ": cannot write\n";
    return 1;
  }
  std::printf("median total %.3f s over %d loads -> %s\n",
              out["default_total_seconds_median"].get<double>(), repeat, out_path.c_str());
  return 0;
}

}  // namespace
}  // namespace tokenlake::engine::cuda

int main(int argc, char** argv) {
  using namespace tokenlake::engine::cuda;  // NOLINT
  if (argc < 3) return Usage();
  const std::string mode = argv[1];
  if (mode == "write") return Write(argv[2], argc - 3, argv + 3);
  if (mode == "load" && argc >= 4) return Load(argv[2], argv[3], argc - 4, argv + 4);
  return Usage();
}
