#include "tokenlake/engine/checkpoint_writer.h"

#include <algorithm>
#include <cerrno>
#include <cmath>
#include <cstdio>
#include <cstring>
#include <memory>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "nlohmann/json.hpp"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/checkpoint.h"

namespace tokenlake::engine {
namespace {

constexpr size_t kPieceBytes = size_t{8} << 20;

int64_t LayoutBytes(const TensorLayout& t) {
  int64_t n = TensorDtypeBytes(t.dtype);
  for (int64_t d : t.shape) n *= d;
  return n;
}

struct FileCloser {
  void operator()(FILE* f) const {
    if (f != nullptr) std::fclose(f);
  }
};

absl::Status WriteWhole(const std::string& path, const std::string& bytes) {
  std::unique_ptr<FILE, FileCloser> f(std::fopen(path.c_str(), "wb"));
  if (f == nullptr || std::fwrite(bytes.data(), 1, bytes.size(), f.get()) != bytes.size() ||
      std::fclose(f.release()) != 0) {
    return absl::InternalError(absl::StrCat(path, ": cannot write: ", std::strerror(errno)));
  }
  return absl::OkStatus();
}

// One safetensors file: the header, then each tensor's bytes from `fill` in pieces.
absl::Status WriteShard(const std::string& path, const std::vector<TensorLayout>& tensors,
                        const std::vector<size_t>& members, const TensorBytesFill& fill,
                        std::vector<std::byte>& piece) {
  std::vector<TensorLayout> layout;
  for (size_t i : members) layout.push_back(tensors[i]);
  const std::string header = SafetensorsHeader(layout, {{"format", "pt"}});
  std::unique_ptr<FILE, FileCloser> f(std::fopen(path.c_str(), "wb"));
  auto fail = [&] {
    return absl::InternalError(absl::StrCat(path, ": cannot write: ", std::strerror(errno)));
  };
  if (f == nullptr) return fail();
  if (std::fwrite(header.data(), 1, header.size(), f.get()) != header.size()) return fail();
  for (size_t i : members) {
    const int64_t bytes = LayoutBytes(tensors[i]);
    for (int64_t off = 0; off < bytes; off += static_cast<int64_t>(kPieceBytes)) {
      const size_t n = static_cast<size_t>(std::min<int64_t>(bytes - off, kPieceBytes));
      fill(i, off, absl::MakeSpan(piece.data(), n));
      if (std::fwrite(piece.data(), 1, n, f.get()) != n) return fail();
    }
  }
  if (std::fclose(f.release()) != 0) return fail();
  return absl::OkStatus();
}

uint64_t Mix(uint64_t z) {
  z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ull;
  z = (z ^ (z >> 27)) * 0x94D049BB133111EBull;
  return z ^ (z >> 31);
}

}  // namespace

std::string ShardFileName(int32_t i, int32_t num_shards) {
  return absl::StrFormat("model-%05d-of-%05d.safetensors", i + 1, num_shards);
}

std::vector<int32_t> ContiguousShards(const std::vector<TensorLayout>& tensors,
                                      int32_t num_shards) {
  int64_t total = 0;
  for (const auto& t : tensors) total += LayoutBytes(t);
  std::vector<int32_t> shard_of;
  int64_t before = 0;
  for (const auto& t : tensors) {
    // The shard whose equal share of the bytes holds this tensor's middle byte.
    const int64_t middle = before + LayoutBytes(t) / 2;
    const int64_t s = total > 0 ? middle * num_shards / total : 0;
    shard_of.push_back(static_cast<int32_t>(std::clamp<int64_t>(s, 0, num_shards - 1)));
    before += LayoutBytes(t);
  }
  return shard_of;
}

absl::Status WriteCheckpoint(const std::string& dir, const std::vector<TensorLayout>& tensors,
                             const std::vector<int32_t>& shard_of, int32_t num_shards,
                             const TensorBytesFill& fill) {
  if (num_shards < 0) {
    return absl::InvalidArgumentError(absl::StrCat("WriteCheckpoint: num_shards ", num_shards));
  }
  std::vector<std::byte> piece(kPieceBytes);
  if (num_shards == 0) {
    std::vector<size_t> all(tensors.size());
    for (size_t i = 0; i < all.size(); ++i) all[i] = i;
    return WriteShard(dir + "/" + kSafetensorsFileName, tensors, all, fill, piece);
  }
  if (shard_of.size() != tensors.size()) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "WriteCheckpoint: %d shard numbers for %d tensors", shard_of.size(), tensors.size()));
  }
  std::vector<std::vector<size_t>> members(static_cast<size_t>(num_shards));
  nlohmann::json weight_map = nlohmann::json::object();
  int64_t total = 0;
  for (size_t i = 0; i < tensors.size(); ++i) {
    if (shard_of[i] < 0 || shard_of[i] >= num_shards) {
      return absl::InvalidArgumentError(
          absl::StrFormat("WriteCheckpoint: tensor '%s' to shard %d of %d", tensors[i].name,
                          shard_of[i], num_shards));
    }
    members[static_cast<size_t>(shard_of[i])].push_back(i);
    weight_map[tensors[i].name] = ShardFileName(shard_of[i], num_shards);
    total += LayoutBytes(tensors[i]);
  }
  for (int32_t s = 0; s < num_shards; ++s) {
    TOKENLAKE_RETURN_IF_ERROR(WriteShard(dir + "/" + ShardFileName(s, num_shards), tensors,
                                         members[static_cast<size_t>(s)], fill, piece));
  }
  const nlohmann::json index = {{"metadata", {{"total_size", total}}}, {"weight_map", weight_map}};
  return WriteWhole(dir + "/" + kSafetensorsIndexFileName, index.dump(2) + "\n");
}

