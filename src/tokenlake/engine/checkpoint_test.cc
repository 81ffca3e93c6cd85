// Checkpoint folders: random tensors split over random shards read back exactly as the single
// file holding the same tensors (seed printed); every malformed index or shard set gives an
// error naming the file and the tensor; the writers (streamed shards, the random Llama
// checkpoint) load through LlamaModel as the single-file image does.
#include "tokenlake/engine/checkpoint.h"

#include <sys/stat.h>
#include <unistd.h>

#include <algorithm>
#include <cmath>
#include <cstdlib>
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
#include "tokenlake/engine/checkpoint_testing.h"
#include "tokenlake/engine/checkpoint_writer.h"
#include "tokenlake/engine/llama_model.h"
#include "tokenlake/engine/local_backend.h"

namespace tokenlake::engine {
namespace {

namespace fs = std::filesystem;

// A fresh empty folder under the test's temporary directory.
std::string FreshDir(const std::string& name) {
  const fs::path p = fs::path(testing::TempDir()) / ("ckpt_" + name);
  fs::remove_all(p);
  fs::create_directories(p);
  return p.string();
}

void WriteText(const std::string& path, const std::string& text) {
  std::ofstream out(path, std::ios::binary);
  out << text;
  ASSERT_TRUE(out.good()) << path;
}

std::string F32Bytes(std::vector<float> v) {
  std::string s(v.size() * 4, '\0');
  if (!v.empty()) std::memcpy(s.data(), v.data(), s.size());
  return s;
}

TensorToWrite F32(const std::string& name, std::vector<float> v) {
  const int64_t n = static_cast<int64_t>(v.size());
  return {name, TensorDtype::kF32, {n}, F32Bytes(std::move(v))};
}

void ExpectError(const absl::StatusOr<std::unique_ptr<Checkpoint>>& c, absl::StatusCode code,
                 const std::vector<std::string>& needles) {
  ASSERT_FALSE(c.ok()) << "expected an error mentioning " << needles[0];
  EXPECT_EQ(c.status().code(), code) << c.status();
  for (const std::string& n : needles) {
    EXPECT_NE(c.status().message().find(n), std::string::npos)
        << "wanted '" << n << "' in: " << c.status();
  }
}

// Random tensors: names, dtypes (float and not), shapes of rank 0-3 (with empty ones), bytes.
std::vector<TensorToWrite> RandomTensors(std::mt19937_64& rng) {
  static constexpr TensorDtype kDtypes[] = {TensorDtype::kF32, TensorDtype::kBF16,
                                            TensorDtype::kF16, TensorDtype::kI32,
                                            TensorDtype::kU8,  TensorDtype::kI64};
  const int count = 1 + static_cast<int>(rng() % 40);
  std::vector<TensorToWrite> out;
  for (int i = 0; i < count; ++i) {
    TensorToWrite t;
    t.name = absl::StrFormat("layer.%d.w%d", i, static_cast<int>(rng() % 1000));
    t.dtype = kDtypes[rng() % 6];
    const int rank = static_cast<int>(rng() % 4);
    int64_t n = 1;
    for (int d = 0; d < rank; ++d) {
      t.shape.push_back(static_cast<int64_t>(rng() % 8));
      n *= t.shape.back();
    }
    t.bytes.resize(static_cast<size_t>(n * TensorDtypeBytes(t.dtype)));
    for (char& b : t.bytes) b = static_cast<char>(rng());
    if (t.dtype == TensorDtype::kF32) {
      // Finite values so that ReadFloat32 compares by value.
      std::vector<float> v(static_cast<size_t>(n));
      for (float& x : v) x = static_cast<float>(static_cast<int32_t>(rng() % 2001) - 1000) / 8;
      t.bytes = F32Bytes(v);
    }
    out.push_back(std::move(t));
  }
  return out;
}

class CheckpointRandomTest : public testing::TestWithParam<uint64_t> {};

TEST_P(CheckpointRandomTest, ShardedFolderReadsAsTheSingleFile) {
  const uint64_t seed = GetParam();
  SCOPED_TRACE(testing::Message() << "seed=" << seed);
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  const std::vector<TensorToWrite> tensors = RandomTensors(rng);
  const int32_t num_shards = 1 + static_cast<int32_t>(rng() % 6);
  std::vector<int32_t> shard_of;
  for (size_t i = 0; i < tensors.size(); ++i) {
    shard_of.push_back(static_cast<int32_t>(rng() % num_shards));
  }
  std::vector<TensorLayout> layout;
  for (const auto& t : tensors) layout.push_back({t.name, t.dtype, t.shape});
  auto fill = [&](size_t i, int64_t offset, absl::Span<std::byte> out) {
    std::memcpy(out.data(), tensors[i].bytes.data() + offset, out.size());
  };
  const std::string single_dir = FreshDir(absl::StrCat("single_", seed));
  const std::string sharded_dir = FreshDir(absl::StrCat("sharded_", seed));
  ASSERT_TRUE(WriteCheckpoint(single_dir, layout, {}, 0, fill).ok());
  ASSERT_TRUE(WriteCheckpoint(sharded_dir, layout, shard_of, num_shards, fill).ok());
  // The single file is exactly SerializeSafetensors' image of the same tensors.
  std::ifstream in(single_dir + "/model.safetensors", std::ios::binary);
  const std::string on_disk((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(on_disk, SerializeSafetensors(tensors, {{"format", "pt"}}));

  auto single = Checkpoint::Open(single_dir);
  ASSERT_TRUE(single.ok()) << single.status();
  auto sharded = Checkpoint::Open(sharded_dir);
  ASSERT_TRUE(sharded.ok()) << sharded.status();
  EXPECT_EQ((*single)->shards().size(), 1u);
  EXPECT_EQ((*sharded)->shards().size(),
            std::set<int32_t>(shard_of.begin(), shard_of.end()).size());
  EXPECT_EQ((*single)->tensors().size(), tensors.size());
  EXPECT_EQ((*sharded)->tensors().size(), tensors.size());
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    const TensorToWrite& want = tensors[i];
    total += static_cast<int64_t>(want.bytes.size());
    for (const Checkpoint* c : {single->get(), sharded->get()}) {
      const CheckpointTensor* t = c->Find(want.name);
      ASSERT_NE(t, nullptr) << want.name;
      EXPECT_EQ(t->info->dtype, want.dtype) << want.name;
      EXPECT_EQ(t->info->shape, want.shape) << want.name;
      const absl::Span<const std::byte> data = c->Data(*t);
      ASSERT_EQ(data.size(), want.bytes.size()) << want.name;
      EXPECT_EQ(std::memcmp(data.data(), want.bytes.data(), data.size()), 0) << want.name;
    }
    const std::string shard_path = sharded_dir + "/" + ShardFileName(shard_of[i], num_shards);
    EXPECT_EQ((*sharded)->Find(want.name)->shard->source_name(), shard_path);
    if (want.dtype == TensorDtype::kF32) {
      std::vector<float> expected(want.bytes.size() / 4);
      if (!expected.empty()) std::memcpy(expected.data(), want.bytes.data(), want.bytes.size());
      auto got = (*sharded)->ReadFloat32(want.name, want.shape);
      ASSERT_TRUE(got.ok()) << got.status();
      EXPECT_EQ(*got, expected);
    }
  }
  EXPECT_EQ((*single)->total_bytes(), total);
  EXPECT_EQ((*sharded)->total_bytes(), total);
  EXPECT_EQ((*sharded)->Find("no.such.tensor"), nullptr);
  auto missing = (*sharded)->ReadFloat32("no.such.tensor", {1});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("model.safetensors.index.json"), std::string::npos);
  EXPECT_NE(missing.status().message().find("no.such.tensor"), std::string::npos);
}

INSTANTIATE_TEST_SUITE_P(Seeds, CheckpointRandomTest, testing::Range<uint64_t>(1, 31));

// A folder with shard files (name -> tensors) and an index text.
std::string ShardedDir(const std::string& name,
                       const std::map<std::string, std::vector<TensorToWrite>>& shards,
                       const std::string& index_text) {
  const std::string dir = FreshDir(name);
  for (const auto& [file, tensors] : shards) {
    WriteText(dir + "/" + file, SerializeSafetensors(tensors));
  }
  WriteText(dir + "/model.safetensors.index.json", index_text);
  return dir;
}

TEST(CheckpointTest, NoCheckpointInTheFolderNamesBothFiles) {
  const std::string dir = FreshDir("empty");
  ExpectError(Checkpoint::Open(dir), absl::StatusCode::kNotFound,
              {dir, "model.safetensors", "model.safetensors.index.json"});
  ExpectError(Checkpoint::Open(dir + "/absent"), absl::StatusCode::kNotFound, {"absent"});
}

TEST(CheckpointTest, MissingShardFileNamesTheShardTheIndexAndATensor) {
  const std::string dir =
      ShardedDir("missing_shard", {{"a.safetensors", {F32("x", {1, 2})}}},
                 R"({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})");
  ExpectError(Checkpoint::Open(dir), absl::StatusCode::kNotFound,
              {dir + "/b.safetensors", "model.safetensors.index.json", "'y'", "missing"});
}

TEST(CheckpointTest, TensorMappedToAShardThatLacksItIsNamed) {
  const std::string dir =
      ShardedDir("absent_tensor", {{"a.safetensors", {F32("x", {1})}}},
                 R"({"weight_map": {"x": "a.safetensors", "y": "a.safetensors"}})");
  ExpectError(Checkpoint::Open(dir), absl::StatusCode::kInvalidArgument,
              {"'y'", dir + "/a.safetensors", "does not hold it"});
  // Mapped to one shard, stored in another.
  const std::string moved = ShardedDir(
      "moved_tensor",
      {{"a.safetensors", {F32("x", {1}), F32("y", {2})}}, {"b.safetensors", {F32("z", {3})}}},
      R"({"weight_map": {"x": "a.safetensors", "y": "b.safetensors", "z": "b.safetensors"}})");
  ExpectError(Checkpoint::Open(moved), absl::StatusCode::kInvalidArgument,
              {"'y'", moved + "/b.safetensors", moved + "/a.safetensors"});
}

TEST(CheckpointTest, TensorInTwoShardsNamesBoth) {
  const std::string dir = ShardedDir(
      "two_shards",
      {{"a.safetensors", {F32("x", {1})}}, {"b.safetensors", {F32("x", {1}), F32("y", {2})}}},
      R"({"weight_map": {"x": "a.safetensors", "y": "b.safetensors"}})");
  ExpectError(Checkpoint::Open(dir), absl::StatusCode::kInvalidArgument,
              {"'x'", "two shards", dir + "/a.safetensors", dir + "/b.safetensors"});
}

TEST(CheckpointTest, ShardTensorMissingFromTheIndexIsNamed) {
  const std::string dir =
      ShardedDir("unlisted", {{"a.safetensors", {F32("x", {1}), F32("stray", {2})}}},
                 R"({"weight_map": {"x": "a.safetensors"}})");
  ExpectError(Checkpoint::Open(dir), absl::StatusCode::kInvalidArgument,
              {"'stray'", dir + "/a.safetensors", "not listed"});
}

TEST(CheckpointTest, ShardPathsThatLeaveTheFolderAreRefused) {
  // A valid shard outside the folder, so that only the check stops it from being read.
  const std::string outside = FreshDir("outside");
  WriteText(outside + "/evil.safetensors", SerializeSafetensors({F32("x", {1})}));
  struct Case {
    std::string shard;
    std::string why;
  };
  for (const Case& c : {Case{"../ckpt_outside/evil.safetensors", "'..'"},
                        Case{outside + "/evil.safetensors", "absolute"},
                        Case{"sub/../../ckpt_outside/evil.safetensors", "'..'"},
                        Case{"..\\\\evil.safetensors", "backslash"}, Case{"", "empty"}}) {
    const std::string dir =
        ShardedDir("escape", {}, absl::StrCat(R"({"weight_map": {"x": ")", c.shard, "\"}}"));
    ExpectError(Checkpoint::Open(dir), absl::StatusCode::kInvalidArgument,
                {"model.safetensors.index.json", "'x'", c.why});
  }
}

TEST(CheckpointTest, SymlinkedShardsAreFollowed) {
  // The Hugging Face cache: a snapshot's files are links to blobs in another folder.
  const std::string blobs = FreshDir("blobs");
  WriteText(blobs + "/0123abcd", SerializeSafetensors({F32("x", {1, 2, 3})}));
  const std::string dir =
      ShardedDir("linked", {}, R"({"weight_map": {"x": "model-00001-of-00001.safetensors"}})");
  ASSERT_EQ(
      ::symlink((blobs + "/0123abcd").c_str(), (dir + "/model-00001-of-00001.safetensors").c_str()),
      0);
  auto c = Checkpoint::Open(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  auto x = (*c)->ReadFloat32("x", {3});
  ASSERT_TRUE(x.ok()) << x.status();
  EXPECT_EQ(*x, (std::vector<float>{1, 2, 3}));
}

TEST(CheckpointTest, MalformedIndexIsNamed) {
  for (const std::string& text :
       {std::string("{not json"), std::string("[1]"), std::string("{}"),
        std::string(R"({"weight_map": []})"), std::string(R"({"weight_map": {}})"),
        std::string(R"({"weight_map": {"x": 3}})"),
        std::string(R"({"metadata": 5, "weight_map": {"x": "a.safetensors"}})")}) {
    const std::string dir = ShardedDir("malformed", {{"a.safetensors", {F32("x", {1})}}}, text);
    ExpectError(Checkpoint::Open(dir), absl::StatusCode::kInvalidArgument,
                {dir + "/model.safetensors.index.json"});
  }
  auto parsed = ParseCheckpointIndex(R"({"weight_map": {"x": 3}})", "idx");
  EXPECT_NE(parsed.status().message().find("'x'"), std::string::npos) << parsed.status();
}

TEST(CheckpointTest, BadShardHeaderNamesTheShard) {
  const std::string dir = FreshDir("bad_header");
  WriteText(dir + "/a.safetensors", std::string("\x05\0\0\0\0\0\0\0{bad}", 13));
  WriteText(dir + "/model.safetensors.index.json", R"({"weight_map": {"x": "a.safetensors"}})");
  ExpectError(Checkpoint::Open(dir), absl::StatusCode::kInvalidArgument, {dir + "/a.safetensors"});
}

TEST(CheckpointTest, SingleFileWinsOverAnIndexAndIndexListsSortedShards) {
  const std::string dir = FreshDir("both");
  WriteText(dir + "/model.safetensors", SerializeSafetensors({F32("x", {4})}));
  WriteText(dir + "/model.safetensors.index.json", "{broken");
  auto c = Checkpoint::Open(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  EXPECT_EQ((*c)->source_name(), dir + "/model.safetensors");
  auto index = ParseCheckpointIndex(
      R"({"metadata": {"total_size": 12}, "weight_map": {"a": "s2", "b": "s1", "c": "s2"}})",
      "idx");
  ASSERT_TRUE(index.ok()) << index.status();
  EXPECT_EQ(index->shards, (std::vector<std::string>{"s1", "s2"}));
  EXPECT_EQ(index->weight_map.at("b"), "s1");
}

TEST(CheckpointTest, FindFloatChecksShapeAndDtypeNamingTheShard) {
  const std::string dir =
      ShardedDir("find_float",
                 {{"a.safetensors", {F32("w", {1, 2, 3, 4})}},
                  {"b.safetensors", {{"ids", TensorDtype::kI32, {2}, std::string(8, '\0')}}}},
                 R"({"weight_map": {"w": "a.safetensors", "ids": "b.safetensors"}})");
  auto c = Checkpoint::Open(dir);
  ASSERT_TRUE(c.ok()) << c.status();
  auto w = (*c)->FindFloat("w", {4});
  ASSERT_TRUE(w.ok()) << w.status();
  EXPECT_EQ((*w)->info->name, "w");
  auto shape = (*c)->FindFloat("w", {2, 2});
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(shape.status().message().find(dir + "/a.safetensors"), std::string::npos);
  EXPECT_NE(shape.status().message().find("[4]"), std::string::npos);
  EXPECT_NE(shape.status().message().find("[2, 2]"), std::string::npos);
  auto ints = (*c)->FindFloat("ids", {2});
  EXPECT_EQ(ints.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(ints.status().message().find(dir + "/b.safetensors"), std::string::npos);
  EXPECT_NE(ints.status().message().find("I32"), std::string::npos);
  auto none = (*c)->FindFloat("nope", {1});
  EXPECT_EQ(none.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(none.status().message().find("model.safetensors.index.json"), std::string::npos);
}

TEST(CheckpointWriterTest, ContiguousShardsAreOrderedAndBalanced) {
  std::vector<TensorLayout> layout;
  for (int i = 0; i < 12; ++i) layout.push_back({absl::StrCat("t", i), TensorDtype::kF32, {100}});
  const std::vector<int32_t> s = ContiguousShards(layout, 3);
  EXPECT_EQ(s, (std::vector<int32_t>{0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2}));
  layout.push_back({"big", TensorDtype::kF32, {10000}});
  const std::vector<int32_t> t = ContiguousShards(layout, 3);
  for (size_t i = 1; i < t.size(); ++i) EXPECT_LE(t[i - 1], t[i]);
  // 4,800 small bytes, then 40,000: the big tensor's middle byte (24,800 of 44,800) is in the
  // second third.
  EXPECT_EQ(t.back(), 1);
  EXPECT_EQ(t[11], 0);
  EXPECT_EQ(ShardFileName(1, 3), "model-00002-of-00003.safetensors");
}

LlamaConfig SmallConfig(bool tied) {
  return LlamaConfig{.vocab_size = 96,
                     .hidden_size = 32,
                     .intermediate_size = 40,
                     .num_layers = 2,
                     .num_heads = 4,
                     .num_kv_heads = 2,
                     .head_dim = 8,
                     .rms_norm_eps = 1e-5f,
                     .rope_theta = 10000.0,
                     .max_position_embeddings = 256,
                     .tie_word_embeddings = tied};
}

std::vector<float> Logits(const LlamaModel& m, const std::vector<int32_t>& tokens) {
  LocalKvBackend backend(m.config());
  auto logits = m.Forward(tokens, 0, backend);
  EXPECT_TRUE(logits.ok()) << logits.status();
  return logits.ok() ? *logits : std::vector<float>{};
}

// The CPU model over a sharded folder (bf16, f16, f32) equals the model over the single-file
// image of the same tensors, logit for logit.
TEST(CheckpointLlamaTest, ShardedFolderLoadsAsTheImageInEveryDtype) {
  const uint64_t seed = 4242;
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  const std::vector<int32_t> prompt = {3, 17, 95, 0, 44, 8};
  for (TensorDtype dtype : {TensorDtype::kBF16, TensorDtype::kF16, TensorDtype::kF32}) {
    for (bool tied : {false, true}) {
      SCOPED_TRACE(testing::Message() << TensorDtypeName(dtype) << " tied=" << tied);
      const LlamaConfig c = SmallConfig(tied);
      std::uniform_real_distribution<float> u(-0.3f, 0.3f);
      const std::vector<TensorToWrite> tensors = testing_checkpoint::LlamaTensorsFilled(
          c,
          [&](const std::vector<int64_t>&, bool norm, std::vector<float>& v) {
            for (float& x : v) x = norm ? 1.0f + u(rng) : u(rng);
          },
          dtype);
      auto image = SafetensorsFile::FromBytes(SerializeSafetensors(tensors), "image");
      ASSERT_TRUE(image.ok()) << image.status();
      auto reference = LlamaModel::FromSafetensors(c, **image);
      ASSERT_TRUE(reference.ok()) << reference.status();
      std::vector<int32_t> shard_of;
      for (size_t i = 0; i < tensors.size(); ++i)
        shard_of.push_back(static_cast<int32_t>(rng() % 3));
      const std::string dir = FreshDir(absl::StrCat("llama_", TensorDtypeName(dtype), tied));
      ASSERT_TRUE(testing_checkpoint::WriteTensorsCheckpoint(dir, c, tensors, shard_of, 3).ok());
      auto sharded = LlamaModel::Load(dir);
      ASSERT_TRUE(sharded.ok()) << sharded.status();
      EXPECT_EQ(Logits(**sharded, prompt), Logits(**reference, prompt));
    }
  }
}

TEST(CheckpointLlamaTest, LoaderNamesTheShardOfAMisshapenTensorAndTheIndexOfAMissingOne) {
  const LlamaConfig c = SmallConfig(false);
  std::vector<TensorToWrite> tensors = testing_checkpoint::LlamaTensorsFilled(
      c,
      [](const std::vector<int64_t>&, bool, std::vector<float>& v) {
        std::fill(v.begin(), v.end(), 0.5f);
      },
      TensorDtype::kBF16, "model.layers.1.mlp.up_proj.weight");
  std::vector<int32_t> shard_of(tensors.size(), 1);
  shard_of[0] = 0;
  const std::string dir = FreshDir("llama_missing");
  ASSERT_TRUE(testing_checkpoint::WriteTensorsCheckpoint(dir, c, tensors, shard_of, 2).ok());
  auto missing = LlamaModel::Load(dir);
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("model.layers.1.mlp.up_proj.weight"),
            std::string::npos);
  EXPECT_NE(missing.status().message().find("model.safetensors.index.json"), std::string::npos);

  tensors[3].shape = {tensors[3].shape[1], tensors[3].shape[0]};  // k_proj transposed
  ASSERT_TRUE(testing_checkpoint::WriteTensorsCheckpoint(dir, c, tensors, shard_of, 2).ok());
  auto misshapen = LlamaModel::Load(dir);
  EXPECT_EQ(misshapen.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(misshapen.status().message().find(tensors[3].name), std::string::npos);
  EXPECT_NE(misshapen.status().message().find("model-00002-of-00002.safetensors"),
            std::string::npos)
      << misshapen.status();
}

// The streamed random writer: every tensor of the config in the dtype, values in the stated
// range, the same bytes whether sharded or not, and a model that loads and runs.
TEST(CheckpointLlamaTest, RandomCheckpointWriterMakesLoadableShardsInEveryDtype) {
  const LlamaConfig c = SmallConfig(false);
  for (TensorDtype dtype : {TensorDtype::kBF16, TensorDtype::kF16, TensorDtype::kF32}) {
    SCOPED_TRACE(TensorDtypeName(dtype));
    const std::string one = FreshDir(absl::StrCat("rand1_", TensorDtypeName(dtype)));
    const std::string three = FreshDir(absl::StrCat("rand3_", TensorDtypeName(dtype)));
    ASSERT_TRUE(WriteRandomLlamaCheckpoint(one, c, dtype, 0, 9).ok());
    ASSERT_TRUE(WriteRandomLlamaCheckpoint(three, c, dtype, 3, 9).ok());
    auto a = Checkpoint::Open(one);
    auto b = Checkpoint::Open(three);
    ASSERT_TRUE(a.ok() && b.ok());
    EXPECT_EQ((*b)->shards().size(), 3u);
    for (const LlamaTensorSpec& spec : LlamaCheckpointTensors(c)) {
      const CheckpointTensor* ta = (*a)->Find(spec.name);
      const CheckpointTensor* tb = (*b)->Find(spec.name);
      ASSERT_TRUE(ta != nullptr && tb != nullptr) << spec.name;
      EXPECT_EQ(ta->info->dtype, dtype);
      EXPECT_EQ(ta->info->shape, spec.shape);
      ASSERT_EQ((*a)->Data(*ta).size(), (*b)->Data(*tb).size());
      EXPECT_EQ(std::memcmp((*a)->Data(*ta).data(), (*b)->Data(*tb).data(), (*a)->Data(*ta).size()),
                0);
      auto v = (*a)->ReadFloat32(spec.name, spec.shape);
      ASSERT_TRUE(v.ok());
      const float bound = spec.is_norm() ? 0.2f : std::sqrt(3.0f / spec.shape.back());
      const float center = spec.is_norm() ? 1.0f : 0.0f;
      std::set<float> distinct;
      for (float x : *v) {
        EXPECT_LE(std::abs(x - center), bound * 1.01f + 0.01f) << spec.name;
        distinct.insert(x);
      }
      EXPECT_GT(distinct.size(), std::min<size_t>(v->size() / 4, 16)) << spec.name;
    }
    auto model = LlamaModel::Load(three);
    ASSERT_TRUE(model.ok()) << model.status();
    for (float x : Logits(**model, {1, 2, 3})) ASSERT_TRUE(std::isfinite(x));
  }
  EXPECT_EQ(WriteRandomLlamaCheckpoint(FreshDir("rand_i8"), c, TensorDtype::kI8, 0, 1).code(),
            absl::StatusCode::kInvalidArgument);
}

}  // namespace
}  // namespace tokenlake::engine
