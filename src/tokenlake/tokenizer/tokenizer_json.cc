#include "tokenlake/tokenizer/tokenizer_json.h"

#define PCRE2_CODE_UNIT_WIDTH 8
#include <pcre2.h>
#include <unicode/bytestream.h>
#include <unicode/normalizer2.h>
#include <unicode/utypes.h>

#include <array>
#include <queue>
#include <utility>

#include "absl/container/flat_hash_map.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_join.h"
#include "nlohmann/json.hpp"
#include "tokenlake/base/status_macros.h"
#include "tokenlake/tokenizer/added_vocabulary.h"
#include "tokenlake/tokenizer/utf8.h"

namespace tokenlake::tokenizer {
namespace {

using json = nlohmann::json;

// Abseil's own string_view (the Debian build does not alias std::string_view) for hash lookups.
absl::string_view Av(std::string_view s) { return absl::string_view(s.data(), s.size()); }

// GPT-2's pre-tokenizer pattern, built into ByteLevel when use_regex is set.
constexpr std::string_view kGpt2Pattern =
    R"('s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+)";

// A compiled PCRE2 pattern (UTF, Unicode properties). Matching allocates its own match data, so
// one Regex serves any number of threads.
class Regex {
 public:
  static absl::StatusOr<std::shared_ptr<Regex>> Compile(std::string_view pattern,
                                                        const std::string& where) {
    int error = 0;
    PCRE2_SIZE offset = 0;
    pcre2_code* code = pcre2_compile(reinterpret_cast<PCRE2_SPTR>(pattern.data()), pattern.size(),
                                     PCRE2_UTF | PCRE2_UCP, &error, &offset, nullptr);
    if (code == nullptr) {
      std::array<PCRE2_UCHAR, 256> message{};
      pcre2_get_error_message(error, message.data(), message.size());
      return absl::InvalidArgumentError(
          absl::StrCat(where, ": the regex does not compile at offset ", offset, ": ",
                       reinterpret_cast<const char*>(message.data())));
    }
    pcre2_jit_compile(code, PCRE2_JIT_COMPLETE);  // an optimisation: failure leaves the interpreter
    return std::shared_ptr<Regex>(new Regex(code));
  }
  ~Regex() { pcre2_code_free(code_); }
  Regex(const Regex&) = delete;
  Regex& operator=(const Regex&) = delete;

  // The [begin, end) byte ranges of the non-empty matches in `text` (valid UTF-8), left to right.
  absl::Status FindAll(std::string_view text,
                       std::vector<std::pair<size_t, size_t>>* matches) const {
    pcre2_match_data* md = pcre2_match_data_create_from_pattern(code_, nullptr);
    size_t offset = 0;
    absl::Status status;
    while (offset <= text.size()) {
      const int rc = pcre2_match(code_, reinterpret_cast<PCRE2_SPTR>(text.data()), text.size(),
                                 offset, PCRE2_NO_UTF_CHECK, md, nullptr);
      if (rc == PCRE2_ERROR_NOMATCH) break;
      if (rc < 0) {
        status = absl::ResourceExhaustedError(
            absl::StrCat("pre-tokenizer regex failed (PCRE2 error ", rc, ")"));
        break;
      }
      const PCRE2_SIZE* ov = pcre2_get_ovector_pointer(md);
      if (ov[1] > ov[0]) {
        matches->emplace_back(ov[0], ov[1]);
        offset = ov[1];
      } else {
        // An empty match: step over one character.
        if (ov[0] >= text.size()) break;
        size_t p = ov[0];
        uint32_t cp = 0;
        DecodeCodePoint(text, &p, &cp);
        offset = p;
      }
    }
    pcre2_match_data_free(md);
    return status;
  }