absl::Status WriteLlamaConfig(const std::string& dir, const LlamaConfig& config) {
  return WriteWhole(dir + "/config.json", LlamaConfigJson(config));
}

absl::Status WriteRandomLlamaCheckpoint(const std::string& dir, const LlamaConfig& config,
                                        TensorDtype dtype, int32_t num_shards, uint64_t seed) {
  if (dtype != TensorDtype::kF32 && dtype != TensorDtype::kBF16 && dtype != TensorDtype::kF16) {
    return absl::InvalidArgumentError(absl::StrCat(
        "WriteRandomLlamaCheckpoint: dtype ", TensorDtypeName(dtype), " (F32, BF16 or F16 only)"));
  }
  const std::vector<LlamaTensorSpec> specs = LlamaCheckpointTensors(config);
  std::vector<TensorLayout> layout;
  for (const auto& s : specs) layout.push_back({s.name, dtype, s.shape});
  const int64_t elem = TensorDtypeBytes(dtype);
  // Per tensor, 65,536 levels of its range, already encoded in `dtype`.
  std::vector<std::vector<std::byte>> levels(specs.size());
  for (size_t t = 0; t < specs.size(); ++t) {
    const float a =
        specs[t].is_norm() ? 0.2f : std::sqrt(3.0f / static_cast<float>(specs[t].shape.back()));
    const float center = specs[t].is_norm() ? 1.0f : 0.0f;
    levels[t].resize(static_cast<size_t>(65536 * elem));
    for (int i = 0; i < 65536; ++i) {
      const float v = center + a * (static_cast<float>(i) / 32768.0f - 1.0f);
      std::byte* dst = levels[t].data() + static_cast<size_t>(i * elem);
      if (dtype == TensorDtype::kF32) {
        std::memcpy(dst, &v, 4);
      } else {
        const uint16_t bits =
            dtype == TensorDtype::kBF16 ? attention::FloatToBf16(v) : FloatToHalf(v);
        std::memcpy(dst, &bits, 2);
      }
    }
  }
  auto fill = [&](size_t t, int64_t offset, absl::Span<std::byte> out) {
    const uint64_t stream = Mix(seed * 0x9E3779B97F4A7C15ull + t + 1);
    auto run = [&]<typename Word>() {
      const Word* table = reinterpret_cast<const Word*>(levels[t].data());
      const int64_t first = offset / static_cast<int64_t>(sizeof(Word));
      const int64_t n = static_cast<int64_t>(out.size() / sizeof(Word));
      uint64_t r = 0;
      for (int64_t e = 0; e < n; ++e) {
        const int64_t g = first + e;  // element index in the tensor: 4 per hash
        if (e == 0 || g % 4 == 0) r = Mix(stream + static_cast<uint64_t>(g / 4)) >> (16 * (g % 4));
        const Word w = table[r & 0xffff];
        std::memcpy(out.data() + e * static_cast<int64_t>(sizeof(Word)), &w, sizeof(Word));
        r >>= 16;
      }
    };
    if (elem == 4) {
      run.template operator()<uint32_t>();
    } else {
      run.template operator()<uint16_t>();
    }
  };
  TOKENLAKE_RETURN_IF_ERROR(WriteLlamaConfig(dir, config));
  const std::vector<int32_t> shard_of =
      num_shards > 0 ? ContiguousShards(layout, num_shards) : std::vector<int32_t>{};
  return WriteCheckpoint(dir, layout, shard_of, num_shards, fill);
}

}  // namespace tokenlake::engine
