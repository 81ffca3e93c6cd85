#include "tokenlake/engine/safetensors.h"

#include <cmath>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <iostream>
#include <limits>
#include <random>
#include <string>
#include <vector>

#include "gtest/gtest.h"

namespace tokenlake::engine {
namespace {

std::string FloatBytes(const std::vector<float>& v) {
  std::string s(v.size() * 4, '\0');
  std::memcpy(s.data(), v.data(), s.size());
  return s;
}

std::string U16Bytes(const std::vector<uint16_t>& v) {
  std::string s(v.size() * 2, '\0');
  std::memcpy(s.data(), v.data(), s.size());
  return s;
}

// A file image with a hand-written header.
std::string WithHeader(const std::string& header, const std::string& data = "") {
  std::string out(8, '\0');
  const uint64_t n = header.size();
  for (int i = 0; i < 8; ++i) out[i] = static_cast<char>((n >> (8 * i)) & 0xff);
  return out + header + data;
}

absl::Status OpenStatus(const std::string& bytes) {
  return SafetensorsFile::FromBytes(bytes, "test.safetensors").status();
}

void ExpectInvalid(const std::string& bytes, const std::string& needle) {
  const absl::Status s = OpenStatus(bytes);
  EXPECT_EQ(s.code(), absl::StatusCode::kInvalidArgument) << s;
  EXPECT_NE(s.message().find("test.safetensors"), std::string::npos) << s;
  EXPECT_NE(s.message().find(needle), std::string::npos) << "wanted '" << needle << "' in " << s;
}

TEST(SafetensorsTest, RoundTripsF32Bf16AndF16WithMetadata) {
  const std::string image = SerializeSafetensors(
      {{"a", TensorDtype::kF32, {2, 3}, FloatBytes({1, 2, 3, 4, 5, -6.5f})},
       {"b", TensorDtype::kBF16, {3}, U16Bytes({0x3f80, 0xc000, 0x3fc0})},  // 1, -2, 1.5
       // 1, -2, 2^-24 (smallest subnormal), +inf, 65504 (largest finite half)
       {"c", TensorDtype::kF16, {5}, U16Bytes({0x3c00, 0xc000, 0x0001, 0x7c00, 0x7bff})},
       {"empty", TensorDtype::kF32, {0, 4}, ""}},
      {{"format", "pt"}});
  auto file = SafetensorsFile::FromBytes(image, "mem");
  ASSERT_TRUE(file.ok()) << file.status();
  EXPECT_EQ((*file)->tensors().size(), 4u);
  EXPECT_EQ((*file)->metadata().at("format"), "pt");
  const TensorInfo* a = (*file)->Find("a");
  ASSERT_NE(a, nullptr);
  EXPECT_EQ(a->dtype, TensorDtype::kF32);
  EXPECT_EQ(a->shape, (std::vector<int64_t>{2, 3}));
  EXPECT_EQ(a->num_elements(), 6);
  EXPECT_EQ((*file)->Data(*a).size(), 24u);
  EXPECT_EQ((*file)->Find("nope"), nullptr);

  auto av = (*file)->ReadFloat32("a", {2, 3});
  ASSERT_TRUE(av.ok()) << av.status();
  EXPECT_EQ(*av, (std::vector<float>{1, 2, 3, 4, 5, -6.5f}));
  auto bv = (*file)->ReadFloat32("b", {3});
  ASSERT_TRUE(bv.ok());
  EXPECT_EQ(*bv, (std::vector<float>{1, -2, 1.5f}));
  auto cv = (*file)->ReadFloat32("c", {5});
  ASSERT_TRUE(cv.ok());
  EXPECT_EQ((*cv)[0], 1.0f);
  EXPECT_EQ((*cv)[1], -2.0f);
  EXPECT_EQ((*cv)[2], 5.9604644775390625e-8f);
  EXPECT_EQ((*cv)[3], std::numeric_limits<float>::infinity());
  EXPECT_EQ((*cv)[4], 65504.0f);
  auto ev = (*file)->ReadFloat32("empty", {0, 4});
  ASSERT_TRUE(ev.ok());
  EXPECT_TRUE(ev->empty());
}

TEST(SafetensorsTest, ReadFloat32ReportsMissingTensorWrongShapeAndDtype) {
  const std::string image =
      SerializeSafetensors({{"w", TensorDtype::kF32, {2, 2}, FloatBytes({1, 2, 3, 4})},
                            {"i", TensorDtype::kI64, {1}, std::string(8, '\0')}});
  auto file = SafetensorsFile::FromBytes(image, "ckpt.safetensors");
  ASSERT_TRUE(file.ok());
  auto missing = (*file)->ReadFloat32("model.norm.weight", {2});
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("ckpt.safetensors"), std::string::npos);
  EXPECT_NE(missing.status().message().find("model.norm.weight"), std::string::npos);
  auto shape = (*file)->ReadFloat32("w", {4});
  EXPECT_EQ(shape.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(shape.status().message().find("[2, 2]"), std::string::npos) << shape.status();
  EXPECT_NE(shape.status().message().find("[4]"), std::string::npos) << shape.status();
  auto dtype = (*file)->ReadFloat32("i", {1});
  EXPECT_EQ(dtype.status().code(), absl::StatusCode::kUnimplemented);
  EXPECT_NE(dtype.status().message().find("I64"), std::string::npos);
}

TEST(SafetensorsTest, RejectsTruncatedOrOversizedHeaderLength) {
  ExpectInvalid("", "too short");
  ExpectInvalid(std::string(7, '\0'), "too short");
  std::string past = WithHeader("{}");
  past[0] = 50;  // claims 50 header bytes, has 2
  ExpectInvalid(past, "runs past the end");
  std::string huge(8, '\xff');
  ExpectInvalid(huge + "{}", "exceeds the limit");
}

TEST(SafetensorsTest, RejectsBadJsonHeaders) {
  ExpectInvalid(WithHeader("{not json"), "not valid JSON");
  ExpectInvalid(WithHeader("[1, 2]"), "not a JSON object");
  ExpectInvalid(WithHeader(R"({"t": 3})"), "tensor 't': entry is not an object");
  ExpectInvalid(WithHeader(R"({"t": {"shape": [1], "data_offsets": [0, 4]}})", std::string(4, 0)),
                "'dtype'");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F8", "shape": [1], "data_offsets": [0, 1]}})",
                           std::string(1, 0)),
                "unsupported dtype 'F8'");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": 4, "data_offsets": [0, 16]}})",
                           std::string(16, 0)),
                "'shape'");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [-1], "data_offsets": [0, 4]}})",
                           std::string(4, 0)),
                "negative dimension");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [1.5], "data_offsets": [0, 4]}})",
                           std::string(4, 0)),
                "non-integer");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [1], "data_offsets": [0]}})",
                           std::string(4, 0)),
                "'data_offsets'");
  ExpectInvalid(WithHeader(R"({"__metadata__": {"k": 1}})"), "__metadata__");
  ExpectInvalid(WithHeader(R"({"__metadata__": []})"), "__metadata__");
}

