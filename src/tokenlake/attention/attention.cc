#include "tokenlake/attention/attention.h"

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <vector>

#include "absl/strings/str_format.h"
#include "tokenlake/attention/cpu_kernel.h"
#include "tokenlake/base/check.h"
#include "tokenlake/base/status_macros.h"

namespace tokenlake::attention {
namespace {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();
constexpr int32_t kMaxHeadDim = 4096;
constexpr int32_t kMaxHeads = 1 << 16;

absl::Status CheckSize(const char* what, size_t actual, int64_t expected) {
  if (static_cast<int64_t>(actual) != expected) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s has %d elements, expected %d", what, actual, expected));
  }
  return absl::OkStatus();
}

absl::Status ValidatePartialShape(const char* where, const PartialShape& shape) {
  if (shape.num_q_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("%s: num_q_tokens must be >= 0, got %d", where, shape.num_q_tokens));
  }
  if (shape.num_heads < 1 || shape.num_heads > kMaxHeads) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: num_heads must be in [1, %d], got %d",
                                                      where, kMaxHeads, shape.num_heads));
  }
  if (shape.head_dim < 1 || shape.head_dim > kMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrFormat("%s: head_dim must be in [1, %d], got %d",
                                                      where, kMaxHeadDim, shape.head_dim));
  }
  return absl::OkStatus();
}

int64_t OutElements(const PartialShape& s) {
  return static_cast<int64_t>(s.num_q_tokens) * s.num_heads * s.head_dim;
}
int64_t LseElements(const PartialShape& s) {
  return static_cast<int64_t>(s.num_q_tokens) * s.num_heads;
}

}  // namespace

const char* KvDtypeName(KvDtype dtype) {
  switch (dtype) {
    case KvDtype::kFloat32:
      return "f32";
    case KvDtype::kBFloat16:
      return "bf16";
  }
  return "unknown";
}

absl::Status KvSlotLayout::Validate() const {
  if (num_layers < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KvSlotLayout.num_layers must be >= 1, got %d", num_layers));
  }
  if (segment_tokens < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KvSlotLayout.segment_tokens must be >= 1, got %d", segment_tokens));
  }
  if (num_kv_heads < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KvSlotLayout.num_kv_heads must be >= 1, got %d", num_kv_heads));
  }
  if (head_dim < 1) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KvSlotLayout.head_dim must be >= 1, got %d", head_dim));
  }
  if (dtype != KvDtype::kFloat32 && dtype != KvDtype::kBFloat16) {
    return absl::InvalidArgumentError(
        absl::StrFormat("KvSlotLayout.dtype %d is not a KvDtype", static_cast<int>(dtype)));
  }
  // All four fields are < 2^31, so each pairwise product fits; check the full product.
  const double bytes = 2.0 * num_layers * segment_tokens * num_kv_heads * head_dim *
                       static_cast<double>(KvDtypeBytes(dtype));
  if (bytes > 9.0e18) {
    return absl::InvalidArgumentError("KvSlotLayout: slot size overflows int64");
  }
  return absl::OkStatus();
}

int64_t KvSlotLayout::TokenRowBytes() const {
  return static_cast<int64_t>(num_kv_heads) * head_dim * static_cast<int64_t>(KvDtypeBytes(dtype));
}
int64_t KvSlotLayout::BlockBytes() const { return segment_tokens * TokenRowBytes(); }
int64_t KvSlotLayout::SlotBytes() const {
  return 2 * static_cast<int64_t>(num_layers) * BlockBytes();
}
int64_t KvSlotLayout::BlockOffsetBytes(int32_t layer, int kv) const {
  TOKENLAKE_CHECK(layer >= 0 && layer < num_layers, "layer out of range");
  TOKENLAKE_CHECK(kv == 0 || kv == 1, "kv must be 0 (K) or 1 (V)");
  return (2 * static_cast<int64_t>(layer) + kv) * BlockBytes();
}

