// Helpers shared by the GPU engine tests (test-only header).
#ifndef TOKENLAKE_ENGINE_CUDA_GPU_TEST_UTIL_H_
#define TOKENLAKE_ENGINE_CUDA_GPU_TEST_UTIL_H_

#include <cuda_runtime_api.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <vector>

#include "gtest/gtest.h"
#include "tokenlake/attention/bf16.h"
#include "tokenlake/engine/cuda/dense_layer.h"
#include "tokenlake/engine/cuda/device_buffer.h"
#include "tokenlake/engine/fixture_test_util.h"

// Skips the current test where no CUDA device is visible.
#define SKIP_WITHOUT_GPU() \
  if (!::tokenlake::engine::cuda::testing_util::HaveGpu()) GTEST_SKIP() << "no CUDA device"

namespace tokenlake::engine::cuda::testing_util {

inline bool HaveGpu() {
  int count = 0;
  if (cudaGetDeviceCount(&count) != cudaSuccess) {
    cudaGetLastError();
    return false;
  }
  return count > 0;
}

// A device copy of v (a test failure when the allocation or the copy fails).
template <typename T>
DeviceBuffer Upload(const std::vector<T>& v) {
  DeviceBuffer b;
  EXPECT_TRUE(b.Allocate(v.size() * sizeof(T)).ok());
  EXPECT_EQ(cudaMemcpy(b.get(), v.data(), v.size() * sizeof(T), cudaMemcpyHostToDevice),
            cudaSuccess);
  return b;
}
// The first n elements of b, on the host.
template <typename T>
std::vector<T> Download(const DeviceBuffer& b, size_t n) {
  std::vector<T> v(n);
  EXPECT_EQ(cudaMemcpy(v.data(), b.get(), n * sizeof(T), cudaMemcpyDeviceToHost), cudaSuccess);
  return v;
}

// The bfloat16 tolerance of the GPU engine's logits against a float32 reference (Hugging Face
// transformers on CPU, or engine::Engine):
//     max_v |gpu_v - ref_v| <= kBf16RelTol * max_v |ref_v| + kBf16AbsTol.
// Why: the GPU path rounds to bf16 (8 significant bits, unit roundoff u = 2^-8 = 0.0039) the
// weights and, per layer, about six activations (normed input, q, k, v, attention output,
// normed post-attention input, SiLU*up). Each rounding perturbs a value by at most u relative;
// through a dot product the perturbations of many terms add with random signs, so a logit's
// error grows like sqrt(k) u times the logit scale for k roundings on its path. For the
// fixture's models (2 or 3 layers: k ~ 2 + 6 L ~ 20) that is ~4.5 u ~ 0.018 of the scale:
// 0.02 relative. The absolute term (0.02, the same in logit units) covers logits far smaller
// than the largest (their error follows the hidden state's scale, not their own). This is a
// statistical bound, not a worst case (which would be k u ~ 0.08); the measured errors are
// printed and recorded in docs/results-engine.md.
inline constexpr float kBf16RelTol = 0.02f;
inline constexpr float kBf16AbsTol = 0.02f;

inline float MaxAbs(const std::vector<float>& v) {
  float m = 0.f;
  for (float x : v) m = std::max(m, std::abs(x));
  return m;
}

inline float Bf16Tolerance(const std::vector<float>& reference) {
  return kBf16RelTol * MaxAbs(reference) + kBf16AbsTol;
}

inline float MaxAbsDiff(const std::vector<float>& a, const std::vector<float>& b) {
  float m = 0.f;
  for (size_t i = 0; i < a.size() && i < b.size(); ++i) m = std::max(m, std::abs(a[i] - b[i]));
  return m;
}

// Top-1 minus top-2 of `logits` (0 for fewer than 2 entries).
inline float TopMargin(const std::vector<float>& logits) {
  if (logits.size() < 2) return 0.f;
  float a = -INFINITY, b = -INFINITY;
  for (float x : logits) {
    if (x > a) {
      b = a;
      a = x;
    } else if (x > b) {
      b = x;
    }
  }
  return a - b;
}

// y and y16 (downloaded after a call of a dense-layer kernel with epilogue e: SmallBatchGemm's
// or DecodeGemm's tests) against a double-precision reference over the bf16 weights w
// [rows][in] and input rows x [n][in] (as the kernel must round them), y0 being y before the
// call. Tolerances: float32 sums of `in` terms, a few ulps of the terms' magnitude;
// for kSiluMulBf16 also the bf16 rounding of the result.
inline void ExpectDenseMatchesReference(const std::vector<uint16_t>& w,
                                        const std::vector<uint16_t>& x,
                                        const std::vector<float>& y0, const std::vector<float>& y,
                                        const std::vector<uint16_t>& y16, int n, int in, int out,
                                        DenseEpilogue e) {
  for (int t = 0; t < n; ++t) {
    for (int o = 0; o < out; ++o) {
      auto dot = [&](int row, double* magnitude) {
        double sum = 0;
        *magnitude = 0;
        for (int i = 0; i < in; ++i) {
          const double p =
              static_cast<double>(attention::Bf16ToFloat(w[static_cast<size_t>(row) * in + i])) *
              attention::Bf16ToFloat(x[static_cast<size_t>(t) * in + i]);
          sum += p;
          *magnitude += std::fabs(p);
        }
        return sum;
      };
      const size_t at = static_cast<size_t>(t) * out + o;
      double mag = 0;
      const double ref = dot(o, &mag);
      const double tol = 1e-6 * mag + 1e-7 * std::sqrt(static_cast<double>(in)) * mag + 1e-30;
      if (e == DenseEpilogue::kStoreF32) {
        ASSERT_NEAR(y[at], ref, tol) << "t " << t << " o " << o;
      } else if (e == DenseEpilogue::kAddF32) {
        ASSERT_NEAR(y[at], y0[at] + ref, tol + 1e-7 * std::fabs(y0[at])) << "t " << t << " o " << o;
      } else {
        double mag_u = 0;
        const double u = dot(out + o, &mag_u);
        const double want = ref / (1 + std::exp(-ref)) * u;
        // bf16 rounding of the result (2^-8 relative) plus the sums' error.
        ASSERT_NEAR(attention::Bf16ToFloat(y16[at]), want,
                    std::fabs(want) * 0.0079 + 1.1 * (tol * std::fabs(u) + mag_u * 1e-6))
            << "t " << t << " o " << o;
        ASSERT_EQ(y[at], y0[at]) << "the SiLU epilogue wrote y";
      }
    }
  }
}

// The cached-prefix oracle shared with the CPU engine's tests.
using ::tokenlake::engine::testing_fixture::ExpectedCachedTokens;

}  // namespace tokenlake::engine::cuda::testing_util

#endif  // TOKENLAKE_ENGINE_CUDA_GPU_TEST_UTIL_H_