 private:
  explicit Regex(pcre2_code* code) : code_(code) {}
  pcre2_code* code_;
};

// One pre-tokenizer step.
struct PreStep {
  enum class Kind { kByteLevel, kSplit };
  Kind kind = Kind::kByteLevel;
  // ByteLevel.
  bool add_prefix_space = false;
  bool use_regex = false;
  // Split (and ByteLevel with use_regex): the pattern, or a literal.
  std::shared_ptr<Regex> regex;
  std::string literal;
  // Split behavior: keep the matches as pieces (Isolated) or drop them (Removed).
  bool remove_matches = false;
};

class ByteLevelBpe : public Tokenizer {
 public:
  absl::StatusOr<std::vector<int32_t>> Encode(std::string_view text,
                                              bool add_special_tokens) const override;
  std::unique_ptr<DecodeStream> NewDecodeStream(bool skip_special_tokens) const override;
  int32_t vocab_size() const override { return vocab_size_; }
  std::optional<int32_t> TokenToId(std::string_view token) const override {
    if (auto id = added_.FindContent(token)) return id;
    auto it = vocab_.find(Av(token));
    if (it == vocab_.end()) return std::nullopt;
    return it->second;
  }
  std::optional<std::string> IdToToken(int32_t id) const override {
    if (const AddedToken* t = added_.FindId(id)) return t->content;
    if (id < 0 || id >= static_cast<int32_t>(id_to_token_.size()) || !has_id_[id]) {
      return std::nullopt;
    }
    return id_to_token_[id];
  }
  bool IsSpecial(int32_t id) const override {
    const AddedToken* t = added_.FindId(id);
    return t != nullptr && t->special;
  }

  // The bytes token `id` stands for (ByteLevel decoding of its spelling).
  void AppendTokenBytes(int32_t id, bool skip_special, std::string* out) const;

  absl::Status Load(const json& root, const std::string& src);

 private:
  absl::Status LoadModel(const json& model, const std::string& src);
  absl::Status LoadNormalizer(const json& norm, const std::string& src, const std::string& field);
  absl::Status LoadPreTokenizer(const json& pre, const std::string& src, const std::string& field);
  absl::Status LoadPostProcessor(const json& post, const std::string& src,
                                 const std::string& field);
  absl::Status PreTokenize(std::string_view text, std::vector<std::string>* words) const;
  void EncodeWord(std::string_view word, std::vector<int32_t>* ids) const;