absl::StatusOr<KvBlock> SlotLayerBlock(const KvSlotLayout& layout, const void* slot, int32_t layer,
                                       int32_t num_tokens) {
  TOKENLAKE_RETURN_IF_ERROR(layout.Validate());
  if (layer < 0 || layer >= layout.num_layers) {
    return absl::InvalidArgumentError(
        absl::StrFormat("SlotLayerBlock: layer %d out of [0, %d)", layer, layout.num_layers));
  }
  if (num_tokens < 0 || num_tokens > layout.segment_tokens) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "SlotLayerBlock: num_tokens %d out of [0, %d]", num_tokens, layout.segment_tokens));
  }
  if (slot == nullptr && num_tokens > 0) {
    return absl::InvalidArgumentError("SlotLayerBlock: null slot with num_tokens > 0");
  }
  KvBlock block;
  block.num_tokens = num_tokens;
  if (slot != nullptr) {
    const auto* base = static_cast<const unsigned char*>(slot);
    block.k = base + layout.BlockOffsetBytes(layer, 0);
    block.v = base + layout.BlockOffsetBytes(layer, 1);
  }
  return block;
}

float EffectiveSoftmaxScale(const AttentionParams& params) {
  if (params.softmax_scale != 0.0f) return params.softmax_scale;
  return static_cast<float>(1.0 / std::sqrt(static_cast<double>(std::max(1, params.head_dim))));
}

absl::Status ValidateAttentionArgs(const AttentionParams& params, int32_t num_q_tokens,
                                   absl::Span<const float> q, absl::Span<const KvBlock> blocks,
                                   absl::Span<const float> out, absl::Span<const float> lse) {
  if (params.num_kv_heads < 1 || params.num_kv_heads > kMaxHeads) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "AttentionParams.num_kv_heads must be in [1, %d], got %d", kMaxHeads, params.num_kv_heads));
  }
  if (params.num_heads < 1 || params.num_heads > kMaxHeads) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "AttentionParams.num_heads must be in [1, %d], got %d", kMaxHeads, params.num_heads));
  }
  if (params.num_heads % params.num_kv_heads != 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("AttentionParams.num_heads (%d) must be a multiple of num_kv_heads (%d)",
                        params.num_heads, params.num_kv_heads));
  }
  if (params.head_dim < 1 || params.head_dim > kMaxHeadDim) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "AttentionParams.head_dim must be in [1, %d], got %d", kMaxHeadDim, params.head_dim));
  }
  if (params.kv_dtype != KvDtype::kFloat32 && params.kv_dtype != KvDtype::kBFloat16) {
    return absl::InvalidArgumentError(absl::StrFormat(
        "AttentionParams.kv_dtype %d is not a KvDtype", static_cast<int>(params.kv_dtype)));
  }
  if (!std::isfinite(params.softmax_scale)) {
    return absl::InvalidArgumentError("AttentionParams.softmax_scale must be finite");
  }
  if (params.q_start_pos < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("AttentionParams.q_start_pos must be >= 0, got %d", params.q_start_pos));
  }
  if (num_q_tokens < 0) {
    return absl::InvalidArgumentError(
        absl::StrFormat("num_q_tokens must be >= 0, got %d", num_q_tokens));
  }
  const PartialShape shape{num_q_tokens, params.num_heads, params.head_dim};
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("q", q.size(), OutElements(shape)));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("out", out.size(), OutElements(shape)));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("lse", lse.size(), LseElements(shape)));
  if (num_q_tokens > 0 && q.data() == nullptr) {
    return absl::InvalidArgumentError("q is null");
  }
  for (size_t i = 0; i < blocks.size(); ++i) {
    const KvBlock& b = blocks[i];
    if (b.num_tokens < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("blocks[%d].num_tokens must be >= 0, got %d", i, b.num_tokens));
    }
    if (b.num_tokens > 0 && (b.k == nullptr || b.v == nullptr)) {
      return absl::InvalidArgumentError(
          absl::StrFormat("blocks[%d] has num_tokens %d but a null %s pointer", i, b.num_tokens,
                          b.k == nullptr ? "k" : "v"));
    }
  }
  return absl::OkStatus();
}

