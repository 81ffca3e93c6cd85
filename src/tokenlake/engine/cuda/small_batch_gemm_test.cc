#include "tokenlake/engine/cuda/small_batch_gemm.h"

#include <cmath>
#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/cuda/gpu_test_util.h"

namespace tokenlake::engine::cuda {
namespace {

#define SKIP_WITHOUT_GPU() \
  if (!testing_util::HaveGpu()) GTEST_SKIP() << "no CUDA device"

uint16_t Bf16(float f) {  // round to nearest even (finite inputs)
  uint32_t u = 0;
  std::memcpy(&u, &f, 4);
  u += 0x7fffu + ((u >> 16) & 1u);
  return static_cast<uint16_t>(u >> 16);
}
double Float(uint16_t b) {
  const uint32_t u = static_cast<uint32_t>(b) << 16;
  float f = 0;
  std::memcpy(&f, &u, 4);
  return f;
}

template <typename T>
DeviceBuffer Upload(const std::vector<T>& v) {
  DeviceBuffer b;
  EXPECT_TRUE(b.Allocate(v.size() * sizeof(T)).ok());
  EXPECT_EQ(cudaMemcpy(b.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice),
            cudaSuccess);
  return b;
}
template <typename T>
std::vector<T> Download(const DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  EXPECT_EQ(cudaMemcpy(v.data(), b.get(), n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

// Every epilogue, row count, layout and a spread of shapes (outputs that are no multiple of a
// warp's rows, short and long inputs) against a double-precision reference on the host.
constexpr SmallGemmLayout kLayouts[] = {SmallGemmLayout::kAuto, SmallGemmLayout::kWarpRows2,
                                        SmallGemmLayout::kWarpRows4, SmallGemmLayout::kBlockRows4,
                                        SmallGemmLayout::kBlockRows8};

TEST(SmallBatchGemmTest, MatchesAPlainReferenceOnRandomInputs) {
  SKIP_WITHOUT_GPU();
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  struct Shape {
    int in, out;
  };
  const Shape shapes[] = {{8, 1}, {64, 37}, {256, 130}, {4096, 4096}, {1000, 9000}, {11008, 300}};
  const SmallGemmEpilogue epilogues[] = {SmallGemmEpilogue::kStoreF32, SmallGemmEpilogue::kAddF32,
                                         SmallGemmEpilogue::kSiluMulBf16};
  for (const Shape& s : shapes) {
    for (SmallGemmEpilogue e : epilogues) {
      const bool silu = e == SmallGemmEpilogue::kSiluMulBf16;
      const int rows = silu ? 2 * s.out : s.out;
      std::vector<uint16_t> w(static_cast<size_t>(rows) * s.in);
      for (uint16_t& v : w) v = Bf16(uniform(rng) * 0.1f);
      for (int n = 1; n <= kSmallBatchMaxRows; ++n) {
        for (SmallGemmLayout layout : kLayouts) {
          SCOPED_TRACE(testing::Message()
                       << "in " << s.in << " out " << s.out << " epilogue " << static_cast<int>(e)
                       << " n " << n << " layout " << static_cast<int>(layout));
          // float32 input (rounded to bf16 as it is read) with the residual add, as o_proj uses
          // it, at even row counts; bf16 input otherwise.
          const bool f32_input = e == SmallGemmEpilogue::kAddF32 && n % 2 == 0;
          std::vector<uint16_t> x(static_cast<size_t>(n) * s.in);
          std::vector<float> x32(x.size());
          for (size_t i = 0; i < x.size(); ++i) {
            x32[i] = uniform(rng);
            x[i] = Bf16(x32[i]);  // the reference reads the input as the kernel must round it
          }
          std::vector<float> y0(static_cast<size_t>(n) * s.out);
          for (float& v : y0) v = uniform(rng);
          DeviceBuffer dw = Upload(w), dx = f32_input ? Upload(x32) : Upload(x), dy = Upload(y0);
          DeviceBuffer dy16;
          ASSERT_TRUE(dy16.Allocate(static_cast<size_t>(n) * s.out * 2).ok());
          ASSERT_TRUE(SmallBatchGemm(dw.as<uint16_t>(), dx.get(),
                                     f32_input ? SmallGemmInput::kF32 : SmallGemmInput::kBf16, n,
                                     s.in, s.out, e, dy.as<float>(), dy16.as<uint16_t>(), nullptr,
                                     layout)
                          .ok());
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          const std::vector<float> y = Download<float>(dy, y0.size());
          const std::vector<uint16_t> y16 = Download<uint16_t>(dy16, y0.size());
          for (int t = 0; t < n; ++t) {
            for (int o = 0; o < s.out; ++o) {
              auto dot = [&](int row, double* magnitude) {
                double sum = 0;
                *magnitude = 0;
                for (int i = 0; i < s.in; ++i) {
                  const double p = Float(w[static_cast<size_t>(row) * s.in + i]) *
                                   Float(x[static_cast<size_t>(t) * s.in + i]);
                  sum += p;
                  *magnitude += std::fabs(p);
                }
                return sum;
              };
              const size_t at = static_cast<size_t>(t) * s.out + o;
              double mag = 0;
              const double ref = dot(o, &mag);
              // float32 sums of `in` terms: a few ulps of the terms' magnitude.
              const double tol =
                  1e-6 * mag + 1e-7 * std::sqrt(static_cast<double>(s.in)) * mag + 1e-30;
              if (e == SmallGemmEpilogue::kStoreF32) {
                ASSERT_NEAR(y[at], ref, tol) << "t " << t << " o " << o;
              } else if (e == SmallGemmEpilogue::kAddF32) {
                ASSERT_NEAR(y[at], y0[at] + ref, tol + 1e-7 * std::fabs(y0[at]))
                    << "t " << t << " o " << o;
              } else {
                double mag_u = 0;
                const double u = dot(s.out + o, &mag_u);
                const double want = ref / (1 + std::exp(-ref)) * u;
                // bf16 rounding of the result (2^-8 relative) plus the sums' error.
                ASSERT_NEAR(Float(y16[at]), want,
                            std::fabs(want) * 0.0079 + 1.1 * (tol * std::fabs(u) + mag_u * 1e-6))
                    << "t " << t << " o " << o;
                ASSERT_EQ(y[at], y0[at]) << "kSiluMulBf16 wrote y";
              }
            }
          }
        }
      }
    }
  }
}

TEST(SmallBatchGemmTest, RejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer w, x, y;
  ASSERT_TRUE(w.Allocate(64 * 64 * 2).ok());
  ASSERT_TRUE(x.Allocate(16 * 64 * 2).ok());
  ASSERT_TRUE(y.Allocate(16 * 64 * 4).ok());
  const auto call = [&](int n, int in, int out, SmallGemmEpilogue e, const uint16_t* wp) {
    return SmallBatchGemm(wp, x.get(), SmallGemmInput::kBf16, n, in, out, e, y.as<float>(), nullptr,
                          nullptr);
  };
  EXPECT_TRUE(call(1, 64, 64, SmallGemmEpilogue::kStoreF32, w.as<uint16_t>()).ok());
  EXPECT_FALSE(call(0, 64, 64, SmallGemmEpilogue::kStoreF32, w.as<uint16_t>()).ok());
  EXPECT_FALSE(call(9, 64, 64, SmallGemmEpilogue::kStoreF32, w.as<uint16_t>()).ok());
  EXPECT_FALSE(call(1, 60, 64, SmallGemmEpilogue::kStoreF32, w.as<uint16_t>()).ok());
  EXPECT_FALSE(call(1, 64, 0, SmallGemmEpilogue::kStoreF32, w.as<uint16_t>()).ok());
  EXPECT_FALSE(call(1, 64, 64, SmallGemmEpilogue::kStoreF32, w.as<uint16_t>() + 1).ok());
  // kSiluMulBf16 needs y16.
  const absl::Status s = call(1, 64, 32, SmallGemmEpilogue::kSiluMulBf16, w.as<uint16_t>());
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("y16"), std::string::npos) << s;
  EXPECT_FALSE(SmallBatchGemm(w.as<uint16_t>(), x.get(), SmallGemmInput::kBf16, 1, 64, 64,
                              SmallGemmEpilogue::kStoreF32, y.as<float>(), nullptr, nullptr,
                              static_cast<SmallGemmLayout>(99))
                   .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
}  // namespace tokenlake::engine::cuda
