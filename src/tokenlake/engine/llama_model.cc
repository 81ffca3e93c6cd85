#include "tokenlake/engine/llama_model.h"

#include <utility>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/engine/ops.h"

namespace tokenlake::engine {

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::Load(const std::string& dir) {
  TOKENLAKE_ASSIGN_OR_RETURN(LlamaConfig config, LoadLlamaConfig(dir + "/config.json"));
  TOKENLAKE_ASSIGN_OR_RETURN(std::unique_ptr<Checkpoint> checkpoint, Checkpoint::Open(dir));
  return FromCheckpoint(config, *checkpoint);
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::FromSafetensors(
    const LlamaConfig& config, const SafetensorsFile& file) {
  return FromCheckpoint(config, *Checkpoint::Borrow(file));
}

absl::StatusOr<std::unique_ptr<LlamaModel>> LlamaModel::FromCheckpoint(
    const LlamaConfig& config, const Checkpoint& checkpoint) {
  std::unique_ptr<LlamaModel> m(new LlamaModel(config));
  m->layers_.resize(static_cast<size_t>(config.num_layers));
  for (const LlamaTensorSpec& spec : LlamaCheckpointTensors(config)) {
    TOKENLAKE_ASSIGN_OR_RETURN(std::vector<float> values,
                               checkpoint.ReadFloat32(spec.name, spec.shape));
    LayerWeights* w = spec.layer >= 0 ? &m->layers_[static_cast<size_t>(spec.layer)] : nullptr;
    switch (spec.weight) {
      case LlamaWeight::kEmbed:
        m->embed_ = std::move(values);
        break;
      case LlamaWeight::kInputNorm:
        w->input_norm = std::move(values);
        break;
      case LlamaWeight::kQ:
        w->q_proj = std::move(values);
        break;
      case LlamaWeight::kK:
        w->k_proj = std::move(values);
        break;
      case LlamaWeight::kV:
        w->v_proj = std::move(values);
        break;
      case LlamaWeight::kO:
        w->o_proj = std::move(values);
        break;
      case LlamaWeight::kPostNorm:
        w->post_norm = std::move(values);
        break;
      case LlamaWeight::kGate:
        w->gate_proj = std::move(values);
        break;
      case LlamaWeight::kUp:
        w->up_proj = std::move(values);
        break;
      case LlamaWeight::kDown:
        w->down_proj = std::move(values);
        break;
      case LlamaWeight::kFinalNorm:
        m->final_norm_ = std::move(values);
        break;
      case LlamaWeight::kLmHead:
        m->lm_head_ = std::move(values);
        break;
    }
  }
  m->inv_freq_ = RopeInvFreq(config.head_dim, config.rope_theta);
  return m;
}

absl::StatusOr<std::vector<float>> LlamaModel::Forward(absl::Span<const int32_t> tokens,
                                                       int64_t start_pos,
                                                       AttentionBackend& backend) const {
  if (tokens.empty()) return absl::InvalidArgumentError("LlamaModel::Forward: no tokens");
  const BatchSequence one{.tokens = tokens, .start_pos = start_pos, .backend = &backend};
  TOKENLAKE_ASSIGN_OR_RETURN(std::vector<std::vector<float>> logits,
                             ForwardBatch(absl::MakeConstSpan(&one, 1)));
  return std::move(logits[0]);
}

absl::StatusOr<std::vector<std::vector<float>>> LlamaModel::ForwardBatch(
    absl::Span<const BatchSequence> batch, BatchAttention* joint) const {
  const LlamaConfig& c = config_;
  if (batch.empty()) return absl::InvalidArgumentError("LlamaModel::Forward: empty batch");
  std::vector<int64_t> first(batch.size() + 1, 0);  // first row of each sequence
  for (size_t b = 0; b < batch.size(); ++b) {
    const BatchSequence& sq = batch[b];
    if (sq.tokens.empty() || (sq.backend == nullptr && joint == nullptr)) {
      return absl::InvalidArgumentError(absl::StrFormat(
          "LlamaModel::Forward: sequence %d of the batch has no tokens or no backend", b));
    }
    if (sq.start_pos < 0) {
      return absl::InvalidArgumentError(
          absl::StrFormat("LlamaModel::Forward: start_pos %d < 0 (sequence %d)", sq.start_pos, b));
    }
    for (size_t i = 0; i < sq.tokens.size(); ++i) {
      if (sq.tokens[i] < 0 || sq.tokens[i] >= c.vocab_size) {
        return absl::InvalidArgumentError(
            absl::StrFormat("LlamaModel::Forward: token %d at index %d of sequence %d is outside "
                            "the vocabulary [0, %d)",
                            sq.tokens[i], i, b, c.vocab_size));
      }
    }
    first[b + 1] = first[b] + static_cast<int64_t>(sq.tokens.size());
  }
  const int32_t n = static_cast<int32_t>(first.back());
  const size_t h = static_cast<size_t>(c.hidden_size);
  const int32_t qd = c.num_heads * c.head_dim;
  const int32_t kvd = c.num_kv_heads * c.head_dim;
  const int32_t inter = c.intermediate_size;

  std::vector<float> x(n * h);
  for (size_t b = 0; b < batch.size(); ++b) {
    for (size_t t = 0; t < batch[b].tokens.size(); ++t) {
      std::copy_n(embed_.data() + static_cast<size_t>(batch[b].tokens[t]) * h, h,
                  x.data() + (static_cast<size_t>(first[b]) + t) * h);
    }
  }
  std::vector<float> normed(n * h), q(static_cast<size_t>(n) * qd), k(static_cast<size_t>(n) * kvd),
      v(static_cast<size_t>(n) * kvd), attn(static_cast<size_t>(n) * qd), proj(n * h),
      gate(static_cast<size_t>(n) * inter), up(static_cast<size_t>(n) * inter);
  for (int32_t l = 0; l < c.num_layers; ++l) {
    const LayerWeights& w = layers_[static_cast<size_t>(l)];
    RmsNorm(x, w.input_norm, c.rms_norm_eps, absl::MakeSpan(normed));
    Linear(normed, n, c.hidden_size, w.q_proj, qd, absl::MakeSpan(q));
    Linear(normed, n, c.hidden_size, w.k_proj, kvd, absl::MakeSpan(k));
    Linear(normed, n, c.hidden_size, w.v_proj, kvd, absl::MakeSpan(v));
    // Positions and attention are per sequence; everything else is per row.
    std::vector<AttendCall> calls;
    for (size_t b = 0; b < batch.size(); ++b) {
      const int32_t m = static_cast<int32_t>(first[b + 1] - first[b]);
      const size_t q0 = static_cast<size_t>(first[b]) * qd;
      const size_t k0 = static_cast<size_t>(first[b]) * kvd;
      const absl::Span<float> qb = absl::MakeSpan(q).subspan(q0, static_cast<size_t>(m) * qd);
      const absl::Span<float> kb = absl::MakeSpan(k).subspan(k0, static_cast<size_t>(m) * kvd);
      ApplyRope(qb, m, c.num_heads, c.head_dim, batch[b].start_pos, inv_freq_);
      ApplyRope(kb, m, c.num_kv_heads, c.head_dim, batch[b].start_pos, inv_freq_);
      const AttendCall call{.num_tokens = m,
                            .q = qb,
                            .k = kb,
                            .v = absl::MakeConstSpan(v).subspan(k0, static_cast<size_t>(m) * kvd),
                            .out = absl::MakeSpan(attn).subspan(q0, static_cast<size_t>(m) * qd)};
      if (joint != nullptr) {
        calls.push_back(call);
      } else {
        TOKENLAKE_RETURN_IF_ERROR(batch[b].backend->Attend(l, m, call.q, call.k, call.v, call.out));
      }
    }
    if (joint != nullptr) TOKENLAKE_RETURN_IF_ERROR(joint->AttendBatch(l, calls));
    Linear(attn, n, qd, w.o_proj, c.hidden_size, absl::MakeSpan(proj));
    for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
    RmsNorm(x, w.post_norm, c.rms_norm_eps, absl::MakeSpan(normed));
    Linear(normed, n, c.hidden_size, w.gate_proj, inter, absl::MakeSpan(gate));
    Linear(normed, n, c.hidden_size, w.up_proj, inter, absl::MakeSpan(up));
    for (size_t i = 0; i < gate.size(); ++i) gate[i] = Silu(gate[i]) * up[i];
    Linear(gate, n, inter, w.down_proj, c.hidden_size, absl::MakeSpan(proj));
    for (size_t i = 0; i < x.size(); ++i) x[i] += proj[i];
  }
  // Only each sequence's last token's logits are needed.
  std::vector<std::vector<float>> logits(batch.size());
  std::vector<float> last(h);
  for (size_t b = 0; b < batch.size(); ++b) {
    if (!batch[b].want_logits) continue;
    RmsNorm(absl::MakeConstSpan(x).subspan(static_cast<size_t>(first[b + 1] - 1) * h, h),
            final_norm_, c.rms_norm_eps, absl::MakeSpan(last));
    logits[b].resize(static_cast<size_t>(c.vocab_size));
    Linear(last, 1, c.hidden_size, lm_head_.empty() ? embed_ : lm_head_, c.vocab_size,
           absl::MakeSpan(logits[b]));
  }
  return logits;
}

}  // namespace tokenlake::engine