absl::Status PartialAttention(const AttentionParams& params, int32_t num_q_tokens,
                              absl::Span<const float> q, absl::Span<const KvBlock> blocks,
                              absl::Span<float> out, absl::Span<float> lse) {
  TOKENLAKE_RETURN_IF_ERROR(ValidateAttentionArgs(params, num_q_tokens, q, blocks, out, lse));
  if (num_q_tokens == 0) return absl::OkStatus();

  std::vector<int64_t> block_start(blocks.size() + 1, 0);
  for (size_t i = 0; i < blocks.size(); ++i) {
    block_start[i + 1] = block_start[i] + blocks[i].num_tokens;
  }
  const int64_t total_keys = block_start.back();

  internal::KernelProblem problem;
  problem.num_heads = params.num_heads;
  problem.num_kv_heads = params.num_kv_heads;
  problem.head_dim = params.head_dim;
  problem.dtype = params.kv_dtype;
  problem.scale = EffectiveSoftmaxScale(params);
  problem.causal = params.causal;
  problem.q_start_pos = params.q_start_pos;
  problem.q = q.data();
  problem.blocks = blocks;
  problem.block_start = block_start.data();

  // Tiles: with several query tokens a tile is a few tokens x the heads of one KV group (each
  // K/V row is reused by tokens x group rows from L1). With few tokens (decode) a tile is one
  // token x many heads (all KV heads of a key are one contiguous run, so the tile streams memory
  // sequentially).
  const int32_t group = params.num_heads / params.num_kv_heads;
  int32_t heads_per_tile;
  int32_t tokens_per_tile;
  if (num_q_tokens >= 4) {
    heads_per_tile = std::min<int32_t>(group, internal::kMaxTileRows);
    tokens_per_tile = std::max<int32_t>(1, internal::kMaxTileRows / heads_per_tile);
  } else {
    heads_per_tile =
        group >= internal::kMaxTileRows
            ? internal::kMaxTileRows
            : std::min<int32_t>(params.num_heads, internal::kMaxTileRows / group * group);
    tokens_per_tile = std::max<int32_t>(1, internal::kMaxTileRows / heads_per_tile);
  }
  const int64_t head_tiles = (params.num_heads + heads_per_tile - 1) / heads_per_tile;
  const int64_t token_tiles = (num_q_tokens + tokens_per_tile - 1) / tokens_per_tile;
  for (int64_t token_tile = 0; token_tile < token_tiles; ++token_tile) {
    for (int64_t head_tile = 0; head_tile < head_tiles; ++head_tile) {
      internal::TileRange tile;
      tile.token_begin = static_cast<int32_t>(token_tile * tokens_per_tile);
      tile.token_end = std::min<int32_t>(num_q_tokens, tile.token_begin + tokens_per_tile);
      tile.head_begin = static_cast<int32_t>(head_tile * heads_per_tile);
      tile.head_end = std::min<int32_t>(params.num_heads, tile.head_begin + heads_per_tile);
      tile.key_begin = 0;
      tile.key_end = total_keys;
      internal::RunAttentionTile(problem, tile, out.data(), lse.data());
    }
  }
  return absl::OkStatus();
}

absl::Status FillEmptyPartial(const PartialShape& shape, MutablePartialView partial) {
  TOKENLAKE_RETURN_IF_ERROR(ValidatePartialShape("FillEmptyPartial", shape));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("partial.out", partial.out.size(), OutElements(shape)));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("partial.lse", partial.lse.size(), LseElements(shape)));
  std::fill(partial.out.begin(), partial.out.end(), 0.0f);
  std::fill(partial.lse.begin(), partial.lse.end(), kNegInf);
  return absl::OkStatus();
}

