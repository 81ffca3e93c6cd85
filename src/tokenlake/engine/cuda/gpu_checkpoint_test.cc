// Loading checkpoints onto the GPU: UploadTensors bit for bit against host conversions (every
// dtype pair, random chunk sizes, threads and staging buffers); random Llama checkpoints in
// bf16, f16 and f32, one file or random shards, loaded by GpuLlamaModel::Load give the CPU
// model's logits within the bf16 tolerance, and the same logits whatever the shards and the
// upload options; bad checkpoints and a model larger than the device give clear errors. Seeds
// are printed. GPU tests skip without a device.
#include <sys/stat.h>
#include <unistd.h>

#include <bit>
#include <cmath>
#include <cstring>
#include <filesystem>
#include <fstream>
#include <iostream>
#include <random>
#include <set>
#include <string>
#include <vector>

#include "absl/strings/str_format.h"
#include "gtest/gtest.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/engine/checkpoint.h"
#include "tokenlake/engine/checkpoint_testing.h"
#include "tokenlake/engine/checkpoint_writer.h"
#include "tokenlake/engine/cuda/gpu_engine.h"
#include "tokenlake/engine/cuda/gpu_llama.h"
#include "tokenlake/engine/cuda/gpu_test_util.h"
#include "tokenlake/engine/cuda/weight_upload.h"
#include "tokenlake/engine/engine.h"
#include "tokenlake/engine/llama_model.h"