  absl::flat_hash_map<std::string, int32_t> vocab_;
  std::vector<std::string> id_to_token_;
  std::vector<bool> has_id_;
  // (left id, right id) -> (rank, merged id).
  absl::flat_hash_map<std::pair<int32_t, int32_t>, std::pair<int32_t, int32_t>> merges_;
  bool ignore_merges_ = false;
  std::optional<int32_t> unk_id_;
  AddedVocabulary added_;
  // Unicode normalization forms applied, in order, to text outside added tokens (ICU's).
  std::vector<const icu::Normalizer2*> normalizers_;
  std::vector<PreStep> pre_steps_;
  std::vector<int32_t> prefix_ids_;  // TemplateProcessing tokens before $A
  std::vector<int32_t> suffix_ids_;  // ... and after it
  int32_t vocab_size_ = 0;
  // GPT-2's byte <-> unicode map: every byte has a printable stand-in character.
  std::array<std::string, 256> byte_chars_;
  absl::flat_hash_map<uint32_t, uint8_t> char_bytes_;
};

absl::Status Bad(const std::string& src, const std::string& what) {
  return absl::InvalidArgumentError(absl::StrCat(src, ": ", what));
}
absl::Status Unsupported(const std::string& src, const std::string& what) {
  return absl::UnimplementedError(absl::StrCat(src, ": ", what));
}

// The "type" of a component object, or an error naming `field`.
absl::StatusOr<std::string> TypeOf(const json& obj, const std::string& src,
                                   const std::string& field) {
  if (!obj.is_object()) return Bad(src, absl::StrCat("field '", field, "' must be an object"));
  auto it = obj.find("type");
  if (it == obj.end() || !it->is_string()) {
    return Bad(src, absl::StrCat("field '", field, ".type' must be a string"));
  }
  return it->get<std::string>();
}

bool BoolOr(const json& obj, const char* key, bool default_value) {
  auto it = obj.find(key);
  if (it == obj.end() || !it->is_boolean()) return default_value;
  return it->get<bool>();
}

bool IsNullOrEmptyString(const json& obj, const char* key) {
  auto it = obj.find(key);
  return it == obj.end() || it->is_null() || (it->is_string() && it->get<std::string>().empty());
}

absl::Status ByteLevelBpe::Load(const json& root, const std::string& src) {
  if (!root.is_object()) return Bad(src, "not a JSON object");
  // Byte-level map (GPT-2's bytes_to_unicode).
  {
    std::array<bool, 256> printable{};
    for (int b = '!'; b <= '~'; ++b) printable[b] = true;
    for (int b = 0xA1; b <= 0xAC; ++b) printable[b] = true;
    for (int b = 0xAE; b <= 0xFF; ++b) printable[b] = true;
    uint32_t next = 256;
    for (int b = 0; b < 256; ++b) {
      const uint32_t cp = printable[b] ? static_cast<uint32_t>(b) : next++;
      AppendCodePoint(cp, &byte_chars_[b]);
      char_bytes_[cp] = static_cast<uint8_t>(b);
    }
  }

  auto model = root.find("model");
  if (model == root.end()) return Bad(src, "missing field 'model'");
  TOKENLAKE_RETURN_IF_ERROR(LoadModel(*model, src));

  auto norm = root.find("normalizer");
  if (norm != root.end() && !norm->is_null()) {
    TOKENLAKE_RETURN_IF_ERROR(LoadNormalizer(*norm, src, "normalizer"));
  }

  // Added tokens.
  std::vector<AddedToken> added;
  auto at = root.find("added_tokens");
  if (at != root.end() && !at->is_null()) {
    if (!at->is_array()) return Bad(src, "field 'added_tokens' must be an array");
    for (size_t i = 0; i < at->size(); ++i) {
      const json& t = (*at)[i];
      const std::string f = absl::StrCat("added_tokens[", i, "]");
      if (!t.is_object() || !t.contains("id") || !t["id"].is_number_integer() ||
          !t.contains("content") || !t["content"].is_string()) {
        return Bad(src,
                   absl::StrCat("field '", f, "' needs an integer 'id' and a string 'content'"));
      }
      AddedToken token;
      token.id = t["id"].get<int32_t>();
      if (token.id < 0) return Bad(src, absl::StrCat("field '", f, ".id' is negative"));
      token.content = t["content"].get<std::string>();
      TOKENLAKE_RETURN_IF_ERROR(
          ValidateUtf8(token.content, absl::StrCat(src, ": ", f, ".content")));
      token.special = BoolOr(t, "special", false);
      token.lstrip = BoolOr(t, "lstrip", false);
      token.rstrip = BoolOr(t, "rstrip", false);
      token.single_word = BoolOr(t, "single_word", false);
      vocab_size_ = std::max(vocab_size_, token.id + 1);
      added.push_back(std::move(token));
    }
  }
  added_ = AddedVocabulary(std::move(added));

  auto pre = root.find("pre_tokenizer");
  if (pre == root.end() || pre->is_null()) {
    return Unsupported(src,
                       "pre_tokenizer is null: only byte-level BPE (a ByteLevel "
                       "pre-tokenizer) is supported");
  }
  TOKENLAKE_RETURN_IF_ERROR(LoadPreTokenizer(*pre, src, "pre_tokenizer"));
  bool has_byte_level = false;
  for (const PreStep& s : pre_steps_) has_byte_level |= s.kind == PreStep::Kind::kByteLevel;
  if (!has_byte_level) {
    return Unsupported(src,
                       "pre_tokenizer has no ByteLevel step: only byte-level BPE is "
                       "supported");
  }

  auto post = root.find("post_processor");
  if (post != root.end() && !post->is_null()) {
    TOKENLAKE_RETURN_IF_ERROR(LoadPostProcessor(*post, src, "post_processor"));
  }

  auto dec = root.find("decoder");
  if (dec != root.end() && !dec->is_null()) {
    TOKENLAKE_ASSIGN_OR_RETURN(std::string type, TypeOf(*dec, src, "decoder"));
    if (type != "ByteLevel") {
      return Unsupported(src,
                         absl::StrCat("decoder '", type, "' is not supported (ByteLevel only)"));
    }
  }
  return absl::OkStatus();
}

absl::Status ByteLevelBpe::LoadModel(const json& model, const std::string& src) {
  TOKENLAKE_ASSIGN_OR_RETURN(std::string type, TypeOf(model, src, "model"));
  if (type != "BPE") {
    return Unsupported(src, absl::StrCat("model.type '", type, "' is not supported (BPE only)"));
  }
  auto dropout = model.find("dropout");
  if (dropout != model.end() && !dropout->is_null() &&
      !(dropout->is_number() && dropout->get<double>() == 0.0)) {
    return Unsupported(src, "model.dropout is not supported");
  }
  if (BoolOr(model, "byte_fallback", false)) {
    return Unsupported(src,
                       "model.byte_fallback is not supported (SentencePiece-style BPE: "
                       "read the folder's tokenizer.model instead)");
  }
  for (const char* key : {"continuing_subword_prefix", "end_of_word_suffix"}) {
    if (!IsNullOrEmptyString(model, key)) {
      return Unsupported(src, absl::StrCat("model.", key, " is not supported"));
    }
  }
  ignore_merges_ = BoolOr(model, "ignore_merges", false);

  auto vocab = model.find("vocab");
  if (vocab == model.end() || !vocab->is_object()) {
    return Bad(src, "field 'model.vocab' must be an object");
  }
  for (auto it = vocab->begin(); it != vocab->end(); ++it) {
    if (!it.value().is_number_integer() || it.value().get<int64_t>() < 0 ||
        it.value().get<int64_t>() > (1 << 30)) {
      return Bad(src, absl::StrCat("model.vocab['", it.key(), "'] must be a non-negative integer"));
    }
    const auto id = it.value().get<int32_t>();
    vocab_[it.key()] = id;
    if (id >= static_cast<int32_t>(id_to_token_.size())) {
      id_to_token_.resize(id + 1);
      has_id_.resize(id + 1, false);
    }
    id_to_token_[id] = it.key();
    has_id_[id] = true;
  }
  vocab_size_ = std::max(vocab_size_, static_cast<int32_t>(id_to_token_.size()));

  auto merges = model.find("merges");
  if (merges == model.end() || !merges->is_array()) {
    return Bad(src, "field 'model.merges' must be an array");
  }
  for (size_t i = 0; i < merges->size(); ++i) {
    const json& m = (*merges)[i];
    std::string a;
    std::string b;
    if (m.is_string()) {
      const std::string s = m.get<std::string>();
      const size_t space = s.find(' ');
      if (space == std::string::npos || s.find(' ', space + 1) != std::string::npos) {
        return Bad(src, absl::StrCat("model.merges[", i, "] = '", s, "' is not two tokens"));
      }
      a = s.substr(0, space);
      b = s.substr(space + 1);
    } else if (m.is_array() && m.size() == 2 && m[0].is_string() && m[1].is_string()) {
      a = m[0].get<std::string>();
      b = m[1].get<std::string>();
    } else {
      return Bad(src, absl::StrCat("model.merges[", i, "] must be \"a b\" or [\"a\", \"b\"]"));
    }
    auto ia = vocab_.find(a);
    auto ib = vocab_.find(b);
    auto iab = vocab_.find(a + b);
    if (ia == vocab_.end() || ib == vocab_.end() || iab == vocab_.end()) {
      return Bad(src, absl::StrCat("model.merges[", i, "] ('", a, "', '", b,
                                   "') names a token that is not in model.vocab"));
    }
    merges_.try_emplace({ia->second, ib->second}, static_cast<int32_t>(i), iab->second);
  }

  auto unk = model.find("unk_token");
  if (unk != model.end() && !unk->is_null()) {
    if (!unk->is_string()) return Bad(src, "field 'model.unk_token' must be a string");
    auto it = vocab_.find(unk->get<std::string>());
    if (it == vocab_.end()) return Bad(src, "model.unk_token is not in model.vocab");
    unk_id_ = it->second;
  }
  return absl::OkStatus();
}

absl::Status ByteLevelBpe::LoadNormalizer(const json& norm, const std::string& src,
                                          const std::string& field) {
  TOKENLAKE_ASSIGN_OR_RETURN(std::string type, TypeOf(norm, src, field));
  if (type == "Sequence") {
    auto list = norm.find("normalizers");
    if (list == norm.end() || !list->is_array()) {
      return Bad(src, absl::StrCat("field '", field, ".normalizers' must be an array"));
    }
    for (size_t i = 0; i < list->size(); ++i) {
      TOKENLAKE_RETURN_IF_ERROR(
          LoadNormalizer((*list)[i], src, absl::StrCat(field, ".normalizers[", i, "]")));
    }
    return absl::OkStatus();
  }
  UErrorCode error = U_ZERO_ERROR;
  const icu::Normalizer2* n = nullptr;
  if (type == "NFC") n = icu::Normalizer2::getNFCInstance(error);
  if (type == "NFD") n = icu::Normalizer2::getNFDInstance(error);
  if (type == "NFKC") n = icu::Normalizer2::getNFKCInstance(error);
  if (type == "NFKD") n = icu::Normalizer2::getNFKDInstance(error);
  if (n == nullptr && U_SUCCESS(error)) {
    return Unsupported(src, absl::StrCat(field, ".type '", type,
                                         "' is not supported (NFC, NFD, NFKC, NFKD, Sequence)"));
  }
  if (U_FAILURE(error)) {
    return absl::InternalError(absl::StrCat(src, ": ICU's ", type, " data: ", u_errorName(error)));
  }
  normalizers_.push_back(n);
  return absl::OkStatus();
}

absl::Status ByteLevelBpe::LoadPreTokenizer(const json& pre, const std::string& src,
                                            const std::string& field) {
  TOKENLAKE_ASSIGN_OR_RETURN(std::string type, TypeOf(pre, src, field));
  if (type == "Sequence") {
    auto list = pre.find("pretokenizers");
    if (list == pre.end() || !list->is_array()) {
      return Bad(src, absl::StrCat("field '", field, ".pretokenizers' must be an array"));
    }
    for (size_t i = 0; i < list->size(); ++i) {
      TOKENLAKE_RETURN_IF_ERROR(
          LoadPreTokenizer((*list)[i], src, absl::StrCat(field, ".pretokenizers[", i, "]")));
    }
    return absl::OkStatus();
  }
  PreStep step;
  if (type == "ByteLevel") {
    step.kind = PreStep::Kind::kByteLevel;
    step.add_prefix_space = BoolOr(pre, "add_prefix_space", true);
    step.use_regex = BoolOr(pre, "use_regex", true);
    if (step.use_regex) {
      TOKENLAKE_ASSIGN_OR_RETURN(step.regex, Regex::Compile(kGpt2Pattern, src));
    }
  } else if (type == "Split") {
    step.kind = PreStep::Kind::kSplit;
    if (BoolOr(pre, "invert", false)) {
      return Unsupported(src, absl::StrCat(field, ".invert = true is not supported"));
    }
    auto behavior = pre.find("behavior");
    const std::string b =
        behavior != pre.end() && behavior->is_string() ? behavior->get<std::string>() : "";
    if (b == "Removed") {
      step.remove_matches = true;
    } else if (b != "Isolated") {
      return Unsupported(
          src, absl::StrCat(field, ".behavior '", b, "' is not supported (Isolated or Removed)"));
    }
    auto pattern = pre.find("pattern");
    if (pattern == pre.end() || !pattern->is_object()) {
      return Bad(src, absl::StrCat("field '", field, ".pattern' must be an object"));
    }
    if (pattern->contains("Regex") && (*pattern)["Regex"].is_string()) {
      TOKENLAKE_ASSIGN_OR_RETURN(step.regex,
                                 Regex::Compile((*pattern)["Regex"].get<std::string>(),
                                                absl::StrCat(src, ": ", field, ".pattern.Regex")));
    } else if (pattern->contains("String") && (*pattern)["String"].is_string()) {
      step.literal = (*pattern)["String"].get<std::string>();
      if (step.literal.empty()) return Bad(src, absl::StrCat(field, ".pattern.String is empty"));
    } else {
      return Bad(src, absl::StrCat("field '", field, ".pattern' needs 'Regex' or 'String'"));
    }
  } else {
    return Unsupported(src, absl::StrCat(field, ".type '", type,
                                         "' is not supported (ByteLevel, Split, Sequence)"));
  }
  pre_steps_.push_back(std::move(step));
  return absl::OkStatus();
}

absl::Status ByteLevelBpe::LoadPostProcessor(const json& post, const std::string& src,
                                             const std::string& field) {
  TOKENLAKE_ASSIGN_OR_RETURN(std::string type, TypeOf(post, src, field));
  if (type == "ByteLevel") return absl::OkStatus();  // offsets only
  if (type == "Sequence") {
    auto list = post.find("processors");
    if (list == post.end() || !list->is_array()) {
      return Bad(src, absl::StrCat("field '", field, ".processors' must be an array"));
    }
    for (size_t i = 0; i < list->size(); ++i) {
      TOKENLAKE_RETURN_IF_ERROR(
          LoadPostProcessor((*list)[i], src, absl::StrCat(field, ".processors[", i, "]")));
    }
    return absl::OkStatus();
  }
  if (type != "TemplateProcessing") {
    return Unsupported(src, absl::StrCat(field, ".type '", type,
                                         "' is not supported (TemplateProcessing, ByteLevel, "
                                         "Sequence)"));
  }
  if (!prefix_ids_.empty() || !suffix_ids_.empty()) {
    return Unsupported(src, absl::StrCat(field, ": a second TemplateProcessing"));
  }
  auto single = post.find("single");
  auto specials = post.find("special_tokens");
  if (single == post.end() || !single->is_array()) {
    return Bad(src, absl::StrCat("field '", field, ".single' must be an array"));
  }
  bool seen_sequence = false;
  for (size_t i = 0; i < single->size(); ++i) {
    const json& item = (*single)[i];
    const std::string f = absl::StrCat(field, ".single[", i, "]");
    if (item.contains("Sequence")) {
      const json& seq = item["Sequence"];
      if (!seq.is_object() || seq.value("id", "") != "A" || seen_sequence) {
        return Unsupported(src, absl::StrCat(f, ": only one sequence, $A, is supported"));
      }
      seen_sequence = true;
      continue;
    }
    if (!item.contains("SpecialToken") || !item["SpecialToken"].is_object() ||
        !item["SpecialToken"].contains("id") || !item["SpecialToken"]["id"].is_string()) {
      return Bad(src, absl::StrCat("field '", f, "' must be a Sequence or a SpecialToken"));
    }
    const std::string name = item["SpecialToken"]["id"].get<std::string>();
    if (specials == post.end() || !specials->is_object() || !specials->contains(name) ||
        !(*specials)[name].contains("ids") || !(*specials)[name]["ids"].is_array()) {
      return Bad(src, absl::StrCat(field, ".special_tokens has no ids for '", name, "'"));
    }
    for (const json& id : (*specials)[name]["ids"]) {
      if (!id.is_number_integer()) {
        return Bad(src, absl::StrCat(field, ".special_tokens['", name, "'].ids must be integers"));
      }
      (seen_sequence ? suffix_ids_ : prefix_ids_).push_back(id.get<int32_t>());
    }
  }
  if (!seen_sequence) return Bad(src, absl::StrCat(field, ".single has no $A sequence"));
  return absl::OkStatus();
}

absl::Status ByteLevelBpe::PreTokenize(std::string_view text,
                                       std::vector<std::string>* words) const {
  std::vector<std::string> pieces = {std::string(text)};
  std::vector<std::pair<size_t, size_t>> matches;
  for (const PreStep& step : pre_steps_) {
    std::vector<std::string> next;
    for (std::string& piece : pieces) {
      if (step.kind == PreStep::Kind::kByteLevel && step.add_prefix_space &&
          (piece.empty() || piece[0] != ' ')) {
        piece.insert(piece.begin(), ' ');
      }
      const bool split = step.kind == PreStep::Kind::kSplit || step.use_regex;
      std::vector<std::string> parts;
      if (!split) {
        parts.push_back(std::move(piece));
      } else {
        matches.clear();
        if (step.regex != nullptr) {
          TOKENLAKE_RETURN_IF_ERROR(step.regex->FindAll(piece, &matches));
        } else {
          for (size_t at = piece.find(step.literal); at != std::string::npos;
               at = piece.find(step.literal, at + step.literal.size())) {
            matches.emplace_back(at, at + step.literal.size());
          }
        }
        size_t done = 0;
        for (const auto& [begin, end] : matches) {
          if (begin > done) parts.push_back(piece.substr(done, begin - done));
          if (!step.remove_matches) parts.push_back(piece.substr(begin, end - begin));
          done = end;
        }
        if (done < piece.size()) parts.push_back(piece.substr(done));
      }
      for (std::string& part : parts) {
        if (part.empty()) continue;
        if (step.kind == PreStep::Kind::kByteLevel) {
          std::string mapped;
          for (char c : part) mapped += byte_chars_[static_cast<uint8_t>(c)];
          part = std::move(mapped);
        }
        next.push_back(std::move(part));
      }
    }
    pieces = std::move(next);
  }
  for (std::string& p : pieces) words->push_back(std::move(p));
  return absl::OkStatus();
}

void ByteLevelBpe::EncodeWord(std::string_view word, std::vector<int32_t>* ids) const {
  if (ignore_merges_) {
    auto it = vocab_.find(Av(word));
    if (it != vocab_.end()) {
      ids->push_back(it->second);
      return;
    }
  }
  // Symbols as a doubly linked list over a vector; merged-away symbols get id -1.
  struct Symbol {
    int32_t id;
    int prev;
    int next;
  };
  std::vector<Symbol> symbols;
  size_t pos = 0;
  while (pos < word.size()) {
    const size_t start = pos;
    uint32_t cp = 0;
    DecodeCodePoint(word, &pos, &cp);
    auto it = vocab_.find(Av(word.substr(start, pos - start)));
    int32_t id = -1;
    if (it != vocab_.end()) {
      id = it->second;
    } else if (unk_id_.has_value()) {
      id = *unk_id_;
    } else {
      continue;  // as Hugging Face's BPE does without an unk_token: the character is dropped
    }
    const int n = static_cast<int>(symbols.size());
    symbols.push_back({id, n - 1, n + 1});
  }
  if (symbols.empty()) return;
  symbols.back().next = -1;

  // Lowest rank first, then leftmost (tokenizers' Word::merge_all).
  struct Candidate {
    int32_t rank;
    int pos;
    int32_t new_id;
    bool operator>(const Candidate& o) const {
      return rank != o.rank ? rank > o.rank : pos > o.pos;
    }
  };
  std::priority_queue<Candidate, std::vector<Candidate>, std::greater<>> queue;
  auto push_pair = [&](int left) {
    if (left < 0 || symbols[left].next < 0) return;
    auto it = merges_.find({symbols[left].id, symbols[symbols[left].next].id});
    if (it != merges_.end()) queue.push({it->second.first, left, it->second.second});
  };
  for (int i = 0; i + 1 < static_cast<int>(symbols.size()); ++i) push_pair(i);
  while (!queue.empty()) {
    const Candidate c = queue.top();
    queue.pop();
    Symbol& left = symbols[c.pos];
    if (left.id < 0 || left.next < 0) continue;
    auto it = merges_.find({left.id, symbols[left.next].id});
    if (it == merges_.end() || it->second.second != c.new_id || it->second.first != c.rank) {
      continue;  // stale: one side was merged since
    }
    Symbol& right = symbols[left.next];
    left.id = c.new_id;
    right.id = -1;
    left.next = right.next;
    if (left.next >= 0) symbols[left.next].prev = c.pos;
    push_pair(left.prev);
    push_pair(c.pos);
  }
  for (int i = 0; i >= 0; i = symbols[i].next) ids->push_back(symbols[i].id);
}

absl::StatusOr<std::vector<int32_t>> ByteLevelBpe::Encode(std::string_view text,
                                                          bool add_special_tokens) const {
  TOKENLAKE_RETURN_IF_ERROR(ValidateUtf8(text, "text to encode"));
  std::vector<int32_t> ids;
  if (add_special_tokens) ids = prefix_ids_;
  std::vector<std::string> words;
  for (const AddedVocabulary::Piece& piece : added_.Split(text)) {
    if (piece.id >= 0) {
      ids.push_back(piece.id);
      continue;
    }
    words.clear();
    std::string normalized;
    std::string_view text_part(piece.text.data(), piece.text.size());
    for (const icu::Normalizer2* n : normalizers_) {
      UErrorCode error = U_ZERO_ERROR;
      const icu::StringPiece in(text_part.data(), static_cast<int32_t>(text_part.size()));
      if (n->isNormalizedUTF8(in, error) && U_SUCCESS(error)) continue;
      std::string out;
      icu::StringByteSink<std::string> sink(&out);
      error = U_ZERO_ERROR;
      n->normalizeUTF8(0, in, sink, nullptr, error);
      if (U_FAILURE(error)) {
        return absl::InternalError(absl::StrCat("Unicode normalization: ", u_errorName(error)));
      }
      normalized = std::move(out);
      text_part = normalized;
    }
    TOKENLAKE_RETURN_IF_ERROR(PreTokenize(text_part, &words));
    for (const std::string& w : words) EncodeWord(w, &ids);
  }
  if (add_special_tokens) ids.insert(ids.end(), suffix_ids_.begin(), suffix_ids_.end());
  return ids;
}

void ByteLevelBpe::AppendTokenBytes(int32_t id, bool skip_special, std::string* out) const {
  std::string_view spelling;
  if (const AddedToken* t = added_.FindId(id)) {
    if (skip_special && t->special) return;
    spelling = t->content;
  } else if (id >= 0 && id < static_cast<int32_t>(id_to_token_.size()) && has_id_[id]) {
    spelling = id_to_token_[id];
  } else {
    return;
  }
  // ByteLevel decoding: every character maps back to its byte, or (when one does not) the
  // spelling is taken as it is.
  const size_t mark = out->size();
  size_t pos = 0;
  while (pos < spelling.size()) {
    uint32_t cp = 0;
    DecodeCodePoint(spelling, &pos, &cp);
    auto it = char_bytes_.find(cp);
    if (it == char_bytes_.end()) {
      out->resize(mark);
      out->append(spelling);
      return;
    }
    out->push_back(static_cast<char>(it->second));
  }
}

class ByteLevelStream : public DecodeStream {
 public:
  ByteLevelStream(const ByteLevelBpe* tok, bool skip_special) : tok_(tok), skip_(skip_special) {}
  void Push(int32_t id, std::string* out) override {
    tok_->AppendTokenBytes(id, skip_, &pending_);
    const size_t n = FinalPrefixLength(pending_);
    AppendLossy(std::string_view(pending_).substr(0, n), out);
    pending_.erase(0, n);
  }
  void Finish(std::string* out) override {
    AppendLossy(pending_, out);
    pending_.clear();
  }

 private:
  const ByteLevelBpe* tok_;
  bool skip_;
  std::string pending_;  // bytes of a character not yet complete
};

std::unique_ptr<DecodeStream> ByteLevelBpe::NewDecodeStream(bool skip_special_tokens) const {
  return std::make_unique<ByteLevelStream>(this, skip_special_tokens);
}

}  // namespace

absl::StatusOr<std::unique_ptr<Tokenizer>> ParseTokenizerJson(const std::string& json_text,
                                                              const std::string& src) {
  const json root = json::parse(json_text, nullptr, false);
  if (root.is_discarded()) return Bad(src, "not valid JSON");
  auto tok = std::make_unique<ByteLevelBpe>();
  TOKENLAKE_RETURN_IF_ERROR(tok->Load(root, src));
  return std::unique_ptr<Tokenizer>(std::move(tok));
}

}  // namespace tokenlake::tokenizer