void MergeRow(int32_t head_dim, const float* o_a, float lse_a, const float* o_b, float lse_b,
              float* o, float* lse) {
  if (lse_b == kNegInf) {
    if (lse_a == kNegInf) {
      std::fill_n(o, head_dim, 0.0f);
    } else if (o != o_a) {
      std::memmove(o, o_a, sizeof(float) * static_cast<size_t>(head_dim));
    }
    *lse = lse_a;
    return;
  }
  if (lse_a == kNegInf) {
    if (o != o_b) std::memmove(o, o_b, sizeof(float) * static_cast<size_t>(head_dim));
    *lse = lse_b;
    return;
  }
  const float m = std::max(lse_a, lse_b);
  const float wa = std::exp(lse_a - m);
  const float wb = std::exp(lse_b - m);
  const float sum = wa + wb;
  const float ca = wa / sum;
  const float cb = wb / sum;
  for (int32_t i = 0; i < head_dim; ++i) o[i] = ca * o_a[i] + cb * o_b[i];
  *lse = m + std::log(sum);
}

absl::Status MergePartials(const PartialShape& shape, PartialView a, PartialView b,
                           MutablePartialView result) {
  TOKENLAKE_RETURN_IF_ERROR(ValidatePartialShape("MergePartials", shape));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("a.out", a.out.size(), OutElements(shape)));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("a.lse", a.lse.size(), LseElements(shape)));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("b.out", b.out.size(), OutElements(shape)));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("b.lse", b.lse.size(), LseElements(shape)));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("result.out", result.out.size(), OutElements(shape)));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("result.lse", result.lse.size(), LseElements(shape)));
  const int64_t rows = LseElements(shape);
  const int32_t d = shape.head_dim;
  for (int64_t r = 0; r < rows; ++r) {
    MergeRow(d, a.out.data() + r * d, a.lse[r], b.out.data() + r * d, b.lse[r],
             result.out.data() + r * d, &result.lse[r]);
  }
  return absl::OkStatus();
}

absl::Status MergePartialsInPlace(const PartialShape& shape, MutablePartialView acc,
                                  absl::Span<const PartialView> others) {
  TOKENLAKE_RETURN_IF_ERROR(ValidatePartialShape("MergePartialsInPlace", shape));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("acc.out", acc.out.size(), OutElements(shape)));
  TOKENLAKE_RETURN_IF_ERROR(CheckSize("acc.lse", acc.lse.size(), LseElements(shape)));
  for (size_t k = 0; k < others.size(); ++k) {
    const std::string out_name = absl::StrFormat("others[%d].out", k);
    const std::string lse_name = absl::StrFormat("others[%d].lse", k);
    TOKENLAKE_RETURN_IF_ERROR(
        CheckSize(out_name.c_str(), others[k].out.size(), OutElements(shape)));
    TOKENLAKE_RETURN_IF_ERROR(
        CheckSize(lse_name.c_str(), others[k].lse.size(), LseElements(shape)));
  }
  const int64_t rows = LseElements(shape);
  const int32_t d = shape.head_dim;
  std::vector<float> weight(others.size());
  for (int64_t r = 0; r < rows; ++r) {
    float m = acc.lse[r];
    for (const PartialView& p : others) m = std::max(m, p.lse[r]);
    float* o = acc.out.data() + r * d;
    if (m == kNegInf) {
      std::fill_n(o, d, 0.0f);
      acc.lse[r] = kNegInf;
      continue;
    }
    const float w0 = acc.lse[r] == kNegInf ? 0.0f : std::exp(acc.lse[r] - m);
    float sum = w0;
    for (size_t k = 0; k < others.size(); ++k) {
      const float l = others[k].lse[r];
      weight[k] = l == kNegInf ? 0.0f : std::exp(l - m);
      sum += weight[k];
    }
    const float inv = 1.0f / sum;
    if (w0 == 0.0f) {
      std::fill_n(o, d, 0.0f);
    } else {
      const float c0 = w0 * inv;
      for (int32_t i = 0; i < d; ++i) o[i] *= c0;
    }
    for (size_t k = 0; k < others.size(); ++k) {
      if (weight[k] == 0.0f) continue;
      const float c = weight[k] * inv;
      const float* ok = others[k].out.data() + r * d;
      for (int32_t i = 0; i < d; ++i) o[i] += c * ok[i];
    }
    acc.lse[r] = m + std::log(sum);
  }
  return absl::OkStatus();
}

}  // namespace tokenlake::attention