namespace tokenlake::engine::cuda {
namespace {

using namespace testing_util;  // NOLINT

namespace fs = std::filesystem;

std::string FreshDir(const std::string& name) {
  const fs::path p = fs::path(testing::TempDir()) / ("gpu_ckpt_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

UploadOptions RandomUploadOptions(std::mt19937_64& rng) {
  // Staging buffers from 16 bytes (a chunk per few elements) to 64 KiB.
  return UploadOptions{.threads = 1 + static_cast<int>(rng() % 4),
                       .staging_bytes = size_t{16} << (rng() % 13),
                       .buffers_per_thread = 1 + static_cast<int>(rng() % 3)};
}

// Host reference of one element: the value of `src` (dtype s) element i as dtype d's bits.
uint32_t ReferenceBits(const std::string& src, TensorDtype s, TensorDtype d, size_t i) {
  float v = 0;
  if (s == TensorDtype::kF32) {
    std::memcpy(&v, src.data() + 4 * i, 4);
  } else {
    uint16_t bits;
    std::memcpy(&bits, src.data() + 2 * i, 2);
    if (s == d) return bits;  // BF16 -> BF16 is a copy
    v = s == TensorDtype::kBF16 ? attention::Bf16ToFloat(bits) : HalfToFloat(bits);
  }
  return d == TensorDtype::kF32 ? std::bit_cast<uint32_t>(v) : attention::FloatToBf16(v);
}

TEST(UploadTensorsTest, EveryConversionIsBitExactWhateverTheChunking) {
  SKIP_WITHOUT_GPU();
  for (uint64_t seed = 1; seed <= 20; ++seed) {
    SCOPED_TRACE(testing::Message() << "seed=" << seed);
    std::cout << "seed=" << seed << "\n";
    std::mt19937_64 rng(seed);
    static constexpr TensorDtype kSrc[] = {TensorDtype::kF32, TensorDtype::kF16,
                                           TensorDtype::kBF16};
    static constexpr TensorDtype kDst[] = {TensorDtype::kF32, TensorDtype::kBF16};
    const int count = 1 + static_cast<int>(rng() % 12);
    std::vector<std::string> sources(static_cast<size_t>(count));
    std::vector<DeviceBuffer> dsts(static_cast<size_t>(count));
    std::vector<UploadTensor> tensors;
    std::uniform_real_distribution<float> u(-4.f, 4.f);
    for (int i = 0; i < count; ++i) {
      const TensorDtype s = kSrc[rng() % 3];
      const TensorDtype d = kDst[rng() % 2];
      const size_t n = rng() % 3 == 0 ? rng() % 8 : rng() % 20000;
      std::string& src = sources[static_cast<size_t>(i)];
      src.resize(n * static_cast<size_t>(TensorDtypeBytes(s)));
      for (size_t e = 0; e < n; ++e) {
        const float v = u(rng);  // finite values of every magnitude the weights have
        if (s == TensorDtype::kF32) {
          std::memcpy(src.data() + 4 * e, &v, 4);
        } else {
          const uint16_t bits =
              s == TensorDtype::kBF16 ? attention::FloatToBf16(v) : FloatToHalf(v);
          std::memcpy(src.data() + 2 * e, &bits, 2);
        }
      }
      ASSERT_TRUE(dsts[static_cast<size_t>(i)].Allocate(n * TensorDtypeBytes(d)).ok());
      tensors.push_back(
          {.name = absl::StrFormat("t%d", i),
           .src = absl::MakeConstSpan(reinterpret_cast<const std::byte*>(src.data()), src.size()),
           .src_dtype = s,
           .dst = dsts[static_cast<size_t>(i)].get(),
           .dst_dtype = d});
    }
    const UploadOptions options = RandomUploadOptions(rng);
    auto stats = UploadTensors(tensors, 0, options);
    ASSERT_TRUE(stats.ok()) << stats.status();
    for (int i = 0; i < count; ++i) {
      const UploadTensor& t = tensors[static_cast<size_t>(i)];
      const size_t n = t.src.size() / TensorDtypeBytes(t.src_dtype);
      const size_t width = static_cast<size_t>(TensorDtypeBytes(t.dst_dtype));
      std::string got(n * width, '\0');
      if (n > 0) {
        ASSERT_EQ(cudaMemcpy(got.data(), t.dst, got.size(), cudaMemcpyDeviceToHost), cudaSuccess);
      }
      for (size_t e = 0; e < n; ++e) {
        uint32_t bits = 0;
        std::memcpy(&bits, got.data() + width * e, width);
        ASSERT_EQ(bits, ReferenceBits(sources[static_cast<size_t>(i)], t.src_dtype, t.dst_dtype, e))
            << t.name << " " << TensorDtypeName(t.src_dtype) << "->" << TensorDtypeName(t.dst_dtype)
            << " element " << e << " of " << n << ", staging " << options.staging_bytes;
      }
    }
  }
}

TEST(UploadTensorsTest, RejectsBadOptionsAndConversions) {
  std::string src(8, '\0');
  const auto span = absl::MakeConstSpan(reinterpret_cast<const std::byte*>(src.data()), 8);
  int dummy = 0;
  auto bad_options = UploadTensors({}, 0, {.threads = 0});
  EXPECT_EQ(bad_options.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_options.status().message().find("threads"), std::string::npos);
  const UploadTensor i32{.name = "ints",
                         .src = span,
                         .src_dtype = TensorDtype::kI32,
                         .dst = &dummy,
                         .dst_dtype = TensorDtype::kBF16};
  auto bad_dtype = UploadTensors({&i32, 1}, 0, {});
  EXPECT_EQ(bad_dtype.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_dtype.status().message().find("'ints'"), std::string::npos);
  EXPECT_NE(bad_dtype.status().message().find("I32"), std::string::npos);
  const UploadTensor odd{.name = "odd",
                         .src = span.subspan(0, 3),
                         .src_dtype = TensorDtype::kF16,
                         .dst = &dummy,
                         .dst_dtype = TensorDtype::kBF16};
  auto bad_size = UploadTensors({&odd, 1}, 0, {});
  EXPECT_EQ(bad_size.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad_size.status().message().find("'odd'"), std::string::npos);
}

LlamaConfig RandomConfig(std::mt19937_64& rng) {
  LlamaConfig c;
  c.head_dim = rng() % 2 == 0 ? 16 : 64;
  c.num_kv_heads = 1 + static_cast<int32_t>(rng() % 2);
  c.num_heads = c.num_kv_heads * (1 << (rng() % 3));
  c.hidden_size = c.head_dim == 16 ? 64 : 128;
  c.intermediate_size = c.hidden_size + 32 * static_cast<int32_t>(rng() % 3);
  c.num_layers = 1 + static_cast<int32_t>(rng() % 3);
  c.vocab_size = 128 + 64 * static_cast<int32_t>(rng() % 4);
  c.rms_norm_eps = 1e-5f;
  c.rope_theta = 10000.0;
  c.max_position_embeddings = 4096;
  c.tie_word_embeddings = rng() % 2 == 0;
  return c;
}

// Weights uniform in [-a, a], a = sqrt(3 / fan_in); RMSNorm weights 1 + uniform(-0.2, 0.2).
std::vector<TensorToWrite> RandomTensors(const LlamaConfig& c, TensorDtype dtype,
                                         std::mt19937_64& rng) {
  return testing_checkpoint::LlamaTensorsFilled(
      c,
      [&](const std::vector<int64_t>& shape, bool norm, std::vector<float>& v) {
        const float a = norm ? 0.2f : std::sqrt(3.0f / static_cast<float>(shape.back()));
        std::uniform_real_distribution<float> u(-a, a);
        for (float& x : v) x = norm ? 1.0f + u(rng) : u(rng);
      },
      dtype);
}

// The GPU engine's logits at the last prompt position (one new token, no cache).
std::vector<float> GpuLogits(GpuLlamaModel* model, const std::vector<int32_t>& prompt) {
  auto engine = GpuEngine::Create(model, {.num_instances = 1});
  EXPECT_TRUE(engine.ok()) << engine.status();
  if (!engine.ok()) return {};
  auto r = (*engine)->Generate(prompt, 1);
  EXPECT_TRUE(r.ok()) << r.status();
  return r.ok() ? r->last_logits : std::vector<float>{};
}

class GpuCheckpointRandomTest : public testing::TestWithParam<uint64_t> {};

TEST_P(GpuCheckpointRandomTest, EveryDtypeSingleOrShardedMatchesTheCpuModel) {
  SKIP_WITHOUT_GPU();
  const uint64_t seed = GetParam();
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  const LlamaConfig c = RandomConfig(rng);
  std::vector<int32_t> prompt(5 + rng() % 40);
  for (int32_t& t : prompt) t = static_cast<int32_t>(rng() % c.vocab_size);
  for (TensorDtype dtype : {TensorDtype::kBF16, TensorDtype::kF16, TensorDtype::kF32}) {
    SCOPED_TRACE(TensorDtypeName(dtype));
    const std::vector<TensorToWrite> tensors = RandomTensors(c, dtype, rng);
    const std::string single =
        FreshDir(absl::StrFormat("single_%d_%s", seed, TensorDtypeName(dtype)));
    const std::string sharded =
        FreshDir(absl::StrFormat("sharded_%d_%s", seed, TensorDtypeName(dtype)));
    const int32_t num_shards = 2 + static_cast<int32_t>(rng() % 3);
    std::vector<int32_t> shard_of;
    for (size_t i = 0; i < tensors.size(); ++i)
      shard_of.push_back(static_cast<int32_t>(rng() % num_shards));
    ASSERT_TRUE(testing_checkpoint::WriteTensorsCheckpoint(single, c, tensors, {}, 0).ok());
    ASSERT_TRUE(
        testing_checkpoint::WriteTensorsCheckpoint(sharded, c, tensors, shard_of, num_shards).ok());

    auto cpu = LlamaModel::Load(single);
    ASSERT_TRUE(cpu.ok()) << cpu.status();
    auto reference = Engine::Create(cpu->get(), {.use_pool = false});
    ASSERT_TRUE(reference.ok()) << reference.status();
    auto want = (*reference)->Generate(prompt, 1);
    ASSERT_TRUE(want.ok()) << want.status();

    auto gpu_single = GpuLlamaModel::Load(single, {});
    ASSERT_TRUE(gpu_single.ok()) << gpu_single.status();
    GpuLlamaModel::Options options;
    options.upload = RandomUploadOptions(rng);
    auto gpu_sharded = GpuLlamaModel::Load(sharded, options);
    ASSERT_TRUE(gpu_sharded.ok()) << gpu_sharded.status();
    const GpuLlamaModel::LoadStats& st = (*gpu_sharded)->load_stats();
    EXPECT_EQ(static_cast<size_t>(st.shards),
              std::set<int32_t>(shard_of.begin(), shard_of.end()).size());
    EXPECT_GT(st.upload.chunks, 0);
    EXPECT_GE(st.total_seconds, st.upload_seconds);
    // The weights' device bytes, known before loading (pools are sized with them): every
    // checkpoint tensor as bf16, the norms as f32.
    int64_t weight_bytes = 0;
    for (const LlamaTensorSpec& spec : LlamaCheckpointTensors(c)) {
      int64_t n = 1;
      for (int64_t d : spec.shape) n *= d;
      weight_bytes += n * (spec.is_norm() ? 4 : 2);
    }
    EXPECT_EQ(st.device_bytes, weight_bytes);
    EXPECT_EQ(GpuLlamaModel::WeightDeviceBytes(c), weight_bytes);

    const std::vector<float> a = GpuLogits(gpu_single->get(), prompt);
    const std::vector<float> b = GpuLogits(gpu_sharded->get(), prompt);
    const float tol = Bf16Tolerance(want->last_logits);
    std::cout << absl::StrFormat(
        "%s: %d shards, staging %d bytes x %d x %d threads: max|gpu - cpu| %.5f (tol %.4f)\n",
        TensorDtypeName(dtype), num_shards, options.upload.staging_bytes,
        options.upload.buffers_per_thread, options.upload.threads, MaxAbsDiff(a, want->last_logits),
        tol);
    EXPECT_LE(MaxAbsDiff(a, want->last_logits), tol);
    EXPECT_LE(MaxAbsDiff(b, want->last_logits), tol);
    // The same bf16 weights on the device, whatever the shards and the chunking: the same
    // forward, bit for bit (cuBLAS is deterministic for the same problem on the same GPU).
    EXPECT_EQ(a, b);
  }
}

INSTANTIATE_TEST_SUITE_P(Seeds, GpuCheckpointRandomTest, testing::Values(1, 2, 3, 4, 5, 6));

TEST(GpuCheckpointTest, BadTensorsAreNamedBeforeAnyUpload) {
  SKIP_WITHOUT_GPU();
  std::mt19937_64 rng(11);
  LlamaConfig c = RandomConfig(rng);
  c.tie_word_embeddings = false;
  c.vocab_size = c.hidden_size + 64;  // so that the transposed LM head below has another shape
  std::vector<TensorToWrite> tensors = RandomTensors(c, TensorDtype::kBF16, rng);
  std::vector<int32_t> shard_of(tensors.size(), 0);
  shard_of.back() = 1;  // lm_head alone in the second shard
  const std::string dir = FreshDir("bad");
  // An integer tensor.
  TensorToWrite& head = tensors.back();
  head.dtype = TensorDtype::kI16;
  ASSERT_TRUE(testing_checkpoint::WriteTensorsCheckpoint(dir, c, tensors, shard_of, 2).ok());
  auto ints = GpuLlamaModel::Load(dir, {});
  EXPECT_EQ(ints.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(ints.status().message().find("lm_head.weight"), std::string::npos) << ints.status();
  EXPECT_NE(ints.status().message().find("model-00002-of-00002.safetensors"), std::string::npos);
  // A transposed tensor.
  head.dtype = TensorDtype::kBF16;
  head.shape = {head.shape[1], head.shape[0]};
  ASSERT_TRUE(testing_checkpoint::WriteTensorsCheckpoint(dir, c, tensors, shard_of, 2).ok());
  auto shape = GpuLlamaModel::Load(dir, {});
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(shape.status().message().find("lm_head.weight"), std::string::npos) << shape.status();
  // A missing one: the index is named.
  tensors.pop_back();
  shard_of.pop_back();
  fs::remove_all(dir);
  fs::create_directories(dir);
  ASSERT_TRUE(testing_checkpoint::WriteTensorsCheckpoint(dir, c, tensors, shard_of, 2).ok());
  auto missing = GpuLlamaModel::Load(dir, {});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("model.safetensors.index.json"), std::string::npos)
      << missing.status();
  // Bad upload options.
  tensors = RandomTensors(c, TensorDtype::kBF16, rng);
  ASSERT_TRUE(testing_checkpoint::WriteTensorsCheckpoint(dir, c, tensors, {}, 0).ok());
  GpuLlamaModel::Options options;
  options.upload.staging_bytes = 8;
  auto staging = GpuLlamaModel::Load(dir, options);
  EXPECT_EQ(staging.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(staging.status().message().find("staging_bytes"), std::string::npos);
}

// A checkpoint larger than the device: a sparse file whose header lists the tensors of a model
// several times the device's memory (nothing is read): the error names both sizes.
TEST(GpuCheckpointTest, ModelLargerThanTheDeviceNamesTheBytesAskedAndFree) {
  SKIP_WITHOUT_GPU();
  size_t free_bytes = 0, total_bytes = 0;
  ASSERT_EQ(cudaMemGetInfo(&free_bytes, &total_bytes), cudaSuccess);
  LlamaConfig c{.vocab_size = 32000,
                .hidden_size = 8192,
                .intermediate_size = 28672,
                .num_layers = 1,
                .num_heads = 64,
                .num_kv_heads = 8,
                .head_dim = 128,
                .rms_norm_eps = 1e-5f,
                .rope_theta = 10000.0,
                .max_position_embeddings = 4096,
                .tie_word_embeddings = false};
  // About 1.6 GB of bf16 per layer: enough layers for twice the device.
  c.num_layers = static_cast<int32_t>(2 * total_bytes / 1'600'000'000 + 1);
  std::vector<TensorLayout> layout;
  int64_t data = 0;
  for (const LlamaTensorSpec& s : LlamaCheckpointTensors(c)) {
    layout.push_back({s.name, TensorDtype::kBF16, s.shape});
    int64_t n = 2;
    for (int64_t d : s.shape) n *= d;
    data += n;
  }
  const std::string dir = FreshDir("huge");
  ASSERT_TRUE(WriteLlamaConfig(dir, c).ok());
  const std::string path = dir + "/model.safetensors";
  const std::string header = SafetensorsHeader(layout);
  {
    std::ofstream out(path, std::ios::binary);
    out << header;
  }
  if (::truncate(path.c_str(), static_cast<off_t>(header.size() + data)) != 0) {
    GTEST_SKIP() << "this file system cannot hold a sparse file of " << header.size() + data
                 << " bytes";
  }
  auto m = GpuLlamaModel::Load(dir, {});
  fs::remove_all(dir);
  EXPECT_EQ(m.status().code(), absl::StatusCode::kResourceExhausted) << m.status();
  EXPECT_NE(m.status().message().find("need"), std::string::npos) << m.status();
  EXPECT_NE(m.status().message().find("free"), std::string::npos) << m.status();
}

}  // namespace
}  // namespace tokenlake::engine::cuda
