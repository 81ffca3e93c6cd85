#include "tokenlake/engine/prompts.h"

#include <fstream>
#include <limits>
#include <sstream>

#include "absl/strings/str_cat.h"
#include "absl/strings/str_split.h"
#include "absl/strings/strip.h"
#include "nlohmann/json.hpp"

namespace tokenlake::engine {

absl::StatusOr<std::vector<Prompt>> ParsePromptsJsonl(const std::string& text,
                                                      const std::string& source_name) {
  using json = nlohmann::json;
  std::vector<Prompt> prompts;
  int64_t line_no = 0;
  for (absl::string_view line : absl::StrSplit(text, '\n')) {
    ++line_no;
    line = absl::StripAsciiWhitespace(line);
    if (line.empty()) continue;
    const std::string where = absl::StrCat(source_name, ":", line_no, ": ");
    const json obj = json::parse(line.begin(), line.end(), nullptr, false);
    if (obj.is_discarded()) return absl::InvalidArgumentError(where + "not valid JSON");
    if (!obj.is_object()) return absl::InvalidArgumentError(where + "not a JSON object");
    auto it = obj.find("input_ids");
    if (it == obj.end()) return absl::InvalidArgumentError(where + "missing field 'input_ids'");
    if (!it->is_array()) {
      return absl::InvalidArgumentError(where + "field 'input_ids' is not an array");
    }
    if (it->empty()) return absl::InvalidArgumentError(where + "field 'input_ids' is empty");
    Prompt p;
    p.line = line_no;
    for (size_t i = 0; i < it->size(); ++i) {
      const json& v = (*it)[i];
      if (!v.is_number_integer() || v.get<int64_t>() < 0 ||
          v.get<int64_t>() > std::numeric_limits<int32_t>::max()) {
        return absl::InvalidArgumentError(absl::StrCat(where, "input_ids[", i, "] = ", v.dump(),
                                                       " is not a token id (an integer >= 0)"));
      }
      p.input_ids.push_back(static_cast<int32_t>(v.get<int64_t>()));
    }
    prompts.push_back(std::move(p));
  }
  if (prompts.empty()) {
    return absl::InvalidArgumentError(absl::StrCat(source_name, ": no prompts"));
  }
  return prompts;
}

absl::StatusOr<std::vector<Prompt>> LoadPromptsJsonl(const std::string& path) {
  std::ifstream in(path);
  if (!in) return absl::NotFoundError(absl::StrCat(path, ": cannot open prompts file"));
  std::stringstream ss;
  ss << in.rdbuf();
  return ParsePromptsJsonl(ss.str(), path);
}

}  // namespace tokenlake::engine