TEST(SafetensorsTest, RejectsOffsetsOutOfBoundsMismatchedOrOverlapping) {
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})",
                           std::string(4, 0)),
                "out of bounds");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [4, 0]}})",
                           std::string(8, 0)),
                "out of bounds");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [-4, 4]}})",
                           std::string(8, 0)),
                "out of bounds");
  ExpectInvalid(WithHeader(R"({"t": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}})",
                           std::string(12, 0)),
                "needs 12");
  ExpectInvalid(WithHeader(R"({"a": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]},
                                "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]}})",
                           std::string(12, 0)),
                "overlap");
  ExpectInvalid(
      WithHeader(
          R"({"t": {"dtype": "F32", "shape": [4294967296, 4294967296], "data_offsets": [0, 4]}})",
          std::string(4, 0)),
      "too large");
}

TEST(SafetensorsTest, OpenReportsMissingFileAndReadsTheFixture) {
  auto missing = SafetensorsFile::Open("/nonexistent/model.safetensors");
  EXPECT_EQ(missing.status().code(), absl::StatusCode::kNotFound);
  EXPECT_NE(missing.status().message().find("/nonexistent/model.safetensors"), std::string::npos);
  const char* src = std::getenv("TOKENLAKE_SOURCE_DIR");
  const std::string path = std::string(src != nullptr ? src : ".") +
                           "/tests/fixtures/llama_tiny/tied_bf16/model.safetensors";
  auto file = SafetensorsFile::Open(path);
  ASSERT_TRUE(file.ok()) << file.status();
  const TensorInfo* embed = (*file)->Find("model.embed_tokens.weight");
  ASSERT_NE(embed, nullptr);
  EXPECT_EQ(embed->dtype, TensorDtype::kBF16);
  EXPECT_EQ(embed->shape, (std::vector<int64_t>{512, 64}));
  EXPECT_EQ((*file)->Find("lm_head.weight"), nullptr);  // tied
  // A file on disk goes through the same validation as bytes in memory.
  const std::string empty_path = testing::TempDir() + "/empty.safetensors";
  { std::ofstream(empty_path, std::ios::binary); }
  auto empty = SafetensorsFile::Open(empty_path);
  EXPECT_EQ(empty.status().code(), absl::StatusCode::kInvalidArgument) << empty.status();
  EXPECT_NE(empty.status().message().find(empty_path), std::string::npos);
  const std::string bad_path = testing::TempDir() + "/bad.safetensors";
  {
    std::ofstream out(bad_path, std::ios::binary);
    out << WithHeader(R"({"t": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}})", "1234");
  }
  auto bad = SafetensorsFile::Open(bad_path);
  EXPECT_EQ(bad.status().code(), absl::StatusCode::kInvalidArgument);
  EXPECT_NE(bad.status().message().find("out of bounds"), std::string::npos) << bad.status();
  EXPECT_EQ(SafetensorsFile::Open(testing::TempDir()).status().code(),
            absl::StatusCode::kDataLoss);  // a directory
}

