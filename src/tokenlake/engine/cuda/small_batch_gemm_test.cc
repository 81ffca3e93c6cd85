#include "tokenlake/engine/cuda/small_batch_gemm.h"

#include <cstring>
#include <random>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/attention/cuda/pdl_testing.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/cuda/gpu_test_util.h"

namespace tokenlake::engine::cuda {
namespace {

using attention::FloatToBf16;
using testing_util::Download;
using testing_util::Upload;

// Every epilogue, row count, layout and a spread of shapes (outputs that are no multiple of a
// warp's rows, short and long inputs) against a double-precision reference on the host.
constexpr SmallGemmLayout kLayouts[] = {SmallGemmLayout::kAuto, SmallGemmLayout::kWarpRows2,
                                        SmallGemmLayout::kWarpRows4, SmallGemmLayout::kBlockRows4,
                                        SmallGemmLayout::kBlockRows8};

// n random input rows of `in` values in [-1, 1): as float32 (x32) and rounded to bf16 (x, what
// the reference reads, as the kernel must round either), and y0 [n][out], y before the call.
struct Inputs {
  std::vector<uint16_t> x;
  std::vector<float> x32;
  std::vector<float> y0;
};
Inputs RandomInputs(std::mt19937_64& rng, int n, int in, int out) {
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  Inputs r;
  r.x32.resize(static_cast<size_t>(n) * in);
  r.x.resize(r.x32.size());
  for (size_t i = 0; i < r.x.size(); ++i) {
    r.x32[i] = uniform(rng);
    r.x[i] = FloatToBf16(r.x32[i]);
  }
  r.y0.resize(static_cast<size_t>(n) * out);
  for (float& v : r.y0) v = uniform(rng);
  return r;
}

using testing_util::ExpectDenseMatchesReference;

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
  const DenseEpilogue epilogues[] = {DenseEpilogue::kStoreF32, DenseEpilogue::kAddF32,
                                     DenseEpilogue::kSiluMulBf16};
  for (const Shape& s : shapes) {
    for (DenseEpilogue e : epilogues) {
      const bool silu = e == DenseEpilogue::kSiluMulBf16;
      const int rows = silu ? 2 * s.out : s.out;
      std::vector<uint16_t> w(static_cast<size_t>(rows) * s.in);
      for (uint16_t& v : w) v = FloatToBf16(uniform(rng) * 0.1f);
      for (int n = 1; n <= kSmallBatchMaxRows; ++n) {
        for (SmallGemmLayout layout : kLayouts) {
          SCOPED_TRACE(testing::Message()
                       << "in " << s.in << " out " << s.out << " epilogue " << static_cast<int>(e)
                       << " n " << n << " layout " << static_cast<int>(layout));
          // float32 input (rounded to bf16 as it is read) with the residual add, as o_proj uses
          // it, at even row counts; bf16 input otherwise.
          const bool f32_input = e == DenseEpilogue::kAddF32 && n % 2 == 0;
          const Inputs in = RandomInputs(rng, n, s.in, s.out);
          const std::vector<uint16_t>& x = in.x;
          const std::vector<float>& y0 = in.y0;
          DeviceBuffer dw = Upload(w), dx = f32_input ? Upload(in.x32) : Upload(x), dy = Upload(y0);
          DeviceBuffer dy16;
          ASSERT_TRUE(dy16.Allocate(static_cast<size_t>(n) * s.out * 2).ok());
          ASSERT_TRUE(SmallBatchGemm(dw.as<uint16_t>(), dx.get(),
                                     f32_input ? DenseInput::kF32 : DenseInput::kBf16, n, s.in,
                                     s.out, e, dy.as<float>(), dy16.as<uint16_t>(), nullptr, layout)
                          .ok());
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          ASSERT_NO_FATAL_FAILURE(
              ExpectDenseMatchesReference(w, x, y0, Download<float>(dy, y0.size()),
                                          Download<uint16_t>(dy16, y0.size()), n, s.in, s.out, e));
        }
      }
    }
  }
}

// Under programmatic dependent launch the kernel may be scheduled while the kernel before it
// still runs and load weights meanwhile, but must read x and y only once that kernel has
// completed. Here the kernel before is a producer that lets it start at once and writes x only
// 100 us later (x holds NaN until then, y the values to add to): an early read shows in the
// results. Every layout and epilogue, float32 and bf16 inputs.
TEST(SmallBatchGemmTest, UnderPdlReadsItsInputsOnlyAfterTheKernelBeforeIt) {
  SKIP_WITHOUT_GPU();
  const uint64_t seed = std::random_device{}();
  std::printf("seed %llu\n", static_cast<unsigned long long>(seed));
  std::mt19937_64 rng(seed);
  std::uniform_real_distribution<float> uniform(-1.f, 1.f);
  cudaStream_t stream = nullptr;
  ASSERT_EQ(cudaStreamCreateWithFlags(&stream, cudaStreamNonBlocking), cudaSuccess);
  struct Shape {
    int in, out;
  };
  for (const Shape s : {Shape{64, 37}, Shape{4096, 1024}, Shape{1000, 9000}}) {
    for (DenseEpilogue e :
         {DenseEpilogue::kStoreF32, DenseEpilogue::kAddF32, DenseEpilogue::kSiluMulBf16}) {
      const bool silu = e == DenseEpilogue::kSiluMulBf16;
      std::vector<uint16_t> w(static_cast<size_t>(silu ? 2 * s.out : s.out) * s.in);
      for (uint16_t& v : w) v = FloatToBf16(uniform(rng) * 0.1f);
      const DeviceBuffer dw = Upload(w);
      for (int n : {1, 5}) {
        for (SmallGemmLayout layout : kLayouts) {
          SCOPED_TRACE(testing::Message()
                       << "in " << s.in << " out " << s.out << " epilogue " << static_cast<int>(e)
                       << " n " << n << " layout " << static_cast<int>(layout));
          const bool f32_input = e == DenseEpilogue::kAddF32 && layout == kLayouts[0];
          const Inputs in = RandomInputs(rng, n, s.in, s.out);
          const std::vector<uint16_t>& x = in.x;
          const std::vector<float>& y0 = in.y0;
          const DeviceBuffer staged = f32_input ? Upload(in.x32) : Upload(x);
          DeviceBuffer dx, dy = Upload(y0), dy16;
          ASSERT_TRUE(dx.Allocate(staged.size_bytes()).ok());
          ASSERT_TRUE(dy16.Allocate(static_cast<size_t>(n) * s.out * 2).ok());
          ASSERT_EQ(cudaMemset(dx.get(), 0xff, dx.size_bytes()), cudaSuccess);  // NaN
          ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
          ASSERT_TRUE(attention::cuda::EnqueueDelayedCopy(dx.get(), staged.get(),
                                                          staged.size_bytes(), 100'000, stream)
                          .ok());
          ASSERT_TRUE(SmallBatchGemm(dw.as<uint16_t>(), dx.get(),
                                     f32_input ? DenseInput::kF32 : DenseInput::kBf16, n, s.in,
                                     s.out, e, dy.as<float>(), dy16.as<uint16_t>(), stream, layout,
                                     /*pdl=*/true)
                          .ok());
          ASSERT_EQ(cudaStreamSynchronize(stream), cudaSuccess);
          ASSERT_NO_FATAL_FAILURE(
              ExpectDenseMatchesReference(w, x, y0, Download<float>(dy, y0.size()),
                                          Download<uint16_t>(dy16, y0.size()), n, s.in, s.out, e));
        }
      }
    }
  }
  ASSERT_EQ(cudaStreamDestroy(stream), cudaSuccess);
}

TEST(SmallBatchGemmTest, RejectsBadArguments) {
  SKIP_WITHOUT_GPU();
  DeviceBuffer w, x, y;
  ASSERT_TRUE(w.Allocate(64 * 64 * 2).ok());
  ASSERT_TRUE(x.Allocate(16 * 64 * 2).ok());
  ASSERT_TRUE(y.Allocate(16 * 64 * 4).ok());
  const auto call = [&](int n, int in, int out, DenseEpilogue e, const uint16_t* wp) {
    return SmallBatchGemm(wp, x.get(), DenseInput::kBf16, n, in, out, e, y.as<float>(), nullptr,
                          nullptr);
  };
  EXPECT_TRUE(call(1, 64, 64, DenseEpilogue::kStoreF32, w.as<uint16_t>()).ok());
  EXPECT_FALSE(call(0, 64, 64, DenseEpilogue::kStoreF32, w.as<uint16_t>()).ok());
  EXPECT_FALSE(call(9, 64, 64, DenseEpilogue::kStoreF32, w.as<uint16_t>()).ok());
  EXPECT_FALSE(call(1, 60, 64, DenseEpilogue::kStoreF32, w.as<uint16_t>()).ok());
  EXPECT_FALSE(call(1, 64, 0, DenseEpilogue::kStoreF32, w.as<uint16_t>()).ok());
  EXPECT_FALSE(call(1, 64, 64, DenseEpilogue::kStoreF32, w.as<uint16_t>() + 1).ok());
  // kSiluMulBf16 needs y16.
  const absl::Status s = call(1, 64, 32, DenseEpilogue::kSiluMulBf16, w.as<uint16_t>());
  EXPECT_FALSE(s.ok());
  EXPECT_NE(s.message().find("y16"), std::string::npos) << s;
  EXPECT_FALSE(SmallBatchGemm(w.as<uint16_t>(), x.get(), DenseInput::kBf16, 1, 64, 64,
                              DenseEpilogue::kStoreF32, y.as<float>(), nullptr, nullptr,
                              static_cast<SmallGemmLayout>(99))
                   .ok());
  ASSERT_EQ(cudaDeviceSynchronize(), cudaSuccess);
}

}  // namespace
}  // namespace tokenlake::engine::cuda
