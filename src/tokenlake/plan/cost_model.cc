#include "tokenlake/plan/cost_model.h"

#include <algorithm>

#include "absl/strings/str_format.h"
#include "tokenlake/base/check.h"

namespace tokenlake::plan {

absl::Status ModelShape::Validate() const {
  auto positive = [](const char* name, int32_t v) -> absl::Status {
    if (v > 0) return absl::OkStatus();
    return absl::InvalidArgumentError(
        absl::StrFormat("ModelShape.%s must be > 0, got %d", name, v));
  };
  if (auto s = positive("num_layers", num_layers); !s.ok()) return s;
  if (auto s = positive("num_heads", num_heads); !s.ok()) return s;
  if (auto s = positive("num_kv_heads", num_kv_heads); !s.ok()) return s;
  if (auto s = positive("head_dim", head_dim); !s.ok()) return s;
  if (auto s = positive("dtype_bytes", dtype_bytes); !s.ok()) return s;
  if (num_heads % num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("ModelShape.num_heads (%d) must be a multiple of num_kv_heads (%d)",
                        num_heads, num_kv_heads));
  }
  return absl::OkStatus();
}

int64_t QueryBytes(const ModelShape& s, int64_t q) {
  return int64_t{s.num_layers} * q * s.num_heads * s.head_dim * s.dtype_bytes;
}

int64_t PartialResultBytes(const ModelShape& s, int64_t q) {
  return int64_t{s.num_layers} * q * s.num_heads * (int64_t{s.head_dim} * s.dtype_bytes + 4);
}

int64_t MoveQueriesBytes(const ModelShape& s, int64_t q) {
  return QueryBytes(s, q) + PartialResultBytes(s, q);
}

int64_t KvBytes(const ModelShape& s, int64_t tokens) {
  return int64_t{s.num_layers} * 2 * tokens * s.num_kv_heads * s.head_dim * s.dtype_bytes;
}

double AttentionFlops(const ModelShape& s, int64_t q, int64_t tokens) {
  return 4.0 * s.num_layers * static_cast<double>(q) * static_cast<double>(tokens) * s.num_heads *
         s.head_dim;
}

bool PreferMoveQueries(const ModelShape& s, int64_t q, int64_t cached_tokens) {
  return MoveQueriesBytes(s, q) <= KvBytes(s, cached_tokens);
}

CacheAccess CacheAccessOf(const ModelShape& s, int64_t prefix_tokens, int64_t input_tokens) {
  CacheAccess a;
  a.kv_bytes = static_cast<double>(KvBytes(s, prefix_tokens + input_tokens));
  a.attention_flops = AttentionFlops(s, input_tokens, prefix_tokens);
  return a;
}

double CacheLoad(const CacheAccess& access, int32_t instances, const InstanceRoofline& roofline,
                 double batch_seconds) {
  TOKENLAKE_CHECK(instances >= 1 && roofline.kv_bytes_per_s > 0 &&
                      roofline.attention_flops_per_s > 0 && batch_seconds > 0,
                  "CacheLoad: N, B, P and T must be positive");
  const double n = static_cast<double>(instances);
  const double m = access.kv_bytes, f = access.attention_flops;
  const double memory = m > 0 ? m / (m + n * roofline.kv_bytes_per_s * batch_seconds) : 0;
  const double compute = f > 0 ? f / (f + n * roofline.attention_flops_per_s * batch_seconds) : 0;
  return std::max(memory, compute);
}

}  // namespace tokenlake::plan