// FloatToHalf against a brute-force reference: the nearest of the two halves around x (ties to
// the even bit pattern), over every half value, the midpoints between neighbours and random
// floats; HalfToFloat is checked against ldexp.
TEST(SafetensorsTest, HalfConversionsRoundToNearestEven) {
  auto half_value = [](uint16_t h) {  // independent of HalfToFloat
    const int exp = (h >> 10) & 0x1f;
    const int mant = h & 0x3ff;
    const double mag = exp == 0 ? std::ldexp(mant, -24) : std::ldexp(1024 + mant, exp - 25);
    return (h & 0x8000) ? -mag : mag;
  };
  for (uint32_t h = 0; h < 0x10000; ++h) {
    const uint16_t bits = static_cast<uint16_t>(h);
    const float f = HalfToFloat(bits);
    if (((h >> 10) & 0x1f) == 0x1f) {
      EXPECT_EQ(std::isnan(f), (h & 0x3ff) != 0) << h;
      if (std::isnan(f)) {
        EXPECT_TRUE(std::isnan(HalfToFloat(FloatToHalf(f)))) << h;
        EXPECT_EQ(FloatToHalf(f) & 0x8000, h & 0x8000) << h;
      } else {
        EXPECT_EQ(FloatToHalf(f), bits) << h;
      }
      continue;
    }
    ASSERT_EQ(static_cast<double>(f), half_value(bits)) << h;
    ASSERT_EQ(FloatToHalf(f), bits) << h;
    // The midpoint to the next larger magnitude rounds to the even one of the two.
    const uint16_t next = static_cast<uint16_t>(bits + 1);
    if ((h & 0x7fff) < 0x7bff) {
      const float mid = static_cast<float>((half_value(bits) + half_value(next)) / 2);
      ASSERT_EQ(FloatToHalf(mid), (bits & 1) ? next : bits) << h;
    }
  }
  EXPECT_EQ(FloatToHalf(65519.0f), 0x7bff);
  EXPECT_EQ(FloatToHalf(65520.0f), 0x7c00);  // the tie above the largest finite half: inf
  EXPECT_EQ(FloatToHalf(-1e30f), 0xfc00);
  EXPECT_EQ(FloatToHalf(1e-10f), 0);
  const uint64_t seed = 77;
  std::cout << "seed=" << seed << "\n";
  std::mt19937_64 rng(seed);
  for (int i = 0; i < 200000; ++i) {
    float x;
    const uint32_t r = static_cast<uint32_t>(rng());
    std::memcpy(&x, &r, 4);
    if (!std::isfinite(x) || std::abs(x) >= 65504.0f) continue;
    const uint16_t h = FloatToHalf(x);
    const double got = half_value(h);
    // No other finite half is nearer: check the neighbours on both sides.
    for (int d : {-1, 1}) {
      const uint16_t other = static_cast<uint16_t>(h + d);
      if (((other >> 10) & 0x1f) == 0x1f || (other & 0x7fff) == 0x7fff) continue;
      if ((h & 0x7fff) == 0 && d == -1) continue;
      const double err = std::abs(got - x), other_err = std::abs(half_value(other) - x);
      ASSERT_TRUE(err < other_err || (err == other_err && (h & 1) == 0))
          << "x=" << x << " h=" << h << " other=" << other;
    }
  }
}

}  // namespace
}  // namespace tokenlake::engine
